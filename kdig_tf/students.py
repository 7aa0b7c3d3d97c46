"""Student families designed for int8 latency on LiteRT (XNNPACK), as ``--student`` specs.

    mnv2:width=0.5,expand=4,strides=1-2-2-2-1-2-1   MobileNetV2: per-stage strides, expansion, repeats
    resnet:depth=20,width=16                        CIFAR ResNet (6n+2 layers, projection shortcuts)
    shufflenetv2:width=0.5,repeats=4-8-4            ShuffleNetV2 (channel split and shuffle)
    vgg:channels=32-64-128,repeats=2-2-2            plain 3x3 conv stacks (one int8 GEMM each in XNNPACK)

Options are comma-separated ``key=value``; a list value joins its items with ``-`` (one per
stage). ``models.parse_student_spec`` reads them with the parsers in ``*_OPTIONS``, which
reject a bad value by name (``InvalidArgumentError``); an unknown key is ``UnknownKeyError``.

Each builder returns a core that takes [0, 1] images; input shape and class count come
from the caller (the data), nothing assumes CIFAR. Every layer is a stock tf-keras layer
that tfmot's default 8-bit scheme can wrap for QAT: the ShuffleNetV2 channel split and
shuffle are Reshape / Cropping2D / Permute, not Lambda or tf ops, so a saved student loads
in plain tf-keras and converts to int8. Stride-2 convs pad symmetrically like PyTorch.

This module must not import ``kdig_tf.models`` at import time: models imports it for its
registry, so the builders import it when they run.
"""
import kdig_tf  # noqa: F401  (selects tf-keras before TensorFlow loads)

import math

import tf_keras as keras

from kdig_tf.errors import InvalidArgumentError

STAGE_STRIDES = (1, 2)


def _models():
    from kdig_tf import models  # at call time: models imports this module
    return models


# --------------------------------------------------------------------------- option parsers
# Each parser takes (key, text) and returns a plain value (numbers, or a tuple for lists);
# models.StudentSpec prints tuples joined by '-', so a printed spec parses back to itself.

