"""The IG overlay and the training input pipeline, as pure TF ops on batches.

With probability ``p`` an image x in [0,1] becomes (1 - beta) x + beta m, where m is
the teacher's IG map raised to a random power s = exp(U(ln a, ln b)), min-max
normalised per map, and tiled to the image's channels.

By default the map is cropped and flipped together with its image, so it stays on the
pixels it explains. ``paper_mode=True`` reproduces the authors' code: the image is
augmented and the map is blended untransformed.
"""
import kdig_tf  # noqa: F401

import math

import numpy as np
import tensorflow as tf

from kdig_tf import data
from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError, UnknownKeyError
from kdig_tf.records import MissingMapsError

# Below this range a map is treated as constant and contributes zeros, not NaNs.
CONSTANT_MAP_EPSILON = 1e-12
TARGET_ORDERS = ("aligned", "shuffled")


def check_overlay_args(p, beta=0.5, power_range=(1.0, 2.0)):
    if not 0.0 <= p <= 1.0:
        raise InvalidArgumentError(f"overlay probability p must be in [0, 1], got {p}")
    if not 0.0 <= beta <= 1.0:
        raise InvalidArgumentError(f"overlay weight beta must be in [0, 1], got {beta}")
    low, high = power_range
    if not 0.0 < low <= high:
        raise InvalidArgumentError(f"power_range must satisfy 0 < a <= b, got {power_range}")


def normalize_maps(maps, powers):
    """maps [B,H,W] >= 0, powers [B] -> per-map min-max normalised maps^power in [0,1]."""
    powered = tf.pow(maps, powers[:, None, None])
    low = tf.reduce_min(powered, axis=[1, 2], keepdims=True)
    span = tf.reduce_max(powered, axis=[1, 2], keepdims=True) - low
    return tf.where(span > CONSTANT_MAP_EPSILON, (powered - low) / tf.maximum(span, CONSTANT_MAP_EPSILON),
                    tf.zeros_like(powered))


def overlay_batch(images, maps, seed, p, beta=0.5, power_range=(1.0, 2.0)):
    """Blend maps into a batch of [0,1] images with probability p each.

    images [B,H,W,C] float in [0,1]; maps [B,H,W]; ``seed`` is a stateless seed [2].
    Returns (images, applied [B] bool).
    """
    images = tf.convert_to_tensor(images, tf.float32)
    maps = tf.convert_to_tensor(maps, tf.float32)
    if images.shape.rank != 4 or maps.shape.rank != 3:
        raise ShapeMismatchError(f"expected images [B,H,W,C] and maps [B,H,W], got {images.shape}, {maps.shape}")
    if images.shape[1:3].is_fully_defined() and maps.shape[1:3].is_fully_defined() \
            and images.shape[1:3] != maps.shape[1:3]:
        raise ShapeMismatchError(f"map shape {maps.shape[1:]} does not match image shape {images.shape[1:3]}")
    batch = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 2)
    applied = tf.random.stateless_uniform([batch], seeds[0]) < p
    log_low, log_high = math.log(power_range[0]), math.log(power_range[1])
    powers = tf.exp(tf.random.stateless_uniform([batch], seeds[1], log_low, log_high)) \
        if log_high > log_low else tf.fill([batch], float(power_range[0]))
    overlays = normalize_maps(maps, powers)[..., None]
    blended = (1.0 - beta) * images + beta * overlays
    return tf.where(applied[:, None, None, None], blended, images), applied


# The one crop/flip of kdig_tf lives with the data; the overlay pipelines use it on batches.
crop_flip_batch = data.crop_flip_batch


