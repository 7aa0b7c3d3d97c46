"""data.load beyond prepared tfds: the download decision, image folders, and image_size."""
import hashlib
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import tiny_tfds
from kdig_tf import data
from kdig_tf.errors import (InvalidArgumentError, ShapeMismatchError, UnknownDatasetError, UnknownSplitError,
                            UnreadableImageError)

CLASSES = {"bird": 3, "cat": 4, "dog": 5}  # uneven, so a label cannot come from position by accident
SIZE = 40
_REAL_DOWNLOAD_AND_PREPARE = tfds.core.DatasetBuilder.download_and_prepare  # before any monkeypatch


def _pixels(label, index, size=SIZE):
    return np.random.default_rng(100 * label + index).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _write_classes(root, classes=CLASSES):
    """root/<class>/<index>.png; returns {id: (pixels, label)}."""
    expected = {}
    for label, (name, count) in enumerate(sorted(classes.items())):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for index in range(count):
            pixels = _pixels(label, index)
            Image.fromarray(pixels).save(os.path.join(root, name, f"{index:04d}.png"))
            expected[f"{name}/{index:04d}.png"] = (pixels, label)
    return expected


def _read(ds):
    return [(image.numpy(), int(label), example_id.numpy().decode()) for image, label, example_id in ds]


def _documented_order(labels_by_id):
    """The folder order as the data module's docstring states it, written out independently: sha256 of
    the id within each class, the file at rank r of a class of n placed at (r + 1/2) / n, ties to the lower label."""
    by_class = {}
    for example_id in sorted(labels_by_id, key=lambda i: hashlib.sha256(i.encode("utf-8")).hexdigest()):
        by_class.setdefault(labels_by_id[example_id], []).append(example_id)
    placed = sorted(((2 * rank + 1) / (2 * len(ids)), label, example_id)
                    for label, ids in by_class.items() for rank, example_id in enumerate(ids))
    return [example_id for *_, example_id in placed]


def _offline_prepare(builder):
    # The real method, without its GCS lookup: the tiny dataset is generated locally.
    _REAL_DOWNLOAD_AND_PREPARE(
        builder, download_config=tfds.download.DownloadConfig(try_download_gcs=False))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    expected = _write_classes(str(root))
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored: not an image extension
    (root / "README.md").write_text("ignored: files beside the class folders")
    return str(root), expected


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    _offline_prepare(tiny_tfds.KdigTinyImages(data_dir=str(directory)))
    return str(directory)


# The download decision for tfds names.

def test_prepared_dataset_is_never_downloaded(tiny_dir, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("download_and_prepare called for a prepared dataset")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)
    for download in (True, False):
        ds, info = data.load(tiny_tfds.NAME, "train", tiny_dir, download=download)
        assert data.count_examples(ds) == 12 and data.num_classes(info) == tiny_tfds.NUM_CLASSES


def test_unprepared_dataset_is_downloaded_only_when_allowed(tmp_path, monkeypatch):
    calls = []

    def fake(self, *args, **kwargs):
        calls.append(self.name)
        _offline_prepare(self)

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fake)
    with pytest.raises(UnknownDatasetError, match="not prepared"):
        data.load(tiny_tfds.NAME, "train", str(tmp_path), download=False)
    assert calls == []
    ds, _ = data.load(tiny_tfds.NAME, "train[:5]", str(tmp_path), download=True)
    assert calls == [tiny_tfds.NAME]
    ids = [i for _, _, i in _read(ds)]  # tfds shuffles records when it writes them: compare as sets
    assert len(set(ids)) == 5 and set(ids) <= {f"train_{i:05d}" for i in range(12)}
    data.load(tiny_tfds.NAME, "train", str(tmp_path), download=True)  # prepared now: no second call
    assert calls == [tiny_tfds.NAME]


def test_unknown_dataset_with_download(tmp_path):
    with pytest.raises(UnknownDatasetError, match="no_such_dataset_xyz"):
        data.load("no_such_dataset_xyz", "train", str(tmp_path), download=True)


def test_split_labels_are_the_labels_load_reads(tiny_dir):
    for split in ("train", "train[2:9]", "train[50%:]"):
        labels = data.split_labels(tiny_tfds.NAME, split, tiny_dir)
        assert labels.dtype == np.int64
        assert list(labels) == [label for _, label, _ in _read(data.load(tiny_tfds.NAME, split, tiny_dir)[0])]
    with pytest.raises(UnknownDatasetError):
        data.split_labels("no_such_dataset_xyz", "train", tiny_dir)
    with pytest.raises(UnknownSplitError):
        data.split_labels(tiny_tfds.NAME, "validation", tiny_dir)


