"""Experiment campaigns over ``scripts/distill.py``: ablation, hyper-parameter search, compression sweep.

A campaign is a list of ``Run``s, each with its own work directory. The runner launches
``scripts/distill.py`` once per unfinished run (a subprocess, output appended to
``<run>/log.txt``), skips runs whose ``results.json`` exists, and keeps going when a run
fails: the failure is reported in the rows and the run is retried on the next invocation.
Before launching, ``<run>/command.json`` records the flags, so a finished run can be
checked against what the campaign asks for now (``StaleRunError`` on a mismatch: results
of a different recipe are never mixed in silently).

Selection hygiene: any split named ``test`` is refused unless ``final_report=True``
(``check_selection_split``), so tuning and model selection only ever see validation data.

Nothing here imports TensorFlow except the latency helper of the compression sweep.
"""
import kdig_tf  # noqa: F401

import csv
import datetime
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from kdig_tf import stats
from kdig_tf.errors import (InvalidArgumentError, StaleRunError, TestSplitSelectionError,
                            UnknownKeyError)
from kdig_tf.io_utils import atomic_path, atomic_write_bytes, atomic_write_json, sha256_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISTILL_SCRIPT = os.path.join(REPO_ROOT, "scripts", "distill.py")
METHODS = ("student", "kd", "ig", "kd_ig", "at", "kd_at", "ig_at", "kd_ig_at")
# "kd_ig_shuffled" = --method=kd_ig --cached_targets_order=shuffled (the misalignment control).
SHUFFLED_SUFFIX = "_shuffled"
_NO_CACHED_TARGETS = ("student", "at")  # methods that never read the IG/logit store
RESULTS_FILE = "results.json"
COMMAND_FILE = "command.json"
LOG_FILE = "log.txt"
# distill.py's defaults, used when neither the base flagfile nor the overrides set a split.
DISTILL_SPLIT_DEFAULTS = {"train_split": "train[:45000]", "val_split": "train[45000:]", "eval_split": ""}
# Flags a campaign sets per run; --extra_flags must not fight over them.
RESERVED_FLAGS = ("workdir", "method", "seed", "subset_seed", "cached_targets_order", "flagfile")
RESULT_FIELDS = ("val_accuracy", "val_split", "eval_accuracy", "eval_split", "trainable_params",
                 "compression", "train_seconds", "student_path")
FINISHED = ("ok", "skipped")


# --------------------------------------------------------------------------- flags

def format_flag_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def flag_args(flags):
    """{name: value} -> ["--name=value", ...]; a None value gives a bare ``--name`` (boolean token)."""
    return [f"--{name}" if value is None else f"--{name}={format_flag_value(value)}"
            for name, value in flags.items()]


def _parse_flag_token(token, origin):
    if not token.startswith("--") or len(token) < 3:
        raise InvalidArgumentError(f"{origin}: expected --name=value, got {token!r}")
    name, sep, value = token[2:].partition("=")
    return name.strip(), (value if sep else None)


def read_flagfile(path):
    """The flags of an absl flagfile as an ordered {name: value} (nested --flagfile followed).

    One flag per line; blank lines and lines starting with ``#`` or ``//`` are comments.
    """
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise InvalidArgumentError(f"no such flagfile: {path}")
    flags = {}
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#") or line.startswith("//"):
                continue
            name, value = _parse_flag_token(line, f"{path}:{number}")
            if name == "flagfile":
                # absl resolves nested flagfiles against the working directory.
                flags.update(read_flagfile(value))
            else:
                flags.pop(name, None)  # a repeated flag moves to its last position
                flags[name] = value
    return flags


def parse_extra_flags(text):
    """``"--epochs=5 --batch_size=64"`` -> ordered dict; refuses flags the campaign sets per run."""
    flags = {}
    for token in shlex.split(text or ""):
        name, value = _parse_flag_token(token, "--extra_flags")
        if name in RESERVED_FLAGS:
            raise InvalidArgumentError(f"--extra_flags may not set --{name}: the campaign sets it per run")
        flags[name] = value
    return flags


def write_flagfile(path, flags, comments=()):
    lines = [f"# {comment}" for comment in comments] + flag_args(flags)
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def parse_int_list(values, name):
    try:
        parsed = [int(str(value).strip()) for value in values if str(value).strip()]
    except ValueError as err:
        raise InvalidArgumentError(f"--{name} must be integers, got {list(values)}") from err
    if not parsed:
        raise InvalidArgumentError(f"--{name} is empty")
    if len(set(parsed)) != len(parsed):
        raise InvalidArgumentError(f"--{name} has duplicates: {parsed}")
    return parsed


