"""benchmarks/ig_steps_agreement.py end to end, in subprocesses, on a tiny smooth teacher."""
import kdig_tf  # noqa: F401

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import tiny_tfds
from kdig_tf import data, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "ig_steps_agreement.py")


def _run(*args):
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TFDS_DATA_DIR", None)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ig_steps")
    tiny_tfds.prepare(root / "tfds", num_examples=4)
    keras.utils.set_random_seed(0)
    # Smooth (tanh), so Gauss-Legendre converges fast and GL-16 is far better than GL-1.
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3, activation="tanh"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(tiny_tfds.NUM_CLASSES)])
    teacher = root / "teacher.h5"
    model.save(teacher)
    return root, model, teacher


def test_writes_json_and_markdown_with_the_store_settings(setup):
    root, model, teacher = setup
    output = root / "out" / "agreement.json"
    flagfile = root / "agreement.cfg"
    flagfile.write_text("\n".join([
        f"--teacher={teacher}", f"--dataset={tiny_tfds.NAME}", "--split=train", f"--data_dir={root / 'tfds'}",
        "--num_images=3", "--batch_size=2", "--steps=16,1,2", "--reference_steps=16", f"--output={output}"]) + "\n")
    proc = _run(f"--flagfile={flagfile}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    result = json.loads(output.read_text())
    assert "--flagfile=" in result["command"]
    assert result["teacher"]["sha256"] == hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert "tensorflow" in result["machine"] and "cpu_count" in result["machine"]
    rows = {row["steps"]: row for row in result["rows"]}
    assert sorted(rows) == [1, 2, 16]
    assert rows[16]["is_reference"] and rows[16]["evaluated"]
    assert rows[16]["rel_l1_to_reference"]["mean"] == 0.0
    assert rows[16]["spearman_to_reference"]["mean"] == pytest.approx(1.0)
    assert rows[16]["topk_iou_to_reference"]["mean"] == 1.0
    assert rows[16]["completeness_rel_error"]["mean"] < rows[1]["completeness_rel_error"]["mean"]
    assert all(row["seconds_per_image"] > 0 and row["completeness_rel_error"]["n"] == 3 for row in rows.values())

    # The completeness errors are those of the store's own IG (records.TeacherTargets) on the same images.
    ds, _ = data.load(tiny_tfds.NAME, "train", str(root / "tfds"))
    images, labels = zip(*[(image, label) for image, label, _ in ds.take(3).as_numpy_iterator()])
    targets = records.TeacherTargets(model, steps=2)
    delta = targets.ig(data.preprocess_teacher(tf.constant(np.stack(images))), np.array(labels)).delta.numpy()
    np.testing.assert_allclose(result["per_image"]["2"]["completeness_abs_error"], np.abs(delta), rtol=1e-4,
                               atol=1e-6)

    markdown = output.with_suffix(".md").read_text()
    assert "| GL steps |" in markdown and "| 16 (ref.) |" in markdown and "--flagfile=" in markdown


def test_bad_steps_is_a_named_error(setup):
    proc = _run("--steps=0,8", f"--teacher={setup[2]}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert any(line.startswith("error: InvalidArgumentError: ") for line in proc.stderr.splitlines())
    assert "Traceback" not in proc.stderr
