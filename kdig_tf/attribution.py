"""Integrated Gradients as a traced TensorFlow function.

IG(x)_i = (x_i - x'_i) * integral_0^1 dF(x' + a (x - x'))/dx_i da, with F the target
logit (the paper's choice) or probability. The integral is a quadrature over ``steps``
nodes: Gauss-Legendre (Captum's default, the paper's setting) or a Riemann rule.

Path points of all examples are flattened and processed ``max_batch`` at a time, so
memory is bounded and the result does not depend on ``max_batch``.
"""
import kdig_tf  # noqa: F401

import collections

import numpy as np
import tensorflow as tf

from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError, UnknownKeyError

IGResult = collections.namedtuple("IGResult", ["attributions", "delta", "target_scores"])


def _gauss_legendre(steps):
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return (nodes + 1.0) / 2.0, weights / 2.0


def _riemann(offset):
    def rule(steps):
        return (np.arange(steps) + offset) / steps, np.full(steps, 1.0 / steps)
    return rule


def _trapezoid(steps):
    if steps == 1:
        return np.array([0.5]), np.array([1.0])
    alphas = np.linspace(0.0, 1.0, steps)
    weights = np.full(steps, 1.0 / (steps - 1))
    weights[[0, -1]] /= 2.0
    return alphas, weights


QUADRATURE_RULES = {
    "gausslegendre": _gauss_legendre,
    "riemann_left": _riemann(0.0),
    "riemann_right": _riemann(1.0),
    "riemann_middle": _riemann(0.5),
    "riemann_trapezoid": _trapezoid,
}


def quadrature(method, steps):
    """(alphas, weights) on [0, 1] for a named rule; weights sum to 1."""
    if method not in QUADRATURE_RULES:
        raise UnknownKeyError(f"unknown IG method {method!r}; known: {sorted(QUADRATURE_RULES)}")
    if int(steps) < 1:
        raise InvalidArgumentError(f"IG steps must be >= 1, got {steps}")
    alphas, weights = QUADRATURE_RULES[method](int(steps))
    return alphas.astype(np.float32), weights.astype(np.float32)


def _gaussian_blur(images, sigma):
    radius = max(1, int(round(3 * sigma)))
    grid = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel_1d = np.exp(-0.5 * (grid / sigma) ** 2)
    kernel_1d /= kernel_1d.sum()
    channels = images.shape[-1]
    kernel = np.outer(kernel_1d, kernel_1d)[:, :, None, None] * np.ones((1, 1, channels, 1), np.float32)
    padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    return tf.nn.depthwise_conv2d(padded, tf.constant(kernel), [1, 1, 1, 1], "VALID")


def make_baseline(kind, images, pixel_to_input=None, blur_sigma=4.0, seed=0, colour=None):
    """Baseline x' in the model's input space.

    zeros       : 0 in input space (for the normalised CIFAR teacher, the dataset mean colour)
    mean_colour : the [0,1] RGB ``colour`` everywhere, mapped through ``pixel_to_input``; the
                  paper's baseline stated without reference to where normalisation lives
    black       : pixel value 0, mapped through ``pixel_to_input``
    blur        : the image blurred with a Gaussian of ``blur_sigma`` pixels
    uniform     : uniform [0,1] pixel noise, mapped through ``pixel_to_input``
    """
    images = tf.convert_to_tensor(images, tf.float32)
    to_input = pixel_to_input or (lambda pixels: pixels)
    if kind == "zeros":
        return tf.zeros_like(images)
    if kind == "mean_colour":
        if colour is None or len(colour) != images.shape[-1]:
            raise InvalidArgumentError(f"the mean_colour baseline needs one [0,1] value per channel, got {colour}")
        return to_input(tf.zeros_like(images) + tf.constant(colour, tf.float32))
    if kind == "black":
        return to_input(tf.zeros_like(images))
    if kind == "blur":
        return _gaussian_blur(images, blur_sigma)
    if kind == "uniform":
        return to_input(tf.random.stateless_uniform(tf.shape(images), seed=[seed, 0]))
    raise UnknownKeyError(f"unknown IG baseline {kind!r}; known: {BASELINES}")


BASELINES = ("zeros", "mean_colour", "black", "blur", "uniform")
OUTPUTS = ("logit", "probability")


