import io
import json
import os
import struct
import warnings
import zlib

import datasets
import numpy as np
import pytest
from PIL import Image

from data_tools.check import KINDS, check_dataset, fix, main
from vlm_peft.data.rows import load_rows

from .conftest import N, make_image

IMAGE = {"type": "image"}
MAX_LENGTH = 150
MAX_PIXELS = 20_000  # 200x200 exceeds it; every other image here stays below


def row(question="What is this?", answer="A red circle.", images=("ok.png",), parts=None):
    content = parts if parts is not None else [IMAGE] * len(images) + [{"type": "text", "text": question}]
    return {
        "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
        "images": list(images),
    }


def png_header(width, height):
    """A PNG whose IHDR claims width x height, with a token of pixel data: opening it reads only the header."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise_png(size=(64, 64)):
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buffer, "PNG")
    return buffer.getvalue()


# Row index -> the kinds of problems it must produce, and nothing else anywhere.
EXPECTED = {
    1: {"bad_row"},
    2: {"bad_row"},
    3: {"image_missing"},
    4: {"image_unreadable"},
    5: {"image_truncated"},
    6: {"image_empty"},
    7: {"image_aspect"},
    8: {"image_too_large"},
    9: {"image_count"},
    10: {"no_answer"},
    11: {"role_order"},
    12: {"too_long"},
    13: {"too_long"},
    15: {"no_answer"},
    16: {"role_order"},
}
CLEAN = [0, 14]


@pytest.fixture()
def crafted(tmp_path):
    make_image((255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "text.png").write_text("not an image\n")
    (tmp_path / "trunc.png").write_bytes(noise_png()[:2000])
    (tmp_path / "empty.png").write_bytes(b"")
    make_image((0, 0, 255), size=(1000, 10)).save(tmp_path / "wide.png")
    make_image((0, 255, 0), size=(200, 200)).save(tmp_path / "big.png")
    multi_turn = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [IMAGE, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A red circle."},
            {"role": "tool", "content": "red"},
            {"role": "tool", "content": "circle"},
            {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        ],
        "images": ["ok.png"],
    }
    lines = [
        json.dumps(row()),  # 0: clean
        '{"messages": [',  # 1: not JSON
        json.dumps({"messages": []}),  # 2: not canonical
        json.dumps(row(images=["missing.png"])),  # 3
        json.dumps(row(images=["text.png"])),  # 4
        json.dumps(row(images=["trunc.png"])),  # 5
        json.dumps(row(images=["empty.png"])),  # 6
        json.dumps(row(images=["wide.png"])),  # 7
        json.dumps(row(images=["big.png"])),  # 8
        json.dumps(row(parts=[IMAGE, IMAGE, {"type": "text", "text": "Both?"}])),  # 9: 2 parts, 1 image
        json.dumps(row(answer="  ")),  # 10
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi."},
                    {"role": "user", "content": [IMAGE, {"type": "text", "text": "What is this?"}]},
                    {"role": "assistant", "content": "A red circle."},
                ],
                "images": ["ok.png"],
            }
        ),  # 11: two user turns
        json.dumps(row(parts=[{"type": "text", "text": "What is this? " * 40}, IMAGE])),  # 12: image past the limit
        json.dumps(row(answer="A red circle. " * 40)),  # 13: only the answer past the limit
        json.dumps(multi_turn),  # 14: clean, system prompt and tool results
        json.dumps({"messages": [{"role": "user", "content": "Hi."}]}),  # 15: no assistant turn
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Hi."},
                    {"role": "tool", "content": "42"},
                    {"role": "assistant", "content": "Hello."},
                ]
            }
        ),  # 16: a tool result after a user turn
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")  # a blank line is not a row
    return path


def check(path, processor, **kwargs):
    kwargs = {"processor": processor, "max_length": MAX_LENGTH, "max_pixels": MAX_PIXELS, "progress": False, **kwargs}
    return check_dataset(path, **kwargs)


def kinds_by_row(report):
    out = {}
    for p in report.problems:
        out.setdefault(p.index, set()).add(p.kind)
    return out


def test_every_kind_exactly_where_intended(crafted, processor):
    report = check(crafted, processor)
    assert kinds_by_row(report) == EXPECTED
    assert report.total == 17 and report.num_bad == len(EXPECTED) and report.bad_rows == sorted(EXPECTED)
    assert all(report.counts[kind] >= 1 for kind in KINDS)
    assert report.counts["too_long"] == report.row_counts["too_long"] == 2
    assert not report.clean
    by_row = report.by_row()
    # Origins name file and line (the blank line 4 is skipped, not counted as a row).
    assert by_row[1][0].origin == f"{crafted}:2" and by_row[3][0].origin == f"{crafted}:5"

    def detail(index):
        (problem,) = by_row[index]
        return problem.detail

    assert "not valid JSON" in detail(1)
    assert "'messages' must be a non-empty list" in detail(2)
    assert detail(3).startswith("images[0] 'missing.png': no file at") and "--image-root" in detail(3)
    assert "not an image PIL can identify" in detail(4)
    assert "truncated" in detail(5)
    assert "zero-byte" in detail(6)
    assert "1000x10, aspect ratio 100.0 > 20" in detail(7)
    assert "200x200 = 40,000 pixels > 20,000" in detail(8)
    assert "2 image parts in messages but 1 entries in 'images'" in detail(9)
    assert "messages[1] (the assistant's answer) has no text" in detail(10)
    assert "messages[1]: a second 'user' turn in a row" in detail(11)
    assert detail(12).startswith("cuts an image run:") and "training drops" in detail(12)
    assert detail(13).startswith("cuts only the answer:") and "tokens are cut" in detail(13)
    assert "messages[0] is a 'user' turn, not the assistant's answer" in detail(15)
    assert "messages[1]: a 'tool' result after a 'user' turn" in detail(16)
    tokens, index = report.longest
    assert index == 12 and tokens > MAX_LENGTH


def test_without_processor_no_length_check(crafted):
    report = check_dataset(crafted, max_pixels=MAX_PIXELS, progress=False)
    assert kinds_by_row(report) == {i: k for i, k in EXPECTED.items() if k != {"too_long"}}
    assert report.longest is None
    with pytest.raises(ValueError, match="needs a processor"):
        check_dataset(crafted, max_length=10, progress=False)


def test_too_long_boundary_at_the_image_run(tmp_path, processor):
    make_image((255, 0, 0)).save(tmp_path / "ok.png")
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(row()) + "\n")
    messages = load_rows(path)[0]["messages"]
    ids = processor.tokenizer(processor.apply_chat_template(messages), add_special_tokens=False)["input_ids"]
    vision_end = processor.tokenizer.convert_tokens_to_ids(processor.vision_end_token)
    image_end = ids.index(processor.image_token_id) + N + 1  # the run ends with <|vision_end|>
    assert ids[image_end - 2] == processor.image_token_id and ids[image_end - 1] == vision_end

    (cut_image,) = check(path, processor, max_length=image_end - 1).problems
    assert cut_image.detail.startswith("cuts an image run:")
    (cut_answer,) = check(path, processor, max_length=image_end).problems
    assert cut_answer.detail.startswith("cuts the whole answer:") and "none of it is trained on" in cut_answer.detail
    assert not check(path, processor, max_length=len(ids)).problems
    (over,) = check(path, processor, max_length=len(ids) - 1).problems
    assert f"{len(ids)} tokens > max_length {len(ids) - 1}" in over.detail


@pytest.mark.parametrize(("width", "height", "pil"), [(10_000, 10_000, "Warning"), (100_000, 100_000, "Error")])
def test_decompression_bomb_header_is_flagged_without_decoding(tmp_path, monkeypatch, width, height, pil):
    (tmp_path / "bomb.png").write_bytes(png_header(width, height))
    path = tmp_path / "bomb.jsonl"
    path.write_text(json.dumps(row(images=["bomb.png"])) + "\n")

    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        report = check_dataset(path, progress=False)  # max_pixels: PIL's own limit
    assert Image.MAX_IMAGE_PIXELS == limit
    (problem,) = report.problems
    assert problem.kind == "image_too_large"
    assert f"{width}x{height} = {width * height:,} pixels > {limit:,}" in problem.detail
    assert f"DecompressionBomb{pil}" in problem.detail


def test_summary_table_and_bad_rows_file(crafted, processor, tmp_path):
    report = check(crafted, processor)
    table = report.summary_table()
    lines = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line and not line.startswith("-")}
    for kind in KINDS:
        assert lines[kind] == [str(report.row_counts[kind]), str(report.counts[kind])]
    assert lines["image_missing"] == ["1", "1"] and lines["too_long"] == ["2", "2"]
    bad = len(EXPECTED)
    assert lines["bad"] == ["rows", str(bad), str(len(report.problems)), "(88.2%)"]
    assert lines["total"] == ["rows", "17"] and lines["longest"][:3] == ["row:", str(report.longest[0]), "tokens,"]
    widths = {len(line) for line in table.splitlines()[:13]}
    assert len(widths) == 1  # aligned

    out = report.write_bad_rows(tmp_path / "bad.jsonl")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == sorted(EXPECTED)
    assert {r["index"]: {p["kind"] for p in r["problems"]} for r in records} == EXPECTED
    assert records[0]["origin"] == f"{crafted}:2"
    assert all(set(p) == {"kind", "detail"} and p["detail"] for r in records for p in r["problems"])


@pytest.mark.parametrize("out_name", ["clean.parquet", "clean_dir"])
def test_fix_drops_exactly_the_bad_rows(crafted, processor, tmp_path, out_name):
    report = check(crafted, processor)
    out = tmp_path / "elsewhere" / out_name
    out.parent.mkdir()
    assert fix(crafted, out, report) == (len(EXPECTED), len(CLEAN))
    rows = load_rows(out)
    assert len(rows) == len(CLEAN)
    assert [len(r["messages"]) for r in rows] == [2, 6]
    # The image root moved: relative paths became absolute, so the cleaned data checks clean.
    assert rows[0]["images"] == [{"bytes": None, "path": str(crafted.parent / "ok.png")}]
    again = check(out, processor)
    assert again.clean and again.total == len(CLEAN)
    with pytest.raises(ValueError, match="new path"):
        fix(crafted, crafted, report)


def test_parquet_with_embedded_images(tmp_path, processor):
    good = {"bytes": noise_png((16, 16)), "path": None}
    cut = {"bytes": noise_png((64, 64))[:1500], "path": None}
    rows = [
        {**row(), "images": [good]},
        {**row(), "images": [cut]},
        {**row(), "images": [{"bytes": None, "path": "missing.png"}]},
        {**row(answer=""), "images": [good]},
    ]
    features = datasets.Features(
        {
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                }
            ),
            "images": datasets.List(datasets.Image(decode=False)),
        }
    )
    for r in rows:
        r["messages"] = [{"role": m["role"], "content": _parts(m["content"])} for m in r["messages"]]
    data = tmp_path / "embedded.parquet"  # to_parquet keeps path-only images as paths (save_to_disk embeds them)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(data))
    report = check(data, processor)
    assert kinds_by_row(report) == {1: {"image_truncated"}, 2: {"image_missing"}, 3: {"no_answer"}}
    assert report.by_row()[1][0].detail.startswith("images[0] (embedded bytes): the pixel data of the embedded")
    assert report.by_row()[2][0].origin == f"{data}: row 2"
    assert fix(data, tmp_path / "clean_dir", report) == (3, 1)
    (kept,) = load_rows(tmp_path / "clean_dir")
    assert kept["images"][0]["bytes"] == good["bytes"]


def _parts(content):
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [{"type": p["type"], "text": p.get("text")} for p in content]


def test_num_proc_gives_the_same_report(crafted, processor):
    serial = check(crafted, processor)
    parallel = check(crafted, processor, num_proc=2)
    assert parallel.problems == serial.problems and parallel.total == serial.total


def test_main_exit_codes(crafted, processor, tmp_path, capsys):
    args = [str(crafted), "--max-pixels", str(MAX_PIXELS), "-q"]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "image_truncated" in out and "total rows" in out
    default_bad = crafted.with_name("data.bad.jsonl")
    assert len(default_bad.read_text().splitlines()) == len(EXPECTED) - 2  # no length check without a processor

    processor.save_pretrained(tmp_path / "proc")
    fixed = tmp_path / "fixed.parquet"
    bad = tmp_path / "bad.jsonl"
    full = [*args, "--processor", str(tmp_path / "proc"), "--max-length", str(MAX_LENGTH)]
    assert main([*full, "--bad-rows", str(bad), "--fix", str(fixed)]) == 1
    assert f"dropped {len(EXPECTED)} bad rows, kept {len(CLEAN)}" in capsys.readouterr().out
    assert len(bad.read_text().splitlines()) == len(EXPECTED)
    assert len(load_rows(fixed)) == len(CLEAN)

    assert main([str(fixed), "-q", "--processor", str(tmp_path / "proc"), "--max-length", str(MAX_LENGTH)]) == 0
    assert not fixed.with_name("fixed.bad.jsonl").exists()

    assert main([str(crafted), "--max-length", "10"]) == 2  # needs --processor
    assert main([str(tmp_path / "nope.jsonl")]) == 2
    assert main(["--no-such-flag"]) == 2
    capsys.readouterr()


def test_image_cut_rows_are_the_ones_training_drops(tmp_path, processor):
    from vlm_peft.data.rows import fit_to_length

    make_image((255, 0, 0)).save(tmp_path / "ok.png")
    rows = [
        row(),
        row(parts=[{"type": "text", "text": "What is this? " * 40}, IMAGE]),
        row(answer="A red circle. " * 40),
        row(parts=[{"type": "text", "text": "What is this? " * 25}, IMAGE]),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check(path, processor)
    cut = {p.index for p in report.problems if p.detail.startswith("cuts an image run")}
    assert cut and {p.index for p in report.problems} - cut  # both sub-kinds present
    unsupervised = {p.index for p in report.problems if p.detail.startswith("cuts the whole answer")}
    kept = fit_to_length(load_rows(path), processor, MAX_LENGTH, "d.jsonl")
    assert len(kept) == len(rows) - len(cut | unsupervised)


def test_bad_rows_file_replaces_a_planted_link_instead_of_writing_through_it(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("precious")
    (tmp_path / "data.bad.jsonl").symlink_to(victim)
    assert main([str(tmp_path / "data.jsonl"), "-q"]) == 1
    assert victim.read_text() == "precious"
    bad = tmp_path / "data.bad.jsonl"
    assert not bad.is_symlink() and json.loads(bad.read_text().splitlines()[0])["index"] == 0


# What check flags but training takes by design: warnings about the data, not rows it cannot use.
CHECK_ONLY = {7: "image_aspect", 10: "no_answer (empty text)", 11: "role_order", 13: "too_long (answer end)",
              16: "role_order"}  # fmt: skip


def test_check_and_training_agree_on_every_bad_row(crafted, processor, tmp_path, monkeypatch):
    """Every row that training refuses or drops, check flags; what check flags beyond it is CHECK_ONLY."""
    from vlm_peft.data.collator import VLMCollator
    from vlm_peft.data.rows import fit_to_length

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", MAX_PIXELS)  # one size limit for both
    lines = [line for line in crafted.read_text().splitlines() if line.strip()]
    values = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(values).save(crafted.parent / "deep.png")  # 16-bit: fine now for both
    lines.append(json.dumps(row(images=["deep.png"])))
    written_out = row(parts=[{"type": "text", "text": "<|vision_start|><|image_pad|><|vision_end|>What?"}])
    lines.append(json.dumps({**written_out, "images": []}))  # a placeholder written in the text
    data = crafted.parent / "all.jsonl"
    data.write_text("\n".join(lines) + "\n")
    flagged = set(check(data, processor).bad_rows)

    refused = set()
    for index, line in enumerate(lines):
        one = tmp_path / f"row{index}.jsonl"
        one.write_text(line + "\n")
        try:
            rows = fit_to_length(load_rows(one), processor, MAX_LENGTH, str(one))
            VLMCollator(processor, crafted.parent, max_length=MAX_LENGTH)([rows[0]])
        except (ValueError, OSError):
            refused.add(index)
    assert refused, "the crafted rows must include some that training refuses"
    assert refused <= flagged, f"training refuses rows {sorted(refused - flagged)} that check calls clean"
    assert flagged - refused == set(CHECK_ONLY), (sorted(flagged - refused), CHECK_ONLY)
    assert len(lines) - 2 not in flagged and len(lines) - 1 in flagged and len(lines) - 1 in refused