def resolve_seeds(seeds, num_seeds):
    """Explicit ``seeds`` win; otherwise 0 .. num_seeds-1."""
    if seeds:
        parsed = parse_int_list(seeds, "seeds")
        if min(parsed) < 0:
            raise InvalidArgumentError(f"--seeds must be >= 0, got {parsed}")
        return parsed
    if num_seeds < 1:
        raise InvalidArgumentError(f"--num_seeds must be >= 1, got {num_seeds}")
    return list(range(num_seeds))


# --------------------------------------------------------------------------- split guard

def split_base_names(split):
    """``"train[:10%]+test"`` -> ["train", "test"]."""
    return [part.split("[", 1)[0].strip().lower() for part in str(split).split("+") if part.strip()]


def check_selection_split(split, final_report=False, flag="val_split"):
    """Refuse a split whose base name is ``test`` unless this is the final report."""
    if not final_report and "test" in split_base_names(split or ""):
        raise TestSplitSelectionError(
            f"--{flag}={split} uses the test split; select and tune on a validation split "
            f"(e.g. train[45000:]) and pass --final_report only for the one final evaluation")
    return split


def effective_splits(base_flags, overrides):
    """train/val/eval split a run will use: overrides > base flagfile > distill defaults."""
    merged = dict(DISTILL_SPLIT_DEFAULTS)
    for source in (base_flags, overrides):
        merged.update({name: source[name] or "" for name in DISTILL_SPLIT_DEFAULTS if name in source})
    return merged


def check_campaign_splits(base_flags, overrides, final_report=False):
    splits = effective_splits(base_flags, overrides)
    for name, split in splits.items():
        check_selection_split(split, final_report, flag=name)
    return splits


# --------------------------------------------------------------------------- run grids

@dataclass
class Run:
    """One distill.py invocation: its directory, flag overrides and labels for the tables."""
    name: str
    workdir: str
    overrides: dict
    labels: dict = field(default_factory=dict)


def parse_arm(arm):
    """Arm name -> distill flags. ``<method>_shuffled`` adds --cached_targets_order=shuffled."""
    method, shuffled = arm, False
    if arm.endswith(SHUFFLED_SUFFIX) and arm[:-len(SHUFFLED_SUFFIX)] in METHODS:
        method, shuffled = arm[:-len(SHUFFLED_SUFFIX)], True
    if method not in METHODS:
        raise UnknownKeyError(f"unknown method {arm!r}; known: {', '.join(METHODS)} "
                              f"(append {SHUFFLED_SUFFIX} for the misaligned-targets control)")
    if shuffled and method in _NO_CACHED_TARGETS:
        raise InvalidArgumentError(f"{arm} makes no sense: {method} reads no cached teacher targets")
    flags = {"method": method}
    if shuffled:
        flags["cached_targets_order"] = "shuffled"
    return flags


def parse_arms(arms):
    arms = [arm.strip() for arm in arms if arm.strip()]
    if not arms:
        raise InvalidArgumentError("no methods given")
    if len(set(arms)) != len(arms):
        raise InvalidArgumentError(f"duplicate methods: {arms}")
    for arm in arms:
        parse_arm(arm)
    return arms


def seed_runs(root, arms, seeds, subset_fraction=1.0, common=None, labels=None, subdir=""):
    """``<root>/[<subdir>/]<arm>/seed<k>`` for every arm and seed, seed-major.

    Seed-major order keeps the arms balanced if a campaign is stopped half way. With
    ``subset_fraction < 1`` seed k also draws training subset k, the same one for every
    arm (Monte-Carlo protocol: the arms differ only in the method).
    """
    if not 0.0 < subset_fraction <= 1.0:
        raise InvalidArgumentError(f"subset_fraction must be in (0, 1], got {subset_fraction}")
    runs = []
    for seed in seeds:
        for arm in arms:
            overrides = dict(common or {})
            overrides.update(parse_arm(arm))
            overrides["seed"] = seed
            if subset_fraction < 1.0:
                overrides.update(subset_fraction=float(subset_fraction), subset_seed=seed)
            name = "/".join(part for part in (subdir, arm, f"seed{seed}") if part)
            runs.append(Run(name, os.path.join(root, name), overrides,
                            dict(labels or {}, arm=arm, method=overrides["method"], seed=seed)))
    return runs


def trial_runs(root, trials, seeds, common=None):
    """``<root>/trial<k>`` (one seed) or ``<root>/trial<k>/seed<s>``; ``trials`` are {flag: value} dicts."""
    runs = []
    for index, params in enumerate(trials):
        for seed in seeds:
            name = f"trial{index}" if len(seeds) == 1 else f"trial{index}/seed{seed}"
            overrides = dict(common or {})
            overrides.update(params)
            overrides["seed"] = seed
            runs.append(Run(name, os.path.join(root, name), overrides,
                            dict(params, trial=index, seed=seed)))
    return runs


