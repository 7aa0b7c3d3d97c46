"""The KD loss objects against numpy written out by hand, and their registry (issue 48.1)."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from kdig_tf import distiller
from kdig_tf.errors import InvalidArgumentError, UnknownKeyError

STUDENT = np.array([[2.0, 1.0, 0.0, -0.5], [0.5, -1.0, 3.0, 1.5]], np.float32)
TEACHER = np.array([[3.0, 0.0, -1.0, 1.0], [0.0, 0.5, 4.0, -2.0]], np.float32)
LABELS = np.array([0, 2])


def softmax(z):
    z = np.float64(z)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl(p, q):
    return (p * np.log(p / q)).sum(axis=1)


def zscore(z):
    z = np.float64(z)
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, keepdims=True) + 1e-7)


def hand_dkd(teacher, student, labels, alpha, beta, t):
    """TCKD on (p_target, 1 - p_target), NCKD on the softmax of the non-target logits alone."""
    teacher, student = np.float64(teacher), np.float64(student)
    rows = np.arange(len(labels))
    p_t, p_s = softmax(teacher / t), softmax(student / t)
    binary_t = np.stack([p_t[rows, labels], 1 - p_t[rows, labels]], axis=1)
    binary_s = np.stack([p_s[rows, labels], 1 - p_s[rows, labels]], axis=1)
    keep = [[k for k in range(teacher.shape[1]) if k != label] for label in labels]
    rest_t = np.array([softmax(teacher[i:i + 1, keep[i]] / t)[0] for i in rows])
    rest_s = np.array([softmax(student[i:i + 1, keep[i]] / t)[0] for i in rows])
    return t * t * (alpha * kl(binary_t, binary_s) + beta * kl(rest_t, rest_s))


def per_example(loss, labels=None):
    return loss.per_example(tf.constant(TEACHER), tf.constant(STUDENT), labels).numpy()


def test_kl_at_temperature_golden():
    expected = 6.25 * kl(softmax(TEACHER / 2.5), softmax(STUDENT / 2.5))
    np.testing.assert_allclose(expected, [0.5131729, 1.0420739], atol=1e-6)  # frozen once
    np.testing.assert_allclose(per_example(distiller.LogitsDistillation(2.5)), expected, rtol=1e-5)


def test_standardized_kl_golden():
    expected = 4.0 * kl(softmax(zscore(TEACHER) / 2.0), softmax(zscore(STUDENT) / 2.0))
    np.testing.assert_allclose(expected, [0.2745080, 0.3487039], atol=1e-6)
    loss = distiller.StandardizedLogitsDistillation(2.0)
    np.testing.assert_allclose(per_example(loss), expected, rtol=1e-5)
    # Invariant to a shift and a positive scale of either model's logits: only their shape counts.
    shifted = loss.per_example(tf.constant(3.0 * TEACHER + 7.0), tf.constant(0.5 * STUDENT - 2.0)).numpy()
    np.testing.assert_allclose(shifted, expected, rtol=1e-4)


def test_decoupled_kd_golden():
    expected = hand_dkd(TEACHER, STUDENT, LABELS, 1.0, 8.0, 4.0)
    np.testing.assert_allclose(expected, [5.9522249, 16.0189205], atol=1e-5)
    np.testing.assert_allclose(per_example(distiller.DecoupledDistillation(1.0, 8.0, 4.0), tf.constant(LABELS)),
                               expected, rtol=1e-5)
    weighted = distiller.DecoupledDistillation(0.5, 2.0, 4.0)
    np.testing.assert_allclose(per_example(weighted, tf.constant(LABELS)),
                               hand_dkd(TEACHER, STUDENT, LABELS, 0.5, 2.0, 4.0), rtol=1e-5)
    # Mixed labels: the target is the dominant class.
    soft = np.array([[0.6, 0.0, 0.4, 0.0], [0.0, 0.3, 0.7, 0.0]], np.float32)
    np.testing.assert_allclose(per_example(distiller.DecoupledDistillation(1.0, 8.0, 4.0), tf.constant(soft)),
                               expected, rtol=1e-5)
    with pytest.raises(InvalidArgumentError, match="labels"):
        per_example(distiller.DecoupledDistillation())


def test_decoupled_kd_has_finite_gradients_for_a_saturated_teacher():
    teacher = tf.constant([[80.0, -80.0, -80.0, -80.0]])  # the teacher's non-target mass underflows to 0
    student = tf.Variable(STUDENT[:1])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(distiller.DecoupledDistillation().per_example(teacher, student, tf.constant([0])))
    assert np.isfinite(loss.numpy()) and np.all(np.isfinite(tape.gradient(loss, student).numpy()))


def test_distiller_uses_the_labels_for_dkd():
    inputs = keras.Input((2,))
    student = keras.Model(inputs, keras.layers.Dense(4)(inputs))
    model = distiller.paper_distiller(None, student, alpha=0.5, kd_weight=1.5,
                                      kd_loss=distiller.DecoupledDistillation(1.0, 8.0, 4.0))
    x = {"images": tf.zeros((2, 2)), "teacher_logits": tf.constant(TEACHER)}
    loss = float(model.compute_loss(x, tf.constant(LABELS), tf.constant(STUDENT)))
    ce = -np.log(softmax(STUDENT)[np.arange(2), LABELS])
    expected = np.mean(0.5 * ce + 1.5 * hand_dkd(TEACHER, STUDENT, LABELS, 1.0, 8.0, 4.0))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_registry():
    assert set(distiller.KD_LOSSES) == {"kl", "kl_standardized", "dkd"}
    assert isinstance(distiller.kd_loss_from_name("kl", 4.0), distiller.LogitsDistillation)
    standardized = distiller.kd_loss_from_name("kl_standardized", 2.0)
    assert isinstance(standardized, distiller.StandardizedLogitsDistillation) and standardized.temperature == 2.0
    dkd = distiller.kd_loss_from_name("dkd", 4.0, dkd_alpha=2.0, dkd_beta=6.0)
    assert dkd.get_config() == {"alpha": 2.0, "beta": 6.0, "temperature": 4.0}
    with pytest.raises(UnknownKeyError, match="kl_standardized"):
        distiller.kd_loss_from_name("kl_standardised", 2.0)
    with pytest.raises(InvalidArgumentError):
        distiller.kd_loss_from_name("dkd", 4.0, dkd_alpha=-1.0)
    with pytest.raises(InvalidArgumentError):
        distiller.kd_loss_from_name("kl_standardized", 0.0)


@pytest.mark.parametrize("name", sorted(distiller.KD_LOSSES))
def test_loss_objects_serialise(name):
    loss = distiller.kd_loss_from_name(name, 3.0, 1.5, 4.0)
    clone = keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(loss))
    assert type(clone) is type(loss) and clone.get_config() == loss.get_config()
    labels = tf.constant(LABELS)
    np.testing.assert_array_equal(per_example(clone, labels), per_example(loss, labels))
