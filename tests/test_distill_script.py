"""scripts/distill.py end to end, in a subprocess that mocks CIFAR-10 with tfds.testing."""
import json
import os
import subprocess
import sys

import pytest

from kdig_tf import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_RUNNER = """
import os, runpy, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow_datasets as tfds
sys.argv = ["distill.py"] + sys.argv[1:]
with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    runpy.run_path(os.path.join({root!r}, "scripts", "distill.py"), run_name="__main__")
"""


def _distill(tmp_path, *flags):
    runner = tmp_path / "mock_distill.py"
    runner.write_text(MOCK_RUNNER.format(root=ROOT))
    return subprocess.run([sys.executable, str(runner), f"--flagfile={ROOT}/flags/smoke.cfg", *flags],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    paths = {}
    for name, classes in [("a", 10), ("b", 10), ("five_classes", 5)]:
        paths[name] = str(folder / f"{name}.h5")
        models.build_teacher(num_classes=classes, width_multiplier=0.25).save(paths[name])
    paths["empty"] = str(folder / "empty.h5")
    open(paths["empty"], "wb").close()
    return paths


def test_smoke_flagfile_produces_every_output(tmp_path, teachers):
    workdir = tmp_path / "run"
    result = _distill(tmp_path, f"--teacher={teachers['a']}", f"--workdir={workdir}",
                      f"--store_dir={tmp_path / 'store'}")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert 0.0 <= results["val_accuracy"] <= 100.0
    assert results["trainable_params"] == models.STUDENT_PARAMS[2]
    assert results["flags"]["method"] == "kd_ig" and results["effective"]["p"] == 0.1
    assert os.path.exists(workdir / "student.h5")
    assert results["tflite"]["fp32"]["max_abs_logit_diff"] <= 1e-4
    assert os.path.exists(workdir / "student_fp32.tflite") and os.path.exists(workdir / "student_fp32.json")
    assert os.path.exists(tmp_path / "store" / "manifest.json")
    assert "val_accuracy=" in result.stdout

    # The same store with another teacher is refused, and leaves no results behind.
    other = tmp_path / "other"
    refused = _distill(tmp_path, f"--teacher={teachers['b']}", f"--workdir={other}",
                       f"--store_dir={tmp_path / 'store'}")
    assert refused.returncode == 2
    assert "StoreMismatchError" in refused.stderr and "teacher_sha256" in refused.stderr
    assert not os.path.exists(other / "results.json")


@pytest.mark.parametrize("flags, error", [
    (["--alpha=1.5"], "InvalidArgumentError"),
    (["--temperature=0"], "InvalidArgumentError"),
    (["--p=-0.2"], "InvalidArgumentError"),
    (["--method=distill_harder"], "UnknownKeyError"),
])
def test_bad_hyper_parameters_exit_2_before_writing(tmp_path, teachers, flags, error):
    workdir = tmp_path / "run"
    result = _distill(tmp_path, f"--teacher={teachers['a']}", f"--workdir={workdir}", *flags)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {error}:")
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("teacher, error", [
    ("empty", "NotAModelError"),
    ("missing", "TeacherNotFoundError"),
    ("five_classes", "Error"),
])
def test_bad_teachers_exit_2(tmp_path, teachers, teacher, error):
    path = teachers.get(teacher, str(tmp_path / "no_such_teacher.h5"))
    result = _distill(tmp_path, f"--teacher={path}", f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and error in last
    assert not os.path.exists(tmp_path / "run" / "results.json")
    if teacher == "missing":
        assert "train_teacher.py" in last
