"""Resuming a distillation run: after a kill mid-training, after training, and with other flags."""
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tf_keras as keras

from kdig_tf import data, models, overlay, pipeline
from kdig_tf.errors import CorruptRunFileError, InvalidArgumentError, NotAModelError, StaleRunError
from kdig_tf.io_utils import holds_files, read_epoch_log

EPOCHS = 3


class SimulatedKill(Exception):
    pass


class KillAtEpochEnd(keras.callbacks.Callback):
    """Raises after ``epoch`` was logged and backed up, as a kill between epochs would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise SimulatedKill(f"killed after epoch {epoch}")


class KillAtTrainEnd(keras.callbacks.Callback):
    def on_train_end(self, logs=None):
        raise SimulatedKill("killed after training, before evaluation and export")


class EpochCounter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.h5")
    models.build_teacher(width_multiplier=0.25).save(path)
    return path


@pytest.fixture(autouse=True)
def _mock_cifar():
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def _config(teacher_path, **overrides):
    settings = dict(method="kd_ig", teacher=teacher_path, train_split="train", val_split="train", epochs=EPOCHS,
                    batch_size=4, keep_blocks=2, ig_steps=2, examples_per_shard=5, export_modes="", verbose=0)
    settings.update(overrides)
    return pipeline.DistillConfig(**settings)


def _logged_epochs(workdir):
    return read_epoch_log(os.path.join(workdir, pipeline.HISTORY)).get("epoch", [])


def test_killed_run_resumes_at_the_next_epoch(tmp_path, teacher_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(SimulatedKill):
        pipeline.run_distillation(_config(teacher_path), workdir, progress=False,
                                  extra_callbacks=[KillAtEpochEnd(1)])
    assert not os.path.exists(os.path.join(workdir, pipeline.RESULTS))
    assert not os.path.exists(os.path.join(workdir, pipeline.STUDENT))
    assert _logged_epochs(workdir) == [0.0, 1.0]

    counter = EpochCounter()
    results = pipeline.run_distillation(_config(teacher_path), workdir, progress=False, extra_callbacks=[counter])
    assert counter.epochs == [2]  # epochs 0 and 1 were not trained again
    assert _logged_epochs(workdir) == [0.0, 1.0, 2.0]
    assert results["epochs_logged"] == EPOCHS
    assert len(results["history"]["epoch_seconds"]) == EPOCHS
    assert results["train_seconds"] == pytest.approx(sum(results["history"]["epoch_seconds"]))
    assert results["train_seconds"] > 0
    # The reported accuracy is the final student's, as Keras measured it after the last epoch.
    assert results["val_accuracy"] == pytest.approx(100.0 * results["history"]["val_accuracy"][-1])
    # Validation sees cached teacher logits, so its KD term is real, not a placeholder zero.
    assert all(value > 0 for value in results["history"]["val_kd_loss"])
    assert not holds_files(os.path.join(workdir, pipeline.BACKUP))  # training finished
    # Each start of training says where it ran, so a campaign that moves machines is traceable.
    machines = results["machines"]
    assert [entry["first_epoch"] for entry in machines] == [0, 2]
    assert machines == pipeline.read_training_machines(workdir)
    for entry in machines:
        assert entry["tensorflow_onednn"] is (os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1")
        assert entry["cpu_count"] >= 1 and entry["tensorflow"] == tf.__version__
        assert entry["started_utc"].endswith("Z")


def test_unreadable_machine_record_is_a_named_error(tmp_path, teacher_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / pipeline.MACHINES).write_text('[{"first_epoch": 0')  # cut off mid-write by hand
    with pytest.raises(CorruptRunFileError, match="machines.json"):
        pipeline.run_distillation(_config(teacher_path), str(workdir), progress=False)


@pytest.mark.parametrize("method", ["kd_ig", "student"])
def test_resumed_run_trains_the_same_student_as_an_uninterrupted_one(tmp_path, teacher_path, method):
    config = _config(teacher_path, method=method)
    whole = pipeline.run_distillation(config, str(tmp_path / "whole"), progress=False)
    resumed_dir = str(tmp_path / "resumed")
    with pytest.raises(SimulatedKill):
        pipeline.run_distillation(config, resumed_dir, progress=False, extra_callbacks=[KillAtEpochEnd(0)])
    resumed = pipeline.run_distillation(config, resumed_dir, progress=False)
    for before, after in zip(keras.models.load_model(whole["student_path"], compile=False).get_weights(),
                             keras.models.load_model(resumed["student_path"], compile=False).get_weights()):
        np.testing.assert_allclose(before, after, rtol=0, atol=1e-6)
    assert resumed["history"]["loss"] == pytest.approx(whole["history"]["loss"], abs=1e-6)


def test_run_killed_after_training_only_redoes_evaluation_and_export(tmp_path, teacher_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(SimulatedKill):
        pipeline.run_distillation(_config(teacher_path), workdir, progress=False, extra_callbacks=[KillAtTrainEnd()])
    student_path = os.path.join(workdir, pipeline.STUDENT)
    assert os.path.exists(student_path) and not os.path.exists(os.path.join(workdir, pipeline.RESULTS))
    trained = keras.models.load_model(student_path, compile=False).get_weights()

    counter = EpochCounter()
    results = pipeline.run_distillation(_config(teacher_path, export_modes="fp32"), workdir, progress=False,
                                        extra_callbacks=[counter])
    assert counter.epochs == []
    assert results["epochs_logged"] == EPOCHS and "fp32" in results["tflite"]
    for before, after in zip(trained, keras.models.load_model(student_path, compile=False).get_weights()):
        np.testing.assert_array_equal(before, after)


def test_finished_run_is_returned_without_work_and_other_settings_are_refused(tmp_path, teacher_path):
    workdir = str(tmp_path / "run")
    first = pipeline.run_distillation(_config(teacher_path), workdir, progress=False)
    results_path = os.path.join(workdir, pipeline.RESULTS)
    stamp = os.stat(results_path).st_mtime_ns

    assert pipeline.run_distillation(_config(teacher_path), workdir, progress=False) == first
    assert os.stat(results_path).st_mtime_ns == stamp

    with pytest.raises(StaleRunError, match="alpha"):
        pipeline.run_distillation(_config(teacher_path, alpha=0.5), workdir, progress=False)
    with pytest.raises(StaleRunError, match="seed"):
        pipeline.run_distillation(_config(teacher_path, seed=1), workdir, progress=False)
    assert os.stat(results_path).st_mtime_ns == stamp


def test_run_recorded_before_stem_stride_existed_is_a_stride_1_run(tmp_path, teacher_path):
    workdir = str(tmp_path / "run")
    first = pipeline.run_distillation(_config(teacher_path), workdir, progress=False)
    for name in (pipeline.RUN_CONFIG, pipeline.RESULTS):  # as written before the field was added
        path = os.path.join(workdir, name)
        recorded = json.loads(open(path).read())
        (recorded["flags"] if name == pipeline.RESULTS else recorded).pop("stem_stride")
        open(path, "w").write(json.dumps(recorded))
    stamp = os.stat(os.path.join(workdir, pipeline.RESULTS)).st_mtime_ns

    again = pipeline.run_distillation(_config(teacher_path), workdir, progress=False)
    assert again["val_accuracy"] == first["val_accuracy"]
    assert os.stat(os.path.join(workdir, pipeline.RESULTS)).st_mtime_ns == stamp
    with pytest.raises(StaleRunError, match="stem_stride: 1 -> 2"):
        pipeline.run_distillation(_config(teacher_path, stem_stride=2), workdir, progress=False)


def test_finished_run_remakes_missing_exports_from_its_student(tmp_path, teacher_path, monkeypatch):
    workdir = str(tmp_path / "run")
    config = _config(teacher_path, export_modes="fp32", store_dir=str(tmp_path / "store"))
    first = pipeline.run_distillation(config, workdir, progress=False)
    exported = os.path.join(workdir, "student_fp32.tflite")
    original = open(exported, "rb").read()
    os.remove(exported)  # as in a fresh clone: git does not keep .tflite files
    shutil.rmtree(str(tmp_path / "store"))  # re-exporting needs neither the store nor training
    monkeypatch.setattr(pipeline, "ensure_store", None)

    again = pipeline.run_distillation(config, workdir, progress=False)
    assert open(exported, "rb").read() == original
    assert again["val_accuracy"] == first["val_accuracy"] and again["history"] == first["history"]
    assert again["tflite"]["fp32"]["max_abs_logit_diff"] <= 1e-4
    assert json.loads(open(os.path.join(workdir, pipeline.RESULTS)).read())["tflite"] == again["tflite"]

    os.remove(exported)
    os.remove(os.path.join(workdir, pipeline.STUDENT))
    with pytest.raises(NotAModelError, match="student.h5"):
        pipeline.run_distillation(config, workdir, progress=False)


def test_stem_stride_2_with_attention_transfer_is_refused():
    with pytest.raises(InvalidArgumentError, match="attention transfer"):
        pipeline.DistillConfig(method="kd_at", stem_stride=2).validate()
    with pytest.raises(InvalidArgumentError, match="stem_stride"):
        pipeline.DistillConfig(stem_stride=3).validate()
    pipeline.DistillConfig(method="kd_ig", stem_stride=2).validate()


def test_partial_run_with_another_teacher_is_refused(tmp_path, teacher_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(SimulatedKill):
        pipeline.run_distillation(_config(teacher_path), workdir, progress=False, extra_callbacks=[KillAtEpochEnd(0)])
    other = str(tmp_path / "other_teacher.h5")
    models.build_teacher(width_multiplier=0.25).save(other)
    with pytest.raises(StaleRunError, match="teacher"):
        pipeline.run_distillation(_config(other, store_dir=str(tmp_path / "store2")), workdir, progress=False)


def test_workdir_with_an_unrecorded_run_is_refused(tmp_path, teacher_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / pipeline.HISTORY).write_text("epoch,loss\n0,1.0\n")
    with pytest.raises(StaleRunError, match="unrecorded"):
        pipeline.run_distillation(_config(teacher_path), str(workdir), progress=False)


def test_epoch_log_keeps_the_last_row_of_a_repeated_epoch(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss\n0,3.0\n1,2.0\n1,1.5\n2,1.0\n")
    assert read_epoch_log(str(path)) == {"epoch": [0.0, 1.0, 2.0], "loss": [3.0, 1.5, 1.0]}


def test_validation_dataset_pairs_each_image_with_its_own_teacher_logits(teacher_path):
    teacher = pipeline.load_teacher(teacher_path)
    raw, _ = data.load("cifar10", "train")
    batches = list(pipeline.validation_dataset(raw, teacher, batch_size=5))
    assert [len(labels) for _, labels in batches] == [5, 5, 2]
    images = np.concatenate([image[None] for image, _, _ in raw.as_numpy_iterator()])
    labels = np.array([label for _, label, _ in raw.as_numpy_iterator()])
    inputs = np.concatenate([features["images"] for features, _ in batches])
    logits = np.concatenate([features["teacher_logits"] for features, _ in batches])
    np.testing.assert_allclose(inputs, images / 255.0, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([got for _, got in batches]), labels)
    bare = keras.models.load_model(teacher_path, compile=False)
    # Batched as the dataset batches, because oneDNN's round-off depends on the batch size.
    expected = np.concatenate([bare(data.preprocess_teacher(tf.constant(images[start:start + 5])),
                                    training=False).numpy() for start in range(0, len(images), 5)])
    np.testing.assert_array_equal(logits, expected)  # the wrapped teacher gives the bare network's logits


class InitialWeights(keras.callbacks.Callback):
    """Records the student's weights before the first step, then stops the run."""

    def on_train_begin(self, logs=None):
        self.weights = self.model.student.get_weights()
        raise SimulatedKill("initial weights recorded")


