"""How many Gauss-Legendre steps do the precomputed IG maps need? Agreement with a fine reference.

    nice -n 19 python benchmarks/ig_steps_agreement.py --data_dir=../shared/tensorflow_datasets

For the first ``--num_images`` images of ``--split`` this computes the teacher's IG maps with
the precompute store's settings (``records.TeacherTargets``: Gauss-Legendre quadrature, zeros
baseline in the teacher's normalised input space, target = true label, logit output, map =
sum over channels of |attribution|) at every step count of ``--steps`` and at
``--reference_steps``. Per step count it reports, as mean +- sd over images:

* completeness error |sum(attr) - (F(x) - F(x'))| / |F(x) - F(x')|;
* relative L1 distance of the map to the reference map, sum|m - m_ref| / sum|m_ref|;
* Spearman rank correlation of the map with the reference map (``explain.spearman``);
* IoU of the top-``--topk_fraction`` pixels with the reference (``explain.topk_iou``);
* wall time per image (the IG call only; tracing is done by untimed warm-up calls).

Step counts are interleaved within each batch of images, so a change in machine load hits
all of them alike. JSON (atomic) goes to ``--output``, a markdown table next to it.
"""
import os
import sys


import kdig_tf  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("teacher", "pretrained/teacher.h5", "Teacher model file (kdig_tf.loading.load_model).")
flags.DEFINE_string("dataset", "cifar10", "tfds dataset.")
flags.DEFINE_string("split", "train[45000:]", "Split; its first --num_images images are used.")
flags.DEFINE_string("data_dir", None, "tfds data_dir (default: $TFDS_DATA_DIR).")
flags.DEFINE_integer("num_images", 32, "Images to attribute.")
flags.DEFINE_list("steps", ["8", "16", "32", "50"], "Gauss-Legendre step counts to evaluate.")
flags.DEFINE_integer("reference_steps", 128, "Step count of the reference maps.")
flags.DEFINE_integer("batch_size", 8, "Images per IG call.")
flags.DEFINE_integer("max_batch", 256, "IG path points per gradient call (does not change the result).")
flags.DEFINE_float("topk_fraction", 0.1, "Fraction of pixels in the top-k IoU.")
flags.DEFINE_string("output", "results/benchmarks/ig_steps_agreement.json",
                    "JSON output path; the markdown table goes to the same path with .md.")

METHOD = "gausslegendre"
BASELINE = "zeros"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from kdig_tf import cli
    cli.run(_run)


def parse_steps(values, reference_steps):
    """Sorted unique step counts from flag strings; raise InvalidArgumentError on bad values."""
    from kdig_tf.errors import InvalidArgumentError

    try:
        steps = sorted({int(value) for value in values})
    except ValueError as err:
        raise InvalidArgumentError(f"--steps must be integers, got {values}") from err
    if not steps or min(steps) < 1 or reference_steps < 1:
        raise InvalidArgumentError(f"--steps and --reference_steps must be >= 1, got {values} and {reference_steps}")
    return steps


