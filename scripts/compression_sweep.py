"""Compression sweep: students of every size, several methods and seeds, with TFLite latency.

    python scripts/compression_sweep.py --flagfile_base=flags/paper.cfg \
        --keep_blocks=16,14,12,10,8,6,4,2 --methods=student,kd,kd_ig --seeds=0,1,2 \
        --output_dir=results/compression_sweep

Each run is a distillation in this process, in
``<output_dir>/runs/k<keep_blocks>/<method>/seed<s>`` (output in its ``log.txt``; finished runs
are skipped, failed ones retried). For every size, one finished student is converted to fp32
TFLite (or the run's fp32 export is reused) and timed with ``kdig_tf.benchmark`` at batch 1 on
1 thread; latency depends on the architecture, not the weights. Latencies are
cached in ``latency.json``; delete it to measure again (e.g. on an idle machine). Only fp32
is needed, so ``--extra_flags=--export_modes=fp32`` saves each run the int8 export that
``flags/paper.cfg`` asks for.

Writes ``runs.csv`` / ``runs.json``, ``sweep.json`` / ``sweep.md`` (accuracy mean ± sd,
parameters, compression, latency, Welch test against ``--reference`` at each size) and
``sweep.png`` (accuracy vs compression, log x, latency annotated).
"""
import os


import kdig_tf  # noqa: F401
from absl import flags

from kdig_tf import campaigns, cli, experiments
from kdig_tf import logs
from kdig_tf.errors import FlagError

FLAGS = flags.FLAGS
logs.define_flags(FLAGS)
flags.DEFINE_string("flagfile_base", "flags/paper.cfg",
                    "Base flagfile of every run, as distill.py's --flagfile ('' = none).")
flags.DEFINE_list("keep_blocks", ["16", "14", "12", "10", "8", "6", "4", "2"], "Student sizes (feature modules kept).")
flags.DEFINE_list("methods", ["student", "kd", "kd_ig"], "Arms (distill --method values or <method>_shuffled).")
flags.DEFINE_list("seeds", [], "Seeds, e.g. 0,1,2 (overrides --num_seeds).")
flags.DEFINE_integer("num_seeds", 3, "Use seeds 0..num_seeds-1 when --seeds is empty.")
flags.DEFINE_string("output_dir", "results/compression_sweep", "Sweep directory (runs, tables, plot).")
flags.DEFINE_string("extra_flags", "", "Flags passed to every run, e.g. \"--epochs=5\".")
flags.DEFINE_string("reference", "student", "Arm the others are tested against at each size.")
flags.DEFINE_bool("latency", True, "Measure fp32 TFLite latency (batch 1, 1 thread).")
flags.DEFINE_integer("warmup_runs", 5, "Latency: untimed warmup invocations.")
flags.DEFINE_integer("num_runs", 50, "Latency: timed invocations.")
flags.DEFINE_bool("final_report", False, "Allow splits named 'test' (the one final evaluation).")
flags.DEFINE_bool("dry_run", False, "Print the distill.py commands of unfinished runs; launch nothing.")


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
    seeds = experiments.resolve_seeds(FLAGS.seeds, FLAGS.num_seeds)
    report = campaigns.run_compression_sweep(
        FLAGS.output_dir, FLAGS.flagfile_base or None, FLAGS.keep_blocks, FLAGS.methods, seeds,
        extra_flags=FLAGS.extra_flags, reference=FLAGS.reference, final_report=FLAGS.final_report,
        latency_fn=campaigns.measure_student_latency if FLAGS.latency else None,
        warmup_runs=FLAGS.warmup_runs, num_runs=FLAGS.num_runs, dry_run=FLAGS.dry_run)
    if report is not None:
        print(f"written: {os.path.join(FLAGS.output_dir, 'sweep.md')}")


if __name__ == "__main__":
    cli.main(main)
