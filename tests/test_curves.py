"""Loss curves: the CSV from the trainer's log history, the PNG with matplotlib, the CSV alone without."""

import logging
import sys

from vlm_peft.training import curves
from vlm_peft.training.curves import curve_rows, write_loss_curve

HISTORY = [
    {"loss": 2.0, "learning_rate": 1e-3, "step": 1, "epoch": 0.1},
    {"loss": 1.5, "learning_rate": 9e-4, "step": 2, "epoch": 0.2},
    {"eval_loss": 1.7, "step": 2, "epoch": 0.2},
    {"train_runtime": 1.0, "step": 2},  # the closing summary is no point of the curve
]


def test_curve_rows_merge_train_and_eval_logs_of_a_step():
    assert curve_rows(HISTORY) == [
        {"step": 1, "loss": 2.0, "learning_rate": 1e-3},
        {"step": 2, "loss": 1.5, "learning_rate": 9e-4, "eval_loss": 1.7},
    ]
    assert curve_rows([{"train_runtime": 1.0, "step": 3}]) == []


def test_png_with_matplotlib(tmp_path):
    assert write_loss_curve(HISTORY, tmp_path, "stage x") == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "loss.csv").read_text().splitlines() == [
        "step,loss,eval_loss,learning_rate",
        "1,2.0,,0.001",
        "2,1.5,1.7,0.0009",
    ]


def test_csv_alone_without_matplotlib_said_once(tmp_path, monkeypatch, caplog):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import matplotlib… -> ImportError
    monkeypatch.setattr(curves, "_warned", False)
    with caplog.at_level(logging.WARNING):
        assert write_loss_curve(HISTORY, tmp_path, "a") == tmp_path / "loss.csv"
        assert write_loss_curve(HISTORY, tmp_path, "b") == tmp_path / "loss.csv"
    assert caplog.text.count("matplotlib is not installed") == 1
    assert not (tmp_path / "loss.png").exists()
    assert write_loss_curve([], tmp_path, "c") is None
