"""Latency-aware students: a keep_blocks x width x TFLite-mode grid plus named extra
candidates, timed against the fp32 teacher; the Pareto front, and the candidates at least
``target`` times faster.

What ``scripts/latency_sweep.py`` runs. Every latency is a LiteRT (XNNPACK) measurement at
batch 1 (``benchmark.measure_latency``, a fresh subprocess per model by default). The fp32
teacher is the reference and is timed twice in the same run, first and last: the reference
latency is the mean of the two, and their ratio (``drift``) shows whether the load changed
while the sweep ran. Speed-up = reference latency / candidate latency (median and p90);
``fast`` means the median speed-up is >= ``target``.

Latency does not depend on the weights, so the teacher and untrained candidates are
random-weight models (int8 calibrated on random images). With ``train=True`` every candidate is a
distillation run of the campaign runner (``kdig_tf.experiments``: in this process, finished
runs skipped); its exported .tflite files are timed, and each file's accuracy is measured
on the run's validation split with LiteRT (int8 calibrated on the training split by the
pipeline). A candidate whose run has not finished is still timed, with random weights.

Input resolution is not swept: the distillation pipeline trains on 32x32 images only. The
in-network equivalent is a stem stride of 2 (every block then runs on 16x16 and smaller maps);
such students join the grid as extra candidates named ``k<keep>_w<width>_s2``. Students of the other
built-in families (``kdig_tf.students``: MobileNetV2 with per-stage strides, CIFAR ResNet,
ShuffleNetV2, plain VGG) join as ``student_specs``, named by their ``--student`` text.

Only the pure helpers (grid, Pareto front, selection, tables) avoid TensorFlow.
"""
import kdig_tf  # noqa: F401

import hashlib
import math
import os
import re
import shlex
import sys

import numpy as np

from kdig_tf import benchmark, experiments, models
from kdig_tf.errors import InvalidArgumentError, NotAModelError
from kdig_tf.io_utils import (atomic_path, atomic_write_bytes, atomic_write_json, read_json_or_none, sha256_file,
                              subplots)

REPORT_STEM = "latency_sweep"
ACCURACY_CACHE = "accuracy.json"
TEACHER = "teacher"
REFERENCE_MODE = "fp32"
IMAGE_SHAPE = (32, 32, 3)
# Distillation flags the sweep sets per candidate.
SWEEP_FLAGS = ("keep_blocks", "width_multiplier", "stem_stride", "export_modes", "student")


# --------------------------------------------------------------------------- grid

def candidate_name(keep_blocks, width, stem_stride=1):
    name = f"k{int(keep_blocks)}_w{float(width):g}"
    return name if int(stem_stride) == 1 else f"{name}_s{int(stem_stride)}"


_CANDIDATE = re.compile(r"k(\d+)_w(\d+(?:\.\d+)?)(?:_s(\d+))?")


def parse_candidate(name):
    """'k14_w0.5_s2' -> ('k14_w0.5_s2', 14, 0.5, 2); the stride suffix is optional (default 1)."""
    from kdig_tf import models

    match = _CANDIDATE.fullmatch(str(name).strip())
    if not match:
        raise InvalidArgumentError(f"candidate {name!r} is not of the form k<keep_blocks>_w<width>[_s<stem stride>]")
    keep, width, stride = int(match.group(1)), float(match.group(2)), int(match.group(3) or 1)
    models.resolve_keep_blocks(keep)
    if stride not in models.STEM_STRIDES or width <= 0:
        raise InvalidArgumentError(f"candidate {name!r}: width must be > 0 and stem stride in {models.STEM_STRIDES}")
    return candidate_name(keep, width, stride), keep, width, stride


def parse_widths(values):
    try:
        widths = [float(str(value).strip()) for value in values if str(value).strip()]
    except ValueError as err:
        raise InvalidArgumentError(f"--widths must be numbers, got {list(values)}") from err
    if not widths:
        raise InvalidArgumentError("--widths is empty")
    if min(widths) <= 0 or not all(math.isfinite(width) for width in widths):
        raise InvalidArgumentError(f"--widths must be > 0, got {widths}")
    if len({f"{width:g}" for width in widths}) != len(widths):
        raise InvalidArgumentError(f"--widths has duplicates: {widths}")
    return widths


