"""Measure explanations: attribution maps, teacher-student agreement, faithfulness, figures.

Maps are 2-D, ``[B, H, W]``, larger = more important. Every map function takes the
model's own input (already preprocessed: normalised for the teacher, [0, 1] for a
student) and integer target classes; models output logits.

Agreement between two maps of the same image is the Spearman rank correlation over
pixels and the IoU of their top-k pixel sets. Faithfulness is the deletion / insertion
curve (Petsiuk et al., RISE, 2018): pixels are removed (or revealed) most-attributed
first and the probability of the target class is recorded.
"""
import kdig_tf  # noqa: F401  (selects tf-keras before TensorFlow loads)

import contextlib
import dataclasses
import hashlib

import numpy as np
import scipy.ndimage
import scipy.stats
import tensorflow as tf

from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError, UnknownKeyError
from kdig_tf.io_utils import atomic_path, subplots

DEFAULT_MAX_BATCH = 256


# --------------------------------------------------------------------------- maps

def last_feature_layer(model):
    """Name of the last 4-D layer before global pooling (teacher: ``features_18_2``).

    Functional models list layers in topological order, so for a chain network the last
    layer with a spatial output is the one that feeds the pooling.
    """
    for layer in reversed(model.layers[1:]):
        shape = layer.output_shape
        if isinstance(shape, tuple) and len(shape) == 4:
            return layer.name
    raise UnknownKeyError(f"model {model.name!r} has no spatial (4-D) layer for Grad-CAM++")


def _as_batch(inputs, targets):
    inputs = np.asarray(inputs, np.float32)
    targets = np.asarray(targets, np.int64).reshape(-1)
    if inputs.ndim != 4:
        raise ShapeMismatchError(f"inputs must be [B,H,W,C], got shape {inputs.shape}")
    if targets.shape[0] != inputs.shape[0]:
        raise ShapeMismatchError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
    return inputs, targets


def _chunks(count, size):
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


