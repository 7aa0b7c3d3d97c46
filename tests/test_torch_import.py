"""PyTorch -> tf-keras import: forward parity against an independent PyTorch MobileNetV2."""
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch (the optional 'torch' extra) is not installed")
from torch import nn  # noqa: E402

from kdig_tf import models, torch_import  # noqa: E402
from kdig_tf.errors import (  # noqa: E402
    MissingDependencyError, NotAModelError, ShapeMismatchError, WeightKeyError)

# (expansion, channels, repeats, first stride); CIFAR variant: stem and 24-channel stage at stride 1.
SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1))


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, kernel=3, stride=1, groups=1):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = round(cin * expand)
        self.residual = stride == 1 and cin == cout
        layers = [ConvBNReLU(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class TorchMobileNetV2(nn.Module):
    """Reference network; ``keep`` truncates to the first ``keep`` feature modules (a student)."""

    def __init__(self, num_classes=10, keep=None):
        super().__init__()
        layers, channels = [ConvBNReLU(3, 32)], 32
        for expand, cout, repeats, stride in SETTING:
            for index in range(repeats):
                layers.append(InvertedResidual(channels, cout, stride if index == 0 else 1, expand))
                channels = cout
        layers.append(ConvBNReLU(channels, 1280, kernel=1))
        if keep is not None:
            layers = layers[:keep]
        self.features = nn.Sequential(*layers)
        out_channels = [m for m in self.features.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(out_channels, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def _randomised(keep=None, num_classes=10, seed=0):
    torch.manual_seed(seed)
    net = TorchMobileNetV2(num_classes=num_classes, keep=keep)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(123)
    return net.eval()


def _numpy_state(net):
    return {key: value.detach().numpy() for key, value in net.state_dict().items()}


def _assert_parity(net, keras_model, inputs_nchw):
    with torch.no_grad():
        expected = net(torch.from_numpy(inputs_nchw)).numpy()
    actual = keras_model(np.transpose(inputs_nchw, (0, 2, 3, 1)), training=False).numpy()
    assert actual.shape == expected.shape
    assert np.abs(expected).max() > 1e-2  # the comparison is not between two near-zero outputs
    assert np.abs(actual - expected).max() <= 1e-4


@pytest.fixture(scope="module")
def student6():
    return _randomised(keep=6, seed=1)


@pytest.mark.parametrize("keep", [6, 14])
def test_student_forward_parity(keep):
    net = _randomised(keep=keep, seed=keep)
    keras_model = torch_import.keras_model_from_state_dict(_numpy_state(net))
    assert keras_model.name == f"mobilenetv2_student_k{keep}"
    inputs = np.random.default_rng(keep).random((4, 3, 32, 32), dtype=np.float32)  # raw [0, 1]
    _assert_parity(net, keras_model, inputs)


def test_teacher_forward_parity():
    net = _randomised(keep=None, seed=3)
    keras_model = torch_import.keras_model_from_state_dict(_numpy_state(net))
    assert models.count_trainable_params(keras_model) == models.TEACHER_PARAMS
    inputs = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)  # normalised
    _assert_parity(net, keras_model, inputs)


def test_load_state_dict_from_file(tmp_path, student6):
    path = tmp_path / "student.pt"
    torch.save(student6.state_dict(), path)
    state = torch_import.load_state_dict(str(path))
    assert isinstance(state["features.0.0.weight"], np.ndarray)
    assert state["features.0.1.num_batches_tracked"] == 123
    assert set(state) == set(student6.state_dict())
    keras_model = torch_import.keras_model_from_state_dict(state)
    _assert_parity(student6, keras_model, np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32))


def test_checkpoint_wrapper_and_dataparallel_prefix(tmp_path, student6):
    path = tmp_path / "checkpoint.pt"
    wrapped = {f"module.{key}": value for key, value in student6.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": wrapped}, path)
    assert set(torch_import.load_state_dict(str(path))) == set(student6.state_dict())


def test_split_front_middle_end_naming(student6):
    """The authors' attention-transfer students name features as front_layers/middle_layer/end_layers."""
    state = _numpy_state(student6)
    renamed = {}
    for key, value in state.items():
        index, rest = key.split(".", 2)[1:] if key.startswith("features.") else (None, key)
        if index is None:
            renamed[key] = value
        elif int(index) < 3:
            renamed[f"front_layers.{index}.{rest}"] = value
        elif int(index) == 3:
            renamed[f"middle_layer.{rest}"] = value
        else:
            renamed[f"end_layers.{int(index) - 4}.{rest}"] = value
    assert torch_import.normalize_keys(renamed).keys() == state.keys()
    keras_model = torch_import.keras_model_from_state_dict(renamed)
    _assert_parity(student6, keras_model, np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32))


def test_infer_architecture(student6):
    assert torch_import.infer_architecture(_numpy_state(student6)) == ("student", 6, 10, 1.0)
    teacher = _numpy_state(TorchMobileNetV2(num_classes=7))
    assert torch_import.infer_architecture(teacher) == ("teacher", None, 7, 1.0)
    student = _numpy_state(TorchMobileNetV2(keep=14))
    found = torch_import.infer_architecture(student)
    assert (found.arch, found.keep_blocks, found.num_classes) == ("student", 14, 10)
    narrow = dict(student, **{"features.0.0.weight": np.zeros((16, 3, 3, 3), np.float32)})
    assert torch_import.infer_architecture(narrow).width_multiplier == 0.5


def test_infer_architecture_rejects_non_mobilenet():
    with pytest.raises(NotAModelError):
        torch_import.infer_architecture({"encoder.weight": np.zeros((3, 3))})
    with pytest.raises(WeightKeyError, match="classifier.1.weight"):
        torch_import.infer_architecture({"features.0.0.weight": np.zeros((32, 3, 3, 3))})


def test_missing_key(student6):
    state = _numpy_state(student6)
    del state["features.3.conv.2.weight"]
    with pytest.raises(WeightKeyError, match=r"missing 1 key\(s\): features\.3\.conv\.2\.weight"):
        torch_import.keras_model_from_state_dict(state)


def test_unexpected_key(student6):
    state = _numpy_state(student6)
    state["features.3.conv.9.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(WeightKeyError, match=r"unexpected 1 key\(s\): features\.3\.conv\.9\.weight"):
        torch_import.keras_model_from_state_dict(state)


def test_student_weights_do_not_fit_a_deeper_student(student6):
    with pytest.raises(WeightKeyError, match="missing"):
        torch_import.load_into_keras(models.build_student(keep_blocks=8), _numpy_state(student6))


def test_shape_mismatch_names_key_and_shapes(student6):
    state = _numpy_state(student6)
    state["features.4.conv.1.0.weight"] = np.zeros((144, 1, 5, 5), np.float32)
    keras_model = models.build_student(keep_blocks=6)
    before = [w.copy() for w in keras_model.get_weights()]
    with pytest.raises(ShapeMismatchError) as caught:
        torch_import.load_into_keras(keras_model, state)
    message = str(caught.value)
    assert "features.4.conv.1.0.weight" in message
    assert "(144, 1, 5, 5)" in message and "(144, 1, 3, 3)" in message
    # nothing is half-loaded
    assert all(np.array_equal(a, b) for a, b in zip(before, keras_model.get_weights()))


def test_wrong_number_of_classes_is_a_shape_mismatch(student6):
    with pytest.raises(ShapeMismatchError, match="classifier.1.weight"):
        torch_import.load_into_keras(models.build_student(keep_blocks=6, num_classes=5),
                                     _numpy_state(student6))


def test_non_model_files(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(NotAModelError):
        torch_import.load_state_dict(str(text))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(NotAModelError, match="empty"):
        torch_import.load_state_dict(str(empty))
    with pytest.raises(NotAModelError, match="no such file"):
        torch_import.load_state_dict(str(tmp_path / "missing.pt"))
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(NotAModelError):
        torch_import.load_state_dict(str(tensor))


def test_missing_torch_is_a_named_error(tmp_path, monkeypatch, student6):
    path = tmp_path / "student.pt"
    torch.save(student6.state_dict(), path)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes "import torch" fail
    with pytest.raises(MissingDependencyError, match="torch"):
        torch_import.load_state_dict(str(path))