def _number(key, text, kind):
    try:
        value = kind(text)
    except ValueError:
        raise InvalidArgumentError(f"student option {key} needs {'an integer' if kind is int else 'a number'}, "
                                   f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise InvalidArgumentError(f"student option {key} must be finite, got {text!r}")
    return value


def positive_float(key, text):
    value = _number(key, text, float)
    if value <= 0:
        raise InvalidArgumentError(f"student option {key} must be > 0, got {text!r}")
    return value


def int_at_least(minimum):
    def parse(key, text):
        value = _number(key, text, int)
        if value < minimum:
            raise InvalidArgumentError(f"student option {key} must be >= {minimum}, got {text!r}")
        return value
    return parse


def stride(key, text):
    value = _number(key, text, int)
    if value not in STAGE_STRIDES:
        raise InvalidArgumentError(f"student option {key} must be one of {STAGE_STRIDES}, got {text!r}")
    return value


def dash_list(item_parser, lengths=None):
    """A '-'-joined list of items, each read by ``item_parser``; ``lengths``: the allowed counts."""
    def parse(key, text):
        items = text.split("-")
        if any(not item.strip() for item in items):
            raise InvalidArgumentError(f"student option {key} is a '-'-joined list, got {text!r}")
        if lengths is not None and len(items) not in lengths:
            raise InvalidArgumentError(f"student option {key} needs {' or '.join(map(str, lengths))} "
                                       f"'-'-joined values, got {len(items)} in {text!r} (',' separates options)")
        return tuple(item_parser(key, item.strip()) for item in items)
    return parse


def resnet_depth(key, text):
    value = _number(key, text, int)
    if value < 8 or (value - 2) % 6:
        raise InvalidArgumentError(f"student option {key} must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), "
                                   f"got {text!r}")
    return value


def _expand_ratio(key, text):
    value = _number(key, text, float)
    if value < 1:
        raise InvalidArgumentError(f"student option {key} must be >= 1 (1 = no expansion conv), got {text!r}")
    return int(value) if value.is_integer() else value


# --------------------------------------------------------------------------- shared layers

def _conv_bn(x, filters, kernel_size, stride_, name, depthwise=False, relu=True):
    """Conv (no bias) + BN (+ ReLU); a strided conv pads both sides like PyTorch ``padding=k//2``."""
    models = _models()
    padding = "valid" if stride_ > 1 else "same"
    if stride_ > 1 and kernel_size > 1:
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
    if depthwise:
        x = keras.layers.DepthwiseConv2D(kernel_size, strides=stride_, padding=padding, use_bias=False,
                                         depthwise_initializer=models.depthwise_init(), name=f"{name}_dw")(x)
    else:
        x = keras.layers.Conv2D(filters, kernel_size, strides=stride_, padding=padding, use_bias=False,
                                kernel_initializer=models.conv_init(), name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=models.BN_EPSILON, momentum=models.BN_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _classifier(x, num_classes):
    models = _models()
    x = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    return keras.layers.Dense(num_classes, kernel_initializer=models.dense_init(), name="classifier_1")(x)


def _check_downsampling(total_stride, input_shape):
    if total_stride > min(input_shape[0], input_shape[1]):
        raise InvalidArgumentError(f"the strides downsample by {total_stride}, more than the "
                                   f"{input_shape[0]}x{input_shape[1]} input allows")


def _inputs(num_classes, input_shape):
    models = _models()
    models._check_common(num_classes, 1.0, input_shape)
    return keras.Input(shape=tuple(input_shape), name="image")


# --------------------------------------------------------------------------- MobileNetV2

MNV2_STAGES = 7
MNV2_OPTIONS = {
    "width": positive_float,
    # One value: every stage but the first (which keeps t = 1, no expansion conv); or one per stage.
    "expand": dash_list(_expand_ratio, (1, MNV2_STAGES)),
    "strides": dash_list(stride, (MNV2_STAGES,)),
    "repeats": dash_list(int_at_least(0), (MNV2_STAGES,)),
    "stem_stride": stride,
    "head": int_at_least(0),
}


def mnv2_plan(width=1.0, expand=None, strides=None, repeats=None):
    """[(in_channels, out_channels, stride, expand)] of the inverted residuals, and the stem's channels.

    Stages follow ``models.INVERTED_RESIDUAL_SETTING`` (channels 16-24-32-64-96-160-320 times
    ``width``, repeats 1-2-3-4-3-3-1, strides 1-1-2-2-1-2-1, expansion 1-6-6-6-6-6-6). A stage
    with 0 repeats is left out; given explicitly, ``strides`` may not put a 2 on such a stage
    (that downsampling would silently vanish), while the default strides of empty stages are dropped.
    """
    models = _models()
    setting = models.INVERTED_RESIDUAL_SETTING
    repeats = tuple(repeats) if repeats is not None else tuple(stage[2] for stage in setting)
    if strides is not None:
        lost = [index + 1 for index, (count, value) in enumerate(zip(repeats, strides)) if count == 0 and value != 1]
        if lost:
            raise InvalidArgumentError(f"strides put a 2 on stage(s) {lost}, which repeats leaves empty")
    strides = tuple(strides) if strides is not None else tuple(stage[3] for stage in setting)
    if expand is None:
        expand = tuple(stage[0] for stage in setting)
    elif len(expand) == 1:
        expand = (setting[0][0],) + tuple(expand) * (MNV2_STAGES - 1)
    stem = models.make_divisible(models.STEM_CHANNELS * width)
    plan, in_channels = [], stem
    for (_, channels, _, _), count, first_stride, ratio in zip(setting, repeats, strides, expand):
        out_channels = models.make_divisible(channels * width)
        for index in range(count):
            plan.append((in_channels, out_channels, first_stride if index == 0 else 1, ratio))
            in_channels = out_channels
    return plan, stem


def build_mnv2(num_classes, input_shape, width=1.0, expand=None, strides=None, repeats=None, stem_stride=1,
               head=0):
    """MobileNetV2 with per-stage strides, expansion ratios and repeats, and an optional head conv.

    Layer names and order are the teacher's (``features_<i>``), so with the default strides
    ``repeats=1-2-3-4-3-0-0`` is ``mobilenetv2:keep=14`` weight for weight. Moving a stride
    from the stem to a later stage (``strides=1-2-2-2-1-2-1``) keeps the first blocks at
    full resolution. ``head=N`` adds the teacher's 1x1 conv to N channels before pooling.
    """
    models = _models()
    inputs = _inputs(num_classes, input_shape)
    if not width > 0:
        raise InvalidArgumentError(f"width must be > 0, got {width}")
    plan, stem = mnv2_plan(width, expand, strides, repeats)
    _check_downsampling(stem_stride * math.prod(block[2] for block in plan), input_shape)
    x = models._conv_bn_relu(inputs, stem, 3, int(stem_stride), "features_0")
    for index, (cin, cout, block_stride, ratio) in enumerate(plan):
        x = models._inverted_residual(x, cin, cout, block_stride, ratio, f"features_{index + 1}")
    if head:
        x = models._conv_bn_relu(x, int(head), 1, 1, f"features_{len(plan) + 1}")
    return keras.Model(inputs, _classifier(x, num_classes), name="mnv2_student")


# --------------------------------------------------------------------------- CIFAR ResNet

RESNET_OPTIONS = {
    "depth": resnet_depth,
    "width": int_at_least(1),
    "stem_stride": stride,
}


def build_resnet(num_classes, input_shape, depth=20, width=16, stem_stride=1):
    """He et al.'s CIFAR ResNet: a 3x3 stem, three stages of (depth - 2) / 6 basic blocks with
    ``width``, 2x``width`` and 4x``width`` channels (the last two start with stride 2), pooling, Dense.

    Shortcuts are identities, except where a stage changes shape: there a 1x1 conv (stride 2)
    + BN projects (the paper's option B; option A pads zeros, which needs no parameters but no
    stock layer pads channels). ResNet-20 at width 16 and 10 classes: 272,474 parameters
    (269,722 with option A), 40.8 M MACs at 32x32.
    """
    if (depth - 2) % 6 or depth < 8:
        raise InvalidArgumentError(f"depth must be 6n+2 with n >= 1, got {depth}")
    inputs = _inputs(num_classes, input_shape)
    _check_downsampling(4 * stem_stride, input_shape)
    blocks = (depth - 2) // 6
    x = _conv_bn(inputs, width, 3, stem_stride, "stem")
    channels = width
    for stage in range(3):
        out_channels = width * 2 ** stage
        for block in range(blocks):
            name = f"stage{stage + 1}_block{block + 1}"
            block_stride = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            if block_stride != 1 or channels != out_channels:
                shortcut = _conv_bn(x, out_channels, 1, block_stride, f"{name}_shortcut", relu=False)
            y = _conv_bn(x, out_channels, 3, block_stride, f"{name}_1")
            y = _conv_bn(y, out_channels, 3, 1, f"{name}_2", relu=False)
            x = keras.layers.ReLU(name=f"{name}_relu")(keras.layers.Add(name=f"{name}_add")([shortcut, y]))
            channels = out_channels
    return keras.Model(inputs, _classifier(x, num_classes), name=f"resnet{depth}_w{width}")


# --------------------------------------------------------------------------- ShuffleNetV2

# Output channels of stages 2-4 at the paper's widths; other widths scale the x1.0 row.
SHUFFLENET_CHANNELS = {0.5: (48, 96, 192), 1.0: (116, 232, 464), 1.5: (176, 352, 704), 2.0: (244, 488, 976)}
SHUFFLENET_STEM = 24
SHUFFLENET_OPTIONS = {
    "width": positive_float,
    "repeats": dash_list(int_at_least(1), (3,)),
    "head": int_at_least(0),
    "stem_stride": stride,
}


def shufflenet_channels(width):
    """Stage channels: the paper's for 0.5/1.0/1.5/2.0, else x1.0's times ``width`` rounded to a
    multiple of 4 (>= 8), so both halves of a split are even."""
    if float(width) in SHUFFLENET_CHANNELS:
        return SHUFFLENET_CHANNELS[float(width)]
    return tuple(max(8, int(round(channels * width / 4)) * 4) for channels in SHUFFLENET_CHANNELS[1.0])


# Between units a ShuffleNetV2 tensor stays "shuffled": (H*W, C/2, 2), where element [j, g] is
# channel g*C/2 + j of the concatenation, i.e. channel 2j + g after the shuffle. The next unit's
# split is then a crop of that layout, which saves tf-keras Reshapes: they keep the batch dynamic,
# so each one converts to SHAPE/PACK/RESHAPE ops that XNNPACK does not run (a batch-1 build of
# x0.5, whose reshapes are static, timed about 10 % faster in int8 on a busy machine).

def _shuffle(x, name):
    """Channel shuffle (2 groups) of an (H, W, C) tensor, left in the shuffled layout."""
    height, width, channels = x.shape[1:]
    x = keras.layers.Reshape((height * width, 2, channels // 2), name=f"{name}_shuffle_reshape")(x)
    return keras.layers.Permute((1, 3, 2), name=f"{name}_shuffle")(x)


def _image(shuffled, height, width, name):
    """The shuffled layout back as an (H, W, C) image tensor."""
    channels = shuffled.shape[2] * 2
    return keras.layers.Reshape((height, width, channels), name=f"{name}_image")(shuffled)


def _half(shuffled, which, height, width, name):
    """First (0) or second (1) half of the shuffled channels, as an (H, W, C/2) image tensor."""
    quarter = shuffled.shape[2] // 2
    x = keras.layers.Cropping2D(((0, 0), (which * quarter, (1 - which) * quarter)), name=f"{name}_split{which}")(
        shuffled)
    return keras.layers.Reshape((height, width, 2 * quarter), name=f"{name}_split{which}_image")(x)


def _shuffle_unit(x, out_channels, stride_, name, height, width):
    """One unit: ``x`` is an (H, W, C) tensor for a downsampling unit, else the shuffled layout."""
    branch = out_channels // 2
    if stride_ == 1:
        kept, y = _half(x, 0, height, width, name), _half(x, 1, height, width, name)
    else:  # both branches see the whole input and halve the resolution
        kept = _conv_bn(x, None, 3, stride_, f"{name}_left_0", depthwise=True, relu=False)
        kept = _conv_bn(kept, branch, 1, 1, f"{name}_left_1")
        y = x
    y = _conv_bn(y, branch, 1, 1, f"{name}_right_0")
    y = _conv_bn(y, None, 3, stride_, f"{name}_right_1", depthwise=True, relu=False)
    y = _conv_bn(y, branch, 1, 1, f"{name}_right_2")
    return _shuffle(keras.layers.Concatenate(name=f"{name}_concat")([kept, y]), name)


def build_shufflenetv2(num_classes, input_shape, width=1.0, repeats=(4, 8, 4), head=None, stem_stride=1):
    """ShuffleNetV2 for small images: a 3x3 stem (24 channels, no max pool), three stages of
    ``repeats`` units (the first one downsamples), a 1x1 head conv (1024 channels, 2048 at
    width 2.0; ``head=0`` leaves it out), pooling, Dense. x0.5 at 10 classes: 352,042
    parameters, 10.9 M MACs at 32x32.
    """
    inputs = _inputs(num_classes, input_shape)
    if not width > 0:
        raise InvalidArgumentError(f"width must be > 0, got {width}")
    if len(repeats) != 3 or min(repeats) < 1:
        raise InvalidArgumentError(f"repeats must be 3 counts >= 1, got {repeats}")
    _check_downsampling(8 * stem_stride, input_shape)
    head = (2048 if float(width) == 2.0 else 1024) if head is None else int(head)
    x = _conv_bn(inputs, SHUFFLENET_STEM, 3, stem_stride, "stem")
    height, width_ = x.shape[1:3]
    for stage, (channels, count) in enumerate(zip(shufflenet_channels(width), repeats)):
        if stage > 0:
            x = _image(x, height, width_, f"stage{stage + 1}")
        height, width_ = (height + 1) // 2, (width_ + 1) // 2  # the first unit's padded stride-2 convs
        for unit in range(count):
            x = _shuffle_unit(x, channels, 2 if unit == 0 else 1, f"stage{stage + 2}_unit{unit + 1}", height, width_)
    x = _image(x, height, width_, f"stage{len(repeats) + 1}")
    if head:
        x = _conv_bn(x, head, 1, 1, "head")
    return keras.Model(inputs, _classifier(x, num_classes), name=f"shufflenetv2_w{width:g}")


# --------------------------------------------------------------------------- plain VGG-style

VGG_OPTIONS = {
    "channels": dash_list(int_at_least(1)),
    "repeats": dash_list(int_at_least(1)),
    "strides": dash_list(stride),
}


def build_vgg(num_classes, input_shape, channels=(32, 64, 128), repeats=(2, 2, 2), strides=(1, 2, 2)):
    """Plain stages of 3x3 conv + BN + ReLU (``repeats`` per stage, the first with the stage's
    stride), pooling, Dense: no branches, so every op is a convolution XNNPACK runs as one
    int8 GEMM (BN folds into it). The defaults: 288,746 parameters at 10 classes.
    """
    if not len(channels) == len(repeats) == len(strides):
        raise InvalidArgumentError(f"channels, repeats and strides need one value per stage, got {len(channels)}, "
                                   f"{len(repeats)} and {len(strides)}")
    inputs = _inputs(num_classes, input_shape)
    _check_downsampling(math.prod(strides), input_shape)
    x = inputs
    for stage, (filters, count, first_stride) in enumerate(zip(channels, repeats, strides)):
        for index in range(count):
            x = _conv_bn(x, filters, 3, first_stride if index == 0 else 1, f"stage{stage + 1}_{index + 1}")
    return keras.Model(inputs, _classifier(x, num_classes), name="vgg_student")
