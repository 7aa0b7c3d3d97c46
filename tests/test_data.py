import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import tiny_tfds
from kdig_tf import data
from kdig_tf.errors import UnknownDatasetError, UnknownSplitError


def _image(seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    tiny_tfds.prepare(directory)
    return str(directory)


def test_preprocess_teacher_matches_formula():
    image = _image()
    expected = (image.astype(np.float64) / 255.0 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
    actual = data.preprocess_teacher(tf.constant(image)).numpy()
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_preprocess_student_is_unit_range():
    image = _image(1)
    actual = data.preprocess_student(tf.constant(image)).numpy()
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, image / 255.0, atol=1e-7)
    extremes = data.to_unit_range(tf.constant([0, 255], tf.uint8)).numpy()
    assert extremes.tolist() == [0.0, 1.0]


def test_random_crop_flip_keeps_shape_and_is_a_padded_crop():
    image = tf.constant(_image(2))
    out = data.random_crop_flip(image, pad=4, seed=[3, 4]).numpy()
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    padded = np.pad(image.numpy(), [(4, 4), (4, 4), (0, 0)])
    windows = [padded[top:top + 32, left:left + 32] for top in range(9) for left in range(9)]
    assert any(np.array_equal(out, w) or np.array_equal(out, w[:, ::-1]) for w in windows)


def test_random_crop_flip_is_seeded():
    image = tf.constant(_image(3))
    first = data.random_crop_flip(image, seed=[5, 6]).numpy()
    assert np.array_equal(first, data.random_crop_flip(image, seed=[5, 6]).numpy())
    others = [data.random_crop_flip(image, seed=[s, 0]).numpy() for s in range(8)]
    assert any(not np.array_equal(first, other) for other in others)


def test_random_crop_flip_without_padding_only_flips():
    image = _image(4, size=8)
    outputs = [data.random_crop_flip(tf.constant(image), pad=0, seed=[s, 1]).numpy() for s in range(12)]
    assert all(np.array_equal(o, image) or np.array_equal(o, image[:, ::-1]) for o in outputs)
    assert any(np.array_equal(o, image[:, ::-1]) for o in outputs)
    assert any(np.array_equal(o, image) for o in outputs)


def test_mock_load_returns_image_label_id():
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        ds, info = data.load("cifar10", "train")
        examples = list(ds)
    assert len(examples) == 5
    image, label, example_id = examples[0]
    assert image.dtype == tf.uint8 and image.shape == (32, 32, 3)
    assert label.dtype == tf.int64 and label.shape == ()
    assert example_id.dtype == tf.string and example_id.shape == ()
    assert data.num_classes(info) == 10
    assert len(data.class_names(info)) == 10


def test_prepared_load_keeps_ids(tiny_dir):
    ds, info = data.load(tiny_tfds.NAME, "train", tiny_dir)
    ids = sorted(example_id.numpy().decode() for _, _, example_id in ds)
    assert ids == [f"train_{i:05d}" for i in range(12)]
    assert data.count_examples(ds) == 12
    subset, _ = data.load(tiny_tfds.NAME, "train[:5]", tiny_dir)
    assert data.count_examples(subset) == 5


def test_unknown_dataset():
    with pytest.raises(UnknownDatasetError, match="no_such_dataset_xyz"):
        data.load("no_such_dataset_xyz", "train")


def test_dataset_not_prepared(tmp_path):
    with pytest.raises(UnknownDatasetError, match="not prepared"):
        data.load("cifar10", "train", data_dir=str(tmp_path))


@pytest.mark.parametrize("split", ["test", "validation", "bogus[:10]"])
def test_unknown_split(tiny_dir, split):
    with pytest.raises(UnknownSplitError, match="train"):
        data.load(tiny_tfds.NAME, split, tiny_dir)


def test_translate_tfds_error():
    named = data._translate_tfds_error(ValueError("Unknown split 'test'. Should be one of ['train']."),
                                       "cifar10", "test", None)
    assert isinstance(named, UnknownSplitError)
    assert data._translate_tfds_error(ValueError("something else"), "cifar10", "train", None) is None


def test_classification_dataset_batches_and_preprocesses():
    images = np.stack([_image(i) for i in range(5)])
    labels = np.arange(5, dtype=np.int64)
    raw = tf.data.Dataset.from_tensor_slices((images, labels, [f"id{i}" for i in range(5)]))
    batches = list(data.classification_dataset(raw, data.preprocess_student, batch_size=2))
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    np.testing.assert_allclose(batches[0][0].numpy(), images[:2] / 255.0, atol=1e-7)
    assert batches[2][1].numpy().tolist() == [4]
    train = data.classification_dataset(raw, data.preprocess_teacher, batch_size=5, training=True)
    inputs, _ = next(iter(train))
    assert inputs.shape == (5, 32, 32, 3) and inputs.dtype == tf.float32
