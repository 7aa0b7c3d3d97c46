"""Ablation: every method x every seed, each a distillation run in this process, then statistics.

    python scripts/ablation.py --flagfile_base=flags/paper.cfg --methods=student,kd,ig,kd_ig \
        --num_seeds=10 --output_dir=results/ablation

Each run lives in ``<output_dir>/runs/<method>/seed<k>`` and is trained by the pipeline behind
``scripts/distill.py``, in this process, its output in the run's ``log.txt``. Finished runs are
skipped and failed ones retried, so rerunning the same command resumes the campaign. Methods are
distill.py's ``--method`` values; ``<method>_shuffled`` (e.g. ``kd_ig_shuffled``) is the
misalignment control: ``--method=<method> --cached_targets_order=shuffled``.

``--subset_fraction=0.8`` is the Monte-Carlo protocol: run k trains on stratified random
subset k (``--subset_seed=k``), the same subset for every method.

Writes ``runs.csv`` / ``runs.json`` (every run), ``summary.json`` / ``summary.md`` (per method
n, mean ± sd, min, max of validation accuracy; Welch's t-test, Cohen's d, Hedges' g and the
mean difference with its 95 % CI against ``--reference``, the paired t-test over seeds, Holm's
adjustment; the ``--contrasts`` between other arms; each test's verdict in words (Findings); the
training hours of the finished runs;
the distill.py command of each run) and
``ablation.png``, and ``curves.png``: every run's validation accuracy after each epoch, finished
or not, with the last third of the epochs zoomed. Splits named ``test`` are refused unless
``--final_report``.

Per-run flags go through ``--extra_flags``, e.g. ``--extra_flags="--epochs=30 --export_modes="``
(no TFLite export: the ablation only needs accuracies).

``--status`` prints where every run stands (finished, epochs trained, median epoch time) and
the hours left at the epoch times logged so far, e.g. before planning the next session.

``--methods=student`` runs that arm alone (its runs need no IG store) but leaves tables of
that arm only; ``--report_only`` with the full ``--methods`` list rewrites them from every
finished run without launching anything.
"""
import os


import kdig_tf  # noqa: F401
from absl import flags

from kdig_tf import campaigns, cli, experiments, reports
from kdig_tf import logs
from kdig_tf.errors import FlagError

FLAGS = flags.FLAGS
logs.define_flags(FLAGS)
flags.DEFINE_string("flagfile_base", "flags/paper.cfg",
                    "Base flagfile of every run, as distill.py's --flagfile ('' = none).")
flags.DEFINE_list("methods", ["student", "kd", "ig", "kd_ig"],
                  "Arms: distill --method values, or <method>_shuffled for the misaligned-targets control.")
flags.DEFINE_list("seeds", [], "Seeds, e.g. 0,1,2 (overrides --num_seeds).")
flags.DEFINE_integer("num_seeds", 10, "Use seeds 0..num_seeds-1 when --seeds is empty.")
flags.DEFINE_string("output_dir", "results/ablation", "Campaign directory (runs, tables, plot).")
flags.DEFINE_float("subset_fraction", 1.0, "< 1: each seed trains on its own stratified random subset.")
flags.DEFINE_string("extra_flags", "", "Flags passed to every run, e.g. \"--epochs=5 --batch_size=64\".")
flags.DEFINE_string("reference", "student", "Arm every other arm is tested against.")
flags.DEFINE_list("contrasts", [],
                  "Planned comparisons arm:other (arm - other), e.g. kd_ig:kd,kd_online:kd; reported only.")
flags.DEFINE_bool("final_report", False, "Allow splits named 'test' (the one final evaluation, never for tuning).")
flags.DEFINE_bool("dry_run", False, "Print the distill.py commands of unfinished runs; launch nothing.")
flags.DEFINE_bool("status", False,
                  "Launch nothing; print each run's state and epochs, and the hours left at the epoch times so far.")
flags.DEFINE_bool("report_only", False,
                  "Launch nothing; rewrite runs.csv, summary.{json,md} and the plot from the finished runs.")


def main(argv):
    logs.quiet(FLAGS.verbose_logs)
    if len(argv) > 1:
        raise FlagError(f"unexpected arguments: {argv[1:]}")
    from kdig_tf import cli

    cli.run(_ablation)


def _ablation():
    seeds = experiments.resolve_seeds(FLAGS.seeds, FLAGS.num_seeds)
    if FLAGS.status:
        statuses, estimate = campaigns.ablation_status(
            FLAGS.output_dir, FLAGS.flagfile_base or None, FLAGS.methods, seeds,
            subset_fraction=FLAGS.subset_fraction, extra_flags=FLAGS.extra_flags, final_report=FLAGS.final_report)
        print(experiments.status_text(statuses, estimate))
        return
    summary = campaigns.run_ablation(
        FLAGS.output_dir, FLAGS.flagfile_base or None, FLAGS.methods, seeds,
        subset_fraction=FLAGS.subset_fraction, extra_flags=FLAGS.extra_flags, reference=FLAGS.reference,
        final_report=FLAGS.final_report, dry_run=FLAGS.dry_run, report_only=FLAGS.report_only,
        contrasts=FLAGS.contrasts)
    if summary is not None:
        print(reports.arms_markdown(summary["arms"], summary["reference"], "val acc"))
        print(f"written: {os.path.join(FLAGS.output_dir, 'summary.md')}")


if __name__ == "__main__":
    cli.main(main)
