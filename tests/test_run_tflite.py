import kdig_tf  # noqa: F401

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from kdig_tf import export, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "scripts", "deploy", "run_tflite.py")
LABELS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny float model and an int8-input one, with sidecars, plus three PNGs."""
    folder = tmp_path_factory.mktemp("deploy")
    model = models.build_student(keep_blocks=2, num_classes=3)
    calibration = np.random.default_rng(0).random((8, 32, 32, 3), dtype=np.float32)
    export.convert(model, str(folder / "float.tflite"), "fp32", labels=LABELS)
    export.convert(model, str(folder / "int8.tflite"), "int8", representative_images=calibration,
                   int8_io=True, input_kind="normalized", labels=LABELS)
    images = folder / "images"
    images.mkdir()
    for index, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        # 40x24: not the model's 32x32, so the runner must resize.
        Image.new("RGB", (40, 24), colour).save(images / f"img{index}.png")
    (images / "notes.txt").write_text("not an image")
    return folder


HIDDEN = ("tensorflow", "tf_keras", "kdig_tf")
# Runs at interpreter start-up (sitecustomize) and refuses the hidden packages, ahead of
# every other finder: kdig_tf is an editable install, which PYTHONPATH alone cannot shadow.
BLOCKER = f"""
import sys

class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HIDDEN!r}:
            raise ImportError(name + " is hidden for this test")
        return None

sys.meta_path.insert(0, _Hide())
"""


@pytest.fixture(scope="module")
def no_tensorflow_env(tmp_path_factory):
    """Environment whose Python cannot import tensorflow, tf_keras or kdig_tf."""
    shadow = tmp_path_factory.mktemp("shadow")
    (shadow / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(shadow))
    for package in HIDDEN:
        probe = subprocess.run([sys.executable, "-c", f"import {package}"], env=env, capture_output=True,
                               text=True)
        assert probe.returncode != 0 and "hidden for this test" in probe.stderr
    probe = subprocess.run([sys.executable, "-c", "import numpy, PIL, ai_edge_litert.interpreter"], env=env)
    assert probe.returncode == 0
    return env


def run(args, env):
    return subprocess.run([sys.executable, RUNNER, *args], env=env, capture_output=True, text=True, timeout=300)


def error_line(completed):
    """The runner's own message: the last stderr line (LiteRT may log an INFO line first)."""
    assert completed.returncode == 2
    lines = [line for line in completed.stderr.strip().splitlines() if not line.startswith("INFO:")]
    assert len(lines) == 1, completed.stderr
    return lines[0]


def test_classifies_a_folder_without_tensorflow(exported, no_tensorflow_env):
    completed = run([str(exported / "float.tflite"), str(exported / "images"), "--top_k", "2"], no_tensorflow_env)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 3  # notes.txt is skipped
    for index, line in enumerate(lines):
        assert line.startswith(str(exported / "images" / f"img{index}.png"))
        assert sum(label in line for label in LABELS) == 2 and line.endswith("ms)")


def test_json_output_matches_tflite_model(exported, no_tensorflow_env):
    image = exported / "images" / "img1.png"
    completed = run([str(exported / "int8.tflite"), str(image), "--json", "--top_k", "3"], no_tensorflow_env)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)["results"][0]
    assert result["latency_ms"] > 0
    assert {guess["label"] for guess in result["top_k"]} == set(LABELS)
    assert sum(guess["probability"] for guess in result["top_k"]) == pytest.approx(1.0, abs=1e-5)

    # Same preprocessing in-process: resize, normalise, quantise.
    pixels = np.asarray(Image.open(image).convert("RGB").resize((32, 32), Image.BILINEAR), np.float32) / 255.0
    sidecar = export.load_sidecar(str(exported / "int8.tflite"))
    mean, std = (np.array(sidecar["input"][key], np.float32) for key in ("mean", "std"))
    normalised = (pixels - mean) / std
    logits = export.TFLiteModel(str(exported / "int8.tflite")).predict(normalised[None])[0]
    assert result["top_k"][0]["index"] == int(np.argmax(logits))


