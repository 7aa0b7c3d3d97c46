"""The CIFAR MobileNetV2 teacher and its truncated students, in tf-keras.

Layer names mirror the PyTorch (torchvision / huyvnphan ``PyTorch_CIFAR10``)
state-dict prefixes with dots replaced by underscores, so ``features.3.conv.1.0``
(a depthwise conv in PyTorch) is the Keras layer ``features_3_conv_1_0``.

``build_teacher``/``build_student`` return the bare networks ("cores"): the teacher expects
CIFAR mean/std normalised images, a student [0, 1] images. A *pixel model* takes float
pixels in [0, 255] and holds its scaling and normalisation as leading stock Keras layers
(``preprocessing_layers``), so it can be saved, exported and deployed without knowing
how it was trained: ``with_preprocessing`` wraps a core into one, ``split_preprocessing``
takes one apart again. kdig_tf's input pipelines produce [0, 1] images, and
``InputSpec.from_unit`` maps them to a core's input exactly as before the wrapping existed,
so wrapping changes no trained value. Any other Keras classifier is treated as a pixel model
as it is (its own layers do the preprocessing).
"""
import kdig_tf  # noqa: F401  (selects tf-keras before TensorFlow loads)

import dataclasses
import hashlib
import os

import numpy as np
import tensorflow as tf
import tf_keras as keras

from kdig_tf import students
from kdig_tf.errors import InvalidArgumentError, UnknownKeyError

# The teacher's input normalisation (CIFAR-10 training-set statistics).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
PIXEL_RANGE = 255.0

# (expansion t, output channels c, repeats n, first stride s). CIFAR variant:
# the 24-channel stage keeps stride 1 (ImageNet uses 2).
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
# Stride of a student's stem conv: 1 is the CIFAR teacher's, 2 the ImageNet network's.
STEM_STRIDES = (1, 2)
HEAD_CHANNELS = 1280
# features.0 is the stem, features.1..17 the inverted residuals, features.18 the head conv.
NUM_FEATURE_MODULES = 19
MAX_STUDENT_BLOCKS = NUM_FEATURE_MODULES - 1
BN_EPSILON = 1e-5
# PyTorch momentum 0.1 updates the running stats by 10 %; Keras counts the other way.
BN_MOMENTUM = 0.9
TEACHER_PARAMS = 2_236_682

# torchvision's MobileNetV2 initialisation, as in the authors' code: Kaiming normal with
# fan_out for convs, N(0, 0.01) for the classifier. A depthwise kernel (kh, kw, C, 1) has
# PyTorch fan_out kh*kw*C, which Keras calls fan_in. (In inference mode an untrained
# MobileNetV2 still has near-constant logits: its BN layers are identities until trained.)
# Factories, not shared instances: an unseeded tf-keras initializer fixes its seed when it
# is created, so one instance would give every layer of a shape (and every model) the same values.


def conv_init():
    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


def depthwise_init():
    return keras.initializers.VarianceScaling(2.0, mode="fan_in", distribution="untruncated_normal")


def dense_init():
    return keras.initializers.RandomNormal(stddev=0.01)

# keep_blocks -> trainable parameter count, for the width-1.0, 10-class networks.
STUDENT_PARAMS = {
    16: 1_019_402,
    14: 543_498,
    12: 306_954,
    10: 185_738,
    8: 77_194,
    6: 40_970,
    4: 16_042,
    2: 1_994,
}
# Named compression factors (teacher params / student params, rounded to 2 decimals).
COMPRESSION_FACTORS = {
    f"{TEACHER_PARAMS / count:.2f}x": keep for keep, count in STUDENT_PARAMS.items()
}


