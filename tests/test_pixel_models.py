"""Pixel models: networks that hold their own scaling/normalisation, and the specs of built-in students."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from kdig_tf import data, models
from kdig_tf.errors import InvalidArgumentError, UnknownKeyError


def _pixels(count=4, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3)).astype(np.uint8)


def test_wrapped_teacher_is_bit_identical_to_the_normalised_core():
    core = models.build_teacher(width_multiplier=0.25)
    teacher = models.with_preprocessing(core, models.CIFAR10_TEACHER_INPUT)
    images = _pixels()
    old_path = core(data.preprocess_teacher(images), training=False).numpy()
    assert np.array_equal(teacher(images.astype(np.float32), training=False).numpy(), old_path)
    assert models.count_trainable_params(teacher) == models.count_trainable_params(core)
    split_core, spec = models.split_preprocessing(teacher)
    assert split_core is core and spec == models.CIFAR10_TEACHER_INPUT
    assert np.array_equal(spec.from_pixels(images).numpy(), data.preprocess_teacher(images).numpy())


def test_student_core_input_from_unit_images_is_the_unit_image_itself():
    unit = tf.random.stateless_uniform((2, 32, 32, 3), seed=[0, 1])
    assert models.UNIT_INPUT.from_unit(unit) is unit
    assert np.array_equal(models.CIFAR10_TEACHER_INPUT.from_unit(unit).numpy(), data.normalize_teacher(unit).numpy())
    assert np.allclose(models.PIXEL_INPUT.from_unit(unit).numpy(), unit.numpy() * 255.0)


def test_inline_normalisation_layer_splits_into_a_core_sharing_weights():
    inputs = keras.Input((16, 16, 3))
    x = inputs
    for layer in models.preprocessing_layers(models.UNIT_INPUT):
        x = layer(x)
    x = keras.layers.Conv2D(4, 3, name="conv")(x)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    core, spec = models.split_preprocessing(model)
    assert spec == models.UNIT_INPUT
    assert core.get_layer("conv") is model.get_layer("conv")
    images = _pixels(size=16).astype(np.float32)
    assert np.array_equal(core(images / 255.0).numpy(), model(images).numpy())


def test_a_model_without_the_layer_is_its_own_pixel_core():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Rescaling(1 / 255.0), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    core, spec = models.split_preprocessing(model)
    assert core is model and spec == models.PIXEL_INPUT


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_pixel_models_round_trip_through_keras_files(tmp_path, suffix):
    student = models.build_pixel_student(keep_blocks=2, num_classes=5)
    path = str(tmp_path / f"student{suffix}")
    student.save(path)
    loaded = keras.models.load_model(path, compile=False)
    images = _pixels().astype(np.float32)
    assert np.array_equal(loaded(images).numpy(), student(images).numpy())
    assert models.split_preprocessing(loaded)[1] == models.UNIT_INPUT


def test_bad_statistics_are_refused():
    with pytest.raises(InvalidArgumentError):
        models.InputSpec("normalized", mean=(0.5,) * 3)
    with pytest.raises(InvalidArgumentError):
        models.InputSpec("unit", mean=(0.5,) * 3, std=(0.2,) * 3)
    inputs = keras.Input((8, 8, 3))
    scaled = keras.layers.Normalization(mean=0.0, variance=1.0, name=models.PIXEL_SCALING_LAYER)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(scaled)))
    with pytest.raises(InvalidArgumentError, match="does not divide"):
        models.split_preprocessing(model)


def test_saved_pixel_student_loads_without_kdig_tf(tmp_path):
    import subprocess
    import sys

    student = models.build_pixel_student(keep_blocks=2, num_classes=5)
    path = str(tmp_path / "student.h5")
    student.save(path)
    images = _pixels().astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "expected.npy", student.predict(images, verbose=0))
    script = (f"import os, sys\nos.environ['TF_USE_LEGACY_KERAS'] = '1'\nimport numpy as np, tf_keras as keras\n"
              f"model = keras.models.load_model({path!r}, compile=False)\n"
              f"assert 'kdig_tf' not in sys.modules\n"
              f"diff = np.abs(model.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0) - "
              f"np.load({str(tmp_path / 'expected.npy')!r})).max()\nassert diff == 0.0, diff\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]


def test_student_spec_parses_and_builds_the_papers_student():
    spec = models.parse_student_spec("mobilenetv2:keep=14,width=1.0,stem_stride=1")
    assert str(spec) == "mobilenetv2:keep=14,stem_stride=1,width=1.0"
    core = spec.build_core(10, (32, 32, 3))
    assert models.count_trainable_params(core) == 543_498 and spec.input_spec == models.UNIT_INPUT
    other = models.parse_student_spec("MobileNetV2:keep=4").build_core(5, (64, 64, 3))
    assert other.output_shape == (None, 5) and other.input_shape == (None, 64, 64, 3)


@pytest.mark.parametrize("text, error", [("densenet:depth=3", UnknownKeyError), ("mobilenetv2:depth=3", UnknownKeyError),
                                         ("mobilenetv2:keep", UnknownKeyError),
                                         ("mobilenetv2:keep=big", InvalidArgumentError)])
def test_student_spec_errors_are_named(text, error):
    with pytest.raises(error):
        models.parse_student_spec(text)


def test_fresh_copy_keeps_the_architecture_and_draws_new_weights():
    model = models.build_student(keep_blocks=2, num_classes=4)
    keras.utils.set_random_seed(1)
    copy = models.fresh_copy(model)
    assert [w.shape for w in copy.weights] == [w.shape for w in model.weights]
    assert not np.array_equal(copy.get_layer("features_0_0").kernel.numpy(), model.get_layer("features_0_0").kernel.numpy())


def test_legacy_files_load_as_pixel_models_with_unchanged_outputs(tmp_path):
    from kdig_tf import loading

    core = models.build_teacher(width_multiplier=0.25)
    student_core = models.build_student(keep_blocks=2)
    core.save(str(tmp_path / "teacher.h5"))
    student_core.save(str(tmp_path / "student.h5"))
    images = _pixels()
    teacher = loading.load_pixel_model(str(tmp_path / "teacher.h5"))
    student = loading.load_pixel_model(str(tmp_path / "student.h5"))
    assert np.array_equal(teacher(images.astype(np.float32)).numpy(),
                          core(data.preprocess_teacher(images)).numpy())
    assert np.array_equal(student(images.astype(np.float32)).numpy(),
                          student_core(data.preprocess_student(images)).numpy())


def test_any_other_classifier_loads_unchanged_also_from_a_saved_model_dir(tmp_path):
    from kdig_tf import loading

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Rescaling(1 / 255.0), keras.layers.Flatten(),
                              keras.layers.Dense(2, name="logits")])
    model.save(str(tmp_path / "mine.keras"))
    model.save(str(tmp_path / "saved_model_dir"), save_format="tf")
    loaded = loading.load_pixel_model(str(tmp_path / "mine.keras"))
    assert models.split_preprocessing(loaded)[1] == models.PIXEL_INPUT
    images = _pixels(size=8).astype(np.float32)
    assert np.allclose(loading.load_pixel_model(str(tmp_path / "saved_model_dir"))(images).numpy(),
                       model(images).numpy())


def test_store_targets_of_a_wrapped_teacher_equal_those_of_the_bare_network():
    from kdig_tf import records

    core = models.build_teacher(width_multiplier=0.25)
    teacher = models.with_preprocessing(core, models.CIFAR10_TEACHER_INPUT)
    assert records.weights_fingerprint(teacher) == records.weights_fingerprint(core)
    images, labels = _pixels(2), np.array([1, 7])
    old_logits, old_maps = records.TeacherTargets(core, steps=3)(images, labels)
    for model in (teacher, core):  # the bare legacy network is recognised and wrapped too
        logits, maps = records.TeacherTargets.for_model(model, steps=3)(images, labels)
        assert np.array_equal(logits, old_logits) and np.array_equal(maps, old_maps)
    # The paper's baseline, stated explicitly, is the same baseline for this teacher.
    _, colour_maps = records.TeacherTargets.for_model(teacher, steps=3, baseline="mean_colour")(images, labels)
    assert np.allclose(colour_maps, old_maps, rtol=1e-5, atol=1e-7)


def test_mean_colour_baseline_of_a_pixel_teacher_needs_a_colour():
    from kdig_tf import records

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Rescaling(1 / 255.0), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    with pytest.raises(InvalidArgumentError, match="baseline_colour"):
        records.TeacherTargets.for_model(model, steps=2, baseline="mean_colour")
    targets = records.TeacherTargets.for_model(model, steps=2, baseline="mean_colour", baseline_colour=(0.5, 0.5, 0.5))
    logits, maps = targets(_pixels(2, size=8), np.array([0, 1]))
    assert logits.shape == (2, 2) and maps.shape == (2, 8, 8) and np.all(np.isfinite(maps))
    assert targets.settings()["colour"] == [0.5, 0.5, 0.5]
