import json

import pytest
import torch

from vlm_peft.data.collator import IGNORE_INDEX, VLMCollator
from vlm_peft.data.rows import load_rows, normalize_row

from .conftest import N, make_image

PLAIN = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def image_row(answer="A red circle.", image="red.png"):
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": answer},
        ],
        "images": [image],
    }


@pytest.fixture()
def root(tmp_path):
    make_image((255, 0, 0)).save(tmp_path / "red.png")
    return tmp_path


def test_labels_are_the_assistant_answers_only(processor, root):
    multi_turn = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A circle."},
            {"role": "user", "content": "Colour?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        ],
        "images": ["red.png"],
    }
    text_only = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    rows = load_rows(write_jsonl(root / "d.jsonl", [image_row(), multi_turn, text_only]))
    batch = VLMCollator(processor, root)([rows[i] for i in range(3)])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    decode = processor.tokenizer.decode
    answers = [decode([t for t in row.tolist() if t != IGNORE_INDEX]) for row in batch["labels"]]
    assert answers == ["A red circle.<|im_end|>", "A circle.<|im_end|>Red.<|im_end|>", "Hello.<|im_end|>"]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"] == processor.image_token_id).sum() == 2 * N


def test_embedded_image_bytes(processor, root):
    import datasets

    data = (root / "red.png").read_bytes()
    row = normalize_row(image_row(), "row")
    ds = datasets.Dataset.from_list([{**row, "images": [{"bytes": data, "path": None}]}])
    ds.save_to_disk(str(root / "saved"))
    rows = load_rows(root / "saved")
    batch = VLMCollator(processor, None)([rows[0]])
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": []}, r"d.jsonl:1: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"d.jsonl:1: messages\[0\] needs a role"),
        ({**image_row(), "images": []}, r"d.jsonl:1: 1 image parts in messages but 0 entries in 'images'"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, r"d.jsonl:1: the last message must be the assistant"),
        (
            {"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "x"}]},
            r"d.jsonl:1: messages\[0\]: content part .* is neither",
        ),
    ],
)
def test_bad_rows_name_file_line_and_field(root, row, message):
    with pytest.raises(ValueError, match=message):
        load_rows(write_jsonl(root / "d.jsonl", [row]))


