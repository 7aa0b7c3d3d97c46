import numpy as np
import pytest
import tensorflow as tf

from kdig_tf import overlay
from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError

SEED = tf.constant([7, 11], tf.int64)


def _batch(batch=6, size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (batch, size, size, 3)).astype(np.float32)
    maps = rng.uniform(0, 5, (batch, size, size)).astype(np.float32)
    return tf.constant(images), tf.constant(maps)


def test_p_zero_leaves_images_untouched():
    images, maps = _batch()
    out, applied = overlay.overlay_batch(images, maps, SEED, p=0.0)
    np.testing.assert_array_equal(out.numpy(), images.numpy())
    assert not applied.numpy().any()


def test_p_one_equals_the_formula():
    images, maps = _batch()
    out, applied = overlay.overlay_batch(images, maps, SEED, p=1.0, beta=0.3, power_range=(1.5, 1.5))
    powered = maps.numpy() ** 1.5
    low = powered.min(axis=(1, 2), keepdims=True)
    high = powered.max(axis=(1, 2), keepdims=True)
    expected = 0.7 * images.numpy() + 0.3 * ((powered - low) / (high - low))[..., None]
    assert applied.numpy().all()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_random_power_stays_in_range():
    images, maps = _batch()
    maps = tf.tile(tf.linspace(0.0, 1.0, 8)[None, None, :], [6, 8, 1])  # a ramp: m^s reveals s
    out, _ = overlay.overlay_batch(tf.zeros_like(images), maps, SEED, p=1.0, beta=1.0)
    middle = out.numpy()[:, 0, 4, 0]  # 0.5714^s
    powers = np.log(middle) / np.log(4 / 7)
    assert np.all((powers >= 1.0 - 1e-5) & (powers <= 2.0 + 1e-5))
    assert np.ptp(powers) > 0.05  # really random per image


def test_empirical_rate_is_within_three_sigma():
    n, p = 10_000, 0.1
    images, maps = tf.zeros((n, 2, 2, 3)), tf.random.uniform((n, 2, 2))
    _, applied = overlay.overlay_batch(images, maps, SEED, p=p)
    rate = applied.numpy().mean()
    assert abs(rate - p) <= 3 * np.sqrt(p * (1 - p) / n)


def test_constant_map_gives_zeros_not_nan():
    normalised = overlay.normalize_maps(tf.fill((2, 4, 4), 3.0), tf.constant([1.0, 2.0]))
    assert np.all(normalised.numpy() == 0.0)


def test_map_follows_crop_and_flip_by_default_and_not_in_paper_mode():
    # The image is its own map, so an aligned overlay reproduces the augmented image exactly.
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 1, (32, 16, 16)).astype(np.float32)
    # The centre survives every 4-pixel crop, so each map keeps its min 0 and max 1.
    maps[:, 8, 8], maps[:, 8, 9] = 0.0, 1.0
    images = np.round(np.repeat(maps[..., None], 3, axis=-1) * 255).astype(np.uint8)
    maps = images[..., 0].astype(np.float32) / 255.0
    kwargs = dict(p=1.0, beta=0.5, power_range=(1.0, 1.0))
    plain = overlay.augment_and_overlay(images, maps, SEED, p=0.0)
    aligned = overlay.augment_and_overlay(images, maps, SEED, **kwargs)
    paper = overlay.augment_and_overlay(images, maps, SEED, paper_mode=True, **kwargs)
    assert not np.allclose(plain.numpy(), images / 255.0)  # augmentation happened
    # Crop padding puts zeros in image and map alike; min-max of a map with 0 and 1 is itself.
    np.testing.assert_allclose(aligned.numpy(), plain.numpy(), atol=1e-6)
    moved = [not np.allclose(paper.numpy()[i], plain.numpy()[i], atol=1e-6) for i in range(32)]
    assert np.mean(moved) > 0.5
    np.testing.assert_allclose(paper.numpy(), 0.5 * plain.numpy() + 0.5 * maps[..., None], atol=1e-6)


def test_crop_flip_keeps_shape_and_pixels():
    images = tf.random.uniform((5, 8, 8, 4))
    out = overlay.crop_flip_batch(images, SEED).numpy()
    assert out.shape == (5, 8, 8, 4)
    # Every output pixel is an input pixel or the zero padding.
    values = set(np.round(images.numpy().ravel(), 6)) | {0.0}
    assert set(np.round(out.ravel(), 6)) <= values


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_p_outside_unit_interval_is_refused(p):
    with pytest.raises(InvalidArgumentError):
        overlay.check_overlay_args(p)


def test_bad_power_range_and_beta_are_refused():
    with pytest.raises(InvalidArgumentError):
        overlay.check_overlay_args(0.1, power_range=(0.0, 2.0))
    with pytest.raises(InvalidArgumentError):
        overlay.check_overlay_args(0.1, beta=2.0)


def test_map_shape_must_match_image():
    images, _ = _batch(size=8)
    with pytest.raises(ShapeMismatchError):
        overlay.overlay_batch(images, tf.zeros((6, 7, 8)), SEED, p=0.5)


def _batches(dataset):
    return [(batch.numpy().tolist(), seed.numpy().tolist()) for batch, seed in dataset]


def test_seeded_epochs_resumed_at_epoch_k_equal_the_tail_of_a_full_run():
    examples = tf.data.Dataset.range(10)
    full = _batches(overlay.seeded_epochs(examples, 4, seed=3, epochs=3))
    assert len(full) == 9  # 3 epochs x ceil(10 / 4) batches
    resumed = _batches(overlay.seeded_epochs(examples, 4, seed=3, epochs=3, initial_epoch=1))
    assert resumed == full[3:]
    epoch_orders = [sum((batch for batch, _ in full[start:start + 3]), []) for start in (0, 3, 6)]
    assert all(sorted(order) == list(range(10)) for order in epoch_orders)
    assert len({tuple(order) for order in epoch_orders}) == 3  # each epoch has its own order
    assert len({tuple(seed) for _, seed in full}) == 9  # and every batch its own seed
    assert _batches(overlay.seeded_epochs(examples, 4, seed=4, epochs=3)) != full


def test_seeded_epochs_without_epochs_reshuffle_on_each_iteration():
    dataset = overlay.seeded_epochs(tf.data.Dataset.range(50), 50, seed=0)
    first, second = _batches(dataset), _batches(dataset)
    assert len(first) == len(second) == 1 and first != second


def test_seeded_epochs_refuse_a_resume_point_past_the_end_and_bad_seeds():
    with pytest.raises(InvalidArgumentError):
        overlay.seeded_epochs(tf.data.Dataset.range(4), 2, epochs=2, initial_epoch=3)
    with pytest.raises(InvalidArgumentError):
        overlay.seeded_epochs(tf.data.Dataset.range(4), 2, seed=-1, epochs=2)


def test_seeded_epochs_shuffle_all_examples_when_the_size_is_unknown():
    examples = tf.data.Dataset.range(40).filter(lambda value: value >= 0)  # cardinality unknown
    (batch, _), = _batches(overlay.seeded_epochs(examples, 40, seed=1, epochs=1))
    assert sorted(batch) == list(range(40)) and batch != list(range(40))
