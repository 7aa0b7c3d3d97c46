"""Faults an operator meets, injected on mock data: each gives a named error (exit code 2 from a
script), leaves nothing that looks finished, and is recovered by a rerun once its cause is gone.

kill -9 mid-epoch; two processes in one workdir and a stale lock; a full disk; NaN from a huge
learning rate or from ``--learning_rate=nan``; flipped bytes in a .tflite; a corrupt shard
sidecar; an edited store manifest; a damaged epoch log; a changed teacher; unknown flags and
missing flagfiles.
"""
import errno
import glob
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tf_keras as keras

from kdig_tf import export, guards, locks, models, pipeline, records
from kdig_tf.errors import (ChecksumMismatchError, CorruptRunFileError, DivergedError, InvalidArgumentError,
                            NonFiniteOutputError, NonFiniteWeightsError, OutOfSpaceError, StaleRunError,
                            TFLiteChecksumError, WorkdirBusyError)
from kdig_tf.io_utils import holds_files, read_epoch_log, sha256_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3
# Settings of a tiny run: 12 mock images, 3 steps per epoch.
TINY = dict(teacher=None, train_split="train", val_split="train", epochs=EPOCHS, batch_size=4, keep_blocks=2,
            ig_steps=2, examples_per_shard=5, export_modes="", verbose=0)
FINISHED_LOOKING = (pipeline.RESULTS, pipeline.STUDENT, "*.tflite", records.MANIFEST)

# Runs a script or pipeline call in a fresh interpreter, on the same mock CIFAR-10 as the tests.
MOCK_PRELUDE = """
import json, os, runpy, signal, sys, time
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow_datasets as tfds
mock = tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE)
"""
SCRIPT_RUNNER = MOCK_PRELUDE + """
script = sys.argv[1]
sys.argv = [os.path.basename(script)] + sys.argv[2:]
with mock:
    runpy.run_path(script, run_name="__main__")
"""
# argv: workdir, config JSON, behaviour ("kill_mid_epoch_1" or "wait_for:<path>" or "plain").
PIPELINE_RUNNER = MOCK_PRELUDE + """
import tf_keras as keras
from kdig_tf import pipeline

workdir, settings, behaviour = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]


class Fault(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        if behaviour.startswith("wait_for:"):
            open(os.path.join(workdir, "started"), "w").close()
            go = behaviour.split(":", 1)[1]
            deadline = time.time() + 600
            while not os.path.exists(go) and time.time() < deadline:
                time.sleep(0.2)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if behaviour == "kill_mid_epoch_1" and self.epoch == 1 and batch == 2:  # step 2 of 3
            os.kill(os.getpid(), signal.SIGKILL)


with mock:
    pipeline.run_distillation(pipeline.DistillConfig(**settings), workdir, progress=False,
                              extra_callbacks=[Fault()])
"""


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.h5")
    models.build_teacher(width_multiplier=0.25).save(path)
    return path


@pytest.fixture(autouse=True)
def _mock_cifar():
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def _settings(teacher_path, **overrides):
    return dict(TINY, teacher=teacher_path, **overrides)


def _config(teacher_path, **overrides):
    return pipeline.DistillConfig(**_settings(teacher_path, **overrides))


def finished_looking(directory):
    """Files under ``directory`` that a reader would take for finished output."""
    return sorted(os.path.relpath(path, directory) for pattern in FINISHED_LOOKING
                  for path in glob.glob(os.path.join(str(directory), "**", pattern), recursive=True))


def _python(tmp_path, source, *args, wait=True, **kwargs):
    runner = tmp_path / f"runner_{abs(hash(source))}.py"
    runner.write_text(source)
    command = [sys.executable, str(runner), *[str(arg) for arg in args]]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900, **kwargs)


def _script(tmp_path, name, *flags):
    return _python(tmp_path, SCRIPT_RUNNER, os.path.join(ROOT, "scripts", name), *flags)


