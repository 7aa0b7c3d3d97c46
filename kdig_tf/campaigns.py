"""The campaigns of distillation runs: ablation, hyper-parameter search, compression sweep,
and the check that a campaign's saved students reproduce its recorded numbers.

Each builds its grid of runs, runs it in this process with ``kdig_tf.experiments``
(finished runs skipped, stale ones refused) and writes its report with ``kdig_tf.reports``.
Splits named ``test`` are refused unless ``final_report=True``. ``launcher`` is the
runner's: ``launcher(config, workdir)`` trains one run (default: the distillation pipeline).

Importing this module does not import TensorFlow; running a campaign does.
"""
import kdig_tf  # noqa: F401

import itertools
import math
import os
import time

import numpy as np

from kdig_tf import benchmark, experiments, reports, stats
from kdig_tf.errors import InvalidArgumentError, KdigError, NotAModelError, UnknownKeyError, VerificationError
from kdig_tf.io_utils import atomic_write_bytes, atomic_write_json, read_json_or_none


def _prepare(output_dir, flagfile, extra_flags, final_report, split_overrides=None):
    """--extra_flags and the checked splits of a campaign; creates ``output_dir``."""
    extra = (experiments.parse_extra_flags(extra_flags) if isinstance(extra_flags, str)
             else dict(extra_flags or {}))
    overrides = dict(extra, **(split_overrides or {}))
    splits = experiments.check_campaign_splits(flagfile, overrides, final_report)
    os.makedirs(output_dir, exist_ok=True)
    return extra, splits


# --------------------------------------------------------------------------- ablation

def run_ablation(output_dir, flagfile, arms, seeds, subset_fraction=1.0, extra_flags="", reference="student",
                 final_report=False, launcher=experiments.distill_launcher, dry_run=False, report_only=False,
                 log=print, contrasts=()):
    """Arms x seeds; writes runs.{csv,json}, summary.{json,md}, ablation.png and curves.png into ``output_dir``.

    ``contrasts`` are planned comparisons ``"arm:other"`` (``arm - other``) reported beside the
    tests against ``reference`` (``reports.contrast_tests``); they change no run.

    ``report_only`` launches nothing and rewrites the tables from the finished runs, e.g. after
    running some arms alone (``methods=["student"]``), which leaves tables of those arms only.
    """
    arms = experiments.parse_arms(arms)
    if reference not in arms:
        raise InvalidArgumentError(f"reference arm {reference!r} is not among the methods {arms}")
    contrasts = reports.parse_contrasts(contrasts, arms)
    runs, extra, splits = _ablation_runs(output_dir, flagfile, arms, seeds, subset_fraction, extra_flags,
                                         final_report)

    def report(rows):
        return _write_ablation_report(rows, output_dir, flagfile, extra, splits, seeds, subset_fraction,
                                      reference, final_report, contrasts)

    launch_nothing = dry_run or report_only
    rows = experiments.run_campaign(runs, flagfile, launcher, dry_run=launch_nothing, log=log,
                                    rows_dir=output_dir, progress=None if launch_nothing else report)
    return None if dry_run else report(rows)


def _ablation_runs(output_dir, flagfile, arms, seeds, subset_fraction, extra_flags, final_report):
    extra, splits = _prepare(output_dir, flagfile, extra_flags, final_report)
    common = dict(experiments.default_store_dir(output_dir, flagfile, extra), **extra)
    runs = experiments.seed_runs(os.path.join(output_dir, "runs"), arms, seeds, subset_fraction, common)
    return runs, extra, splits


def ablation_status(output_dir, flagfile, arms, seeds, subset_fraction=1.0, extra_flags="", final_report=False):
    """(per-run status, estimate) of an ablation, as :func:`run_ablation` with the same arguments
    would see it; launches nothing (``experiments.run_status`` / ``estimate_remaining``)."""
    runs, _, _ = _ablation_runs(output_dir, flagfile, experiments.parse_arms(arms), seeds, subset_fraction,
                                extra_flags, final_report)
    flagfile = os.path.abspath(flagfile) if flagfile else None
    statuses = [experiments.run_status(run, experiments.parse_run(flagfile, run.overrides, run.workdir)[0].epochs)
                for run in runs]
    return statuses, experiments.estimate_remaining(statuses)


