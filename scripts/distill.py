"""Distil a student from the teacher with KD and the IG overlay, end to end.

    python scripts/distill.py --flagfile=flags/quick.cfg

Under ``--workdir`` it writes the IG/logit store (built if missing, reused if its manifest
matches), ``student.h5``, ``student_<mode>.tflite`` with sidecar JSON, ``history.csv``,
with ``--qat_epochs``/``--prune_sparsity`` also ``student_qat_int8.tflite`` and
``student_pruned_<mode>.tflite``, and, last, ``results.json``. Every flag is optional;
defaults are the paper's settings.
A killed run resumes at its last finished epoch when started again with the same flags.
"""
import os

import kdig_tf  # noqa: F401
from absl import flags

from kdig_tf import cli
from kdig_tf import logs

FLAGS = flags.FLAGS

# Before the flags: defining them imports TensorFlow, whose start-up lines are hidden only if
# its log level is set first (so --verbose_logs is read from the command line here).
logs.quiet(show_banner=False)
cli.define_distill_flags(FLAGS)
logs.define_flags(FLAGS)


def main(argv):
    logs.quiet(FLAGS.verbose_logs)
    del argv
    from kdig_tf import pipeline, summary

    def run():
        config = cli.config_from_flags(FLAGS)
        results = pipeline.run_distillation(config, FLAGS.workdir)
        print(summary.text(results, FLAGS.workdir))
        print(f"{config.method}: val_accuracy={results['val_accuracy']:.2f}% on {config.val_split} "
              f"({results['trainable_params']:,} params, {results['compression']:.2f}x, "
              f"{results['train_seconds']:.0f}s) -> {os.path.join(FLAGS.workdir, pipeline.RESULTS)}")
    cli.run(run)


if __name__ == "__main__":
    cli.main(main)
