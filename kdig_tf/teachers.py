"""A fast, strong teacher family for small images: the CIFAR speed-run ResNet ("speedrun").

Built from the ingredients of the public CIFAR-10 speed-run work (Keller Jordan's airbench,
itself after Page's "How to train your ResNet"):

* a 2x2 patch-whitening first convolution whose kernel is computed from training images
  (eigenvectors of the patch covariance, scaled by 1/sqrt(eigenvalue), and their negatives)
  and then frozen;
* three blocks of conv3x3 - maxpool2 - BatchNorm - GELU, then ``convs_per_block - 1`` more
  conv-BN-GELU layers; with 3 convs the last two are wrapped in a residual connection;
* dirac (identity) initialisation of every 3x3 conv's first ``in`` output channels, so each
  block starts close to an identity of its input;
* BatchNorm without a learned scale (the convs before it are scale-free anyway);
* global max pooling, a bias-free Dense, and a fixed logit scale (1/9).

Every layer is a stock tf-keras layer, so a saved teacher loads in plain tf-keras. The
network is a *core* in kdig_tf's sense (it takes ``(x/255 - mean)/std``); the training
script wraps it into a pixel model with the dataset's own mean and std. Any image size
works (global max pooling), but the image must survive three 2x poolings (>= 16 px).
"""
import kdig_tf  # noqa: F401

import numpy as np
import tensorflow as tf
import tf_keras as keras

from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError

# airbench widths: 94 % (64/256/256, 2 convs), 95 % (128/384/384, 2 convs), 96 % (128/512/512, 3 convs)
PRESET_WIDTHS = {"s": (64, 256, 256), "m": (128, 384, 384), "l": (128, 512, 512)}
WHITENING_LAYER = "whiten"
LOGIT_SCALE = 1.0 / 9.0
BN_EPSILON = 1e-5
# PyTorch's default BatchNorm momentum 0.1 (airbench96 after its 2024-06 update), Keras' convention.
BN_MOMENTUM = 0.9
MIN_IMAGE_SIZE = 16


def _conv(filters, name, kernel_size=3, trainable=True, padding="same"):
    return keras.layers.Conv2D(filters, kernel_size, padding=padding, use_bias=False, name=name, trainable=trainable)


