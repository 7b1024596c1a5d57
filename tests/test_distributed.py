"""Several processes on CPU (torchrun, gloo): DDP equals one process on the same global batch, ranks whose
batches hold no image run the same collectives, shared files have one writer. Hangs fail fast: every
collective times out after distributed.timeout and every launch after TIMEOUT seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_tools.synth import make_shapes_dataset

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 420


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), seed=2, align_train=64, align_eval=8, sft_train=64, sft_eval=8
    )


def settings(out: Path, data: Path, batch: int, *extra: str) -> list[str]:
    sets = [
        f"output_dir={out}",
        f"llm.tokenizer={data / 'tokenizer'}",
        *(f"stages.{s}.data.train={data / f'{s}_train.jsonl'}" for s in ("align", "sft")),
        "stages.align.data.eval=null",
        "stages.sft.data.eval=null",
        "stages.align.args.max_steps=2",
        "stages.sft.args.max_steps=3",
        "distributed.timeout=120",
        *(f"stages.{s}.args.{k}={v}" for s in ("align", "sft") for k, v in (
            ("per_device_train_batch_size", batch), ("train_sampling_strategy", "sequential"),
            ("logging_steps", 1), ("save_steps", 1000), ("weight_decay", 0.0)))
    ]  # fmt: skip
    return [arg for s in [*sets, *extra] for arg in ("--set", s)]


def run(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return run([*launcher, str(ROOT / "tests" / "ddp_entry.py"), *args], env)


def weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("projector.safetensors", "adapter_model.safetensors"):
        if (stage_dir / name).is_file():
            out |= {f"{name}:{k}": v for k, v in load_file(stage_dir / name).items()}
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_ddp_two_ranks_equal_one_process_and_each_shared_file_has_one_writer(tmp_path, shapes):
    one = tmp_path / "one"
    run([sys.executable, "-m", "vlm_peft.cli", "train", "recipes/demo.yaml", *settings(one, shapes, 8)])
    two = tmp_path / "two"
    # Rank 0 saves late: a process that walked on to the next stage without waiting would find no adapter.
    # Its evaluation outlasts distributed.timeout: the others wait for it without a timed collective.
    slow = {"VLM_PEFT_TEST_SLOW_SAVE": "3", "VLM_PEFT_TEST_SLOW_EVAL": "11"}
    done = torchrun("train", "recipes/demo.yaml", *settings(two, shapes, 4, "distributed.timeout=8"), env=slow)
    assert "global batch 8 (4 per device x 2 processes x 1 accumulation)" in done.stderr
    for stage in ("align", "sft"):
        diff = max_diff(weights(one / stage), weights(two / stage))
        print(f"DDP 2 ranks vs one process, stage {stage}: max |delta weight| {diff:.2e}")
        assert diff <= 1e-4, (stage, diff)
    assert json.loads((two / "sft" / "metrics.json").read_text())["steps"] == 3
    assert not [p.name for p in two.iterdir() if p.name.startswith(".")]  # no temporary dirs left
    assert json.loads((two / "base" / "vlm_peft_random.json").read_text())["seed"] == 0
    assert done.stdout.count("stage  steps") == 1  # one report, from the main process

    # Rank 0 killed right after writing sft's checkpoint-2 (torchrun stops the other), then rerun: the
    # resumed run ends bit-identical to the uninterrupted one.
    three = tmp_path / "three"
    killed = settings(three, shapes, 4, "stages.sft.args.save_steps=2")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLM_PEFT_TEST_DIE_AT": "sft:2"}
    dead = subprocess.run([*launcher, str(ROOT / "tests" / "ddp_entry.py"), "train", "recipes/demo.yaml", *killed],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    assert dead.returncode != 0 and not (three / "sft" / "metrics.json").exists()
    resumed = torchrun("train", "recipes/demo.yaml", *killed)
    assert f"resuming from {three / 'sft' / 'checkpoint-2'}" in resumed.stderr
    assert max_diff(weights(two / "sft"), weights(three / "sft")) == 0.0


def text_or_image_rows(shapes: Path, out: Path) -> Path:
    """Image rows and text-only rows in turn: in order and one row per device, one rank gets text only."""
    rows = [json.loads(line) for line in (shapes / "sft_train.jsonl").read_text().splitlines()[:8]]
    mixed = []
    for i, row in enumerate(rows):
        if i % 2:
            question = row["messages"][0]["content"][-1]["text"]
            row = {"messages": [{"role": "user", "content": question}, row["messages"][1]], "images": []}
        else:
            row["images"] = [str(shapes / row["images"][0])]
        mixed.append(row)
    out.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    return out


def test_a_rank_with_text_only_batches_runs_the_same_collectives(tmp_path, shapes):
    data = text_or_image_rows(shapes, tmp_path / "mixed.jsonl")
    mixed = [f"stages.{s}.data.train={data}" for s in ("align", "sft")]
    one = tmp_path / "one"
    run([sys.executable, "-m", "vlm_peft.cli", "train", "recipes/demo.yaml", *settings(one, shapes, 2, *mixed)])
    two = tmp_path / "two"
    # --nproc: vlm-peft starts torchrun itself.
    run([sys.executable, "-m", "vlm_peft.cli", "train", "recipes/demo.yaml", "--nproc", "2",
         *settings(two, shapes, 1, *mixed)])  # fmt: skip
    for stage in ("align", "sft"):
        diff = max_diff(weights(one / stage), weights(two / stage))
        print(f"DDP with a text-only rank vs one process, stage {stage}: max |delta weight| {diff:.2e}")
        assert diff <= 1e-4, (stage, diff)
