"""Tool calls, tool results and reasoning survive the canonical format and train as Qwen3 renders them."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch

from vlm_peft.data.collator import IGNORE_INDEX, VLMCollator
from vlm_peft.data.rows import load_rows, normalize_row

from .conftest import make_image

TOOLS = [{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object", "properties": {}}}}]
TOOL_ROW = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "What colour is it? Zoom in first."},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "zoom", "arguments": {"x": 1}}}]},
        {"role": "tool", "content": "done"},
        {"role": "assistant", "content": "It is red.", "reasoning_content": "looked"},
    ],
}
PLAIN_ROW = {
    "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there."}],
}


def qwen3_render(tokenizer, row: dict, **kwargs) -> str:
    qwen3 = (files("trl") / "chat_templates" / "qwen3.jinja").read_text()  # Qwen3's own template, shipped by TRL
    return tokenizer.apply_chat_template(
        row["messages"], tools=row.get("tools"), chat_template=qwen3, tokenize=False, **kwargs
    )


def spans(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    out, current = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            out.append(tokenizer.decode(current))
            current = []
    if current:
        out.append(tokenizer.decode(current))
    return out


def test_tool_row_keeps_calls_reasoning_and_tools():
    row = normalize_row(TOOL_ROW, "row")
    assert json.loads(row["tools"]) == TOOLS
    call = row["messages"][1]["tool_calls"][0]
    assert call == {"type": "function", "function": {"name": "zoom", "arguments": '{"x": 1}'}}
    assert row["messages"][3]["reasoning_content"] == "looked"


def test_tool_row_trains_on_calls_and_answer_not_on_results(processor):
    tokenizer = processor.tokenizer
    batch = VLMCollator(processor)([normalize_row(TOOL_ROW, "row")])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert tokenizer.decode(ids) == qwen3_render(tokenizer, TOOL_ROW)
    assert spans(ids, labels, tokenizer) == [
        '<tool_call>\n{"name": "zoom", "arguments": {"x": 1}}\n</tool_call><|im_end|>',
        "<think>\nlooked\n</think>\n\nIt is red.<|im_end|>",
    ]


def test_rows_with_different_tools_in_one_batch(processor, tmp_path):
    # transformers renders one `tools` per batch: rows with other tools must still get their own.
    def image_row(colours: list[str], tools=None) -> dict:
        parts = [{"type": "image"} for _ in colours]
        return {
            "tools": tools,
            "messages": [
                {"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "Shapes."},
            ],
            "images": [f"{c}.png" for c in colours],
        }

    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    for name, rgb in colours.items():
        make_image(rgb).save(tmp_path / f"{name}.png")
    # Image rows in three tools groups, interleaved: pixel_values must stay in reading order.
    raw = [image_row(["red"]), TOOL_ROW, image_row(["green", "blue"], TOOLS), PLAIN_ROW, image_row(["blue"], [{}])]
    rows = [normalize_row(r, str(i)) for i, r in enumerate(raw)]
    collator = VLMCollator(processor, image_root=tmp_path)
    batch = collator(rows)
    alone = [collator([row]) for row in rows]
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"] for a in alone if "pixel_values" in a]))
    first_pixel = [a["pixel_values"][:, 0, 0, 0].tolist() for a in alone if "pixel_values" in a]
    assert first_pixel[0] != first_pixel[1] and len({tuple(p) for p in first_pixel}) == 3  # distinct images
    for i, single in enumerate(alone):
        n = single["input_ids"].shape[1]
        assert batch["input_ids"][i, :n].tolist() == single["input_ids"][0].tolist()
        assert batch["labels"][i, :n].tolist() == single["labels"][0].tolist()
        assert not batch["attention_mask"][i, n:].any()


def test_tool_rows_load_from_jsonl_and_parquet(tmp_path, processor):
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (PLAIN_ROW, TOOL_ROW)) + "\n")
    rows = load_rows(path)
    assert rows[0]["tools"] is None and rows[1]["messages"][1]["tool_calls"][0]["function"]["name"] == "zoom"
    rows.to_parquet(str(tmp_path / "tools.parquet"))
    again = load_rows(tmp_path / "tools.parquet")
    text = processor.tokenizer.decode(VLMCollator(processor)([again[1]])["input_ids"][0])
    assert text == qwen3_render(processor.tokenizer, TOOL_ROW)


@pytest.mark.parametrize(
    "message, match",
    [
        ({"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}, "only assistant turns"),
        ({"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}, "function name"),
        ({"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": 3}]}, "arguments"),
        ({"role": "assistant", "content": "", "tool_calls": {"name": "f"}}, "must be a list"),
        ({"role": "assistant", "content": "a", "reasoning_content": 1}, "reasoning_content"),
    ],
)
def test_bad_tool_fields_name_the_field(message, match):
    row = {"messages": [{"role": "user", "content": "q"}, message, {"role": "assistant", "content": "a"}]}
    with pytest.raises(ValueError, match=match):
        normalize_row(row, "data.jsonl:3")


@pytest.mark.parametrize("field", ["reasoning_content", "arguments", "tools"])
def test_written_out_placeholders_anywhere_in_the_text_are_named(field):
    run = "<|vision_start|><|image_pad|><|vision_end|>"
    row = {**TOOL_ROW, "messages": [dict(m) for m in TOOL_ROW["messages"]]}
    if field == "reasoning_content":
        row["messages"][3]["reasoning_content"] = run
    elif field == "arguments":
        row["messages"][1]["tool_calls"] = [{"function": {"name": "zoom", "arguments": {"x": run}}}]
    else:
        row["tools"] = [{"name": run}]
    with pytest.raises(ValueError, match="data.jsonl:2.*image placeholder"):
        normalize_row(row, "data.jsonl:2")


def test_bad_tools_list():
    with pytest.raises(ValueError, match="data.jsonl:1: 'tools' must be a list"):
        normalize_row({**PLAIN_ROW, "tools": {"name": "f"}}, "data.jsonl:1")
    with pytest.raises(ValueError, match="not JSON"):
        normalize_row({**PLAIN_ROW, "tools": "[{"}, "data.jsonl:1")


def test_eval_prompts_with_tools_and_grades_the_rendered_answer(processor, llm, vlm_cfg):
    from vlm_peft import attach
    from vlm_peft.training.evaluate import evaluate

    call_last = {"tools": TOOLS, "messages": TOOL_ROW["messages"][:2]}
    rows = load_rows_from([TOOL_ROW, call_last, PLAIN_ROW])
    model = attach(llm, vlm_cfg)
    prompts: list[str] = []
    generate = model.generate

    def spy(**kwargs):
        prompts.extend(processor.tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=False))
        return generate(**kwargs)

    model.generate = spy
    summary, predictions = evaluate(model, processor, rows, None, batch_size=8, max_new_tokens=4)
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token
    expected = {
        qwen3_render(tokenizer, {**TOOL_ROW, "messages": TOOL_ROW["messages"][:-1]}, add_generation_prompt=True),
        qwen3_render(tokenizer, {**call_last, "messages": call_last["messages"][:-1]}, add_generation_prompt=True,
                     enable_thinking=False),
        qwen3_render(tokenizer, {"messages": PLAIN_ROW["messages"][:-1]}, add_generation_prompt=True,
                     enable_thinking=False),
    }  # fmt: skip
    assert {p.replace(pad, "") for p in prompts} == expected  # the reasoning row is prompted in thinking mode
    assert all(p.startswith(pad) or not p.endswith(pad) for p in prompts)  # padded on the left
    assert [p["target"] for p in predictions] == [
        "<think>\nlooked\n</think>\n\nIt is red.",
        '<tool_call>\n{"name": "zoom", "arguments": {"x": 1}}\n</tool_call>',
        "Hi there.",
    ]
    assert summary["samples"] == 3


def load_rows_from(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list([normalize_row(r, f"row {i}") for i, r in enumerate(rows)])


OPENAI_ROW = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "What colour is it? Zoom in first."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "zoom", "arguments": '{"x": 1}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
        {"role": "assistant", "content": "It is red.", "reasoning_content": "looked"},
    ],
}
SHAREGPT_ROW = {
    "tools": json.dumps(TOOLS),
    "conversations": [
        {"from": "human", "value": "What colour is it? Zoom in first."},
        {"from": "function_call", "value": '{"name": "zoom", "arguments": {"x": 1}}'},
        {"from": "observation", "value": "done"},
        {"from": "gpt", "value": "It is red."},
    ],
}


@pytest.mark.parametrize("source", ["openai", "sharegpt"])
def test_converters_keep_tool_use(tmp_path, processor, source):
    from data_tools.check import check_dataset
    from data_tools.convert import convert

    raw = OPENAI_ROW if source == "openai" else SHAREGPT_ROW
    path = tmp_path / f"{source}.jsonl"
    path.write_text(json.dumps(raw) + "\n" + json.dumps(PLAIN_ROW) + "\n")
    counts = convert(path, tmp_path / "out.parquet", fmt="messages")
    assert counts["rows"] == 2 and counts["skipped"] == 0
    rows = load_rows(tmp_path / "out.parquet")
    expected = dict(TOOL_ROW)
    if source == "sharegpt":  # ShareGPT has no reasoning field
        expected["messages"] = [*TOOL_ROW["messages"][:3], {"role": "assistant", "content": "It is red."}]
    text = processor.tokenizer.decode(VLMCollator(processor)([rows[0]])["input_ids"][0])
    assert text == qwen3_render(processor.tokenizer, expected)
    assert check_dataset(tmp_path / "out.parquet", processor=processor, max_length=4096, progress=False).clean


def test_check_accepts_a_tool_call_as_the_last_turn_and_fix_keeps_tools(tmp_path, processor):
    from data_tools.check import check_dataset, fix

    call_last = {"tools": TOOLS, "messages": TOOL_ROW["messages"][:2]}
    empty = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (call_last, empty, TOOL_ROW)) + "\n")
    report = check_dataset(path, processor=processor, max_length=4096, progress=False)
    assert [(p.index, p.kind) for p in report.problems] == [(1, "no_answer")]
    fix(path, tmp_path / "clean.parquet", report)
    clean = load_rows(tmp_path / "clean.parquet")
    assert len(clean) == 2
    for row, source in zip(clean, (call_last, TOOL_ROW)):
        text = processor.tokenizer.decode(VLMCollator(processor)([row])["input_ids"][0])
        assert text == qwen3_render(processor.tokenizer, source)


def test_eval_targets_of_inline_reasoning_and_of_a_conversation_without_a_user_turn(processor, llm, vlm_cfg):
    from vlm_peft import attach
    from vlm_peft.training.evaluate import evaluate

    inline = {"messages": [PLAIN_ROW["messages"][0], {"role": "assistant", "content": "<think>\nr\n</think>\n\nHi."}]}
    no_user = {"tools": TOOLS, "messages": [{"role": "system", "content": "Zoom."}, TOOL_ROW["messages"][1]]}
    model = attach(llm, vlm_cfg)
    prompts: list[str] = []
    generate = model.generate

    def spy(**kwargs):
        prompts.extend(processor.tokenizer.batch_decode(kwargs["input_ids"]))
        return generate(**kwargs)

    model.generate = spy
    _, predictions = evaluate(model, processor, load_rows_from([inline, no_user]), None, max_new_tokens=40)
    assert [p["target"] for p in predictions] == [
        "<think>\nr\n</think>\n\nHi.",
        '<tool_call>\n{"name": "zoom", "arguments": {"x": 1}}\n</tool_call>',
    ]
    assert prompts[0].endswith("<|im_start|>assistant\n")  # thinking mode: the model writes the think block


def test_tool_fields_stored_as_arrow_structs_are_refused(tmp_path):
    import datasets

    from data_tools.check import check_dataset

    rows = [
        {"tools": [{"name": "zoom", "parameters": {"x": "int"}}], "messages": TOOL_ROW["messages"][:2]},
        {"tools": [{"name": "other", "description": "d"}],
         "messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {"y": "b"}}]}]},
    ]  # fmt: skip
    path = tmp_path / "structs.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))  # arguments and tools become structs with merged keys
    for read in (load_rows, lambda p: check_dataset(p, progress=False)):
        with pytest.raises(ValueError, match="tool_calls.*arguments and tools are stored as Arrow structs"):
            read(path)


def test_check_does_not_call_a_tool_call_turn_no_answer_when_the_image_count_is_off():
    from data_tools.check_rows import RowChecker

    row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                        TOOL_ROW["messages"][1]], "images": []}  # fmt: skip
    checker = RowChecker(Path("."), 20.0, 10**8, None, None, 10**8)
    problems, _ = checker.check([(0, "row", row)])
    assert [p.kind for p in problems] == ["image_count"]
