"""load_rows into Arrow on disk: every format gives the rows the old in-memory loader gave, image bytes
stay undecoded bytes until the collator, several processes give the same rows in the same order, the
cache is reused only for the same file, and errors still name the file, line and field."""

from __future__ import annotations

import json
import os

import datasets
import pytest

from vlm_peft.data import loading
from vlm_peft.data.collator import VLMCollator
from vlm_peft.data.loading import first_row, load_rows
from vlm_peft.data.rows import fit_to_length, measure_conversations, normalize_row

from .conftest import N, make_image

IMAGE_ROW = {
    "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red circle."},
    ],
    "images": ["red.png"],
}
ROWS = [
    IMAGE_ROW,
    {"messages": [{"role": "user", "content": "Hi\u2028there \u00e9"}, {"role": "assistant", "content": "Hello."}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Left "}, {"type": "image"}, {"type": "image"}]},
            {"role": "assistant", "content": "Same.", "reasoning_content": "Both red."},
        ],
        "images": ["red.png", {"path": "red.png", "bytes": None}],
    },
    {
        "tools": [{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "user", "content": "Zoom."},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "zoom", "arguments": {"x": 2}}}]},
            {"role": "tool", "content": "zoomed"},
            {"role": "assistant", "content": "Done."},
        ],
    },
]


def old_rows(path, fmt):
    """What load_rows returned before issue 15: every row normalised in Python, then `Dataset.from_list`."""
    if fmt == "jsonl":
        lines = path.read_text().split("\n")
        return [normalize_row(json.loads(t), f"{path}:{i}") for i, t in enumerate(lines, 1) if t.strip()]
    if fmt == "json":
        return [normalize_row(r, f"{path}: row {i}") for i, r in enumerate(json.loads(path.read_text()))]
    raw = datasets.load_from_disk(str(path)) if fmt == "arrow" else datasets.Dataset.from_parquet(str(path))
    raw = raw.cast_column("images", datasets.List(datasets.Image(decode=False)))
    return list(datasets.Dataset.from_list([normalize_row(r, f"{path}: row {i}") for i, r in enumerate(raw)]))


def plain(row: dict) -> dict:
    """A row without the keys Arrow gives every message (None where a message has no tool calls)."""
    messages = [{k: v for k, v in m.items() if v is not None or k in ("role", "content")} for m in row["messages"]]
    images = [i["path"] if isinstance(i, dict) and not i.get("bytes") else i for i in row["images"]]
    return {**row, "messages": messages, "images": images}


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")  # a blank line at the end
    return path


def test_jsonl_and_json_give_the_old_rows(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS * 3)
    listed = tmp_path / "d.json"
    listed.write_text(json.dumps(ROWS * 3, indent=1, ensure_ascii=False))
    for path, fmt in ((jsonl, "jsonl"), (listed, "json")):
        rows = load_rows(path)
        assert [plain(r) for r in rows] == [plain(r) for r in old_rows(path, fmt)]
        assert rows.column_names == ["messages", "images", "tools", "__where__"]
        assert first_row(path) == old_rows(path, fmt)[0]
    assert load_rows(jsonl)[1]["messages"][0]["content"][0]["text"] == "Hi\u2028there \u00e9"  # one line, not two


def test_parquet_and_saved_dirs_give_the_old_rows_with_image_bytes_undecoded(tmp_path, processor, monkeypatch):
    make_image((255, 0, 0)).save(tmp_path / "red.png")
    data = (tmp_path / "red.png").read_bytes()
    canonical = [normalize_row(r, "x") for r in ROWS]
    for row in canonical:
        del row["__where__"]
        row["images"] = [{"bytes": data, "path": None} for _ in row["images"]]
    source = datasets.Dataset.from_list(canonical * 3, features=datasets.Features(
        messages=loading.MESSAGES, images=loading.IMAGES, tools=datasets.Value("string")))  # fmt: skip
    source.to_parquet(str(tmp_path / "d.parquet"))
    source.save_to_disk(str(tmp_path / "saved"))
    opened = []
    monkeypatch.setattr("PIL.Image.open", lambda *a, **k: opened.append(a) or pytest.fail("decoded at load time"))
    for path, fmt in ((tmp_path / "d.parquet", "parquet"), (tmp_path / "saved", "arrow")):
        rows = load_rows(path)
        assert list(rows) == old_rows(path, fmt)
        assert rows.features["images"] == datasets.List(datasets.Image(decode=False))
        assert rows[0]["images"] == [{"bytes": data, "path": None}]
        assert plain(first_row(path)) == plain(old_rows(path, fmt)[0])
    monkeypatch.undo()
    batch = VLMCollator(processor, None)([rows[0], rows[2]])  # decoded here, and only here
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert (batch["input_ids"] == processor.image_token_id).sum() == 3 * N


