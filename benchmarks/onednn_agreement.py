"""Do TensorFlow's oneDNN CPU kernels train the same function as its default (Eigen) kernels, and
how much faster are they here?

    python benchmarks/onednn_agreement.py

kdig_tf turns oneDNN on (``TF_ENABLE_ONEDNN_OPTS=1``) unless told otherwise. This benchmark is
the evidence for that default. Each measurement runs in its own process, because TensorFlow
reads the setting once:

* gradients of the cross-entropy of a freshly initialised student (``--keep_blocks``, seeded
  weights, batch-norm in training mode) on one fixed batch of random images and labels, in
  float32 with Eigen, in float32 with oneDNN, and in float64 as the reference (Eigen: oneDNN
  has no float64 kernels). Per trainable variable it reports ||g - g_ref|| / ||g_ref||. If both
  float32 backends sit at the same distance from the reference, they differ by round-off only;
  a backend that computed another function would stand out by orders of magnitude. Variables
  whose true gradient is zero (a batch-norm offset followed by a convolution and another
  batch-norm) have no meaningful relative error and are reported apart.
* images/s of an SGD train step on one in-memory batch (``--timing_batch_size``), median of
  ``--repeats`` runs of ``--timing_steps`` steps after ``--warmup_steps``, backends alternating.

JSON (atomic) goes to ``--output``.
"""
import json
import os
import subprocess
import sys
import tempfile

import kdig_tf  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("keep_blocks", 14, "Student size (14: the 4.1x student, 543,498 parameters).")
flags.DEFINE_integer("batch_size", 64, "Images in the gradient batch.")
flags.DEFINE_integer("timing_batch_size", 128, "Images per timed train step.")
flags.DEFINE_integer("timing_steps", 10, "Timed train steps per repetition.")
flags.DEFINE_integer("warmup_steps", 3, "Untimed train steps before each timing.")
flags.DEFINE_integer("repeats", 3, "Timings per backend (alternating between backends).")
flags.DEFINE_integer("seed", 0, "Seed of the weights, images and labels.")
flags.DEFINE_float("zero_gradient_fraction", 1e-4,
                   "A variable whose reference gradient norm is below this fraction of the median "
                   "variable's counts as having a zero true gradient.")
flags.DEFINE_string("output", "results/benchmarks/onednn_agreement.json", "JSON output path.")
flags.DEFINE_string("worker", None, "Internal: run one measurement (gradients or timing) and exit.")
flags.DEFINE_string("worker_output", None, "Internal: where a worker writes its result.")

BACKENDS = {"eigen": "0", "onednn": "1"}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from kdig_tf import cli
    cli.run(_work if FLAGS.worker else _run)


def _student(dtype):
    import numpy as np
    import tf_keras as keras

    from kdig_tf import models

    keras.utils.set_random_seed(FLAGS.seed)
    weights = models.build_student(keep_blocks=FLAGS.keep_blocks).get_weights()
    if dtype == "float64":
        keras.backend.set_floatx("float64")  # the same weights, built again in float64
    student = models.build_student(keep_blocks=FLAGS.keep_blocks)
    student.set_weights([np.asarray(value, dtype) for value in weights])
    return student


def _batch(batch_size, dtype):
    import numpy as np

    rng = np.random.RandomState(FLAGS.seed)
    images = rng.rand(batch_size, 32, 32, 3).astype("float32").astype(dtype)  # float64 sees the same values
    return images, rng.randint(0, 10, batch_size)


def _work():
    """One measurement in this process: ``gradients:<dtype>`` or ``timing``."""
    import time

    import numpy as np
    import tensorflow as tf
    import tf_keras as keras

    from kdig_tf import benchmark

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if FLAGS.worker.startswith("gradients:"):
        dtype = FLAGS.worker.split(":", 1)[1]
        student = _student(dtype)
        images, labels = _batch(FLAGS.batch_size, dtype)
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, student(images, training=True))
        gradients = tape.gradient(loss, student.trainable_variables)
        np.savez(FLAGS.worker_output, loss=loss.numpy(),
                 **{f"{index:04d}:{variable.name}": gradient.numpy()
                    for index, (variable, gradient) in enumerate(zip(student.trainable_variables, gradients))})
        return
    student = _student("float32")
    images, labels = (tf.constant(value) for value in _batch(FLAGS.timing_batch_size, "float32"))
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, student(images, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, student.trainable_variables),
                                      student.trainable_variables))
        return loss

    for _ in range(FLAGS.warmup_steps):
        train_step().numpy()
    with benchmark.CpuCompetition() as competition:
        started = time.perf_counter()
        for _ in range(FLAGS.timing_steps):
            loss = train_step()
        loss.numpy()  # wait for the last step
        seconds = time.perf_counter() - started
    with open(FLAGS.worker_output, "w") as handle:
        json.dump({"images_per_second": FLAGS.timing_steps * FLAGS.timing_batch_size / seconds,
                   "tensorflow_onednn": benchmark.tensorflow_onednn(),
                   "competition": competition.summary()}, handle)


