"""Dataset loading, the two preprocessing paths, and training augmentation.

Every example is ``(image uint8 [H,W,C], label int64, example_id string)``. Two sources:

* a tfds name (``cifar10``...). The id is tfds' ``id`` feature when the dataset has one
  (CIFAR-10: ``train_00000``...), else a stable ``<split>_<index>`` built from the
  unshuffled read order. ``info`` is tfds' ``DatasetInfo``.
* ``folder:PATH``: one subfolder per class (class names are the sorted folder names, the
  label is the index in that list) holding png/jpg/jpeg/bmp/gif files. The id is the
  file's path relative to PATH (``cat/0001.png``). If every subfolder of PATH holds only
  class folders (``train/cat/...``, ``test/cat/...``), those subfolders are the splits and
  must hold the same classes; otherwise the single split is ``train``. Splits slice as in
  tfds (``train[:80%]``, ``train[45000:]``). Images are always decoded to 3 channels
  (grayscale is repeated, alpha dropped) and must share one size unless ``image_size`` is
  given. ``info`` is a :class:`FolderInfo`.

The order of a folder split, which is what a slice cuts, is fixed before slicing and does
not depend on any seed, on the machine or on the order files were written: tfds shuffles a
dataset once when it prepares it, and a folder gets the same treatment from a stable hash.
Each class's files are ordered by the sha256 of their id, and the classes are then
interleaved in proportion (:func:`folder_order`): a file at rank r of a class of n files sits
at (r + 1/2) / n of the split. So every contiguous slice, ``train[:90%]`` as well as
``train[90%:]``, holds each class in proportion, to within one file per class. Sorted ids,
read class after class, would make ``train[90%:]`` exactly the last class and the student
would never see it. This stratified order is the default because a percent slice of a
folder is nearly always a train/validation cut, which must keep every class on both sides;
``stratify=False`` keeps the plain hash order (classes in random proportions, as in tfds);
it is a :func:`load` argument only, not a distillation flag, because a run's IG store reads
its split through :func:`load` as well, and both must cut the same images. A tfds dataset
keeps tfds' own order: nothing here touches it.

:func:`check_split_classes` refuses a validation split holding a class that the training
split lacks, or holds only a handful of (``SplitClassMismatchError``); :func:`split_labels`
reads a split's labels without decoding its images, so the check is cheap.

All cached values in kdig_tf are keyed by the id, never by position. ``num_classes``,
``class_names`` and ``image_shape`` read either kind of ``info``.

Training augmentation is one of :data:`AUGMENTATIONS` (:func:`augment_batch`): a random crop
of the image zero-padded by :func:`augment_pad` (an eighth of its size: 4 pixels at 32 px,
as in the CIFAR recipe) and/or a horizontal flip, or nothing.
"""
import kdig_tf  # noqa: F401

import collections
import dataclasses
import fractions
import hashlib
import math
import os
import re
import types

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from kdig_tf.errors import (InvalidArgumentError, ShapeMismatchError, SplitClassMismatchError, UnknownDatasetError,
                            UnknownKeyError, UnknownSplitError, UnreadableImageError)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
DEFAULT_DATASET = "cifar10"
AUTOTUNE = tf.data.AUTOTUNE
FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
# A class with fewer training examples than this, where the other classes have many more, is
# as good as missing: the student cannot learn it, and its validation images only add noise.
MIN_TRAIN_EXAMPLES_PER_CLASS = 5
# Training augmentations: crop (zero-padded random crop) and/or horizontal flip.
AUGMENTATIONS = ("crop_flip", "crop", "flip", "none")


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
            "set TFDS_DATA_DIR, or allow the download (download=True, --download)")
    if isinstance(err, (ValueError, KeyError)) and ("split" in text.lower() or "slice" in text.lower()):
        return UnknownSplitError(f"bad split {split!r} for {name}: {text}")
    return None


