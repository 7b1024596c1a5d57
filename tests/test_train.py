"""End to end: recipes through TRL's SFTTrainer on tiny models, learning, resuming, the real-size recipe."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from data_tools.synth import make_shapes_dataset
from vlm_peft import load
from vlm_peft.cli import main
from vlm_peft.training.recipe import RecipeError, load_recipe
from vlm_peft.training.stages import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), seed=1, align_train=256, align_eval=32, sft_train=600, sft_eval=60
    )


def demo(tmp_path, shapes, *overrides):
    sets = [
        f"output_dir={tmp_path / 'run'}",
        f"llm.tokenizer={shapes / 'tokenizer'}",
        *(
            f"stages.{s}.data.{split}={shapes / f'{s}_{split}.jsonl'}"
            for s in ("align", "sft")
            for split in ("train", "eval")
        ),
        *overrides,
    ]
    return load_recipe("recipes/demo.yaml", sets)


class Killed(Exception):
    pass


class KillAfterSave(TrainerCallback):
    """Dies right after the checkpoint of `step` is written, as a killed job would."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed


RESUME = [
    "stages.align.args.max_steps=2",
    "stages.align.data.eval=null",
    "stages.sft.args.max_steps=6",
    "stages.sft.args.save_steps=3",
    "stages.sft.args.logging_steps=1",
    "stages.sft.args.per_device_train_batch_size=4",
    "stages.sft.data.eval=null",
    # Dropout and weight decay exercise the RNG and both optimizer groups of each role.
    "stages.sft.lora.dropout=0.1",
    "stages.sft.args.weight_decay=0.01",
]