def split_batch_seed(seed):
    """A batch's (crop_seed, overlay_seed). Pipelines without an overlay crop with the same
    crop_seed, so every arm of a campaign sees the same crops for the same seed."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, 2))


def augmentation_mode(augment):
    """``augment`` as one of ``data.AUGMENTATIONS``: True is crop_flip (the CIFAR recipe), False none."""
    if augment is True or augment is False:
        return "crop_flip" if augment else "none"
    return data.check_augmentation(augment)


def augment_and_overlay(images_uint8, maps, seed, p, beta=0.5, power_range=(1.0, 2.0), augment=True,
                        paper_mode=False, pad=None):
    """uint8 images + maps -> student inputs in [0,1], augmentation then overlay.

    ``augment`` is True (crop_flip), False or a ``data.AUGMENTATIONS`` mode; ``pad`` the
    crop's padding (default: ``data.augment_pad`` of the image size).
    """
    mode = augmentation_mode(augment)
    images = tf.cast(images_uint8, tf.float32) / 255.0
    maps = tf.convert_to_tensor(maps, tf.float32)
    crop_seed, overlay_seed = split_batch_seed(seed)
    if mode != "none":
        if paper_mode:
            images = data.augment_batch(images, crop_seed, mode, pad)
        else:
            stacked = data.augment_batch(tf.concat([images, maps[..., None]], axis=-1), crop_seed, mode, pad)
            images, maps = stacked[..., :-1], stacked[..., -1]
    images, _ = overlay_batch(images, maps, overlay_seed, p, beta, power_range)
    return images


def target_permutation(num_examples, seed):
    """The misalignment control's pairing: image i gets the targets of example perm[i]."""
    return np.random.default_rng(seed).permutation(num_examples)


def index_mask(keep_indices, num_examples):
    """Boolean [num_examples] lookup table, True at ``keep_indices``."""
    mask = np.zeros(num_examples, bool)
    mask[np.asarray(keep_indices, np.int64)] = True
    return tf.constant(mask)


# Spacing of per-epoch seeds: epoch e's batch b gets the stateless seed (seed, e * EPOCH_STRIDE + b).
EPOCH_STRIDE = 1 << 32


def seeded_epochs(examples, batch_size, seed=0, shuffle=True, shuffle_buffer=None, epochs=None,
                  initial_epoch=0, drop_remainder=False):
    """Batches of ``examples`` paired with a stateless seed [2], epoch after epoch.

    With ``epochs``, the dataset holds epochs ``initial_epoch .. epochs-1`` back to back
    (give ``fit`` its ``steps_per_epoch``). Each epoch's order and each batch's seed are
    functions of (seed, epoch index) alone, so a run resumed at epoch k sees exactly the
    batches an uninterrupted run saw from epoch k on. Without ``epochs``, each iteration
    is one freshly reshuffled epoch (not reproducible across a restart).
    """
    if epochs is not None and not 0 <= initial_epoch <= epochs:
        raise InvalidArgumentError(f"need 0 <= initial_epoch <= epochs, got {initial_epoch} and {epochs}")
    seed = int(seed)
    if not 0 <= seed < 2**31:  # seed * EPOCH_STRIDE must stay inside int64
        raise InvalidArgumentError(f"seed must be in [0, 2**31), got {seed}")
    examples = examples.cache()
    buffer = shuffle_buffer or int(examples.cardinality())
    if buffer < 1:  # unknown cardinality (e.g. after a filter): count once; the data is cached
        buffer = max(int(examples.reduce(0, lambda count, _: count + 1)), 1)
    if epochs is None:
        ordered = examples.shuffle(buffer, seed=seed, reshuffle_each_iteration=True) if shuffle else examples
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        return tf.data.Dataset.zip((ordered.batch(batch_size, drop_remainder=drop_remainder), seeds))

    def one_epoch(epoch):
        ordered = examples
        if shuffle:
            # A Python seed per epoch (a tensor seed is not accepted); + 1 keeps it non-zero,
            # since an all-zero seed pair makes the shuffle non-deterministic.
            ordered = ordered.shuffle(buffer, seed=seed * EPOCH_STRIDE + epoch + 1, reshuffle_each_iteration=False)
        batches = ordered.batch(batch_size, drop_remainder=drop_remainder)
        return batches.enumerate().map(
            lambda index, batch: (batch, tf.stack([tf.constant(seed, tf.int64), epoch * EPOCH_STRIDE + index])))

    stream = one_epoch(initial_epoch)
    if initial_epoch == epochs:
        return stream.take(0)
    for epoch in range(initial_epoch + 1, epochs):
        stream = stream.concatenate(one_epoch(epoch))
    return stream