def _write_ablation_report(rows, output_dir, flagfile, extra, splits, seeds, subset_fraction, reference,
                           final_report, contrasts=()):
    """summary.{json,md} and ablation.png from the rows so far (only finished runs count), and
    curves.png: every run's validation curve so far."""
    from kdig_tf import pipeline  # its history file name; TensorFlow is loaded by then in a campaign

    # "planned": n in the table counts only the finished runs, which may be fewer.
    protocol = (f"{len(seeds)} seeds planned per arm ({', '.join(map(str, seeds))})" +
                (f", each on a stratified random {subset_fraction:.0%} subset of the training split "
                 f"(subset seed = run seed, shared across arms)" if subset_fraction < 1.0 else ""))
    arm_stats = reports.summarize_arms(rows, "val_accuracy", reference)
    for arm in arm_stats:
        arm_stats[arm]["commands"] = [row["command"] for row in rows if row["arm"] == arm]
        arm_stats[arm]["flags"] = experiments.parse_arm(arm)
    summary = {
        "metric": "val_accuracy",
        "reference": reference,
        "splits": splits,
        "final_report": bool(final_report),
        "protocol": protocol,
        "subset_fraction": subset_fraction,
        "seeds": list(seeds),
        "base_flagfile": os.path.abspath(flagfile) if flagfile else None,
        "extra_flags": extra,
        "arms": arm_stats,
        "contrasts": reports.contrast_tests(arm_stats, contrasts),
    }
    if any(row.get("eval_accuracy") is not None for row in rows):
        summary["eval_arms"] = reports.summarize_arms(rows, "eval_accuracy", reference)
    summary = stats.finite_or_none(summary)
    atomic_write_json(os.path.join(output_dir, "summary.json"), summary)
    atomic_write_bytes(os.path.join(output_dir, "summary.md"), reports.ablation_markdown(summary).encode())
    if any(entry["n"] for entry in summary["arms"].values()):
        reports.plot_arms(summary["arms"], os.path.join(output_dir, "ablation.png"),
                          f"validation accuracy (%) on {splits['val_split']}", "Ablation: seeds and mean ± sd")
    curves = reports.learning_curves(rows, pipeline.HISTORY)
    if curves:
        reports.plot_learning_curves(curves, os.path.join(output_dir, "curves.png"),
                                     f"validation accuracy (%) on {splits['val_split']}",
                                     "Validation accuracy after each epoch")
    return summary


# --------------------------------------------------------------------------- hyper-parameter search

# Search option -> distill flag, and the valid interval of each.
SEARCH_FLAGS = {"alphas": "alpha", "temperatures": "temperature", "ps": "p", "gammas": "gamma"}
_BOUNDS = {"alpha": (0.0, 1.0), "temperature": (0.0, math.inf), "p": (0.0, 1.0), "gamma": (0.0, math.inf)}


def _check_bounds(flag, value):
    low, high = _BOUNDS.get(flag, (-math.inf, math.inf))
    if not low <= value <= high or (flag == "temperature" and value == 0.0):
        raise InvalidArgumentError(f"{flag}={value} is outside its valid range [{low}, {high}]")
    return value