def test_bad_files(root, processor):
    (root / "bad.jsonl").write_text('{"messages": [}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        load_rows(root / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="dataset .* not found"):
        load_rows(root / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown suffix"):
        load_rows(root / "red.png")
    rows = load_rows(write_jsonl(root / "d.jsonl", [image_row(image="nope.png")]))
    with pytest.raises(FileNotFoundError, match=r"d.jsonl:1: image 'nope.png' not found \(image root"):
        VLMCollator(processor, root)([rows[0]])
    (root / "broken.png").write_bytes(b"not a png")
    rows = load_rows(write_jsonl(root / "d.jsonl", [image_row(image="broken.png")]))
    with pytest.raises(ValueError, match="d.jsonl:1: image broken.png cannot be read"):
        VLMCollator(processor, root)([rows[0]])


def test_truncation_inside_an_image_is_refused(processor, root):
    rows = load_rows(write_jsonl(root / "d.jsonl", [image_row()]))
    with pytest.raises(ValueError, match=r"image placeholder run 1 has \d+ .* expected exactly"):
        VLMCollator(processor, root, max_length=6)([rows[0]])
    batch = VLMCollator(processor, root, max_length=N + 8)([rows[0]])
    assert batch["input_ids"].shape[1] == N + 8
    assert torch.equal(batch["labels"], torch.full_like(batch["labels"], IGNORE_INDEX))  # answer cut off


def test_rows_whose_images_would_be_cut_are_dropped_and_counted(processor, root, caplog):
    import logging

    from vlm_peft.data.rows import fit_to_length

    long_text = {
        "messages": [{"role": "user", "content": "word " * 40 + "!"}, *image_row()["messages"]],
        "images": ["red.png"],
    }
    rows = load_rows(write_jsonl(root / "d.jsonl", [image_row(), long_text, image_row(answer="x " * 30)]))
    with caplog.at_level(logging.WARNING):
        kept = fit_to_length(rows, processor, N + 30, "d.jsonl")
    assert len(kept) == 2
    assert "dropped 1 of 3 rows whose images would be cut" in caplog.text
    assert "1 rows are longer than max_length" in caplog.text
    batch = VLMCollator(processor, root, max_length=N + 30)([kept[i] for i in range(2)])
    assert batch["input_ids"].shape[1] == N + 30
    with pytest.raises(ValueError, match="no row keeps a supervised token within max_length=5"):
        fit_to_length(rows, processor, 5, "d.jsonl")


def test_rows_whose_answer_starts_past_max_length_are_dropped_not_trained_on_nothing(processor, root, caplog):
    import logging

    from vlm_peft.data.rows import fit_to_length

    long_prompt = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "Yes."}]}
    rows = load_rows(write_jsonl(root / "d.jsonl", [image_row(), long_prompt]))
    limit = N + 30
    collated = VLMCollator(processor, root, max_length=limit)([rows[1]])
    assert (collated["labels"] == IGNORE_INDEX).all()  # what training would get from it: no supervised token
    with caplog.at_level(logging.WARNING):
        kept = fit_to_length(rows, processor, limit, "d.jsonl")
    assert len(kept) == 1 and "dropped 1 of 2 rows whose answers start past it" in caplog.text
    with pytest.raises(ValueError, match="no row keeps a supervised token"):
        fit_to_length(load_rows(write_jsonl(root / "e.jsonl", [long_prompt])),
                      processor, limit, "e.jsonl")  # fmt: skip


def test_written_out_placeholders_are_named_with_the_row_by_the_loader_and_check(tmp_path):
    from data_tools.check import check_dataset
    from data_tools.convert import convert

    row = {"messages": [{"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>What is it?"},
                        {"role": "assistant", "content": "A cat."}], "images": ["a.png"]}  # fmt: skip
    path = tmp_path / "qwen2vl.jsonl"
    path.write_text(json.dumps(PLAIN) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: messages\[0\]: the text holds the image placeholder"):
        load_rows(path)
    report = check_dataset(path, progress=False)
    assert [(p.index, p.kind) for p in report.problems if p.kind == "bad_row"] == [(1, "bad_row")]
    assert "image placeholder" in report.problems[0].detail
    make_image((255, 0, 0)).save(tmp_path / "a.png")
    convert(path, tmp_path / "fixed.parquet", fmt="messages")  # the converter turns the run into an image part
    fixed = load_rows(tmp_path / "fixed.parquet")
    assert fixed[1]["messages"][0]["content"] == [
        {"type": "image", "text": None},
        {"type": "text", "text": "What is it?"},
    ]


def test_non_utf8_data_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(PLAIN).encode() + b"\n" + '{"messages": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=rf"{path}:2: not UTF-8 text"):
        load_rows(path)
    listed = tmp_path / "latin1.json"
    listed.write_bytes(b'[{"messages": "caf\xe9"}]')
    with pytest.raises(ValueError, match=rf"{listed}: not UTF-8 text"):
        load_rows(listed)


def test_oversized_and_bomb_images_name_the_row(tmp_path, monkeypatch):
    from PIL import Image

    from vlm_peft.data.rows import open_image

    make_image((1, 2, 3), size=(100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(ValueError, match=r"data.jsonl:7: image big.png is 100x100 = 10,000 pixels, over the limit"):
        open_image("big.png", tmp_path, "data.jsonl:7")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # past twice the limit PIL itself refuses to open it
    with pytest.raises(ValueError, match=r"data.jsonl:7: image big.png"):
        open_image("big.png", tmp_path, "data.jsonl:7")
