"""The campaign runner: one distillation per run, in this process, resumable and checked.

A campaign is a list of ``Run``s, each with its own work directory. For every unfinished
run the runner builds the arguments ``scripts/distill.py`` would get (the base flagfile,
``--workdir`` and the run's overrides), parses them with absl into a ``DistillConfig``
(:func:`kdig_tf.cli.distill_config`) and calls :func:`kdig_tf.pipeline.run_distillation`
in the same process; what the run prints and logs goes to ``<run>/log.txt``. It skips runs
whose ``results.json`` and the files it names exist, and keeps going when a run fails: the
exception and its traceback go to the run's log, the row says "failed", and the run is
retried on the next invocation. A KeyboardInterrupt stops the campaign.
Before launching, ``<run>/command.json`` records the flags, so a finished run can be
checked against what the campaign asks for now (``StaleRunError`` on a mismatch: results
of a different recipe are never mixed in silently).

Selection hygiene: any split named ``test`` is refused unless ``final_report=True``
(``check_selection_split``), so tuning and model selection only ever see validation data.

The campaigns themselves are in ``kdig_tf.campaigns``, their tables and plots in
``kdig_tf.reports``. Importing this module does not import TensorFlow; parsing a run's
flags does (``DistillConfig`` lives in ``kdig_tf.pipeline``).
"""
import kdig_tf  # noqa: F401

import contextlib
import csv
import dataclasses
import datetime
import gc
import logging
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

from kdig_tf import cli
from kdig_tf.errors import (InvalidArgumentError, StaleRunError, TestSplitSelectionError,
                            UnknownKeyError)
from kdig_tf.io_utils import (atomic_path, atomic_write_bytes, atomic_write_json, holds_files, read_epoch_log,
                              read_json_or_none, sha256_file)

METHODS = ("student", "kd", "ig", "kd_ig", "at", "kd_at", "ig_at", "kd_ig_at", "kd_online")
# "kd_ig_shuffled" = --method=kd_ig --cached_targets_order=shuffled (the misalignment control).
SHUFFLED_SUFFIX = "_shuffled"
_NO_CACHED_TARGETS = ("student", "at", "kd_online")  # methods that never read the IG/logit store
RESULTS_FILE = "results.json"
COMMAND_FILE = "command.json"
LOG_FILE = "log.txt"
SPLIT_FIELDS = ("train_split", "val_split", "eval_split")
# How a row shows its run: the same distillation by hand, from a checkout of the repository.
DISTILL_COMMAND = ("python", "scripts/distill.py")
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


def parse_extra_flags(text):
    """``"--epochs=5 --batch_size=64"`` -> ordered dict; refuses flags the campaign sets per run.

    Values stay as typed, so the ``command.json`` records of earlier runs still compare equal.
    """
    flags = {}
    for token in shlex.split(text or ""):
        name, value = _parse_flag_token(token, "--extra_flags")
        if name in RESERVED_FLAGS:
            raise InvalidArgumentError(f"--extra_flags may not set --{name}: the campaign sets it per run")
        flags[name] = value
    return flags


def run_args(flagfile, overrides, workdir=None):
    """distill.py's arguments: ``--flagfile``, ``--workdir``, then the overrides in their order."""
    args = [f"--flagfile={os.path.abspath(flagfile)}"] if flagfile else []
    if workdir is not None:
        args.append(f"--workdir={os.path.abspath(workdir)}")
    return args + flag_args(overrides)


def parse_run(flagfile, overrides, workdir=None):
    """(DistillConfig, workdir) of a base flagfile plus overrides, parsed by absl as distill.py would."""
    if flagfile and not os.path.isfile(flagfile):
        raise InvalidArgumentError(f"no such flagfile: {os.path.abspath(flagfile)}")
    return cli.distill_config(run_args(flagfile, overrides, workdir))


