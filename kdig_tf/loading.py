"""Load a kdig_tf network from any file the project produces or imports.

* ``.pt`` / ``.pth``: a PyTorch state dict (architecture inferred from its keys);
* ``.h5`` / ``.keras``: a full tf-keras model;
* ``*.weights.h5`` (or an ``.h5`` without a model config): weights only, which need the
  architecture (``arch``, ``keep_blocks``) to be given.

``load_model`` returns networks as they were saved; ``load_pixel_model`` returns a *pixel
model* (see ``kdig_tf.models``): a kdig_tf teacher or student saved without its
preprocessing (``pretrained/teacher.h5``, the authors' ``.pt`` files, students trained before
pixel models existed) is wrapped with it, and any other classifier is taken as it is.

Every failure is a named KdigError: a missing, empty or unreadable file is NotAModelError,
weights that do not fit the architecture are ShapeMismatchError.
"""
import kdig_tf  # noqa: F401

import os
import re

import h5py
import tf_keras as keras

from kdig_tf import models, torch_import
from kdig_tf.errors import InvalidArgumentError, NotAModelError, ShapeMismatchError

ARCHES = ("teacher", "student")
TORCH_SUFFIXES = (".pt", ".pth")
WEIGHTS_SUFFIX = ".weights.h5"
# The teacher's head (features.18: conv, BN, ReLU6); students stop before it.
_TEACHER_HEAD = re.compile(rf"features_{models.MAX_STUDENT_BLOCKS}_\d")
# search, not match: wrappers (e.g. tfmot's "quant_") prefix the layer names.
_FEATURE_LAYER = re.compile(r"features_(\d+)_")


def check_model_file(path):
    """Raise NotAModelError unless ``path`` is an existing, non-empty file."""
    if not path or not os.path.exists(path):
        raise NotAModelError(f"no such file: {path}")
    if os.path.isdir(path):
        raise NotAModelError(f"{path} is a directory, not a model file")
    if os.path.getsize(path) == 0:
        raise NotAModelError(f"empty file: {path}")


def load_model(path, arch=None, keep_blocks=None, num_classes=10, width_multiplier=1.0):
    """Return a tf-keras model for ``path``.

    ``arch``/``keep_blocks`` are required for weights-only files; for a ``.pt`` they are
    inferred, and if given the file must fit them exactly. ``num_classes`` and
    ``width_multiplier`` apply to weights-only files (a ``.pt`` carries its own);
    ``num_classes=None`` reads it from the file's classifier.
    """
    check_model_file(path)
    if arch is not None and arch not in ARCHES:
        raise InvalidArgumentError(f"arch must be one of {ARCHES}, got {arch!r}")
    lower = path.lower()
    if lower.endswith(TORCH_SUFFIXES):
        return _load_torch(path, arch, keep_blocks)
    if lower.endswith(WEIGHTS_SUFFIX):
        return _load_weights_only(path, arch, keep_blocks, num_classes, width_multiplier)
    if lower.endswith(".h5"):
        if _h5_has_model_config(path):
            return _load_full_model(path)
        return _load_weights_only(path, arch, keep_blocks, num_classes, width_multiplier)
    if lower.endswith(".keras"):
        return _load_full_model(path)
    if lower.endswith(".tflite"):
        raise NotAModelError(f"{path} is a TFLite model: run it with the LiteRT interpreter, not tf-keras")
    raise NotAModelError(
        f"{path}: unsupported model file type (expected .pt, .h5, .keras or .weights.h5)")


def load_pixel_model(path, arch=None, keep_blocks=None, num_classes=10, width_multiplier=1.0):
    """A model taking float pixels in [0, 255], from any file ``load_model`` reads or a SavedModel dir."""
    if path and os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
        return as_pixel_model(_load_full_model(path))
    return as_pixel_model(load_model(path, arch, keep_blocks, num_classes, width_multiplier))


def as_pixel_model(model):
    """Wrap a bare kdig_tf network with its preprocessing; return any other model unchanged."""
    core, spec = models.split_preprocessing(model)
    if spec != models.PIXEL_INPUT:
        return model  # carries its preprocessing already
    arch, _ = describe_model(model)
    if arch == "teacher":
        return models.with_preprocessing(model, models.CIFAR10_TEACHER_INPUT)
    if arch == "student":
        return models.with_preprocessing(model, models.UNIT_INPUT)
    return model


def _load_torch(path, arch, keep_blocks):
    state_dict = torch_import.load_state_dict(path)
    found = torch_import.infer_architecture(state_dict)
    # An explicit architecture is built as asked; load_into_keras then names any misfit.
    if arch is None:
        arch = "student" if keep_blocks is not None else found.arch
    if arch == "student" and keep_blocks is None:
        keep_blocks = found.keep_blocks or models.MAX_STUDENT_BLOCKS
    model = _build(arch, keep_blocks, found.num_classes, found.width_multiplier)
    return torch_import.load_into_keras(model, state_dict)


