import kdig_tf  # noqa: F401

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from kdig_tf import export, models
from kdig_tf.errors import (InvalidArgumentError, NotAModelError, ShapeMismatchError,
                            SidecarMismatchError, UnknownKeyError)

# Four flat colours plus noise: trivially separable, so a tiny student learns it in a
# few epochs with wide logit margins and int8 rounding cannot flip its decisions.
COLOURS = np.array([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.9, 0.9, 0.1]], np.float32)
LABELS = ["red", "green", "blue", "yellow"]


def colour_images(count, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(COLOURS)
    noise = rng.uniform(-0.1, 0.1, (count, 32, 32, 3)).astype(np.float32)
    return np.clip(COLOURS[labels][:, None, None, :] + noise, 0.0, 1.0), labels


@pytest.fixture(scope="module")
def trained():
    keras.utils.set_random_seed(0)
    model = models.build_student(keep_blocks=2, num_classes=len(COLOURS))
    images, labels = colour_images(128, seed=0)
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(images, labels, batch_size=32, epochs=15, verbose=0)
    test_images, test_labels = colour_images(64, seed=1)
    assert np.mean(model.predict(test_images, verbose=0).argmax(-1) == test_labels) == 1.0
    return model, images, test_images, test_labels


def colour_dataset(images, labels):
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(32)


@pytest.mark.parametrize("mode,int8_io", [("fp32", False), ("fp16", False), ("dynamic", False),
                                          ("int8", False), ("int8", True)])
def test_every_mode_converts_and_runs_on_litert(trained, tmp_path, mode, int8_io):
    model, calibration, test_images, test_labels = trained
    path = str(tmp_path / f"model_{mode}.tflite")
    sidecar = export.convert(model, path, mode, representative_images=calibration[:64], int8_io=int8_io)
    assert os.path.getsize(path) > 0 and os.path.isfile(export.sidecar_path(path))
    assert sidecar["conversion"]["mode"] == mode
    assert sidecar["input"]["dtype"] == ("int8" if int8_io else "float32")
    assert (sidecar["input"]["quantization"] is not None) == int8_io

    report = export.check_export(model, path, test_images, test_labels)
    assert report["num_images"] == 64
    assert report["float_io"] == (not int8_io)
    # Only fp32 is a float model, whatever its I/O: int8 with float I/O must not pass as one.
    if mode != "dynamic":  # dynamic range leaves small weight tensors (< 1024 values) in float32
        assert report["float_model"] == (mode == "fp32")
    assert ("int8" in report["reduced_precision_dtypes"]) == (mode == "int8")
    if mode == "fp32":
        assert report["max_abs_logit_diff"] <= 1e-4
    if mode == "int8":
        assert report["top1_agreement"] >= 0.95
        assert report["tflite_accuracy"] >= 0.95
    else:
        assert report["top1_agreement"] == 1.0


def test_tflite_model_resizes_batches_and_matches_single_images(trained, tmp_path):
    model, _, test_images, _ = trained
    path = str(tmp_path / "model.tflite")
    export.convert(model, path, "fp32")
    lite = export.TFLiteModel(path, max_batch=16)
    batched = lite.predict(test_images[:40])  # 16 + 16 + 8: resizes twice
    single = np.concatenate([lite.predict(image) for image in test_images[:3]])
    assert batched.shape == (40, len(COLOURS))
    np.testing.assert_allclose(batched[:3], single, atol=1e-5)
    with pytest.raises(ShapeMismatchError):
        lite.predict(np.zeros((2, 16, 16, 3), np.float32))


def test_sidecar_round_trip_with_labels_and_normalisation(trained, tmp_path):
    model, _, _, _ = trained
    path = str(tmp_path / "normalized.tflite")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    written = export.convert(model, path, "fp32", input_kind="normalized", labels=LABELS, mean=mean, std=std)
    loaded = export.load_sidecar(path)
    assert loaded == json.loads(json.dumps(written))
    assert loaded["labels"] == LABELS
    assert loaded["input"]["input_kind"] == "normalized"
    assert loaded["input"]["mean"] == pytest.approx(mean) and loaded["input"]["std"] == pytest.approx(std)
    assert loaded["input"]["shape"] == [1, 32, 32, 3]
    assert loaded["source_model"]["weights_sha256"] == models.weights_fingerprint(model)
    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
    assert loaded["source_model"]["params"] == trainable  # BN statistics are not parameters
    assert loaded["source_model"]["params_including_non_trainable"] == model.count_params()
    assert loaded["kdig_tf_version"] == kdig_tf.__version__
    # The labels also travel inside the .tflite, and the embedding keeps the model runnable.
    assert loaded["labels_embedded"] is True
    assert export.read_embedded_labels(path) == LABELS
    assert export.load_sidecar(export.sidecar_path(path))["model_file"] == "normalized.tflite"


def test_sidecar_that_describes_another_model_is_rejected(trained, tmp_path):
    model, calibration, _, _ = trained
    float_path, int8_path = str(tmp_path / "float.tflite"), str(tmp_path / "int8.tflite")
    export.convert(model, float_path, "fp32")
    export.convert(model, int8_path, "int8", representative_images=calibration[:16], int8_io=True)
    # Float sidecar next to the int8-input model: wrong dtype.
    os.replace(export.sidecar_path(float_path), export.sidecar_path(int8_path))
    with pytest.raises(SidecarMismatchError, match="dtype"):
        export.load_sidecar(int8_path)

    export.convert(model, float_path, "fp32")
    sidecar = json.loads(open(export.sidecar_path(float_path)).read())
    sidecar["input"]["shape"] = [1, 64, 64, 3]
    with open(export.sidecar_path(float_path), "w") as handle:
        json.dump(sidecar, handle)
    with pytest.raises(ShapeMismatchError, match="shape"):
        export.load_sidecar(float_path)

    os.remove(export.sidecar_path(float_path))
    with pytest.raises(NotAModelError):
        export.load_sidecar(float_path)


def test_evaluate_tflite_and_fields_added_to_the_sidecar(trained, tmp_path):
    model, _, test_images, test_labels = trained
    path = str(tmp_path / "model.tflite")
    export.convert(model, path, "fp32", labels=LABELS)
    accuracy = export.evaluate_tflite(path, test_images, test_labels, batch_size=16)  # 4 batches
    assert accuracy == pytest.approx(100.0 * export.check_export(model, path, test_images, test_labels)[
        "tflite_accuracy"])
    export.add_to_sidecar(path, val_accuracy=accuracy, file_bytes=os.path.getsize(path))
    loaded = export.load_sidecar(path)  # the sha256 of the untouched .tflite still matches
    assert loaded["val_accuracy"] == accuracy and loaded["file_bytes"] == os.path.getsize(path)
    with pytest.raises(InvalidArgumentError):
        export.add_to_sidecar(path, tflite_sha256="0" * 64)
    with pytest.raises(ShapeMismatchError):
        export.evaluate_tflite(path, test_images[:3], test_labels[:2])


def test_non_image_inputs_are_rejected(tmp_path):
    flat = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    with pytest.raises(ShapeMismatchError):
        export.convert(flat, str(tmp_path / "flat.tflite"), "fp32")
    five_channels = models.build_student(keep_blocks=1, input_shape=(32, 32, 5))
    with pytest.raises(ShapeMismatchError):
        export.convert(five_channels, str(tmp_path / "five.tflite"), "fp32")
    assert not os.path.exists(tmp_path / "flat.tflite")


def test_bad_arguments_raise_named_errors(trained, tmp_path):
    model, calibration, _, _ = trained
    path = str(tmp_path / "model.tflite")
    with pytest.raises(ShapeMismatchError):
        export.convert(model, path, "int8", representative_images=np.zeros((4, 16, 16, 3), np.float32))
    with pytest.raises(ShapeMismatchError):
        export.convert(model, path, "int8", representative_images=[np.zeros((32, 32, 1), np.float32)])
    with pytest.raises(UnknownKeyError):
        export.convert(model, path, "int4")
    with pytest.raises(InvalidArgumentError):
        export.convert(model, path, "int8")  # no calibration data
    with pytest.raises(InvalidArgumentError):
        export.convert(model, path, "fp32", int8_io=True)
    with pytest.raises(ShapeMismatchError):
        export.convert(model, path, "fp32", labels=["just one"])
    assert not os.path.exists(path)


@pytest.mark.parametrize("payload", [b"", b"TFL3", b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64,
                                     b"not a flatbuffer at all, just some text"])
def test_corrupt_tflite_is_not_a_model(tmp_path, payload):
    path = tmp_path / "broken.tflite"
    path.write_bytes(payload)
    with pytest.raises(NotAModelError):
        export.TFLiteModel(str(path))


def test_missing_tflite_is_not_a_model(tmp_path):
    with pytest.raises(NotAModelError):
        export.TFLiteModel(str(tmp_path / "absent.tflite"))


def test_representative_from_split_preprocesses_the_first_images():
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    split = tf.data.Dataset.from_tensor_slices((images, np.zeros(10, np.int64), [f"id{i}" for i in range(10)]))
    representative = export.representative_from_split(split, lambda image: tf.cast(image, tf.float32) / 255.0, n=4)
    assert representative.shape == (4, 32, 32, 3) and representative.dtype == np.float32
    np.testing.assert_allclose(representative, images[:4] / 255.0, atol=1e-6)
    with pytest.raises(InvalidArgumentError):
        export.representative_from_split(split.take(0), lambda image: image, n=4)


def test_quantisation_aware_training_exports_to_int8(trained, tmp_path):
    model, _, test_images, test_labels = trained
    calls = []

    def fit_fn(qat_model, dataset):
        calls.append(dataset)
        export._default_fit(qat_model, dataset, epochs=1, learning_rate=1e-4)

    qat = export.quantize_aware(model)
    assert export.is_quantization_aware(qat) and not export.is_quantization_aware(model)
    export.fine_tune(qat, colour_dataset(test_images, test_labels), fit_fn=fit_fn)
    assert len(calls) == 1
    path = str(tmp_path / "qat.tflite")
    sidecar = export.convert(qat, path, "int8", int8_io=True)  # QAT needs no calibration data
    assert sidecar["conversion"]["quantization_aware"] is True
    assert sidecar["input"]["dtype"] == "int8"
    report = export.check_export(model, path, test_images, test_labels)
    assert report["top1_agreement"] >= 0.95


def test_quantize_aware_handles_stride_two_blocks():
    # features.4 is the first stride-2 block: ZeroPadding2D before its DepthwiseConv2D.
    student = models.build_student(keep_blocks=5, width_multiplier=0.25, num_classes=4)
    assert any(isinstance(layer, keras.layers.ZeroPadding2D) for layer in student.layers)
    qat = export.quantize_aware(student)
    assert export.is_quantization_aware(qat)
    assert qat(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 4)


def test_pruning_reaches_target_sparsity_and_exports(trained, tmp_path):
    model, images, test_images, test_labels = trained
    before = model.get_weights()
    pruned = export.prune(model, colour_dataset(images, np.arange(len(images)) % 4), target_sparsity=0.5,
                          epochs=2)
    assert export.sparsity(pruned) == pytest.approx(0.5, abs=0.02)
    assert not any("prune" in type(layer).__name__.lower() for layer in pruned.layers)  # stripped
    assert export.sparsity(model) < 0.01
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    path = str(tmp_path / "pruned.tflite")
    export.convert(pruned, path, "fp32")
    assert export.check_export(pruned, path, test_images, test_labels)["max_abs_logit_diff"] <= 1e-4


def test_sparsity_counts_zero_kernel_weights():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, use_bias=True)])
    kernel = np.array([[0, 1], [0, 0], [2, 3], [0, 4]], np.float32)
    model.layers[0].set_weights([kernel, np.zeros(2, np.float32)])
    assert export.sparsity(model) == pytest.approx(4 / 8)  # the zero bias is not counted
    with pytest.raises(InvalidArgumentError):
        export.prune(model, tf.data.Dataset.from_tensor_slices((np.zeros((2, 4)), [0, 1])).batch(1), 1.5)