def _bn(name):
    # No gamma: the conv before it already sets the scale (airbench freezes gamma at 1).
    return keras.layers.BatchNormalization(scale=False, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _gelu(name):
    return keras.layers.Activation("gelu", name=name)


def build_speedrun_teacher(num_classes, input_shape=(32, 32, 3), widths=PRESET_WIDTHS["l"], convs_per_block=3,
                           whitening=True, whitening_kernel=2, logit_scale=LOGIT_SCALE, name=None):
    """The speed-run ResNet as a core network (normalised input -> logits).

    ``widths`` are the channels of the three blocks, ``convs_per_block`` 2 (plain) or 3 (the
    last two residual). ``whitening=False`` makes the first conv an ordinary trainable conv of
    the same shape. Weight decay lives in the optimiser (``teacher_recipe.RecipeSGD``), not in
    regularisers, so the saved model carries no training-only state.
    """
    widths = tuple(int(w) for w in widths)
    if int(num_classes) < 2:
        raise InvalidArgumentError(f"num_classes must be >= 2, got {num_classes}")
    if len(widths) != 3 or min(widths) < 1:
        raise InvalidArgumentError(f"widths must be three positive channel counts, got {widths}")
    if convs_per_block not in (2, 3):
        raise InvalidArgumentError(f"convs_per_block must be 2 or 3, got {convs_per_block}")
    if len(input_shape) != 3 or min(input_shape[:2]) < MIN_IMAGE_SIZE:
        raise ShapeMismatchError(f"the speedrun teacher needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, "
                                 f"got input_shape {tuple(input_shape)}")
    channels = int(input_shape[-1])
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = _conv(2 * channels * whitening_kernel ** 2, WHITENING_LAYER, whitening_kernel, trainable=not whitening,
              padding="valid")(inputs)
    x = _gelu("whiten_act")(x)
    for block, width in enumerate(widths, start=1):
        prefix = f"block{block}"
        x = _conv(width, f"{prefix}_conv1")(x)
        x = keras.layers.MaxPooling2D(2, name=f"{prefix}_pool")(x)
        x = _gelu(f"{prefix}_act1")(_bn(f"{prefix}_bn1")(x))
        shortcut = x
        for index in range(2, convs_per_block + 1):
            x = _bn(f"{prefix}_bn{index}")(_conv(width, f"{prefix}_conv{index}")(x))
            if index == convs_per_block and convs_per_block == 3:
                x = keras.layers.Add(name=f"{prefix}_residual")([x, shortcut])
            x = _gelu(f"{prefix}_act{index}")(x)
    x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
    x = keras.layers.Dense(num_classes, use_bias=False, name="classifier")(x)
    # float32 logits whatever the mixed-precision policy (KD and the loss are float32 maths).
    outputs = keras.layers.Rescaling(logit_scale, name="logit_scale", dtype="float32")(x)
    if name is None:
        name = f"speedrun_{'_'.join(map(str, widths))}_c{convs_per_block}"
    model = keras.Model(inputs, outputs, name=name)
    apply_dirac_init(model)
    return model


def apply_dirac_init(model):
    """Set each 3x3 conv's first ``in`` output channels to the identity (PyTorch's ``dirac_``)."""
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Conv2D) or layer.name == WHITENING_LAYER:
            continue
        kernel = layer.kernel.numpy()
        height, width, fan_in, fan_out = kernel.shape
        identity = min(fan_in, fan_out)
        kernel[..., :identity] = 0.0
        kernel[height // 2, width // 2, np.arange(identity), np.arange(identity)] = 1.0
        layer.kernel.assign(kernel)


def whitening_kernel_from_images(images, kernel_size=2, eps=5e-4):
    """(k, k, C, 2*C*k*k) kernel: the whitening eigenbasis of the images' k x k patches, and its negative.

    ``images`` are float [N, H, W, C] in the network's input space. Deterministic: eigh of a
    float64 covariance, with each eigenvector's sign fixed so its largest entry is positive.
    """
    images = np.asarray(images, np.float64)
    if images.ndim != 4 or not np.all(np.isfinite(images)):
        raise InvalidArgumentError("whitening needs finite images of shape [N, H, W, C]")
    count, height, width, channels = images.shape
    patches = np.stack([images[:, i:height - kernel_size + 1 + i, j:width - kernel_size + 1 + j, :]
                        for i in range(kernel_size) for j in range(kernel_size)], axis=3)
    # patches: [N, H', W', k*k, C] -> rows in (kh, kw, C) order, the Conv2D kernel's order.
    patches = patches.reshape(-1, kernel_size * kernel_size * channels)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    signs = np.sign(eigenvectors[np.argmax(np.abs(eigenvectors), axis=0), np.arange(eigenvectors.shape[1])])
    eigenvectors = eigenvectors * np.where(signs == 0, 1.0, signs)
    scaled = eigenvectors / np.sqrt(np.maximum(eigenvalues, 0.0) + eps)
    kernel = np.concatenate([scaled, -scaled], axis=1)
    return kernel.reshape(kernel_size, kernel_size, channels, -1).astype(np.float32)


def init_whitening(model, images, eps=5e-4):
    """Compute and set the whitening layer's kernel from ``images`` (network input space)."""
    layer = model.get_layer(WHITENING_LAYER)
    kernel_size = layer.kernel.shape[0]
    kernel = whitening_kernel_from_images(images, kernel_size, eps)
    if kernel.shape != tuple(layer.kernel.shape):
        raise ShapeMismatchError(f"whitening kernel {kernel.shape} does not fit layer {tuple(layer.kernel.shape)}")
    layer.kernel.assign(kernel)
    return kernel


def tta_views(images, level):
    """[(weight, view)] of a batch: level 0 the image, 1 and its mirror, 2 and both 1-pixel shifts (reflect).

    The weights sum to 1: at level 2 the unshifted pair weighs 1/2 and the shifted pairs 1/4 each.
    """
    if level not in (0, 1, 2):
        raise InvalidArgumentError(f"TTA level must be 0, 1 or 2, got {level}")
    if level == 0:
        return [(1.0, images)]
    mirror = lambda x: [(0.5, x), (0.5, tf.reverse(x, axis=[2]))]  # noqa: E731
    if level == 1:
        return mirror(images)
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
    up_left = padded[:, :height, :width]
    down_right = padded[:, 2:height + 2, 2:width + 2]
    views = [(0.5 * w, v) for w, v in mirror(images)]
    views += [(0.25 * w, v) for shifted in (up_left, down_right) for w, v in mirror(shifted)]
    return views


def tta_logits(model, images, level=2):
    """Weighted mean of ``model``'s logits over :func:`tta_views` (inference mode)."""
    total = None
    for weight, view in tta_views(images, level):
        logits = tf.cast(model(view, training=False), tf.float32) * weight
        total = logits if total is None else total + logits
    return total