def make_divisible(value, divisor=8, min_value=None):
    """Round channels like torchvision, never dropping more than 10 %."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn_relu(x, filters, kernel_size, stride, name, depthwise=False):
    """Conv (no bias) + BN + ReLU6, padded exactly like PyTorch ``padding=k//2``."""
    if stride > 1:
        # Keras 'same' pads bottom/right only for even inputs; PyTorch pads both sides.
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    if depthwise:
        x = keras.layers.DepthwiseConv2D(
            kernel_size, strides=stride, padding=padding, use_bias=False,
            depthwise_initializer=depthwise_init(), name=f"{name}_0"
        )(x)
    else:
        x = keras.layers.Conv2D(
            filters, kernel_size, strides=stride, padding=padding, use_bias=False,
            kernel_initializer=conv_init(), name=f"{name}_0"
        )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_1")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_2")(x)


def _inverted_residual(x, in_channels, out_channels, stride, expand_ratio, name):
    hidden = int(round(in_channels * expand_ratio))
    shortcut = x
    prefix = f"{name}_conv"
    index = 0
    if expand_ratio != 1:
        x = _conv_bn_relu(x, hidden, 1, 1, f"{prefix}_{index}")
        index += 1
    x = _conv_bn_relu(x, hidden, 3, stride, f"{prefix}_{index}", depthwise=True)
    x = keras.layers.Conv2D(out_channels, 1, use_bias=False, kernel_initializer=conv_init(),
                            name=f"{prefix}_{index + 1}")(x)
    x = keras.layers.BatchNormalization(
        epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{prefix}_{index + 2}"
    )(x)
    if stride == 1 and in_channels == out_channels:
        x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return x


def _block_plan(width_multiplier):
    """List of (in_channels, out_channels, stride, expand) for features.1..17."""
    plan = []
    in_channels = make_divisible(STEM_CHANNELS * width_multiplier)
    for expand, channels, repeats, first_stride in INVERTED_RESIDUAL_SETTING:
        out_channels = make_divisible(channels * width_multiplier)
        for repeat in range(repeats):
            plan.append((in_channels, out_channels, first_stride if repeat == 0 else 1, expand))
            in_channels = out_channels
    return plan


def _features(inputs, keep_blocks, width_multiplier, stem_stride=1):
    x = _conv_bn_relu(inputs, make_divisible(STEM_CHANNELS * width_multiplier), 3, stem_stride, "features_0")
    for index, (cin, cout, stride, expand) in enumerate(_block_plan(width_multiplier)[: keep_blocks - 1]):
        x = _inverted_residual(x, cin, cout, stride, expand, f"features_{index + 1}")
    return x


def _check_common(num_classes, width_multiplier, input_shape):
    if int(num_classes) < 2:
        raise InvalidArgumentError(f"num_classes must be >= 2, got {num_classes}")
    if not width_multiplier > 0:
        raise InvalidArgumentError(f"width_multiplier must be > 0, got {width_multiplier}")
    if len(input_shape) != 3:
        raise InvalidArgumentError(f"input_shape must be (height, width, channels), got {input_shape}")


def build_teacher(num_classes=10, width_multiplier=1.0, input_shape=(32, 32, 3), dropout=0.2,
                  name="mobilenetv2_teacher"):
    """The CIFAR MobileNetV2: 2,236,682 trainable parameters at width 1 and 10 classes."""
    _check_common(num_classes, width_multiplier, input_shape)
    inputs = keras.Input(shape=input_shape, name="image")
    x = _features(inputs, MAX_STUDENT_BLOCKS, width_multiplier)
    head = make_divisible(HEAD_CHANNELS * max(1.0, width_multiplier))
    x = _conv_bn_relu(x, head, 1, 1, f"features_{MAX_STUDENT_BLOCKS}")
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    x = keras.layers.Dropout(dropout, name="classifier_0")(x)
    outputs = keras.layers.Dense(num_classes, kernel_initializer=dense_init(), name="classifier_1")(x)
    return keras.Model(inputs, outputs, name=name)


