"""Tool calls, tool results and reasoning survive the canonical format and train as Qwen3 renders them."""

from __future__ import annotations

import json
from importlib.resources import files

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
    image_row = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A red circle."},
        ],
        "images": ["red.png"],
    }
    make_image((255, 0, 0)).save(tmp_path / "red.png")
    rows = [normalize_row(r, str(i)) for i, r in enumerate([image_row, TOOL_ROW, PLAIN_ROW, image_row])]
    collator = VLMCollator(processor, image_root=tmp_path)
    batch = collator(rows)
    assert batch["pixel_values"].shape[0] == 2
    for i, row in enumerate(rows):
        alone = collator([row])
        n = alone["input_ids"].shape[1]
        assert batch["input_ids"][i, :n].tolist() == alone["input_ids"][0].tolist()
        assert batch["labels"][i, :n].tolist() == alone["labels"][0].tolist()
        assert not batch["attention_mask"][i, n:].any()
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])


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