def parse_search_values(flag, text):
    """A comma list of values, or (random search only) ``lo:hi`` / ``lo:hi:log``.

    Returns ("choice", [values]), ("uniform", lo, hi) or ("loguniform", lo, hi).
    """
    text = (text or "").strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
                raise ValueError(text)
            low, high = float(parts[0]), float(parts[1])
            if not low < high:
                raise InvalidArgumentError(f"{flag} range {text}: low must be < high")
            _check_bounds(flag, low), _check_bounds(flag, high)
            if len(parts) == 3:
                if low <= 0:
                    raise InvalidArgumentError(f"{flag} log range {text} needs low > 0")
                return ("loguniform", low, high)
            return ("uniform", low, high)
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise InvalidArgumentError(f"cannot parse {flag} values {text!r}: use 0.1,0.5 or lo:hi[:log]") from err
    if not values:
        raise InvalidArgumentError(f"no values for {flag}")
    return ("choice", [_check_bounds(flag, value) for value in values])


def grid_trials(space):
    """Cartesian product of ``{flag: ("choice", values)}``, in a stable order."""
    names = list(space)
    for name in names:
        if space[name][0] != "choice":
            raise InvalidArgumentError(f"grid search needs value lists, got a range for {name}")
    return [dict(zip(names, values)) for values in itertools.product(*(space[name][1] for name in names))]


def random_trials(space, num_trials, seed=0, digits=4):
    """``num_trials`` samples, reproducible from ``seed``; values rounded to ``digits`` significant digits."""
    if num_trials < 1:
        raise InvalidArgumentError(f"num_trials must be >= 1, got {num_trials}")
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(num_trials):
        trial = {}
        for name, spec in space.items():
            if spec[0] == "choice":
                value = spec[1][int(rng.integers(len(spec[1])))]
            elif spec[0] == "uniform":
                value = float(f"{rng.uniform(spec[1], spec[2]):.{digits}g}")
            else:
                value = float(f"{math.exp(rng.uniform(math.log(spec[1]), math.log(spec[2]))):.{digits}g}")
            trial[name] = value
        trials.append(trial)
    return trials


def run_hparam_search(output_dir, flagfile, space, method="kd_ig", search="grid", num_trials=20, search_seed=0,
                      seeds=(0,), val_split="train[45000:]", extra_flags="", final_report=False,
                      launcher=experiments.distill_launcher, dry_run=False, log=print):
    """Grid or random search scored on ``val_split``; writes trials.{json,md}, runs.{csv,json}, best.cfg."""
    if not space:
        raise InvalidArgumentError(
            "nothing to search: give at least one of --alphas, --temperatures, --ps, --gammas")
    experiments.check_selection_split(val_split, final_report, "val_split")
    method_flags = experiments.parse_arm(method)
    extra, splits = _prepare(output_dir, flagfile, extra_flags, final_report, {"val_split": val_split})
    for name in space:
        if name in extra:
            raise InvalidArgumentError(f"--extra_flags sets --{name}, which is being searched")
    if search == "grid":
        trials = grid_trials(space)
    elif search == "random":
        trials = random_trials(space, num_trials, search_seed)
    else:
        raise UnknownKeyError(f"unknown search {search!r}; known: grid, random")
    common = dict(experiments.default_store_dir(output_dir, flagfile, extra), **extra)
    common.update(method_flags, val_split=val_split)
    runs = experiments.trial_runs(os.path.join(output_dir, "trials"), trials, list(seeds), common)
    rows = experiments.run_campaign(runs, flagfile, launcher, dry_run=dry_run, log=log, rows_dir=output_dir)
    if dry_run:
        return None

    params = list(space)
    ranked = reports.rank_trials(rows, params)
    report = {"method": method, "search": search, "search_seed": search_seed, "seeds": list(seeds),
              "val_split": val_split, "splits": splits, "final_report": bool(final_report),
              "space": {name: list(spec[1:]) if spec[0] != "choice" else spec[1] for name, spec in space.items()},
              "space_kind": {name: spec[0] for name, spec in space.items()},
              "base_flagfile": os.path.abspath(flagfile) if flagfile else None,
              "trials": ranked}
    best = ranked[0] if ranked and ranked[0]["complete"] and ranked[0]["n"] else None
    if best is not None:
        # Every setting of the winning run as absl parsed it, so the file stands alone.
        config, _ = experiments.parse_run(flagfile, dict(common, **best["params"]))
        winner = experiments.config_flags(config, exclude=("seed", "subset_seed"))
        experiments.write_flagfile(os.path.join(output_dir, "best.cfg"), winner, comments=(
            f"kdig_tf hparam search: trial {best['trial']} of {len(ranked)} ({search} search), "
            f"val accuracy {best['mean']:.2f} on {val_split} (n={best['n']})",
            "base: " + (os.path.abspath(flagfile) if flagfile else "(none)")))
        report["best"] = {"trial": best["trial"], "params": best["params"], "mean": best["mean"],
                          "sd": best["sd"], "n": best["n"], "flagfile": os.path.join(output_dir, "best.cfg")}
    else:
        log("no complete trial yet: best.cfg not written")
    atomic_write_json(os.path.join(output_dir, "trials.json"), report)
    atomic_write_bytes(os.path.join(output_dir, "trials.md"),
                       reports.trials_markdown(ranked, params, val_split, method).encode())
    return report


