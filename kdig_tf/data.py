"""tfds loading, the two preprocessing paths, and training augmentation.

Every example is ``(image uint8 [H,W,C], label int64, example_id string)``. The id is
tfds' ``id`` feature when the dataset has one (CIFAR-10: ``train_00000``...), else a
stable ``<split>_<index>`` built from the unshuffled read order. All cached values in
kdig_tf are keyed by this id, never by position.
"""
import kdig_tf  # noqa: F401

import os

import tensorflow as tf
import tensorflow_datasets as tfds

from kdig_tf.errors import UnknownDatasetError, UnknownSplitError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
DEFAULT_DATASET = "cifar10"
AUTOTUNE = tf.data.AUTOTUNE


def default_data_dir(data_dir=None):
    return data_dir or os.environ.get("TFDS_DATA_DIR") or None


def _translate_tfds_error(err, name, split, data_dir):
    """Map tfds' generic exceptions onto kdig_tf's named errors."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, tfds.core.registered.DatasetNotFoundError):
        return UnknownDatasetError(f"unknown tfds dataset {name!r}")
    if isinstance(err, AssertionError) and "could not find data" in text:
        return UnknownDatasetError(
            f"dataset {name!r} is not prepared in {default_data_dir(data_dir)!r}; pass data_dir, "
            "set TFDS_DATA_DIR, or allow download=True")
    if isinstance(err, (ValueError, KeyError)) and ("split" in text.lower() or "slice" in text.lower()):
        return UnknownSplitError(f"bad split {split!r} for {name}: {text}")
    return None


def load(name=DEFAULT_DATASET, split="train", data_dir=None, download=False, shuffle_files=False):
    """Return (dataset of (image, label, example_id), DatasetInfo).

    ``download`` is explicit and False by default: an offline ``tfds.load`` that tries to
    download hangs for minutes. Order is deterministic (files are not shuffled).
    """
    try:
        ds, info = tfds.load(name, download=download, split=split, data_dir=default_data_dir(data_dir),
                             shuffle_files=shuffle_files, with_info=True)
    except (AssertionError, ValueError, KeyError) as err:
        named = _translate_tfds_error(err, name, split, data_dir)
        if named is None:
            raise
        raise named from err
    image_key = _image_key(info)
    if "id" in info.features:
        ds = ds.map(lambda ex: (ex[image_key], ex["label"], ex["id"]), num_parallel_calls=AUTOTUNE,
                    deterministic=True)
    else:
        prefix = split.replace("[", "_").replace("]", "").replace(":", "-")
        ds = ds.enumerate().map(
            lambda index, ex: (
                ex[image_key],
                ex["label"],
                tf.strings.join([prefix, tf.strings.as_string(index, width=6, fill="0")], "_"),
            ),
            num_parallel_calls=AUTOTUNE, deterministic=True,
        )
    return ds, info


def count_examples(ds):
    """Number of elements of a finite dataset (cheap when tfds knows the cardinality)."""
    cardinality = int(ds.cardinality())
    if cardinality >= 0:
        return cardinality
    return int(ds.reduce(0, lambda count, *_: count + 1))


def _image_key(info):
    for key in ("image", "img"):
        if key in info.features:
            return key
    raise UnknownDatasetError(f"dataset {info.name!r} has no image feature: {list(info.features)}")


def num_classes(info):
    return int(info.features["label"].num_classes)


def class_names(info):
    return list(info.features["label"].names)


def to_unit_range(image):
    """uint8 [0,255] -> float32 [0,1]."""
    return tf.cast(image, tf.float32) / 255.0


def normalize_teacher(image_unit, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """float [0,1] -> teacher input: (x - mean) / std per channel."""
    return (image_unit - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def preprocess_teacher(image):
    """uint8 image -> the teacher's normalised input."""
    return normalize_teacher(to_unit_range(image))


def preprocess_student(image):
    """uint8 image -> the student's raw [0,1] input."""
    return to_unit_range(image)


def random_crop_flip(image, pad=4, seed=None):
    """Zero-pad by ``pad``, random crop back to size, random horizontal flip, one image.

    ``seed`` is a stateless seed of shape [2]; without it one is drawn from the global
    generator. (Maps travel with their images in ``kdig_tf.overlay.crop_flip_batch``.)
    """
    shape = tf.shape(image)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    if seed is None:
        seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    top = tf.random.stateless_uniform([], seeds[0], maxval=2 * pad + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[1], maxval=2 * pad + 1, dtype=tf.int32)
    cropped = padded[top:top + shape[0], left:left + shape[1], :]
    flip = tf.random.stateless_uniform([], seeds[2]) < 0.5
    return tf.cond(flip, lambda: tf.reverse(cropped, axis=[1]), lambda: cropped)


def classification_dataset(ds, preprocess, batch_size, training=False, shuffle_buffer=50_000,
                           seed=0, cache=True, drop_remainder=False):
    """(image, label, id) -> batched (input, label) for keras ``fit``/``evaluate``.

    Augmentation (crop+flip) happens on uint8 before preprocessing, so the zero padding is
    black pixels in both paths, as torchvision's ``RandomCrop(32, padding=4)`` does.
    """
    ds = ds.map(lambda image, label, _id: (image, label))
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(lambda image, label: (random_crop_flip(image), label), num_parallel_calls=AUTOTUNE)
    ds = ds.map(lambda image, label: (preprocess(image), label), num_parallel_calls=AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(AUTOTUNE)