def resolve_keep_blocks(keep_blocks=None, compression=None):
    """Return keep_blocks from either itself or a named compression factor like '4.12x'."""
    if (keep_blocks is None) == (compression is None):
        raise InvalidArgumentError("give exactly one of keep_blocks or compression")
    if compression is not None:
        key = compression if str(compression).endswith("x") else f"{float(compression):.2f}x"
        if key not in COMPRESSION_FACTORS:
            raise UnknownKeyError(
                f"unknown compression factor {compression!r}; known: {sorted(COMPRESSION_FACTORS)}"
            )
        return COMPRESSION_FACTORS[key]
    keep_blocks = int(keep_blocks)
    if not 1 <= keep_blocks <= MAX_STUDENT_BLOCKS:
        raise InvalidArgumentError(f"keep_blocks must be in [1, {MAX_STUDENT_BLOCKS}], got {keep_blocks}")
    return keep_blocks


def build_student(keep_blocks=None, compression=None, num_classes=10, width_multiplier=1.0,
                  input_shape=(32, 32, 3), name=None, stem_stride=1):
    """The teacher's first ``keep_blocks`` feature modules, global average pooling, Dense.

    ``keep_blocks=14`` is the paper's 4.1x student (543,498 parameters). There is no
    head conv and no dropout. The Dense layer keeps the PyTorch name ``classifier_1``
    so that the authors' ``classifier.1.*`` weights map onto it.

    ``stem_stride=2`` is a latency option, not the paper's: the stem downsamples as in the
    ImageNet MobileNetV2, so every block runs on a quarter of the pixels (about 4x fewer
    MACs, same parameters). Its feature maps are then smaller than the teacher's, so it
    cannot be paired with the teacher for attention transfer.
    """
    keep_blocks = resolve_keep_blocks(keep_blocks, compression)
    _check_common(num_classes, width_multiplier, input_shape)
    if stem_stride not in STEM_STRIDES:
        raise InvalidArgumentError(f"stem_stride must be one of {STEM_STRIDES}, got {stem_stride!r}")
    inputs = keras.Input(shape=input_shape, name="image")
    x = _features(inputs, keep_blocks, width_multiplier, int(stem_stride))
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    outputs = keras.layers.Dense(num_classes, kernel_initializer=dense_init(), name="classifier_1")(x)
    if name is None:
        name = f"mobilenetv2_student_k{keep_blocks}"
        if width_multiplier != 1.0:
            name += f"_w{width_multiplier:g}"
        if stem_stride != 1:
            name += f"_s{int(stem_stride)}"
    return keras.Model(inputs, outputs, name=name)


def weights_fingerprint(model):
    """sha256 over the model's weights (names, shapes and bytes), independent of file format.

    A pixel model and the network behind its preprocessing have the same fingerprint.
    """
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(weight.numpy())
        digest.update(weight.name.split("/", 1)[-1].encode())
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def count_trainable_params(model):
    return int(sum(int(keras.backend.count_params(w)) for w in model.trainable_weights))


def feature_layer_name(module_index, model=None):
    """Name of the last layer of ``features.<module_index>`` (for attention transfer)."""
    if module_index == 0 or module_index == MAX_STUDENT_BLOCKS:
        return f"features_{module_index}_2"
    _, _, stride, expand = _block_plan(1.0)[module_index - 1]
    if model is not None and f"features_{module_index}_add" in [layer.name for layer in model.layers]:
        return f"features_{module_index}_add"
    return f"features_{module_index}_conv_{3 if expand != 1 else 2}"


# --------------------------------------------------------------------------- pixel models

# Names of the leading layers that make a network a pixel model. They are stock Keras
# Normalization layers, so a saved pixel model loads in plain tf-keras without kdig_tf.
PIXEL_SCALING_LAYER = "pixel_scaling"
PIXEL_NORMALIZATION_LAYER = "pixel_normalization"


def preprocessing_layers(spec):
    """The stock layers that turn float pixels into a core's input, for a unit/normalized spec.

    x / 255 is written as Normalization(mean 0, variance 255^2) and (x - mean) / std as
    Normalization(mean, std^2): the same float operations, in the same order, as the [0, 1]
    scaling and normalisation the cores were trained with, so wrapping changes no output
    (for the CIFAR statistics sqrt(std^2) rounds back to std exactly; tests check it).
    """
    layers = [keras.layers.Normalization(mean=0.0, variance=PIXEL_RANGE ** 2, name=PIXEL_SCALING_LAYER)]
    if spec.space == "normalized":
        layers.append(keras.layers.Normalization(mean=list(spec.mean), variance=[value ** 2 for value in spec.std],
                                                 name=PIXEL_NORMALIZATION_LAYER))
    return layers