def test_several_processes_give_the_same_rows_in_the_same_order(tmp_path, processor):
    many = [  # every third row's image comes after 20 more words
        {**IMAGE_ROW, "messages": [{"role": "system", "content": "x " * 20 * (i % 3 == 0)}, *IMAGE_ROW["messages"]]}
        for i in range(40)
    ]
    path = write_jsonl(tmp_path / "d.jsonl", many)
    one, two = load_rows(path, num_proc=1), load_rows(path, num_proc=2, cache_dir=tmp_path / "cache2")
    assert list(two) == list(one)
    assert two[39]["__where__"] == f"{path}:40"
    datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "__where__"} for r in one]).to_parquet(
        str(tmp_path / "d.parquet")
    )
    assert list(load_rows(tmp_path / "d.parquet", num_proc=2)) == list(load_rows(tmp_path / "d.parquet", num_proc=1))
    short = measure_conversations(processor, [one[1]["messages"]], [None])[0]
    limit = short[2] + 1  # the short rows keep their first answer token; the long ones' images are cut
    fitted = [fit_to_length(one, processor, limit, "d", num_proc=n) for n in (1, 2)]
    assert list(fitted[0]) == list(fitted[1])
    assert [r["__where__"] for r in fitted[0]] == [f"{path}:{i + 1}" for i in range(40) if i % 3]


def test_the_cache_is_reused_for_the_same_file_only(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [IMAGE_ROW])
    first = load_rows(path)
    with monkeypatch.context() as patched:  # a second load parses nothing
        patched.setattr(loading, "_normalize_json", lambda *a, **k: pytest.fail("parsed again"))
        assert list(load_rows(path)) == list(first)
    stat = path.stat()
    text = path.read_text().replace("A red circle.", "A tan circle.")  # same size
    path.write_text(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime: the content tells
    assert load_rows(path)[0]["messages"][-1]["content"][0]["text"] == "A tan circle."


def test_a_json_list_is_read_element_by_element(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, ensure_ascii=False, indent=2))
    elements = [json.loads(text) for _, text in loading._json_list(path, block=7)]  # rows across many blocks
    assert elements == ROWS
    for text, message in (
        ('{"messages": []}', r"d.json: a .json dataset must hold a list of rows"),
        ("[]", r"d.json: the dataset is empty"),
        ('[{"messages": 1}, ]', r"d.json: not valid JSON at row 1"),
        ('[{"a": 1} {"b": 2}]', r"d.json: not valid JSON after row 0: expected ',' or ']', found '\{'"),
        ('[{"a": 1}] x', r"d.json: not valid JSON: text after the list"),
        ('[{"a": 1}', r"d.json: not valid JSON after row 0: .* found the end of the file"),
        ("[1]", r"d.json: row 0: a row must be a JSON object, got int"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_rows(path)


def test_bad_rows_are_named_by_file_and_line_from_any_process(tmp_path):
    rows = [IMAGE_ROW] * 30 + [{"messages": [{"role": "user", "content": "Hi"}]}] + [IMAGE_ROW] * 9
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=rf"{path}:31: the last message must be the assistant's answer"):
        load_rows(path, num_proc=2)
    path.write_bytes(b'{"messages": [}\n')
    with pytest.raises(ValueError, match=rf"{path}:1: not valid JSON"):
        load_rows(path)
    bad = datasets.Dataset.from_list([{"messages": normalize_row(IMAGE_ROW, "x")["messages"], "images": []}])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=r"bad.parquet: row 0: 1 image parts in messages but 0 entries in 'images'"):
        load_rows(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"d.jsonl:1: images must be paths in JSON"):
        load_rows(write_jsonl(path, [{**IMAGE_ROW, "images": [{"bytes": "iVBOR", "path": None}]}]))
