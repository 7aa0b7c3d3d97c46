"""Mixup and CutMix on training batches, with soft labels, as pure stateless TF ops.

A :class:`Mix` turns a batch of ``[0, 1]`` images (already augmented and overlaid) and class ids
into mixed images and label distributions [B, C]. Each image is paired with another image of the
batch (a random permutation) and a weight lam ~ Beta(alpha, alpha) per example:

- ``mixup``: x = lam * x_i + (1 - lam) * x_j, y = lam * y_i + (1 - lam) * y_j (Zhang et al. 2018);
- ``cutmix``: a box of about (1 - lam) of the image is pasted from x_j, and y weighs the two labels
  by the pixels each image keeps (Yun et al. 2019).

The draws are functions of the batch's stateless seed alone, so a resumed run mixes the same batches.
A teacher that scores this batch (online) is consistent with the student; cached logits of the
un-mixed images cannot be, and a config asking for both is refused (``InconsistentTeachingError``).
"""
import kdig_tf  # noqa: F401

import dataclasses

import tensorflow as tf

from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError, UnknownKeyError

MIXES = ("none", "mixup", "cutmix")
# Folded into a batch's seed: the mix draws are independent of its crop and overlay draws.
MIX_SALT = 0x6D6978


def check_mix(mode, alpha):
    if mode not in MIXES:
        raise UnknownKeyError(f"unknown mix {mode!r}; known: {MIXES}")
    if mode != "none" and not float(alpha) > 0:
        raise InvalidArgumentError(f"mix_alpha (the Beta distribution's parameter) must be > 0, got {alpha}")


def beta_sample(shape, seed, alpha):
    """Stateless Beta(alpha, alpha) draws, as G1 / (G1 + G2) of two Gamma(alpha) draws."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    first = tf.random.stateless_gamma(shape, seeds[0], alpha)
    second = tf.random.stateless_gamma(shape, seeds[1], alpha)
    total = first + second
    # Both draws underflow to 0 only for tiny alpha: an even mix then.
    return tf.where(total > 0, first / tf.where(total > 0, total, 1.0), 0.5)


def box_masks(height, width, keep, seed):
    """[B, H, W] float masks, 1 inside a box of about (1 - keep) of the image (its centre uniform,
    clipped at the borders), and the fraction of each image outside the box [B]."""
    batch = tf.shape(keep)[0]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    side = tf.sqrt(1.0 - keep)
    centre_y = tf.random.stateless_uniform([batch], seeds[0], 0.0, float(height))
    centre_x = tf.random.stateless_uniform([batch], seeds[1], 0.0, float(width))

    def bounds(centre, extent, size):
        low = tf.clip_by_value(tf.round(centre - extent / 2.0), 0.0, float(size))
        high = tf.clip_by_value(tf.round(centre + extent / 2.0), 0.0, float(size))
        return low, high

    top, bottom = bounds(centre_y, side * height, height)
    left, right = bounds(centre_x, side * width, width)
    rows = tf.range(height, dtype=tf.float32)[None, :]
    cols = tf.range(width, dtype=tf.float32)[None, :]
    in_rows = tf.cast((rows >= top[:, None]) & (rows < bottom[:, None]), tf.float32)
    in_cols = tf.cast((cols >= left[:, None]) & (cols < right[:, None]), tf.float32)
    masks = in_rows[:, :, None] * in_cols[:, None, :]
    kept = 1.0 - (bottom - top) * (right - left) / float(height * width)
    return masks, kept


def mix_batch(images, labels, seed, mode, alpha, num_classes):
    """(mixed images [B,H,W,C], label distributions [B, num_classes]) of a batch; ``seed`` a stateless seed [2].

    ``labels`` are class ids [B]; the pairing and the weights are functions of ``seed`` (:func:`mix_draws`).
    """
    images = tf.convert_to_tensor(images, tf.float32)
    if images.shape.rank != 4:
        raise ShapeMismatchError(f"expected images [B,H,W,C], got {images.shape}")
    one_hot = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
    if mode == "none":
        return images, one_hot
    partner, lam, box_seed = mix_draws(tf.shape(images)[0], seed, alpha)
    other_images, other_labels = tf.gather(images, partner), tf.gather(one_hot, partner)
    if mode == "mixup":
        kept = lam
        mixed = lam[:, None, None, None] * images + (1.0 - lam[:, None, None, None]) * other_images
    elif mode == "cutmix":
        height, width = images.shape[1], images.shape[2]
        if height is None or width is None:
            raise ShapeMismatchError(f"cutmix needs images of a static size, got {images.shape}")
        masks, kept = box_masks(height, width, lam, box_seed)
        mixed = tf.where(masks[..., None] > 0, other_images, images)
    else:
        raise UnknownKeyError(f"unknown mix {mode!r}; known: {MIXES}")
    return mixed, kept[:, None] * one_hot + (1.0 - kept[:, None]) * other_labels


def mix_draws(batch, seed, alpha):
    """(partner index [B], lam [B], seed of the CutMix box) of a batch's mix."""
    seeds = tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(seed, MIX_SALT), 3)
    partner = tf.argsort(tf.random.stateless_uniform([batch], seeds[0]))
    return partner, beta_sample([batch], seeds[1], alpha), seeds[2]


@dataclasses.dataclass(frozen=True)
class Mix:
    """A batch transform ``(images, labels, batch_seed) -> (images, label distributions)``."""
    mode: str
    alpha: float
    num_classes: int

    def __post_init__(self):
        check_mix(self.mode, self.alpha)
        if int(self.num_classes) < 2:
            raise InvalidArgumentError(f"a mix needs at least 2 classes, got {self.num_classes}")

    def __call__(self, images, labels, batch_seed):
        return mix_batch(images, labels, batch_seed, self.mode, self.alpha, self.num_classes)


def make_mix(mode, alpha, num_classes):
    """The :class:`Mix` of ``mode``, or None for ``"none"`` (the batches keep their class ids)."""
    check_mix(mode, alpha)
    return None if mode == "none" else Mix(mode, float(alpha), int(num_classes))