def _worker(kind, backend, output):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=BACKENDS[backend])
    flag_names = ("keep_blocks", "batch_size", "timing_batch_size", "timing_steps", "warmup_steps", "seed")
    command = [sys.executable, os.path.abspath(__file__), f"--worker={kind}", f"--worker_output={output}",
               *(f"--{name}={getattr(FLAGS, name)}" for name in flag_names)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} worker ({backend}) failed:\n{result.stderr[-3000:]}")


def _relative_errors(reference, measured, zero_fraction):
    """{name: relative error}, and the names whose reference gradient is (numerically) zero."""
    import numpy as np

    names = [name for name in reference.files if name != "loss"]
    if sorted(names) != sorted(name for name in measured.files if name != "loss"):
        raise RuntimeError("the workers' students have different variables")
    norms = {name: float(np.linalg.norm(reference[name])) for name in names}
    floor = zero_fraction * float(np.median(list(norms.values())))
    zero = sorted(name for name in names if norms[name] < floor)
    errors = {name: float(np.linalg.norm(measured[name] - reference[name]) / norms[name])
              for name in names if name not in zero}
    return errors, zero


def _summary(values):
    import numpy as np

    values = np.asarray(values)
    return {"median": float(np.median(values)), "max": float(values.max()), "count": int(values.size)}


def _run():
    import numpy as np

    from kdig_tf import benchmark
    from kdig_tf.io_utils import atomic_write_json

    with tempfile.TemporaryDirectory() as scratch:
        paths = {}
        for name, backend, dtype in (("float64", "eigen", "float64"), ("eigen", "eigen", "float32"),
                                     ("onednn", "onednn", "float32")):
            paths[name] = os.path.join(scratch, f"{name}.npz")
            _worker(f"gradients:{dtype}", backend, paths[name])
            print(f"gradients: {name} done", flush=True)
        loaded = {name: np.load(path) for name, path in paths.items()}
        errors, zero = {}, None
        for backend in BACKENDS:
            errors[backend], zero = _relative_errors(loaded["float64"], loaded[backend], FLAGS.zero_gradient_fraction)
        losses = {name: float(values["loss"]) for name, values in loaded.items()}

        timings = {backend: [] for backend in BACKENDS}
        for repeat in range(FLAGS.repeats):
            order = list(BACKENDS) if repeat % 2 == 0 else list(BACKENDS)[::-1]
            for backend in order:
                path = os.path.join(scratch, f"timing_{backend}_{repeat}.json")
                _worker("timing", backend, path)
                with open(path) as handle:
                    timings[backend].append(json.load(handle))
                print(f"timing {repeat + 1}/{FLAGS.repeats} {backend}: "
                      f"{timings[backend][-1]['images_per_second']:.1f} img/s", flush=True)

    kernels = [name for name in errors["eigen"] if "kernel" in name.split(":", 1)[1]]
    speeds = {backend: float(np.median([entry["images_per_second"] for entry in timings[backend]]))
              for backend in BACKENDS}
    result = {
        "command": " ".join(sys.argv),
        "what": "float32 gradients of the student's cross-entropy vs a float64 reference; SGD train-step img/s",
        "settings": {name: getattr(FLAGS, name) for name in ("keep_blocks", "batch_size", "timing_batch_size",
                                                             "timing_steps", "warmup_steps", "repeats", "seed",
                                                             "zero_gradient_fraction")},
        "loss": losses,
        "relative_gradient_error": {
            backend: {"all": _summary(list(errors[backend].values())),
                      "kernels": _summary([errors[backend][name] for name in kernels]),
                      "per_variable": errors[backend]} for backend in BACKENDS},
        "zero_true_gradient_variables": zero,
        "onednn_over_eigen_median_error": (_summary(list(errors["onednn"].values()))["median"]
                                           / _summary(list(errors["eigen"].values()))["median"]),
        "timing": {backend: {"median_images_per_second": speeds[backend], "runs": timings[backend]}
                   for backend in BACKENDS},
        "onednn_speedup": speeds["onednn"] / speeds["eigen"],
        "machine": benchmark.environment(),
    }
    atomic_write_json(FLAGS.output, result)
    for backend in BACKENDS:
        summary = result["relative_gradient_error"][backend]["all"]
        print(f"{backend}: gradient error vs float64 median {summary['median']:.2e}, max {summary['max']:.2e}; "
              f"{speeds[backend]:.1f} img/s", flush=True)
    print(f"oneDNN: {result['onednn_speedup']:.2f}x the img/s of Eigen, "
          f"{result['onednn_over_eigen_median_error']:.2f}x its median gradient error -> {FLAGS.output}", flush=True)
    busy = [entry["competition"] for runs in timings.values() for entry in runs
            if benchmark.machine_was_busy(entry["competition"])]
    if busy:
        print(f"warning: {benchmark.competition_text(busy[0], 'timings')} in {len(busy)} of "
              f"{2 * FLAGS.repeats} timings: the img/s are not those of a quiet machine", flush=True)


if __name__ == "__main__":
    app.run(main)