# --------------------------------------------------------------------------- search spaces

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


# --------------------------------------------------------------------------- runner

def subprocess_launcher(command, log_path):
    """Run ``command``, appending its stdout and stderr to ``log_path``; return the exit code."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # the log follows the run live
    with open(log_path, "ab") as log:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        log.write(f"\n=== {stamp} {shlex.join(command)}\n".encode())
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode


def _record(run, flagfile):
    return {"flagfile": flagfile, "flagfile_sha256": sha256_file(flagfile) if flagfile else None,
            "overrides": flag_args(run.overrides)}


def _load_json(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _check_not_stale(run, record):
    previous = _load_json(os.path.join(run.workdir, COMMAND_FILE))
    if previous is None:
        return
    changes = []
    if previous.get("flagfile_sha256") != record["flagfile_sha256"]:
        changes.append(f"base flagfile {record['flagfile']} changed")
    old, new = set(previous.get("overrides") or []), set(record["overrides"])
    if old != new:
        changes.append(f"flags {sorted(old - new)} -> {sorted(new - old)}")
    if changes:
        raise StaleRunError(f"{run.workdir} finished with other settings ({'; '.join(changes)}); "
                            f"use a new output directory or delete that run")


def build_command(run, flagfile=None, script=DISTILL_SCRIPT, python=None):
    args = [f"--flagfile={flagfile}"] if flagfile else []
    args.append(f"--workdir={os.path.abspath(run.workdir)}")
    args += flag_args(run.overrides)
    return [python or sys.executable, script, *args]


def _row(run, status, returncode, command, results, wall_seconds):
    row = {"run": run.name, **run.labels, "status": status, "returncode": returncode}
    results = results or {}
    for key in RESULT_FIELDS:
        row[key] = results.get(key)
    row.update(wall_seconds=wall_seconds, workdir=run.workdir, command=shlex.join(command))
    return row


def run_campaign(runs, flagfile=None, launcher=subprocess_launcher, script=DISTILL_SCRIPT, python=None,
                 dry_run=False, log=print):
    """Launch every unfinished run; return one row per run (status ok / skipped / failed / pending)."""
    flagfile = os.path.abspath(flagfile) if flagfile else None
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise InvalidArgumentError("two runs share a work directory")
    # Check every finished run first, so a stale one stops the campaign before hours of work.
    records = [_record(run, flagfile) for run in runs]
    for run, record in zip(runs, records):
        if os.path.exists(os.path.join(run.workdir, RESULTS_FILE)):
            _check_not_stale(run, record)

    rows, failures = [], 0
    for index, (run, record) in enumerate(zip(runs, records), 1):
        command = build_command(run, flagfile, script, python)
        results_path = os.path.join(run.workdir, RESULTS_FILE)
        results = _load_json(results_path) if os.path.exists(results_path) else None
        if results is not None:
            log(f"[{index}/{len(runs)}] skip {run.name}: {RESULTS_FILE} exists")
            rows.append(_row(run, "skipped", None, command, results, None))
            continue
        if dry_run:
            log(f"[{index}/{len(runs)}] would run: {shlex.join(command)}")
            rows.append(_row(run, "pending", None, command, None, None))
            continue
        os.makedirs(run.workdir, exist_ok=True)
        atomic_write_json(os.path.join(run.workdir, COMMAND_FILE), record)
        log_path = os.path.join(run.workdir, LOG_FILE)
        log(f"[{index}/{len(runs)}] run {run.name} (log: {log_path})")
        start = time.time()
        returncode = launcher(command, log_path)
        wall = time.time() - start
        results = _load_json(results_path)
        if returncode == 0 and results is not None:
            rows.append(_row(run, "ok", returncode, command, results, wall))
        else:
            failures += 1
            log(f"[{index}/{len(runs)}] FAILED {run.name} (exit {returncode}); see {log_path}; "
                f"it will be retried on the next invocation")
            rows.append(_row(run, "failed", returncode, command, None, wall))
    done = sum(row["status"] in FINISHED for row in rows)
    log(f"{done}/{len(rows)} runs finished, {failures} failed in this invocation")
    return rows


def write_rows(rows, output_dir, stem="runs"):
    """``<stem>.json`` and ``<stem>.csv`` (columns: union of the row keys, first-seen order)."""
    atomic_write_json(os.path.join(output_dir, f"{stem}.json"), rows)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(os.path.join(output_dir, f"{stem}.csv")) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows({key: "" if row.get(key) is None else row.get(key) for key in columns}
                             for row in rows)


def default_store_dir(output_dir, base_flags, extra):
    """One IG/logit store shared by all runs of a campaign, unless the base flags pick one."""
    if "store_dir" in base_flags or "store_dir" in extra:
        return {}
    return {"store_dir": os.path.abspath(os.path.join(output_dir, "store"))}


# --------------------------------------------------------------------------- summaries

def summarize_arms(rows, metric="val_accuracy", reference="student", confidence=0.95):
    """Per arm: n, mean, sd, min, max of ``metric`` over finished runs, and tests vs ``reference``.

    ``vs_reference`` is Welch's test, Cohen's d, Hedges' g and the mean difference with its
    CI; ``p_holm`` adjusts the p-values over all arms tested against the reference. An arm
    ``X_shuffled`` is also compared with ``X`` (``vs_aligned``): the misalignment control.
    """
    arms, values, seeds, unfinished = [], {}, {}, {}
    for row in rows:
        arm = row["arm"]
        if arm not in values:
            arms.append(arm)
            values[arm], seeds[arm], unfinished[arm] = [], [], []
        if row["status"] in FINISHED and row.get(metric) is not None:
            values[arm].append(float(row[metric]))
            seeds[arm].append(row.get("seed"))
        elif row["status"] not in FINISHED:
            unfinished[arm].append(row["run"])
    summary = {}
    for arm in arms:
        entry = {"n": 0} if not values[arm] else stats.summarize(values[arm])
        entry.update(values=values[arm], seeds=seeds[arm], unfinished=unfinished[arm])
        if arm != reference and values[arm] and values.get(reference):
            entry["vs_reference"] = stats.compare(values[arm], values[reference], confidence)
        aligned = arm[:-len(SHUFFLED_SUFFIX)] if arm.endswith(SHUFFLED_SUFFIX) else None
        if aligned and values[arm] and values.get(aligned):
            entry["vs_aligned"] = dict(stats.compare(values[arm], values[aligned], confidence), arm=aligned)
        summary[arm] = entry
    tested = [arm for arm in arms if "vs_reference" in summary[arm]]
    for arm, adjusted in zip(tested, stats.holm([summary[arm]["vs_reference"]["p"] for arm in tested])):
        summary[arm]["vs_reference"]["p_holm"] = adjusted
    return summary


def _fmt(value, spec=".2f"):
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _fmt_p(value):
    if value is None or not math.isfinite(value):
        return "n/a"
    return "<1e-4" if value < 1e-4 else f"{value:.4f}"


def arms_markdown(arms, reference, metric_label):
    lines = [
        f"| arm | n | {metric_label} mean ± sd | min | max | Δ vs {reference} [95% CI] | t | dof | p | p (Holm) "
        f"| Cohen's d | Hedges' g |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, entry in arms.items():
        cmp = entry.get("vs_reference")
        if entry["n"]:
            spread = f"{_fmt(entry['mean'])} ± {_fmt(entry.get('sd'))}"
            low, high = _fmt(entry["min"]), _fmt(entry["max"])
        else:
            spread, low, high = "no finished runs", "", ""
        if cmp:
            tests = [f"{cmp['mean_diff']:+.2f} [{_fmt(cmp['ci_low'], '+.2f')}, {_fmt(cmp['ci_high'], '+.2f')}]",
                     _fmt(cmp["t"]), _fmt(cmp["dof"], ".1f"), _fmt_p(cmp["p"]), _fmt_p(cmp.get("p_holm")),
                     _fmt(cmp["cohens_d"]), _fmt(cmp["hedges_g"])]
        else:
            tests = ["(reference)" if arm == reference else "n/a"] + [""] * 6
        lines.append("| " + " | ".join([arm, str(entry["n"]), spread, low, high, *tests]) + " |")
    return "\n".join(lines)


def ablation_markdown(summary):
    splits = summary["splits"]
    lines = [
        "# Ablation",
        "",
        f"Validation accuracy (%) on `{splits['val_split']}`, {summary['protocol']}. Welch's t-test "
        f"(two-sided) and effect sizes against `{summary['reference']}`; Holm's adjustment over the arms "
        f"tested against it.",
        "",
        arms_markdown(summary["arms"], summary["reference"], "val acc"),
    ]
    for arm, entry in summary["arms"].items():
        if "vs_aligned" in entry:
            cmp = entry["vs_aligned"]
            lines += ["", f"Misalignment control: `{arm}` - `{cmp['arm']}` = {cmp['mean_diff']:+.2f} "
                          f"[{_fmt(cmp['ci_low'], '+.2f')}, {_fmt(cmp['ci_high'], '+.2f')}], "
                          f"p = {_fmt_p(cmp['p'])} (Welch), Hedges' g = {_fmt(cmp['hedges_g'])}."]
    if summary.get("eval_arms"):
        lines += ["", f"## Final report on `{splits['eval_split']}`", "",
                  arms_markdown(summary["eval_arms"], summary["reference"], "eval acc")]
    unfinished = [name for entry in summary["arms"].values() for name in entry["unfinished"]]
    if unfinished:
        lines += ["", f"Unfinished runs (rerun the same command to retry): {', '.join(unfinished)}"]
    lines += ["", "## Commands", ""]
    for arm, entry in summary["arms"].items():
        lines += [f"- `{arm}`:"] + [f"  - `{command}`" for command in entry["commands"]]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_arms(arms, path, ylabel, title):
    """One column per arm: every seed as a point, the mean ± sd as a bar with error bars."""
    plt = _pyplot()
    names = list(arms)
    figure, axes = plt.subplots(figsize=(max(4.0, 1.3 * len(names) + 1.5), 4.0))
    rng = np.random.default_rng(0)  # fixed jitter: the figure is reproducible
    for x, arm in enumerate(names):
        entry = arms[arm]
        if not entry["n"]:
            continue
        sd = entry.get("sd")
        axes.bar(x, entry["mean"], width=0.6, color="C0", alpha=0.25)
        axes.errorbar(x, entry["mean"], yerr=sd if sd is not None else None, fmt="_", color="k",
                      capsize=6, markersize=20, zorder=3)
        jitter = rng.uniform(-0.15, 0.15, size=len(entry["values"]))
        axes.scatter(x + jitter, entry["values"], s=16, color="C1", zorder=4)
    finished = [value for arm in names for value in arms[arm]["values"]]
    if finished:
        low, high = min(finished), max(finished)
        pad = max(0.5, 0.15 * (high - low))
        axes.set_ylim(low - pad, high + pad)  # bars from zero would hide sub-point differences
    axes.set_xticks(range(len(names)))
    axes.set_xticklabels([f"{arm}\n(n={arms[arm]['n']})" for arm in names])
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=150, format="png")
    plt.close(figure)


# --------------------------------------------------------------------------- campaigns

def _prepare(output_dir, flagfile, extra_flags, final_report, split_overrides=None):
    base = read_flagfile(flagfile) if flagfile else {}
    extra = parse_extra_flags(extra_flags) if isinstance(extra_flags, str) else dict(extra_flags or {})
    overrides = dict(extra, **(split_overrides or {}))
    splits = check_campaign_splits(base, overrides, final_report)
    os.makedirs(output_dir, exist_ok=True)
    return base, extra, splits


def run_ablation(output_dir, flagfile, arms, seeds, subset_fraction=1.0, extra_flags="", reference="student",
                 final_report=False, launcher=subprocess_launcher, script=DISTILL_SCRIPT, dry_run=False,
                 log=print):
    """Arms x seeds; writes runs.{csv,json}, summary.{json,md} and ablation.png into ``output_dir``."""
    arms = parse_arms(arms)
    if reference not in arms:
        raise InvalidArgumentError(f"reference arm {reference!r} is not among the methods {arms}")
    base, extra, splits = _prepare(output_dir, flagfile, extra_flags, final_report)
    common = dict(default_store_dir(output_dir, base, extra), **extra)
    runs = seed_runs(os.path.join(output_dir, "runs"), arms, seeds, subset_fraction, common)
    rows = run_campaign(runs, flagfile, launcher, script, dry_run=dry_run, log=log)
    write_rows(rows, output_dir)
    if dry_run:
        return None

    protocol = (f"{len(seeds)} seeds per arm ({', '.join(map(str, seeds))})" +
                (f", each on a stratified random {subset_fraction:.0%} subset of the training split "
                 f"(subset seed = run seed, shared across arms)" if subset_fraction < 1.0 else ""))
    arm_stats = summarize_arms(rows, "val_accuracy", reference)
    for arm in arm_stats:
        arm_stats[arm]["commands"] = [row["command"] for row in rows if row["arm"] == arm]
        arm_stats[arm]["flags"] = parse_arm(arm)
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
    }
    if any(row.get("eval_accuracy") is not None for row in rows):
        summary["eval_arms"] = summarize_arms(rows, "eval_accuracy", reference)
    summary = stats.finite_or_none(summary)
    atomic_write_json(os.path.join(output_dir, "summary.json"), summary)
    atomic_write_bytes(os.path.join(output_dir, "summary.md"), ablation_markdown(summary).encode())
    if any(entry["n"] for entry in summary["arms"].values()):
        plot_arms(summary["arms"], os.path.join(output_dir, "ablation.png"),
                  f"validation accuracy (%) on {splits['val_split']}", "Ablation: seeds and mean ± sd")
    return summary


def rank_trials(rows, params):
    """Trials sorted by mean validation accuracy (best first); trials with no finished run last."""
    trials = {}
    for row in rows:
        entry = trials.setdefault(row["trial"], {
            "trial": row["trial"], "params": {name: row[name] for name in params},
            "values": [], "seeds": [], "unfinished": [], "workdirs": []})
        entry["workdirs"].append(row["workdir"])
        if row["status"] in FINISHED and row.get("val_accuracy") is not None:
            entry["values"].append(float(row["val_accuracy"]))
            entry["seeds"].append(row["seed"])
        elif row["status"] not in FINISHED:
            entry["unfinished"].append(row["run"])
    ranked = []
    for entry in trials.values():
        if entry["values"]:
            entry.update(stats.summarize(entry["values"]))
        else:
            entry.update(n=0, mean=None, sd=None, min=None, max=None)
        entry["complete"] = not entry["unfinished"]
        ranked.append(entry)
    # Complete trials first; a trial with a failed seed must not win on fewer seeds.
    ranked.sort(key=lambda e: (not e["complete"], e["mean"] is None, -(e["mean"] or 0.0), e["trial"]))
    for rank, entry in enumerate(ranked, 1):
        entry["rank"] = rank
    return stats.finite_or_none(ranked)


def trials_markdown(ranked, params, val_split, method):
    header = " | ".join(params)
    lines = [
        "# Hyper-parameter search",
        "",
        f"Method `{method}`, scored on the validation split `{val_split}` only (mean over seeds).",
        "",
        f"| rank | trial | {header} | n | val acc mean ± sd | status |",
        "|" + "---|" * (len(params) + 5),
    ]
    for entry in ranked:
        values = " | ".join(format_flag_value(entry["params"][name]) for name in params)
        status = "complete" if entry["complete"] else f"unfinished: {', '.join(entry['unfinished'])}"
        lines.append(f"| {entry['rank']} | {entry['trial']} | {values} | {entry['n']} "
                     f"| {_fmt(entry['mean'])} ± {_fmt(entry['sd'])} | {status} |")
    return "\n".join(lines) + "\n"


def run_hparam_search(output_dir, flagfile, space, method="kd_ig", search="grid", num_trials=20, search_seed=0,
                      seeds=(0,), val_split="train[45000:]", extra_flags="", final_report=False,
                      launcher=subprocess_launcher, script=DISTILL_SCRIPT, dry_run=False, log=print):
    """Grid or random search scored on ``val_split``; writes trials.{json,md}, runs.{csv,json}, best.cfg."""
    if not space:
        raise InvalidArgumentError("nothing to search: give at least one of --alphas, --temperatures, --ps, --gammas")
    check_selection_split(val_split, final_report, "val_split")
    method_flags = parse_arm(method)
    base, extra, splits = _prepare(output_dir, flagfile, extra_flags, final_report, {"val_split": val_split})
    for name in space:
        if name in extra:
            raise InvalidArgumentError(f"--extra_flags sets --{name}, which is being searched")
    if search == "grid":
        trials = grid_trials(space)
    elif search == "random":
        trials = random_trials(space, num_trials, search_seed)
    else:
        raise UnknownKeyError(f"unknown search {search!r}; known: grid, random")
    common = dict(default_store_dir(output_dir, base, extra), **extra)
    common.update(method_flags, val_split=val_split)
    runs = trial_runs(os.path.join(output_dir, "trials"), trials, list(seeds), common)
    rows = run_campaign(runs, flagfile, launcher, script, dry_run=dry_run, log=log)
    write_rows(rows, output_dir)
    if dry_run:
        return None

    params = list(space)
    ranked = rank_trials(rows, params)
    report = {"method": method, "search": search, "search_seed": search_seed, "seeds": list(seeds),
              "val_split": val_split, "splits": splits, "final_report": bool(final_report),
              "space": {name: list(spec[1:]) if spec[0] != "choice" else spec[1] for name, spec in space.items()},
              "space_kind": {name: spec[0] for name, spec in space.items()},
              "base_flagfile": os.path.abspath(flagfile) if flagfile else None,
              "trials": ranked}
    best = ranked[0] if ranked and ranked[0]["complete"] and ranked[0]["n"] else None
    if best is not None:
        winner = dict(base)
        winner.update(common)
        winner.update(best["params"])
        for name in ("workdir", "seed", "subset_seed"):
            winner.pop(name, None)
        write_flagfile(os.path.join(output_dir, "best.cfg"), winner, comments=(
            f"kdig_tf hparam search: trial {best['trial']} of {len(ranked)} ({search} search), "
            f"val accuracy {best['mean']:.2f} on {val_split} (n={best['n']})",
            "base: " + (os.path.abspath(flagfile) if flagfile else "(none)")))
        report["best"] = {"trial": best["trial"], "params": best["params"], "mean": best["mean"],
                          "sd": best["sd"], "n": best["n"], "flagfile": os.path.join(output_dir, "best.cfg")}
    else:
        log("no complete trial yet: best.cfg not written")
    atomic_write_json(os.path.join(output_dir, "trials.json"), report)
    atomic_write_bytes(os.path.join(output_dir, "trials.md"),
                       trials_markdown(ranked, params, val_split, method).encode())
    return report


# --------------------------------------------------------------------------- compression sweep

def find_fp32_tflite(results, workdir):
    """An fp32 ``.tflite`` that distill.py exported for this run, or None."""
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
            sidecar = _load_json(os.path.splitext(path)[0] + ".json") or {}
            if (sidecar.get("conversion") or {}).get("mode") == "fp32" or "fp32" in name:
                return path
    return None


def measure_student_latency(results, workdir, tflite_dir, keep_blocks, warmup_runs=5, num_runs=50):
    """fp32 TFLite latency at batch 1 on 1 thread of a finished run's student.

    Uses distill.py's fp32 export if there is one, else converts ``student_path``. Latency
    does not depend on the weights, so the sweep measures one model per ``keep_blocks``.
    """
    from kdig_tf import benchmark

    path = find_fp32_tflite(results, workdir)
    source = "distill export"
    if path is None:
        from kdig_tf import export, loading

        path = os.path.join(tflite_dir, f"student_k{keep_blocks}_fp32.tflite")
        if not os.path.isfile(path):
            export.convert(loading.load_model(results["student_path"]), path, "fp32", input_kind="unit")
        source = "converted from student_path"
    latency = benchmark.measure_latency(path, batch_size=1, num_threads=1, warmup_runs=warmup_runs,
                                        num_runs=num_runs)
    # The load average tells a reader whether other jobs competed for the cores.
    return dict(latency, tflite_path=path, source=source, batch_size=1, num_threads=1, mode="fp32",
                environment=benchmark.environment())


def sweep_points(rows, keep_blocks, arms, latency, reference="student"):
    """One point per (keep_blocks, arm): accuracy stats, params, compression, latency."""
    points = []
    for keep in keep_blocks:
        subset = [row for row in rows if row["keep_blocks"] == keep]
        arm_stats = summarize_arms(subset, "val_accuracy", reference)
        for arm in arms:
            finished = [row for row in subset if row["arm"] == arm and row["status"] in FINISHED]
            first = finished[0] if finished else {}
            lat = latency.get(keep) or {}
            points.append(dict(
                arm_stats.get(arm, {"n": 0}), keep_blocks=keep, arm=arm,
                trainable_params=first.get("trainable_params"), compression=first.get("compression"),
                latency_ms=lat.get("inference_median_ms"), latency_avg_ms=lat.get("inference_avg_ms")))
    return stats.finite_or_none(points)


def sweep_markdown(points, val_split, reference):
    lines = [
        "# Compression sweep",
        "",
        f"Validation accuracy (%) on `{val_split}`; latency = median fp32 TFLite inference, batch 1, "
        f"1 thread (one measurement per architecture). Δ is against `{reference}` at the same size.",
        "",
        "| keep_blocks | compression | params | latency (ms) | arm | n | val acc mean ± sd | Δ [95% CI] | p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for point in points:
        cmp = point.get("vs_reference")
        delta = (f"{cmp['mean_diff']:+.2f} [{_fmt(cmp['ci_low'], '+.2f')}, {_fmt(cmp['ci_high'], '+.2f')}] "
                 f"| {_fmt_p(cmp['p'])}") if cmp else " | "
        compression = _fmt(point["compression"]) + "x" if point["compression"] is not None else "n/a"
        params = f"{point['trainable_params']:,}" if point["trainable_params"] is not None else "n/a"
        spread = f"{_fmt(point['mean'])} ± {_fmt(point.get('sd'))}" if point["n"] else "no finished runs"
        lines.append(f"| {point['keep_blocks']} | {compression} | {params} | {_fmt(point['latency_ms'], '.3f')} "
                     f"| {point['arm']} | {point['n']} | {spread} | {delta} |")
    return "\n".join(lines) + "\n"


def plot_sweep(points, path, val_split):
    """Accuracy vs compression (log x), one line per arm, latency written above each size."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    arms = list(dict.fromkeys(point["arm"] for point in points))
    for index, arm in enumerate(arms):
        mine = sorted((p for p in points if p["arm"] == arm and p["n"] and p["compression"]),
                      key=lambda p: p["compression"])
        if mine:
            axes.errorbar([p["compression"] for p in mine], [p["mean"] for p in mine],
                          yerr=[p.get("sd") or 0.0 for p in mine], marker="o", capsize=3,
                          label=arm, color=f"C{index}")
    labelled = {}
    for point in points:
        if point["n"] and point["compression"]:
            best = labelled.get(point["keep_blocks"])
            if best is None or point["mean"] > best["mean"]:
                labelled[point["keep_blocks"]] = point
    for point in labelled.values():
        if point["latency_ms"] is not None:
            axes.annotate(f"k={point['keep_blocks']}\n{point['latency_ms']:.2f} ms",
                          (point["compression"], point["mean"]), textcoords="offset points", xytext=(0, 10),
                          ha="center", fontsize=7)
    axes.set_xscale("log")
    ticks = sorted({point["compression"] for point in points if point["compression"]})
    if ticks:
        axes.set_xticks(ticks, [f"{tick:.{2 if tick < 10 else 1 if tick < 100 else 0}f}x" for tick in ticks])
        axes.minorticks_off()
    axes.set_xlabel("compression (teacher params / student params, log scale)")
    axes.set_ylabel(f"validation accuracy (%) on {val_split}")
    axes.set_title("Accuracy vs compression (fp32 TFLite latency, batch 1, 1 thread)")
    axes.grid(alpha=0.3, which="both")
    if arms:
        axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=150, format="png")
    plt.close(figure)