# image_size on tfds data.

def test_tfds_image_size(tiny_dir):
    plain, info = data.load(tiny_tfds.NAME, "train[:3]", tiny_dir)
    same, _ = data.load(tiny_tfds.NAME, "train[:3]", tiny_dir, image_size=32)
    small, _ = data.load(tiny_tfds.NAME, "train[:3]", tiny_dir, image_size=(16, 24))
    assert data.image_shape(info) == (32, 32, 3) and data.image_shape(info, (16, 24)) == (16, 24, 3)
    assert small.element_spec[0].shape == (16, 24, 3) and small.element_spec[0].dtype == tf.uint8
    for (image, label, example_id), (same_image, *_), (small_image, small_label, small_id) in zip(
            _read(plain), _read(same), _read(small)):
        assert np.array_equal(image, same_image)  # the native size changes nothing
        reference = tf.image.resize(image, (16, 24), antialias=True).numpy()
        assert np.abs(small_image.astype(float) - reference).max() <= 0.5
        assert (small_label, small_id) == (label, example_id)


@pytest.mark.parametrize("bad", [0, -3, (32,), (32, 0), "32", 32.0, True, (32, 32.5)])
def test_bad_image_size(tiny_dir, bad):
    with pytest.raises(InvalidArgumentError):
        data.load(tiny_tfds.NAME, "train", tiny_dir, image_size=bad)


# Image folders.

def test_folder_labels_ids_and_order(folder):
    root, expected = folder
    ds, info = data.load("folder:" + root, "train")
    examples = _read(ds)
    ids = [example_id for _, _, example_id in examples]
    assert ids == _documented_order({i: label for i, (_, label) in expected.items()})
    assert sorted(ids) == sorted(expected) and ids != sorted(ids)
    for image, label, example_id in examples:
        assert np.array_equal(image, expected[example_id][0])
        assert label == expected[example_id][1]
    assert [spec.dtype for spec in ds.element_spec] == [tf.uint8, tf.int64, tf.string]
    assert ds.element_spec[0].shape == (SIZE, SIZE, 3)
    assert data.count_examples(ds) == 12 and int(ds.cardinality()) == 12
    assert data.num_classes(info) == 3 and data.class_names(info) == ["bird", "cat", "dog"]
    assert data.image_shape(info) == (SIZE, SIZE, 3) and info.num_examples == 12 and info.splits == ("train",)
    again, _ = data.load("folder:" + root)
    assert [i for _, _, i in _read(again)] == ids


@pytest.mark.parametrize("split,ids", [
    ("train[:50%]", slice(0, 6)), ("train[3:7]", slice(3, 7)), ("train[10:]", slice(10, 12)),
    ("train[-2:]", slice(10, 12)), ("train[:-25%]", slice(0, 9))])
def test_folder_slicing(folder, split, ids):
    root, expected = folder
    order = _documented_order({i: label for i, (_, label) in expected.items()})
    ds, info = data.load("folder:" + root, split)
    assert [i for _, _, i in _read(ds)] == order[ids]
    assert info.num_examples == len(order[ids]) and data.num_classes(info) == 3
    assert list(data.split_labels("folder:" + root, split)) == [expected[i][1] for i in order[ids]]


@pytest.mark.parametrize("split", ["test", "validation", "train[", "train[20:]", "train[5:5]"])
def test_folder_bad_split(folder, split):
    with pytest.raises(UnknownSplitError, match="train"):
        data.load("folder:" + folder[0], split)


def test_folder_resize(folder):
    root, expected = folder
    ds, info = data.load("folder:" + root, "train[:4]", image_size=32)
    assert info.image_shape == (32, 32, 3) and data.image_shape(info) == (32, 32, 3)
    assert ds.element_spec[0].shape == (32, 32, 3)
    for image, _, example_id in _read(ds):
        assert image.dtype == np.uint8
        reference = tf.image.resize(expected[example_id][0], (32, 32), antialias=True).numpy()
        assert np.abs(image.astype(float) - reference).max() <= 0.5
    native, _ = data.load("folder:" + root, "train[:4]", image_size=SIZE)
    assert all(np.array_equal(image, expected[i][0]) for image, _, i in _read(native))


