"""A user's own data, done right (issue 47), on class-per-folder PNG sets written into tmp_path:
folder splits that keep every class, the split check, the teacher check, keep=best, augment=none,
and the summary that lists every export."""
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from PIL import Image

from kdig_tf import data, overlay, pipeline, selection, summary, teacher_check
from kdig_tf.errors import InvalidArgumentError, SplitClassMismatchError, UnknownKeyError, WeakTeacherError

SIZE = 16
# Each class has its own brightness, so a hand-made teacher can be perfect (or useless).
LEVELS = (40, 120, 200)


def write_folder(root, counts, size=SIZE, noise=10, seed=0):
    """root/<class>/<index>.png, class k near grey level LEVELS[k]; names sort class after class."""
    rng = np.random.default_rng(seed)
    for label, count in enumerate(counts):
        folder = os.path.join(root, f"class_{label}")
        os.makedirs(folder, exist_ok=True)
        level = LEVELS[label] if label < len(LEVELS) else rng.integers(0, 256)
        for index in range(count):
            pixels = np.clip(level + rng.integers(-noise, noise + 1, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{index:04d}.png"))
    return f"folder:{root}"


def ids_and_labels(ds):
    return [(example_id.numpy().decode(), int(label)) for _, label, example_id in ds]


def brightness_teacher(path, perfect=True, size=SIZE):
    """A pixel-input teacher file: GAP -> Dense(3). Perfect: logits -m + 80, 0, m - 160 of the mean
    brightness m (argmax is the class of LEVELS); else constant logits naming class 0 (chance)."""
    inputs = keras.Input((size, size, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(3)
    model = keras.Model(inputs, dense(pooled), name="brightness_teacher" if perfect else "constant_teacher")
    if perfect:
        kernel = np.array([[-1.0, 0.0, 1.0]] * 3, np.float32) / 3.0
        dense.set_weights([kernel, np.array([80.0, 0.0, -160.0], np.float32)])
    else:
        dense.set_weights([np.zeros((3, 3), np.float32), np.array([1.0, 0.0, 0.0], np.float32)])
    model.save(path)
    return path


def config(dataset, teacher, **overrides):
    settings = dict(method="kd", teacher=teacher, dataset=dataset, student="mobilenetv2:keep=2,width=0.25",
                    train_split="train", val_split="train", epochs=1, batch_size=8, export_modes="", verbose=0)
    settings.update(overrides)
    return pipeline.DistillConfig(**settings)


@pytest.fixture(scope="module")
def bright(tmp_path_factory):
    """3 classes x 12 images (36: enough to judge a teacher against 50 %) and both teachers."""
    root = tmp_path_factory.mktemp("bright")
    dataset = write_folder(str(root / "images"), [12, 12, 12])
    student = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Rescaling(1 / 255.0),
                                keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(16, activation="relu"),
                                keras.layers.Dense(3)], name="brightness_student")
    student.save(str(root / "student.keras"))
    return {"dataset": dataset, "good": brightness_teacher(str(root / "good.keras")),
            "chance": brightness_teacher(str(root / "chance.keras"), perfect=False),
            "student": str(root / "student.keras")}


# Folder splits.

@pytest.mark.parametrize("counts", [[20] * 10, [12, 30, 17, 25, 11, 40, 13, 19, 22, 10]])
def test_sorted_class_folders_sliced_90_10_keep_every_class_on_both_sides(tmp_path, counts):
    dataset = write_folder(str(tmp_path), counts)
    train = ids_and_labels(data.load(dataset, "train[:90%]")[0])
    val = ids_and_labels(data.load(dataset, "train[90%:]")[0])
    everything = ids_and_labels(data.load(dataset, "train")[0])
    assert {label for _, label in train} == {label for _, label in val} == set(range(len(counts)))
    assert not {i for i, _ in train} & {i for i, _ in val}
    assert sorted(train + val) == sorted(everything) and len(everything) == sum(counts)
    # Each class is cut in proportion, to within one image.
    for label, count in enumerate(counts):
        in_val = sum(1 for _, found in val if found == label)
        assert abs(in_val - count * len(val) / len(everything)) <= 1.0, (label, in_val)
    data.check_split_classes([label for _, label in train], [label for _, label in val])  # no error
    # Sorted ids, read class after class, would have left most classes out of the last 10 %.
    assert len({label for i, label in sorted(everything)[-len(val):]}) <= 2


def test_folder_order_is_a_function_of_the_relative_paths_alone(tmp_path):
    counts = [7, 5, 9]
    first = write_folder(str(tmp_path / "a"), counts)
    # Another root, files written in the opposite order (other inodes, other mtimes).
    second_root = tmp_path / "elsewhere" / "b"
    for label, count in reversed(list(enumerate(counts))):
        os.makedirs(second_root / f"class_{label}")
        for index in reversed(range(count)):
            os.link(tmp_path / "a" / f"class_{label}" / f"{index:04d}.png",
                    second_root / f"class_{label}" / f"{index:04d}.png")
    for stratify in (True, False):
        a = ids_and_labels(data.load(first, "train", stratify=stratify)[0])
        b = ids_and_labels(data.load(f"folder:{second_root}", "train", stratify=stratify)[0])
        assert a == b and a != sorted(a)
    plain = [i for i, _ in ids_and_labels(data.load(first, "train", stratify=False)[0])]
    assert plain == sorted(plain, key=data.example_hash)
    assert list(data.split_labels(first, "train[:40%]")) == [label for _, label in
                                                             ids_and_labels(data.load(first, "train[:40%]")[0])]


def test_a_split_missing_a_class_raises_before_any_work(tmp_path, bright):
    # The first 2 images of the stratified order are of classes 0 and 1: class_2 is never trained on.
    with pytest.raises(SplitClassMismatchError, match="class_2"):
        pipeline.run_distillation(config(bright["dataset"], bright["good"], method="student", train_split="train[:2]"),
                                  str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run" / "run_config.json")
    with pytest.raises(SplitClassMismatchError, match=r"'c'.*\[3\] training images"):
        data.check_split_classes([0] * 50 + [1] * 50 + [2] * 3, [0, 1, 2], ["a", "b", "c"])
    data.check_split_classes([0, 1, 1, 2], [0, 1, 2])  # a tiny set where every class is small is left alone
    assert data.check_split_classes([0, 0, 1], [1]) == {0: 2, 1: 1}


def test_a_store_of_another_cut_of_the_folder_is_refused(tmp_path, bright):
    """A store built before folder splits were hashed and stratified names its split but holds another slice."""
    from kdig_tf import records

    store = str(tmp_path / "store")
    first = config(bright["dataset"], bright["good"], train_split="train[:50%]", store_dir=store)
    pipeline.run_distillation(first, str(tmp_path / "first"), progress=False)
    manifest = json.loads(open(os.path.join(store + "_logits", "manifest.json")).read())
    manifest["split"] = "train[50%:]"  # what an old store of the other half would say
    with open(os.path.join(store + "_logits", "manifest.json"), "w") as handle:
        json.dump(manifest, handle)
    with pytest.raises(records.StoreMismatchError, match="18 images that are not in split 'train\\[50%:\\]'"):
        pipeline.run_distillation(config(bright["dataset"], bright["good"], train_split="train[50%:]", store_dir=store),
                                  str(tmp_path / "second"), progress=False)


# The teacher check.

def test_a_chance_level_teacher_is_refused_before_the_store_is_built(tmp_path, bright):
    workdir = tmp_path / "run"
    with pytest.raises(WeakTeacherError, match=r"33\.33 %.*50\.0 %"):
        pipeline.run_distillation(config(bright["dataset"], bright["chance"]), str(workdir), progress=False)
    record = json.loads((workdir / teacher_check.TEACHER_CHECK).read_text())
    assert record["verdict"] == "weak" and record["num_examples"] == 36 and record["accuracy"] == pytest.approx(100 / 3)
    assert not os.path.exists(workdir / "store_logits") and not os.path.exists(workdir / "store")
    assert not os.path.exists(workdir / "student.h5")


def test_teacher_verdicts():
    assert teacher_check.threshold(10) == pytest.approx(15.0) and teacher_check.threshold(10, 60.0) == 60.0
    assert teacher_check.examples_needed(10, 15.0) == 144 and teacher_check.examples_needed(3, 50.0) == 32
    assert teacher_check.verdict(10.0, 150, 10)[0] == "weak"
    assert teacher_check.verdict(10.0, 100, 10)[0] == "inconclusive"  # too few images to tell
    assert teacher_check.verdict(97.8, 12, 10)[0] == "passed"
    assert teacher_check.verdict(40.0, 150, 10, min_accuracy=50.0)[0] == "weak"


def test_a_weak_teacher_is_measured_but_not_refused_with_skip(tmp_path, bright):
    val_raw, _ = data.load(bright["dataset"], "train")
    teacher = keras.models.load_model(bright["chance"])
    key = {"teacher_fingerprint": "x", "val_split": "train"}
    record = teacher_check.check_teacher(teacher, val_raw, 3, str(tmp_path), key, skip=True)
    assert record["verdict"] == "weak" and record["skipped"]
    with pytest.raises(WeakTeacherError):  # the cached figure is judged again
        teacher_check.check_teacher(None, None, 3, str(tmp_path), key)


# keep=best.

class KeepBestProbe(keras.callbacks.Callback):
    """Records the student's weights after each epoch and wrecks the last epoch (all weights
    zero: constant logits), so the best epoch cannot be the last one."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs, self.weights, self.accuracy = epochs, [], []

    def on_train_batch_end(self, batch, logs=None):
        if len(self.weights) == self.epochs - 1:
            for weight in self.model.student_model.trainable_weights:
                weight.assign(tf.zeros_like(weight))

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append([w.copy() for w in self.model.student_model.get_weights()])
        self.accuracy.append(logs["val_accuracy"])


def test_keep_best_restores_the_best_epoch(tmp_path, bright):
    probe = KeepBestProbe(epochs=4)
    run = config(bright["dataset"], bright["good"], method="student", student=bright["student"], keep="best",
                 epochs=4, batch_size=4, learning_rate=0.05)
    results = pipeline.run_distillation(run, str(tmp_path / "run"), progress=False, extra_callbacks=[probe])
    best = int(np.argmax(probe.accuracy))  # the first of equals, as KeepBestWeights keeps it
    assert best < 3 and probe.accuracy[best] > probe.accuracy[3], probe.accuracy
    saved = keras.models.load_model(str(tmp_path / "run" / "student.h5"), compile=False).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(saved, probe.weights[best]))
    assert not all(np.array_equal(a, b) for a, b in zip(saved, probe.weights[3]))
    assert results["selection"]["keep"] == "best" and results["selection"]["best_epoch"] == best + 1
    assert "optimistic" in results["selection"]["bias"] and results["selection"]["selected_on"] == "train"
    assert results["val_accuracy"] == pytest.approx(100.0 * probe.accuracy[best])


def test_keep_best_weights_survive_a_restart_and_ties_keep_the_earlier_epoch(tmp_path):
    class Holder:  # what the callback needs of a Distiller
        student_model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])

    def weights(value):
        return [np.full(w.shape, value, np.float32) for w in Holder.student_model.get_weights()]

    def epoch(callback, index, value, accuracy):
        Holder.student_model.set_weights(weights(value))
        callback.on_epoch_end(index, {"val_accuracy": accuracy})

    first = selection.KeepBestWeights(str(tmp_path), fresh=True)
    first.set_model(Holder())
    for index, (value, accuracy) in enumerate([(0.0, 0.5), (1.0, 0.9), (2.0, 0.7)]):
        epoch(first, index, value, accuracy)
    # Killed here; the resumed run's callback reads the best so far from the workdir.
    resumed = selection.KeepBestWeights(str(tmp_path))
    resumed.set_model(Holder())
    epoch(resumed, 3, 3.0, 0.9)  # as good as epoch 1, not better
    resumed.on_train_end()
    assert all(np.array_equal(a, b) for a, b in zip(Holder.student_model.get_weights(), weights(1.0)))
    assert resumed.best() == {"epoch": 1, "val_accuracy": 0.9}
    selection.KeepBestWeights(str(tmp_path), fresh=True)  # a run starting over forgets them
    assert resumed.best() is None


class KillAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt("killed after the first epoch")


def test_weight_average_is_what_the_run_ends_with_and_resumes_exactly(tmp_path, bright):
    def run(workdir, ema_decay, **kwargs):
        settings = config(bright["dataset"], bright["good"], method="student", student=bright["student"],
                          ema_decay=ema_decay, epochs=3, batch_size=4, learning_rate=0.05)
        return pipeline.run_distillation(settings, str(tmp_path / workdir), progress=False, **kwargs)

    def student(workdir):
        return keras.models.load_model(str(tmp_path / workdir / "student.h5"), compile=False).get_weights()

    whole = run("whole", 0.8)
    with pytest.raises(KeyboardInterrupt):
        run("resumed", 0.8, extra_callbacks=[KillAfterFirstEpoch()])
    resumed = run("resumed", 0.8)
    assert all(np.array_equal(a, b) for a, b in zip(student("whole"), student("resumed")))
    assert whole["selection"]["ema_decay"] == 0.8 and resumed["val_accuracy"] == whole["val_accuracy"]
    run("plain", 0.0)
    assert not all(np.array_equal(a, b) for a, b in zip(student("whole"), student("plain")))
    with pytest.raises(InvalidArgumentError, match="initial weights"):  # 0.95 ** 27 steps keeps 25 %
        run("too_slow", 0.95)


def test_keep_and_ema_settings_are_checked():
    with pytest.raises(InvalidArgumentError, match="keep"):
        pipeline.DistillConfig(keep="first").validate()
    with pytest.raises(InvalidArgumentError, match="use one"):
        pipeline.DistillConfig(keep="best", ema_decay=0.99).validate()
    with pytest.raises(InvalidArgumentError, match="initial weights"):
        selection.check_ema(0.999, total_steps=180)
    selection.check_ema(0.99, total_steps=1000)
    assert selection.step_warnings(180, 15, 1350, 64) and not selection.step_warnings(1000, 10, 6400, 64)


def test_warmup_is_counted_in_steps_and_leaves_the_old_schedules_alone():
    from kdig_tf import schedules

    assert schedules.learning_rate(1e-3) == 1e-3  # constant, no warm-up: the very optimizer of old runs
    cosine = schedules.learning_rate(1e-3, "cosine", total_steps=100)
    assert isinstance(cosine, keras.optimizers.schedules.CosineDecay) and cosine.decay_steps == 100
    warm = schedules.learning_rate(1e-3, "cosine", total_steps=100, warmup_steps=10)
    rates = [float(warm(step)) for step in (0, 4, 9, 10, 55, 99)]
    assert rates[:3] == pytest.approx([1e-4, 5e-4, 1e-3]) and rates[3] == pytest.approx(1e-3)
    assert rates[4] == pytest.approx(float(keras.optimizers.schedules.CosineDecay(1e-3, 90)(45)))
    assert rates[5] < 1e-5
    constant = schedules.learning_rate(1e-3, "constant", total_steps=100, warmup_steps=4)
    assert [float(constant(step)) for step in (0, 3, 50)] == pytest.approx([2.5e-4, 1e-3, 1e-3])
    assert schedules.WarmupThen.from_config(warm.get_config()).get_config() == warm.get_config()


# Augmentation.

def test_augment_none_feeds_the_images_unchanged(tmp_path):
    dataset = write_folder(str(tmp_path), [5, 6], noise=100)
    raw, _ = data.load(dataset, "train")
    images = {example_id.numpy().decode(): image.numpy() for image, _, example_id in raw}
    seen = 0
    for inputs, _, ids in pipeline.plain_training_dataset(raw, 4, seed=1, epochs=2, augment="none"):
        for image, example_id in zip(inputs.numpy(), ids.numpy()):
            assert np.array_equal(image, images[example_id.decode()].astype(np.float32) / 255.0)
            seen += 1
    assert seen == 2 * len(images)
    batch = np.stack(list(images.values()))
    maps = np.zeros(batch.shape[:3], np.float32)
    unchanged = overlay.augment_and_overlay(batch, maps, tf.constant([3, 4], tf.int64), p=0.0, augment="none")
    assert np.array_equal(unchanged.numpy(), batch.astype(np.float32) / 255.0)
    cropped = overlay.augment_and_overlay(batch, maps, tf.constant([3, 4], tf.int64), p=0.0, augment="crop_flip")
    assert not np.array_equal(cropped.numpy(), batch.astype(np.float32) / 255.0)


def test_augmentation_modes_and_scaled_padding():
    assert data.augment_pad(32, 32) == (4, 4) and data.augment_pad(64, 64) == (8, 8)
    assert data.augment_pad(20, 28) == (3, 4) and data.augment_pad(4, 4) == (1, 1)
    images = tf.random.stateless_uniform([6, 32, 32, 3], [1, 2])
    seed = tf.constant([5, 6], tf.int64)
    both = data.augment_batch(images, seed, "crop_flip").numpy()
    crop = data.augment_batch(images, seed, "crop").numpy()
    flip = data.augment_batch(images, seed, "flip").numpy()
    assert np.array_equal(both, data.crop_flip_batch(images, seed, pad=4).numpy())  # the CIFAR recipe, unchanged
    for index in range(6):
        original = images[index].numpy()
        assert np.array_equal(flip[index], original) or np.array_equal(flip[index], original[:, ::-1])
        assert np.array_equal(both[index], crop[index]) or np.array_equal(both[index], crop[index][:, ::-1])
    assert not np.array_equal(crop, images.numpy()) and not np.array_equal(flip, images.numpy())
    with pytest.raises(UnknownKeyError):
        data.augment_batch(images, seed, "rotate")


def test_augment_auto_is_crop_flip_for_cifar_only_and_is_recorded():
    assert pipeline.DistillConfig().augmentation() == "crop_flip"
    assert pipeline.DistillConfig(dataset="cifar100").augmentation() == "crop_flip"
    assert pipeline.DistillConfig(dataset="folder:/data/digits").augmentation() == "none"
    assert pipeline.DistillConfig(dataset="mnist").augmentation() == "none"
    assert pipeline.DistillConfig(dataset="mnist", augment="flip").augmentation() == "flip"
    assert pipeline.training_settings(pipeline.DistillConfig(dataset="folder:/x"))["augment"] == "none"
    with pytest.raises(UnknownKeyError):
        pipeline.DistillConfig(augment="mixup").validate()


# The summary.

def test_the_summary_lists_every_export(tmp_path, bright):
    workdir = tmp_path / "run"
    results = pipeline.run_distillation(config(bright["dataset"], bright["good"], export_modes="fp32,int8"),
                                        str(workdir), progress=False)
    assert results["teacher_check"]["verdict"] == "passed" and results["teacher_check"]["accuracy"] == 100.0
    assert set(results["tflite"]) == {"fp32", "int8"} and results["augment"] == "none"
    text = summary.text(results, str(workdir))
    table = (workdir / summary.RESULTS_MD).read_text()
    for mode, entry in results["tflite"].items():
        assert os.path.basename(entry["path"]) in text and entry["path"] in table
        assert f"student {mode} (.tflite)" in text
        assert f"| student {mode} (.tflite) | {entry['val_accuracy']:.2f} |" in table
    assert "teacher" in text and "100.00 %" in text and f"{results['val_accuracy']:.2f} %" in text
    assert f"{results['compression']:.2f}x" in text and str(workdir) in text
    assert "| teacher | 100.00 |" in table and results["student_path"] in table
    # A finished run is returned without work, and says the same.
    again = pipeline.run_distillation(config(bright["dataset"], bright["good"], export_modes="fp32,int8"),
                                      str(workdir), progress=False)
    assert summary.text(again, str(workdir)) == text


def test_evaluate_names_an_arbitrary_model_and_reads_folders(bright, capsys):
    from test_evaluate import evaluate_script  # scripts/evaluate.py, loaded once by its own tests

    result = evaluate_script.run_evaluation(bright["good"], dataset=bright["dataset"], split="train[50%:]",
                                            progress=False)
    assert result["accuracy"] == 100.0 and result["num_examples"] == 18
    assert result["model_name"] == "brightness_teacher" and result["trainable_params"] == 12
    line = capsys.readouterr().out
    assert "[brightness_teacher," in line and "12 trainable parameters" in line and "unknown" not in line


# The README.

def test_the_readme_folder_example_runs_as_written(tmp_path, bright, monkeypatch):
    """The README's Python example, with only its paths and its budget (epochs, IG steps) replaced."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    section = readme[readme.index("## Compress your own model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'dataset="folder:/data/flowers"' in code and 'val_split="train[90%:]"' in code
    teacher = brightness_teacher(str(tmp_path / "my_resnet.keras"), size=64)
    replaced = (code.replace('"my_resnet.keras"', repr(teacher))
                .replace('"folder:/data/flowers"', repr(bright["dataset"]))
                .replace('"runs/flowers"', repr(str(tmp_path / "runs" / "flowers")))
                .replace("epochs=40", "epochs=1").replace("ig_steps=16", "ig_steps=2"))
    assert replaced.count("epochs=1") == 1 and replaced.count("ig_steps=2") == 1
    printed = []
    monkeypatch.setattr("builtins.print", lambda *args, **kwargs: printed.append(args))
    scope = {}
    exec(compile(replaced, "README.md", "exec"), scope)
    results = scope["results"]
    assert set(results["tflite"]) == {"fp32", "int8"} and results["image_shape"] == [64, 64, 3]
    assert results["teacher_check"]["accuracy"] == 100.0 and printed[-1][0] == 100.0
    assert os.path.isfile(tmp_path / "runs" / "flowers" / summary.RESULTS_MD)
