import json

import pytest

from data_tools.synth import make_shapes_dataset
from vlm_peft.cli import main
from vlm_peft.data.rows import load_rows


def test_vlm_peft_data_subcommands(tmp_path):
    shapes = make_shapes_dataset(tmp_path / "s", align_train=8, align_eval=4, sft_train=8, sft_eval=4)
    assert main(["data", "check", str(shapes / "sft_eval.jsonl"), "-q"]) == 0
    llava = [
        {
            "id": "1",
            "image": str(shapes / "images" / "sft_eval_00000.png"),
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cross."}],
        }
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    assert main(["data", "convert", str(tmp_path / "llava.json"), str(tmp_path / "out.parquet")]) == 0
    rows = load_rows(tmp_path / "out.parquet")
    assert rows[0]["messages"][0]["content"][0]["type"] == "image" and len(rows[0]["images"]) == 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main(["data", "check", str(tmp_path / "bad.jsonl"), "-q"]) == 1


@pytest.mark.parametrize("tool", ["convert", "check", "synth", "tokenizer", "cache-features"])
def test_every_data_subcommand_has_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_:
        code = main(["data", tool, "--help"])
        raise SystemExit(code)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "unrecognized" not in out


def test_data_tokenizer_trains_on_the_datasets_texts(tmp_path, capsys):
    from transformers import AutoTokenizer

    from vlm_peft import VLMProcessor
    from vlm_peft.tiny import tiny_image_processor

    row = {
        "tools": [{"type": "function", "function": {"name": "zoom", "parameters": {}}}],
        "messages": [
            {"role": "user", "content": "Which digit is this? Zoom first."},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "zoom", "arguments": {"x": 2}}]},
            {"role": "tool", "content": "zoomed"},
            {"role": "assistant", "content": "It is a seven."},
        ],
    }
    (tmp_path / "a.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": row["messages"][:1] + row["messages"][3:]}) + "\n")
    assert main(["data", "tokenizer", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), str(tmp_path / "tok"),
                 "--vocab-size", "400"]) == 0  # fmt: skip
    assert "llm: {random" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    processor = VLMProcessor(tiny_image_processor(32), tokenizer, num_image_tokens=4)
    assert len(processor.tokenizer) == len(tokenizer)  # every token the processor needs is there
    text = processor.apply_chat_template(row["messages"], tools=row["tools"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    for marker in ("<tool_call>", "</tool_response>", "<think>", "<|im_start|>"):
        assert marker in tokenizer.get_vocab()
    assert tokenizer.decode(tokenizer.convert_tokens_to_ids(["<tool_call>"]), skip_special_tokens=True) == "<tool_call>"
    assert tokenizer.decode(tokenizer.convert_tokens_to_ids(["<|im_end|>"]), skip_special_tokens=True) == ""
    assert len(tokenizer.tokenize(" seven")) == 1  # merges learned from the data