def config_flags(config, exclude=()):
    """A DistillConfig as an ordered {flag: value}, without unset (None) fields and ``exclude``."""
    return {name: value for name, value in dataclasses.asdict(config).items()
            if value is not None and name not in exclude}


def _shown_arg(arg):
    """``--name=/abs/path`` inside the working directory -> ``--name=relative/path``."""
    name, sep, value = arg.partition("=")
    if sep and os.path.isabs(value):
        relative = os.path.relpath(value)
        if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
            return f"{name}={relative}"
    return arg


def display_command(args):
    """The shell command that repeats a run by hand, paths inside the working directory made relative."""
    return shlex.join([*DISTILL_COMMAND, *(_shown_arg(arg) for arg in args)])


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


def effective_splits(flagfile, overrides):
    """train/val/eval split a run will use ('' = none), as distill.py parses its flags."""
    config, _ = parse_run(flagfile, overrides)
    return {name: getattr(config, name) or "" for name in SPLIT_FIELDS}


def check_campaign_splits(flagfile, overrides, final_report=False):
    splits = effective_splits(flagfile, overrides)
    for name, split in splits.items():
        check_selection_split(split, final_report, flag=name)
    return splits


# --------------------------------------------------------------------------- run grids

@dataclass
class Run:
    """One distillation run: its directory, flag overrides and labels for the tables."""
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


# --------------------------------------------------------------------------- runner

def distill_launcher(config, workdir):
    """The default launcher: :func:`kdig_tf.pipeline.run_distillation`, in this process."""
    from kdig_tf import pipeline

    return pipeline.run_distillation(config, workdir, progress=True)


def _stream_handlers():
    """Every logging StreamHandler in this process, absl's included (it hides one inside its handler)."""
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    found = {}
    for logger in loggers:
        for handler in logger.handlers:
            for candidate in (handler, getattr(handler, "python_handler", None)):
                if isinstance(candidate, logging.StreamHandler):
                    found[id(candidate)] = candidate
    return list(found.values())


@contextlib.contextmanager
def _descriptors_to(handle):
    """File descriptors 1 and 2 to ``handle``: TensorFlow's and the TFLite converter's C++ logs."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()  # console text written before the run stays on the console
    saved = []
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
            except OSError:  # no such descriptor (e.g. a GUI process)
                continue
            os.dup2(handle.fileno(), fd)
        yield
    finally:
        handle.flush()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def run_output_to(handle):
    """Send what a run prints and logs (Keras, tqdm, absl and TF logging, C++ logs) to ``handle``."""
    consoles = {id(stream) for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    swapped = {id(handler): handler.stream for handler in _stream_handlers() if id(handler.stream) in consoles}
    try:
        for handler in _stream_handlers():
            if id(handler) in swapped:
                handler.setStream(handle)
        with _descriptors_to(handle), contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            yield
    finally:
        # A handler made during the run (absl's, TensorFlow's) took the log as its stream: give it the
        # console it would have had, or it writes to a closed file in the next run.
        for handler in _stream_handlers():
            if id(handler) in swapped:
                handler.setStream(swapped[id(handler)])
            elif handler.stream is handle:
                handler.setStream(sys.stderr)


def _release_memory():
    """Drop the finished run's graphs and models, so dozens of runs in one process do not pile up."""
    import tf_keras as keras

    keras.backend.clear_session()
    gc.collect()


def _launch(launcher, config, workdir, log_path, command):
    """Run ``launcher(config, workdir)`` with its output in ``log_path``; the error text, or None."""
    with open(log_path, "a", buffering=1) as handle:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        handle.write(f"\n=== {stamp} in-process, cwd {os.getcwd()}: {command}\n")
        try:
            with run_output_to(handle):
                launcher(config, workdir)
        except Exception as err:  # a failed run is reported and retried; KeyboardInterrupt stops the campaign
            handle.write(traceback.format_exc())
            message = str(err).splitlines()[0] if str(err).strip() else ""
            return f"{type(err).__name__}: {message}" if message else type(err).__name__
        finally:
            _release_memory()
    return None


