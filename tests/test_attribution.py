import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from kdig_tf import attribution, models
from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError, UnknownKeyError


def _closed_form_model(kind="square"):
    """Two outputs with known integrals: sum(w * x^2) and sum(sin(x))."""
    weights = tf.constant(np.linspace(0.5, 2.0, 4 * 4 * 3).reshape(4, 4, 3), tf.float32)
    inputs = keras.Input((4, 4, 3))
    if kind == "square":
        outputs = keras.layers.Lambda(
            lambda x: tf.stack([tf.reduce_sum(weights * x**2, [1, 2, 3]),
                                tf.reduce_sum(-weights * x**3, [1, 2, 3])], axis=1))(inputs)
    else:
        outputs = keras.layers.Lambda(
            lambda x: tf.stack([tf.reduce_sum(tf.sin(3 * x), [1, 2, 3]),
                                tf.reduce_sum(tf.cos(2 * x), [1, 2, 3])], axis=1))(inputs)
    return keras.Model(inputs, outputs)


def _images(batch=3, shape=(4, 4, 3), seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (batch,) + shape).astype(np.float32)


@pytest.mark.parametrize("kind", ["square", "sine"])
def test_gauss_legendre_50_is_complete(kind):
    model = _closed_form_model(kind)
    images = _images()
    targets = [0, 1, 0]
    result = attribution.integrated_gradients(model, images, targets, steps=50)
    scores = model(images).numpy()[np.arange(3), targets]
    baseline_scores = model(np.zeros_like(images)).numpy()[np.arange(3), targets]
    relative = np.abs(result.delta.numpy()) / np.abs(scores - baseline_scores)
    assert np.all(relative <= 1e-3), relative
    np.testing.assert_allclose(result.target_scores.numpy(), scores, rtol=1e-6)


@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"])
def test_riemann_rules_converge(method):
    model = _closed_form_model("sine")
    images = _images(batch=2)
    errors = [np.abs(attribution.integrated_gradients(
        model, images, [0, 1], steps=steps, method=method, max_batch=4096).delta.numpy()).max()
        for steps in (4, 16, 64)]
    assert errors[0] > errors[1] > errors[2]
    # Left/right rules are first order: 16x the steps gives about 16x less error.
    assert errors[2] < 0.1 * errors[0]


def test_gauss_legendre_is_exact_for_polynomials():
    # An n-point Gauss-Legendre rule integrates polynomials of degree 2n-1 exactly.
    model = _closed_form_model("square")
    result = attribution.integrated_gradients(model, _images(), [1, 1, 1], steps=2)
    assert np.abs(result.delta.numpy()).max() < 1e-4


def test_result_does_not_depend_on_max_batch():
    model = models.build_student(keep_blocks=3)
    images = _images(batch=3, shape=(32, 32, 3))
    targets = [1, 4, 9]
    results = [attribution.integrated_gradients(model, images, targets, steps=5, max_batch=size)
               for size in (1, 7, 1000)]
    for other in results[1:]:
        np.testing.assert_allclose(other.attributions.numpy(), results[0].attributions.numpy(), atol=1e-5)
        np.testing.assert_allclose(other.delta.numpy(), results[0].delta.numpy(), atol=1e-5)


def test_paper_map_is_sum_of_absolute_attributions():
    attributions = tf.constant(_images(batch=2, shape=(5, 6, 3)))
    expected = np.abs(attributions.numpy()).sum(axis=-1)
    np.testing.assert_allclose(attribution.attribution_map(attributions).numpy(), expected, rtol=1e-6)


def test_traces_once_per_shape():
    model = _closed_form_model("square")
    ig = attribution.IntegratedGradients(model, steps=8, max_batch=5)
    for seed in range(3):
        ig(_images(seed=seed), [0, 1, 0])
    assert ig._weighted_gradients.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("baseline", attribution.BASELINES)
def test_every_baseline_is_complete(baseline):
    model = _closed_form_model("sine")
    result = attribution.integrated_gradients(
        model, _images(), [0, 1, 0], steps=50, baseline=baseline,
        pixel_to_input=lambda pixels: (pixels - 0.5) / 0.25, blur_sigma=1.0,
        baseline_colour=(0.25, 0.5, 0.75) if baseline == "mean_colour" else None)
    assert np.abs(result.delta.numpy()).max() < 1e-3


def test_mean_colour_baseline_is_the_colour_in_input_space():
    images = tf.ones((1, 2, 2, 3))
    baseline = attribution.make_baseline("mean_colour", images, pixel_to_input=lambda p: (p - 0.5) / 0.25,
                                         colour=(0.5, 0.75, 1.0))
    np.testing.assert_allclose(baseline.numpy()[0, 0, 0], [0.0, 1.0, 2.0])
    with pytest.raises(InvalidArgumentError):
        attribution.IntegratedGradients(lambda x: x, baseline="mean_colour")


def test_black_baseline_maps_through_preprocessing():
    images = tf.ones((1, 2, 2, 3))
    baseline = attribution.make_baseline("black", images, pixel_to_input=lambda p: (p - 0.5) / 0.25)
    np.testing.assert_allclose(baseline.numpy(), -2.0)


def test_probability_output_targets_softmax():
    model = _closed_form_model("sine")
    result = attribution.integrated_gradients(model, _images(), [0, 1, 0], steps=50, output="probability")
    probabilities = tf.nn.softmax(model(_images())).numpy()[np.arange(3), [0, 1, 0]]
    np.testing.assert_allclose(result.target_scores.numpy(), probabilities, rtol=1e-5)


def test_bad_arguments_raise_named_errors():
    model = _closed_form_model()
    with pytest.raises(InvalidArgumentError):
        attribution.IntegratedGradients(model, steps=0)
    with pytest.raises(UnknownKeyError):
        attribution.IntegratedGradients(model, method="simpson")
    with pytest.raises(UnknownKeyError):
        attribution.IntegratedGradients(model, baseline="gray")
    with pytest.raises(ShapeMismatchError):
        attribution.integrated_gradients(model, _images()[0], [0])
    with pytest.raises(ShapeMismatchError):
        attribution.integrated_gradients(model, _images(), [0, 1])