def normalize(images_unit, mean, std):
    """[0, 1] images -> (x - mean) / std per channel."""
    return (images_unit - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


INPUT_SPACES = ("unit", "normalized", "pixels")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a network's own input is, relative to [0, 1] images.

    unit       : the [0, 1] image itself (kdig_tf students);
    normalized : (x - mean) / std (the CIFAR teacher);
    pixels     : x * 255, for a model that does its own preprocessing.
    """
    space: str = "pixels"
    mean: tuple = None
    std: tuple = None

    def __post_init__(self):
        if self.space not in INPUT_SPACES:
            raise UnknownKeyError(f"unknown input space {self.space!r}; known: {INPUT_SPACES}")
        if (self.space == "normalized") != (self.mean is not None and self.std is not None):
            raise InvalidArgumentError("mean and std go with the 'normalized' input space, and only with it")

    def from_unit(self, images_unit):
        """[0, 1] images -> this network's input."""
        if self.space == "unit":
            return images_unit
        if self.space == "normalized":
            return normalize(images_unit, self.mean, self.std)
        return images_unit * PIXEL_RANGE

    def from_pixels(self, images):
        """uint8 or float [0, 255] images -> this network's input."""
        unit = tf.cast(images, tf.float32) / PIXEL_RANGE
        return tf.cast(images, tf.float32) if self.space == "pixels" else self.from_unit(unit)

    def to_config(self):
        return {"space": self.space, "mean": self.mean and list(self.mean), "std": self.std and list(self.std)}


UNIT_INPUT = InputSpec("unit")
CIFAR10_TEACHER_INPUT = InputSpec("normalized", CIFAR10_MEAN, CIFAR10_STD)
PIXEL_INPUT = InputSpec("pixels")


def with_preprocessing(core, spec, name=None):
    """A pixel model: float pixels -> preprocessing_layers(spec) -> ``core`` (weights shared)."""
    if spec.space == "pixels":
        return core
    inputs = keras.Input(shape=tuple(core.input_shape[1:]), name="pixels")
    x = inputs
    for layer in preprocessing_layers(spec):
        x = layer(x)
    return keras.Model(inputs, core(x), name=name or core.name)


def _normalization_statistics(layer):
    config = layer.get_config()
    mean = np.ravel(np.asarray(config.get("mean"), np.float64))
    variance = np.ravel(np.asarray(config.get("variance"), np.float64))
    return mean, variance


def split_preprocessing(model):
    """(core, InputSpec) of a model: its network without the leading pixel preprocessing layers.

    A model that does not start with them is its own core and takes pixels.
    """
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not layers or layers[0].name != PIXEL_SCALING_LAYER or not isinstance(layers[0], keras.layers.Normalization):
        return model, PIXEL_INPUT
    mean, variance = _normalization_statistics(layers[0])
    if np.any(mean != 0.0) or np.any(variance != PIXEL_RANGE ** 2):
        raise InvalidArgumentError(f"{model.name}: layer {PIXEL_SCALING_LAYER} does not divide by {PIXEL_RANGE}")
    spec, last = UNIT_INPUT, layers[0]
    if len(layers) > 1 and layers[1].name == PIXEL_NORMALIZATION_LAYER:
        mean, variance = _normalization_statistics(layers[1])
        spec = InputSpec("normalized", tuple(float(value) for value in mean),
                         tuple(float(value) for value in np.sqrt(variance)))
        last = layers[1]
    rest = layers[layers.index(last) + 1:]
    if len(rest) == 1 and isinstance(rest[0], keras.Model):  # with_preprocessing's nesting
        return rest[0], spec
    return keras.Model(last.output, model.outputs, name=f"{model.name}_core"), spec


def build_pixel_teacher(**kwargs):
    """The CIFAR MobileNetV2 teacher as a pixel model (CIFAR-10 mean/std inside)."""
    return with_preprocessing(build_teacher(**kwargs), CIFAR10_TEACHER_INPUT)


def build_pixel_student(**kwargs):
    """A truncated MobileNetV2 student as a pixel model ([0, 1] scaling inside)."""
    return with_preprocessing(build_student(**kwargs), UNIT_INPUT)


# --------------------------------------------------------------------------- student specs

def _mobilenetv2_student(num_classes, input_shape, keep=14, width=1.0, stem_stride=1):
    return build_student(keep_blocks=int(keep), num_classes=num_classes, width_multiplier=float(width),
                         input_shape=input_shape, stem_stride=int(stem_stride))


# family -> (builder of the core, its input spec, the keys the spec may set: a tuple, or
# {key: parser(key, text)} for the latency families of kdig_tf.students)
STUDENT_FAMILIES = {
    "mobilenetv2": (_mobilenetv2_student, UNIT_INPUT, ("keep", "width", "stem_stride")),
    "mnv2": (students.build_mnv2, UNIT_INPUT, students.MNV2_OPTIONS),
    "resnet": (students.build_resnet, UNIT_INPUT, students.RESNET_OPTIONS),
    "shufflenetv2": (students.build_shufflenetv2, UNIT_INPUT, students.SHUFFLENET_OPTIONS),
    "vgg": (students.build_vgg, UNIT_INPUT, students.VGG_OPTIONS),
}


@dataclasses.dataclass(frozen=True)
class StudentSpec:
    """A built-in student, e.g. ``mobilenetv2:keep=14,width=1.0,stem_stride=1``."""
    family: str
    options: tuple  # sorted (key, value) pairs

    def build_core(self, num_classes, input_shape):
        builder, _, _ = STUDENT_FAMILIES[self.family]
        return builder(num_classes, tuple(input_shape), **dict(self.options))

    @property
    def input_spec(self):
        return STUDENT_FAMILIES[self.family][1]

    def __str__(self):
        return self.family + (":" + ",".join(f"{key}={_option_text(value)}" for key, value in self.options)
                              if self.options else "")


def _option_text(value):
    """A list option is written with '-' between its items, so the spec's text parses back."""
    return "-".join(format(item, "g") for item in value) if isinstance(value, tuple) else str(value)


def parse_student_spec(text):
    """``"mobilenetv2:keep=14,width=1.0"`` -> StudentSpec; UnknownKeyError on an unknown family or key."""
    family, _, rest = str(text).strip().partition(":")
    family = family.strip().lower()
    if family not in STUDENT_FAMILIES:
        raise UnknownKeyError(f"unknown student family {family!r}; known: {sorted(STUDENT_FAMILIES)} "
                              "(or give a .keras/.h5 model file)")
    allowed = STUDENT_FAMILIES[family][2]
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in allowed:
            raise UnknownKeyError(f"bad student option {item!r} for {family}; known keys: {list(allowed)}")
        if isinstance(allowed, dict):  # the family's own parser names a bad value itself
            options[key] = allowed[key](key, value.strip())
            continue
        try:
            options[key] = float(value) if key == "width" else int(value)
        except ValueError as err:
            raise InvalidArgumentError(f"student option {key} needs a number, got {value!r}") from err
    return StudentSpec(family, tuple(sorted(options.items())))


def is_model_file(text):
    """True when ``text`` names a model file or SavedModel directory rather than a built-in spec."""
    text = str(text)
    return text.lower().endswith((".keras", ".h5", ".pt", ".pth")) or os.path.isdir(text)


def fresh_copy(model):
    """The architecture of ``model`` with newly initialised weights (seeded by the global seed)."""
    try:
        copy = keras.models.clone_model(model)
    except (ValueError, TypeError) as err:
        raise InvalidArgumentError(f"cannot re-initialise {model.name}: {err}") from err
    copy.build(model.input_shape)
    return copy