def test_arms_with_the_same_seed_start_from_the_same_student(tmp_path, teacher_path):
    # Loading the teacher and building the store consume random ops; the student must not
    # depend on that, or a seed-by-seed comparison of arms would compare different inits.
    initial = {}
    for method, seed in [("student", 3), ("kd_ig", 3), ("kd_ig", 4)]:
        recorder = InitialWeights()
        with pytest.raises(SimulatedKill):
            pipeline.run_distillation(_config(teacher_path, method=method, seed=seed),
                                      str(tmp_path / f"{method}_{seed}"), progress=False,
                                      extra_callbacks=[recorder])
        initial[method, seed] = recorder.weights
    for student, distilled in zip(initial["student", 3], initial["kd_ig", 3]):
        np.testing.assert_array_equal(student, distilled)
    assert any(not np.array_equal(a, b) for a, b in zip(initial["kd_ig", 3], initial["kd_ig", 4]))


def test_student_arm_sees_the_same_batches_as_the_store_arms(tmp_path, teacher_path):
    # The student arm reads the raw split, the KD arms the store: same seed, same images, same crops.
    config = _config(teacher_path, seed=5)
    teacher = pipeline.load_teacher(teacher_path, 10)
    store = pipeline.ensure_store(config, teacher, str(tmp_path / "store"), progress=False)
    raw, _ = data.load(config.dataset, config.train_split, config.data_dir)
    plain = pipeline.plain_training_dataset(raw, 4, seed=5, epochs=2)
    stored = overlay.training_dataset(store, 4, p=0.0, seed=5, epochs=2)
    batches = 0
    for (plain_inputs, plain_labels, plain_ids), (inputs, labels, _, ids) in zip(plain, stored):
        np.testing.assert_array_equal(plain_ids.numpy(), ids.numpy())
        np.testing.assert_array_equal(plain_labels.numpy(), labels.numpy())
        np.testing.assert_allclose(plain_inputs.numpy(), inputs.numpy(), rtol=0, atol=1e-6)
        batches += 1
    assert batches == 2 * 3  # 12 examples, batch 4, two epochs


def test_kd_arm_reads_a_logits_only_store_until_a_full_one_exists_and_trains_the_same_student(tmp_path,
                                                                                                teacher_path):
    store_dir = str(tmp_path / "store")
    kd = _config(teacher_path, method="kd", store_dir=store_dir)
    from_logits = pipeline.run_distillation(kd, str(tmp_path / "kd_a"), progress=False)
    assert from_logits["store"]["dir"] == os.path.abspath(pipeline.logits_store_dir(store_dir))
    assert from_logits["store"]["ig"] is None
    assert not os.path.exists(store_dir)  # no IG was computed for the kd arm

    pipeline.run_distillation(_config(teacher_path, method="ig", store_dir=store_dir), str(tmp_path / "ig"),
                              progress=False)
    from_full = pipeline.run_distillation(kd, str(tmp_path / "kd_b"), progress=False)
    assert from_full["store"]["dir"] == os.path.abspath(store_dir) and from_full["store"]["ig"] is not None
    for a, b in zip(keras.models.load_model(from_logits["student_path"], compile=False).get_weights(),
                    keras.models.load_model(from_full["student_path"], compile=False).get_weights()):
        np.testing.assert_array_equal(a, b)
    assert from_logits["history"]["loss"] == from_full["history"]["loss"]
