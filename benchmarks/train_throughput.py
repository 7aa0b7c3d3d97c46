"""Training throughput of the student fed by the real input pipelines, against batches in memory.

    python benchmarks/train_throughput.py --data_dir=../shared/tensorflow_datasets

For each batch size in ``--batch_sizes`` it times the ``Distiller`` train step of the 4.1x
student (``--keep_blocks=14``) with the long-study recipe (SGD, Nesterov momentum 0.9,
learning rate 0.1 x batch/128, decoupled weight decay 5e-4, the paper's loss with alpha 0.01, T 2.5 on the
store's cached logits), in two ways:

(a) ``in_memory``: one real batch of the pipeline, held in memory and repeated: the train
    step alone, without any input cost;
(b) ``pipeline``: ``model.fit`` fed by the real store pipeline,
    ``overlay.training_dataset(store, batch, p=0.1, seed, epochs)``, the IG overlay on, as
    ``pipeline.run_distillation`` feeds it.

The same pair is measured for the ``student`` method (alpha 0, no store):
``pipeline.plain_training_dataset`` over the store's tfds split. Within a repetition the four
measurements run one after the other (kd_ig in memory, kd_ig pipeline, student in memory,
student pipeline; reversed in odd repetitions), so each pair sees the same machine load. The
reported ratio is median(pipeline) / median(in memory); the target is 0.9 (the input
pipeline costs the trainer at most 10 %). ``chosen`` names the batch size with the best
kd_ig pipeline images/s among those meeting the target (among all if none does).

Timing: each measurement is one ``fit`` call of ``--warmup_steps + --steps`` steps, on a
fresh iterator of its dataset; a callback times the last ``--steps`` steps, and
``fit_seconds`` reports the whole call (iterator creation and warm-up included). Each model
traces its train function once, before the repetitions; the in-memory batch is given the
pipeline's element spec, so both sides run the same traced function. Warm-up steps let the
pipeline's prefetch buffer fill, which favours (b) by at most a few batches over ``--steps``;
and the timed steps cross an epoch boundary (a refill of the shuffle buffer) only when
warm-up and timed steps together exceed an epoch's batches. Use more steps for final numbers, on an idle machine.

With ``--precision=mixed_float16|mixed_bfloat16`` each repetition also times the in-memory train
step of a student built under that Keras policy (logits and losses in float32, loss scaling for
float16), and each arm reports ``precision.ratio_vs_float32`` = median(policy in-memory) /
median(float32 in-memory) images/s. On a CPU this is measured, not promised: bfloat16 kernels
may be no faster than float32.

The store is reused from ``--store_dir`` if it has a manifest, else built there (or in a
temporary directory) from ``--split`` with a random-weight teacher and ``--ig_steps=1``,
which keeps it cheap: the store's content does not change the pipeline's cost.
"""
import os
import sys


import kdig_tf  # noqa: F401
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("store_dir", None, "Store to reuse; built there if it has no manifest. Default: a temp dir.")
flags.DEFINE_string("dataset", "cifar10", "tfds dataset for a new store.")
flags.DEFINE_string("split", "train[:4096]", "Split for a new store (the student arm reads the store's split).")
flags.DEFINE_string("data_dir", None, "tfds data_dir (default: $TFDS_DATA_DIR).")
flags.DEFINE_integer("ig_steps", 1, "IG steps for a new store (1: cheap to build).")
flags.DEFINE_integer("examples_per_shard", 1024, "Records per shard of a new store.")
flags.DEFINE_list("batch_sizes", ["64", "128", "256"], "Batch sizes to measure.")
flags.DEFINE_float("p", 0.1, "Overlay probability of the kd_ig pipeline.")
flags.DEFINE_integer("keep_blocks", 14, "Student size (14: the 4.1x student, 543,498 parameters).")
flags.DEFINE_float("base_learning_rate", 0.1, "SGD learning rate at batch 128 (scaled linearly with the batch).")
flags.DEFINE_float("weight_decay", 5e-4, "Decoupled weight decay of SGD.")
flags.DEFINE_float("alpha", 0.01, "KD weight of the kd_ig arm.")
flags.DEFINE_float("temperature", 2.5, "KD temperature.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (each: the four measurements, one after the other).")
flags.DEFINE_integer("steps", 30, "Timed training steps per measurement.")
flags.DEFINE_integer("warmup_steps", 3, "Untimed steps at the start of each measurement.")
flags.DEFINE_float("target_ratio", 0.9, "Goal: pipeline images/s >= target_ratio x in-memory images/s.")
flags.DEFINE_integer("intra_op_threads", 0, "TensorFlow intra-op threads (0: TF default).")
flags.DEFINE_integer("inter_op_threads", 0, "TensorFlow inter-op threads (0: TF default).")
flags.DEFINE_string("recipe_note", "", "Free text recorded in the JSON (e.g. what this run is for).")
flags.DEFINE_integer("seed", 0, "Seed of the weights, the store's teacher and the pipelines.")
flags.DEFINE_string("output", "results/benchmarks/train_throughput.json", "JSON output path.")
flags.DEFINE_string("precision", "float32", "float32, or a mixed policy (mixed_float16, mixed_bfloat16) whose "
                    "in-memory train step is also timed and compared with float32's.")