def _build(arch, keep_blocks, num_classes, width_multiplier):
    if arch == "teacher":
        return models.build_teacher(num_classes=num_classes, width_multiplier=width_multiplier)
    return models.build_student(keep_blocks=keep_blocks, num_classes=num_classes,
                                width_multiplier=width_multiplier)


def _open_h5(path):
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise NotAModelError(f"{path} is not an HDF5 model or weights file") from err


def _h5_has_model_config(path):
    with _open_h5(path) as handle:
        return "model_config" in handle.attrs


def _saved_array_count(path):
    """Number of weight arrays in an h5 weights file (legacy or Keras-v3 layout)."""
    with _open_h5(path) as handle:
        if "layers" in handle:  # Keras-v3 layout: layers/<name>/vars/<i>
            count = 0

            def visit(_, obj):
                nonlocal count
                count += isinstance(obj, h5py.Dataset)

            handle["layers"].visititems(visit)
            return count
        if "layer_names" in handle.attrs:  # legacy save_weights layout
            return sum(len(handle[name].attrs["weight_names"]) for name in handle.attrs["layer_names"])
    raise NotAModelError(f"{path} holds no Keras weights")


def _saved_num_classes(path):
    """Output size of the classifier (the only Dense layer) in an h5 weights file."""
    biases = []
    with _open_h5(path) as handle:
        if "layers" in handle:  # Keras-v3 layout names groups by class: dense, dense_1...
            for name, group in handle["layers"].items():
                if name.startswith("dense") and "vars/1" in group:
                    biases.append(group["vars/1"].shape)
        elif "classifier_1" in handle:
            group = handle["classifier_1"]
            names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
            biases += [group[n].shape for n in names if n.endswith("bias:0")]
    if len(biases) != 1 or len(biases[0]) != 1:
        raise InvalidArgumentError(f"cannot read the number of classes from {path}: give num_classes")
    return int(biases[0][0])


def _load_weights_only(path, arch, keep_blocks, num_classes, width_multiplier):
    if arch is None and keep_blocks is None:
        raise InvalidArgumentError(
            f"{path} holds weights only: give arch ('teacher' or 'student') and, for a student, keep_blocks")
    arch = arch or "student"
    if arch == "student" and keep_blocks is None:
        raise InvalidArgumentError(f"{path} holds student weights only: give keep_blocks")
    if num_classes is None:
        num_classes = _saved_num_classes(path)
    model = _build(arch, keep_blocks, num_classes, width_multiplier)
    # The Keras-v3 loader silently ignores surplus layers in the file; count them first.
    saved = _saved_array_count(path)
    if saved != len(model.weights):
        raise ShapeMismatchError(
            f"{path} holds {saved} weight arrays but {model.name} has {len(model.weights)}")
    try:
        model.load_weights(path)
    except ValueError as err:
        raise ShapeMismatchError(f"{path} does not fit {model.name}: {_first_line(err)}") from err
    except OSError as err:
        raise NotAModelError(f"{path} is not a readable weights file: {_first_line(err)}") from err
    return model


def _first_line(err):
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _load_full_model(path):
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as err:  # corrupt zips, bad HDF5 and unknown layers all end here
        raise NotAModelError(f"{path} is not a readable tf-keras model: {_first_line(err)}") from err
    if not isinstance(model, keras.Model):
        raise NotAModelError(f"{path} does not hold a tf-keras Model")
    return model


def describe_model(model):
    """(arch, keep_blocks) of a kdig_tf model from its layer names; ("unknown", None) otherwise."""
    return describe_names(layer.name for layer in model.layers)


def describe_names(names):
    """(arch, keep_blocks) from layer or tensor names (also works on TFLite tensor names)."""
    indices = []
    for name in names:
        if _TEACHER_HEAD.search(name):
            return "teacher", None
        indices += [int(index) for index in _FEATURE_LAYER.findall(name)]
    if not indices:
        return "unknown", None
    return "student", max(indices) + 1


def input_kind(model_or_arch):
    """"normalized" (CIFAR mean/std, the teacher) or "unit" (raw [0, 1], students)."""
    arch = model_or_arch
    if not isinstance(model_or_arch, str):
        arch, _ = describe_model(model_or_arch)
    if arch == "teacher":
        return "normalized"
    if arch == "student":
        return "unit"
    raise InvalidArgumentError(f"cannot tell the input kind of {arch!r}: give arch 'teacher' or 'student'")


def preprocess_for(kind):
    """The ``kdig_tf.data`` preprocessing function for an input kind."""
    from kdig_tf import data

    if kind == "normalized":
        return data.preprocess_teacher
    if kind == "unit":
        return data.preprocess_student
    raise InvalidArgumentError(f"unknown input kind {kind!r}")
