"""Overlay input pipeline throughput against the student's training throughput.

    nice -n 10 python benchmarks/pipeline_throughput.py --data_dir=/work/shared/tensorflow_datasets

Builds a small real store (a random-weight teacher and ``--ig_steps=1`` keep this cheap;
the store's content does not change the pipeline's cost) or reuses ``--store_dir``. Then,
in one process, it alternates full epochs of ``overlay.training_dataset`` with chunks of
``Distiller`` training steps on batches already in memory, so each side is timed alone
but under the same machine load. Goal: pipeline images/s >= 10 x training images/s, so
that the input pipeline costs the trainer at most ~10 % of the CPU.
"""
import os


import kdig_tf  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("store_dir", None, "Store to reuse; built there if it has no manifest. Default: a temp dir.")
flags.DEFINE_string("dataset", "cifar10", "tfds dataset for a new store.")
flags.DEFINE_string("split", "train[:2048]", "Split for a new store.")
flags.DEFINE_string("data_dir", None, "tfds data_dir (default: $TFDS_DATA_DIR).")
flags.DEFINE_integer("ig_steps", 1, "IG steps for a new store (1: cheap to build).")
flags.DEFINE_integer("examples_per_shard", 512, "Records per shard of a new store.")
flags.DEFINE_integer("batch_size", 64, "Batch size of the pipeline and of training.")
flags.DEFINE_float("p", 0.1, "Overlay probability.")
flags.DEFINE_integer("keep_blocks", 14, "Student size.")
flags.DEFINE_integer("repeats", 5, "Timed repetitions (one pipeline epoch + train_steps steps each).")
flags.DEFINE_integer("train_steps", 10, "Timed training steps per repetition.")
flags.DEFINE_integer("warmup_steps", 3, "Untimed training steps (tracing).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("output", "results/benchmarks/pipeline_throughput.json", "JSON output path.")


def main(argv):
    del argv
    from kdig_tf import cli
    cli.run(_run)


def _open_or_build_store(store_dir):
    from kdig_tf import records

    return records.open_or_build_random_store(store_dir, FLAGS.dataset, FLAGS.split, FLAGS.data_dir, FLAGS.ig_steps,
                                              FLAGS.examples_per_shard, FLAGS.seed)


def _run():
    import statistics
    import tempfile
    import time

    import tensorflow as tf
    import tf_keras as keras

    from kdig_tf import benchmark, distiller, models, overlay
    from kdig_tf import pipeline as kdig_pipeline
    from kdig_tf.errors import InvalidArgumentError
    from kdig_tf.io_utils import atomic_write_json

    if min(FLAGS.batch_size, FLAGS.repeats, FLAGS.train_steps) < 1 or FLAGS.warmup_steps < 0:
        raise InvalidArgumentError("batch_size, repeats and train_steps must be >= 1, warmup_steps >= 0")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="pipeline_bench_") as tmp:
        store, build_seconds = _open_or_build_store(FLAGS.store_dir or os.path.join(tmp, "store"))
        pipeline = overlay.training_dataset(store, FLAGS.batch_size, p=FLAGS.p, seed=FLAGS.seed)

        def time_epoch():
            images = 0
            start = time.perf_counter()
            for inputs, *_ in pipeline:
                images += int(inputs.shape[0])
            return images, time.perf_counter() - start

        # The first epoch also reads the shards and fills the record cache: reported, not in the median.
        first_images, first_seconds = time_epoch()

        keras.utils.set_random_seed(FLAGS.seed)
        student = models.build_student(FLAGS.keep_blocks)
        model = distiller.paper_distiller(None, student, alpha=0.01, temperature=2.5)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        # One real pipeline batch held in memory: training is timed without any input cost.
        full_batches = pipeline.filter(lambda x, *_: tf.shape(x)[0] == FLAGS.batch_size)
        batch = next(iter(kdig_pipeline.distiller_batches(full_batches)))
        in_memory = tf.data.Dataset.from_tensors(batch).repeat()
        if FLAGS.warmup_steps:
            model.fit(in_memory, steps_per_epoch=FLAGS.warmup_steps, epochs=1, verbose=0)

        def time_training():
            start = time.perf_counter()
            model.fit(in_memory, steps_per_epoch=FLAGS.train_steps, epochs=1, verbose=0)
            return FLAGS.train_steps * FLAGS.batch_size, time.perf_counter() - start

        pipeline_rates, train_rates = [], []
        for rep in range(FLAGS.repeats):
            images, seconds = time_epoch()
            pipeline_rates.append(images / seconds)
            images, seconds = time_training()
            train_rates.append(images / seconds)
            print(f"rep {rep}: pipeline {pipeline_rates[-1]:.0f} img/s, training {train_rates[-1]:.1f} img/s "
                  f"(ratio {pipeline_rates[-1] / train_rates[-1]:.1f})", flush=True)
        store_info = {"dir": FLAGS.store_dir, "num_examples": store.num_examples, "shards": len(store.files),
                      "map_encoding": store.map_encoding, "split": store.manifest["split"],
                      "ig_steps": store.manifest["ig"]["steps"], "build_seconds": build_seconds}
    load_end = os.getloadavg()

    pipeline_median = statistics.median(pipeline_rates)
    train_median = statistics.median(train_rates)
    result = {
        "store": store_info,
        "pipeline": {"batch_size": FLAGS.batch_size, "p": FLAGS.p, "images_per_epoch": first_images,
                     "first_epoch_images_per_second": first_images / first_seconds,
                     "images_per_second": pipeline_rates, "median_images_per_second": pipeline_median},
        "training": {"student": student.name, "keep_blocks": FLAGS.keep_blocks, "optimizer": "adam",
                     "cached_logits": True, "batch_size": FLAGS.batch_size, "steps_per_repetition": FLAGS.train_steps,
                     "warmup_steps": FLAGS.warmup_steps,
                     "images_per_second": train_rates, "median_images_per_second": train_median},
        "ratio_of_medians": pipeline_median / train_median,
        "median_paired_ratio": statistics.median(p / t for p, t in zip(pipeline_rates, train_rates)),
        "target_ratio": 10.0,
        "meets_target": pipeline_median / train_median >= 10.0,
        "repeats": FLAGS.repeats,
        "machine": dict(benchmark.environment(), load_average_start=list(load_start), load_average_end=list(load_end)),
    }
    atomic_write_json(FLAGS.output, result)
    print(f"pipeline {pipeline_median:.0f} img/s, training {train_median:.1f} img/s, "
          f"ratio {result['ratio_of_medians']:.1f} -> {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
