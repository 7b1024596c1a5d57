"""Streamed training data (`data.streaming: true`): the stream's order under DataLoader workers, several
processes and a resume; rows fitted to max_length batch by batch; a streamed stage resumed mid-way."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from data_tools.synth import make_shapes_dataset
from vlm_peft.data.collator import VLMCollator
from vlm_peft.data.streaming import FittingCollator, stream_rows
from vlm_peft.training.recipe import RecipeError, load_recipe
from vlm_peft.training.stages import train

from .conftest import N, make_image


def rows(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(n)
    ]


def batches(stream, count: int, workers: int = 0) -> list[list[str]]:
    """The first `count` batches of a DataLoader over `stream`, as the rows' questions."""

    def names(batch: list[dict]) -> list[str]:
        return [r["messages"][0]["content"][0]["text"] for r in batch]

    loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=workers, collate_fn=names)
    it = iter(loader)
    return [next(it) for _ in range(count)]


def test_the_stream_order_is_the_same_with_workers_processes_and_after_a_resume(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(10)))
    args = dict(batch_size=2, shuffle_buffer=4, seed=1)
    reference = batches(stream_rows(path, **args), 12)  # 24 rows: past the end of the file twice
    flat = [q for batch in reference for q in batch]
    assert sorted(flat[:10]) == sorted(f"q{i}" for i in range(10))  # each pass holds every row once
    assert flat[:10] != [f"q{i}" for i in range(10)] and flat[:10] != flat[10:20]  # shuffled, differently per pass
    assert batches(stream_rows(path, **args, workers=2), 12, workers=2) == reference
    # Resuming 6 rows (3 batches) in, with workers: the batches an uninterrupted run goes on with.
    assert batches(stream_rows(path, **args, workers=2, start=6), 9, workers=2) == reference[3:]
    # Two processes as accelerate splits them (shards of the IterableDataset): distinct rows, in turn.
    both = stream_rows(path, **args, processes=2, workers=2)
    first, second = (batches(both.shard(num_shards=2, index=i), 6, workers=2) for i in (0, 1))
    assert [b for pair in zip(first, second) for b in pair] == reference
    in_order = batches(stream_rows(path, batch_size=2, shuffle_buffer=0), 5)
    assert in_order == [[f"q{i}", f"q{i + 1}"] for i in range(0, 10, 2)]


def test_streamed_parquet_keeps_image_bytes_until_the_collator(tmp_path, processor):
    import datasets

    from vlm_peft.data.rows import normalize_row

    make_image((255, 0, 0)).save(tmp_path / "red.png")
    data = (tmp_path / "red.png").read_bytes()
    row = normalize_row(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A red circle."},
            ],
            "images": ["red.png"],
        },
        "row",
    )
    del row["__where__"]
    datasets.Dataset.from_list([{**row, "images": [{"bytes": data, "path": None}]}] * 3).to_parquet(
        str(tmp_path / "d.parquet")
    )
    (first,) = batches_of(stream_rows(tmp_path / "d.parquet", batch_size=3, shuffle_buffer=0), 1)
    assert [r["images"] for r in first] == [[{"bytes": data, "path": None}]] * 3
    assert [r["__where__"] for r in first] == [f"{tmp_path / 'd.parquet'}: row {i}" for i in range(3)]
    batch = VLMCollator(processor, None)(first)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    # A resume 2 passes and 2 rows in (whole passes skipped unread: parquet says how many rows it holds).
    args = dict(batch_size=1, shuffle_buffer=2, seed=3)
    order = [r[0]["__where__"] for r in batches_of(stream_rows(tmp_path / "d.parquet", **args), 12, 1)]
    resumed = [r[0]["__where__"] for r in batches_of(stream_rows(tmp_path / "d.parquet", **args, start=8), 4, 1)]
    assert resumed == order[8:]


def batches_of(stream, count: int, batch_size: int = 3) -> list[list[dict]]:
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=list)
    it = iter(loader)
    return [next(it) for _ in range(count)]


