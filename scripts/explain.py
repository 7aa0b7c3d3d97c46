"""Measure how closely students explain like a reference model, and how faithful each map is.

    python scripts/explain.py --teacher=runs/teacher/teacher.h5 \\
        --students=student_a.pt,student_b.weights.h5 --data_dir=../shared/tensorflow_datasets

The model given as ``--teacher`` is the reference (any loadable model: the teacher, or one
student compared against others). For every method and image the target is the true
label. Outputs in ``--output_dir``:

* ``explain.json``: settings, per-model accuracy on the images, agreement with the
  reference (Spearman and top-k IoU, mean and sample sd), deletion / insertion AUCs of
  every model under its own maps, mean curves, and all per-image values;
* ``summary.md``: the same tables in Markdown;
* ``grid_<method>_<model>.png`` (one row per class) and ``curves_<method>.png``.

Deletion and insertion work on [0, 1] pixels and map them into each model's input space,
so every model sees the same perturbed images (black pixels for deletion, a blurred image
for insertion by default).
"""
import os


import kdig_tf  # noqa: F401
from absl import flags

from kdig_tf import cli
from kdig_tf import logs

FLAGS = flags.FLAGS
logs.define_flags(FLAGS)
flags.DEFINE_string("teacher", "runs/teacher/teacher.h5", "Reference model file (.pt, .h5, .keras).")
flags.DEFINE_string("teacher_name", None, "Display name of the reference (default: file stem).")
flags.DEFINE_list("students", [], "Comma-separated model files compared with the reference.")
flags.DEFINE_list("names", None, "Display names of --students, same order (default: file stems).")
flags.DEFINE_string("dataset", "cifar10", "tfds dataset name.")
flags.DEFINE_string("split", "train[45000:]", "Split the images are taken from (in order).")
flags.DEFINE_string("data_dir", None, "tfds data_dir (default: $TFDS_DATA_DIR).")
flags.DEFINE_integer("num_images", 100, "Number of images (the first ones of the split).")
flags.DEFINE_list("methods", ["ig", "saliency", "gradcam++"], "Attribution methods.")
flags.DEFINE_integer("ig_steps", 50, "Integrated Gradients quadrature steps.")
flags.DEFINE_string("ig_method", "gausslegendre", "Integrated Gradients quadrature rule.")
flags.DEFINE_string(
    "ig_baseline", "black",
    "IG baseline. 'black' gives every model the same pixel baseline; 'zeros' is the paper's "
    "(zero in input space, i.e. the mean colour for a normalised teacher).")
flags.DEFINE_integer("smooth_samples", 20, "SmoothGrad samples (0 = vanilla saliency).")
flags.DEFINE_float("smooth_noise", 0.2, "SmoothGrad noise sd relative to each image's range.")
flags.DEFINE_float("topk_fraction", 0.1, "Fraction of pixels in the top-k sets for IoU.")
flags.DEFINE_integer("curve_steps", 32, "Steps of the deletion / insertion curves.")
flags.DEFINE_string("deletion_baseline", "zeros", "Deletion fill: zeros (black), mean or blur.")
flags.DEFINE_string("insertion_baseline", "blur", "Insertion start: blur, zeros (black) or mean.")
flags.DEFINE_integer("batch_size", 64, "Batch size for attribution maps and predictions.")
flags.DEFINE_integer("seed", 0, "Seed for SmoothGrad noise.")
flags.DEFINE_string("output_dir", "results/explain", "Output directory.")

_OWN_FLAGS = ("teacher", "teacher_name", "students", "names", "dataset", "split", "data_dir",
              "num_images", "methods", "ig_steps", "ig_method", "ig_baseline", "smooth_samples",
              "smooth_noise", "topk_fraction", "curve_steps", "deletion_baseline",
              "insertion_baseline", "batch_size", "seed", "output_dir")


def main(argv):
    logs.quiet(FLAGS.verbose_logs)
    del argv
    from kdig_tf import cli
    cli.run(_explain)


def _stem(path):
    name = os.path.basename(path)
    for suffix in (".weights.h5", ".h5", ".keras", ".pth", ".pt"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def _model_names():
    from kdig_tf.errors import InvalidArgumentError

    if not FLAGS.students:
        raise InvalidArgumentError("give at least one model in --students to compare with --teacher")
    students = FLAGS.names or [_stem(path) for path in FLAGS.students]
    if len(students) != len(FLAGS.students):
        raise InvalidArgumentError(f"--names has {len(students)} entries for {len(FLAGS.students)} students")
    names = [FLAGS.teacher_name or _stem(FLAGS.teacher)] + list(students)
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"model names must be unique, got {names}; use --names/--teacher_name")
    return names


