"""scripts/distill.py end to end, in a subprocess that mocks CIFAR-10 with tfds.testing."""
import json
import os
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from kdig_tf import models, pipeline
from kdig_tf.errors import InvalidArgumentError, KdigError, NotAModelError, UnknownKeyError

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


def test_bad_flag_exits_2_with_one_line_and_writes_nothing(tmp_path, teachers):
    workdir = tmp_path / "run"
    result = _distill(tmp_path, f"--teacher={teachers['a']}", f"--workdir={workdir}", "--alpha=1.5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: InvalidArgumentError:")
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("overrides, error", [
    (dict(alpha=1.5), InvalidArgumentError),
    (dict(alpha=-0.1), InvalidArgumentError),
    (dict(temperature=0.0), InvalidArgumentError),
    (dict(p=-0.2), InvalidArgumentError),
    (dict(p=1.2), InvalidArgumentError),
    (dict(method="distill_harder"), UnknownKeyError),
    (dict(seed=-1), InvalidArgumentError),
    (dict(export_modes="fp64"), UnknownKeyError),
])
def test_bad_settings_are_refused_before_writing(tmp_path, overrides, error):
    with pytest.raises(error):
        pipeline.run_distillation(pipeline.DistillConfig(**overrides), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("teacher, error", [
    ("empty", NotAModelError),
    ("missing", pipeline.TeacherNotFoundError),
    ("five_classes", KdigError),
])
def test_bad_teachers_are_refused(tmp_path, teachers, teacher, error):
    path = teachers.get(teacher, str(tmp_path / "no_such_teacher.h5"))
    config = pipeline.DistillConfig(teacher=path, train_split="train", val_split="train", keep_blocks=2)
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(error) as caught:
            pipeline.run_distillation(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "results.json")
    if teacher == "missing":
        assert "train_teacher.py" in str(caught.value)


# Flagfiles of other scripts than distill.py (each is checked against its own script's flags).
OTHER_SCRIPT_FLAGFILES = {"teacher_speedrun.cfg": "train_teacher.py", "screen_students.cfg": "latency_sweep.py"}


@pytest.mark.parametrize("flagfile", sorted(name for name in os.listdir(os.path.join(ROOT, "flags"))
                                            if name.endswith(".cfg") and name not in OTHER_SCRIPT_FLAGFILES))
def test_every_shipped_flagfile_parses_and_validates(flagfile):
    from kdig_tf import cli

    config, _ = cli.distill_config([f"--flagfile={os.path.join(ROOT, 'flags', flagfile)}"])
    config.validate()
    assert "test" not in config.train_split + config.val_split  # shipped profiles never select on test
    assert os.path.isfile(os.path.join(ROOT, config.teacher))  # the committed reference teacher


@pytest.mark.slow
@pytest.mark.parametrize("flagfile,script", sorted(OTHER_SCRIPT_FLAGFILES.items()))
def test_other_scripts_flagfiles_parse(flagfile, script):
    import subprocess
    import sys

    args = [sys.executable, os.path.join(ROOT, "scripts", script), f"--flagfile={os.path.join(ROOT, 'flags', flagfile)}",
            "--only_check_args"]
    assert subprocess.run(args, capture_output=True, text=True, cwd=ROOT).returncode == 0
    bad = subprocess.run([*args, "--no_such_flag=1"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "error: FlagError" in bad.stderr