def load(name=DEFAULT_DATASET, split="train", data_dir=None, download=False, shuffle_files=False,
         image_size=None, stratify=True):
    """Return (dataset of (image, label, example_id), info).

    ``name`` is a tfds name or ``folder:PATH`` (see the module docstring). ``image_size``
    (an int or ``(height, width)``) resizes every image (bilinear with antialiasing, rounded
    back to uint8); without it images are returned exactly as stored. Order is deterministic
    (files are not shuffled unless ``shuffle_files``, which folders ignore). A folder split
    is cut from its fixed hash order, classes interleaved in proportion unless ``stratify``
    is False (:func:`folder_order`); tfds datasets ignore ``stratify``.

    ``download`` only matters for tfds names and is False by default: a dataset already
    prepared in ``data_dir`` is always read without touching the network (an offline
    ``tfds.load`` that tries to download hangs for minutes); an unprepared one is downloaded
    and prepared only when ``download`` is True, else UnknownDatasetError is raised.
    """
    size = _image_size(image_size)
    if is_folder_dataset(name):
        return _load_folder(name, split, size, stratify)
    if download:
        _prepare_tfds(name, data_dir)
    try:
        ds, info = tfds.load(name, download=False, split=split, data_dir=default_data_dir(data_dir),
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
    if size is not None and tuple(ds.element_spec[0].shape[:2]) != size:
        ds = ds.map(lambda image, label, example_id: (resize_image(image, size), label, example_id),
                    num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds, info


def _prepare_tfds(name, data_dir):
    """Download and prepare ``name`` unless it is already prepared (checked offline)."""
    try:
        builder = tfds.builder(name, data_dir=default_data_dir(data_dir))
    except tfds.core.registered.DatasetNotFoundError as err:
        raise UnknownDatasetError(f"unknown tfds dataset {name!r}") from err
    if not builder.is_prepared():
        builder.download_and_prepare()


def is_folder_dataset(name):
    return str(name).startswith(FOLDER_PREFIX)


def _image_size(image_size):
    """None, an int or (height, width) -> None or a (height, width) tuple of positive ints."""
    if image_size is None:
        return None
    if isinstance(image_size, (str, bytes, bool, float)):
        raise InvalidArgumentError(f"image_size must be an int or (height, width), got {image_size!r}")
    if isinstance(image_size, (int, np.integer)):
        size = (int(image_size), int(image_size))
    else:
        try:
            values = list(image_size)
            size = tuple(int(v) for v in values)
        except (TypeError, ValueError) as err:
            raise InvalidArgumentError(f"image_size must be an int or (height, width), got {image_size!r}") from err
        if len(size) != 2 or any(isinstance(v, (bool, float)) for v in values):
            raise InvalidArgumentError(f"image_size must be an int or (height, width), got {image_size!r}")
    if min(size) < 1:
        raise InvalidArgumentError(f"image_size must be positive, got {image_size!r}")
    return size


def resize_image(image, size):
    """uint8 [H,W,C] -> uint8 [height,width,C]: bilinear with antialiasing, rounded."""
    resized = tf.image.resize(image, size, method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


@dataclasses.dataclass(frozen=True)
class FolderInfo:
    """What :func:`load` knows about a ``folder:`` split (tfds' ``DatasetInfo`` for the other kind)."""

    name: str  # as passed to load, "folder:PATH"
    root: str  # absolute PATH
    split: str  # as passed to load, e.g. "train[:80%]"
    class_names: tuple  # sorted class folder names; a label is an index in it
    image_shape: tuple  # (height, width, 3), after image_size
    num_examples: int  # in this (sliced) split
    splits: tuple  # the split names PATH offers

    @property
    def num_classes(self):
        return len(self.class_names)


def _visible_entries(path):
    try:
        return sorted((e for e in os.scandir(path) if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as err:
        raise UnknownDatasetError(f"cannot list {path}: {err}") from err


def _subfolders(path):
    return [e.name for e in _visible_entries(path) if e.is_dir()]


def _image_files(path):
    return [e.name for e in _visible_entries(path)
            if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]


def _folder_splits(root):
    """{split name: folder relative to root ('' for the root itself)} and the sorted class names."""
    if not os.path.isdir(root):
        raise UnknownDatasetError(f"folder dataset root {root} does not exist or is not a directory")
    top = _subfolders(root)
    if not top:
        raise UnknownDatasetError(f"{root} has no class folders: expected one subfolder per class holding "
                                  f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} images")
    inner = {folder: _subfolders(os.path.join(root, folder)) for folder in top}
    # Split folders hold only class folders; a class folder holds images.
    if all(inner[folder] and not _image_files(os.path.join(root, folder)) for folder in top):
        classes = inner[top[0]]
        for folder in top[1:]:
            if inner[folder] != classes:
                missing = sorted(set(classes) ^ set(inner[folder]))
                raise UnknownDatasetError(
                    f"splits {top[0]!r} and {folder!r} of {root} hold different class folders ({missing}); "
                    "every split must hold the same classes so that labels agree")
        return {folder: folder for folder in top}, classes
    return {"train": ""}, top


def _split_files(root, split_folder, classes, stratify=True):
    """[(id, label)] of one split in its fixed order (:func:`folder_order`); an empty class folder is an error."""
    files = []
    for label, class_name in enumerate(classes):
        rel_folder = f"{split_folder}/{class_name}" if split_folder else class_name
        names = _image_files(os.path.join(root, rel_folder))
        if not names:
            raise UnknownDatasetError(
                f"class folder {os.path.join(root, rel_folder)} holds no "
                f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} images")
        files.extend((f"{rel_folder}/{file}", label) for file in names)
    return folder_order(files, stratify)


def example_hash(example_id):
    """The sha256 (hex) of an example id: a folder's order key, the same on every machine."""
    return hashlib.sha256(str(example_id).encode("utf-8")).hexdigest()


def folder_order(files, stratify=True):
    """The fixed order of one folder split's ``[(id, label)]``, which its slices cut.

    Files are ordered by :func:`example_hash` of their id (as tfds shuffles once at
    preparation, but with no seed). With ``stratify`` the classes are then interleaved: the
    file at rank r (in hash order) of a class of n files is placed at (r + 1/2) / n, exact
    fractions, ties to the lower label. Any contiguous run of the result then holds each class
    in proportion to within about one file, so a 90/10 cut keeps every class of about 10 or
    more files on both sides.
    """
    hashed = sorted(files, key=lambda item: (example_hash(item[0]), item[0]))
    if not stratify:
        return hashed
    members = collections.defaultdict(list)
    for item in hashed:
        members[item[1]].append(item)
    placed = sorted((fractions.Fraction(2 * rank + 1, 2 * len(group)), label, rank)
                    for label, group in members.items() for rank in range(len(group)))
    return [members[label][rank] for _, label, rank in placed]


def _select(split, files_per_split, name):
    """tfds split syntax (``train[:80%]``, ``train[100:200]``, ``train+test``) on ordered files."""
    lengths = {s: types.SimpleNamespace(num_examples=len(f), shard_lengths=[len(f)])
               for s, f in files_per_split.items()}
    try:
        instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(lengths)
    except (ValueError, NotImplementedError, AssertionError) as err:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnknownSplitError(f"bad split {split!r} for {name} (splits: {sorted(files_per_split)}): {text}") from err
    selected = []
    for instruction in instructions:
        selected.extend(files_per_split[instruction.splitname][instruction.from_:instruction.to])
    if not selected:
        raise UnknownSplitError(f"split {split!r} of {name} selects no images")
    return selected


def _folder_selection(name, split, stratify=True):
    """(root, class names, {split: ordered files}, selected [(id, label)]) of a folder split, nothing decoded."""
    path = os.path.expanduser(name[len(FOLDER_PREFIX):])
    if not path:
        raise UnknownDatasetError(f"{name!r}: expected folder:PATH")
    root = os.path.abspath(path)
    split_folders, classes = _folder_splits(root)
    files_per_split = {s: _split_files(root, folder, classes, stratify) for s, folder in split_folders.items()}
    return root, classes, files_per_split, _select(str(split), files_per_split, name)


def _load_folder(name, split, size, stratify=True):
    root, classes, files_per_split, selected = _folder_selection(name, split, stratify)
    ids = [example_id for example_id, _ in selected]
    paths = [os.path.join(root, *example_id.split("/")) for example_id in ids]
    sizes = _checked_sizes(paths)
    if size is None:
        for file, found in zip(paths, sizes):
            if found != sizes[0]:
                raise ShapeMismatchError(
                    f"{file} is {found[0]}x{found[1]} but {paths[0]} is {sizes[0][0]}x{sizes[0][1]}: images of a "
                    "split must share one size, or pass image_size")
        shape = (*sizes[0], 3)
    else:
        shape = (*size, 3)
    resize = size is not None and any(found != size for found in sizes)

    def decode(file, label, example_id):
        image = _decode_file(file)
        image = resize_image(image, size) if resize else tf.ensure_shape(image, shape)
        return image, label, example_id

    labels = np.array([label for _, label in selected], np.int64)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels, ids))
    ds = ds.map(decode, num_parallel_calls=AUTOTUNE, deterministic=True)
    info = FolderInfo(name=name, root=root, split=str(split), class_names=tuple(classes), image_shape=shape,
                      num_examples=len(ids), splits=tuple(sorted(files_per_split)))
    return ds, info


def _decode_file(path):
    """The one decoder used both to check files and to read them: first frame, 3 channels, uint8."""
    return tf.io.decode_image(tf.io.read_file(path), channels=3, dtype=tf.uint8, expand_animations=False)


# (path, mtime_ns, size) -> (height, width): a split loaded again in the same process is not decoded again.
_CHECKED_SIZES = {}


def _checked_sizes(paths):
    """Decode every file once, now, so a bad file is named at load time rather than failing mid-epoch."""
    keys = []
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as err:
            raise UnreadableImageError(f"cannot read {path}: {err}") from err
        keys.append((path, stat.st_mtime_ns, stat.st_size))
    pending = [key for key in keys if key not in _CHECKED_SIZES]
    todo = [key[0] for key in pending]
    for path in todo:
        if path.lower().endswith(".bmp"):
            _refuse_misread_bmp(path)
    found = []
    if todo:
        shapes = (tf.data.Dataset.from_tensor_slices(todo)
                  .map(lambda file: tf.shape(_decode_file(file))[:2], num_parallel_calls=AUTOTUNE,
                       deterministic=True)
                  .batch(256))
        try:
            for batch in shapes:
                found.extend(tuple(int(v) for v in row) for row in batch.numpy())
        except tf.errors.OpError:
            # The failing file is in the batch after the last complete one.
            _raise_first_unreadable(todo[len(found):])
            raise
    _CHECKED_SIZES.update(zip(pending, found))
    return [_CHECKED_SIZES[key] for key in keys]


def _raise_first_unreadable(paths):
    for path in paths:
        try:
            _decode_file(path)
        except tf.errors.OpError as err:
            # Keep the decoder's sentence, not TF's "{{function_node ...}}" and "[Op:...]" wrapping.
            message = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", err.message.splitlines()[0] if err.message else "").strip()
            raise UnreadableImageError(f"cannot decode {path} as an image: {message}") from err


def _refuse_misread_bmp(path):
    """TF decodes palette BMPs as raw indices (wrong colours, no error) and fails on 1-bit ones."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.format == "BMP" and image.mode not in ("RGB", "RGBA", "L"):
                raise UnreadableImageError(f"{path} is a {image.mode!r} (palette or 1-bit) BMP, which TensorFlow "
                                           "decodes wrongly; convert it to PNG")
    except (OSError, UnidentifiedImageError) as err:
        raise UnreadableImageError(f"cannot read {path} as an image: {err}") from err


def count_examples(ds):
    """Number of elements of a finite dataset (cheap when tfds knows the cardinality)."""
    cardinality = int(ds.cardinality())
    if cardinality >= 0:
        return cardinality
    return int(ds.reduce(0, lambda count, *_: count + 1))


def split_labels(name, split="train", data_dir=None, download=False, stratify=True):
    """The labels (int64 array) of a split, in :func:`load`'s order, without decoding an image.

    A folder's come from its file listing; a tfds dataset's from its records with the image
    left undecoded (the records, and so the order, are those :func:`load` reads).
    """
    if is_folder_dataset(name):
        selected = _folder_selection(name, split, stratify)[3]
        return np.array([label for _, label in selected], np.int64)
    if download:
        _prepare_tfds(name, data_dir)
    try:
        try:
            features = tfds.builder(name, data_dir=default_data_dir(data_dir)).info.features
        except tfds.core.registered.DatasetNotFoundError as err:
            raise UnknownDatasetError(f"unknown tfds dataset {name!r}") from err
        ds = tfds.load(name, split=split, data_dir=default_data_dir(data_dir), download=False,
                       decoders={_image_key(types.SimpleNamespace(features=features, name=name)):
                                 tfds.decode.SkipDecoding()})
    except (AssertionError, ValueError, KeyError) as err:
        named = _translate_tfds_error(err, name, split, data_dir)
        if named is None:
            raise
        raise named from err
    batches = ds.map(lambda example: example["label"], num_parallel_calls=AUTOTUNE).batch(8192)
    return np.concatenate([np.zeros(0, np.int64), *(batch.astype(np.int64) for batch in batches.as_numpy_iterator())])


def folder_split_ids(name, split="train", stratify=True):
    """The example ids of a folder split, in :func:`load`'s order, without decoding an image."""
    if not is_folder_dataset(name):
        raise InvalidArgumentError(f"{name!r} is not a folder:PATH dataset")
    return [example_id for example_id, _ in _folder_selection(name, split, stratify)[3]]


def check_split_classes(train_labels, val_labels, class_names=None, train_split="train", val_split="validation"):
    """Raise SplitClassMismatchError if the validation split holds a class the training split
    lacks, or holds fewer than MIN_TRAIN_EXAMPLES_PER_CLASS examples of while its median class
    has at least four times that many (a nearly held-out class; a tiny dataset where every
    class is small is left alone). Returns the training examples per class.
    """
    train_counts = collections.Counter(int(label) for label in np.asarray(train_labels).reshape(-1))
    val_counts = collections.Counter(int(label) for label in np.asarray(val_labels).reshape(-1))
    median = float(np.median(list(train_counts.values()))) if train_counts else 0.0

    def name(label):
        return class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)

    missing = sorted(label for label in val_counts if train_counts[label] == 0)
    scarce = sorted(label for label in val_counts if 0 < train_counts[label] < MIN_TRAIN_EXAMPLES_PER_CLASS
                    and median >= 4 * MIN_TRAIN_EXAMPLES_PER_CLASS)
    problems = []
    if missing:
        problems.append(f"classes {[name(label) for label in missing]} are not in training split {train_split!r} "
                        f"at all (validation holds {[val_counts[label] for label in missing]} images of them)")
    if scarce:
        problems.append(f"classes {[name(label) for label in scarce]} have only "
                        f"{[train_counts[label] for label in scarce]} training images (the median class has "
                        f"{median:g})")
    if problems:
        raise SplitClassMismatchError(
            f"validation split {val_split!r} has classes the student cannot learn: {'; '.join(problems)}. Give "
            "splits that hold every class (folder splits are stratified by default; a class folder needs "
            f"{MIN_TRAIN_EXAMPLES_PER_CLASS}+ training images)")
    return {label: train_counts[label] for label in sorted(train_counts)}


def _image_key(info):
    for key in ("image", "img"):
        if key in info.features:
            return key
    raise UnknownDatasetError(f"dataset {info.name!r} has no image feature: {list(info.features)}")


def num_classes(info):
    if isinstance(info, FolderInfo):
        return info.num_classes
    return int(info.features["label"].num_classes)


def class_names(info):
    if isinstance(info, FolderInfo):
        return list(info.class_names)
    return list(info.features["label"].names)


def image_shape(info, image_size=None):
    """(height, width, channels) of the images ``load`` yields; pass the ``image_size`` given to it.

    A tfds dataset of variable-size images has ``None`` height and width unless resized.
    """
    if isinstance(info, FolderInfo):
        shape = tuple(info.image_shape)
    else:
        shape = tuple(info.features[_image_key(info)].shape)
    size = _image_size(image_size)
    return shape if size is None else (*size, shape[-1])


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


def crop_flip_batch(images, seed, pad=4, crop=True, flip=True):
    """Per-example random crop (zero padding ``pad``) and horizontal flip, vectorised.

    One gather along rows and one along columns crop every example at its own offset.
    Any extra channels (e.g. a stacked map) move with the image. ``pad`` is an int or
    (rows, columns). ``crop``/``flip`` switch either part off; the random draws do not
    change, so a crop-only batch has exactly the crops of the crop-and-flip one.
    """
    pad_rows, pad_columns = (pad, pad) if isinstance(pad, (int, np.integer)) else (int(pad[0]), int(pad[1]))
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(seed, 3)
    rows = tf.tile(tf.range(height)[None, :], [batch, 1])
    columns = tf.tile(tf.range(width)[None, :], [batch, 1])
    if crop:
        images = tf.pad(images, [[0, 0], [pad_rows, pad_rows], [pad_columns, pad_columns], [0, 0]])
        top = tf.random.stateless_uniform([batch], seeds[0], maxval=2 * pad_rows + 1, dtype=tf.int32)
        left = tf.random.stateless_uniform([batch], seeds[1], maxval=2 * pad_columns + 1, dtype=tf.int32)
        rows = top[:, None] + rows
        columns = left[:, None] + columns
    if flip:
        flipped = tf.random.stateless_uniform([batch], seeds[2]) < 0.5
        columns = tf.where(flipped[:, None], tf.reverse(columns, axis=[1]), columns)
    cropped = tf.gather(images, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, columns, axis=2, batch_dims=1)


def augment_pad(height, width):
    """The crop's zero padding for an image size: an eighth of each side, rounded half up, at least 1.

    4 pixels at CIFAR's 32 x 32, as in its standard ``RandomCrop(32, padding=4)``; 8 at 64 px.
    """
    return tuple(max(1, int(math.floor(side / 8 + 0.5))) for side in (height, width))


def check_augmentation(mode):
    if mode not in AUGMENTATIONS:
        raise UnknownKeyError(f"unknown augmentation {mode!r}; known: {AUGMENTATIONS}")
    return mode


def augment_batch(images, seed, mode="crop_flip", pad=None):
    """Augment a batch [B,H,W,C] with one of :data:`AUGMENTATIONS` and a stateless ``seed`` [2].

    ``none`` returns ``images`` itself. The crop is padded by ``pad``, by default
    :func:`augment_pad` of the batch's static size.
    """
    check_augmentation(mode)
    if mode == "none":
        return images
    if pad is None:
        height, width = images.shape[1], images.shape[2]
        if height is None or width is None:
            raise ShapeMismatchError(f"augmentation needs images of a known size (or a pad), got {images.shape}")
        pad = augment_pad(height, width)
    return crop_flip_batch(images, seed, pad, crop=mode in ("crop_flip", "crop"), flip=mode in ("crop_flip", "flip"))


def random_crop_flip(image, pad=4, seed=None):
    """:func:`crop_flip_batch` for one image [H,W,C].

    ``seed`` is a stateless seed of shape [2]; without it one is drawn from the global generator.
    """
    if seed is None:
        seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
    return crop_flip_batch(image[None], tf.cast(seed, tf.int64), pad)[0]


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