def _record(run, flagfile):
    # The format of the subprocess runner's records, so runs it finished are still recognised.
    return {"flagfile": flagfile, "flagfile_sha256": sha256_file(flagfile) if flagfile else None,
            "overrides": flag_args(run.overrides)}


def _check_not_stale(run, record, flagfile):
    previous = read_json_or_none(os.path.join(run.workdir, COMMAND_FILE))
    if previous is None:
        return
    changes = []
    if previous.get("flagfile_sha256") != record["flagfile_sha256"]:
        # An edited flagfile (a comment, a default made explicit, a check-only flag) is stale
        # only if it changes what the run's student was trained with.
        changes += [f"base flagfile {record['flagfile']} changed: {change}"
                    for change in _training_changes(run, flagfile)]
    old, new = set(previous.get("overrides") or []), set(record["overrides"])
    if old != new:
        changes.append(f"flags {sorted(old - new)} -> {sorted(new - old)}")
    if changes:
        raise StaleRunError(f"{run.workdir} finished with other settings ({'; '.join(changes)}); "
                            f"use a new output directory or delete that run")


def _training_changes(run, flagfile):
    """What the run's recorded training settings and those of ``flagfile`` + its overrides disagree on."""
    from kdig_tf import pipeline  # TensorFlow loads the teacher to fingerprint it

    if not os.path.isfile(os.path.join(run.workdir, pipeline.RUN_CONFIG)):
        return [f"its training settings cannot be compared ({pipeline.RUN_CONFIG} is missing)"]
    config, _ = parse_run(flagfile, run.overrides, run.workdir)
    uses_teacher = config.uses_kd or config.uses_ig or config.uses_at
    teacher_hash = _teacher_fingerprint(config.teacher) if uses_teacher else None
    return pipeline.settings_changes(run.workdir, pipeline.training_settings(config, teacher_hash))


_TEACHER_FINGERPRINTS = {}


def _teacher_fingerprint(path):
    from kdig_tf import pipeline, records

    if path not in _TEACHER_FINGERPRINTS:
        _TEACHER_FINGERPRINTS[path] = records.weights_fingerprint(pipeline.load_teacher(path))
    return _TEACHER_FINGERPRINTS[path]


def recorded_output(workdir, path):
    """A file that a run's results.json names, or None if it is not on disk.

    results.json records absolute paths; in another checkout the file is looked up by name
    in the run's own workdir.
    """
    if path and not os.path.isfile(path):
        path = os.path.join(workdir, os.path.basename(path))
    return path if path and os.path.isfile(path) else None


def missing_outputs(workdir, results):
    """Names of the files results.json lists (student, .tflite exports) that are not on disk.

    Exports are derived files that git does not keep, so a fresh checkout of a finished run
    has its student.h5 but not its .tflite files.
    """
    exports = [entry.get("path") for entry in (results.get("tflite") or {}).values() if isinstance(entry, dict)]
    return [os.path.basename(path) for path in [results.get("student_path"), *exports]
            if path and recorded_output(workdir, path) is None]


def _row(run, status, error, command, results, wall_seconds):
    row = {"run": run.name, **run.labels, "status": status, "error": error}
    results = results or {}
    for key in RESULT_FIELDS:
        row[key] = results.get(key)
    row.update(wall_seconds=wall_seconds, workdir=run.workdir, command=command)
    return row