def test_resumed_run_ends_with_the_same_weights(tmp_path, shapes):
    whole = demo(tmp_path / "a", shapes, *RESUME)
    whole_loss = train(whole)["sft"]["train_loss"]
    interrupted = demo(tmp_path / "b", shapes, *RESUME)
    with pytest.raises(Killed):
        train(interrupted, callbacks=[KillAfterSave(3)])
    stage_dir = interrupted.stage_dir("sft")
    assert (stage_dir / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert not (stage_dir / "checkpoint-6").exists()
    # Resuming with another `train` list is named before anything trains (and leaves the checkpoint as it was).
    changed = demo(tmp_path / "b", shapes, *RESUME, "stages.sft.train=[lora]")
    with pytest.raises(
        RecipeError,
        match=r"checkpoint-3 was made training projector 450,820 \+ LoRA 65,536 "
        r"parameters, this run trains projector 0 \+ LoRA 65,536 parameters: another `train` list",
    ):
        train(changed)
    resumed_loss = train(interrupted)["sft"]["train_loss"]  # align is done and skipped; sft resumes at step 3
    assert resumed_loss == pytest.approx(whole_loss, rel=1e-6)  # the whole stage's mean, not steps 4-6 only
    state = json.loads((stage_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]
    for name in ("projector.safetensors", "adapter_model.safetensors"):
        a, b = load_file(whole.stage_dir("sft") / name), load_file(stage_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    # A differently seeded run differs, so the equality above is not vacuous.
    other = demo(tmp_path / "c", shapes, *RESUME, "seed=5")
    train(other)
    c = load_file(other.stage_dir("sft") / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_a_checkpoint_from_before_revision_2_resumes_with_revision_1_named(tmp_path, shapes):
    align = ["stages.align.args.max_steps=4", "stages.align.args.save_steps=2", "stages.align.data.eval=null"]
    old = demo(tmp_path, shapes, *align, "projector.revision=1")
    with pytest.raises(Killed):
        train(old, stage="align", callbacks=[KillAfterSave(2)])
    config = old.stage_dir("align") / "checkpoint-2" / "vlm_config.json"
    saved = json.loads(config.read_text())
    del saved["projector_revision"]  # as written before revision 2
    config.write_text(json.dumps(saved))
    with pytest.raises(RecipeError, match=r"made with projector 'cross_attention' revision 1, this run builds "
                       r"'cross_attention' revision 2: resume with .*--set projector.revision=1"):  # fmt: skip
        train(demo(tmp_path, shapes, *align), stage="align")
    assert train(old, stage="align")["align"]["steps"] == 4


def test_stage_bookkeeping(tmp_path, shapes, caplog):
    recipe = demo(
        tmp_path,
        shapes,
        "stages.align.args.max_steps=2",
        "stages.sft.args.max_steps=2",
        "stages.align.data.eval=null",
        "stages.sft.data.eval=null",
    )
    with pytest.raises(RecipeError, match="stage sft starts from stage align, which has not run"):
        train(recipe, stage="sft")
    first = train(recipe)
    again = train(recipe)  # both done: skipped, metrics read back
    assert again == first
    saved = json.loads((recipe.stage_dir("sft") / "vlm_config.json").read_text())
    assert Path(saved["base_model"]).is_absolute() and Path(saved["vision_model"]).is_absolute()
    # A stage that died after saving but before its metrics reruns from its last checkpoint.
    (recipe.stage_dir("sft") / "metrics.json").unlink()
    assert train(recipe)["sft"]["steps"] == 2
    with caplog.at_level(logging.WARNING):
        train(recipe, stage="align", overwrite=True)
    assert "were trained from its old output" in caplog.text
    with pytest.raises(RecipeError, match="built from a different llm.random or seed"):
        train(demo(tmp_path, shapes, "seed=9"))
    with pytest.raises(RecipeError, match=r"stages.sft.data.train: .* not found"):
        train(demo(tmp_path / "x", shapes, "stages.sft.data.train=nope.jsonl"))


class OptimizerGroups(TrainerCallback):
    """Tensors per starting learning rate (decayed and not together), read at the first step."""

    def __init__(self):
        self.groups = None

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.groups is None:
            sizes: dict[float, int] = {}
            for g in optimizer.param_groups:
                sizes[g["initial_lr"]] = sizes.get(g["initial_lr"], 0) + len(g["params"])
            self.groups = sorted(sizes.items())


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # Revision 2: the cross-attention blocks (2 x 20 tensors) at a tenth of the projector's rate.
        ((), [(3e-4, 40), (3e-3, 10)]),
        (("stages.align.lr.attention=1e-5",), [(1e-5, 40), (3e-3, 10)]),
        # Tokens that merge 2x2 patches: the same tensors (the merge Linear is 4 times wider).
        (("projector.num_image_tokens=4",), [(3e-4, 40), (3e-3, 10)]),
        # Revision 1 keeps one projector group, so checkpoints made before revision 2 resume as before.
        (("projector.revision=1",), [(3e-3, 41)]),
    ],
)
def test_attention_blocks_learn_at_their_own_rate(tmp_path, shapes, overrides, expected):
    groups = OptimizerGroups()
    recipe = demo(tmp_path, shapes, "stages.align.args.max_steps=1", "stages.align.data.eval=null", *overrides)
    train(recipe, stage="align", callbacks=[groups])
    assert [(pytest.approx(lr), n) for lr, n in groups.groups] == expected


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes):
    """The demo recipe, shortened: learns the colour questions in ~30 s."""
    tmp_path = tmp_path_factory.mktemp("demo")
    recipe = demo(
        tmp_path,
        shapes,
        "stages.align.args.max_steps=60",
        "stages.sft.args.max_steps=300",
        "stages.align.eval.max_samples=32",
        "stages.sft.args.save_steps=1000",
        "stages.align.args.save_steps=1000",
    )
    return recipe, train(recipe)


def test_demo_recipe_learns(trained, shapes, tmp_path):
    recipe, results = trained
    sft = results["sft"]
    assert sft["steps"] == 300 and sft["lora"] > 0 and sft["projector"] > 0
    predictions = [json.loads(line) for line in (recipe.stage_dir("sft") / "eval_predictions.jsonl").open()]
    colour = [p["correct"] for p in predictions if p["prompt"].startswith("What colour")]
    # Chance: 1 in 6 colours; an answer also has to be well formed ("Red.") to count.
    assert sum(colour) / len(colour) >= 0.8
    # The adapter dir reloads onto the saved random base; `vlm-peft eval` gives the same answers.
    model, processor = load(recipe.stage_dir("sft"))
    assert model.peft_config["default"].r == 8
    out = tmp_path / "preds.jsonl"
    assert (
        main(
            [
                "eval",
                str(recipe.stage_dir("sft")),
                "--data",
                str(shapes / "sft_eval.jsonl"),
                "--out",
                str(out),
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    again = [json.loads(line) for line in out.open()]
    assert [p["prediction"] for p in again] == [p["prediction"] for p in predictions]


def colour_question(shapes):
    for line in (shapes / "sft_eval.jsonl").open():
        row = json.loads(line)
        if row["messages"][0]["content"][1]["text"].startswith("What colour"):
            return shapes / row["images"][0], row["messages"][1]["content"][0]["text"]
    raise AssertionError("no colour question")


def chat(model_dir, *args, stdin=None):
    command = [sys.executable, "-m", "vlm_peft.cli", "chat", str(model_dir), *args]
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_chat_answers_from_adapter_and_merged_dirs(trained, shapes, tmp_path):
    recipe, _ = trained
    image, answer = colour_question(shapes)
    adapter = recipe.stage_dir("sft")
    assert answer in chat(adapter, "--image", str(image), "--prompt", "What colour is the shape?")
    merged = main(["merge", str(adapter), str(tmp_path / "merged")])
    assert merged == 0
    session = f"/image {image}\nWhat colour is the shape?\n/quit\n"
    out = chat(tmp_path / "merged", stdin=session)
    assert "attached" in out and answer in out


def test_cli_reports_bad_recipes_without_a_traceback(tmp_path, capsys, caplog):
    assert main(["train", "recipes/demo.yaml", "--set", "stages.sft.args.max_stpes=1"]) == 2
    assert "stages.sft.args.max_stpes: not an SFTConfig argument" in caplog.text
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2


QWEN3_0_6B = (  # Qwen/Qwen3-0.6B's config.json, at 2 of its 28 layers
    "{hidden_size: 1024, intermediate_size: 3072, num_hidden_layers: 2, num_attention_heads: 16, "
    "num_key_value_heads: 8, head_dim: 128, vocab_size: 151936, rope_theta: 1000000, rms_norm_eps: 1.0e-6, "
    "max_position_embeddings: 40960, tie_word_embeddings: true}"
)
CLIP_B16 = (  # openai/clip-vit-base-patch16's vision config, at 1 of its 12 layers
    "{model_type: clip_vision_model, hidden_size: 768, intermediate_size: 3072, num_hidden_layers: 1, "
    "num_attention_heads: 12, image_size: 224, patch_size: 16}"
)


def test_qwen3_recipe_runs_a_step_at_real_width(tmp_path, shapes):
    """The real weights cannot be fetched here: same configs, random weights, reduced depth."""
    from .qwen_vocab import build_qwen3_tokenizer

    build_qwen3_tokenizer().save_pretrained(tmp_path / "qwen3-tokenizer")
    sets = [
        f"output_dir={tmp_path / 'run'}",
        "llm.name_or_path=null",
        f"llm.random={QWEN3_0_6B}",
        f"llm.tokenizer={tmp_path / 'qwen3-tokenizer'}",
        "llm.dtype=float32",
        "vision.name_or_path=null",
        f"vision.random={CLIP_B16}",
        "vision.dtype=float32",
    ]
    for stage in ("align", "sft"):
        data = "align" if stage == "align" else "sft"
        sets += [
            f"stages.{stage}.data.train={shapes / f'{data}_eval.jsonl'}",
            f"stages.{stage}.data.eval=null",
            f"stages.{stage}.args.max_steps=1",
            f"stages.{stage}.args.per_device_train_batch_size=1",
            f"stages.{stage}.args.bf16=false",
            f"stages.{stage}.args.dataloader_num_workers=0",
        ]
    recipe = load_recipe("recipes/qwen3-0.6b-clip.yaml", sets)
    results = train(recipe)
    assert results["align"]["projector"] == 29_272_068 and results["align"]["lora"] == 0
    # LoRA r=16 on q/k/v/o/gate/up/down: 360,448 per layer (10,092,544 for all 28).
    assert results["sft"]["projector"] == 29_272_068 and results["sft"]["lora"] == 2 * 360_448
    assert all(m["steps"] == 1 and torch.isfinite(torch.tensor(m["train_loss"])) for m in results.values())


@pytest.mark.parametrize(
    "override, key",
    [
        ("llm.tokenizer={tmp}/nope/tok", "llm.tokenizer: {tmp}/nope/tok does not exist"),
        ("vision.image_processor=./missing-processor", "vision.image_processor: ./missing-processor does not exist"),
        ("stages.sft.data.image_root={tmp}/no-images", "stages.sft.data.image_root: {tmp}/no-images is not a folder"),
        ("stages.align.data.features={tmp}/no-cache", "stages.align.data.features: {tmp}/no-cache does not exist"),
    ],
)
def test_missing_recipe_paths_are_recipe_errors_before_any_model(tmp_path, shapes, override, key):
    recipe = demo(tmp_path, shapes, override.format(tmp=tmp_path))
    with pytest.raises(RecipeError, match=re.escape(key.format(tmp=tmp_path))):
        train(recipe)
    assert not (tmp_path / "run" / "base").exists()


def test_hub_ids_are_not_taken_for_missing_paths():
    from vlm_peft.training.preflight import is_hub_id

    assert is_hub_id("Qwen/Qwen3-0.6B") and is_hub_id("gpt2") and is_hub_id("openai/clip-vit-base-patch16")
    assert not any(map(is_hub_id, ["runs/a/tok", "/abs/tok", "./tok", "../tok", "~/tok", "a/../b", "a--b/c"]))


def test_offline_a_hub_id_without_a_cached_copy_is_a_recipe_error(tmp_path, shapes, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    recipe = demo(tmp_path, shapes, "llm.tokenizer=someone/no-such-tokenizer")
    with pytest.raises(RecipeError, match="llm.tokenizer: someone/no-such-tokenizer is not a local path, and the hub"):
        train(recipe)


def test_a_finished_stage_whose_data_is_gone_is_not_checked(tmp_path, shapes):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    quick = ["stages.align.args.max_steps=1", "stages.sft.args.max_steps=1", "stages.align.data.eval=null",
             "stages.sft.data.eval=null"]  # fmt: skip
    recipe = demo(tmp_path, data, *quick)
    train(recipe, stage="align")
    (data / "align_train.jsonl").unlink()
    assert train(demo(tmp_path, data, *quick))["sft"]["steps"] == 1


NOISE = ("is_gradient_checkpointing", "pin_memory", "`max_length` is ignored")


def test_cli_train_writes_curves_counts_once_hints_the_stages_question_and_stays_quiet(
    tmp_path, shapes, capsys, caplog
):
    import shlex
    import warnings

    from transformers import AutoModel, AutoModelForCausalLM

    sets = [
        f"output_dir={tmp_path / 'run'}",
        f"llm.tokenizer={shapes / 'tokenizer'}",
        *(f"stages.{s}.data.{x}={shapes / f'{s}_{x}.jsonl'}" for s in ("align", "sft") for x in ("train", "eval")),
        "stages.align.args.max_steps=3",
        "stages.sft.args.max_steps=4",
        "stages.align.args.logging_steps=1",
        "stages.sft.args.logging_steps=1",
        "stages.sft.args.eval_strategy=steps",
        "stages.sft.args.eval_steps=2",
        "stages.sft.args.report_to=[tensorboard]",
        "stages.align.eval.max_samples=4",
        "stages.sft.eval.max_samples=4",
    ]
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "recipes/demo.yaml", *(a for s in sets for a in ("--set", s))]) == 0
        run = tmp_path / "run"
        assert main(["eval", str(run / "sft"), "--data", str(shapes / "sft_eval.jsonl"), "--max-samples", "4"]) == 0
    noisy = [str(w.message) for w in caught if any(n in str(w.message) for n in NOISE)]
    assert not noisy, noisy
    out = capsys.readouterr().out

    # 8. the chat hint asks the stage's own first held-out question
    first = json.loads((shapes / "sft_eval.jsonl").read_text().splitlines()[0])
    question = first["messages"][0]["content"][-1]["text"]
    assert f"--prompt {shlex.quote(question)}" in out and "Describe the image" not in out

    # 11. loss curves: a PNG and a CSV per stage (eval loss where the trainer evaluated), TensorBoard events
    for stage in ("align", "sft"):
        assert (run / stage / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        lines = (run / stage / "loss.csv").read_text().splitlines()
        assert lines[0] == "step,loss,eval_loss,learning_rate" and len(lines) == 1 + (3 if stage == "align" else 4)
    sft_csv = (run / "sft" / "loss.csv").read_text().splitlines()
    assert [bool(line.split(",")[2]) for line in sft_csv[1:]] == [False, True, False, True]
    assert f"sft: {run / 'sft' / 'loss.png'}" in out
    assert list((run / "sft").rglob("events.out.tfevents*"))

    # 10. each parameter counted once, and the total says what it holds
    metrics = {s: json.loads((run / s / "metrics.json").read_text()) for s in ("align", "sft")}
    llm = AutoModelForCausalLM.from_pretrained(run / "base").num_parameters()
    tower = AutoModel.from_pretrained(run / "vision").num_parameters()
    for m in metrics.values():
        assert m["llm"] == llm and m["vision"] == tower
        assert m["total"] == m["llm"] + m["projector_total"] + m["lora_total"] + m["vision"]
    assert metrics["align"]["projector"] == metrics["align"]["projector_total"] == metrics["sft"]["projector_total"]
    assert metrics["sft"]["lora"] == metrics["sft"]["lora_total"] > 0
    sft = metrics["sft"]
    assert f"all {sft['total']:,} parameters: LLM {llm:,} (frozen), projector {sft['projector_total']:,}" in caplog.text


class DiedWritingCheckpoint(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shapes):
    recipe = demo(tmp_path_factory.mktemp("whole"), shapes, *RESUME)
    train(recipe)
    return {name: load_file(recipe.stage_dir("sft") / name) for name in ("projector.safetensors",
                                                                       "adapter_model.safetensors")}  # fmt: skip


@pytest.mark.parametrize("point", ["adapter files", "optimizer", "rng state", "trainer_state.json"])
def test_a_checkpoint_torn_at_any_write_resumes_from_the_one_before(tmp_path, shapes, uninterrupted, monkeypatch,
                                                                     caplog, point):  # fmt: skip
    from transformers import Trainer, TrainerState

    from vlm_peft.training.trainer import VLMTrainer

    def dies_at_step_6(original, where_arg):
        def wrapped(*args, **kwargs):
            target = str(args[where_arg] if len(args) > where_arg else kwargs.get("output_dir", ""))
            if "checkpoint-6" not in target:
                return original(*args, **kwargs)
            if point == "trainer_state.json":  # half a file, as a kill in the middle of the write leaves it
                Path(target).write_text('{"best_metric": null, "global_step": 6, "log_hist')
            else:
                original(*args, **kwargs)  # this part is written; the process dies right after
            raise DiedWritingCheckpoint

        return wrapped

    patched = {
        "adapter files": (VLMTrainer, "save_model", 1),
        "optimizer": (Trainer, "_save_optimizer_and_scheduler", 1),
        "rng state": (Trainer, "_save_rng_state", 1),
        "trainer_state.json": (TrainerState, "save_to_json", 1),
    }[point]
    cls, name, where_arg = patched
    recipe = demo(tmp_path, shapes, *RESUME)
    with monkeypatch.context() as m:
        m.setattr(cls, name, dies_at_step_6(getattr(cls, name), where_arg))
        with pytest.raises(DiedWritingCheckpoint):
            train(recipe)
    stage_dir = recipe.stage_dir("sft")
    assert (stage_dir / "checkpoint-6").is_dir() and (stage_dir / "checkpoint-3" / "trainer_state.json").is_file()
    with caplog.at_level(logging.WARNING):
        train(recipe)
    assert "checkpoint-6 is incomplete" in caplog.text and (stage_dir / "incomplete-checkpoint-6").is_dir()
    for name, want in uninterrupted.items():
        got = load_file(stage_dir / name)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)


def test_projector_heads_that_do_not_divide_the_width_name_the_key(tmp_path, shapes):
    with pytest.raises(RecipeError, match=r"projector.heads: 5 does not divide the LLM's hidden size 128"):
        train(demo(tmp_path, shapes, "projector.heads=5", "llm.random.hidden_size=128"))
    assert not (tmp_path / "run" / "base").exists()


class Diverge(TrainerCallback):
    """Makes the projector's weights NaN after `step`, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if p.requires_grad).fill_(float("nan"))


def test_a_run_that_goes_non_finite_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, shapes):
    from vlm_peft.training.trainer import NonFiniteError

    recipe = demo(tmp_path, shapes, *RESUME)
    with pytest.raises(NonFiniteError, match=r"stage sft, step 5: non-finite gradient"):
        train(recipe, callbacks=[Diverge(4)])
    stage_dir = recipe.stage_dir("sft")
    assert not (stage_dir / "metrics.json").exists() and not (stage_dir / "checkpoint-6").exists()
    good = load_file(stage_dir / "checkpoint-3" / "projector.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())
    assert train(recipe)["sft"]["steps"] == 6  # resumes from checkpoint-3 and finishes
