"""Import PyTorch MobileNetV2 state dicts (torchvision / huyvnphan naming) into kdig_tf models.

Keras layer names are the PyTorch module prefixes with '.' replaced by '_', so every
weight is mapped by name, never by position. torch is an optional dependency: it is
imported only inside ``load_state_dict``.
"""
import kdig_tf  # noqa: F401

import os
import re
from typing import NamedTuple, Optional

import numpy as np
import tf_keras as keras

from kdig_tf import models
from kdig_tf.errors import MissingDependencyError, NotAModelError, ShapeMismatchError, WeightKeyError

# Some of the authors' attention-transfer students split ``features`` into three modules
# (front_layers.0..k-1, middle_layer, end_layers.0..m) to tap the middle activation.
_SPLIT_FRONT = re.compile(r"^front_layers\.(\d+)\.(.+)$")
_SPLIT_MIDDLE = re.compile(r"^middle_layer\.(.+)$")
_SPLIT_END = re.compile(r"^end_layers\.(\d+)\.(.+)$")
_FEATURE_INDEX = re.compile(r"^features\.(\d+)\.")
# Checkpoint dicts that wrap the weights under one of these keys are unwrapped.
_WRAPPER_KEYS = ("state_dict", "model_state_dict")
_BN_BOOKKEEPING = "num_batches_tracked"
_MAX_LISTED_KEYS = 8


class Architecture(NamedTuple):
    arch: str  # "teacher" or "student"
    keep_blocks: Optional[int]  # None for the teacher
    num_classes: int
    width_multiplier: float


