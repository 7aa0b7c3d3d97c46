"""What a teacher costs: training img/s, and its forward pass per image against the 4.1x student's.

    python benchmarks/teacher_cost.py --teacher=pretrained/teacher_speedrun.keras

Online KD runs the teacher forward on every training batch, so its forward cost (per image, in
inference mode, at the training batch size) is what consistent teaching adds to each step. For
the speedrun teacher, the paper's MobileNetV2 teacher and the 4.1x student it measures, under
each ``--precisions`` policy: parameters, MACs, forward img/s and train-step img/s (random
images; the cost of a step does not depend on the pixels). Each figure is the median of
``--repeats`` timed chunks, and the machine's competition for the CPU is recorded: run it on an
idle machine. Writes ``--output`` (JSON) and the same table as Markdown next to it.
"""
import kdig_tf  # noqa: F401
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("teacher", None, "A speedrun teacher file (.keras); default: an untrained one from the recipe.")
flags.DEFINE_list("precisions", ["float32", "mixed_bfloat16"], "Keras mixed-precision policies to time.")
flags.DEFINE_integer("batch_size", 256, "Batch size of the forward and training steps.")
flags.DEFINE_integer("steps", 4, "Timed steps per chunk.")
flags.DEFINE_integer("repeats", 3, "Timed chunks per figure (the median is reported).")
flags.DEFINE_string("output", "results/benchmarks/teacher_cost.json", "JSON output path.")


def main(argv):
    del argv
    from kdig_tf import cli
    cli.run(_run)


def _models(precision):
    """{name: core network} built under ``precision`` (weights copied from --teacher when given)."""
    import tf_keras as keras

    from kdig_tf import models, teacher_recipe
    from kdig_tf.distribute import precision_policy

    with precision_policy(precision):
        speedrun = teacher_recipe.build_core(teacher_recipe.TeacherRecipe(), 10, (32, 32, 3))
        built = {"speedrun_teacher": speedrun,
                 "mobilenetv2_teacher": models.build_teacher(),
                 "student_4.1x": models.build_student(keep_blocks=14)}
    if FLAGS.teacher:
        trained, _ = models.split_preprocessing(keras.models.load_model(FLAGS.teacher, compile=False))
        if [w.shape for w in trained.weights] != [w.shape for w in speedrun.weights]:
            from kdig_tf.errors import ShapeMismatchError
            raise ShapeMismatchError(f"{FLAGS.teacher} is not the recipe's default speedrun architecture")
        speedrun.set_weights(trained.get_weights())
    return built


def _median_rate(function, images_per_call):
    import statistics
    import time

    function()  # trace and warm up
    rates = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        for _ in range(FLAGS.steps):
            function()
        rates.append(FLAGS.steps * images_per_call / (time.perf_counter() - start))
    return statistics.median(rates)


def _measure(model):
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    from kdig_tf import benchmark, models

    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(FLAGS.batch_size, 32, 32, 3)).astype(np.float32))
    labels = tf.constant(rng.integers(0, 10, FLAGS.batch_size))
    forward = tf.function(lambda: model(images, training=False))
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, tf.cast(model(images, training=True), tf.float32))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    return {"params": models.count_trainable_params(model), "macs": benchmark.count_macs(model),
            "forward_images_per_second": _median_rate(lambda: forward().numpy(), FLAGS.batch_size),
            "train_images_per_second": _median_rate(lambda: train_step(), FLAGS.batch_size)}


def _run():
    import os

    from kdig_tf import benchmark
    from kdig_tf.errors import InvalidArgumentError
    from kdig_tf.io_utils import atomic_write_bytes, atomic_write_json
    from kdig_tf.distribute import PRECISIONS

    if FLAGS.batch_size < 1 or FLAGS.steps < 1 or FLAGS.repeats < 1:
        raise InvalidArgumentError("batch_size, steps and repeats must be >= 1")
    unknown = [p for p in FLAGS.precisions if p not in PRECISIONS]
    if unknown:
        raise InvalidArgumentError(f"unknown precision {unknown}; known: {PRECISIONS}")
    rows = []
    with benchmark.CpuCompetition() as competition:
        for precision in FLAGS.precisions:
            for name, model in _models(precision).items():
                row = {"model": name, "precision": precision, **_measure(model)}
                print(f"{name:20s} {precision:15s} forward {row['forward_images_per_second']:8.1f} img/s  "
                      f"train {row['train_images_per_second']:7.1f} img/s", flush=True)
                rows.append(row)
    for row in rows:
        student = next(r for r in rows if r["model"] == "student_4.1x" and r["precision"] == row["precision"])
        row["forward_cost_vs_student"] = student["forward_images_per_second"] / row["forward_images_per_second"]
        row["macs_vs_student"] = row["macs"] / student["macs"]
    report = {"batch_size": FLAGS.batch_size, "teacher_file": FLAGS.teacher, "rows": rows,
              "competition": competition.summary(), "environment": benchmark.environment(),
              "note": ("forward_cost_vs_student: the model's forward time per image over the 4.1x student's, "
                       "same precision; online KD adds the teacher's forward to every training step.")}
    atomic_write_json(FLAGS.output, report)
    lines = ["| model | precision | params | MACs (M) | forward img/s | train img/s | forward cost vs student |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['precision']} | {r['params']:,} | {r['macs'] / 1e6:.1f} | "
              f"{r['forward_images_per_second']:.1f} | {r['train_images_per_second']:.1f} | "
              f"{r['forward_cost_vs_student']:.2f}x |" for r in rows]
    clause = benchmark.competition_text(competition.summary())
    lines += ["", f"CPU: {report['environment']['cpu_model']}" + (f"; {clause}" if clause else "")]
    atomic_write_bytes(os.path.splitext(FLAGS.output)[0] + ".md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    from kdig_tf import cli

    cli.main(main)
