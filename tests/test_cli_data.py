import json

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