@contextlib.contextmanager
def _numpy_seed(seed):
    """tf-keras-vis draws SmoothGrad noise from numpy's global generator: seed it locally."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def ig_map(model, inputs, targets, steps=50, method="gausslegendre", baseline="zeros",
           max_batch=512, pixel_to_input=None, blur_sigma=4.0):
    """Integrated Gradients map: sum over channels of |attribution| (the paper's map).

    ``baseline`` is one of ``kdig_tf.attribution.BASELINES``; "black" maps pixel 0 through
    ``pixel_to_input`` so that a normalised teacher and a [0, 1] student share a baseline.
    """
    from kdig_tf.attribution import IntegratedGradients, attribution_map

    inputs, targets = _as_batch(inputs, targets)
    ig = IntegratedGradients(model, steps=steps, method=method, baseline=baseline,
                             max_batch=max_batch, output="logit", pixel_to_input=pixel_to_input,
                             blur_sigma=blur_sigma)
    return np.asarray(attribution_map(ig(inputs, targets).attributions), np.float32)


def saliency_map(model, inputs, targets, smooth_samples=20, smooth_noise=0.2, seed=0,
                 max_batch=DEFAULT_MAX_BATCH):
    """SmoothGrad (tf-keras-vis ``Saliency``): mean |gradient| of the target logit under
    Gaussian input noise of sd ``smooth_noise`` x (max - min) of each image, max over
    channels. ``smooth_samples=0`` is vanilla saliency."""
    from tf_keras_vis.saliency import Saliency
    from tf_keras_vis.utils.scores import CategoricalScore

    inputs, targets = _as_batch(inputs, targets)
    if smooth_samples < 0 or smooth_noise < 0:
        raise InvalidArgumentError("smooth_samples and smooth_noise must be >= 0")
    saliency = Saliency(model, clone=False)
    maps = []
    with _numpy_seed(seed):
        for part in _chunks(len(inputs), max_batch):
            maps.append(saliency(CategoricalScore(targets[part].tolist()), inputs[part],
                                 smooth_samples=int(smooth_samples), smooth_noise=float(smooth_noise),
                                 normalize_map=False))
    return np.concatenate(maps).astype(np.float32)


def gradcampp_map(model, inputs, targets, layer=None, max_batch=DEFAULT_MAX_BATCH):
    """Grad-CAM++ (tf-keras-vis) on ``layer`` (default: the last feature layer), bilinearly
    upsampled to the input size. The layer is named explicitly because tf-keras-vis'
    search for a conv layer fails on tf-keras models."""
    from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
    from tf_keras_vis.utils.scores import CategoricalScore

    inputs, targets = _as_batch(inputs, targets)
    layer = layer or last_feature_layer(model)
    if layer not in {existing.name for existing in model.layers}:
        raise UnknownKeyError(f"model {model.name!r} has no layer {layer!r}")
    cam = GradcamPlusPlus(model, clone=False)
    maps = []
    for part in _chunks(len(inputs), max_batch):
        maps.append(cam(CategoricalScore(targets[part].tolist()), inputs[part], penultimate_layer=layer,
                        seek_penultimate_conv_layer=False, normalize_cam=False))
    return np.concatenate(maps).reshape(inputs.shape[:3]).astype(np.float32)


METHODS = {"ig": ig_map, "saliency": saliency_map, "gradcam++": gradcampp_map}


def get_method(name):
    if name not in METHODS:
        raise UnknownKeyError(f"unknown attribution method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def attribution_maps(method_name, model, inputs, targets, **options):
    """``[B,H,W]`` float32 maps of ``method_name`` (a key of METHODS) for the target classes.

    ``options`` go to the method's function (IG's own ``method`` is its quadrature rule).
    """
    maps = get_method(method_name)(model, inputs, targets, **options)
    if not np.all(np.isfinite(maps)):
        raise InvalidArgumentError(f"{method_name} produced non-finite maps")
    return maps


# --------------------------------------------------------------------------- agreement

def _flatten_pair(map_a, map_b):
    a = np.asarray(map_a, np.float64)
    b = np.asarray(map_b, np.float64)
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ShapeMismatchError(f"maps must share shape [H,W] or [B,H,W]: {a.shape} vs {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise InvalidArgumentError("maps contain NaN or infinity")
    single = a.ndim == 2
    return a.reshape(1 if single else a.shape[0], -1), b.reshape(1 if single else b.shape[0], -1), single


def spearman(map_a, map_b):
    """Spearman rank correlation over pixels, per image ([B] for [B,H,W], float for [H,W]).

    Ties get average ranks (as ``scipy.stats.spearmanr``). A constant map has no ranking,
    so its correlation is NaN; aggregate with ``summarize`` which skips and counts NaNs.
    """
    a, b, single = _flatten_pair(map_a, map_b)
    ra = scipy.stats.rankdata(a, method="average", axis=1)
    rb = scipy.stats.rankdata(b, method="average", axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(denom > 0, (ra * rb).sum(axis=1) / denom, np.nan)
    rho = np.clip(rho, -1.0, 1.0)
    return float(rho[0]) if single else rho


def _topk_count(num_pixels, fraction):
    if not 0.0 < fraction <= 1.0:
        raise InvalidArgumentError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, int(round(fraction * num_pixels)))


def _tie_keys(flat):
    """[B,N] secondary sort keys: a pseudo-random permutation of the pixels per map, seeded
    by a hash of that map's values (so identical maps get identical keys)."""
    keys = np.empty(flat.shape, np.float64)
    for row, values in enumerate(flat):
        # + 0.0 turns -0.0 into 0.0 so that equal maps hash equally.
        digest = hashlib.sha256(np.ascontiguousarray(values + 0.0, "<f8").tobytes()).digest()
        keys[row] = np.random.default_rng(int.from_bytes(digest[:8], "little")).random(flat.shape[1])
    return keys