def _check_flags():
    from kdig_tf import explain
    from kdig_tf.errors import InvalidArgumentError

    for method in FLAGS.methods:
        explain.get_method(method)
    if FLAGS.num_images < 1 or FLAGS.batch_size < 1 or FLAGS.ig_steps < 1:
        raise InvalidArgumentError("num_images, batch_size and ig_steps must be >= 1")
    if not 0.0 < FLAGS.topk_fraction <= 1.0:
        raise InvalidArgumentError(f"topk_fraction must be in (0, 1], got {FLAGS.topk_fraction}")


def _load_images():
    import numpy as np

    from kdig_tf import data
    from kdig_tf.errors import InvalidArgumentError

    ds, info = data.load(FLAGS.dataset, FLAGS.split, FLAGS.data_dir)
    images, labels, ids = [], [], []
    for image, label, example_id in ds.take(FLAGS.num_images).as_numpy_iterator():
        images.append(image)
        labels.append(label)
        ids.append(example_id.decode())
    if not images:
        raise InvalidArgumentError(f"split {FLAGS.split!r} of {FLAGS.dataset} is empty")
    return np.stack(images), np.asarray(labels, np.int64), ids, data.class_names(info)


def _method_options(method, to_input):
    if method == "ig":
        return {"steps": FLAGS.ig_steps, "method": FLAGS.ig_method, "baseline": FLAGS.ig_baseline,
                "max_batch": 8 * FLAGS.batch_size, "pixel_to_input": to_input}
    if method == "saliency":
        return {"smooth_samples": FLAGS.smooth_samples, "smooth_noise": FLAGS.smooth_noise,
                "seed": FLAGS.seed, "max_batch": FLAGS.batch_size}
    return {"max_batch": FLAGS.batch_size}


def _file_part(text):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text.replace("++", "pp"))


def _fmt(stats):
    text = f"{stats['mean']:.3f} ± {stats['sd']:.3f}"
    return text + (f" ({stats['n_nan']} NaN)" if stats["n_nan"] else "")