def image_metrics(attributions, deltas, maps, reference_maps, fraction=0.1):
    """Per-image agreement of one step count's IG with the reference, as {name: [B] array}.

    ``attributions`` [B,H,W,C] and ``deltas`` [B] are that step count's IG result; ``maps`` and
    ``reference_maps`` [B,H,W] are sum-|attr| maps. F(x) - F(x') is recovered as
    sum(attr) - delta (which is exact, whatever the quadrature error).
    """
    import numpy as np

    from kdig_tf import explain

    attributions = np.asarray(attributions, np.float64)
    deltas = np.asarray(deltas, np.float64)
    maps = np.asarray(maps, np.float64)
    reference_maps = np.asarray(reference_maps, np.float64)
    total = attributions.reshape(attributions.shape[0], -1).sum(axis=1)
    score_gap = total - deltas  # F(x) - F(x')
    flat, flat_ref = maps.reshape(maps.shape[0], -1), reference_maps.reshape(reference_maps.shape[0], -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        completeness = np.abs(deltas) / np.abs(score_gap)
        rel_l1 = np.abs(flat - flat_ref).sum(axis=1) / np.abs(flat_ref).sum(axis=1)
    return {
        "completeness_rel_error": completeness,
        "completeness_abs_error": np.abs(deltas),
        "score_gap": score_gap,
        "rel_l1_to_reference": rel_l1,
        "spearman_to_reference": np.asarray(explain.spearman(maps, reference_maps), np.float64),
        "topk_iou_to_reference": np.asarray(explain.topk_iou(maps, reference_maps, fraction), np.float64),
    }


def summary(values):
    """``explain.summarize`` (mean, sample sd, n, n_nan) plus the median."""
    import numpy as np

    from kdig_tf import explain

    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return dict(explain.summarize(values), median=float(np.median(finite)) if finite.size else float("nan"))


def _fmt(stats, spec, median=False):
    if stats is None:
        return "–"
    if stats["n"] == 0:
        return "nan"
    sd = "" if stats["n"] < 2 else f" ± {format(stats['sd'], spec)}"
    middle = f" ({format(stats['median'], spec)})" if median else ""
    return f"{format(stats['mean'], spec)}{sd}{middle}"


def to_markdown(result):
    """A short markdown report of ``result`` (the JSON's content)."""
    setup = result["setup"]
    teacher = result["teacher"]
    rows = [
        f"# IG step count vs. a GL-{setup['reference_steps']} reference",
        "",
        f"Teacher `{teacher['path']}` (sha256 `{teacher['sha256'][:16]}…`); {setup['num_images']} images of "
        f"{setup['dataset']} `{setup['split']}` (first in order; the teacher is right on "
        f"{teacher['correct_on_images']}/{setup['num_images']}). IG as in the precompute store: "
        f"{setup['method']}, `{setup['baseline']}` baseline in the normalised input space, target = true label, "
        f"logit output; map = sum over channels of |attr|. Values are mean ± sd over images "
        f"(completeness: mean ± sd (median); a few images with a small F(x) - F(x') dominate its mean and sd).",
        "",
        "| GL steps | completeness error (rel.) | rel. L1 to ref. | Spearman to ref. | "
        f"top-{setup['topk_fraction']:.0%} IoU to ref. | s/image | path points/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        reference = row["is_reference"]
        label = f"{row['steps']} (ref.)" if reference else str(row["steps"])
        agreement = [None] * 3 if reference else [row["rel_l1_to_reference"], row["spearman_to_reference"],
                                                   row["topk_iou_to_reference"]]
        rows.append(f"| {label} | {_fmt(row['completeness_rel_error'], '.2e', median=True)} | {_fmt(agreement[0], '.4f')} | "
                    f"{_fmt(agreement[1], '.4f')} | {_fmt(agreement[2], '.3f')} | "
                    f"{row['seconds_per_image']:.3f} | {row['points_per_second']:.0f} |")
    rows += [
        "",
        f"Chance top-{setup['topk_fraction']:.0%} IoU of two random pixel sets: {result['topk_iou_chance']:.3f}. "
        f"Wall time: {result['wall_seconds']:.0f} s in all; times are for the IG calls only (no tracing), "
        f"batch {setup['batch_size']}, step counts interleaved per batch.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(rows)


def _run():
    import shlex
    import time

    import numpy as np
    import tensorflow as tf
    from tqdm import tqdm

    from kdig_tf import attribution, benchmark, data, explain, loading
    from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError
    from kdig_tf.io_utils import atomic_write_bytes, atomic_write_json, sha256_file

    wall_start = time.perf_counter()
    steps = parse_steps(FLAGS.steps, FLAGS.reference_steps)
    if min(FLAGS.num_images, FLAGS.batch_size, FLAGS.max_batch) < 1:
        raise InvalidArgumentError("num_images, batch_size and max_batch must be >= 1")
    if not 0.0 < FLAGS.topk_fraction <= 1.0:
        raise InvalidArgumentError(f"topk_fraction must be in (0, 1], got {FLAGS.topk_fraction}")
    command = shlex.join(["python", *sys.argv])
    load_start = os.getloadavg()

    teacher = loading.load_model(FLAGS.teacher)
    teacher_sha = sha256_file(FLAGS.teacher)
    ds, info = data.load(FLAGS.dataset, FLAGS.split, FLAGS.data_dir)
    examples = list(ds.take(FLAGS.num_images).as_numpy_iterator())
    if len(examples) < FLAGS.num_images:
        raise InvalidArgumentError(f"split {FLAGS.split!r} has only {len(examples)} images, "
                                   f"--num_images={FLAGS.num_images}")
    images = np.stack([image for image, _, _ in examples])
    labels = np.array([label for _, label, _ in examples], np.int32)
    ids = [example_id.decode() for _, _, example_id in examples]
    num_classes = int(teacher.output_shape[-1])
    if labels.max() >= num_classes:
        raise ShapeMismatchError(f"label {labels.max()} but the teacher has {num_classes} outputs")
    # Exactly the store's input path and IG settings (records.TeacherTargets).
    inputs = data.preprocess_teacher(tf.constant(images)).numpy()
    logits = teacher(inputs, training=False).numpy()
    correct = logits.argmax(axis=1) == labels

    all_steps = steps + ([FLAGS.reference_steps] if FLAGS.reference_steps not in steps else [])
    igs = {count: attribution.IntegratedGradients(teacher, steps=count, method=METHOD, baseline=BASELINE,
                                                  max_batch=FLAGS.max_batch, pixel_to_input=data.normalize_teacher)
           for count in all_steps}
    # Warm-up: batch shapes 1 and 2 make reduce_retracing settle on a [None, ...] trace that the
    # timed calls (any batch size) reuse.
    for ig in igs.values():
        for size in (1, 2):
            ig(inputs[:size], labels[:size]).attributions.numpy()

    attributions = {count: [] for count in all_steps}
    deltas = {count: [] for count in all_steps}
    seconds = {count: 0.0 for count in all_steps}
    bar = tqdm(total=FLAGS.num_images * sum(all_steps), unit="pt", desc="IG path points", smoothing=0.1)
    for start in range(0, FLAGS.num_images, FLAGS.batch_size):
        batch = slice(start, min(start + FLAGS.batch_size, FLAGS.num_images))
        # Alternate the order per batch, so no step count always runs first or last.
        order = all_steps if (start // FLAGS.batch_size) % 2 == 0 else all_steps[::-1]
        for count in order:
            begin = time.perf_counter()
            result = igs[count](inputs[batch], labels[batch])
            attr = result.attributions.numpy()
            seconds[count] += time.perf_counter() - begin
            attributions[count].append(attr)
            deltas[count].append(result.delta.numpy())
            bar.update((batch.stop - batch.start) * count)
    bar.close()
    load_end = os.getloadavg()

    maps = {count: attribution.attribution_map(np.concatenate(attributions[count])).numpy() for count in all_steps}
    reference = maps[FLAGS.reference_steps]
    rows, per_image = [], {}
    for count in sorted(all_steps):
        metrics = image_metrics(np.concatenate(attributions[count]), np.concatenate(deltas[count]),
                                maps[count], reference, FLAGS.topk_fraction)
        is_reference = count == FLAGS.reference_steps
        row = {"steps": count, "is_reference": is_reference, "evaluated": count in steps,
               "seconds_per_image": seconds[count] / FLAGS.num_images,
               "points_per_second": FLAGS.num_images * count / seconds[count],
               "gradient_traces": igs[count]._weighted_gradients.experimental_get_tracing_count()}
        row.update({name: summary(values) for name, values in metrics.items() if name != "score_gap"})
        rows.append(row)
        per_image[str(count)] = {name: values.tolist() for name, values in metrics.items()}
    wall_seconds = time.perf_counter() - wall_start

    result = {
        "command": command,
        "argv": sys.argv,
        "teacher": {"path": FLAGS.teacher, "sha256": teacher_sha, "params": int(teacher.count_params()),
                    "correct_on_images": int(correct.sum())},
        "setup": {"dataset": FLAGS.dataset, "split": FLAGS.split, "data_dir": FLAGS.data_dir,
                  "num_images": FLAGS.num_images, "steps": steps, "reference_steps": FLAGS.reference_steps,
                  "method": METHOD, "baseline": BASELINE, "output": "logit", "target": "true label",
                  "map": "sum over channels of |attribution|", "batch_size": FLAGS.batch_size,
                  "max_batch": FLAGS.max_batch, "topk_fraction": FLAGS.topk_fraction,
                  "ig_settings": igs[steps[0]].settings()},
        "images": {"ids": ids, "labels": labels.tolist(), "teacher_correct": correct.tolist()},
        "rows": rows,
        "per_image": per_image,
        "topk_iou_chance": explain.topk_iou_chance(int(np.prod(reference.shape[1:])), FLAGS.topk_fraction),
        "wall_seconds": wall_seconds,
        "machine": dict(benchmark.environment(), load_average_start=list(load_start),
                        load_average_end=list(load_end)),
    }
    atomic_write_json(FLAGS.output, result)
    markdown_path = os.path.splitext(FLAGS.output)[0] + ".md"
    atomic_write_bytes(markdown_path, to_markdown(result).encode())
    print(to_markdown(result))
    print(f"-> {FLAGS.output}, {markdown_path}")


if __name__ == "__main__":
    app.run(main)
