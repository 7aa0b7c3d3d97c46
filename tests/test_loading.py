import numpy as np
import pytest

from kdig_tf import loading, models
from kdig_tf.errors import InvalidArgumentError, NotAModelError, ShapeMismatchError, WeightKeyError

IMAGES = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def student2():
    model = models.build_student(keep_blocks=2, num_classes=5)
    # non-default weights, so that a load that silently did nothing would be caught
    model.set_weights([w + np.float32(0.1) for w in model.get_weights()])
    return model


def _same_outputs(a, b):
    return np.allclose(a(IMAGES, training=False), b(IMAGES, training=False), atol=1e-6)


@pytest.mark.parametrize("name", ["model.h5", "model.keras"])
def test_full_keras_model(tmp_path, student2, name):
    path = str(tmp_path / name)
    student2.save(path)
    loaded = loading.load_model(path)
    assert _same_outputs(student2, loaded)
    assert loading.describe_model(loaded) == ("student", 2)
    assert loading.input_kind(loaded) == "unit"


@pytest.mark.parametrize("name", ["student.weights.h5", "legacy_weights.h5"])
def test_weights_only(tmp_path, student2, name):
    path = str(tmp_path / name)
    student2.save_weights(path)
    loaded = loading.load_model(path, keep_blocks=2, num_classes=5)
    assert _same_outputs(student2, loaded)
    inferred = loading.load_model(path, arch="student", keep_blocks=2, num_classes=None)
    assert inferred.output_shape == (None, 5)
    with pytest.raises(InvalidArgumentError, match="arch"):
        loading.load_model(path)
    with pytest.raises(InvalidArgumentError, match="keep_blocks"):
        loading.load_model(path, arch="student")


@pytest.mark.parametrize("name", ["deep.weights.h5", "deep_legacy.h5"])
@pytest.mark.parametrize("target", [
    {"keep_blocks": 3},  # the Keras-v3 loader alone would silently drop the extra block
    {"keep_blocks": 4, "width_multiplier": 0.5},
    {"keep_blocks": 4, "num_classes": 7},
    {"arch": "teacher"},
])
def test_weights_that_do_not_fit(tmp_path, name, target):
    path = str(tmp_path / name)
    models.build_student(keep_blocks=4).save_weights(path)
    with pytest.raises(ShapeMismatchError):
        loading.load_model(path, **target)


@pytest.mark.parametrize("name, payload", [
    ("empty.h5", b""), ("garbage.h5", b"not hdf5 at all"), ("garbage.keras", b"not a zip"),
    ("garbage.weights.h5", b"\x00\x01"), ("model.onnx", b"whatever"), ("model.tflite", b"TFL3"),
])
def test_not_a_model(tmp_path, name, payload):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(NotAModelError):
        loading.load_model(str(path), keep_blocks=2)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(NotAModelError, match="no such file"):
        loading.load_model(str(tmp_path / "absent.h5"))
    with pytest.raises(NotAModelError, match="directory"):
        loading.load_model(str(tmp_path))


def test_bad_arch_name(tmp_path, student2):
    path = str(tmp_path / "s.weights.h5")
    student2.save_weights(path)
    with pytest.raises(InvalidArgumentError, match="arch"):
        loading.load_model(path, arch="resnet")


def test_pytorch_state_dict(tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch (the optional 'torch' extra) is not installed")
    keras_student = models.build_student(keep_blocks=2)
    state = {}
    for layer in keras_student.layers:
        prefix = layer.name.replace("_", ".")
        weights = layer.get_weights()
        if type(layer).__name__ == "BatchNormalization":
            for suffix, value in zip(["weight", "bias", "running_mean", "running_var"], weights):
                state[f"{prefix}.{suffix}"] = torch.from_numpy(value)
        elif type(layer).__name__ == "DepthwiseConv2D":
            state[f"{prefix}.weight"] = torch.from_numpy(np.transpose(weights[0], (2, 3, 0, 1)).copy())
        elif type(layer).__name__ == "Conv2D":
            state[f"{prefix}.weight"] = torch.from_numpy(np.transpose(weights[0], (3, 2, 0, 1)).copy())
        elif type(layer).__name__ == "Dense":
            state[f"{prefix}.weight"] = torch.from_numpy(weights[0].T.copy())
            state[f"{prefix}.bias"] = torch.from_numpy(weights[1])
    path = str(tmp_path / "student.pt")
    torch.save(state, path)
    loaded = loading.load_model(path)
    assert _same_outputs(keras_student, loaded)
    assert loading.input_kind(loaded) == "unit"
    with pytest.raises(WeightKeyError, match="missing"):
        loading.load_model(path, keep_blocks=3)
    with pytest.raises(WeightKeyError, match="missing"):
        loading.load_model(path, arch="teacher")


def test_input_kind_and_describe():
    teacher = models.build_teacher()
    assert loading.describe_model(teacher) == ("teacher", None)
    assert loading.input_kind(teacher) == "normalized"
    assert loading.input_kind("teacher") == "normalized"
    assert loading.input_kind("student") == "unit"
    assert loading.preprocess_for("unit").__name__ == "preprocess_student"
    assert loading.preprocess_for("normalized").__name__ == "preprocess_teacher"
    with pytest.raises(InvalidArgumentError):
        loading.input_kind("unknown")


def test_describe_names_on_tflite_style_names():
    teacher_names = ["serving_default_image:0", "model/features_17_conv_3/FusedBatchNormV3",
                     "model/features_18_2/Relu6;model/features_18_1/FusedBatchNormV3"]
    assert loading.describe_names(teacher_names) == ("teacher", None)
    student_names = ["model/features_0_0/Conv2D", "quant_features_13_conv_3/x", "model/classifier_1/MatMul"]
    assert loading.describe_names(student_names) == ("student", 14)
    assert loading.describe_names(["dense/MatMul"]) == ("unknown", None)