def error_line(completed, name):
    """The script's one-line error; asserts exit code 2 and the error's name."""
    assert completed.returncode == 2, completed.stderr[-3000:]
    line = completed.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {name}: "), completed.stderr[-3000:]
    return line


def _student_weights(path):
    return keras.models.load_model(path, compile=False).get_weights()


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --------------------------------------------------------------------------- kill -9

@pytest.mark.slow
def test_kill_9_mid_epoch_resumes_to_the_same_student(tmp_path, teacher_path):
    settings = _settings(teacher_path, method="student")
    whole = pipeline.run_distillation(pipeline.DistillConfig(**settings), str(tmp_path / "whole"), progress=False)

    workdir = tmp_path / "killed"
    killed = _python(tmp_path, PIPELINE_RUNNER, workdir, json.dumps(settings), "kill_mid_epoch_1")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert finished_looking(workdir) == []
    assert holds_files(workdir / pipeline.BACKUP)  # epoch 0's checkpoint
    holder = json.loads((workdir / locks.LOCK_FILE).read_text())  # left by the dead process
    assert holder["host"] == socket.gethostname() and holder["pid"] != os.getpid()

    resumed = pipeline.run_distillation(pipeline.DistillConfig(**settings), str(workdir), progress=False)
    for before, after in zip(_student_weights(whole["student_path"]), _student_weights(resumed["student_path"])):
        np.testing.assert_allclose(before, after, rtol=0, atol=1e-6)
    assert read_epoch_log(str(workdir / pipeline.HISTORY))["epoch"] == [0.0, 1.0, 2.0]
    assert not os.path.exists(workdir / locks.LOCK_FILE)  # released at the end


# --------------------------------------------------------------------------- two processes, one workdir

def test_second_holder_of_a_workdir_is_refused_and_nothing_is_written(tmp_path, teacher_path):
    workdir = tmp_path / "run"
    with locks.DirLock(str(workdir), remove_empty=True):
        with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            locks.DirLock(str(workdir)).acquire()
        with pytest.raises(WorkdirBusyError, match=f"pid {os.getpid()}"):
            pipeline.run_distillation(_config(teacher_path, method="student"), str(workdir), progress=False)
        assert os.listdir(workdir) == [locks.LOCK_FILE]
    assert not os.path.exists(workdir)  # the lock made the folder and removed it again


@pytest.mark.slow
def test_two_concurrent_runs_into_one_workdir(tmp_path, teacher_path):
    """The second distill.py gets WorkdirBusyError (exit 2) naming the first, which finishes undisturbed."""
    settings = _settings(teacher_path, method="student")
    workdir, go = tmp_path / "run", tmp_path / "go"
    first = _python(tmp_path, PIPELINE_RUNNER, workdir, json.dumps(settings), f"wait_for:{go}", wait=False)
    try:
        deadline = time.time() + 600
        while not os.path.exists(workdir / "started") and first.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert os.path.exists(workdir / "started"), first.stderr.read() if first.poll() is not None else "timeout"
        flags = [f"--{key}={'' if value is None else value}" for key, value in settings.items()]
        second = _script(tmp_path, "distill.py", *flags, f"--workdir={workdir}")
        line = error_line(second, "WorkdirBusyError")
        assert f"pid {first.pid} on host {socket.gethostname()}" in line
        go.touch()
        _, stderr = first.communicate(timeout=900)
        assert first.returncode == 0, stderr[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    # One writer: one header, each epoch logged once, and a finished result.
    lines = (workdir / pipeline.HISTORY).read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["epoch", "0", "1", "2"]
    assert os.path.isfile(workdir / pipeline.RESULTS)


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "started_utc": "2020-01-01T00:00:00Z"}
    (directory / locks.LOCK_FILE).write_text(json.dumps(stale))
    with locks.DirLock(str(directory)) as lock:
        assert json.loads((directory / locks.LOCK_FILE).read_text())["pid"] == os.getpid() == lock.holder["pid"]
    assert not os.path.exists(directory / locks.LOCK_FILE)

    # Another machine's lock cannot be checked from here: it is trusted, and the error says how to clear it.
    (directory / locks.LOCK_FILE).write_text(json.dumps(dict(stale, host="another-host")))
    with pytest.raises(WorkdirBusyError, match="another-host.*delete"):
        locks.DirLock(str(directory)).acquire()