def parse_modes(values, known=("fp32", "fp16", "dynamic", "int8")):
    modes = [str(value).strip() for value in values if str(value).strip()]
    if not modes:
        raise InvalidArgumentError("--modes is empty")
    if len(set(modes)) != len(modes):
        raise InvalidArgumentError(f"--modes has duplicates: {modes}")
    unknown = [mode for mode in modes if mode not in known]
    if unknown:
        raise InvalidArgumentError(f"unknown --modes {unknown}; known: {list(known)}")
    return modes


def candidate_grid(keep_blocks, widths, extra_candidates=()):
    """[(name, keep_blocks, width, stem_stride)]: the stride-1 grid keep_blocks-major, then the extra names."""
    grid = [(candidate_name(keep, width), int(keep), float(width), 1) for keep in keep_blocks for width in widths]
    names = {entry[0] for entry in grid}
    for extra in extra_candidates:
        entry = parse_candidate(extra)
        if entry[0] in names:
            raise InvalidArgumentError(f"candidate {entry[0]} is listed twice")
        names.add(entry[0])
        grid.append(entry)
    return grid


def spec_candidates(texts):
    """[(name, StudentSpec)] of built-in ``--student`` specs (``resnet:depth=20,width=16``), each named
    by its canonical text; a spec listed twice, under any spelling, is refused."""
    specs, names = [], set()
    for text in texts:
        if not str(text).strip():
            continue
        spec = models.parse_student_spec(text)
        name = str(spec)
        if name in names:
            raise InvalidArgumentError(f"candidate {name} is listed twice")
        names.add(name)
        specs.append((name, spec))
    return specs


def file_stem(name):
    """A candidate's file and run-directory name: a k<keep>_w<width> name as it is; a spec's text with
    its punctuation replaced, plus a hash of the text, so that two specs never share a file."""
    if _CANDIDATE.fullmatch(name):
        return name
    readable = re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")
    return f"{readable}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


# --------------------------------------------------------------------------- front and selection

def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pareto_front(points, x_key="latency_median_ms", y_key="accuracy", maximize_y=True):
    """The points no other point dominates, sorted by ``x_key`` (lower x is better).

    ``q`` dominates ``p`` when q's x <= p's x and q's y is at least as good, one of them
    strictly. Exact ties (same x and y) dominate neither way, so all of them stay. Points
    with a missing or non-finite x or y are ignored.
    """
    sign = 1.0 if maximize_y else -1.0
    valid = [point for point in points if _finite(point.get(x_key)) and _finite(point.get(y_key))]

    def dominates(q, p):
        qx, px, qy, py = q[x_key], p[x_key], sign * q[y_key], sign * p[y_key]
        return qx <= px and qy >= py and (qx < px or qy > py)

    front = [p for p in valid if not any(dominates(q, p) for q in valid if q is not p)]
    return sorted(front, key=lambda p: (p[x_key], -sign * p[y_key]))


def select_fast(rows, target=10.0, key="speedup_median"):
    """Student rows with ``key`` >= ``target``: most accurate first (unknown last), then fastest."""
    if not target > 0:
        raise InvalidArgumentError(f"target speed-up must be > 0, got {target}")
    fast = [row for row in rows if row.get("role", "student") == "student" and _finite(row.get(key))
            and row[key] >= target]
    return sorted(fast, key=lambda row: (not _finite(row.get("accuracy")), -(row.get("accuracy") or 0.0),
                                         row.get("latency_median_ms") or math.inf, row.get("name", "")))


