"""The speedrun teacher family and its recipe (kdig_tf.teachers, kdig_tf.teacher_recipe) on tiny inputs."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from kdig_tf import models, teacher_recipe, teachers
from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError, StaleRunError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (8, 16, 16)


def _images(count=40, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("widths,convs", [((8, 16, 16), 2), ((16, 32, 32), 3), ((12, 24, 48), 3)])
def test_family_builds_at_several_widths_and_depths(widths, convs):
    model = teachers.build_speedrun_teacher(7, (20, 24, 3), widths=widths, convs_per_block=convs)
    assert model.output_shape == (None, 7)
    convs_found = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs_found) == 1 + 3 * convs  # whitening + blocks
    assert [layer.filters for layer in convs_found[1::convs]] == list(widths)
    residuals = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    assert len(residuals) == (3 if convs == 3 else 0)
    # Trainable parameters by hand: convs (no bias) + BN betas + Dense (no bias); whitening frozen.
    expected, fan_in = 0, 2 * 3 * 4
    for width in widths:
        expected += 9 * fan_in * width + width  # conv1 + bn1 beta
        expected += (convs - 1) * (9 * width * width + width)
        fan_in = width
    expected += widths[-1] * 7
    assert models.count_trainable_params(model) == expected


def test_bad_options_are_named_errors():
    with pytest.raises(InvalidArgumentError):
        teachers.build_speedrun_teacher(10, widths=(8, 16))
    with pytest.raises(InvalidArgumentError):
        teachers.build_speedrun_teacher(10, convs_per_block=4)
    with pytest.raises(ShapeMismatchError):
        teachers.build_speedrun_teacher(10, (8, 8, 3))
    with pytest.raises(InvalidArgumentError):
        teacher_recipe.TeacherRecipe(learning_rate=float("nan")).validate()
    with pytest.raises(InvalidArgumentError):
        teacher_recipe.TeacherRecipe(lr_schedule="step").validate()


def test_dirac_init_makes_each_conv_an_identity_on_its_first_channels():
    model = teachers.build_speedrun_teacher(10, (16, 16, 3), widths=TINY, convs_per_block=3)
    kernel = model.get_layer("block2_conv2").kernel.numpy()
    inputs = np.random.default_rng(1).normal(size=(1, 4, 4, 16)).astype(np.float32)
    out = tf.nn.conv2d(inputs, kernel, 1, "SAME").numpy()
    np.testing.assert_allclose(out, inputs, atol=1e-6)
    # block2_conv1 maps 8 -> 16 channels: the first 8 outputs copy the input, the rest stay random.
    kernel = model.get_layer("block2_conv1").kernel.numpy()
    assert kernel[1, 1, 3, 3] == 1.0 and kernel[0, 0, 3, 3] == 0.0
    assert np.any(kernel[..., 8:] != 0.0)


def test_whitening_is_deterministic_whitens_and_is_frozen():
    images = np.random.default_rng(0).normal(size=(64, 16, 16, 3)) * [1.0, 2.0, 0.5]
    first = teachers.whitening_kernel_from_images(images)
    second = teachers.whitening_kernel_from_images(images.copy())
    np.testing.assert_array_equal(first, second)
    assert first.shape == (2, 2, 3, 24)
    np.testing.assert_array_equal(first[..., 12:], -first[..., :12])
    # The first 12 outputs of the patches are decorrelated with unit variance (eps aside).
    responses = tf.nn.conv2d(images.astype(np.float32), first[..., :12], 1, "VALID").numpy().reshape(-1, 12)
    covariance = responses.T @ responses / len(responses)
    np.testing.assert_allclose(covariance, np.eye(12), atol=0.02)
    model = teachers.build_speedrun_teacher(10, (16, 16, 3), widths=TINY)
    teachers.init_whitening(model, images)
    assert not model.get_layer(teachers.WHITENING_LAYER).trainable
    np.testing.assert_array_equal(model.get_layer(teachers.WHITENING_LAYER).kernel.numpy(), first)


def test_tta_is_the_weighted_mean_of_the_views_logits():
    model = teachers.build_speedrun_teacher(5, (16, 16, 3), widths=TINY)
    images = np.random.default_rng(2).normal(size=(3, 16, 16, 3)).astype(np.float32)
    predict = lambda x: model(np.ascontiguousarray(x), training=False).numpy()  # noqa: E731
    padded = np.pad(images, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="reflect")
    up_left, down_right = padded[:, :16, :16], padded[:, 2:, 2:]
    mirror = lambda x: 0.5 * predict(x) + 0.5 * predict(x[:, :, ::-1])  # noqa: E731
    expected = {0: predict(images), 1: mirror(images),
                2: 0.5 * mirror(images) + 0.25 * mirror(up_left) + 0.25 * mirror(down_right)}
    for level, want in expected.items():
        np.testing.assert_allclose(teachers.tta_logits(model, images, level).numpy(), want, rtol=1e-5, atol=1e-5)
    weights = [w for w, _ in teachers.tta_views(images, 2)]
    assert len(weights) == 6 and abs(sum(weights) - 1.0) < 1e-12


def test_each_augmentation_flag_changes_only_what_it_names():
    images = tf.constant(np.random.default_rng(3).normal(size=(6, 16, 16, 3)), tf.float32)
    seed = tf.constant([4, 5], tf.int64)
    plain = teacher_recipe.augment_batch(images, seed).numpy()
    np.testing.assert_array_equal(plain, images.numpy())
    full = teacher_recipe.augment_batch(images, seed, translate=2, flip=True, cutout=5).numpy()
    no_cutout = teacher_recipe.augment_batch(images, seed, translate=2, flip=True, cutout=0).numpy()
    zeroed = full != no_cutout
    assert np.all(full[zeroed] == 0.0)
    per_image = zeroed.any(axis=-1).reshape(6, -1).sum(axis=1)
    assert np.all(per_image <= 25) and np.all(per_image >= 20)  # a 5x5 square (ties with 0 aside)
    flipped_only = teacher_recipe.augment_batch(images, seed, flip=True).numpy()
    for original, out in zip(images.numpy(), flipped_only):
        assert np.array_equal(out, original) or np.array_equal(out, original[:, ::-1])
    # Turning the flip off leaves the translation's draw unchanged.
    translated = teacher_recipe.augment_batch(images, seed, translate=2).numpy()
    both = teacher_recipe.augment_batch(images, seed, translate=2, flip=True).numpy()
    for one, other in zip(translated, both):
        assert np.array_equal(one, other) or np.array_equal(one[:, ::-1], other)
    assert not np.array_equal(translated, images.numpy())


def test_schedules_and_lookahead_maths():
    triangular = teacher_recipe.RecipeSchedule(1.0, 100, 10, "triangular")
    assert float(triangular(0)) == pytest.approx(0.2)
    assert float(triangular(10)) == pytest.approx(1.0)
    assert float(triangular(55)) == pytest.approx(0.5)
    assert float(triangular(100)) == pytest.approx(0.0)
    cosine = teacher_recipe.RecipeSchedule(1.0, 100, 0, "cosine")
    assert float(cosine(50)) == pytest.approx(0.5, abs=1e-6)
    assert float(teacher_recipe.RecipeSchedule(0.3, 100, 10, "constant")(77)) == pytest.approx(0.3)

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    lookahead = teacher_recipe.Lookahead(model, total_steps=10, every=5)
    slow = [w.numpy() for w in model.weights]
    model.set_weights([w + 1.0 for w in slow])
    lookahead._update(tf.constant(0.25))
    for before, after in zip(slow, model.weights):
        np.testing.assert_allclose(after.numpy(), before + 0.75, rtol=1e-6)
    assert lookahead.decay(10) == pytest.approx(0.95 ** 5)


def test_recipe_sgd_scales_bias_steps_and_couples_weight_decay():
    kernel = tf.Variable([1.0, -2.0], name="conv/kernel")
    beta = tf.Variable([0.5], name="bn/beta")
    optimizer = teacher_recipe.RecipeSGD(0.1, momentum=0.0, coupled_weight_decay=0.01, bias_lr_scale=4.0)
    optimizer.apply_gradients([(tf.constant([1.0, 1.0]), kernel), (tf.constant([1.0]), beta)])
    np.testing.assert_allclose(kernel.numpy(), [1.0 - 0.1 * (1.0 + 0.01), -2.0 - 0.1 * (1.0 - 0.02)], rtol=1e-6)
    np.testing.assert_allclose(beta.numpy(), [0.5 - 0.1 * (4.0 + 0.005)], rtol=1e-6)


def _tiny_recipe(**changes):
    base = teacher_recipe.TeacherRecipe(widths=TINY, convs_per_block=3, epochs=2, batch_size=8, translate=2,
                                        cutout=4, tta_level=2)
    return dataclasses.replace(base, **changes)


def _fake_load(images, labels):
    def load_split(dataset, split, data_dir=None, image_size=None, limit=0):
        info = type("Info", (), {})()
        return images, labels, info
    return load_split


@pytest.fixture
def tiny_data(monkeypatch):
    images = _images(48, 16)
    labels = np.arange(48) % 3
    monkeypatch.setattr(teacher_recipe, "load_split_in_memory", _fake_load(images, labels))
    monkeypatch.setattr(teacher_recipe.data, "num_classes", lambda info: 3)
    return images, labels


def test_training_writes_a_float32_pixel_teacher_that_reloads_with_the_same_logits(tmp_path, tiny_data):
    images, _ = tiny_data
    workdir = str(tmp_path / "run")
    summary = teacher_recipe.train_teacher(_tiny_recipe(precision="mixed_bfloat16"), workdir, verbose=0)
    assert summary["epochs_finished"] == 2 and 0.0 <= summary["val_accuracy"] <= 100.0
    assert summary["trainable_params"] > 0 and summary["train_images_per_second"] > 0
    path = os.path.join(workdir, teacher_recipe.TEACHER_FILE)
    # Plain tf-keras, no kdig_tf object needed: stock layers only.
    loaded = keras.models.load_model(path, compile=False)
    assert all(w.dtype == tf.float32 for w in loaded.weights)
    core, spec = models.split_preprocessing(loaded)
    assert spec.space == "normalized"
    np.testing.assert_allclose(spec.mean, teacher_recipe.channel_statistics(images)[0], rtol=1e-6)
    pixels = images[:5].astype(np.float32)
    np.testing.assert_allclose(loaded(pixels).numpy(), core(spec.from_pixels(images[:5])).numpy(), atol=1e-4)
    # The summary's accuracy is the saved model's plain forward pass.
    predictions = np.argmax(loaded.predict(images.astype(np.float32), verbose=0), axis=1)
    assert summary["val_accuracy"] == pytest.approx(100.0 * np.mean(predictions == tiny_data[1]))
    # A finished run only exports again; another recipe in the same workdir is refused.
    again = teacher_recipe.train_teacher(_tiny_recipe(precision="mixed_bfloat16"), workdir, verbose=0)
    assert again["val_accuracy"] == summary["val_accuracy"]
    with pytest.raises(StaleRunError):
        teacher_recipe.train_teacher(_tiny_recipe(cutout=0), workdir, verbose=0)


class _StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt  # after EpochCheckpoint, as a kill between epochs


def test_a_resumed_run_trains_the_same_teacher_as_an_uninterrupted_one(tmp_path, tiny_data):
    recipe = _tiny_recipe(epochs=3)
    teacher_recipe.train_teacher(recipe, str(tmp_path / "straight"), verbose=0)
    with pytest.raises(KeyboardInterrupt):
        teacher_recipe.train_teacher(recipe, str(tmp_path / "resumed"), verbose=0, callbacks=[_StopAfterFirstEpoch()])
    assert not (tmp_path / "resumed" / teacher_recipe.TEACHER_FILE).exists()
    teacher_recipe.train_teacher(recipe, str(tmp_path / "resumed"), verbose=0)
    straight = keras.models.load_model(str(tmp_path / "straight" / teacher_recipe.TEACHER_FILE), compile=False)
    resumed = keras.models.load_model(str(tmp_path / "resumed" / teacher_recipe.TEACHER_FILE), compile=False)
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    epochs = [row.split(",")[0] for row in (tmp_path / "resumed" / "history.csv").read_text().splitlines()[1:]]
    assert epochs == ["0", "1", "2"]


def test_the_whitening_switch_changes_only_the_first_conv():
    core = teacher_recipe.build_core(_tiny_recipe(whitening=False), 3, (16, 16, 3))
    assert core.get_layer(teachers.WHITENING_LAYER).trainable
    on = teacher_recipe.build_core(_tiny_recipe(), 3, (16, 16, 3))
    assert [(l.name, l.output_shape) for l in core.layers] == [(l.name, l.output_shape) for l in on.layers]


@pytest.mark.slow
def test_train_teacher_script_speedrun_on_mock_data(tmp_path):
    runner = tmp_path / "runner.py"
    runner.write_text(
        "import os, runpy, sys\n"
        "os.environ['TF_USE_LEGACY_KERAS'] = '1'\n"
        "import tensorflow_datasets as tfds\n"
        "sys.argv = ['train_teacher.py'] + sys.argv[1:]\n"
        "with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):\n"
        f"    runpy.run_path(os.path.join({ROOT!r}, 'scripts', 'train_teacher.py'), run_name='__main__')\n")
    workdir = tmp_path / "teacher"
    flags = [f"--workdir={workdir}", "--arch=speedrun", "--train_split=train", "--val_split=train", "--epochs=1",
             "--batch_size=8", "--widths=8,16,16", "--convs_per_block=2", "--verbose=0", "--cutout=0"]
    done = subprocess.run([sys.executable, str(runner), *flags], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((workdir / "teacher.json").read_text())
    assert summary["recipe"]["cutout"] == 0 and summary["recipe"]["widths"] == [8, 16, 16]
    assert summary["recipe"]["translate"] == 4  # not given: the recipe's default
    assert summary["macs"] > 0
    bad = subprocess.run([sys.executable, str(runner), *flags, "--widths=8,x,16"], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 2 and "error: InvalidArgumentError" in bad.stderr


def test_a_busy_workdir_and_a_diverging_run_are_named_errors(tmp_path, tiny_data):
    from kdig_tf import locks
    from kdig_tf.errors import DivergedError, WorkdirBusyError

    workdir = str(tmp_path / "busy")
    with locks.DirLock(workdir, what="workdir"):
        with pytest.raises(WorkdirBusyError):
            teacher_recipe.train_teacher(_tiny_recipe(), workdir, verbose=0)
    diverging = str(tmp_path / "diverging")
    with pytest.raises(DivergedError):
        teacher_recipe.train_teacher(_tiny_recipe(learning_rate=1e12, lookahead=False), diverging, verbose=0)
    assert not os.path.exists(os.path.join(diverging, teacher_recipe.TEACHER_FILE))
    assert not os.path.exists(os.path.join(diverging, teacher_recipe.CHECKPOINT_DIR, "checkpoint"))


@pytest.mark.slow
def test_teacher_cost_benchmark_writes_its_table(tmp_path):
    output = tmp_path / "cost.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "teacher_cost.py"), "--batch_size=2",
                           "--steps=1", "--repeats=1", "--precisions=float32", f"--output={output}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(output.read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert set(rows) == {"speedrun_teacher", "mobilenetv2_teacher", "student_4.1x"}
    assert rows["student_4.1x"]["forward_cost_vs_student"] == 1.0
    assert rows["speedrun_teacher"]["macs_vs_student"] > rows["mobilenetv2_teacher"]["macs_vs_student"] > 1.0
    assert rows["mobilenetv2_teacher"]["params"] == models.TEACHER_PARAMS
    assert (tmp_path / "cost.md").read_text().count("\n| ") == 3
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "teacher_cost.py"), "--precisions=fp8",
                          f"--output={output}"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "error: InvalidArgumentError" in bad.stderr