# --------------------------------------------------------------------------- disk full

class _FullDiskWriter:
    """tf.io.TFRecordWriter whose disk fills up after ``room`` records (counted over all writers)."""

    room = 0
    error = None

    def __init__(self, path):
        self._writer = _REAL_WRITER(path)

    def write(self, record):
        if _FullDiskWriter.room <= 0:
            raise _FullDiskWriter.error
        _FullDiskWriter.room -= 1
        self._writer.write(record)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._writer.close()
        return False


_REAL_WRITER = tf.io.TFRecordWriter


def _build_store(store_dir, teacher, **kwargs):
    targets = records.TeacherTargets(teacher, steps=2, max_batch=64)
    return records.precompute_store(str(store_dir), targets, records.weights_fingerprint(teacher), split="train",
                                    examples_per_shard=5, batch_size=4, progress=False, **kwargs)


@pytest.fixture(scope="module")
def tiny_teacher():
    return models.build_student(keep_blocks=2)


@pytest.fixture(scope="module")
def clean_store(tiny_teacher, tmp_path_factory):
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        store_dir = tmp_path_factory.mktemp("clean_store")
        _build_store(store_dir, tiny_teacher)
    return store_dir


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   tf.errors.ResourceExhaustedError(None, None, "write: No space left on device")])
def test_full_disk_during_the_precompute_keeps_finished_shards(tmp_path, tiny_teacher, clean_store, monkeypatch,
                                                               error):
    store_dir = tmp_path / "store"
    monkeypatch.setattr(_FullDiskWriter, "room", 7)  # shard 0 (5 records) fits, shard 1 does not
    monkeypatch.setattr(_FullDiskWriter, "error", error)
    monkeypatch.setattr(tf.io, "TFRecordWriter", _FullDiskWriter)
    with pytest.raises(OutOfSpaceError, match="no space left") as caught:
        _build_store(store_dir, tiny_teacher)
    assert caught.value.needed_bytes > 0 and str(store_dir) in caught.value.path
    assert f"{caught.value.needed_bytes:,} bytes needed" in str(caught.value)
    assert finished_looking(store_dir) == []
    assert sorted(os.listdir(store_dir)) == ["shard-00000-of-00003.json", "shard-00000-of-00003.tfrecord"]

    monkeypatch.setattr(tf.io, "TFRecordWriter", _REAL_WRITER)  # space freed: the rerun finishes the store
    _build_store(store_dir, tiny_teacher)
    assert records.Store(str(store_dir)).manifest["shards"] == records.Store(str(clean_store)).manifest["shards"]


def test_full_disk_while_saving_the_student_leaves_a_resumable_run(tmp_path, teacher_path, monkeypatch):
    workdir = tmp_path / "run"

    def disk_full(self, logs=None):
        raise OSError(errno.ENOSPC, "No space left on device", self.path)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.SaveStudentAtEnd, "on_train_end", disk_full)
        with pytest.raises(OutOfSpaceError, match=pipeline.STUDENT) as caught:
            pipeline.run_distillation(_config(teacher_path, method="student"), str(workdir), progress=False)
    assert caught.value.path.endswith(pipeline.STUDENT) and caught.value.needed_bytes > 0
    assert finished_looking(workdir) == []
    assert holds_files(workdir / pipeline.BACKUP)  # every epoch is kept

    results = pipeline.run_distillation(_config(teacher_path, method="student"), str(workdir), progress=False)
    assert results["epochs_logged"] == EPOCHS and os.path.isfile(workdir / pipeline.STUDENT)