BASE_BATCH = 128
ARMS = ("kd_ig", "student")
SIDES = ("in_memory", "pipeline")
PRECISION_SIDE = "in_memory_precision"  # the in-memory step of the student built under --precision


def main(argv):
    del argv
    from kdig_tf import cli
    cli.run(_run)


def batch_sizes_in(first_batch, count, num_examples, batch_size):
    """Images in batches ``first_batch .. first_batch+count-1`` of back-to-back epochs of
    ``num_examples`` (each epoch's last batch is partial unless the batch size divides it)."""
    per_epoch = -(-num_examples // batch_size)
    last = num_examples - (per_epoch - 1) * batch_size
    return sum(last if index % per_epoch == per_epoch - 1 else batch_size
               for index in range(first_batch, first_batch + count))


def _parse_batch_sizes(values):
    from kdig_tf.errors import InvalidArgumentError

    try:
        sizes = [int(value) for value in values]
    except ValueError as err:
        raise InvalidArgumentError(f"--batch_sizes must be integers, got {values}") from err
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise InvalidArgumentError(f"--batch_sizes must be distinct positive integers, got {values}")
    return sizes


def _apply_threads(tf):
    """Set TF's thread pools from the flags; must run before TensorFlow executes anything."""
    from kdig_tf.errors import InvalidArgumentError

    if FLAGS.intra_op_threads < 0 or FLAGS.inter_op_threads < 0:
        raise InvalidArgumentError("--intra_op_threads and --inter_op_threads must be >= 0 (0: TF default)")
    try:
        if FLAGS.intra_op_threads:
            tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op_threads)
        if FLAGS.inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(FLAGS.inter_op_threads)
    except RuntimeError as err:
        raise InvalidArgumentError(f"thread settings must be applied before TensorFlow runs: {err}") from err
    return {"intra_op_threads_flag": FLAGS.intra_op_threads, "inter_op_threads_flag": FLAGS.inter_op_threads,
            "intra_op_parallelism_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_parallelism_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "note": "0 = TensorFlow's default (one thread per core); tf.data uses its own pool"}


def _open_or_build_store(store_dir):
    from kdig_tf import records

    return records.open_or_build_random_store(store_dir, FLAGS.dataset, FLAGS.split, FLAGS.data_dir, FLAGS.ig_steps,
                                              FLAGS.examples_per_shard, FLAGS.seed)


def _run():
    import shlex
    import tempfile

    import tensorflow as tf

    threads = _apply_threads(tf)  # before anything else touches TensorFlow

    from kdig_tf import benchmark, models
    from kdig_tf.errors import InvalidArgumentError
    from kdig_tf.io_utils import atomic_write_json

    batch_sizes = _parse_batch_sizes(FLAGS.batch_sizes)
    if min(FLAGS.repeats, FLAGS.steps) < 1 or FLAGS.warmup_steps < 0:
        raise InvalidArgumentError("--repeats and --steps must be >= 1, --warmup_steps >= 0")
    if FLAGS.target_ratio <= 0:
        raise InvalidArgumentError(f"--target_ratio must be > 0, got {FLAGS.target_ratio}")
    models.resolve_keep_blocks(FLAGS.keep_blocks)
    from kdig_tf import distribute
    distribute.check_precision(FLAGS.precision)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        store, build_seconds = _open_or_build_store(FLAGS.store_dir or os.path.join(tmp, "store"))
        if store.num_examples < max(batch_sizes):
            raise InvalidArgumentError(f"the store holds {store.num_examples} examples, fewer than the largest "
                                       f"batch size {max(batch_sizes)}")
        # Other processes' CPU during the measurements says whether the img/s are those of a quiet machine.
        with benchmark.CpuCompetition() as competition:
            rows = [_measure_batch_size(store, batch_size) for batch_size in batch_sizes]
        store_info = {"dir": FLAGS.store_dir, "dataset": store.manifest["dataset"], "split": store.manifest["split"],
                      "num_examples": store.num_examples, "shards": len(store.files),
                      "map_encoding": store.map_encoding,
                      "ig_steps": (store.manifest.get("ig") or {}).get("steps"), "build_seconds": build_seconds}
    load_end = os.getloadavg()

    result = {
        "command": shlex.join(["python", *sys.argv]),
        "recipe": {"student_keep_blocks": FLAGS.keep_blocks, "student_params": rows[0]["student_params"],
                   "optimizer": "sgd", "momentum": 0.9, "nesterov": True,
                   "learning_rate": f"{FLAGS.base_learning_rate} x batch/{BASE_BATCH}",
                   "weight_decay": FLAGS.weight_decay, "kd_ig": {"alpha": FLAGS.alpha, "temperature": FLAGS.temperature,
                                                                 "p": FLAGS.p, "cached_logits": True},
                   "student": {"alpha": 0.0, "p": 0.0, "input": "pipeline.plain_training_dataset (tfds, no store)"}},
        "recipe_note": FLAGS.recipe_note,
        "precision": FLAGS.precision,
        "store": store_info,
        "protocol": {"repeats": FLAGS.repeats, "steps": FLAGS.steps, "warmup_steps": FLAGS.warmup_steps,
                     "order_in_repetition": {"even": [f"{arm}/{side}" for arm, side in _order(0)],
                                             "odd": [f"{arm}/{side}" for arm, side in _order(1)]},
                     "images_per_second": "images of the last --steps steps of one fit call / their wall time",
                     "ratio": "median(pipeline) / median(in_memory)", "seed": FLAGS.seed},
        "target_ratio": FLAGS.target_ratio,
        "batch_sizes": rows,
        "chosen": _choose(rows, "kd_ig"),
        "student_chosen": _choose(rows, "student"),
        "threads": threads,
        "machine": dict(benchmark.environment(), tf_enable_onednn_opts=os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
                        load_average_start=[round(value, 2) for value in load_start],
                        load_average_end=[round(value, 2) for value in load_end],
                        measurement_competition=competition.summary()),
    }
    atomic_write_json(FLAGS.output, result)
    for row in rows:
        print(f"batch {row['batch_size']}: " + "; ".join(
            f"{arm} in-memory {row[arm]['in_memory']['median_images_per_second']:.1f} img/s, pipeline "
            f"{row[arm]['pipeline']['median_images_per_second']:.1f} img/s, ratio {row[arm]['ratio']:.3f}"
            for arm in ARMS))
        if FLAGS.precision != "float32":
            print(f"batch {row['batch_size']}: {FLAGS.precision} in-memory img/s vs float32: " + "; ".join(
                f"{arm} {row[arm]['precision']['ratio_vs_float32']:.3f}x" for arm in ARMS))
    if benchmark.machine_was_busy(competition.summary()):
        print(f"warning: {benchmark.competition_text(competition.summary())}: the img/s are not those of a quiet "
              "machine (ratios are less affected)", flush=True)
    chosen = result["chosen"]
    print(f"chosen batch size {chosen['batch_size']} ({chosen['pipeline_median_images_per_second']:.1f} img/s, "
          f"ratio {chosen['ratio']:.3f}, meets target: {chosen['meets_target']}) -> {FLAGS.output}", flush=True)


def _choose(rows, arm):
    """The batch size with the best pipeline images/s among those meeting the target (else among all)."""
    meeting = [row for row in rows if row[arm]["meets_target"]]
    best = max(meeting or rows, key=lambda row: row[arm]["pipeline"]["median_images_per_second"])
    return {"arm": arm, "batch_size": best["batch_size"], "learning_rate": best["learning_rate"],
            "pipeline_median_images_per_second": best[arm]["pipeline"]["median_images_per_second"],
            "ratio": best[arm]["ratio"], "meets_target": best[arm]["meets_target"],
            "rule": "best pipeline median images/s among the batch sizes meeting the target" if meeting else
                    "no batch size meets the target: best pipeline median images/s among all"}


def _same_spec_repeated(batch, element_spec):
    """``batch`` repeated forever, with ``element_spec``'s (unknown) batch dimension, so that the
    model runs the very function it traced for the pipeline."""
    import tensorflow as tf

    def relax(*element):
        return tf.nest.map_structure(lambda tensor, spec: tf.compat.v1.placeholder_with_default(tensor, spec.shape),
                                     element, element_spec)
    return tf.data.Dataset.from_tensors(tuple(batch)).repeat().map(relax)


def _sides():
    """SIDES, plus the in-memory step under --precision when it is not float32."""
    return SIDES + ((PRECISION_SIDE,) if FLAGS.precision != "float32" else ())


def _order(rep):
    """The measurements of repetition ``rep``: even ones in ARMS x sides order, odd ones reversed
    (A B C D, D C B A, ...), so a steady drift in machine load favours no side."""
    order = [(arm, side) for arm in ARMS for side in _sides()]
    return order if rep % 2 == 0 else order[::-1]


def _tracing_count(model):
    counter = getattr(model.train_function, "experimental_get_tracing_count", None)
    return None if counter is None else counter()


def _step_timer(warmup):
    """A Keras callback timing the steps after ``warmup`` (from the end of the last warm-up step)."""
    import time

    import tf_keras as keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self._supports_tf_logs = True  # no numpy conversion of the logs between steps

        def on_train_begin(self, logs=None):
            self.fit_start = self.timed_start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            if batch == warmup - 1:
                self.timed_start = now
            self.last = now

        def on_train_end(self, logs=None):
            self.fit_seconds = time.perf_counter() - self.fit_start

    return StepTimer()


def _measure_batch_size(store, batch_size):
    import math
    import statistics
    import time

    import tf_keras as keras

    from kdig_tf import data, distiller, distribute, models, overlay, pipeline
    from kdig_tf.errors import InvalidArgumentError

    learning_rate = FLAGS.base_learning_rate * batch_size / BASE_BATCH
    total_steps = FLAGS.warmup_steps + FLAGS.steps
    raw_train, _ = data.load(store.manifest["dataset"], store.manifest["split"], FLAGS.data_dir)
    num_plain = data.count_examples(raw_train)
    if num_plain < batch_size:
        raise InvalidArgumentError(f"split {store.manifest['split']} holds {num_plain} examples, fewer than "
                                   f"batch size {batch_size}")
    # Enough epochs for one measurement: each fit call starts a fresh iterator at epoch 0.
    epochs = {"kd_ig": math.ceil(total_steps / math.ceil(store.num_examples / batch_size)),
              "student": math.ceil(total_steps / math.ceil(num_plain / batch_size))}
    num_examples = {"kd_ig": store.num_examples, "student": num_plain}
    pipelines = {
        "kd_ig": overlay.training_dataset(store, batch_size, p=FLAGS.p, seed=FLAGS.seed, epochs=epochs["kd_ig"]),
        "student": pipeline.plain_training_dataset(raw_train, batch_size, FLAGS.seed, epochs=epochs["student"]),
    }
    pipelines = {arm: pipeline.distiller_batches(ds) for arm, ds in pipelines.items()}
    alphas = {"kd_ig": FLAGS.alpha, "student": 0.0}
    setups = {}
    for arm in ARMS:
        first = next(iter(pipelines[arm]))  # a full batch: the store holds >= batch_size examples
        in_memory = _same_spec_repeated(first, pipelines[arm].element_spec)
        def traced_model(precision):
            keras.utils.set_random_seed(FLAGS.seed)
            with distribute.precision_policy(precision):
                student = models.build_student(FLAGS.keep_blocks, num_classes=store.num_classes)
                model = distiller.paper_distiller(None, student, alphas[arm], FLAGS.temperature)
            model.compile(optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True,
                                                         weight_decay=FLAGS.weight_decay))
            model.fit(in_memory, steps_per_epoch=1, epochs=1, verbose=0)  # traces the train function
            return model

        start = time.perf_counter()
        model = traced_model("float32")
        setups[arm] = {"model": model, "in_memory": in_memory, "trace_seconds": time.perf_counter() - start,
                       "traces": _tracing_count(model)}
        if FLAGS.precision != "float32":
            setups[arm]["precision_model"] = traced_model(FLAGS.precision)

    def measure(arm, side):
        dataset = pipelines[arm] if side == "pipeline" else setups[arm]["in_memory"]
        model = setups[arm]["precision_model" if side == PRECISION_SIDE else "model"]
        timer = _step_timer(FLAGS.warmup_steps)
        model.fit(dataset, steps_per_epoch=total_steps, epochs=1, verbose=0, callbacks=[timer])
        images = FLAGS.steps * batch_size if side != "pipeline" else \
            batch_sizes_in(FLAGS.warmup_steps, FLAGS.steps, num_examples[arm], batch_size)
        return images / (timer.last - timer.timed_start), timer.fit_seconds

    rates = {arm: {side: [] for side in _sides()} for arm in ARMS}
    fit_seconds = {arm: {side: [] for side in _sides()} for arm in ARMS}
    for rep in range(FLAGS.repeats):
        for arm, side in _order(rep):
            rate, seconds = measure(arm, side)
            rates[arm][side].append(rate)
            fit_seconds[arm][side].append(seconds)
        print(f"batch {batch_size} rep {rep}: " + "; ".join(
            f"{arm} in-memory {rates[arm]['in_memory'][-1]:.1f} img/s, pipeline {rates[arm]['pipeline'][-1]:.1f} "
            f"img/s (ratio {rates[arm]['pipeline'][-1] / rates[arm]['in_memory'][-1]:.3f})" for arm in ARMS),
            flush=True)

    row = {"batch_size": batch_size, "learning_rate": learning_rate,
           "student_params": models.count_trainable_params(setups["kd_ig"]["model"].student)}
    for arm in ARMS:
        medians = {side: statistics.median(rates[arm][side]) for side in SIDES}
        ratio = medians["pipeline"] / medians["in_memory"]
        row[arm] = {
            **{side: {"images_per_second": rates[arm][side], "median_images_per_second": medians[side],
                      "fit_seconds": fit_seconds[arm][side]} for side in SIDES},
            "ratio": ratio,
            "paired_ratios": [b / a for a, b in zip(rates[arm]["in_memory"], rates[arm]["pipeline"])],
            "meets_target": ratio >= FLAGS.target_ratio,
            "dataset_epochs": epochs[arm], "num_examples": num_examples[arm],
            "trace_seconds": setups[arm]["trace_seconds"],
            # 0: the in-memory and the pipeline steps ran the function traced before the repetitions.
            "retraces_during_measurements": None if setups[arm]["traces"] is None
            else _tracing_count(setups[arm]["model"]) - setups[arm]["traces"],
        }
        if FLAGS.precision != "float32":
            policy = statistics.median(rates[arm][PRECISION_SIDE])
            row[arm]["precision"] = {"policy": FLAGS.precision,
                                     "in_memory_images_per_second": rates[arm][PRECISION_SIDE],
                                     "median_images_per_second": policy,
                                     "ratio_vs_float32": policy / medians["in_memory"]}
    return row


if __name__ == "__main__":
    app.run(main)