def run_campaign(runs, flagfile=None, launcher=distill_launcher, dry_run=False, log=print, rows_dir=None,
                 progress=None):
    """Run every unfinished run in this process; return one row per run (status ok / skipped / failed / pending).

    ``launcher(config, workdir)`` trains one run (default :func:`distill_launcher`); ``config``
    is the run's ``DistillConfig``, parsed by absl from the base ``flagfile`` and the run's
    overrides. Every run's flags are parsed and checked before anything is launched. With
    ``rows_dir``, ``runs.{csv,json}`` there are rewritten after every launched run (runs not
    reached yet are "pending") and at the end, so a campaign killed after hours still leaves an
    up-to-date table; ``progress(rows)``, if given, is called at the same points during the loop.
    """
    flagfile = os.path.abspath(flagfile) if flagfile else None
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise InvalidArgumentError("two runs share a work directory")
    # Check every finished run first, so a stale one stops the campaign before hours of work.
    records = [_record(run, flagfile) for run in runs]
    for run, record in zip(runs, records):
        if os.path.exists(os.path.join(run.workdir, RESULTS_FILE)):
            _check_not_stale(run, record, flagfile)
    commands = [display_command(run_args(flagfile, run.overrides, run.workdir)) for run in runs]
    rows, missing = [], []
    for run, command in zip(runs, commands):
        results_path = os.path.join(run.workdir, RESULTS_FILE)
        results = read_json_or_none(results_path) if os.path.exists(results_path) else None
        # A finished run whose outputs are gone is launched again: the pipeline remakes them.
        missing.append(missing_outputs(run.workdir, results) if results is not None else [])
        rows.append(_row(run, "pending", None, command, None, None) if results is None or missing[-1]
                    else _row(run, "skipped", None, command, results, None))
    # Bad flags or values stop the campaign here, not in every run after hours of work.
    configs = []
    for run, row in zip(runs, rows):
        config = None
        if row["status"] != "skipped":
            config, _ = parse_run(flagfile, run.overrides, run.workdir)
            config.validate()
        configs.append(config)

    failures = 0
    for index, (run, record, config, command) in enumerate(zip(runs, records, configs, commands)):
        tag = f"[{index + 1}/{len(runs)}]"
        if rows[index]["status"] == "skipped":
            log(f"{tag} skip {run.name}: {RESULTS_FILE} exists")
            continue
        why = f" ({', '.join(missing[index])} missing)" if missing[index] else ""
        if dry_run:
            log(f"{tag} would run{why}: {command}")
            continue
        os.makedirs(run.workdir, exist_ok=True)
        atomic_write_json(os.path.join(run.workdir, COMMAND_FILE), record)
        log_path = os.path.join(run.workdir, LOG_FILE)
        log(f"{tag} run {run.name}{why} (log: {log_path})")
        start = time.time()
        error = _launch(launcher, config, os.path.abspath(run.workdir), log_path, command)
        wall = time.time() - start
        results = read_json_or_none(os.path.join(run.workdir, RESULTS_FILE))
        if error is None and results is None:
            error = f"finished without writing {RESULTS_FILE}"
        if error is None:
            rows[index] = _row(run, "ok", None, command, results, wall)
        else:
            failures += 1
            log(f"{tag} FAILED {run.name} ({error}); see {log_path}; it will be retried on the next invocation")
            rows[index] = _row(run, "failed", error, command, None, wall)
        if rows_dir is not None:
            write_rows(rows, rows_dir)
        if progress is not None:
            progress(list(rows))
    if rows_dir is not None:
        write_rows(rows, rows_dir)
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


# --------------------------------------------------------------------------- status

def run_status(run, epochs):
    """Where one run stands, read from its files; launches nothing.

    ``state`` is "finished" (results.json and the files it names are there), "exports missing"
    (trained; the next launch re-exports), "in progress" (a BackupAndRestore checkpoint;
    ``epochs_done`` is the epoch it resumes at) or "not started" (an epoch log without a
    checkpoint is discarded on launch, so it counts for nothing).
    ``epoch_seconds`` are the logged epoch times that still count.
    """
    from kdig_tf import pipeline  # TensorFlow reads the checkpoint

    results = read_json_or_none(os.path.join(run.workdir, RESULTS_FILE))
    history = read_epoch_log(os.path.join(run.workdir, pipeline.HISTORY))
    backup_dir = os.path.join(run.workdir, pipeline.BACKUP)
    if results is not None and recorded_output(run.workdir, results.get("student_path")):
        # A fresh checkout has the student but not the .tflite exports: relaunching only re-exports.
        state, done = ("exports missing" if missing_outputs(run.workdir, results) else "finished"), epochs
    elif holds_files(backup_dir):
        state, done = "in progress", min(pipeline.resume_epoch(backup_dir), epochs)
    else:
        state, done, history = "not started", 0, {}
    seconds = [value for value in history.get("epoch_seconds", [])[:done] if value == value]  # drop NaN
    return {"run": run.name, "arm": run.labels.get("arm"), "state": state, "epochs_done": done,
            "epochs": epochs, "epoch_seconds": seconds}