# --------------------------------------------------------------------------- compression sweep

def find_fp32_tflite(results, workdir):
    """An fp32 ``.tflite`` that the run exported, or None."""
    exports = (results or {}).get("tflite") or {}  # distill: {mode: {"path": ..., checks...}}
    candidate = exports.get("fp32") if isinstance(exports, dict) else None
    if isinstance(candidate, dict):
        candidate = candidate.get("path")
    if candidate:
        candidate = candidate if os.path.isabs(candidate) else os.path.join(workdir, candidate)
        if os.path.isfile(candidate):
            return candidate
    for folder, _, files in os.walk(workdir):
        for name in sorted(files):
            if not name.endswith(".tflite"):
                continue
            path = os.path.join(folder, name)
            sidecar = read_json_or_none(os.path.splitext(path)[0] + ".json") or {}
            if (sidecar.get("conversion") or {}).get("mode") == "fp32" or "fp32" in name:
                return path
    return None


def measure_student_latency(results, workdir, tflite_dir, keep_blocks, warmup_runs=5, num_runs=50):
    """fp32 TFLite latency at batch 1 on 1 thread of a finished run's student.

    Uses the run's fp32 export if there is one, else converts ``student_path``. Latency
    does not depend on the weights, so the sweep measures one model per ``keep_blocks``.
    """
    path = find_fp32_tflite(results, workdir)
    source = "distill export"
    if path is None:
        from kdig_tf import export, loading

        path = os.path.join(tflite_dir, f"student_k{keep_blocks}_fp32.tflite")
        if not os.path.isfile(path):
            student_path = experiments.recorded_output(workdir, results.get("student_path"))
            if student_path is None:
                raise NotAModelError(f"{workdir} finished without its student file ({results.get('student_path')})")
            export.convert(loading.load_model(student_path), path, "fp32", input_kind="unit")
        source = "converted from student_path"
    latency = benchmark.measure_latency(path, batch_size=1, num_threads=1, warmup_runs=warmup_runs,
                                        num_runs=num_runs)
    # The load average tells a reader whether other jobs competed for the cores.
    return dict(latency, tflite_path=path, source=source, batch_size=1, num_threads=1, mode="fp32",
                environment=benchmark.environment())