class IntegratedGradients:
    """Callable IG for one model and one set of settings.

    ``ig(images, targets)`` returns ``IGResult(attributions [B,H,W,C], delta [B],
    target_scores [B])``, where ``delta = sum(attributions) - (F(x) - F(x'))`` is the
    completeness error and ``target_scores = F(x)``. Images are in the model's input
    space. The gradient function is traced once per image shape.
    """

    def __init__(self, model, steps=50, method="gausslegendre", baseline="zeros", max_batch=256,
                 output="logit", pixel_to_input=None, blur_sigma=4.0, seed=0, baseline_colour=None):
        if output not in OUTPUTS:
            raise UnknownKeyError(f"unknown IG output {output!r}; known: {OUTPUTS}")
        if not isinstance(baseline, str) or baseline not in BASELINES:
            raise UnknownKeyError(f"unknown IG baseline {baseline!r}; known: {BASELINES}")
        if int(max_batch) < 1:
            raise InvalidArgumentError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.steps = int(steps)
        self.method = method
        self.baseline = baseline
        self.max_batch = int(max_batch)
        self.output = output
        self.pixel_to_input = pixel_to_input
        self.blur_sigma = float(blur_sigma)
        self.seed = int(seed)
        self.baseline_colour = None if baseline_colour is None else [float(value) for value in baseline_colour]
        if baseline == "mean_colour" and self.baseline_colour is None:
            raise InvalidArgumentError("the mean_colour baseline needs baseline_colour (one [0,1] value per channel)")
        alphas, weights = quadrature(method, steps)
        self._alphas = tf.constant(alphas)
        self._weights = tf.constant(weights)
        self._weighted_gradients = tf.function(self._weighted_gradients_impl, reduce_retracing=True)
        self._scores = tf.function(self._scores_impl, reduce_retracing=True)

    def settings(self):
        """JSON-able description, hashed into the precompute store's manifest."""
        return {"steps": self.steps, "method": self.method, "baseline": self.baseline,
                "output": self.output, "blur_sigma": self.blur_sigma if self.baseline == "blur" else None,
                "seed": self.seed if self.baseline == "uniform" else None,
                **({"colour": self.baseline_colour} if self.baseline == "mean_colour" else {})}

    def _target_scores(self, inputs, targets):
        logits = self.model(inputs, training=False)
        if self.output == "probability":
            logits = tf.nn.softmax(logits, axis=-1)
        return tf.gather(logits, targets, axis=1, batch_dims=1)

    def _scores_impl(self, inputs, targets):
        return self._target_scores(inputs, targets)

    def _weighted_gradients_impl(self, images, baselines, targets, start, stop):
        """Sum over path points [start, stop) of weight * dF/dx, scattered per example."""
        flat = tf.range(start, stop)
        example = flat // self.steps
        step = flat % self.steps
        alpha = tf.reshape(tf.gather(self._alphas, step), [-1, 1, 1, 1])
        x0 = tf.gather(baselines, example)
        points = x0 + alpha * (tf.gather(images, example) - x0)
        with tf.GradientTape() as tape:
            tape.watch(points)
            scores = self._target_scores(points, tf.gather(targets, example))
        grads = tape.gradient(scores, points)
        grads *= tf.reshape(tf.gather(self._weights, step), [-1, 1, 1, 1])
        return tf.math.unsorted_segment_sum(grads, example, tf.shape(images)[0])

    def __call__(self, images, targets):
        images = tf.convert_to_tensor(images, tf.float32)
        targets = tf.cast(tf.convert_to_tensor(targets), tf.int32)
        if images.shape.rank != 4:
            raise ShapeMismatchError(f"images must be [B,H,W,C], got shape {images.shape}")
        if targets.shape.rank != 1 or targets.shape[0] != images.shape[0]:
            raise ShapeMismatchError(
                f"targets must be [B] with B={images.shape[0]}, got shape {targets.shape}")
        baselines = make_baseline(self.baseline, images, self.pixel_to_input, self.blur_sigma, self.seed,
                                  self.baseline_colour)
        total = int(images.shape[0]) * self.steps
        averaged = tf.zeros_like(images)
        for start in range(0, total, self.max_batch):
            stop = min(start + self.max_batch, total)
            averaged += self._weighted_gradients(images, baselines, targets, tf.constant(start), tf.constant(stop))
        attributions = (images - baselines) * averaged
        scores = self._scores(tf.concat([images, baselines], axis=0), tf.concat([targets, targets], axis=0))
        target_scores, baseline_scores = tf.split(scores, 2)
        delta = tf.reduce_sum(attributions, axis=[1, 2, 3]) - (target_scores - baseline_scores)
        return IGResult(attributions, delta, target_scores)


def integrated_gradients(model, images, targets, **settings):
    """One-shot convenience wrapper around :class:`IntegratedGradients`."""
    return IntegratedGradients(model, **settings)(images, targets)


def attribution_map(attributions):
    """The paper's 2-D map: sum over channels of |attribution|, [B,H,W,C] -> [B,H,W]."""
    return tf.reduce_sum(tf.abs(attributions), axis=-1)