def estimate_remaining(statuses):
    """Runs finished, epochs left and the seconds they take at the epoch times logged so far.

    Each arm's rate is the median of its logged epochs (all machines pooled: a forecast, not a
    measurement); an arm with none logged yet borrows the median over every arm, and is listed
    in ``assumed_arms``.
    """
    by_arm = {}
    for status in statuses:
        by_arm.setdefault(status["arm"], []).extend(status["epoch_seconds"])
    everything = [value for values in by_arm.values() for value in values]
    overall = statistics.median(everything) if everything else None
    rates = {arm: statistics.median(values) if values else overall for arm, values in by_arm.items()}
    epochs_left = {arm: 0 for arm in by_arm}
    for status in statuses:
        epochs_left[status["arm"]] += status["epochs"] - status["epochs_done"]
    seconds_left = (None if any(rates[arm] is None for arm, left in epochs_left.items() if left)
                    else sum(rates[arm] * left for arm, left in epochs_left.items() if left))
    return {"runs": len(statuses), "runs_finished": sum(status["state"] == "finished" for status in statuses),
            "epochs_left": sum(epochs_left.values()), "seconds_left": seconds_left,
            "seconds_per_epoch": rates, "assumed_arms": [arm for arm, values in by_arm.items() if not values]}


def status_text(statuses, estimate):
    """The table ``scripts/ablation.py --status`` prints."""
    width = max([len("run")] + [len(status["run"]) for status in statuses])
    state_width = max([len("state")] + [len(status["state"]) for status in statuses])
    lines = [f"{'run':<{width}}  {'state':<{state_width}}  epochs  median s/epoch"]
    for status in statuses:
        median = (f"{statistics.median(status['epoch_seconds']):.0f}" if status["epoch_seconds"] else "-")
        lines.append(f"{status['run']:<{width}}  {status['state']:<{state_width}}  "
                     f"{status['epochs_done']:>3}/{status['epochs']:<3} {median:>8}")
    lines.append(f"{estimate['runs_finished']}/{estimate['runs']} runs finished, "
                 f"{estimate['epochs_left']} epochs left")
    if estimate["seconds_left"] is None:
        lines.append("no epoch timed yet: no estimate of the time left")
    elif estimate["epochs_left"]:
        rates = ", ".join(f"{arm} {rate:.0f} s" + (" (not timed yet: median of all)"
                                                  if arm in estimate["assumed_arms"] else "")
                          for arm, rate in estimate["seconds_per_epoch"].items() if rate is not None)
        lines.append(f"about {estimate['seconds_left'] / 3600:.1f} h left at the median epoch time of each arm "
                     f"so far, machines pooled ({rates})")
    return "\n".join(lines)


def default_store_dir(output_dir, flagfile, extra):
    """One IG/logit store shared by all runs of a campaign, unless the base flags or ``extra`` pick one.

    Arms without the overlay read a logits-only store beside it until it exists
    (:func:`kdig_tf.pipeline.ensure_store`).
    """
    config, _ = parse_run(flagfile, extra)
    if config.store_dir is not None:
        return {}
    return {"store_dir": os.path.abspath(os.path.join(output_dir, "store"))}