def add_speedups(rows, reference):
    """Speed-ups vs the fp32 teacher (``reference``: median/p90 ms) and vs the teacher in the same mode."""
    teachers = {row["mode"]: row for row in rows if row.get("role") == TEACHER}
    for row in rows:
        row["speedup_median"] = _ratio(reference["median_ms"], row.get("latency_median_ms"))
        row["speedup_p90"] = _ratio(reference["p90_ms"], row.get("latency_p90_ms"))
        same = teachers.get(row["mode"])
        row["speedup_vs_teacher_same_mode"] = _ratio(same and same.get("latency_median_ms"),
                                                     row.get("latency_median_ms"))
        row["mac_ratio"] = _ratio(reference.get("macs"), row.get("macs"))
    return rows


def _ratio(numerator, denominator):
    if _finite(numerator) and _finite(denominator) and denominator:
        return float(numerator) / float(denominator)
    return None


# --------------------------------------------------------------------------- tables and plot

def _fmt(value, spec):
    return format(value, spec) if _finite(value) else "-"


def _clause(text):
    return f"; {text}" if text else ""


def to_markdown(report):
    target = report["target_speedup"]
    reference = report["reference"]
    machine = report["machine"]
    front = report["pareto"]
    lines = [
        "# Latency sweep",
        "",
        f"LiteRT (XNNPACK), batch 1, {report['settings']['num_threads']} thread(s), "
        f"{report['settings']['num_runs']} timed runs after {report['settings']['warmup_runs']} warmup. "
        f"Speed-up = fp32 teacher latency / candidate latency (median, p90); the teacher was timed "
        f"first and last in this run: {reference['median_ms']:.3f} ms median "
        f"(drift last/first {_fmt(reference.get('drift'), '.3f')}).",
        f"{machine['cpu_count']} CPUs ({machine.get('cpu_model') or machine['machine']}), load average "
        f"{machine['load_average_before']} before, {machine['load_average_after']} after the timings"
        f"{_clause(benchmark.competition_text(machine.get('timing_competition'), 'timings'))}.",
        "",
        "| candidate | keep | width | stem stride | mode | params | MACs (M) | MAC ratio | median ms | p90 ms "
        "| speed-up (median) | speed-up (p90) | vs teacher same mode | val acc (%) | file (KiB) | Pareto | "
        f">= {target:g}x |",
        "|" + "---|" * 17,
    ]
    for row in report["rows"]:
        lines.append("| " + " | ".join([
            row["name"], str(row.get("keep_blocks") or "-"), _fmt(row.get("width_multiplier"), "g"),
            str(row.get("stem_stride") or "-"), row["mode"],
            f"{row['params']:,}", f"{row['macs'] / 1e6:.1f}", _fmt(row.get("mac_ratio"), ".1f"),
            _fmt(row.get("latency_median_ms"), ".3f"), _fmt(row.get("latency_p90_ms"), ".3f"),
            _fmt(row.get("speedup_median"), ".2f") + ("x" if _finite(row.get("speedup_median")) else ""),
            _fmt(row.get("speedup_p90"), ".2f") + ("x" if _finite(row.get("speedup_p90")) else ""),
            _fmt(row.get("speedup_vs_teacher_same_mode"), ".2f"),
            _fmt(row.get("accuracy"), ".2f"),
            _fmt(row.get("file_size_bytes") and row["file_size_bytes"] / 1024, ".1f"),
            "yes" if row.get("pareto") else "", "yes" if row.get("fast") else "",
        ]) + " |")
    fast = report["fast_candidates"]
    lines += [
        "",
        f"- Pareto front ({front['objective']}): " + (", ".join(front["members"]) or "none") + ".",
        f"- Candidates >= {target:g}x faster than the fp32 teacher (median): "
        + (", ".join(fast) if fast else "none") + ".",
    ]
    if report.get("best_fast"):
        best = report["best_fast"]
        lines.append(f"- Most accurate of them: {best['name']} ({best['mode']}), {best['accuracy']:.2f}% on "
                     f"`{best.get('accuracy_split')}`, {best['speedup_median']:.2f}x.")
    if report["settings"]["train"]:
        lines.append("- Accuracy: the timed .tflite file itself, evaluated with LiteRT on the run's validation "
                     "split; '-' = run not finished (timed with random weights).")
    else:
        lines.append("- No training (--train=false): random weights, no accuracy. The front keeps, for each "
                     "latency, the candidate with the most MACs (a capacity proxy, not accuracy).")
    for warning in report.get("warnings") or []:
        lines += ["", f"**Warning:** {warning}."]
    lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"