def test_bad_inputs_give_one_line_errors(exported, no_tensorflow_env, tmp_path):
    missing = run([str(tmp_path / "absent.tflite"), str(exported / "images")], no_tensorflow_env)
    assert error_line(missing).startswith("error: SidecarError: no sidecar")

    # Garbage with a real model's sidecar: its bytes are refused before the interpreter sees them.
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"garbage")
    (tmp_path / "broken.json").write_text((exported / "float.json").read_text())
    assert error_line(run([str(broken), str(exported / "images")], no_tensorflow_env)).startswith(
        "error: TFLiteChecksumError:")
    assert error_line(run([str(broken), str(exported / "images"), "--no_verify"], no_tensorflow_env)).startswith(
        "error: ModelLoadError: cannot load")

    empty = tmp_path / "empty_folder"
    empty.mkdir()
    assert error_line(run([str(exported / "float.tflite"), str(empty)], no_tensorflow_env)).startswith(
        "error: ImageError: no images found")

    not_image = str(exported / "images" / "notes.txt")
    assert error_line(run([str(exported / "float.tflite"), not_image], no_tensorflow_env)).startswith(
        "error: ImageError: cannot read image")

    # A sidecar for another model (int8 input) next to the float model: its hash is another model's,
    # and without the hash check its input description is refused.
    (tmp_path / "float.tflite").write_bytes((exported / "float.tflite").read_bytes())
    (tmp_path / "float.json").write_text((exported / "int8.json").read_text())
    assert error_line(run([str(tmp_path / "float.tflite"), str(exported / "images")], no_tensorflow_env)).startswith(
        "error: TFLiteChecksumError:")
    assert error_line(run([str(tmp_path / "float.tflite"), str(exported / "images"), "--no_verify"],
                          no_tensorflow_env)).startswith("error: SidecarError: sidecar describes input")

    assert error_line(run([str(exported / "float.tflite"), not_image, "--top_k", "0"],
                          no_tensorflow_env)).startswith("error: UsageError: --top_k")
    # argparse's own failures take the same one-line path instead of a usage dump.
    assert error_line(run([str(exported / "float.tflite"), not_image, "--no_such_option"],
                          no_tensorflow_env)).startswith("error: UsageError: unrecognized arguments")


def test_class_folders_are_searched_and_scored(exported, no_tensorflow_env, tmp_path):
    """val/<label>/...: every image is classified, and the top-1 guesses are scored against the folder names."""
    root = tmp_path / "val"
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    for label, colour in colours.items():
        (root / label / "nested").mkdir(parents=True)
        Image.new("RGB", (32, 32), colour).save(root / label / "a.png")
        Image.new("RGB", (32, 32), colour).save(root / label / "nested" / "b.png")
    completed = run([str(exported / "float.tflite"), str(root), "--json"], no_tensorflow_env)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert len(report["results"]) == 6  # nested folders are searched too
    assert {result["true_label"] for result in report["results"]} == set(colours)
    correct = sum(result["top_k"][0]["label"] == result["true_label"] for result in report["results"])
    assert report["accuracy"] == {"correct": correct, "total": 6, "accuracy": pytest.approx(100.0 * correct / 6)}

    text = run([str(exported / "float.tflite"), str(root)], no_tensorflow_env)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.strip().splitlines()
    assert len(lines) == 7
    assert lines[-1] == f"accuracy: {100.0 * correct / 6:.2f}% ({correct}/6 images in class folders)"

    # Folder names that are not the model's labels: images are classified, nothing is scored.
    (root / "purple").mkdir()
    Image.new("RGB", (32, 32), (128, 0, 128)).save(root / "purple" / "c.png")
    unscored = json.loads(run([str(exported / "float.tflite"), str(root), "--json"], no_tensorflow_env).stdout)
    assert len(unscored["results"]) == 7 and unscored["accuracy"] is None
    assert not any("true_label" in result for result in unscored["results"])