def run_compression_sweep(output_dir, flagfile, keep_blocks, arms, seeds, extra_flags="", reference="student",
                          final_report=False, latency_fn=measure_student_latency, warmup_runs=5, num_runs=50,
                          launcher=subprocess_launcher, script=DISTILL_SCRIPT, dry_run=False, log=print):
    """keep_blocks x arms x seeds; writes runs.{csv,json}, sweep.{json,md} and sweep.png.

    ``latency_fn(results, workdir, tflite_dir, keep_blocks, warmup_runs, num_runs)`` -> latency dict
    (None skips latency). Measured latencies are cached in ``latency.json``.
    """
    arms = parse_arms(arms)
    keep_blocks = parse_int_list(keep_blocks, "keep_blocks")
    base, extra, splits = _prepare(output_dir, flagfile, extra_flags, final_report)
    if "keep_blocks" in extra:
        raise InvalidArgumentError("--extra_flags may not set --keep_blocks: the sweep sets it")
    store = default_store_dir(output_dir, base, extra)
    runs = []
    for keep in keep_blocks:
        runs += seed_runs(os.path.join(output_dir, "runs"), arms, seeds, 1.0,
                          dict(store, **extra, keep_blocks=keep), {"keep_blocks": keep}, subdir=f"k{keep}")
    rows = run_campaign(runs, flagfile, launcher, script, dry_run=dry_run, log=log)
    write_rows(rows, output_dir)
    if dry_run:
        return None

    cache_path = os.path.join(output_dir, "latency.json")
    latency = {int(key): value for key, value in (_load_json(cache_path) or {}).items()}
    if latency_fn is not None:
        for keep in keep_blocks:
            finished = [row for row in rows if row["keep_blocks"] == keep and row["status"] in FINISHED]
            if keep in latency or not finished:
                continue
            log(f"latency: keep_blocks={keep}")
            results = _load_json(os.path.join(finished[0]["workdir"], RESULTS_FILE))
            latency[keep] = latency_fn(results, finished[0]["workdir"], os.path.join(output_dir, "tflite"), keep,
                                       warmup_runs, num_runs)
            atomic_write_json(cache_path, {str(key): value for key, value in sorted(latency.items())})
    points = sweep_points(rows, keep_blocks, arms, latency, reference)
    report = {"val_split": splits["val_split"], "splits": splits, "final_report": bool(final_report),
              "reference": reference, "seeds": list(seeds), "keep_blocks": keep_blocks, "arms": arms,
              "base_flagfile": os.path.abspath(flagfile) if flagfile else None, "extra_flags": extra,
              "points": points, "latency": {str(key): value for key, value in sorted(latency.items())}}
    atomic_write_json(os.path.join(output_dir, "sweep.json"), report)
    atomic_write_bytes(os.path.join(output_dir, "sweep.md"),
                       sweep_markdown(points, splits["val_split"], reference).encode())
    if any(point["n"] for point in points):
        plot_sweep(points, os.path.join(output_dir, "sweep.png"), splits["val_split"])
    return report
