"""Bring your own teacher, student and data: a ResNet-style teacher and a student given as
.keras files, 64x64 images of 5 classes from tfds or from an image folder, through
scripts/distill.py, and the exported .tflite classified by the deploy runner."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tf_keras as keras
from PIL import Image

import tiny_tfds
from kdig_tf import models, pipeline, records
from kdig_tf.errors import ShapeMismatchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISTILL = os.path.join(ROOT, "scripts", "distill.py")
RUNNER = os.path.join(ROOT, "scripts", "deploy", "run_tflite.py")
SIZE, CLASSES = 64, 5


def small_resnet():
    """Not a MobileNetV2: a residual CNN that scales its own pixels."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = keras.layers.Conv2D(8, 3, padding="same")(y)
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(x), name="small_resnet")


def small_student():
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(x), name="small_student")


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)
    paths = {"teacher": str(folder / "resnet.keras"), "student": str(folder / "student.keras")}
    small_resnet().save(paths["teacher"])
    small_student().save(paths["student"])
    return paths


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowers")
    rng = np.random.default_rng(0)
    for label in range(CLASSES):
        (root / f"class_{label}").mkdir()
        for index in range(3):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{label}" / f"{index:03d}.png")
    return root


def _distill(workdir, dataset, model_files, *extra):
    args = [sys.executable, DISTILL, f"--teacher={model_files['teacher']}", f"--student={model_files['student']}",
            f"--dataset={dataset}", "--train_split=train", "--val_split=train", "--method=kd_ig", "--ig_steps=2",
            "--epochs=1", "--batch_size=4", "--examples_per_shard=5", "--export_modes=fp32,int8", "--verbose=0",
            f"--workdir={workdir}", f"--store_dir={workdir}_store", *extra]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT)


def _classify(tflite, image):
    result = subprocess.run([sys.executable, RUNNER, str(tflite), str(image), "--json", "--top_k", "2"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)["results"][0]


def _check_run(workdir, labels):
    results = json.loads((workdir / "results.json").read_text())
    assert results["image_shape"] == [SIZE, SIZE, 3] and results["student_model"] == "small_student"
    teacher_params = keras.models.load_model(results["flags"]["teacher"]).count_params()
    assert results["teacher_params"] == teacher_params  # the real teacher, not the CIFAR MobileNetV2
    assert results["compression"] == pytest.approx(teacher_params / results["trainable_params"])
    assert results["store"]["ig"]["steps"] == 2
    for mode in ("fp32", "int8"):
        entry = results["tflite"][mode]
        assert entry["num_images"] > 0 and 0 <= entry["val_accuracy"] <= 100
    sidecar = json.loads((workdir / "student_int8.json").read_text())
    assert sidecar["input"]["input_kind"] == "pixels" and sidecar["labels"] == labels
    return results


def test_own_teacher_and_student_on_a_64px_5_class_tfds_dataset(tmp_path, model_files):
    name = tiny_tfds.prepare(tmp_path / "tfds", num_examples=10, builder=tiny_tfds.KdigTinyImages64)
    workdir = tmp_path / "run"
    result = _distill(workdir, name, model_files, f"--data_dir={tmp_path / 'tfds'}")
    assert result.returncode == 0, result.stderr[-3000:]
    _check_run(workdir, [str(label) for label in range(CLASSES)])
    image = tmp_path / "probe.png"
    Image.fromarray(np.full((SIZE, SIZE, 3), 128, np.uint8)).save(image)
    top = _classify(workdir / "student_int8.tflite", image)
    assert len(top["top_k"]) == 2 and {guess["label"] for guess in top["top_k"]} <= {str(label) for label in range(CLASSES)}


def test_own_models_on_an_image_folder_and_a_misaligned_store_is_refused(tmp_path, model_files, image_folder):
    workdir = tmp_path / "run"
    result = _distill(workdir, f"folder:{image_folder}", model_files)
    assert result.returncode == 0, result.stderr[-3000:]
    _check_run(workdir, [f"class_{label}" for label in range(CLASSES)])
    store = records.Store(f"{workdir}_store")
    assert sorted(id_.decode() for id_ in store.read_all()["id"]) == sorted(
        f"class_{label}/{index:03d}.png" for label in range(CLASSES) for index in range(3))
    top = _classify(workdir / "student_fp32.tflite", image_folder / "class_2" / "001.png")
    assert top["top_k"][0]["label"].startswith("class_")

    # The misalignment control: shards that hold other examples than their manifest says.
    shuffled = tmp_path / "run2_store"
    shutil.copytree(f"{workdir}_store", shuffled)
    first, second = sorted(str(path) for path in shuffled.glob("*.tfrecord"))[:2]
    os.replace(first, first + ".tmp")
    os.replace(second, first)
    os.replace(first + ".tmp", second)
    manifest = json.loads((shuffled / "manifest.json").read_text())
    for shard in manifest["shards"]:  # checksums follow the files, so only the ids can tell
        shard["sha256"] = records.sha256_file(str(shuffled / shard["file"]))
    (shuffled / "manifest.json").write_text(json.dumps(manifest))
    # The first record of each shard is read when the store opens: its index gives the swap away.
    with pytest.raises(records.StoreError, match=r"first record of shard-00000-of-\d+\.tfrecord holds \{'index': [1-9]"):
        records.Store(str(shuffled))
    refused = _distill(tmp_path / "run2", f"folder:{image_folder}", model_files)
    assert refused.returncode == 2 and "error: StoreMismatchError: " in refused.stderr
    assert "first record of shard-00000" in refused.stderr
    assert not (tmp_path / "run2" / "results.json").exists()


def test_student_spec_and_image_size_flow_through_the_run(tmp_path):
    # A built-in student spec on resized images: the student, the store and the results follow the data.
    teacher_path = str(tmp_path / "cifar_teacher.h5")
    models.build_teacher(width_multiplier=0.25).save(teacher_path)
    config = pipeline.DistillConfig(method="kd_ig", teacher=teacher_path, student="mobilenetv2:keep=2,width=0.5",
                                    image_size=40, train_split="train", val_split="train", epochs=1, batch_size=4,
                                    ig_steps=2, examples_per_shard=5, export_modes="fp32", verbose=0)
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(ShapeMismatchError, match="teacher takes"):
            # The CIFAR teacher takes 32x32 images: resized data is refused with a named error.
            pipeline.run_distillation(config, str(tmp_path / "refused"), progress=False)
        teacher = keras.Sequential([keras.Input((40, 40, 3)), keras.layers.Rescaling(1 / 255.0),
                                    keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(),
                                    keras.layers.Dense(10)])
        teacher.save(str(tmp_path / "teacher40.keras"))
        results = pipeline.run_distillation(dataclasses.replace(config, teacher=str(tmp_path / "teacher40.keras")),
                                            str(tmp_path / "run"), progress=False)
    assert results["image_shape"] == [40, 40, 3]
    assert results["store"]["ig"]["steps"] == 2
    manifest = json.loads(open(os.path.join(results["store"]["dir"], "manifest.json")).read())
    assert manifest["image_size"] == [40, 40] and manifest["image_shape"] == [40, 40, 3]
    student = keras.models.load_model(results["student_path"], compile=False)
    assert student.input_shape == (None, 40, 40, 3)
    assert results["trainable_params"] == models.count_trainable_params(student)
    assert results["tflite"]["fp32"]["max_abs_logit_diff"] < 1e-4
