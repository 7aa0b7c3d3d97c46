"""Training under tf.distribute (issue 44.2): MirroredStrategy over 2 logical CPUs matches one device,
and two local processes train one run under MultiWorkerMirroredStrategy, the chief alone writing it
(each in subprocesses: logical devices and collective ops are configured once per process). Also a
mixed-precision run (issue 44.3) and the resumption of runs recorded before these settings existed.
"""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tf_keras as keras

from kdig_tf import distribute, models, pipeline
from kdig_tf.errors import StaleRunError, UnknownKeyError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("student", "kd", "kd_ig", "kd_online")

MIRRORED = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    import tensorflow_datasets as tfds
    import tf_keras as keras
    from kdig_tf import distribute, models, pipeline

    out, methods = sys.argv[1], sys.argv[2].split(",")
    keras.utils.set_random_seed(0)
    teacher_path, student_path = os.path.join(out, "teacher.h5"), os.path.join(out, "student_arch.h5")
    models.build_teacher(width_multiplier=0.25).save(teacher_path)
    # No BatchNormalization in the student: per-replica batch statistics differ from one device's by design.
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(10)(x), name="no_bn_student").save(student_path)

    class FirstStepLoss(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.replicas = self.model.distribute_strategy.num_replicas_in_sync

        def on_train_batch_end(self, batch, logs=None):
            if not hasattr(self, "loss"):
                self.loss = float(logs["loss"])

    report = {"replicas": distribute.make_strategy("mirrored").num_replicas_in_sync}
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        for method in methods:
            for distribution in ("default", "mirrored"):
                config = pipeline.DistillConfig(
                    method=method, teacher=teacher_path, student=student_path, keep_blocks=14, train_split="train",
                    val_split="train", epochs=2, batch_size=5, optimizer="sgd", learning_rate=0.5, alpha=0.5,
                    ig_steps=2, examples_per_shard=6, export_modes="", verbose=0, seed=1, p=0.5,
                    store_dir=os.path.join(out, "store"), distribution=distribution)
                first = FirstStepLoss()
                workdir = os.path.join(out, method + "_" + distribution)
                results = pipeline.run_distillation(config, workdir, progress=False, extra_callbacks=[first])
                model = keras.models.load_model(os.path.join(workdir, "student.h5"), compile=False)
                report[method + "/" + distribution] = {
                    "replicas": first.replicas, "first_loss": first.loss, "history_loss": results["history"]["loss"],
                    "weights": [w.tolist() for w in model.get_weights()]}
    with open(os.path.join(out, "report.json"), "w") as handle:
        json.dump(report, handle)
""")


@pytest.mark.slow
def test_mirrored_over_two_cpus_matches_one_device(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TFDS_DATA_DIR", None)
    result = subprocess.run([sys.executable, "-c", MIRRORED, str(tmp_path), ",".join(METHODS)], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["replicas"] == 2
    for method in METHODS:
        single, mirrored = report[f"{method}/default"], report[f"{method}/mirrored"]
        assert (single["replicas"], mirrored["replicas"]) == (1, 2), method  # trained under each strategy
        # Batches of 5 split 3 + 2 and the last (2 examples) 1 + 1: the loss is the global batch's mean anyway.
        assert mirrored["first_loss"] == pytest.approx(single["first_loss"], rel=1e-5), method
        np.testing.assert_allclose(mirrored["history_loss"], single["history_loss"], rtol=1e-4, err_msg=method)
        assert len(mirrored["weights"]) == len(single["weights"]) == 4
        for a, b in zip(mirrored["weights"], single["weights"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=method)


WORKER = textwrap.dedent("""
    import os, runpy, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow_datasets as tfds
    sys.argv = ["distill.py"] + sys.argv[1:]
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        runpy.run_path(os.path.join({root!r}, "scripts", "distill.py"), run_name="__main__")
""")


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.slow
def test_two_workers_train_the_smoke_run_and_only_the_chief_writes(tmp_path):
    teacher = tmp_path / "teacher.h5"
    prepare = ("import os; os.environ['TF_USE_LEGACY_KERAS'] = '1'; import tf_keras as keras; "
               "from kdig_tf import models; keras.utils.set_random_seed(0); "
               f"models.build_teacher(width_multiplier=0.25).save({str(teacher)!r})")
    subprocess.run([sys.executable, "-c", prepare], check=True, cwd=ROOT, timeout=600)
    runner = tmp_path / "worker.py"
    runner.write_text(WORKER.format(root=ROOT))
    workdir = tmp_path / "run"
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    processes = []
    for index in range(2):
        scratch = tmp_path / f"tmp{index}"
        scratch.mkdir()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(scratch),
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        env.pop("TFDS_DATA_DIR", None)
        processes.append(subprocess.Popen(
            [sys.executable, str(runner), f"--flagfile={ROOT}/flags/smoke.cfg", f"--teacher={teacher}",
             f"--workdir={workdir}", "--distribution=multi_worker", "--epochs=2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env))
    outputs = [process.communicate(timeout=1800) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-4000:]
    assert all("val_accuracy=" in stdout for stdout, _ in outputs)

    results = json.loads((workdir / "results.json").read_text())
    assert results["flags"]["distribution"] == "multi_worker" and results["epochs_logged"] == 2
    assert results["student_path"] == str(workdir / "student.h5")
    # One writer: one machines.json entry, one history row per epoch, no worker leftovers anywhere.
    assert len(json.loads((workdir / "machines.json").read_text())) == 1
    rows = (workdir / "history.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2
    leftovers = [os.path.join(folder, name) for folder, _, names in os.walk(workdir / "backup") for name in names]
    assert leftovers == []  # every worker's checkpoint is removed at the end of training
    # The other worker's outputs went to a temporary directory, removed at its end (tfds's mock leaves its own).
    assert [name for index in range(2) for name in os.listdir(tmp_path / f"tmp{index}")
            if name.startswith("kdig_worker_")] == []
    assert (workdir / "student_fp32.tflite").exists() and (workdir / "store" / "manifest.json").exists()


def test_unknown_strategy_and_precision_are_named():
    with pytest.raises(UnknownKeyError):
        distribute.make_strategy("parameter_server")
    with pytest.raises(UnknownKeyError):
        distribute.check_precision("float16")
    assert distribute.is_chief(distribute.make_strategy("default"))


NEW_FIELDS = ("kd_loss", "kd_weight", "dkd_alpha", "dkd_beta", "mix", "mix_alpha", "distribution", "precision")


def test_runs_recorded_before_the_new_fields_resume(tmp_path):
    config = pipeline.DistillConfig()
    settings = pipeline.training_settings(config, "abc")
    old = {key: value for key, value in settings.items() if key not in NEW_FIELDS}
    (tmp_path / pipeline.RUN_CONFIG).write_text(json.dumps(old))
    pipeline.claim_workdir(str(tmp_path), settings)  # the defaults are what those runs did
    with pytest.raises(StaleRunError, match="mix"):
        pipeline.claim_workdir(str(tmp_path), pipeline.training_settings(
            dataclasses.replace(config, method="kd_online", mix="mixup"), "abc"))


def test_a_mixed_bfloat16_run_saves_a_float32_student(tmp_path, seeded_teacher_path):
    config = pipeline.DistillConfig(method="kd_online", teacher=seeded_teacher_path, train_split="train",
                                    val_split="train",
                                    epochs=1, batch_size=4, keep_blocks=2, export_modes="fp32", verbose=0,
                                    precision="mixed_bfloat16")
    workdir = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        results = pipeline.run_distillation(config, str(workdir), progress=False)
    assert keras.mixed_precision.global_policy().name == "float32"
    assert np.all(np.isfinite(results["history"]["loss"])) and results["history"]["kd_loss"][0] > 0
    student = keras.models.load_model(str(workdir / "student.h5"), compile=False)
    assert {layer.dtype_policy.name for layer in student.submodules if isinstance(layer, keras.layers.Layer)} == \
        {"float32"}
    assert results["tflite"]["fp32"]["max_abs_logit_diff"] <= 1e-4