def test_disk_full_is_recognised_in_every_wording():
    assert guards.is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert guards.is_out_of_space(tf.errors.ResourceExhaustedError(None, None, "No space left on device"))
    assert not guards.is_out_of_space(OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(PermissionError):  # other failures pass through unchanged
        with guards.disk_full_as_error("/tmp", 10):
            raise PermissionError(errno.EACCES, "Permission denied")


# --------------------------------------------------------------------------- NaN

@pytest.mark.parametrize("field", [field.name for field in pipeline.dataclasses.fields(pipeline.DistillConfig)
                                   if field.type is float])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_setting_must_be_finite(field, value):
    with pytest.raises(InvalidArgumentError, match=f"{field} must be a finite number"):
        pipeline.DistillConfig(**{field: value}).validate()


@pytest.mark.slow
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_learning_rate_flag_exits_2_and_writes_nothing(tmp_path, teacher_path, value):
    workdir = tmp_path / "run"
    completed = _script(tmp_path, "distill.py", f"--flagfile={ROOT}/flags/smoke.cfg", f"--teacher={teacher_path}",
                        f"--workdir={workdir}", f"--learning_rate={value}")
    assert "learning_rate must be a finite number" in error_line(completed, "InvalidArgumentError")
    assert not os.path.exists(workdir)


def test_diverged_training_stops_with_a_named_error_and_leaves_no_student(tmp_path, teacher_path):
    workdir = tmp_path / "run"
    diverging = _config(teacher_path, method="student", optimizer="sgd", learning_rate=1e12)
    with pytest.raises(DivergedError, match=r"diverged at epoch 0 .*step \d of 3") as caught:
        pipeline.run_distillation(diverging, str(workdir), progress=False)
    assert caught.value.epoch == 0 and 1 <= caught.value.step <= 3 and "new --workdir" in str(caught.value)
    assert finished_looking(workdir) == []
    failed = json.loads((workdir / pipeline.FAILED).read_text())
    assert failed["epoch"] == 0 and failed["step"] == caught.value.step and failed["error"] == "DivergedError"
    assert read_epoch_log(str(workdir / pipeline.HISTORY)) == {}  # the diverged epoch was not logged

    # A rerun into the same workdir, with the same or a lower rate, says what to do.
    for rerun in (diverging, _config(teacher_path, method="student", optimizer="sgd", learning_rate=1e-2)):
        with pytest.raises(DivergedError, match="new --workdir with a lower --learning_rate"):
            pipeline.run_distillation(rerun, str(workdir), progress=False)
    assert finished_looking(workdir) == []

    results = pipeline.run_distillation(_config(teacher_path, method="student", optimizer="sgd",
                                                learning_rate=1e-2), str(tmp_path / "fresh"), progress=False)
    assert math.isfinite(results["history"]["loss"][-1])


@pytest.mark.slow
def test_diverged_distill_script_exits_2(tmp_path, teacher_path):
    workdir = tmp_path / "run"
    completed = _script(tmp_path, "distill.py", f"--flagfile={ROOT}/flags/smoke.cfg", f"--teacher={teacher_path}",
                        f"--workdir={workdir}", f"--store_dir={tmp_path / 'store'}", "--optimizer=sgd",
                        "--learning_rate=1e12", "--export_modes=fp32")
    assert "diverged at epoch" in error_line(completed, "DivergedError")
    assert finished_looking(workdir) == [] and os.path.isfile(workdir / pipeline.FAILED)


def test_a_model_with_nan_weights_is_not_exported(tmp_path):
    model = models.build_student(keep_blocks=1, num_classes=3)
    kernel = model.layers[-1].kernel
    kernel.assign(tf.fill(kernel.shape, float("nan")))
    with pytest.raises(NonFiniteWeightsError, match="non-finite weights"):
        export.convert(model, str(tmp_path / "nan.tflite"), "fp32")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- flipped bytes in a .tflite

BIAS = np.array([1.25, -2.5, 3.75], np.float32)  # distinctive bytes to find in the flatbuffer
RUNNER = os.path.join(ROOT, "scripts", "deploy", "run_tflite.py")


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tflite")
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    model.layers[-1].bias.assign(BIAS)
    path = folder / "model.tflite"
    export.convert(model, str(path), "fp32", labels=["a", "b", "c"])
    from PIL import Image
    Image.new("RGB", (8, 8), (10, 200, 30)).save(folder / "image.png")
    return model, path


def _copy_with(tiny_tflite, tmp_path, edit):
    """A copy of the model and its sidecar, with the .tflite bytes passed through ``edit``."""
    _, path = tiny_tflite
    payload = path.read_bytes()
    edited = edit(payload)
    assert edited != payload
    copy = tmp_path / "model.tflite"
    copy.write_bytes(edited)
    shutil.copy(export.sidecar_path(str(path)), export.sidecar_path(str(copy)))
    return copy


def _nan_bias(payload):
    assert payload.count(BIAS.tobytes()) == 1
    return payload.replace(BIAS.tobytes(), np.array([np.nan, -2.5, 3.75], np.float32).tobytes())


def _flip_a_bias_bit(payload):
    start = payload.index(BIAS.tobytes())
    return payload[:start] + bytes([payload[start] ^ 0x01]) + payload[start + 1:]


def _run_tflite(model, *args):
    return subprocess.run([sys.executable, RUNNER, str(model), *[str(arg) for arg in args]], capture_output=True,
                          text=True, timeout=300)


def test_flipped_bytes_in_a_tflite_are_refused(tiny_tflite, tmp_path):
    flipped = _copy_with(tiny_tflite, tmp_path, _flip_a_bias_bit)
    image = tiny_tflite[1].parent / "image.png"
    with pytest.raises(TFLiteChecksumError, match="sha256"):
        export.TFLiteModel(str(flipped))
    with pytest.raises(TFLiteChecksumError):
        export.load_sidecar(str(flipped))
    assert "--no_verify" in error_line(_run_tflite(flipped, image), "TFLiteChecksumError")
    # Edited on purpose: --no_verify (verify=False) runs it.
    assert _run_tflite(flipped, image, "--no_verify").returncode == 0
    assert export.TFLiteModel(str(flipped), verify=False).predict(np.zeros((1, 8, 8, 3))).shape == (1, 3)


def test_nan_outputs_are_an_error_not_a_label(tiny_tflite, tmp_path):
    broken = _copy_with(tiny_tflite, tmp_path, _nan_bias)
    image = tiny_tflite[1].parent / "image.png"
    error_line(_run_tflite(broken, image), "TFLiteChecksumError")
    completed = _run_tflite(broken, image, "--no_verify")
    assert "NaN or Inf" in error_line(completed, "NonFiniteOutputError") and completed.stdout == ""
    with pytest.raises(NonFiniteOutputError):
        export.TFLiteModel(str(broken), verify=False).predict(np.zeros((2, 8, 8, 3)))

    # The export check fails on NaN logits instead of reporting an agreement of 1.0.
    model, _ = tiny_tflite
    os.replace(broken, tmp_path / "nan.tflite")  # without its sidecar: nothing to verify
    with pytest.raises(NonFiniteOutputError):
        export.check_export(model, str(tmp_path / "nan.tflite"), np.zeros((2, 8, 8, 3)), [0, 1])


# --------------------------------------------------------------------------- the store

def test_a_corrupt_shard_sidecar_is_redone_on_resume(tmp_path, tiny_teacher, clean_store):
    store_dir = shutil.copytree(clean_store, tmp_path / "store")
    os.remove(store_dir / records.MANIFEST)  # as after a kill before the manifest
    sidecar = store_dir / "shard-00001-of-00003.json"
    sidecar.write_text(sidecar.read_text()[:40])  # cut off mid-write
    with pytest.raises(records.CorruptShardError, match="rerun the precompute"):
        records.finalize_store(str(store_dir))
    assert finished_looking(store_dir) == []

    _build_store(store_dir, tiny_teacher)  # not blocked: the shard is redone and its sidecar rewritten
    assert json.loads(sidecar.read_text())["shard"] == 1
    assert records.Store(str(store_dir)).manifest == records.Store(str(clean_store)).manifest


@pytest.mark.slow
def test_merging_a_store_with_a_corrupt_sidecar_exits_2(tmp_path, clean_store):
    store_dir = shutil.copytree(clean_store, tmp_path / "store")
    os.remove(store_dir / records.MANIFEST)
    (store_dir / "shard-00000-of-00003.json").write_text("{not json")
    completed = _script(tmp_path, "precompute_ig.py", "--merge", f"--output_dir={store_dir}")
    assert "shard-00000-of-00003.json" in error_line(completed, "CorruptShardError")
    assert not os.path.exists(store_dir / records.MANIFEST)


def test_orphan_temporary_shards_are_removed_on_rerun(tmp_path, tiny_teacher, clean_store):
    store_dir = shutil.copytree(clean_store, tmp_path / "store")
    os.remove(store_dir / records.MANIFEST)
    orphans = [store_dir / ".tmp-k2j4h1.tfrecord", store_dir / ".tmp-shard-00002-of-00003-x1y2.tfrecord"]
    for orphan in orphans:
        orphan.write_bytes(b"half a shard")
    _build_store(store_dir, tiny_teacher)
    assert not any(orphan.exists() for orphan in orphans)
    assert records.Store(str(store_dir)).manifest == records.Store(str(clean_store)).manifest


def test_a_second_writer_of_a_store_is_refused(tmp_path, tiny_teacher):
    store_dir = tmp_path / "store"
    with locks.DirLock(str(store_dir), name=records.store_lock_name()):
        with pytest.raises(WorkdirBusyError, match="store"):
            _build_store(store_dir, tiny_teacher)
        # Workers of a split store lock their own shards only.
        _build_store(store_dir, tiny_teacher, shard_index=1, num_workers=2)
    assert sorted(name for name in os.listdir(store_dir) if name.endswith(".tfrecord")) == [
        "shard-00001-of-00003.tfrecord"]


@pytest.mark.parametrize("field, value", [("image_shape", [16, 16, 3]), ("num_classes", 5), ("num_examples", 11),
                                          ("examples_per_shard", 4), ("map_encoding", "uint8")])
def test_an_edited_manifest_is_refused(tmp_path, clean_store, field, value):
    store_dir = shutil.copytree(clean_store, tmp_path / "store")
    manifest = json.loads((store_dir / records.MANIFEST).read_text())
    manifest[field] = value
    (store_dir / records.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(records.StoreMismatchError, match=records.MANIFEST):
        records.Store(str(store_dir))


def test_a_store_of_other_data_is_refused_before_training(tmp_path, teacher_path):
    config = _config(teacher_path, method="kd", store_dir=str(tmp_path / "store"))
    pipeline.run_distillation(config, str(tmp_path / "first"), progress=False)
    store = records.Store(pipeline.logits_store_dir(str(tmp_path / "store")))
    with pytest.raises(records.StoreMismatchError, match="10-class logits"):
        store.check_fits(5, (32, 32, 3))
    with pytest.raises(records.StoreMismatchError, match=r"\(32, 32, 3\) images"):
        store.check_fits(10, (16, 16, 3))

    manifest_path = os.path.join(store.store_dir, records.MANIFEST)
    manifest = json.loads(open(manifest_path).read())
    manifest["image_shape"] = [16, 16, 3]
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle)
    workdir = tmp_path / "second"
    with pytest.raises(records.StoreMismatchError, match="image"):
        pipeline.run_distillation(_config(teacher_path, method="kd", store_dir=str(tmp_path / "store"), seed=1),
                                  str(workdir), progress=False)
    assert finished_looking(workdir) == [] and not os.path.exists(workdir / pipeline.HISTORY)


# --------------------------------------------------------------------------- run files and the teacher

def test_a_damaged_epoch_log_is_repaired_or_refused_by_name(tmp_path, teacher_path):
    log = tmp_path / "history.csv"
    log.write_text("epoch,loss\n0,1.5\nepoch,loss\n1,1.2\n")  # two writers each wrote a header
    assert read_epoch_log(str(log)) == {"epoch": [0.0, 1.0], "loss": [1.5, 1.2]}
    log.write_text("epoch,loss\n0,1.5\n1,1.2,extra\n")
    with pytest.raises(CorruptRunFileError, match="line 3"):
        read_epoch_log(str(log))

    # In a run, before any training is spent on it.
    workdir = tmp_path / "run"
    config = _config(teacher_path, method="student")

    class Stop(Exception):
        pass

    class StopAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise Stop()

    with pytest.raises(Stop):
        pipeline.run_distillation(config, str(workdir), progress=False, extra_callbacks=[StopAfterFirstEpoch()])
    with open(workdir / pipeline.HISTORY, "a") as handle:
        handle.write("epoch,garbage\nnot,a,row\n")
    with pytest.raises(CorruptRunFileError, match=pipeline.HISTORY):
        pipeline.run_distillation(config, str(workdir), progress=False)
    assert finished_looking(workdir) == []


def test_a_changed_teacher_is_refused_when_its_sha256_is_given(tmp_path, teacher_path):
    wrong = "0" * 64
    with pytest.raises(ChecksumMismatchError, match="teacher_sha256"):
        pipeline.run_distillation(_config(teacher_path, method="kd", teacher_sha256=wrong), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    with pytest.raises(InvalidArgumentError, match="64 hex digits"):
        _config(teacher_path, teacher_sha256="df67").validate()
    # The right hash is no training setting: giving it later does not make a run stale.
    assert "teacher_sha256" in pipeline.NON_TRAINING_FIELDS
    settings = pipeline.training_settings(_config(teacher_path, teacher_sha256=sha256_file(teacher_path)), "w")
    assert settings == pipeline.training_settings(_config(teacher_path), "w")


def test_shipped_flagfiles_pin_the_committed_teacher():
    """Every flagfile that distils from pretrained/teacher.h5 gives its sha256, and the file has it."""
    pinned = []
    for name in sorted(os.listdir(os.path.join(ROOT, "flags"))):
        if not name.endswith(".cfg"):
            continue
        with open(os.path.join(ROOT, "flags", name)) as handle:
            lines = dict(line.strip().lstrip("-").partition("=")[::2] for line in handle if line.startswith("--"))
        if lines.get("teacher") == "pretrained/teacher.h5":
            assert lines.get("teacher_sha256") == sha256_file(os.path.join(ROOT, "pretrained", "teacher.h5")), name
            pinned.append(name)
    assert len(pinned) >= 2


# --------------------------------------------------------------------------- command lines

@pytest.mark.slow
@pytest.mark.parametrize("script", ["distill.py", "precompute_ig.py", "evaluate.py"])
def test_unknown_flags_and_missing_flagfiles_exit_2(tmp_path, script):
    workdir = [f"--workdir={tmp_path / 'run'}"] if script == "distill.py" else []
    unknown = _script(tmp_path, script, "--no_such_flag=1", *workdir)
    assert "no_such_flag" in error_line(unknown, "FlagError")
    missing = _script(tmp_path, script, f"--flagfile={tmp_path / 'absent.cfg'}", *workdir)
    assert "absent.cfg" in error_line(missing, "FlagError")
    assert not os.path.exists(tmp_path / "run")


def test_stale_settings_are_still_refused(tmp_path, teacher_path):
    """The lock and the failure record leave the other refusals as they were."""
    workdir = tmp_path / "run"
    pipeline.run_distillation(_config(teacher_path, method="student", epochs=1), str(workdir), progress=False)
    with pytest.raises(StaleRunError):
        pipeline.run_distillation(_config(teacher_path, method="student", epochs=1, seed=3), str(workdir),
                                  progress=False)
    assert not os.path.exists(workdir / locks.LOCK_FILE)