def topk_mask(maps, fraction=0.1):
    """Boolean [B,N] mask of exactly k = round(fraction*N) pixels (at least 1) per map: the
    k largest values.

    Ties at the threshold (e.g. a ReLU'd Grad-CAM++ map that is zero on >= 90% of its
    pixels) are broken by a pseudo-random order of the pixels seeded by a hash of the
    map's own values: deterministic, identical maps give identical sets, and the tied
    pixels that fill up the set are a uniform draw, independent between two different
    maps, as ``topk_iou_chance`` assumes. Breaking ties by position instead would make
    two maps share their filler pixels and inflate their IoU. ``topk_ties`` tells which
    maps needed a tie-break.
    """
    flat = np.asarray(maps, np.float64).reshape(len(maps), -1)
    k = _topk_count(flat.shape[1], fraction)
    # lexsort: last key is primary -> value descending, then the tie key ascending.
    top = np.lexsort((_tie_keys(flat), -flat), axis=-1)[:, :k]
    mask = np.zeros(flat.shape, bool)
    np.put_along_axis(mask, top, True, axis=1)
    return mask


def topk_ties(maps, fraction=0.1):
    """Boolean [B]: True where the k-th and (k+1)-th largest values of a map are equal, i.e.
    a tie straddles the top-k threshold (constant maps included) and ``topk_mask`` had to
    break it. Report ``int(topk_ties(...).sum())`` next to an IoU summary: those maps'
    top-k sets are partly arbitrary."""
    flat = np.asarray(maps, np.float64).reshape(len(maps), -1)
    k = _topk_count(flat.shape[1], fraction)
    if k >= flat.shape[1]:
        return np.zeros(len(flat), bool)
    ordered = -np.partition(-flat, (k - 1, k), axis=1)
    return ordered[:, k - 1] == ordered[:, k]


def topk_iou(map_a, map_b, fraction=0.1):
    """Intersection over union of the top-``fraction`` pixel sets (exactly k pixels each, see
    ``topk_mask``) of two maps, per image."""
    a, b, single = _flatten_pair(map_a, map_b)
    top_a, top_b = topk_mask(a, fraction), topk_mask(b, fraction)
    iou = (top_a & top_b).sum(axis=1) / (top_a | top_b).sum(axis=1)
    return float(iou[0]) if single else iou


def topk_iou_chance(num_pixels, fraction=0.1):
    """Expected IoU of two independent uniformly random k-pixel sets (a reference value)."""
    k = _topk_count(num_pixels, fraction)
    overlaps = np.arange(k + 1)
    # Overlap of two random k-subsets is hypergeometric.
    probs = scipy.stats.hypergeom(num_pixels, k, k).pmf(overlaps)
    return float(np.sum(probs * overlaps / (2 * k - overlaps)))