def run_compression_sweep(output_dir, flagfile, keep_blocks, arms, seeds, extra_flags="", reference="student",
                          final_report=False, latency_fn=measure_student_latency, warmup_runs=5, num_runs=50,
                          launcher=experiments.distill_launcher, dry_run=False, log=print):
    """keep_blocks x arms x seeds; writes runs.{csv,json}, sweep.{json,md} and sweep.png.

    ``latency_fn(results, workdir, tflite_dir, keep_blocks, warmup_runs, num_runs)`` -> latency dict
    (None skips latency). Measured latencies are cached in ``latency.json``.
    """
    arms = experiments.parse_arms(arms)
    keep_blocks = experiments.parse_int_list(keep_blocks, "keep_blocks")
    extra, splits = _prepare(output_dir, flagfile, extra_flags, final_report)
    if "keep_blocks" in extra:
        raise InvalidArgumentError("--extra_flags may not set --keep_blocks: the sweep sets it")
    store = experiments.default_store_dir(output_dir, flagfile, extra)
    runs = []
    for keep in keep_blocks:
        runs += experiments.seed_runs(os.path.join(output_dir, "runs"), arms, seeds, 1.0,
                                      dict(store, **extra, keep_blocks=keep), {"keep_blocks": keep},
                                      subdir=f"k{keep}")
    rows = experiments.run_campaign(runs, flagfile, launcher, dry_run=dry_run, log=log, rows_dir=output_dir)
    if dry_run:
        return None

    cache_path = os.path.join(output_dir, "latency.json")
    latency = {int(key): value for key, value in (read_json_or_none(cache_path) or {}).items()}
    if latency_fn is not None:
        for keep in keep_blocks:
            finished = [row for row in rows
                        if row["keep_blocks"] == keep and row["status"] in experiments.FINISHED]
            if keep in latency or not finished:
                continue
            log(f"latency: keep_blocks={keep}")
            results = read_json_or_none(os.path.join(finished[0]["workdir"], experiments.RESULTS_FILE))
            latency[keep] = latency_fn(results, finished[0]["workdir"], os.path.join(output_dir, "tflite"), keep,
                                       warmup_runs, num_runs)
            atomic_write_json(cache_path, {str(key): value for key, value in sorted(latency.items())})
    points = reports.sweep_points(rows, keep_blocks, arms, latency, reference)
    report = {"val_split": splits["val_split"], "splits": splits, "final_report": bool(final_report),
              "reference": reference, "seeds": list(seeds), "keep_blocks": keep_blocks, "arms": arms,
              "base_flagfile": os.path.abspath(flagfile) if flagfile else None, "extra_flags": extra,
              "points": points, "latency": {str(key): value for key, value in sorted(latency.items())}}
    atomic_write_json(os.path.join(output_dir, "sweep.json"), report)
    atomic_write_bytes(os.path.join(output_dir, "sweep.md"),
                       reports.sweep_markdown(points, splits["val_split"], reference).encode())
    if any(point["n"] for point in points):
        reports.plot_sweep(points, os.path.join(output_dir, "sweep.png"), splits["val_split"])
    return report


# --------------------------------------------------------------------------- verification

VERIFY_FILE = "verify.json"


def verify_runs(output_dir, evaluate, data_dir=None, tolerance_points=0.1, log=print):
    """Re-evaluate every finished run's ``student.h5`` and check it against its ``results.json``.

    ``evaluate(weights, dataset=..., split=..., data_dir=...)`` returns a dict with ``accuracy``
    (%), ``num_correct``, ``num_examples`` and ``trainable_params`` (``scripts/evaluate.py``'s
    ``run_evaluation``). A run passes when the file loads, its accuracy on the recorded
    ``val_split`` is within ``tolerance_points`` of the recorded ``val_accuracy`` (kernels and
    machines may flip a few images), and its parameter and example counts equal the recorded
    ones. Writes ``verify.json`` in ``output_dir`` with every run's outcome, then raises
    ``VerificationError`` naming the runs that failed.
    """
    if not tolerance_points >= 0:
        raise InvalidArgumentError(f"tolerance_points must be >= 0, got {tolerance_points}")
    rows = read_json_or_none(os.path.join(output_dir, "runs.json"))
    if not isinstance(rows, list):
        raise InvalidArgumentError(f"no readable campaign table {os.path.join(output_dir, 'runs.json')}; "
                                   "run the campaign (or its --report_only) first")
    finished = [row for row in rows if row.get("status") in experiments.FINISHED]
    checked = []
    for index, row in enumerate(finished, 1):
        outcome = _verify_run(output_dir, row, evaluate, data_dir, tolerance_points)
        checked.append(outcome)
        verdict = "ok" if outcome["ok"] else "FAILED: " + "; ".join(outcome["problems"])
        log(f"[{index}/{len(finished)}] {row['run']}: recorded {_points(outcome['recorded_accuracy'])}, "
            f"re-evaluated {_points(outcome.get('accuracy'))} -> {verdict}")
    failed = [outcome["run"] for outcome in checked if not outcome["ok"]]
    # Where the check ran: a run trained on another CPU or kernel may round a few images differently.
    report = {"checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": benchmark.cpu_model(),
              "onednn": benchmark.tensorflow_onednn(),
              "output_dir": output_dir, "tolerance_points": tolerance_points, "num_finished": len(finished),
              "num_unfinished": len(rows) - len(finished), "num_failed": len(failed),
              "all_ok": not failed, "runs": checked}
    atomic_write_json(os.path.join(output_dir, VERIFY_FILE), report)
    if failed:
        raise VerificationError(f"{len(failed)} of {len(finished)} finished runs do not reproduce their "
                                f"results.json: {', '.join(failed)} (see {VERIFY_FILE})")
    return report