def test_folder_formats_give_three_channels(tmp_path):
    rgb = _pixels(0, 0, size=8)
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    Image.fromarray(rgb).save(tmp_path / "a" / "rgb.BMP")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "a" / "rgba.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "b" / "gray.png")
    Image.fromarray(rgb).save(tmp_path / "b" / "photo.jpeg", quality=95)
    Image.fromarray(rgb).convert("P").save(tmp_path / "b" / "palette.gif")
    examples = {i: (image, label) for image, label, i in _read(data.load(f"folder:{tmp_path}")[0])}
    assert sorted(examples) == ["a/rgb.BMP", "a/rgba.png", "b/gray.png", "b/palette.gif", "b/photo.jpeg"]
    assert all(image.shape == (8, 8, 3) for image, _ in examples.values())
    assert np.array_equal(examples["a/rgb.BMP"][0], rgb) and np.array_equal(examples["a/rgba.png"][0], rgb)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(examples["b/gray.png"][0], np.repeat(gray[..., None], 3, axis=-1))
    assert [examples[i][1] for i in sorted(examples)] == [0, 0, 1, 1, 1]


def test_folder_train_test_splits(tmp_path):
    train = _write_classes(str(tmp_path / "train"), {"a": 2, "b": 3})
    test = _write_classes(str(tmp_path / "test"), {"a": 1, "b": 2})
    train_order = _documented_order({f"train/{i}": label for i, (_, label) in train.items()})
    test_order = _documented_order({f"test/{i}": label for i, (_, label) in test.items()})
    ds, info = data.load(f"folder:{tmp_path}", "train")
    assert [(i, label) for _, label, i in _read(ds)] == [(i, train[i[len("train/"):]][1]) for i in train_order]
    assert info.splits == ("test", "train") and data.class_names(info) == ["a", "b"]
    ds, info = data.load(f"folder:{tmp_path}", "test")
    assert [(i, label) for _, label, i in _read(ds)] == [(i, test[i[len("test/"):]][1]) for i in test_order]
    ds, _ = data.load(f"folder:{tmp_path}", "train[:1]+test[-1:]")
    assert [i for _, _, i in _read(ds)] == [train_order[0], test_order[-1]]
    with pytest.raises(UnknownSplitError, match="validation"):
        data.load(f"folder:{tmp_path}", "validation")
    os.makedirs(tmp_path / "test" / "c")
    with pytest.raises(UnknownDatasetError, match="different class folders"):
        data.load(f"folder:{tmp_path}", "train")


def test_folder_corrupt_files(tmp_path):
    written = _write_classes(str(tmp_path), {"a": 2, "b": 2})
    data.load(f"folder:{tmp_path}")  # checked once; the checks below must see the files change
    (tmp_path / "b" / "0001.png").write_bytes(b"not an image at all")
    with pytest.raises(UnreadableImageError, match="0001.png"):
        data.load(f"folder:{tmp_path}")
    bad = _documented_order({i: label for i, (_, label) in written.items()}).index("b/0001.png")
    data.load(f"folder:{tmp_path}", f"train[:{bad}]" if bad else "train[1:]")  # only the selected files are read
    whole = (tmp_path / "a" / "0000.png").read_bytes()
    (tmp_path / "b" / "0001.png").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UnreadableImageError, match="b/0001.png"):
        data.load(f"folder:{tmp_path}")
    os.remove(tmp_path / "b" / "0001.png")
    Image.fromarray(_pixels(0, 0, 8)).convert("P").save(tmp_path / "b" / "0001.bmp")
    with pytest.raises(UnreadableImageError, match="BMP"):  # TF would decode its palette indices silently
        data.load(f"folder:{tmp_path}")


def test_folder_size_mismatch(tmp_path):
    expected = _write_classes(str(tmp_path), {"a": 2, "b": 2})
    Image.fromarray(_pixels(1, 1, size=36)).save(tmp_path / "b" / "0001.png")
    with pytest.raises(ShapeMismatchError, match="b/0001.png is 36x36"):
        data.load(f"folder:{tmp_path}")
    ds, info = data.load(f"folder:{tmp_path}", image_size=SIZE)
    images = {i: image for image, _, i in _read(ds)}
    assert info.image_shape == (SIZE, SIZE, 3) and images["b/0001.png"].shape == (SIZE, SIZE, 3)
    assert np.array_equal(images["a/0000.png"], expected["a/0000.png"][0])


def test_folder_bad_roots(tmp_path):
    with pytest.raises(UnknownDatasetError, match="does not exist"):
        data.load(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(UnknownDatasetError, match="folder:PATH"):
        data.load("folder:")
    Image.fromarray(_pixels(0, 0)).save(tmp_path / "loose.png")
    with pytest.raises(UnknownDatasetError, match="no class folders"):
        data.load(f"folder:{tmp_path}")
    _write_classes(str(tmp_path), {"a": 1})
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UnknownDatasetError, match="empty holds no"):
        data.load(f"folder:{tmp_path}")