def training_dataset(store, batch_size, p=0.1, beta=0.5, power_range=(1.0, 2.0), seed=0, augment=True,
                     paper_mode=False, shuffle=True, cached_targets_order="aligned", repeat=False,
                     drop_remainder=False, return_target_ids=False, keep_indices=None, epochs=None,
                     initial_epoch=0, mix=None):
    """Batches of (student_input, label, teacher_logits, id) from a :class:`records.Store`.

    Records are shuffled as serialized strings, batched, then parsed in one op per batch.
    ``cached_targets_order="shuffled"`` is the misalignment control: every image is given
    another image's logits and map, as the paper's released code did by accident.
    ``keep_indices`` restricts training to those store indices (e.g. a stratified subset).
    ``epochs``/``initial_epoch``: see :func:`seeded_epochs` (what makes a resumed run
    see the same data as an uninterrupted one). ``augment``: True (crop_flip), False, or a
    ``data.AUGMENTATIONS`` mode. ``mix``: a ``kdig_tf.mixing.Mix`` applied after the overlay.
    """
    check_overlay_args(p, beta, power_range)
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    if p > 0 and not store.has_maps:
        raise MissingMapsError(f"{store.store_dir} is a logits-only store: the IG overlay (p={p}) needs a store "
                               "built with IG maps")
    if cached_targets_order not in TARGET_ORDERS:
        raise UnknownKeyError(f"cached_targets_order must be one of {TARGET_ORDERS}, got {cached_targets_order!r}")
    image_shape = store.image_shape
    augmentation_mode(augment)
    pad = data.augment_pad(*image_shape[:2])
    ds = store.raw_dataset()
    if keep_indices is not None:
        mask = index_mask(keep_indices, store.num_examples)
        index_spec = {"index": tf.io.FixedLenFeature([], tf.int64)}
        ds = ds.filter(lambda record: tf.gather(mask, tf.io.parse_single_example(record, index_spec)["index"]))
    ds = seeded_epochs(ds, batch_size, seed, shuffle, store.num_examples, epochs, initial_epoch, drop_remainder)
    ds = ds.map(lambda records, batch_seed: (store.parse(records), batch_seed), num_parallel_calls=tf.data.AUTOTUNE)

    if cached_targets_order == "shuffled":
        everything = store.read_all()
        permutation = target_permutation(store.num_examples, seed)
        logits_table = tf.constant(everything["logits"][permutation])
        maps_table = tf.constant(everything["map"][permutation])
        ids_table = tf.constant(everything["id"][permutation])

        def swap_targets(batch, batch_seed):
            batch = dict(batch)
            batch["logits"] = tf.gather(logits_table, batch["index"])
            batch["map"] = tf.gather(maps_table, batch["index"])
            batch["target_id"] = tf.gather(ids_table, batch["index"])
            return batch, batch_seed
        ds = ds.map(swap_targets, num_parallel_calls=tf.data.AUTOTUNE)

    def to_training_example(batch, batch_seed):
        if batch["map"].shape[1:] != image_shape[:2]:
            raise ShapeMismatchError(f"maps {batch['map'].shape[1:]} do not match images {image_shape[:2]}")
        inputs = augment_and_overlay(batch["image"], batch["map"], batch_seed, p, beta, power_range,
                                     augment=augment, paper_mode=paper_mode, pad=pad)
        labels = batch["label"]
        if mix is not None:  # a kdig_tf.mixing.Mix, after the overlay: labels become distributions
            inputs, labels = mix(inputs, labels, batch_seed)
        example = (inputs, labels, batch["logits"], batch["id"])
        if return_target_ids:
            example += (batch.get("target_id", batch["id"]),)
        return example

    ds = ds.map(to_training_example, num_parallel_calls=tf.data.AUTOTUNE)
    if repeat:
        ds = ds.repeat()
    return ds.prefetch(tf.data.AUTOTUNE)
