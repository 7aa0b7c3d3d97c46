"""Latency-aware students: which (keep_blocks, width, TFLite mode) is >= 10x faster than the
fp32 teacher at batch 1 on one thread, and what accuracy does it keep?

    # latency and MACs only (random weights), on a quiet machine:
    python scripts/latency_sweep.py --keep_blocks=14,12,10,8,6 --widths=1.0,0.75,0.5,0.35,0.25 \
        --modes=fp32,int8 --num_runs=200 --warmup_runs=20 --output_dir=results/latency_sweep

    # plus a short distillation per (keep_blocks, width), scored on the validation split:
    python scripts/latency_sweep.py --train --flagfile_base=flags/quick.cfg \
        --data_dir=../shared/tensorflow_datasets --output_dir=results/latency_sweep_quick

    # a few named students trained to convergence, plus their QAT and pruned copies:
    python scripts/latency_sweep.py --train --keep_blocks= --widths= \
        --extra_candidates=k14_w1_s2,k14_w0.75_s2 --flagfile_base=flags/study_long.cfg \
        --extra_flags="--qat_epochs=2 --prune_sparsity=0.5 --prune_epochs=2" \
        --data_dir=../shared/tensorflow_datasets --num_runs=200 --warmup_runs=20 \
        --output_dir=results/latency_sweep_long

    # the screen of issue 45: int8 students of every built-in family vs the fp32 teacher:
    python scripts/latency_sweep.py --flagfile=flags/screen_students.cfg

Every candidate is timed with LiteRT (XNNPACK) in a fresh subprocess; the fp32 teacher is
timed first and last in the same run and is the reference for every speed-up. With
``--train`` each candidate is a distillation run in this process (what ``scripts/distill.py``
runs), in ``<output_dir>/runs/k<keep>_w<width>[_s<stride>]/<method>/seed<seed>`` with its output
in the run's ``log.txt`` (finished runs are skipped, failed ones retried); its exported fp32/int8
files (int8 calibrated on the training split) are timed and evaluated on the validation split.
Input resolution is not swept (the distillation pipeline only trains on 32x32 images);
``--extra_candidates=k14_w1_s2`` adds a student whose stem downsamples, which costs its blocks
what a 16x16 input would. ``--student_spec=resnet:depth=20,width=16`` (repeatable, one spec per
flag: specs contain commas) adds a student of any built-in family (``kdig_tf/students.py``);
with ``--train`` it is distilled as ``distill.py --student=<spec>``.

Writes ``latency_sweep.json`` (command, machine, load average before/after, every row,
Pareto front, the >= --target_speedup candidates), ``latency_sweep.md`` and
``latency_sweep.png`` under ``--output_dir``. See ``kdig_tf/pareto.py``.
"""
import os
import sys


import kdig_tf  # noqa: F401
from absl import flags

from kdig_tf import cli
from kdig_tf import logs
from kdig_tf.errors import FlagError

FLAGS = flags.FLAGS
logs.define_flags(FLAGS)
flags.DEFINE_list("keep_blocks", ["14", "12", "10", "8", "6"], "Student depths (feature modules kept).")
flags.DEFINE_list("widths", ["1.0", "0.75", "0.5", "0.35", "0.25"], "Student width multipliers.")
flags.DEFINE_list("extra_candidates", [], "Students added to the grid by name, k<keep>_w<width>[_s<stem stride>]: "
                  "e.g. k14_w0.5_s2 (a stride-2 stem: 4x fewer MACs). With --keep_blocks= --widths= "
                  "(both empty) only these are swept.")
flags.DEFINE_multi_string("student_spec", [], "A built-in student spec to time (and with --train, distil), e.g. "
                          "mnv2:width=0.5,strides=1-2-2-2-1-2-1 or resnet:depth=20,width=16; repeat the flag "
                          "for more. With --keep_blocks= --widths= (both empty) only the named candidates run.")
flags.DEFINE_list("modes", ["fp32", "int8"], "TFLite modes of every candidate: fp32, fp16, dynamic, int8. "
                  "With --train, a run's QAT and pruned exports (--extra_flags=\"--qat_epochs=.. "
                  "--prune_sparsity=..\") are timed too.")
flags.DEFINE_integer("num_threads", 1, "Interpreter threads.")
flags.DEFINE_integer("warmup_runs", 5, "Untimed warmup invocations per model.")
flags.DEFINE_integer("num_runs", 50, "Timed invocations per model (median and p90 reported).")
flags.DEFINE_bool("isolate", True, "Time each model in a fresh subprocess (numpy + LiteRT only).")
flags.DEFINE_float("target_speedup", 10.0, "Mark candidates at least this much faster than the fp32 teacher.")
flags.DEFINE_integer("num_calibration", 128, "Random int8 calibration images for untrained models.")
flags.DEFINE_integer("random_seed", 0, "Seed of the random weights of untrained models.")
flags.DEFINE_bool("train", False, "Distil every (keep_blocks, width) and report validation accuracy.")
flags.DEFINE_string("flagfile_base", "flags/quick.cfg", "Base flagfile of every run, as distill.py's --flagfile "
                    "('' = none).")
flags.DEFINE_string("method", "kd_ig", "distill --method of every run.")
flags.DEFINE_integer("seed", 0, "distill --seed of every run.")
flags.DEFINE_string("extra_flags", "", "Flags passed to every run, e.g. \"--epochs=5 --data_dir=...\".")
flags.DEFINE_string("data_dir", None, "tfds data_dir passed to every run (same as --extra_flags=--data_dir=...).")
flags.DEFINE_bool("final_report", False, "Allow splits named 'test' (the one final evaluation).")
flags.DEFINE_bool("dry_run", False,
                  "With --train: print the distill.py commands of unfinished runs; launch nothing.")
flags.DEFINE_string("output_dir", "results/latency_sweep", "Where the .tflite files, runs and reports go.")


def main(argv):
    logs.quiet(FLAGS.verbose_logs)
    if len(argv) > 1:
        raise FlagError(f"unexpected arguments: {argv[1:]}")
    from absl import logging

    from kdig_tf import cli
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # the TFLite converter logs every step at INFO
    cli.run(_sweep)


def _sweep():
    import shlex

    from kdig_tf import pareto

    extra = FLAGS.extra_flags
    if FLAGS.data_dir:
        extra = f"{extra} --data_dir={shlex.quote(FLAGS.data_dir)}".strip()
    report = pareto.run_latency_sweep(
        FLAGS.output_dir, FLAGS.keep_blocks, FLAGS.widths, FLAGS.modes, extra_candidates=FLAGS.extra_candidates,
        train=FLAGS.train, flagfile=FLAGS.flagfile_base or None, method=FLAGS.method, seed=FLAGS.seed,
        extra_flags=extra,
        final_report=FLAGS.final_report, num_threads=FLAGS.num_threads, warmup_runs=FLAGS.warmup_runs,
        num_runs=FLAGS.num_runs, target_speedup=FLAGS.target_speedup, num_calibration=FLAGS.num_calibration,
        random_seed=FLAGS.random_seed, isolate=FLAGS.isolate, command=shlex.join([sys.executable, *sys.argv]),
        dry_run=FLAGS.dry_run, student_specs=FLAGS.student_spec)
    if report is None:
        return
    fast = report["fast_candidates"]
    print(f"fp32 teacher: {report['reference']['median_ms']:.3f} ms median; "
          f">= {report['target_speedup']:g}x: {', '.join(fast) if fast else 'none'}")
    print(f"written: {os.path.join(FLAGS.output_dir, pareto.REPORT_STEM + '.md')}")


if __name__ == "__main__":
    cli.main(main)
