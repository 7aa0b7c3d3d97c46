"""scripts/evaluate.py: the evaluation loop in-process (mock data), the CLI in subprocesses."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import tiny_tfds
from kdig_tf import benchmark, data, models
from kdig_tf.errors import NotAModelError, ShapeMismatchError, UnknownSplitError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "evaluate.py")


def _import_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_script = _import_script()


def _raw_dataset(labels, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    ids = [f"x{i}" for i in range(len(labels))]
    return tf.data.Dataset.from_tensor_slices((images, np.asarray(labels, np.int64), ids)), images


def test_evaluate_counts_correct_predictions():
    labels = [0, 1, 2, 0, 0, 3, 4]
    ds, _ = _raw_dataset(labels)

    def always_zero(batch):
        return np.tile(np.eye(5, dtype=np.float32)[0], (batch.shape[0], 1))

    scores = benchmark.evaluate_accuracy(always_zero, ds, data.preprocess_student, batch_size=3)
    assert (scores["num_correct"], scores["num_examples"]) == (3, 7)
    assert scores["accuracy"] == pytest.approx(300 / 7)


def test_evaluate_passes_preprocessed_batches():
    labels = [1, 0, 1, 1]
    ds, images = _raw_dataset(labels, seed=1)
    seen = []

    def oracle(batch):  # one-hot of the true labels, in read order
        start = sum(len(previous) for previous in seen)
        seen.append(batch.numpy())
        return np.eye(2, dtype=np.float32)[labels[start:start + len(batch)]]

    scores = benchmark.evaluate_accuracy(oracle, ds, data.preprocess_teacher, batch_size=3)
    assert (scores["num_correct"], scores["num_examples"]) == (4, 4)
    np.testing.assert_allclose(np.concatenate(seen), data.preprocess_teacher(images).numpy(), atol=1e-6)


def test_evaluate_rejects_bad_output_shape():
    ds, _ = _raw_dataset([0, 1])
    with pytest.raises(ShapeMismatchError):
        benchmark.evaluate_accuracy(lambda batch: np.zeros((1, 10)), ds, data.preprocess_student, 2)


@pytest.fixture(scope="module")
def tiny_student_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    model = models.build_student(keep_blocks=2)
    paths = {"full": str(directory / "student.h5"), "weights": str(directory / "student.weights.h5")}
    model.save(paths["full"])
    model.save_weights(paths["weights"])
    return model, paths


def test_run_evaluation_on_mock_data(tmp_path, tiny_student_files):
    model, paths = tiny_student_files
    out = tmp_path / "result.json"
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        result = evaluate_script.run_evaluation(paths["weights"], keep_blocks=2, split="train",
                                                output_json=str(out), progress=False)
        ds, _ = data.load("cifar10", "train")
        images, labels = zip(*[(image, label) for image, label, _ in ds])
    predictions = np.argmax(model(data.preprocess_student(tf.stack(images)), training=False), axis=-1)
    expected = 100.0 * np.mean(predictions == np.asarray(labels))
    assert json.loads(out.read_text()) == result
    assert result["num_examples"] == 6
    assert result["accuracy"] == pytest.approx(expected)
    assert (result["arch"], result["keep_blocks"], result["input_kind"]) == ("student", 2, "unit")
    assert result["input_kind_source"] == "layer names" and result["input_mean"] is None
    assert result["split"] == "train" and result["weights"] == os.path.abspath(paths["weights"])


def test_run_evaluation_rejects_class_count_mismatch(tiny_student_files, tmp_path):
    path = str(tmp_path / "five.weights.h5")
    models.build_student(keep_blocks=2, num_classes=5).save_weights(path)
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(ShapeMismatchError, match="5 classes"):
            evaluate_script.run_evaluation(path, keep_blocks=2, split="train", progress=False)


def _convert(model, int8, calibration):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_tflite_predictor_matches_keras(tmp_path, tiny_student_files, int8):
    model, _ = tiny_student_files
    inputs = np.random.default_rng(0).random((6, 32, 32, 3), dtype=np.float32)
    path = tmp_path / "model.tflite"
    path.write_bytes(_convert(model, int8, inputs))
    predictor, names, num_classes = evaluate_script.tflite_predictor(str(path))
    assert num_classes == 10
    expected = model(inputs, training=False).numpy()
    scores = predictor(inputs)
    assert scores.shape == expected.shape and scores.dtype == np.float32
    tolerance = 0.05 * np.abs(expected).max() if int8 else 1e-5
    assert np.abs(scores - expected).max() <= tolerance
    from kdig_tf import loading
    assert loading.describe_names(names) == ("student", 2)


def test_quantize_roundtrip():
    from kdig_tf import export

    spec = {"dtype": "int8", "quantization": {"scale": 0.5, "zero_point": -3}}
    values = np.array([-100.0, -1.0, 0.0, 0.26, 1.0, 100.0], np.float32)
    quantized = export.quantize(values, spec)
    assert quantized.dtype == np.int8
    assert quantized.tolist() == [-128, -5, -3, -2, -1, 127]
    np.testing.assert_allclose(export.dequantize(quantized, spec)[1:5], [-1.0, 0.0, 0.5, 1.0])


def test_tflite_predictor_rejects_garbage(tmp_path):
    path = tmp_path / "garbage.tflite"
    path.write_bytes(b"definitely not a flatbuffer" * 10)
    with pytest.raises(NotAModelError):
        evaluate_script.tflite_predictor(str(path))


# ---- .tflite input kind: the sidecar decides, tensor names only without one -------------------

SIDECAR_MEAN, SIDECAR_STD = [0.5, 0.25, 0.75], [0.2, 0.4, 0.1]


@pytest.fixture(scope="module")
def normalized_export(tmp_path_factory, tiny_student_files):
    """A student (whose tensor names say "unit input") exported with a sidecar saying normalized."""
    from kdig_tf import export

    model, _ = tiny_student_files
    path = str(tmp_path_factory.mktemp("export") / "student.tflite")
    export.convert(model, path, "fp32", input_kind="normalized", mean=SIDECAR_MEAN, std=SIDECAR_STD)
    return model, path


def _copy_export(path, directory):
    import shutil

    from kdig_tf import export

    target = str(directory / os.path.basename(path))
    shutil.copy(path, target)
    shutil.copy(export.sidecar_path(path), export.sidecar_path(target))
    return target


def _spy_on_tflite_inputs(monkeypatch):
    seen = []
    original = evaluate_script.tflite_predictor

    def recording(path):
        predict, names, classes = original(path)

        def spy(batch):
            seen.append(np.asarray(batch))
            return predict(batch)
        return spy, names, classes

    monkeypatch.setattr(evaluate_script, "tflite_predictor", recording)
    return seen


def _mock_cifar_images(num_examples):
    ds, _ = data.load("cifar10", "train")
    images, labels = zip(*[(image, label) for image, label, _ in ds.take(num_examples)])
    return tf.stack(images), np.asarray(labels)


def test_tflite_input_kind_comes_from_sidecar(tmp_path, normalized_export, monkeypatch):
    from kdig_tf import loading

    model, path = normalized_export
    path = _copy_export(path, tmp_path)
    assert loading.input_kind(loading.describe_names(evaluate_script.tflite_predictor(path)[1])[0]) == "unit"
    seen = _spy_on_tflite_inputs(monkeypatch)
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        result = evaluate_script.run_evaluation(path, split="train", batch_size=4, progress=False)
        images, labels = _mock_cifar_images(6)
    expected_inputs = data.normalize_teacher(data.to_unit_range(images), SIDECAR_MEAN, SIDECAR_STD).numpy()
    np.testing.assert_allclose(np.concatenate(seen), expected_inputs, atol=1e-5)
    predictions = np.argmax(model(expected_inputs, training=False), axis=-1)
    assert result["accuracy"] == pytest.approx(100.0 * np.mean(predictions == labels))
    assert (result["input_kind"], result["input_kind_source"]) == ("normalized", "sidecar")
    np.testing.assert_allclose(result["input_mean"], SIDECAR_MEAN)
    np.testing.assert_allclose(result["input_std"], SIDECAR_STD)
    assert (result["arch"], result["keep_blocks"]) == ("student", 2)


def test_tflite_without_sidecar_falls_back_to_tensor_names(tmp_path, normalized_export, monkeypatch, capsys):
    from kdig_tf import export

    path = _copy_export(normalized_export[1], tmp_path)
    os.remove(export.sidecar_path(path))
    seen = _spy_on_tflite_inputs(monkeypatch)
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        result = evaluate_script.run_evaluation(path, split="train", progress=False)
        images, _ = _mock_cifar_images(3)
    assert (result["input_kind"], result["input_kind_source"]) == ("unit", "tensor names")
    assert result["input_mean"] is None
    np.testing.assert_allclose(np.concatenate(seen), data.preprocess_student(images).numpy(), atol=1e-6)
    assert "no sidecar" in capsys.readouterr().err


def test_tflite_sidecar_mismatch_is_an_error(tmp_path, normalized_export):
    from kdig_tf import export
    from kdig_tf.errors import SidecarMismatchError

    path = _copy_export(normalized_export[1], tmp_path)
    json_path = export.sidecar_path(path)
    sidecar = json.loads(open(json_path).read())
    sidecar["input"]["shape"] = [1, 16, 16, 3]
    with open(json_path, "w") as handle:
        json.dump(sidecar, handle)
    with pytest.raises(SidecarMismatchError):
        evaluate_script.run_evaluation(path, split="train", progress=False)


@pytest.mark.parametrize("change, expected", [
    ({"input_kind": "bgr"}, NotAModelError),
    ({"mean": ["a", "b", "c"]}, NotAModelError),
    ({"mean": None, "std": None}, "cifar"),  # sidecars from before the statistics were recorded
])
def test_the_sidecar_reader_refuses_invalid_input_records(tmp_path, normalized_export, change, expected):
    from kdig_tf import benchmark, export, models

    path = _copy_export(normalized_export[1], tmp_path)
    assert export.sidecar_input_spec(path).mean == pytest.approx(SIDECAR_MEAN)
    json_path = export.sidecar_path(path)
    sidecar = json.loads(open(json_path).read())
    sidecar["input"].update(change)
    with open(json_path, "w") as handle:
        json.dump(sidecar, handle)
    if expected == "cifar":
        assert export.sidecar_input_spec(path) == models.CIFAR10_TEACHER_INPUT
        return
    for read in (export.sidecar_input_spec, benchmark.tflite_predictor):
        with pytest.raises(expected):
            read(path)
    with pytest.raises(expected):  # an invalid sidecar is never replaced by a guess
        evaluate_script.run_evaluation(path, split="train", progress=False)
    os.remove(json_path)
    assert export.sidecar_input_spec(path, required=False) is None
    with pytest.raises(NotAModelError):
        export.sidecar_input_spec(path)


def test_output_json_may_not_overwrite_the_sidecar(tmp_path, normalized_export):
    from kdig_tf import export
    from kdig_tf.errors import InvalidArgumentError

    path = _copy_export(normalized_export[1], tmp_path)
    with pytest.raises(InvalidArgumentError, match="sidecar"):
        evaluate_script.run_evaluation(path, output_json=export.sidecar_path(path), progress=False)


# ---- the command line, in subprocesses ---------------------------------------------------------

def _run_cli(*args):
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TFDS_DATA_DIR", None)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def _assert_one_line_error(proc, name):
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {name}: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    tiny_tfds.prepare(directory, num_examples=12)
    return str(directory)


def test_cli_evaluates_and_writes_json(tmp_path, tiny_dir, tiny_student_files):
    model, paths = tiny_student_files
    out = tmp_path / "eval.json"
    proc = _run_cli(f"--weights={paths['full']}", f"--dataset={tiny_tfds.NAME}", "--split=train",
                    f"--data_dir={tiny_dir}", "--batch_size=5", f"--output_json={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    ds, _ = data.load(tiny_tfds.NAME, "train", tiny_dir)
    images, labels = zip(*[(image, label) for image, label, _ in ds])
    predictions = np.argmax(model(data.preprocess_student(tf.stack(images)), training=False), axis=-1)
    assert result["num_examples"] == 12
    assert result["accuracy"] == pytest.approx(100.0 * np.mean(predictions == np.asarray(labels)))
    assert (result["arch"], result["keep_blocks"]) == ("student", 2)
    assert "accuracy=" in proc.stdout and len(proc.stdout.strip().splitlines()) == 1


def test_cli_missing_file(tmp_path):
    _assert_one_line_error(_run_cli(f"--weights={tmp_path / 'absent.pt'}"), "NotAModelError")


def test_cli_not_a_model(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello\n")
    _assert_one_line_error(_run_cli(f"--weights={path}"), "NotAModelError")


def test_cli_unknown_split_and_dataset(tiny_dir, tiny_student_files):
    _, paths = tiny_student_files
    common = [f"--weights={paths['full']}", f"--data_dir={tiny_dir}"]
    _assert_one_line_error(_run_cli(*common, f"--dataset={tiny_tfds.NAME}", "--split=test"),
                           UnknownSplitError.__name__)
    _assert_one_line_error(_run_cli(*common, "--dataset=no_such_dataset_xyz"), "UnknownDatasetError")


def test_run_evaluation_of_a_pixel_model_and_of_any_classifier(tmp_path):
    import tf_keras as keras

    student = models.build_pixel_student(keep_blocks=2)
    mine = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255.0), keras.layers.Flatten(),
                             keras.layers.Dense(10)])
    paths = {"pixel": str(tmp_path / "student.h5"), "mine": str(tmp_path / "mine.keras")}
    student.save(paths["pixel"])
    mine.save(paths["mine"])
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds, _ = data.load("cifar10", "train")
        images, labels = zip(*[(image, label) for image, label, _ in ds])
        pixels = tf.cast(tf.stack(images), tf.float32)
        for name, model in (("pixel", student), ("mine", mine)):
            result = evaluate_script.run_evaluation(paths[name], split="train", progress=False)
            expected = 100.0 * np.mean(np.argmax(model(pixels), axis=-1) == np.asarray(labels))
            assert result["accuracy"] == pytest.approx(expected)
            assert result["input_kind_source"] == "model"
            assert result["input_kind"] == ("unit" if name == "pixel" else "pixels")