def plot_sweep(report, path):
    """Latency (log x) vs accuracy, or vs MACs without training; front as a step line."""
    y_key = report["pareto"]["y"]
    scale = 1e-6 if y_key == "macs" else 1.0
    students = [dict(row, y=row[y_key] * scale) for row in report["rows"]
                if row["role"] == "student" and _finite(row.get(y_key))]
    figure, axes = subplots(figsize=(8.0, 5.0))
    modes = list(report["settings"]["modes"])
    modes += sorted({row["mode"] for row in students} - set(modes))  # QAT and pruned exports
    for index, mode in enumerate(modes):
        mine = [row for row in students if row["mode"] == mode]
        if mine:
            axes.scatter([row["latency_median_ms"] for row in mine], [row["y"] for row in mine],
                         s=22, color=f"C{index}", label=mode, zorder=3)
    fast = [row for row in students if row.get("fast")]
    if fast:
        axes.scatter([row["latency_median_ms"] for row in fast], [row["y"] for row in fast], s=90,
                     facecolors="none", edgecolors="k", label=f">= {report['target_speedup']:g}x", zorder=4)
    front = [row for row in students if row.get("pareto")]
    front.sort(key=lambda row: row["latency_median_ms"])
    if front:
        axes.step([row["latency_median_ms"] for row in front], [row["y"] for row in front], where="post",
                  color="k", alpha=0.5, label="Pareto front")
        for row in front:
            axes.annotate(f"{row['name']} {row['mode']}", (row["latency_median_ms"], row["y"]),
                          textcoords="offset points", xytext=(4, 4), fontsize=6)
    reference = report["reference"]["median_ms"]
    axes.axvline(reference, color="C3", linestyle="-", alpha=0.6, label=f"fp32 teacher {reference:.2f} ms")
    axes.axvline(reference / report["target_speedup"], color="C3", linestyle="--", alpha=0.6,
                 label=f"{report['target_speedup']:g}x faster")
    axes.set_xscale("log")
    if y_key == "macs":
        axes.set_yscale("log")
        axes.set_ylabel("MACs (millions, log scale; capacity proxy)")
    else:
        axes.set_ylabel(f"validation accuracy (%) on {report.get('val_split')}")
    axes.set_xlabel("median latency (ms, batch 1, log scale)")
    axes.set_title(f"Students vs fp32 teacher ({report['settings']['num_threads']} thread, LiteRT)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=150, format="png")


# --------------------------------------------------------------------------- machine

def machine_info():
    info = benchmark.environment()
    info.pop("load_average", None)  # the sweep records it before and after
    info.update(niceness=os.nice(0) if hasattr(os, "nice") else None,
                usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)
    return info


# --------------------------------------------------------------------------- models and files

def _calibration(kind, count, seed):
    """Random images preprocessed for ``kind`` ("unit" or "normalized"): fine for timing only."""
    from kdig_tf import data

    images = np.random.default_rng(seed).random((count, *IMAGE_SHAPE), dtype=np.float32)
    if kind == "normalized":
        images = (images - np.array(data.CIFAR10_MEAN, np.float32)) / np.array(data.CIFAR10_STD, np.float32)
    return images


def _reusable(path, weights_hash, mode, num_representative):
    """True if ``path`` was converted from these weights in this mode (so a rerun skips conversion)."""
    sidecar = read_json_or_none(os.path.splitext(path)[0] + ".json") or {}
    if not os.path.isfile(path) or sidecar.get("tflite_sha256") != sha256_file(path):
        return False
    conversion = sidecar.get("conversion") or {}
    return ((sidecar.get("source_model") or {}).get("weights_sha256") == weights_hash
            and conversion.get("mode") == mode and conversion.get("num_representative") == num_representative)


def random_tflite(model, path, mode, kind, num_calibration, seed):
    """Convert a random-weight model for timing, reusing an identical earlier conversion."""
    from kdig_tf import export

    representative = _calibration(kind, num_calibration, seed) if mode == "int8" else None
    count = 0 if representative is None else len(representative)
    if not _reusable(path, models.weights_fingerprint(model), mode, count):
        export.convert(model, path, mode, representative_images=representative, input_kind=kind)
    return path


def tflite_accuracy(path, flags):
    """Top-1 accuracy (%) of a student .tflite on the run's validation split, and the count."""
    from kdig_tf import data

    image_size = int(flags.get("image_size") or 0) or None
    raw, _ = data.load(flags.get("dataset") or "cifar10", flags["val_split"], flags.get("data_dir"),
                       image_size=image_size)
    predict, preprocess = benchmark.tflite_predictor(path)
    try:
        scores = benchmark.evaluate_accuracy(predict, raw, preprocess)
    except InvalidArgumentError as err:
        raise InvalidArgumentError(f"validation split {flags['val_split']} is empty") from err
    return {"accuracy": scores["accuracy"], "num_examples": scores["num_examples"]}


def default_latency_fn(isolate=True):
    def measure(path, num_threads, warmup_runs, num_runs):
        return benchmark.measure_latency(path, batch_size=1, num_threads=num_threads, warmup_runs=warmup_runs,
                                         num_runs=num_runs, isolate=isolate)
    return measure


# --------------------------------------------------------------------------- the sweep

def _train_candidates(output_dir, grid, modes, flagfile, method, seed, extra_flags, final_report,
                      launcher, dry_run, log, specs=()):
    """Run (or skip) one distillation per candidate, in this process; returns rows and the val split."""
    extra = experiments.parse_extra_flags(extra_flags)
    clash = [name for name in SWEEP_FLAGS if name in extra]
    if clash:
        raise InvalidArgumentError(f"--extra_flags may not set {clash}: the sweep sets them per candidate")
    splits = experiments.check_campaign_splits(flagfile, extra, final_report)
    common = dict(experiments.default_store_dir(output_dir, flagfile, extra), **extra)
    runs = []
    for name, keep, width, stride in grid:
        overrides = dict(common, keep_blocks=keep, width_multiplier=width, export_modes=",".join(modes))
        if stride != 1:  # stride-1 runs keep the command they had before the flag existed
            overrides["stem_stride"] = stride
        runs += experiments.seed_runs(os.path.join(output_dir, "runs"), [method], [seed], 1.0, overrides,
                                      {"candidate": name, "keep_blocks": keep, "width_multiplier": width,
                                       "stem_stride": stride}, subdir=name)
    for name, spec in specs:
        overrides = dict(common, student=name, export_modes=",".join(modes))
        runs += experiments.seed_runs(os.path.join(output_dir, "runs"), [method], [seed], 1.0, overrides,
                                      {"candidate": name, "family": spec.family}, subdir=file_stem(name))
    rows = experiments.run_campaign(runs, flagfile, launcher, dry_run=dry_run, log=log, rows_dir=output_dir)
    return rows, splits["val_split"]


def _trained_file(run_row, mode):
    """(path, results) of a finished run's exported .tflite in ``mode``, else (None, None)."""
    if run_row is None or run_row["status"] not in experiments.FINISHED:
        return None, None
    results = read_json_or_none(os.path.join(run_row["workdir"], experiments.RESULTS_FILE)) or {}
    entry = (results.get("tflite") or {}).get(mode) or {}
    path = experiments.recorded_output(run_row["workdir"], entry.get("path") if isinstance(entry, dict) else None)
    if path is None:
        raise NotAModelError(f"{run_row['workdir']} finished without a {mode} .tflite export")
    return path, results


def fine_tuned_modes(run_row, modes):
    """Exports of a finished run beyond ``modes``: its QAT and pruned files (qat_int8, pruned_fp32, ...)."""
    if run_row is None or run_row["status"] not in experiments.FINISHED:
        return []
    results = read_json_or_none(os.path.join(run_row["workdir"], experiments.RESULTS_FILE)) or {}
    return sorted(mode for mode in (results.get("tflite") or {}) if mode not in modes)


def _cached_accuracy(cache, path, flags, accuracy_fn):
    key = f"{sha256_file(path)}:{flags['val_split']}"
    if key not in cache:
        cache[key] = dict(accuracy_fn(path, flags), split=flags["val_split"])
    return cache[key]


def run_latency_sweep(output_dir, keep_blocks, widths, modes, extra_candidates=(), train=False, flagfile=None,
                      method="kd_ig", seed=0, extra_flags="", final_report=False, num_threads=1, warmup_runs=5,
                      num_runs=50,
                      target_speedup=10.0, num_calibration=128, random_seed=0, isolate=True, command=None,
                      teacher=None, latency_fn=None, accuracy_fn=tflite_accuracy,
                      launcher=experiments.distill_launcher, dry_run=False, log=print, student_specs=()):
    """Time every candidate and the fp32 teacher; write latency_sweep.{json,md,png}; return the report.

    ``student_specs``: built-in ``--student`` specs (``kdig_tf.students``) timed beside the
    k<keep>_w<width> grid, built for the teacher's classes and ``IMAGE_SHAPE``.

    ``latency_fn(path, num_threads, warmup_runs, num_runs)`` -> benchmark latency dict;
    ``accuracy_fn(path, run_flags)`` -> {"accuracy": %, "num_examples": n} (train only);
    ``teacher``: the Keras reference model (default: the CIFAR MobileNetV2, random weights);
    ``launcher(config, workdir)`` trains one candidate (``train`` only; default: the pipeline, in-process).
    """
    extra_candidates = [str(name).strip() for name in extra_candidates if str(name).strip()]
    specs = spec_candidates(student_specs)
    if (extra_candidates or specs) and not any(str(value).strip() for value in [*keep_blocks, *widths]):
        keep_blocks, widths = [], []  # the named candidates alone, no grid
    else:
        keep_blocks = experiments.parse_int_list(keep_blocks, "keep_blocks")
        widths = parse_widths(widths)
    for name, value in (("num_threads", num_threads), ("warmup_runs", warmup_runs), ("num_runs", num_runs),
                        ("num_calibration", num_calibration)):
        if int(value) < 1:
            raise InvalidArgumentError(f"--{name} must be >= 1, got {value}")
    if not target_speedup > 0:
        raise InvalidArgumentError(f"--target_speedup must be > 0, got {target_speedup}")
    experiments.parse_arm(method)
    from kdig_tf import export, models

    modes = parse_modes(modes, tuple(export.CONVERSION_MODES))
    for keep in keep_blocks:
        models.resolve_keep_blocks(keep)
    grid = candidate_grid(keep_blocks, widths, extra_candidates)
    os.makedirs(output_dir, exist_ok=True)

    run_rows, val_split = {}, None
    if train:
        rows, val_split = _train_candidates(output_dir, grid, modes, flagfile, method, seed, extra_flags,
                                            final_report, launcher, dry_run, log, specs)
        if dry_run:
            return None
        run_rows = {row["candidate"]: row for row in rows}

    import tf_keras as keras

    latency_fn = latency_fn or default_latency_fn(isolate)
    tflite_dir = os.path.join(output_dir, "tflite")
    if teacher is None:
        keras.utils.set_random_seed(random_seed)
        teacher = models.build_teacher(input_shape=IMAGE_SHAPE)
    teacher_params, teacher_macs = models.count_trainable_params(teacher), benchmark.count_macs(teacher)
    entries = []
    for mode in modes:
        path = random_tflite(teacher, os.path.join(tflite_dir, f"teacher_{mode}.tflite"), mode, "normalized",
                             num_calibration, random_seed)
        entries.append(dict(name=TEACHER, role=TEACHER, keep_blocks=None, width_multiplier=None, stem_stride=None,
                            mode=mode, path=path, params=teacher_params, macs=teacher_macs, weights="random"))
    if REFERENCE_MODE not in modes:  # the reference is always the fp32 teacher
        path = random_tflite(teacher, os.path.join(tflite_dir, "teacher_fp32.tflite"), REFERENCE_MODE,
                             "normalized", num_calibration, random_seed)
        entries.insert(0, dict(name=TEACHER, role=TEACHER, keep_blocks=None, width_multiplier=None,
                               stem_stride=None, mode=REFERENCE_MODE, path=path, params=teacher_params,
                               macs=teacher_macs, weights="random"))

    cache_path = os.path.join(output_dir, ACCURACY_CACHE)
    accuracy_cache = read_json_or_none(cache_path) or {}
    # (name, row fields, builder, input kind): the grid, then the specs.
    candidates = [(name, dict(keep_blocks=keep, width_multiplier=width, stem_stride=stride),
                   lambda keep=keep, width=width, stride=stride: models.build_student(
                       keep, width_multiplier=width, input_shape=IMAGE_SHAPE, stem_stride=stride), "unit")
                  for name, keep, width, stride in grid]
    num_classes = int(teacher.output_shape[-1])
    candidates += [(name, dict(keep_blocks=None, width_multiplier=None, stem_stride=None, student=name,
                               family=spec.family),
                    lambda spec=spec: spec.build_core(num_classes, IMAGE_SHAPE), spec.input_spec.space)
                   for name, spec in specs]
    for name, fields, build, kind in candidates:
        keras.utils.set_random_seed(random_seed)
        student = build()
        params, macs = models.count_trainable_params(student), benchmark.count_macs(student)
        for mode in modes + fine_tuned_modes(run_rows.get(name), modes):
            entry = dict(name=name, role="student", **fields,
                         mode=mode, params=params, macs=macs, weights="random", accuracy=None)
            path, results = _trained_file(run_rows.get(name), mode)
            if path is not None:
                flags = results.get("flags") or {}
                entry.update(weights="trained", workdir=run_rows[name]["workdir"],
                             keras_val_accuracy=results.get("val_accuracy"))
                measured = _cached_accuracy(accuracy_cache, path, flags, accuracy_fn)
                atomic_write_json(cache_path, accuracy_cache)
                entry.update(accuracy=measured["accuracy"], accuracy_split=measured["split"],
                             accuracy_examples=measured["num_examples"])
            else:
                path = random_tflite(student, os.path.join(tflite_dir, f"student_{file_stem(name)}_{mode}.tflite"),
                                     mode, kind, num_calibration, random_seed)
            if train:
                entry["run_status"] = run_rows[name]["status"]
            entry["path"] = os.path.abspath(path)
            entries.append(entry)

    # Time: fp32 teacher, every other model, fp32 teacher again.
    def timed(entry):
        log(f"latency: {entry['name']} ({entry['mode']})")
        latency = latency_fn(entry["path"], int(num_threads), int(warmup_runs), int(num_runs))
        return dict(entry, latency=latency, latency_median_ms=latency["inference_median_ms"],
                    latency_p90_ms=latency["inference_p90_ms"], latency_avg_ms=latency["inference_avg_ms"],
                    file_size_bytes=os.path.getsize(entry["path"]))

    first_index = next(i for i, e in enumerate(entries) if e["role"] == TEACHER and e["mode"] == REFERENCE_MODE)
    reference_entry = entries.pop(first_index)
    load_before = benchmark.load_average()
    with benchmark.CpuCompetition() as competition:
        first = timed(reference_entry)
        rows = [timed(entry) for entry in entries]
        last = timed(reference_entry)
    reference = {
        "model": TEACHER, "keras_name": teacher.name, "mode": REFERENCE_MODE, "macs": teacher_macs,
        "median_ms": 0.5 * (first["latency_median_ms"] + last["latency_median_ms"]),
        "p90_ms": 0.5 * (first["latency_p90_ms"] + last["latency_p90_ms"]),
        "avg_ms": 0.5 * (first["latency_avg_ms"] + last["latency_avg_ms"]),
        "drift": _ratio(last["latency_median_ms"], first["latency_median_ms"]),
        "measurements": [first["latency"], last["latency"]],
    }
    warnings = []
    if reference["drift"] is not None and not 0.9 <= reference["drift"] <= 1.1:
        warnings.append(f"the fp32 teacher's median moved by a factor {reference['drift']:.2f} between the first "
                        "and last measurement: the machine was not quiet; rerun")
    combined = dict(first, latency_median_ms=reference["median_ms"], latency_p90_ms=reference["p90_ms"],
                    latency_avg_ms=reference["avg_ms"], latency=None)
    rows.insert(0, combined)
    add_speedups(rows, reference)

    if train:
        front = pareto_front([r for r in rows if r["role"] == "student"], "latency_median_ms", "accuracy")
        objective = "validation accuracy (max) vs median latency (min)"
        y_key = "accuracy"
    else:
        front = pareto_front([r for r in rows if r["role"] == "student"], "latency_median_ms", "macs")
        objective = "MACs (max, capacity proxy) vs median latency (min)"
        y_key = "macs"
    front_ids = {id(row) for row in front}
    fast = select_fast(rows, target_speedup)
    fast_ids = {id(row) for row in fast}
    for row in rows:
        row["pareto"] = id(row) in front_ids
        row["fast"] = id(row) in fast_ids
    # Reference first, then the other teacher modes, then students by latency.
    rows.sort(key=lambda row: (row["role"] != TEACHER, row["role"] == TEACHER and row["mode"] != REFERENCE_MODE,
                               row["latency_median_ms"]))
    machine = dict(machine_info(), load_average_before=load_before, load_average_after=benchmark.load_average(),
                   timing_competition=competition.summary())
    # Not the load average: the timings raise it themselves, and after --train it still holds the training.
    if benchmark.machine_was_busy(machine["timing_competition"]):
        warnings.append(f"{benchmark.competition_text(machine['timing_competition'], 'timings')} (of "
                        f"{machine['cpu_count']} CPUs): they competed for the cores; rerun on a quiet machine")
    report = {
        "command": command or shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "machine": machine,
        "settings": {"keep_blocks": keep_blocks, "widths": widths, "extra_candidates": extra_candidates,
                     "student_specs": [name for name, _ in specs],
                     "modes": modes, "train": bool(train),
                     "batch_size": 1, "num_threads": int(num_threads), "warmup_runs": int(warmup_runs),
                     "num_runs": int(num_runs), "isolate": bool(isolate), "random_seed": random_seed,
                     "num_calibration": int(num_calibration), "method": method if train else None,
                     "seed": seed if train else None,
                     "base_flagfile": os.path.abspath(flagfile) if train and flagfile else None,
                     "extra_flags": extra_flags if train else None, "resolutions": [IMAGE_SHAPE[0]]},
        "val_split": val_split,
        "target_speedup": float(target_speedup),
        "speedup_definition": "fp32 teacher median latency / candidate median latency (same run)",
        "reference": reference,
        "warnings": warnings,
        "pareto": {"objective": objective, "x": "latency_median_ms", "y": y_key,
                   "members": [f"{row['name']}:{row['mode']}" for row in front]},
        "fast_candidates": [f"{row['name']}:{row['mode']}" for row in fast],
        "best_fast": _summary(fast[0]) if fast and _finite(fast[0].get("accuracy")) else None,
        "rows": rows,
    }
    report = _json_safe(report)
    atomic_write_json(os.path.join(output_dir, f"{REPORT_STEM}.json"), report)
    atomic_write_bytes(os.path.join(output_dir, f"{REPORT_STEM}.md"), to_markdown(report).encode())
    plot_sweep(report, os.path.join(output_dir, f"{REPORT_STEM}.png"))
    return report


def _summary(row):
    keys = ("name", "keep_blocks", "width_multiplier", "stem_stride", "student", "family", "mode", "params", "macs",
            "latency_median_ms", "latency_p90_ms", "speedup_median", "speedup_p90", "accuracy", "accuracy_split")
    return {key: row.get(key) for key in keys}


def _json_safe(value):
    from kdig_tf import stats

    return stats.finite_or_none(value)