def _json_safe(value):
    """NaN is not valid JSON: write null instead."""
    import math

    import numpy as np

    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _summary_markdown(result):
    cfg = result["config"]
    lines = [
        "# Explanation agreement and faithfulness",
        "",
        f"Reference: `{result['reference']}`. {result['num_images']} images, the first of "
        f"{cfg['dataset']} `{cfg['split']}`; target = true label. Methods: IG ({cfg['ig_steps']} "
        f"{cfg['ig_method']} steps, baseline {cfg['ig_baseline']}), SmoothGrad saliency "
        f"({cfg['smooth_samples']} samples, noise {cfg['smooth_noise']}), Grad-CAM++ (last feature layer).",
        "",
        "## Agreement with the reference (mean ± sd over images)",
        "",
        f"Top-{100 * cfg['topk_fraction']:g}% IoU of two random pixel sets: "
        f"{result['chance_topk_iou']:.3f}.",
        "",
        "A pair counts as tied when either map has equal values across its top-k threshold (e.g. "
        "a mostly-zero Grad-CAM++ map); ties are broken at random, so such top-k sets are partly arbitrary.",
        "",
        f"| model | method | Spearman | top-{100 * cfg['topk_fraction']:g}% IoU | tied pairs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, by_method in result["agreement"].items():
        for method, stats in by_method.items():
            lines.append(f"| {name} | {method} | {_fmt(stats['spearman'])} | {_fmt(stats['topk_iou'])} | "
                         f"{stats.get('topk_tied_pairs', 'n/a')} |")
    lines += [
        "",
        "## Faithfulness of each model's own maps (mean ± sd of AUC over images)",
        "",
        f"Deletion: pixels set to {cfg['deletion_baseline']} most-attributed first (lower is better). "
        f"Insertion: pixels revealed over a {cfg['insertion_baseline']} start (higher is better). "
        f"{cfg['curve_steps']} steps.",
        "",
        "| model | accuracy on these images | method | deletion AUC ↓ | insertion AUC ↑ |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, by_method in result["faithfulness"].items():
        accuracy = result["models"][name]["accuracy"]
        for method, stats in by_method.items():
            lines.append(f"| {name} | {100 * accuracy:.1f}% | {method} | {_fmt(stats['deletion_auc'])} "
                         f"| {_fmt(stats['insertion_auc'])} |")
    return "\n".join(lines) + "\n"


def _explain():
    import numpy as np
    from tqdm import tqdm

    from kdig_tf import data, explain, loading
    from kdig_tf.io_utils import atomic_path, atomic_write_json

    _check_flags()
    names = _model_names()
    paths = [FLAGS.teacher] + list(FLAGS.students)
    reference = names[0]

    images, labels, ids, class_names = _load_images()
    pixels = images.astype(np.float32) / 255.0

    models = {}
    for name, path in zip(names, paths):
        model = loading.load_model(path)
        kind = loading.input_kind(model)
        to_input = data.normalize_teacher if kind == "normalized" else None
        predict = explain.probability_fn(model, to_input, max_batch=FLAGS.batch_size)
        arch, keep_blocks = loading.describe_model(model)
        predictions = predict(pixels).argmax(axis=1)
        models[name] = {"model": model, "to_input": to_input, "predict": predict, "predictions": predictions,
                        "info": {"path": path, "input_kind": kind, "arch": arch, "keep_blocks": keep_blocks,
                                 "accuracy": float(np.mean(predictions == labels))}}

    maps = {}
    curves = {}
    progress = tqdm(total=2 * len(FLAGS.methods) * len(names), desc="explain", unit="task")
    for method in FLAGS.methods:
        for name in names:
            entry = models[name]
            progress.set_postfix_str(f"{method} maps {name}")
            inputs = pixels if entry["to_input"] is None else entry["to_input"](pixels).numpy()
            maps[method, name] = explain.attribution_maps(
                method, entry["model"], inputs, labels, **_method_options(method, entry["to_input"]))
            progress.update()
            progress.set_postfix_str(f"{method} curves {name}")
            curves[method, name] = {
                "deletion": explain.deletion_curve(entry["predict"], pixels, maps[method, name], labels,
                                                   FLAGS.curve_steps, FLAGS.deletion_baseline),
                "insertion": explain.insertion_curve(entry["predict"], pixels, maps[method, name], labels,
                                                     FLAGS.curve_steps, FLAGS.insertion_baseline),
            }
            progress.update()
    progress.close()

    agreement, per_image_agreement = {}, {}
    for name in names[1:]:
        agreement[name], per_image_agreement[name] = {}, {}
        for method in FLAGS.methods:
            rho = explain.spearman(maps[method, reference], maps[method, name])
            iou = explain.topk_iou(maps[method, reference], maps[method, name], FLAGS.topk_fraction)
            # Maps with a tie across the top-k threshold have partly arbitrary top-k sets: count them.
            tied = explain.topk_ties(maps[method, reference], FLAGS.topk_fraction) \
                | explain.topk_ties(maps[method, name], FLAGS.topk_fraction)
            agreement[name][method] = {"spearman": explain.summarize(rho), "topk_iou": explain.summarize(iou),
                                       "topk_tied_pairs": int(tied.sum())}
            per_image_agreement[name][method] = {"spearman": rho, "topk_iou": iou}

    faithfulness = {name: {method: {"deletion_auc": explain.summarize(curves[method, name]["deletion"].auc),
                                    "insertion_auc": explain.summarize(curves[method, name]["insertion"].auc)}
                           for method in FLAGS.methods} for name in names}

    result = {
        "config": {flag: FLAGS[flag].value for flag in _OWN_FLAGS},
        "reference": reference,
        "num_images": int(len(labels)),
        "targets": "true label",
        "models": {name: models[name]["info"] for name in names},
        "chance_topk_iou": explain.topk_iou_chance(pixels.shape[1] * pixels.shape[2], FLAGS.topk_fraction),
        "agreement": agreement,
        "faithfulness": faithfulness,
        "mean_curves": {method: {name: {"fractions": curves[method, name]["deletion"].fractions,
                                        "deletion": curves[method, name]["deletion"].scores.mean(axis=0),
                                        "insertion": curves[method, name]["insertion"].scores.mean(axis=0)}
                                 for name in names} for method in FLAGS.methods},
        "per_image": {
            "ids": ids,
            "labels": labels,
            "predictions": {name: models[name]["predictions"] for name in names},
            "agreement": per_image_agreement,
            "deletion_auc": {name: {method: curves[method, name]["deletion"].auc
                                    for method in FLAGS.methods} for name in names},
            "insertion_auc": {name: {method: curves[method, name]["insertion"].auc
                                     for method in FLAGS.methods} for name in names},
        },
    }

    out = FLAGS.output_dir
    os.makedirs(out, exist_ok=True)
    for method in FLAGS.methods:
        for name in names[1:]:
            explain.plot_grid(images, maps[method, reference], maps[method, name], labels, class_names,
                              os.path.join(out, f"grid_{_file_part(method)}_{_file_part(name)}.png"),
                              teacher_name=reference, student_name=name, title=method)
        explain.plot_curves({name: curves[method, name] for name in names},
                            os.path.join(out, f"curves_{_file_part(method)}.png"), title=method)
    atomic_write_json(os.path.join(out, "explain.json"), _json_safe(result))
    markdown = _summary_markdown(result)
    with atomic_path(os.path.join(out, "summary.md")) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(markdown)
    print(markdown)
    print(f"wrote {out}/explain.json, summary.md and figures")


if __name__ == "__main__":
    cli.main(main)
