"""Consistent teaching with mixing (issue 48.2): mixed labels, the teacher scores the mixed batch,
cached logits refused."""
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tf_keras as keras

from kdig_tf import distiller, mixing, models, overlay, pipeline, records
from kdig_tf.errors import InconsistentTeachingError, InvalidArgumentError, UnknownKeyError
from kdig_tf.io_utils import read_epoch_log

SEED = tf.constant([7, 11], tf.int64)
CLASSES = 10


def _batch(n=8, size=8):
    rng = np.random.default_rng(0)
    # Every pixel of every image distinct, so the source of a mixed pixel can be told.
    images = (np.arange(n * size * size * 3, dtype=np.float32).reshape(n, size, size, 3) + 1) / (n * size * size * 3)
    return tf.constant(rng.permutation(images)), tf.constant(rng.integers(0, CLASSES, n))


def test_mixup_images_and_labels():
    images, labels = _batch()
    mixed, soft = mixing.mix_batch(images, labels, SEED, "mixup", 0.4, CLASSES)
    partner, lam, _ = mixing.mix_draws(8, SEED, 0.4)
    partner, lam = partner.numpy(), lam.numpy()
    assert sorted(partner) == list(range(8)) and np.all((lam >= 0) & (lam <= 1)) and len(set(lam)) > 1
    x, y = images.numpy(), np.eye(CLASSES)[labels.numpy()]
    weight = lam[:, None, None, None]
    np.testing.assert_allclose(mixed.numpy(), weight * x + (1 - weight) * x[partner], rtol=1e-6)
    np.testing.assert_allclose(soft.numpy(), lam[:, None] * y + (1 - lam[:, None]) * y[partner], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(soft.numpy().sum(axis=1), 1.0, rtol=1e-6)


def test_cutmix_labels_weigh_the_pixels_each_image_keeps():
    images, labels = _batch()
    mixed, soft = mixing.mix_batch(images, labels, SEED, "cutmix", 1.0, CLASSES)
    partner, _, _ = mixing.mix_draws(8, SEED, 1.0)
    x, out, partner = images.numpy(), mixed.numpy(), partner.numpy()
    y = np.eye(CLASSES)[labels.numpy()]
    pasted = 0
    for i in range(8):
        own = np.all(out[i] == x[i], axis=-1)
        other = np.all(out[i] == x[partner[i]], axis=-1)
        assert np.all(own | other)  # every pixel comes whole from one of the two images
        kept = own.mean() if partner[i] != i else 1.0
        np.testing.assert_allclose(soft.numpy()[i], kept * y[i] + (1 - kept) * y[partner[i]], atol=1e-6)
        pasted += int(partner[i] != i and kept < 1.0)
    assert pasted > 0


def test_mix_draws_depend_on_the_batch_seed_alone():
    images, labels = _batch()
    first = mixing.mix_batch(images, labels, SEED, "mixup", 1.0, CLASSES)
    again = mixing.mix_batch(images, labels, SEED, "mixup", 1.0, CLASSES)
    other = mixing.mix_batch(images, labels, SEED + 1, "mixup", 1.0, CLASSES)
    np.testing.assert_array_equal(first[0].numpy(), again[0].numpy())
    assert not np.array_equal(first[0].numpy(), other[0].numpy())


def test_bad_mix_settings():
    with pytest.raises(UnknownKeyError):
        mixing.check_mix("mixout", 1.0)
    with pytest.raises(InvalidArgumentError):
        mixing.check_mix("cutmix", 0.0)
    assert mixing.make_mix("none", 0.0, CLASSES) is None


@pytest.mark.parametrize("method", ["kd", "kd_ig", "kd_at", "kd_ig_at"])
def test_cached_logits_with_a_mix_are_refused(method):
    with pytest.raises(InconsistentTeachingError, match="cached teacher logits"):
        pipeline.DistillConfig(method=method, mix="mixup").validate()


@pytest.mark.parametrize("method", ["student", "ig", "kd_online", "kd_ig_online", "at"])
def test_a_mix_without_cached_logits_is_accepted(method):
    pipeline.DistillConfig(method=method, mix="cutmix", mix_alpha=0.5).validate()


class Recorder(keras.layers.Layer):
    """Identity that keeps what it was called with (eager runs)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def call(self, inputs):
        if tf.executing_eagerly():
            self.seen.append(inputs.numpy())
        return inputs


def _recording_model(name):
    inputs = keras.Input((32, 32, 3))
    recorder = Recorder(name=f"{name}_recorder")
    x = keras.layers.GlobalAveragePooling2D()(recorder(inputs))
    return keras.Model(inputs, keras.layers.Dense(CLASSES)(x), name=name), recorder


def test_the_online_teacher_scores_the_mixed_batch_the_student_trains_on():
    rng = np.random.default_rng(1)
    raw = tf.data.Dataset.from_tensor_slices((rng.integers(0, 256, (8, 32, 32, 3)).astype(np.uint8),
                                              np.arange(8) % CLASSES, [f"id{i}" for i in range(8)]))
    mix = mixing.make_mix("mixup", 1.0, CLASSES)
    batches = pipeline.distiller_batches(pipeline.plain_training_dataset(raw, 8, seed=3, epochs=1, mix=mix))
    (inputs, soft_labels), = list(batches)
    plain_inputs, plain_labels, _ = next(iter(pipeline.plain_training_dataset(raw, 8, seed=3, epochs=1)))
    assert soft_labels.shape == (8, CLASSES) and not np.array_equal(inputs["images"], plain_inputs)
    np.testing.assert_allclose(soft_labels.numpy().max(axis=1) >= 0.5, True)

    teacher, teacher_seen = _recording_model("teacher")
    student, student_seen = _recording_model("student")
    teacher_seen.seen.clear(), student_seen.seen.clear()
    model = distiller.paper_distiller(teacher, student, alpha=0.5, temperature=2.0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), run_eagerly=True)
    logs = model.fit(batches, epochs=1, verbose=0).history
    # Both bare models take pixels: each saw the mixed batch (x 255), once, and no other images.
    assert len(teacher_seen.seen) == 1 and len(student_seen.seen) == 1
    np.testing.assert_allclose(teacher_seen.seen[0], inputs["images"].numpy() * 255.0, rtol=1e-6)
    np.testing.assert_array_equal(teacher_seen.seen[0], student_seen.seen[0])
    assert logs["kd_loss"][0] > 0


def test_the_ce_uses_the_mixed_labels():
    student, _ = _recording_model("student")
    model = distiller.paper_distiller(None, student, alpha=0.0)
    images = tf.random.stateless_uniform((4, 32, 32, 3), [1, 2])
    soft = tf.constant(np.eye(CLASSES)[[0, 1, 2, 3]] * 0.7 + np.eye(CLASSES)[[4, 5, 6, 7]] * 0.3, tf.float32)
    logits = student(images * 255.0).numpy()
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected = -(soft.numpy() * log_probs).sum(axis=1).mean()
    np.testing.assert_allclose(float(model.compute_loss(images, soft, model(images))), expected, rtol=1e-5)


def test_the_overlay_comes_before_the_mix(tmp_path):
    keras.utils.set_random_seed(0)
    teacher = models.build_teacher(width_multiplier=0.25)
    store_dir = str(tmp_path / "store")
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        records.precompute_store(store_dir, records.TeacherTargets(teacher, steps=1),
                                 records.weights_fingerprint(teacher), "cifar10", "train", None,
                                 examples_per_shard=4, progress=False)
    store = records.Store(store_dir)
    mix = mixing.make_mix("cutmix", 1.0, store.num_classes)
    overlaid = list(overlay.training_dataset(store, 4, p=1.0, seed=5, epochs=1))
    mixed = list(overlay.training_dataset(store, 4, p=1.0, seed=5, epochs=1, mix=mix))
    assert len(mixed) == len(overlaid) == 2
    for index, ((images, labels, _, ids), (m_images, m_labels, _, m_ids)) in enumerate(zip(overlaid, mixed)):
        expected_images, expected_labels = mix(images, labels, tf.constant([5, index], tf.int64))
        np.testing.assert_array_equal(m_images.numpy(), expected_images.numpy())
        np.testing.assert_array_equal(m_labels.numpy(), expected_labels.numpy())
        np.testing.assert_array_equal(m_ids.numpy(), ids.numpy())


@pytest.mark.parametrize("method,mix", [("kd_online", "mixup"), ("kd_ig_online", "cutmix")])
def test_online_runs_with_a_mix(tmp_path, seeded_teacher_path, method, mix):
    config = pipeline.DistillConfig(method=method, teacher=seeded_teacher_path, train_split="train", val_split="train",
                                    epochs=1, batch_size=4, keep_blocks=2, ig_steps=1, examples_per_shard=6,
                                    export_modes="", verbose=0, mix=mix, p=0.5)
    workdir = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        results = pipeline.run_distillation(config, workdir, progress=False)
    history = read_epoch_log(os.path.join(workdir, pipeline.HISTORY))
    assert np.all(np.asarray(history["kd_loss"]) > 0) and 0 <= results["val_accuracy"] <= 100
    assert (results["store"] is not None) == (method == "kd_ig_online")
