import numpy as np
import pytest
import scipy.stats

from kdig_tf import explain
from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError, UnknownKeyError


# ----------------------------------------------------------------- agreement

def test_identical_maps_agree_perfectly():
    maps = np.random.default_rng(0).normal(size=(3, 8, 8))
    np.testing.assert_allclose(explain.spearman(maps, maps), 1.0)
    np.testing.assert_allclose(explain.topk_iou(maps, maps, 0.1), 1.0)


def test_inverted_maps_have_spearman_minus_one():
    maps = np.random.default_rng(1).uniform(size=(4, 6, 6))
    np.testing.assert_allclose(explain.spearman(maps, -maps), -1.0)
    np.testing.assert_allclose(explain.spearman(maps, maps.max() - maps), -1.0)
    # A monotone transform does not change ranks.
    np.testing.assert_allclose(explain.spearman(maps, np.exp(3 * maps)), 1.0)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 5, size=(5, 7, 7)).astype(float)  # many ties
    b = a + rng.integers(0, 3, size=a.shape)
    got = explain.spearman(a, b)
    expected = [scipy.stats.spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert isinstance(explain.spearman(a[0], b[0]), float)


def test_constant_map_gives_nan_and_summary_skips_it():
    a = np.random.default_rng(3).normal(size=(2, 4, 4))
    b = a.copy()
    b[1] = 7.0
    rho = explain.spearman(a, b)
    assert rho[0] == pytest.approx(1.0) and np.isnan(rho[1])
    stats = explain.summarize(rho)
    assert stats["n"] == 1 and stats["n_nan"] == 1 and stats["mean"] == pytest.approx(1.0)


def test_topk_iou_hand_computed():
    # 10x10 maps, top 10 %: a's top set is pixels 0..9, b's is 5..14 -> 5 shared of 15.
    a = -np.arange(100, dtype=float).reshape(10, 10)
    b = np.zeros(100)
    b[5:15] = np.arange(10, 0, -1)
    b = b.reshape(10, 10)
    assert explain.topk_iou(a, b, 0.1) == pytest.approx(5 / 15)
    batch = explain.topk_iou(np.stack([a, a]), np.stack([b, a]), 0.1)
    np.testing.assert_allclose(batch, [1 / 3, 1.0])


def test_topk_mask_has_exactly_k_pixels_despite_ties():
    m = np.zeros((1, 4, 5))
    m[0, 0, 0] = 1.0  # k = 2 of 20 pixels; the second place is a 19-way tie
    mask = explain.topk_mask(m, 0.1)
    assert mask.sum() == 2 and mask[0, 0]
    # A ReLU'd map that is 95 % zeros: the top 10 % is its 5 % support plus 5 % tied zeros.
    m = np.zeros((2, 20, 20))
    m[:, 0, :] = np.arange(1, 21)
    mask = explain.topk_mask(m, 0.1)
    assert mask.shape == (2, 400) and mask.sum(axis=1).tolist() == [40, 40]
    assert mask[:, :20].all()
    np.testing.assert_array_equal(mask[0], mask[1])  # identical maps, identical sets
    assert explain.topk_iou(m[0], m[1], 0.1) == 1.0


def test_topk_iou_of_mostly_zero_maps_with_disjoint_supports_is_small():
    # 20x20 maps, 95 % zeros; a is nonzero on pixels 0..19, b on 20..39 (k = 40). Breaking
    # the zero ties by position would fill each set with the other's support (IoU 1.0).
    a, b = np.zeros(400), np.zeros(400)
    a[:20] = np.arange(20, 0, -1)
    b[20:40] = np.arange(1, 21)
    iou = explain.topk_iou(a.reshape(20, 20), b.reshape(20, 20), 0.1)
    assert iou < 0.15
    assert explain.topk_iou(a.reshape(20, 20), b.reshape(20, 20), 0.1) == iou  # deterministic


def test_topk_iou_of_tied_maps_matches_chance_on_average():
    # Maps with one nonzero pixel each: the top-10 % sets are almost all tie-filler, which
    # must behave like the random sets of ``topk_iou_chance``.
    rng = np.random.default_rng(8)
    a, b = np.zeros((300, 100)), np.zeros((300, 100))
    a[np.arange(300), rng.integers(0, 100, 300)] = rng.uniform(1, 2, 300)
    b[np.arange(300), rng.integers(0, 100, 300)] = rng.uniform(1, 2, 300)
    iou = explain.topk_iou(a.reshape(300, 10, 10), b.reshape(300, 10, 10), 0.1)
    # chance = 0.055; the sd of the mean of 300 pair IoUs is about 0.003.
    assert abs(iou.mean() - explain.topk_iou_chance(100, 0.1)) < 0.015


def test_topk_ties_flags_maps_with_a_tie_at_the_threshold():
    maps = np.random.default_rng(9).normal(size=(4, 10, 10))
    maps[1] = 0.0                      # constant
    maps[2, :, :] = 0.0
    maps[2, 0, :5] = 1.0               # 5 nonzero, k = 10: the zeros straddle the threshold
    maps[3] = np.maximum(maps[3], 0.0)  # about half zeros: the threshold is still a distinct value
    np.testing.assert_array_equal(explain.topk_ties(maps, 0.1), [False, True, True, False])
    assert not explain.topk_ties(maps, 1.0).any()  # k = N: nothing to break


def test_topk_iou_chance_value():
    # Two random 1-of-4 sets: overlap 1 with prob 1/4 -> IoU 1, else 0.
    assert explain.topk_iou_chance(4, 0.25) == pytest.approx(0.25)


def test_agreement_rejects_bad_input():
    with pytest.raises(ShapeMismatchError):
        explain.spearman(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(InvalidArgumentError):
        explain.topk_iou(np.zeros((4, 4)), np.zeros((4, 4)), 0.0)
    with pytest.raises(InvalidArgumentError):
        explain.spearman(np.full((4, 4), np.nan), np.zeros((4, 4)))


# ----------------------------------------------------------------- faithfulness

def _one_pixel_model(row, col):
    """Two-class 'model' whose class-0 probability is channel 0 of one pixel."""
    def model_fn(images):
        value = np.asarray(images)[:, row, col, 0]
        return np.stack([value, 1.0 - value], axis=1)
    return model_fn


def _map_ranking_pixel_at(position, row, col, size=4):
    """A 4x4 map in which pixel (row, col) is the ``position``-th most attributed (0-based)."""
    values = np.arange(size * size, 0, -1, dtype=float)  # strictly decreasing row-major
    flat = values.copy()
    target = row * size + col
    order = [p for p in range(size * size) if p != target]
    order.insert(position, target)
    flat[order] = values
    return flat.reshape(size, size)


def test_deletion_and_insertion_step_at_known_pixel():
    row, col, position = 1, 2, 5
    images = np.ones((1, 4, 4, 3), np.float32)
    maps = _map_ranking_pixel_at(position, row, col)[None]
    assert explain.pixel_order(maps)[0, position] == row * 4 + col
    model_fn = _one_pixel_model(row, col)

    deletion = explain.deletion_curve(model_fn, images, maps, targets=[0], steps=16, baseline="zeros")
    expected = np.where(np.arange(17) <= position, 1.0, 0.0)
    np.testing.assert_allclose(deletion.fractions, np.arange(17) / 16)
    np.testing.assert_allclose(deletion.scores[0], expected)
    # Trapezoid by hand: 5 full steps of width 1/16 at 1, then a half step down.
    assert deletion.auc[0] == pytest.approx(5.5 / 16)

    insertion = explain.insertion_curve(model_fn, images, maps, targets=[0], steps=16, baseline="zeros")
    np.testing.assert_allclose(insertion.scores[0], 1.0 - expected)
    assert insertion.auc[0] == pytest.approx(10.5 / 16)


def test_curves_with_coarse_steps_and_default_target():
    row, col = 0, 0
    images = np.full((2, 4, 4, 1), 0.8, np.float32)
    maps = np.stack([_map_ranking_pixel_at(0, row, col), _map_ranking_pixel_at(15, row, col)])
    curve = explain.deletion_curve(_one_pixel_model(row, col), images, maps, steps=4)
    # Target defaults to the argmax on the intact image (class 0, p = 0.8); 4 pixels per step.
    np.testing.assert_array_equal(curve.targets, [0, 0])
    np.testing.assert_allclose(curve.scores, [[0.8, 0, 0, 0, 0], [0.8, 0.8, 0.8, 0.8, 0]])
    np.testing.assert_allclose(curve.auc, [0.1, 0.7])


def test_ties_are_broken_by_lower_index():
    order = explain.pixel_order(np.zeros((1, 2, 3)))
    np.testing.assert_array_equal(order[0], np.arange(6))


def test_baselines():
    images = np.random.default_rng(4).uniform(size=(2, 6, 6, 3)).astype(np.float32)
    assert not explain.make_baseline(images, "zeros").any()
    mean = explain.make_baseline(images, "mean")
    np.testing.assert_allclose(mean[:, 3, 3], images.mean(axis=(1, 2)), rtol=1e-6)
    blurred = explain.make_baseline(images, "blur", blur_sigma=2.0)
    assert blurred.shape == images.shape and blurred.std() < images.std()
    with pytest.raises(UnknownKeyError):
        explain.make_baseline(images, "noise")


def test_curve_rejects_bad_input():
    model_fn = _one_pixel_model(0, 0)
    with pytest.raises(ShapeMismatchError):
        explain.deletion_curve(model_fn, np.ones((1, 4, 4, 3)), np.ones((1, 4, 5)))
    with pytest.raises(InvalidArgumentError):
        explain.deletion_curve(model_fn, np.ones((1, 4, 4, 3)), np.ones((1, 4, 4)), steps=17)


# ----------------------------------------------------------------- maps on a tiny student

@pytest.fixture(scope="module")
def tiny_student():
    from kdig_tf import models

    return models.build_student(keep_blocks=3, input_shape=(16, 16, 3))


def _tiny_batch():
    rng = np.random.default_rng(5)
    return rng.uniform(size=(3, 16, 16, 3)).astype(np.float32), np.array([0, 3, 9])


def test_last_feature_layer_matches_models(tiny_student):
    from kdig_tf import models

    assert explain.last_feature_layer(tiny_student) == models.feature_layer_name(2, tiny_student)
    teacher = models.build_teacher(input_shape=(16, 16, 3))
    assert explain.last_feature_layer(teacher) == "features_18_2"


@pytest.mark.parametrize("method, options", [
    ("saliency", {"smooth_samples": 3, "smooth_noise": 0.1}),
    ("gradcam++", {}),
])
def test_tf_keras_vis_maps_on_tiny_student(tiny_student, method, options):
    inputs, targets = _tiny_batch()
    maps = explain.attribution_maps(method, tiny_student, inputs, targets, **options)
    assert maps.shape == (3, 16, 16)
    assert np.all(np.isfinite(maps))


def test_saliency_is_reproducible_with_seed(tiny_student):
    inputs, targets = _tiny_batch()
    first = explain.saliency_map(tiny_student, inputs, targets, smooth_samples=2, seed=7)
    second = explain.saliency_map(tiny_student, inputs, targets, smooth_samples=2, seed=7)
    np.testing.assert_array_equal(first, second)


def test_unknown_method_and_layer(tiny_student):
    inputs, targets = _tiny_batch()
    with pytest.raises(UnknownKeyError):
        explain.attribution_maps("lime", tiny_student, inputs, targets)
    with pytest.raises(UnknownKeyError):
        explain.gradcampp_map(tiny_student, inputs, targets, layer="no_such_layer")


def test_ig_map_on_tiny_student(tiny_student):
    pytest.importorskip("kdig_tf.attribution")
    inputs, targets = _tiny_batch()
    maps = explain.attribution_maps("ig", tiny_student, inputs, targets, steps=4, method="riemann_middle")
    assert maps.shape == (3, 16, 16) and np.all(maps >= 0)
    # A "black" baseline goes through pixel_to_input (here a shift) before integration.
    shifted = explain.ig_map(tiny_student, inputs, targets, steps=4, baseline="black",
                             pixel_to_input=lambda pixels: pixels - 0.5)
    assert shifted.shape == (3, 16, 16) and not np.allclose(shifted, maps)


def test_probability_fn_and_curve_on_tiny_student(tiny_student):
    inputs, targets = _tiny_batch()
    model_fn = explain.probability_fn(tiny_student, max_batch=2)
    probs = model_fn(inputs)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    maps = np.random.default_rng(6).uniform(size=(3, 16, 16))
    curve = explain.insertion_curve(model_fn, inputs, maps, targets=targets, steps=4)
    assert curve.scores.shape == (3, 5)
    np.testing.assert_allclose(curve.scores[:, -1], probs[np.arange(3), targets], rtol=1e-5)


# ----------------------------------------------------------------- figures

def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    labels = np.array([2, 0, 2, 1, 0])
    grid = tmp_path / "grid.png"
    explain.plot_grid(images, rng.uniform(size=(5, 8, 8)), rng.uniform(size=(5, 8, 8)), labels,
                      ["cat", "dog", "ship"], str(grid), title="tiny")
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and grid.stat().st_size > 1000

    model_fn = _one_pixel_model(0, 0)
    maps = rng.uniform(size=(2, 4, 4))
    imgs = np.ones((2, 4, 4, 1), np.float32)
    curves = {"a": {"deletion": explain.deletion_curve(model_fn, imgs, maps, targets=[0, 0], steps=4),
                    "insertion": explain.insertion_curve(model_fn, imgs, maps, targets=[0, 0], steps=4)}}
    path = tmp_path / "sub" / "curves.png"
    explain.plot_curves(curves, str(path))
    assert path.stat().st_size > 1000


# ----------------------------------------------------------------- script

_REPO = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))