def load_state_dict(path):
    """Read a PyTorch ``.pt`` state dict as {canonical key: numpy array}."""
    if not os.path.isfile(path):
        raise NotAModelError(f"no such file: {path}")
    if os.path.getsize(path) == 0:
        raise NotAModelError(f"empty file: {path}")
    try:
        import torch
    except ImportError as err:
        raise MissingDependencyError(
            "reading .pt files needs PyTorch; install the 'torch' extra (pip install kdig_tf[torch])"
        ) from err
    try:
        # weights_only: never execute pickled code from a weights file.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many unrelated types for a bad file
        raise NotAModelError(f"{path} is not a PyTorch state dict ({type(err).__name__})") from err
    if isinstance(loaded, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not loaded:
        raise NotAModelError(f"{path} does not hold a state dict (got {type(loaded).__name__})")
    arrays = {}
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise NotAModelError(f"{path} is not a state dict: entry {key!r} is {type(value).__name__}")
        arrays[key] = value.detach().cpu().numpy()
    return normalize_keys(arrays)


def normalize_keys(state_dict):
    """Rename known layouts to ``features.N...``: a DataParallel ``module.`` prefix, and the
    front_layers/middle_layer/end_layers split. Idempotent; unknown keys are kept as they are."""
    keys = list(state_dict)
    if keys and all(key.startswith("module.") for key in keys):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    front = [int(m.group(1)) for m in map(_SPLIT_FRONT.match, state_dict) if m]
    if not front:
        return dict(state_dict)
    middle_index = max(front) + 1
    renamed = {}
    for key, value in state_dict.items():
        if m := _SPLIT_FRONT.match(key):
            key = f"features.{m.group(1)}.{m.group(2)}"
        elif m := _SPLIT_MIDDLE.match(key):
            key = f"features.{middle_index}.{m.group(1)}"
        elif m := _SPLIT_END.match(key):
            key = f"features.{middle_index + 1 + int(m.group(1))}.{m.group(2)}"
        renamed[key] = value
    return renamed


def infer_architecture(state_dict):
    """Teacher or student (with keep_blocks), classes and width, from keys and shapes."""
    state_dict = normalize_keys(state_dict)
    indices = [int(m.group(1)) for m in map(_FEATURE_INDEX.match, state_dict) if m]
    if not indices:
        raise NotAModelError("not a MobileNetV2 state dict: no 'features.N.*' keys")
    for key in ("features.0.0.weight", "classifier.1.weight"):
        if key not in state_dict:
            raise WeightKeyError(f"state dict has no {key!r}")
    classifier = state_dict["classifier.1.weight"]
    stem = state_dict["features.0.0.weight"]
    if classifier.ndim != 2 or stem.ndim != 4:
        raise ShapeMismatchError(
            f"classifier.1.weight {classifier.shape} / features.0.0.weight {stem.shape} have the wrong rank")
    num_classes = int(classifier.shape[0])
    width = float(stem.shape[0]) / models.STEM_CHANNELS
    highest = max(indices)
    if highest == models.MAX_STUDENT_BLOCKS:
        head = state_dict.get(f"features.{highest}.0.weight")
        if head is None or head.shape[0] != classifier.shape[1]:
            raise ShapeMismatchError(
                f"features.{highest} is present (a teacher) but classifier.1.weight {classifier.shape} "
                f"does not follow the head conv {None if head is None else head.shape}")
        return Architecture("teacher", None, num_classes, width)
    if highest > models.MAX_STUDENT_BLOCKS:
        raise WeightKeyError(f"unexpected module features.{highest}: MobileNetV2 ends at "
                             f"features.{models.MAX_STUDENT_BLOCKS}")
    return Architecture("student", highest + 1, num_classes, width)


def _layer_plan(layer):
    """[(weight suffix, numpy transform from PyTorch layout)] for one Keras layer, in
    ``layer.get_weights()`` order."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        # (C, 1, kh, kw) -> (kh, kw, C, 1)
        plan = [("weight", lambda w: np.transpose(w, (2, 3, 0, 1)))]
    elif isinstance(layer, keras.layers.Conv2D):
        # OIHW -> HWIO
        plan = [("weight", lambda w: np.transpose(w, (2, 3, 1, 0)))]
    elif isinstance(layer, keras.layers.Dense):
        plan = [("weight", np.transpose)]
    elif isinstance(layer, keras.layers.BatchNormalization):
        if not (layer.scale and layer.center):
            raise NotAModelError(f"BatchNormalization {layer.name!r} without scale/center is not supported")
        return [("weight", None), ("bias", None), ("running_mean", None), ("running_var", None)]
    else:
        raise NotAModelError(f"cannot map weights of layer {layer.name!r} ({type(layer).__name__})")
    if layer.use_bias:
        plan.append(("bias", None))
    return plan


def _format_keys(keys):
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f" (+{more} more)" if more > 0 else "")


def load_into_keras(model, state_dict):
    """Copy a PyTorch state dict into ``model`` exactly, by layer name.

    Raises WeightKeyError for missing or unexpected keys and ShapeMismatchError for a
    wrong shape. Nothing is written into the model unless every weight fits.
    """
    state_dict = normalize_keys(state_dict)
    assignments = []  # (layer, [numpy arrays in get_weights order])
    expected = set()
    bn_prefixes = set()
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix = layer.name.replace("_", ".")
        plan = _layer_plan(layer)
        if isinstance(layer, keras.layers.BatchNormalization):
            bn_prefixes.add(prefix)
        expected.update(f"{prefix}.{suffix}" for suffix, _ in plan)
        assignments.append((layer, prefix, plan))

    # BatchNorm's step counter has no Keras counterpart; it is valid only on a BN prefix.
    provided = {key for key in state_dict
                if not (key.endswith("." + _BN_BOOKKEEPING)
                        and key[: -len(_BN_BOOKKEEPING) - 1] in bn_prefixes)}
    missing, unexpected = expected - provided, provided - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_format_keys(unexpected)}")
        raise WeightKeyError(f"state dict does not fit model {model.name!r}: " + "; ".join(parts))

    converted = []
    for layer, prefix, plan in assignments:
        values = []
        for (suffix, transform), variable in zip(plan, layer.weights):
            key = f"{prefix}.{suffix}"
            source = np.asarray(state_dict[key], dtype=np.float32)
            value = transform(source) if transform is not None else source
            if tuple(value.shape) != tuple(variable.shape):
                want = _torch_shape(layer, suffix, tuple(variable.shape))
                raise ShapeMismatchError(
                    f"{key}: state dict has shape {tuple(source.shape)}, model {model.name!r} "
                    f"expects {want} (Keras {layer.name} {tuple(variable.shape)})")
            values.append(value)
        converted.append((layer, values))
    for layer, values in converted:
        layer.set_weights(values)
    return model


def _torch_shape(layer, suffix, keras_shape):
    """The PyTorch shape that would have fitted, for error messages."""
    if suffix != "weight" or len(keras_shape) == 1:
        return keras_shape
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw, channels, _ = keras_shape
        return (channels, 1, kh, kw)
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw, cin, cout = keras_shape
        return (cout, cin, kh, kw)
    return tuple(reversed(keras_shape))


def build_for(architecture):
    """An uninitialised kdig_tf model for an ``Architecture``."""
    if architecture.arch == "teacher":
        return models.build_teacher(num_classes=architecture.num_classes,
                                    width_multiplier=architecture.width_multiplier)
    return models.build_student(keep_blocks=architecture.keep_blocks,
                                num_classes=architecture.num_classes,
                                width_multiplier=architecture.width_multiplier)


def keras_model_from_state_dict(state_dict):
    """Build the teacher or student the state dict describes and load it."""
    return load_into_keras(build_for(infer_architecture(state_dict)), state_dict)
