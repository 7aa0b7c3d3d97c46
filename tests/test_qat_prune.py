"""QAT and pruning after distillation: scripts/distill.py on mock CIFAR-10, in subprocesses."""
import kdig_tf  # noqa: F401

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tf_keras as keras
from PIL import Image

from kdig_tf import cli, data, export, loading, models, pipeline
from kdig_tf.errors import InvalidArgumentError, StaleRunError
from test_distill_script import MOCK_RUNNER, ROOT

DEPLOY_RUNNER = os.path.join(ROOT, "scripts", "deploy", "run_tflite.py")
STAGE_FLAGS = ("--qat_epochs=1", "--prune_sparsity=0.5", "--prune_epochs=1")
NEW_FIELDS = ("qat_epochs", "qat_learning_rate", "prune_sparsity", "prune_epochs", "prune_learning_rate")


def _command(folder, *flags):
    runner = folder / "mock_distill.py"
    runner.write_text(MOCK_RUNNER.format(root=ROOT))
    return [sys.executable, str(runner), f"--flagfile={ROOT}/flags/smoke.cfg", *flags]


def _distill(folder, *flags):
    return subprocess.run(_command(folder, *flags), capture_output=True, text=True, cwd=ROOT)


def _stamps(folder):
    return {name: os.stat(folder / name).st_mtime_ns for name in os.listdir(folder) if name != "backup"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.h5")
    models.build_teacher(num_classes=10, width_multiplier=0.25).save(path)
    return path


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, teacher):
    """One run with both stages: (folder, workdir, results)."""
    folder = tmp_path_factory.mktemp("compressed")
    workdir = folder / "run"
    result = _distill(folder, f"--teacher={teacher}", f"--workdir={workdir}", f"--store_dir={folder / 'store'}",
                      *STAGE_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, workdir, json.loads((workdir / "results.json").read_text())


@pytest.fixture(scope="module")
def validation():
    """The smoke run's validation split (mock train, 12 images), preprocessed."""
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        raw, _ = data.load("cifar10", "train")
        arrays = pipeline.validation_arrays(raw, "train", models.UNIT_INPUT)
    return arrays["images"], arrays["labels"]


def _classify_on_device(path, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    completed = subprocess.run([sys.executable, DEPLOY_RUNNER, str(path), str(image), "--json"],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    guess = json.loads(completed.stdout)["results"][0]["top_k"][0]
    assert guess["label"] in [str(index) for index in range(10)] and 0.0 <= guess["probability"] <= 1.0


def _check_scored(workdir, results, name, file_name, validation):
    path = str(workdir / file_name)
    sidecar = export.load_sidecar(path)  # the added fields keep the recorded tflite_sha256 valid
    assert sidecar["file_bytes"] == os.path.getsize(path)
    assert sidecar["val_split"] == "train" and sidecar["num_val"] == 12
    # Scored with LiteRT on the whole split, in percent.
    images, labels = validation
    assert sidecar["val_accuracy"] == pytest.approx(export.evaluate_tflite(path, images, labels))
    entry = results["tflite"][name]
    assert entry["path"] == path
    assert {key: entry[key] for key in pipeline.SCORE_FIELDS} == {key: sidecar[key] for key in pipeline.SCORE_FIELDS}
    return sidecar, entry


def test_qat_student_is_exported_as_int8_scored_and_runs_on_the_device_runner(compressed, validation, tmp_path):
    _, workdir, results = compressed
    sidecar, entry = _check_scored(workdir, results, "qat_int8", "student_qat_int8.tflite", validation)
    assert sidecar["conversion"]["mode"] == "int8" and sidecar["conversion"]["quantization_aware"]
    assert sidecar["conversion"]["num_representative"] == 0  # QAT needs no calibration data
    assert "int8" in entry["reduced_precision_dtypes"]
    assert results["qat"]["epochs"] == 1 and results["qat"]["learning_rate"] == pytest.approx(1e-4)
    assert results["qat"]["seed"] == pipeline.stage_seed(0, "qat") != pipeline.stage_seed(0, "prune")
    _check_scored(workdir, results, "fp32", "student_fp32.tflite", validation)  # the plain export too
    _classify_on_device(workdir / "student_qat_int8.tflite", tmp_path)


def test_pruned_student_reaches_its_sparsity_and_runs_on_the_device_runner(compressed, validation, tmp_path):
    _, workdir, results = compressed
    pruned = loading.load_model(str(workdir / "student_pruned.h5"))
    measured = export.sparsity(pruned)
    assert measured == pytest.approx(0.5, abs=0.02)
    assert results["pruning"]["sparsity"] == pytest.approx(measured)
    assert results["pruning"]["target_sparsity"] == 0.5
    sidecar, entry = _check_scored(workdir, results, "pruned_fp32", "student_pruned_fp32.tflite", validation)
    assert sidecar["pruning"]["sparsity"] == pytest.approx(measured)
    assert entry["max_abs_logit_diff"] <= 1e-4  # an fp32 export of the pruned Keras model
    assert export.sparsity(loading.load_model(str(workdir / "student.h5"))) < 0.01  # the main student is untouched
    _classify_on_device(workdir / "student_pruned_fp32.tflite", tmp_path)


def test_the_stages_leave_the_main_student_as_a_plain_run_trains_it(compressed, tmp_path):
    _, workdir, results = compressed
    flags = dict(results["flags"], **{field: pipeline.FIELDS_ADDED_LATER[field] for field in NEW_FIELDS})
    flags["export_modes"] = ""  # not a training setting: the same student, sooner
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        plain = pipeline.run_distillation(pipeline.DistillConfig(**flags), str(tmp_path / "plain"), progress=False)
    assert "qat" not in plain and "pruning" not in plain and plain["tflite"] == {}
    expected = keras.models.load_model(str(workdir / "student.h5"), compile=False).get_weights()
    found = keras.models.load_model(str(tmp_path / "plain" / "student.h5"), compile=False).get_weights()
    for before, after in zip(expected, found):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("overrides", [dict(prune_sparsity=1.0), dict(prune_sparsity=-0.1), dict(qat_epochs=-1),
                                       dict(prune_epochs=-1), dict(prune_sparsity=0.5, prune_epochs=0),
                                       dict(qat_learning_rate=0.0), dict(prune_sparsity=float("nan"))])
def test_bad_stage_settings_are_invalid(overrides):
    with pytest.raises(InvalidArgumentError):
        pipeline.DistillConfig(**overrides).validate()


def test_bad_stage_flag_exits_2_and_writes_nothing(tmp_path, teacher):
    workdir = tmp_path / "run"
    result = _distill(tmp_path, f"--teacher={teacher}", f"--workdir={workdir}", "--prune_sparsity=1.0")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: InvalidArgumentError: prune_sparsity")
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("flag", ["--prune_sparsity=-0.1", "--qat_epochs=-1"])
def test_more_bad_stage_flags_exit_2_and_write_nothing(tmp_path, capsys, flag):
    """The script's own flags and error path, in-process (a subprocess each would mostly import TensorFlow)."""
    config, _ = cli.distill_config([f"--flagfile={ROOT}/flags/smoke.cfg", flag])
    with pytest.raises(SystemExit) as exited:
        cli.run(pipeline.run_distillation, config, str(tmp_path / "run"))
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: InvalidArgumentError:")
    assert not os.path.exists(tmp_path / "run")


def test_qat_of_a_layer_tfmot_cannot_wrap_is_a_named_error_before_writing(tmp_path, capsys):
    inputs = keras.Input((32, 32, 3))
    features = keras.layers.LayerNormalization()(keras.layers.Conv2D(4, 3)(inputs))
    student = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(features)))
    student.save(str(tmp_path / "student.keras"))
    config = pipeline.DistillConfig(method="student", student=str(tmp_path / "student.keras"), qat_epochs=1,
                                    train_split="train", val_split="train", epochs=1, batch_size=4, export_modes="")
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(SystemExit) as exited:
            cli.run(pipeline.run_distillation, config, str(tmp_path / "run"))
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: UnsupportedLayerError:")
    assert not os.path.exists(tmp_path / "run")


def test_runs_recorded_before_the_stage_settings_existed_are_neither_stale_nor_rerun(tmp_path):
    config = pipeline.DistillConfig()
    settings = pipeline.training_settings(config, "teacher-hash")
    workdir = str(tmp_path)
    old = {key: value for key, value in settings.items() if key not in NEW_FIELDS}
    with open(os.path.join(workdir, pipeline.RUN_CONFIG), "w") as handle:
        json.dump(old, handle)
    pipeline.claim_workdir(workdir, settings)  # not stale
    flags = {key: value for key, value in dataclasses.asdict(config).items() if key not in NEW_FIELDS}
    with open(os.path.join(workdir, pipeline.RESULTS), "w") as handle:
        json.dump({"flags": flags}, handle)
    assert pipeline._finished_results(workdir, config) == {"flags": flags}  # finished, not rerun
    with pytest.raises(StaleRunError, match="qat_epochs: 0 -> 2"):
        pipeline.claim_workdir(workdir, pipeline.training_settings(pipeline.DistillConfig(qat_epochs=2),
                                                                   "teacher-hash"))


def test_finished_stages_are_not_recomputed(compressed):
    _, workdir, results = compressed
    before = _stamps(workdir)
    config = pipeline.DistillConfig(**results["flags"])  # what distill.py made of the same flags
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        assert pipeline.run_distillation(config, str(workdir), progress=False) == results
    assert _stamps(workdir) == before  # the finished run is returned as it is

    # A kill while exporting the pruned model: results.json not written yet, and the pruned
    # export left without its scores. The QAT stage is kept; pruning is only re-exported.
    os.remove(workdir / "results.json")
    sidecar_path = workdir / "student_pruned_fp32.json"
    sidecar = json.loads(sidecar_path.read_text())
    del sidecar["val_accuracy"]
    sidecar_path.write_text(json.dumps(sidecar))
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        resumed = pipeline.run_distillation(config, str(workdir), progress=False)
    after = _stamps(workdir)
    for name in ("student.h5", "student_qat.weights.h5", "student_qat_int8.tflite", "student_qat_int8.json",
                 "student_pruned.h5"):
        assert after[name] == before[name], name
    assert after["student_pruned_fp32.json"] != before["student_pruned_fp32.json"]
    assert resumed["tflite"]["qat_int8"] == results["tflite"]["qat_int8"]
    assert resumed["pruning"] == results["pruning"]
    assert resumed["tflite"]["pruned_fp32"]["val_accuracy"] == results["tflite"]["pruned_fp32"]["val_accuracy"]