# Runs the script under tfds' mock data: scripts parse absl flags, so each run gets its own process.
_RUN_SCRIPT = """
import runpy, sys
import kdig_tf
import tensorflow_datasets as tfds
sys.argv = ["explain.py"] + sys.argv[1:]
with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    runpy.run_path({script!r}, run_name="__main__")
"""


def _run_script(args, cwd):
    import os
    import subprocess
    import sys

    code = _RUN_SCRIPT.format(script=os.path.join(_REPO, "scripts", "explain.py"))
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", code] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_script_end_to_end_on_mock_data(tmp_path):
    import json

    from kdig_tf import models

    paths = []
    for index, keep in enumerate((2, 3)):
        path = tmp_path / f"student{index}.keras"
        models.build_student(keep_blocks=keep).save(str(path))
        paths.append(str(path))
    out = tmp_path / "out"
    proc = _run_script([
        f"--teacher={paths[0]}", f"--students={paths[1]}", "--names=small", "--num_images=4",
        "--ig_steps=2", "--smooth_samples=1", "--curve_steps=2", f"--output_dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "explain.json").read_text())
    assert result["reference"] == "student0"
    assert set(result["agreement"]["small"]) == {"ig", "saliency", "gradcam++"}
    assert all(0 <= entry["topk_tied_pairs"] <= 4 for entry in result["agreement"]["small"].values())
    assert len(result["per_image"]["agreement"]["small"]["ig"]["spearman"]) == 4
    assert set(result["faithfulness"]) == {"student0", "small"}
    assert "| small | ig |" in (out / "summary.md").read_text()
    assert (out / "grid_gradcampp_small.png").stat().st_size > 1000
    assert (out / "curves_ig.png").stat().st_size > 1000


def test_script_unknown_method_exits_2(tmp_path):
    proc = _run_script(["--students=x.pt", "--methods=lime"], tmp_path)
    assert proc.returncode == 2
    assert "UnknownKeyError" in proc.stderr