def summarize(values):
    """mean, sample sd (ddof=1), number of finite values and of NaNs of a 1-D array."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return {
        "mean": float(finite.mean()) if finite.size else float("nan"),
        "sd": float(finite.std(ddof=1)) if finite.size > 1 else float("nan"),
        "n": int(finite.size),
        "n_nan": int(values.size - finite.size),
    }


# --------------------------------------------------------------------------- faithfulness

@dataclasses.dataclass
class Curve:
    """A deletion or insertion curve for a batch of images."""

    fractions: np.ndarray  # [S+1] fraction of pixels removed (deletion) or revealed (insertion)
    scores: np.ndarray     # [B, S+1] probability of the target class
    auc: np.ndarray        # [B] trapezoid area under scores over fractions in [0, 1]
    targets: np.ndarray    # [B] the target classes


def trapezoid(y, x):
    """Area under y(x) along the last axis (numpy renamed trapz between versions)."""
    y = np.asarray(y, np.float64)
    return np.sum((y[..., 1:] + y[..., :-1]) * np.diff(np.asarray(x, np.float64)) / 2.0, axis=-1)


def pixel_order(maps):
    """[B,N] flat pixel indices, most attributed first; ties go to the lower (row-major) index."""
    flat = np.asarray(maps, np.float64).reshape(len(maps), -1)
    return np.argsort(-flat, axis=1, kind="stable")


def make_baseline(images, baseline="zeros", blur_sigma=5.0):
    """The image that replaces deleted (or not yet inserted) pixels, in the space of ``images``.

    ``"zeros"``: 0 everywhere (black when images are in [0, 1]). ``"mean"``: each image's mean
    colour. ``"blur"``: each image Gaussian-blurred with ``blur_sigma`` pixels. An array is
    broadcast to the images' shape.
    """
    images = np.asarray(images, np.float32)
    if isinstance(baseline, str):
        if baseline == "zeros":
            return np.zeros_like(images)
        if baseline == "mean":
            return np.broadcast_to(images.mean(axis=(1, 2), keepdims=True), images.shape).copy()
        if baseline == "blur":
            return scipy.ndimage.gaussian_filter(
                images, sigma=(0, blur_sigma, blur_sigma, 0), mode="reflect").astype(np.float32)
        raise UnknownKeyError(f"unknown baseline {baseline!r}; known: 'zeros', 'mean', 'blur' or an array")
    try:
        return np.broadcast_to(np.asarray(baseline, np.float32), images.shape).copy()
    except ValueError as err:
        raise ShapeMismatchError(f"baseline shape {np.shape(baseline)} vs images {images.shape}") from err


def _perturbation_curve(model_fn, images, maps, targets, steps, baseline, insert):
    images = np.asarray(images, np.float32)
    maps = np.asarray(maps)
    if images.ndim != 4 or maps.shape != images.shape[:3]:
        raise ShapeMismatchError(f"images must be [B,H,W,C] and maps [B,H,W]: {images.shape} vs {maps.shape}")
    batch, height, width, _ = images.shape
    num_pixels = height * width
    if not 1 <= int(steps) <= num_pixels:
        raise InvalidArgumentError(f"steps must be in [1, {num_pixels}], got {steps}")
    steps = int(steps)
    fill = make_baseline(images, baseline)
    rows = np.arange(batch)
    if targets is None:
        targets = np.argmax(np.asarray(model_fn(images)), axis=1)
    targets = np.asarray(targets, np.int64).reshape(-1)
    if targets.shape[0] != batch:
        raise ShapeMismatchError(f"{batch} images but {targets.shape[0]} targets")

    # rank[b, p] = position of pixel p in image b's order; step i touches the first counts[i] pixels.
    rank = np.empty((batch, num_pixels), np.int64)
    np.put_along_axis(rank, pixel_order(maps), np.arange(num_pixels)[None, :].repeat(batch, 0), axis=1)
    rank = rank.reshape(batch, height, width, 1)
    counts = np.arange(steps + 1) * num_pixels // steps
    scores = np.empty((batch, steps + 1), np.float64)
    for step, count in enumerate(counts):
        touched = rank < count
        current = np.where(touched, images, fill) if insert else np.where(touched, fill, images)
        scores[:, step] = np.asarray(model_fn(current))[rows, targets]
    fractions = counts / num_pixels
    return Curve(fractions=fractions, scores=scores, auc=trapezoid(scores, fractions), targets=targets)


def deletion_curve(model_fn, images, maps, targets=None, steps=32, baseline="zeros"):
    """Replace pixels by ``baseline`` most-attributed first (all channels of a pixel at once).

    ``model_fn`` maps a batch of images (in the space of ``images``) to class probabilities.
    Step i of ``steps`` removes ``i * H*W // steps`` pixels, ties in the map going to the lower
    row-major index. ``targets`` defaults to the predicted class of the intact image. A low
    area means a faithful map: the probability collapses once the top pixels are gone.
    """
    return _perturbation_curve(model_fn, images, maps, targets, steps, baseline, insert=False)


def insertion_curve(model_fn, images, maps, targets=None, steps=32, baseline="blur"):
    """Start from ``baseline`` (default a blurred image) and reveal pixels most-attributed first.
    A high area means a faithful map. Same conventions as ``deletion_curve``."""
    return _perturbation_curve(model_fn, images, maps, targets, steps, baseline, insert=True)


def probability_fn(model, preprocess=None, max_batch=DEFAULT_MAX_BATCH):
    """``images -> softmax(model(preprocess(images)))`` as numpy, in chunks of ``max_batch``."""
    def predict(images):
        outputs = []
        for part in _chunks(len(images), max_batch):
            batch = tf.convert_to_tensor(images[part], tf.float32)
            if preprocess is not None:
                batch = preprocess(batch)
            outputs.append(tf.nn.softmax(model(batch, training=False), axis=-1).numpy())
        return np.concatenate(outputs)
    return predict


# --------------------------------------------------------------------------- figures

def _display_map(single_map, percentile=99.0):
    """Scale a map to [0, 1], clipping at a high percentile so a few spikes do not flatten it."""
    m = np.asarray(single_map, np.float64)
    low, high = m.min(), np.percentile(m, percentile)
    if high <= low:
        high = m.max()
    if high <= low:
        return np.zeros_like(m)
    return np.clip((m - low) / (high - low), 0.0, 1.0)


def _display_image(image):
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    return np.clip(image.astype(np.float64), 0.0, 1.0)


def _save_figure(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def _finish(fig, title, path):
    # Keep the title above the column headers instead of on top of them.
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=10)
        top -= 0.3 / fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, top))
    _save_figure(fig, path)


def plot_grid(images, teacher_maps, student_maps, labels, class_names, path,
              teacher_name="teacher", student_name="student", title=None):
    """One row per class (its first image): image / teacher map / student map / overlay.

    ``images`` are uint8 or [0, 1] floats. The overlay shows the teacher map in red and the
    student map in green over the grey image, so agreement appears yellow.
    """
    labels = np.asarray(labels).reshape(-1)
    if not len(images) == len(teacher_maps) == len(student_maps) == len(labels):
        raise ShapeMismatchError("images, maps and labels must have the same length")
    rows = [int(np.flatnonzero(labels == label)[0]) for label in np.unique(labels)]
    fig, axes = subplots(len(rows), 4, figsize=(8, 2.1 * len(rows)), squeeze=False)
    headers = ("image", teacher_name, student_name, "overlay (red/green)")
    for row, index in enumerate(rows):
        image = _display_image(images[index])
        t_map, s_map = _display_map(teacher_maps[index]), _display_map(student_maps[index])
        grey = image.mean(axis=-1)
        colour = np.stack([t_map, s_map, np.zeros_like(t_map)], axis=-1)
        overlay = np.clip(0.35 * grey[..., None] + 0.65 * colour, 0.0, 1.0)
        panels = (image, t_map, s_map, overlay)
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel, cmap="inferno" if panel.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(headers[col], fontsize=9)
        label = int(labels[index])
        name = class_names[label] if class_names is not None and label < len(class_names) else str(label)
        axes[row, 0].set_ylabel(name, fontsize=9)
    _finish(fig, title, path)


def plot_curves(curves_by_model, path, title=None):
    """Mean deletion and insertion curves: ``{model_name: {"deletion": Curve, "insertion": Curve}}``."""
    kinds = ("deletion", "insertion")
    fig, axes = subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for name, curves in curves_by_model.items():
            if kind not in curves:
                continue
            curve = curves[kind]
            ax.plot(curve.fractions, curve.scores.mean(axis=0),
                    label=f"{name} (AUC {np.mean(curve.auc):.3f})")
        better = "lower" if kind == "deletion" else "higher"
        ax.set_title(f"{kind} ({better} AUC is better)", fontsize=10)
        ax.set_xlabel("fraction of pixels " + ("removed" if kind == "deletion" else "revealed"))
        ax.set_ylabel("p(target class)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _finish(fig, title, path)