def _points(value):
    return "n/a" if value is None else f"{value:.2f} %"


def _verify_run(output_dir, row, evaluate, data_dir, tolerance_points):
    """One finished run's outcome for :func:`verify_runs` (its ``problems`` list why it fails)."""
    workdir = os.path.join(output_dir, "runs", row["run"])
    if not os.path.isdir(workdir):
        workdir = row.get("workdir") or workdir
    results = read_json_or_none(os.path.join(workdir, experiments.RESULTS_FILE)) or {}
    outcome = {"run": row["run"], "recorded_accuracy": results.get("val_accuracy"),
               "recorded_params": results.get("trainable_params"), "split": results.get("val_split"),
               "problems": []}
    weights = experiments.recorded_output(workdir, results.get("student_path"))
    if not results:
        outcome["problems"].append(f"no readable {experiments.RESULTS_FILE} in {workdir}")
    elif weights is None:
        outcome["problems"].append(f"student file {results.get('student_path')!r} is not on disk")
    elif not results.get("val_split"):
        outcome["problems"].append(f"{experiments.RESULTS_FILE} in {workdir} records no val_split to evaluate on")
    else:
        flags = results.get("flags") or {}
        try:
            result = evaluate(weights, dataset=flags.get("dataset", "cifar10"), split=results["val_split"],
                              data_dir=data_dir or flags.get("data_dir"))
        except KdigError as err:
            outcome["problems"].append(f"cannot evaluate {weights}: {type(err).__name__}: {err}")
        else:
            outcome.update(weights=os.path.relpath(weights, output_dir), weights_sha256=result.get("weights_sha256"),
                           accuracy=result["accuracy"], num_correct=result["num_correct"],
                           num_examples=result["num_examples"], trainable_params=result.get("trainable_params"))
            outcome["problems"].extend(_mismatches(outcome, results, tolerance_points))
    outcome["ok"] = not outcome["problems"]
    return outcome


def _mismatches(outcome, results, tolerance_points):
    problems = []
    recorded = outcome["recorded_accuracy"]
    if recorded is None or not abs(outcome["accuracy"] - recorded) <= tolerance_points:
        problems.append(f"accuracy {outcome['accuracy']:.2f} % vs recorded {_points(recorded)} "
                        f"(tolerance {tolerance_points} points)")
    if outcome["recorded_params"] is not None and outcome["trainable_params"] != outcome["recorded_params"]:
        problems.append(f"{outcome['trainable_params']} trainable parameters vs recorded {outcome['recorded_params']}")
    if results.get("num_val") is not None and outcome["num_examples"] != results["num_val"]:
        problems.append(f"{outcome['num_examples']} examples in {outcome['split']} vs recorded {results['num_val']}")
    return problems
