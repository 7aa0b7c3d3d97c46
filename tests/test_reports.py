import kdig_tf  # noqa: F401

import os

import pytest

from kdig_tf import reports
from kdig_tf.errors import InvalidArgumentError

PNG = b"\x89PNG\r\n\x1a\n"


def write_history(workdir, rows):
    """A Keras CSVLogger file: (epoch, val_accuracy) rows, in the order given."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "history.csv"), "w") as handle:
        handle.write("epoch,accuracy,val_accuracy\n")
        for epoch, val_accuracy in rows:
            handle.write(f"{epoch},0.5,{val_accuracy}\n")


def test_learning_curves_read_every_run_that_logged_an_epoch(tmp_path):
    finished, resumed, fresh = (str(tmp_path / name) for name in ("student0", "kd0", "kd1"))
    write_history(finished, [(0, 0.5), (1, 0.75), (2, 0.9)])
    # Killed after logging epoch 1 but before backing it up: the resumed run logs it again.
    write_history(resumed, [(0, 0.4), (1, 0.6), (1, 0.65)])
    rows = [{"run": "student/seed0", "arm": "student", "seed": 0, "status": "ok", "workdir": finished},
            {"run": "kd/seed0", "arm": "kd", "seed": 0, "status": "pending", "workdir": resumed},
            {"run": "kd/seed1", "arm": "kd", "seed": 1, "status": "pending", "workdir": fresh}]
    curves = reports.learning_curves(rows, "history.csv")
    assert [(curve["run"], curve["finished"], curve["epochs"]) for curve in curves] == [
        ("student/seed0", True, [1, 2, 3]), ("kd/seed0", False, [1, 2])]
    assert curves[0]["values"] == [50.0, 75.0, 90.0]
    assert curves[1]["values"] == [40.0, 65.0]  # the later row of epoch 1: its weights survived

    path = str(tmp_path / "curves.png")
    reports.plot_learning_curves(curves, path, "val acc (%)", "curves")
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "kd0", "student0"]  # no temporary file left


def test_learning_curves_plot_a_single_epoch(tmp_path):
    write_history(str(tmp_path / "run"), [(0, 0.3)])
    rows = [{"run": "student/seed0", "arm": "student", "seed": 0, "status": "ok", "workdir": str(tmp_path / "run")}]
    path = str(tmp_path / "curves.png")
    reports.plot_learning_curves(reports.learning_curves(rows, "history.csv"), path, "val acc (%)", "one epoch")
    assert os.path.getsize(path) > 0


def test_plotting_no_curve_is_a_named_error(tmp_path):
    with pytest.raises(InvalidArgumentError):
        reports.plot_learning_curves([], str(tmp_path / "curves.png"), "val acc (%)", "none")
    assert not os.listdir(tmp_path)
