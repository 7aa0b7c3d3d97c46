"""IG path throughput against the teacher's plain forward+backward throughput.

    nice -n 10 python benchmarks/ig_throughput.py --output=results/benchmarks/ig_throughput.json

Both are measured in one process on the real teacher architecture (random weights) with
random 32x32 inputs. A "point" is one image through forward and backward to the input.
Repetitions are interleaved (fwd+bwd, IG, fwd+bwd, IG, ...) so that a change in machine
load hits both sides alike; medians and the median of the per-repetition ratios are
reported. Goal: IG points/s >= 0.9 x forward+backward points/s.
"""
import os


import kdig_tf  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("max_batch", 256, "Points per fwd+bwd call, and IG's max_batch.")
flags.DEFINE_integer("steps", 50, "IG quadrature steps.")
flags.DEFINE_integer("ig_images", 16, "Images per IG call (ig_images * steps points).")
flags.DEFINE_integer("warmup", 2, "Untimed calls of each side (tracing, allocator warm-up).")
flags.DEFINE_integer("repeats", 7, "Timed, interleaved repetitions of each side.")
flags.DEFINE_integer("seed", 0, "Seed for the weights and inputs.")
flags.DEFINE_string("output", "results/benchmarks/ig_throughput.json", "JSON output path.")


def main(argv):
    del argv
    from kdig_tf import cli
    cli.run(_run)


def _run():
    import statistics
    import time

    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    from kdig_tf import attribution, benchmark, models
    from kdig_tf.errors import InvalidArgumentError
    from kdig_tf.io_utils import atomic_write_json

    if min(FLAGS.max_batch, FLAGS.steps, FLAGS.ig_images, FLAGS.repeats) < 1 or FLAGS.warmup < 0:
        raise InvalidArgumentError("max_batch, steps, ig_images and repeats must be >= 1, warmup >= 0")
    load_start = os.getloadavg()
    keras.utils.set_random_seed(FLAGS.seed)
    teacher = models.build_teacher()
    num_classes = teacher.output_shape[-1]
    rng = np.random.default_rng(FLAGS.seed)

    fb_inputs = tf.constant(rng.standard_normal((FLAGS.max_batch, 32, 32, 3)), tf.float32)
    fb_targets = tf.constant(rng.integers(0, num_classes, FLAGS.max_batch), tf.int32)

    @tf.function
    def forward_backward(inputs, targets):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            logits = teacher(inputs, training=False)
            scores = tf.gather(logits, targets, axis=1, batch_dims=1)
        return tape.gradient(scores, inputs)

    ig = attribution.IntegratedGradients(teacher, steps=FLAGS.steps, max_batch=FLAGS.max_batch)
    ig_inputs = tf.constant(rng.standard_normal((FLAGS.ig_images, 32, 32, 3)), tf.float32)
    ig_targets = tf.constant(rng.integers(0, num_classes, FLAGS.ig_images), tf.int32)
    ig_points = FLAGS.ig_images * FLAGS.steps
    # About as many fwd+bwd points per repetition as one IG call, so both sides see the same load.
    fb_calls = max(1, round(ig_points / FLAGS.max_batch))
    fb_points = fb_calls * FLAGS.max_batch

    def time_forward_backward():
        start = time.perf_counter()
        for _ in range(fb_calls):
            grads = forward_backward(fb_inputs, fb_targets)
        grads.numpy()  # wait for the result
        return time.perf_counter() - start

    def time_ig():
        start = time.perf_counter()
        result = ig(ig_inputs, ig_targets)
        result.attributions.numpy()
        return time.perf_counter() - start

    for _ in range(FLAGS.warmup):
        time_forward_backward()
        time_ig()
    fb_rates, ig_rates = [], []
    for rep in range(FLAGS.repeats):
        # Alternate which side goes first, so neither always follows the other.
        order = (("fb", time_forward_backward), ("ig", time_ig))
        for side, timer in (order if rep % 2 == 0 else order[::-1]):
            seconds = timer()
            if side == "fb":
                fb_rates.append(fb_points / seconds)
            else:
                ig_rates.append(ig_points / seconds)
        print(f"rep {rep}: fwd+bwd {fb_rates[-1]:.1f} points/s, IG {ig_rates[-1]:.1f} points/s "
              f"(ratio {ig_rates[-1] / fb_rates[-1]:.3f})", flush=True)
    load_end = os.getloadavg()

    fb_median = statistics.median(fb_rates)
    ig_median = statistics.median(ig_rates)
    paired = [i / f for i, f in zip(ig_rates, fb_rates)]
    result = {
        "forward_backward": {"points_per_call": FLAGS.max_batch, "calls_per_repetition": fb_calls,
                             "points_per_second": fb_rates, "median_points_per_second": fb_median},
        "integrated_gradients": {"images_per_call": FLAGS.ig_images, "steps": FLAGS.steps,
                                 "max_batch": FLAGS.max_batch, "points_per_call": ig_points,
                                 "gradient_traces": ig._weighted_gradients.experimental_get_tracing_count(),
                                 "points_per_second": ig_rates, "median_points_per_second": ig_median,
                                 "median_images_per_second": ig_median / FLAGS.steps},
        "ratio_of_medians": ig_median / fb_median,
        "median_paired_ratio": statistics.median(paired),
        "paired_ratios": paired,
        "target_ratio": 0.9,
        "meets_target": ig_median / fb_median >= 0.9,
        "warmup_calls": FLAGS.warmup, "repeats": FLAGS.repeats,
        "machine": dict(benchmark.environment(), load_average_start=list(load_start), load_average_end=list(load_end)),
    }
    atomic_write_json(FLAGS.output, result)
    print(f"fwd+bwd {fb_median:.1f} points/s, IG {ig_median:.1f} points/s, ratio {result['ratio_of_medians']:.3f} "
          f"(paired {result['median_paired_ratio']:.3f}) -> {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
