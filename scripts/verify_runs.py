"""Check that a campaign's saved students reproduce the numbers its tables report.

    python scripts/verify_runs.py --output_dir=results/cifar10_long --data_dir=../shared/tensorflow_datasets

Every finished run of the campaign in ``--output_dir`` (its ``runs.json``) has its
``student.h5`` loaded and evaluated, as ``scripts/evaluate.py`` does, on the split its
``results.json`` records; the accuracy must agree within ``--tolerance_points`` and the
trainable-parameter and example counts exactly. Writes ``verify.json`` there; exits 2
naming the runs that fail.
"""
import kdig_tf  # noqa: F401
from absl import flags

from kdig_tf import cli
from kdig_tf import logs

FLAGS = flags.FLAGS
logs.define_flags(FLAGS)

flags.DEFINE_string("output_dir", "results/ablation", "Campaign directory (the ablation's --output_dir).")
flags.DEFINE_string("data_dir", None, "tfds data_dir (default: each run's recorded --data_dir, then $TFDS_DATA_DIR).")
flags.DEFINE_float("tolerance_points", 0.1,
                   "Largest accepted accuracy difference in points (0.1 = 5 of 5,000 images), for kernels "
                   "and machines that round differently from the training run.")
flags.DEFINE_integer("batch_size", 256, "Evaluation batch size.")


def main(argv):
    logs.quiet(FLAGS.verbose_logs)
    del argv
    from evaluate import run_evaluation  # scripts/ is on sys.path when this script runs

    from kdig_tf import campaigns, cli

    def evaluate(weights, **kwargs):
        return run_evaluation(weights, batch_size=FLAGS.batch_size, **kwargs)

    report = cli.run(campaigns.verify_runs, FLAGS.output_dir, evaluate, data_dir=FLAGS.data_dir,
                     tolerance_points=FLAGS.tolerance_points)
    print(f"all {report['num_finished']} finished runs reproduce their results.json "
          f"({report['num_unfinished']} unfinished, not checked); wrote {FLAGS.output_dir}/{campaigns.VERIFY_FILE}")


if __name__ == "__main__":
    cli.main(main)
