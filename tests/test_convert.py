"""data_tools.convert: golden source files of each format → exact canonical rows, read back with load_rows."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_tools import convert as conv
from data_tools.convert import convert, detect_format, main, rejects_path
from vlm_peft.data.rows import load_rows, open_image

IMG = {"type": "image", "text": None}


def T(text: str) -> dict:
    return {"type": "text", "text": text}


def user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": [T(text)]}


def ref(path: str) -> dict:
    return {"bytes": None, "path": path}


def png(color: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def read_back(out: Path) -> list[tuple[list, list]]:
    return [(r["messages"], r["images"]) for r in load_rows(out)]


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in rejects_path(out).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- LLaVA

LLAVA = [
    {
        "id": "single",
        "image": "coco/1.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"},
            {"from": "gpt", "value": "Black."},
        ],
    },
    {
        "id": "text-only",
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello."},
        ],
    },
    {
        "id": "multi",
        "image": ["coco/1.jpg", "coco/2.jpg"],
        "conversations": [
            {"from": "human", "value": "Left <image> right <image>\nSame?"},
            {"from": "gpt", "value": "No."},
        ],
    },
]
LLAVA_EXPECTED = [
    (
        [user(IMG, T("What is this?")), bot("A cat."), user(T("Colour?")), bot("Black.")],
        [ref("coco/1.jpg")],
    ),
    ([{"role": "system", "content": [T("Be brief.")]}, user(T("Hi")), bot("Hello.")], []),
    ([user(T("Left "), IMG, T(" right "), IMG, T("Same?")), bot("No.")], [ref("coco/1.jpg"), ref("coco/2.jpg")]),
]


def test_llava_json_list_to_parquet(tmp_path):
    (tmp_path / "llava.json").write_text(json.dumps(LLAVA))
    counts = convert(tmp_path / "llava.json", tmp_path / "out.parquet")
    assert counts == {"rows": 3, "skipped": 0, "reasons": {}, "rejects": None}
    assert read_back(tmp_path / "out.parquet") == LLAVA_EXPECTED
    assert not rejects_path(tmp_path / "out.parquet").exists()


def test_llava_jsonl_to_saved_dir(tmp_path):
    write_jsonl(tmp_path / "llava.jsonl", LLAVA)
    counts = convert(tmp_path / "llava.jsonl", tmp_path / "out", fmt="llava")
    assert counts["rows"] == 3
    assert read_back(tmp_path / "out") == LLAVA_EXPECTED
    write_jsonl(tmp_path / "llava.jsonl", LLAVA[1:])
    convert(tmp_path / "llava.jsonl", tmp_path / "out")  # a saved dataset is replaced
    assert read_back(tmp_path / "out") == LLAVA_EXPECTED[1:]


def test_image_paths_relative_to_the_output_folder_or_absolute(tmp_path):
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "llava.jsonl", LLAVA[:1])
    convert(tmp_path / "src" / "llava.jsonl", tmp_path / "a.parquet")  # images under the output's folder
    assert read_back(tmp_path / "a.parquet")[0][1] == [ref("src/coco/1.jpg")]
    (tmp_path / "out").mkdir()
    convert(tmp_path / "src" / "llava.jsonl", tmp_path / "out" / "b.parquet")  # images elsewhere: absolute
    assert read_back(tmp_path / "out" / "b.parquet")[0][1] == [ref(str(tmp_path / "src" / "coco" / "1.jpg"))]
    convert(tmp_path / "src" / "llava.jsonl", tmp_path / "c.parquet", image_root=tmp_path / "imgs")
    assert read_back(tmp_path / "c.parquet")[0][1] == [ref("imgs/coco/1.jpg")]


def test_marker_image_count_mismatch_and_bad_rows_are_skipped_counted_and_listed(tmp_path, caplog):
    good = LLAVA[0]
    rows = [
        good,
        {
            "id": "no-marker",
            "image": "x.jpg",
            "conversations": [{"from": "human", "value": "Hm?"}, good["conversations"][1]],
        },
        {"id": "no-image", "conversations": good["conversations"]},
        {
            "id": "two-markers",
            "image": ["x.jpg"],
            "conversations": [{"from": "human", "value": "<image><image>"}, good["conversations"][1]],
        },
        "{not json",
        {"id": "role", "conversations": [{"from": "robot", "value": "beep"}, good["conversations"][1]]},
        {"id": "unanswered", "conversations": [{"from": "human", "value": "Hi"}]},
        {"id": "no-turns"},
    ]
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="data_tools.convert"):
        counts = convert(src, tmp_path / "out.parquet", fmt="llava")
    reasons = {"image_count_mismatch": 3, "bad_json": 1, "bad_role": 1, "no_answer": 1, "bad_row": 1}
    assert counts == {"rows": 1, "skipped": 7, "reasons": reasons, "rejects": str(tmp_path / "out.rejects.jsonl")}
    assert read_back(tmp_path / "out.parquet") == LLAVA_EXPECTED[:1]
    listed = rejects(tmp_path / "out.parquet")
    assert [(r["where"], r["reason"]) for r in listed] == [
        (f"{src}:2", "image_count_mismatch"),
        (f"{src}:3", "image_count_mismatch"),
        (f"{src}:4", "image_count_mismatch"),
        (f"{src}:5", "bad_json"),
        (f"{src}:6", "bad_role"),
        (f"{src}:7", "no_answer"),
        (f"{src}:8", "bad_row"),
    ]
    assert listed[0]["message"] == "0 <image> markers but 1 image(s)."
    assert listed[0]["row"] == rows[1] and listed[3]["row"] == "{not json\n"
    assert f"skipped {src}:2: image_count_mismatch" in caplog.text
    # A clean rerun into the same output removes the stale rejects list.
    convert(write_jsonl(tmp_path / "good.jsonl", [good]), tmp_path / "out.parquet")
    assert not rejects_path(tmp_path / "out.parquet").exists()


# ---------------------------------------------------------------------------------------------- MiniMind-V


def test_minimind_positional_roles_and_comma_separated_images(tmp_path):
    rows = [
        {
            "conversations": [
                {"content": "比较<image>和<image>。"},
                {"content": "一样。"},
                {"content": "颜色?"},
                {"content": "红色。"},
            ],
            "image": "a.jpg, sub/b.jpg",
        },
        {
            "conversations": [
                {"role": "user", "content": "提供给定图像的简要描述。\n<image>"},
                {"role": "assistant", "content": "一只猫。"},
            ],
            "image": "c.jpg",
        },
        {
            "conversations": [{"role": "system", "content": "简短。"}, {"content": "你好"}, {"content": "你好!"}],
            "image": "",
        },
    ]
    src = write_jsonl(tmp_path / "mm.jsonl", rows)
    assert detect_format(src) == "minimind"
    counts = convert(src, tmp_path / "out", image_root=tmp_path / "images")
    assert counts["rows"] == 3 and counts["skipped"] == 0
    assert read_back(tmp_path / "out") == [
        (
            [user(T("比较"), IMG, T("和"), IMG, T("。")), bot("一样。"), user(T("颜色?")), bot("红色。")],
            [ref("images/a.jpg"), ref("images/sub/b.jpg")],
        ),
        ([user(T("提供给定图像的简要描述。\n"), IMG), bot("一只猫。")], [ref("images/c.jpg")]),
        ([{"role": "system", "content": [T("简短。")]}, user(T("你好")), bot("你好!")], []),
    ]


def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def conversations(text: str) -> str:
    return json.dumps([{"role": "user", "content": text}, {"role": "assistant", "content": "答。"}], ensure_ascii=False)


def test_minimind_parquet_single_blob(tmp_path):
    red, blue = png((255, 0, 0)), png((0, 0, 255))
    src = write_parquet(
        tmp_path / "mm.parquet",
        {
            "conversations": [conversations("<image>\n描述"), conversations("<image><image>")],
            "image_bytes": [red, blue],
        },
    )
    assert detect_format(src) == "minimind-parquet"
    counts = convert(src, tmp_path / "out.parquet")
    assert counts["rows"] == 1 and counts["reasons"] == {"image_count_mismatch": 1}
    assert read_back(tmp_path / "out.parquet") == [
        ([user(IMG, T("描述")), bot("答。")], [{"bytes": red, "path": None}])
    ]
    assert rejects(tmp_path / "out.parquet")[0]["row"]["image_bytes"] == f"<{len(blue)} bytes>"


def test_minimind_parquet_list_of_blobs(tmp_path):
    red, blue = png((255, 0, 0)), png((0, 0, 255))
    src = write_parquet(
        tmp_path / "mm.parquet",
        {
            "conversations": [conversations("<image><image>对比"), conversations("无图")],
            "image_bytes": [[red, blue], []],
        },
    )
    counts = convert(src, tmp_path / "out", fmt="minimind-parquet")
    assert counts["rows"] == 2
    rows = load_rows(tmp_path / "out")
    assert [(r["messages"], r["images"]) for r in rows] == [
        ([user(IMG, IMG, T("对比")), bot("答。")], [{"bytes": red, "path": None}, {"bytes": blue, "path": None}]),
        ([user(T("无图")), bot("答。")], []),
    ]
    assert open_image(rows[0]["images"][1], None, "row").getpixel((0, 0)) == (0, 0, 255)


# ---------------------------------------------------------------------------------------------- messages


def test_messages_sharegpt_and_openai_rows(tmp_path):
    red = png()
    data_url = "data:image/png;base64," + base64.b64encode(red).decode()
    rows = [
        {
            "messages": [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "A cat."}],
            "images": ["a.png"],
        },
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "image", "path": "inline.png"},
                        {"type": "text", "text": "Same?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
            ],
            "images": ["b.png"],
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Look:"},
                        {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "image_url", "image_url": {"url": "file:///abs/c.png"}},
                    ],
                },
                {"role": "assistant", "content": "Red."},
            ]
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
        {
            "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}],
            "images": ["d.png"],
            "system": "S.",
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/e.png"}}]},
                {"role": "assistant", "content": "?"},
            ]
        },
        {
            "messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "?"}],
            "images": ["f.png", "g.png"],
        },
        {"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "?"}]},
    ]
    src = write_jsonl(tmp_path / "msgs.jsonl", rows)
    assert detect_format(src) == "messages"
    counts = convert(src, tmp_path / "out.parquet")
    assert counts["rows"] == 5
    assert counts["reasons"] == {"bad_image": 1, "image_count_mismatch": 1, "bad_part": 1}
    assert read_back(tmp_path / "out.parquet") == [
        ([user(IMG, T("What?")), bot("A cat.")], [ref("a.png")]),
        (
            [{"role": "system", "content": [T("Be brief.")]}, user(IMG, IMG, T("Same?")), bot("No.")],
            [ref("b.png"), ref("inline.png")],
        ),
        ([user(T("Look:"), IMG, IMG), bot("Red.")], [{"bytes": red, "path": None}, ref("/abs/c.png")]),
        ([user(T("Hi")), bot("Hello.")], []),
        ([{"role": "system", "content": [T("S.")]}, user(IMG, T("Q")), bot("A")], [ref("d.png")]),
    ]


def test_openai_data_url_is_embedded_and_decodes(tmp_path):
    blue = png((0, 0, 255))
    url = "data:image/png;base64," + base64.b64encode(blue).decode()
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
        ]
    }
    (tmp_path / "openai.json").write_text(json.dumps([row]))
    convert(tmp_path / "openai.json", tmp_path / "out")
    (rows,) = load_rows(tmp_path / "out")
    assert rows["images"] == [{"bytes": blue, "path": None}]
    assert open_image(rows["images"][0], None, "row").getpixel((1, 1)) == (0, 0, 255)


# ---------------------------------------------------------------------------------------------- captions

POOL = ["Describe.", "Caption it.", "What is shown?"]


def test_caption_folder_with_prompt_pool_and_seed(tmp_path):
    folder = tmp_path / "caps"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "b.jpg", "sub/c.png", "lonely.png"):
        (folder / name).write_bytes(png())
    for name, text in {"a": "A red square.\n", "b": "A dog.", "sub/c": "  A cat. ", "orphan": "No image."}.items():
        (folder / f"{name}.txt").write_text(text)
    assert detect_format(folder) == "captions"
    counts = convert(folder, tmp_path / "out.parquet", prompts=POOL, seed=3)
    assert counts["rows"] == 3 and counts["reasons"] == {"no_caption": 1, "no_image": 1}
    expected = [
        ([user(IMG, T("What is shown?")), bot("A red square.")], [ref("caps/a.png")]),
        ([user(IMG, T("Caption it.")), bot("A dog.")], [ref("caps/b.jpg")]),
        ([user(IMG, T("Caption it.")), bot("A cat.")], [ref("caps/sub/c.png")]),
    ]
    assert read_back(tmp_path / "out.parquet") == expected
    assert {r["where"]: r["reason"] for r in rejects(tmp_path / "out.parquet")} == {
        str(folder / "lonely.png"): "no_caption",
        str(folder / "orphan.txt"): "no_image",
    }
    # Deterministic: the same seed gives the same prompts, also with workers and small chunks.
    convert(folder, tmp_path / "again", prompts=POOL, seed=3, num_proc=2)
    assert read_back(tmp_path / "again") == expected
    convert(folder, tmp_path / "other.parquet", prompts=POOL, seed=4)
    assert [m[0]["content"][1]["text"] for m, _ in read_back(tmp_path / "other.parquet")] == [
        "Caption it.",
        "Caption it.",
        "Describe.",
    ]


def test_caption_csv_and_jsonl_with_prompt_file(tmp_path, monkeypatch):
    (tmp_path / "prompts.txt").write_text("\n".join(POOL) + "\n\n")
    csv_src = tmp_path / "caps.csv"
    csv_src.write_text('image,caption\nimg/a.png,A red square.\nimg/b.png,"A dog, running."\nimg/c.png,\n')
    assert detect_format(csv_src) == "captions"
    monkeypatch.setattr(conv, "CHUNK", 2)  # several chunks: prompts depend on (seed, row index) only
    counts = convert(csv_src, tmp_path / "out.parquet", prompts=tmp_path / "prompts.txt", seed=3)
    assert counts["rows"] == 2 and counts["reasons"] == {"empty_caption": 1}
    expected = [
        ([user(IMG, T("What is shown?")), bot("A red square.")], [ref("img/a.png")]),
        ([user(IMG, T("Caption it.")), bot("A dog, running.")], [ref("img/b.png")]),
    ]
    assert read_back(tmp_path / "out.parquet") == expected
    jsonl_src = write_jsonl(
        tmp_path / "caps.jsonl",
        [{"image": "img/a.png", "caption": "A red square."}, {"file_name": "img/b.png", "text": "A dog, running."}],
    )
    assert detect_format(jsonl_src) == "captions"
    convert(jsonl_src, tmp_path / "out2", prompts=POOL, seed=3)
    assert read_back(tmp_path / "out2") == expected
    (tmp_path / "bare.csv").write_text("img/a.png,A red square.\n")  # no header: image, caption
    convert(tmp_path / "bare.csv", tmp_path / "out3.parquet", prompts=POOL, seed=3)
    assert read_back(tmp_path / "out3.parquet") == expected[:1]


# ---------------------------------------------------------------------------------------------- detection, CLI


def test_format_autodetection(tmp_path):
    write_parquet(tmp_path / "msgs.parquet", {"messages": [json.dumps([])], "images": [[]]})
    sources = {
        write_jsonl(tmp_path / "l.jsonl", LLAVA): "llava",
        write_jsonl(tmp_path / "l_as.json", LLAVA): "llava",  # JSONL named .json
        write_jsonl(tmp_path / "m.jsonl", [{"conversations": [{"content": "x"}], "image": "a.jpg"}]): "minimind",
        write_jsonl(tmp_path / "s.jsonl", [{"messages": [], "images": []}]): "messages",
        tmp_path / "msgs.parquet": "messages",
    }
    (tmp_path / "l.json").write_text(json.dumps(LLAVA, indent=2))
    sources[tmp_path / "l.json"] = "llava"
    for source, fmt in sources.items():
        assert detect_format(source) == fmt, source
    write_jsonl(tmp_path / "odd.jsonl", [{"question": "?", "answer": "!"}])
    with pytest.raises(ValueError, match="cannot detect the format.*'answer', 'question'"):
        detect_format(tmp_path / "odd.jsonl")
    with pytest.raises(ValueError, match="unknown format"):
        convert(tmp_path / "l.jsonl", tmp_path / "o.parquet", fmt="alpaca")
    with pytest.raises(ValueError, match="not .jsonl"):
        convert(tmp_path / "l.jsonl", tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="no row converted"):
        convert(tmp_path / "l.jsonl", tmp_path / "o.parquet", fmt="captions")


def test_cli_main(tmp_path, caplog):
    src = write_jsonl(
        tmp_path / "llava.jsonl", [*LLAVA, {"image": "x.jpg", "conversations": LLAVA[1]["conversations"]}]
    )
    with caplog.at_level(logging.INFO, logger="data_tools.convert"):
        assert (
            main([str(src), str(tmp_path / "out.parquet"), "--format", "llava", "--seed", "1", "--num-proc", "1"]) == 0
        )
    assert '"rows": 3, "skipped": 1, "reasons": {"image_count_mismatch": 1}' in caplog.text
    assert read_back(tmp_path / "out.parquet") == LLAVA_EXPECTED
    assert main([str(tmp_path / "missing.jsonl"), str(tmp_path / "o.parquet")]) == 1
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert main([str(src), str(tmp_path / "busy")]) == 1  # never overwrites a dir that is not a saved dataset
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_convert_into_a_folder_that_does_not_exist(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    src = tmp_path / "llava.json"
    src.write_text(json.dumps([{"image": "a.png", "conversations": LLAVA[0]["conversations"]}]))
    out = tmp_path / "new" / "deeper" / "train.parquet"
    assert convert(src, out)["rows"] == 1
    assert load_rows(out)[0]["images"] == [{"bytes": None, "path": str(tmp_path / "a.png")}]


@pytest.mark.parametrize("given", [False, True])
def test_convert_warns_when_image_paths_do_not_exist(tmp_path, caplog, given):
    (tmp_path / "data").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png())
    src = tmp_path / "data" / "llava.json"
    rows = [{"image": name, "conversations": LLAVA[0]["conversations"]} for name in ("a.png", "b.png")]
    src.write_text(json.dumps(rows))
    with caplog.at_level(logging.WARNING, logger="data_tools.convert"):
        convert(src, tmp_path / "out.parquet", image_root=tmp_path / "data" if given else None)
    warning = [r.getMessage() for r in caplog.records if "do not exist" in r.getMessage()]
    assert len(warning) == 1 and "2 of 2 image paths" in warning[0]
    assert ("check --image-root" if given else "pass --image-root") in warning[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="data_tools.convert"):
        convert(src, tmp_path / "out.parquet", image_root=tmp_path / "images")
    warning = [r.getMessage() for r in caplog.records if "do not exist" in r.getMessage()]
    assert len(warning) == 1 and "1 of 2 image paths" in warning[0] and "b.png" in warning[0]