def test_streamed_rows_that_max_length_would_cut_are_dropped_from_their_batch_and_named(tmp_path, processor, caplog):
    make_image((255, 0, 0)).save(tmp_path / "red.png")
    image_row = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A red circle."},
        ],
        "images": ["red.png"],
    }
    late_image = {**image_row, "messages": [{"role": "user", "content": "x " * 30}, *image_row["messages"]]}
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [image_row, late_image, image_row]))
    (first,) = batches_of(stream_rows(path, batch_size=3, shuffle_buffer=0), 1)
    collator = FittingCollator(VLMCollator(processor, tmp_path, max_length=N + 30), N + 30, "stages.sft.data.train")
    with caplog.at_level("WARNING"):
        batch = collator(first)
    assert batch["input_ids"].shape[0] == 2
    assert f"dropped 1 rows whose images would be cut or whose answers start past max_length={N + 30}: {path}:2" in (
        caplog.text
    )
    with pytest.raises(ValueError, match=rf"every row of a batch would be cut by max_length=10 \({path}:1, {path}:2"):
        FittingCollator(VLMCollator(processor, tmp_path, max_length=10), 10, "stages.sft.data.train")(first)


def test_streaming_needs_max_steps_and_sane_data_keys():
    with pytest.raises(RecipeError, match=r"data.streaming: a stream has no length .* stages.align.args.max_steps"):
        load_recipe("recipes/demo.yaml", ["stages.align.data.streaming=true", "stages.align.args.max_steps=-1"])
    with pytest.raises(RecipeError, match=r"stages.align.data.num_proc: must be >= 1, got 0"):
        load_recipe("recipes/demo.yaml", ["stages.align.data.num_proc=0"])
    with pytest.raises(RecipeError, match=r"stages.align.data.shuffle_buffer: must be >= 0"):
        load_recipe("recipes/demo.yaml", ["stages.align.data.shuffle_buffer=-1"])
    recipe = load_recipe("recipes/demo.yaml", ["stages.align.data.streaming=true", "stages.align.args.max_steps=5"])
    assert recipe.stage("align").data.streaming


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), seed=1, align_train=40, align_eval=8, sft_train=8, sft_eval=8
    )


class Killed(Exception):
    pass


@pytest.mark.slow
def test_a_streamed_stage_resumed_mid_way_sees_the_rows_and_ends_with_the_weights_of_an_uninterrupted_one(
    tmp_path, shapes, monkeypatch
):
    from transformers import TrainerCallback

    seen: list[list[str]] = []
    collate = FittingCollator.__call__

    def spy(self, batch):
        seen.append([r["__where__"].rsplit(":", 1)[1] for r in batch])
        return collate(self, batch)

    monkeypatch.setattr(FittingCollator, "__call__", spy)

    class KillAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Killed

    def recipe(name: str):
        return load_recipe(
            "recipes/demo.yaml",
            [
                f"output_dir={tmp_path / name}",
                f"llm.tokenizer={shapes / 'tokenizer'}",
                f"stages.align.data.train={shapes / 'align_train.jsonl'}",
                "stages.align.data.eval=null",
                "stages.align.data.streaming=true",
                "stages.align.data.shuffle_buffer=16",
                "stages.align.args.max_steps=6",
                "stages.align.args.save_steps=3",
                "stages.align.args.per_device_train_batch_size=8",  # 6 steps x 8 = 48 rows: past the end of 40
            ],
        )

    whole = recipe("whole")
    train(whole, stage="align")
    uninterrupted, seen[:] = seen[:6], []  # the DataLoader may collate one batch ahead of the step
    cut = recipe("cut")
    with pytest.raises(Killed):
        train(cut, stage="align", callbacks=[KillAfterSave()])
    before, seen[:] = seen[:3], []
    state = json.loads((cut.stage_dir("align") / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["StreamPosition"]["args"] == {"rows": 24}
    train(cut, stage="align")
    assert before + seen[:3] == uninterrupted
    assert len({line for batch in uninterrupted[:5] for line in batch}) == 40  # the first pass: each row once
    a = load_file(whole.stage_dir("align") / "projector.safetensors")
    b = load_file(cut.stage_dir("align") / "projector.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
