"""Benchmark the teacher and students as TFLite models on this machine's CPU.

    python scripts/benchmark.py --models=teacher,student:14 --modes=fp32,int8 \
        --batch_sizes=1,64 --num_runs=50,10 --num_rounds=3 --output_dir=results/benchmark

Each ``--models`` spec (``teacher``, ``teacher:<width>``, ``student:<keep_blocks>[:<width>]``
or ``student:<factor>x``) is built with random weights unless ``--weights`` gives a file
for it, converted on the fly for every ``--modes`` entry into ``--output_dir``, and timed
with the LiteRT interpreter (XNNPACK) in a fresh subprocess per measurement. At each batch
size the models are timed in ``--num_rounds`` interleaved rounds (A B C, A B C, ...);
latencies are medians over rounds of each round's figure, and the speed-up over the
teacher in fp32 is the median over rounds of the per-round ratio, with its min and max
(``kdig_tf.benchmark.benchmark_models``). Writes ``<output_name>.json`` (per-round
results under each row's ``rounds``) and ``<output_name>.md``.

Latency does not depend on the weights, but int8 accuracy does: with real weights pass
``--calibration_split`` so the int8 ranges come from real training images.
"""
import os
import sys


import kdig_tf  # noqa: F401
from absl import flags

from kdig_tf import cli
from kdig_tf import logs

FLAGS = flags.FLAGS
logs.define_flags(FLAGS)
flags.DEFINE_list("models", ["teacher", "student:14"],
                  "Model specs: teacher, teacher:<width>, student:<keep_blocks>[:<width>], student:<factor>x.")
flags.DEFINE_list("weights", [], "Weight files, one per --models entry in order; empty = random weights.")
flags.DEFINE_list("modes", ["fp32", "int8"], "Conversion modes: fp32, fp16, dynamic, int8.")
flags.DEFINE_bool("int8_io", False, "int8 models take and return int8 tensors (else float I/O).")
flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes to time.")
flags.DEFINE_integer("num_threads", 1, "Interpreter threads.")
flags.DEFINE_list("warmup_runs", ["5", "2"], "Warmup runs per batch size (the last value repeats).")
flags.DEFINE_list("num_runs", ["50", "10"], "Timed runs per batch size (the last value repeats).")
flags.DEFINE_integer("num_rounds", 3, "Interleaved rounds (A B C, A B C, ...) per batch size; medians over rounds.")
flags.DEFINE_bool("isolate", True, "Time each model in a fresh subprocess (honest per-model peak RSS).")
flags.DEFINE_string("output_dir", "results/benchmark", "Where .tflite files and the report go.")
flags.DEFINE_string("output_name", "benchmark", "Report file stem (<name>.json, <name>.md).")
flags.DEFINE_string("calibration_split", "",
                    "tfds split for the int8 representative images; empty = synthetic random images.")
flags.DEFINE_string("dataset", "cifar10", "tfds dataset for --calibration_split.")
flags.DEFINE_string("data_dir", None, "tfds data_dir (default: $TFDS_DATA_DIR).")
flags.DEFINE_integer("num_calibration", 128, "Number of representative images for int8.")
flags.DEFINE_integer("seed", 0, "Seed for random weights and synthetic calibration images.")


def main(argv):
    logs.quiet(FLAGS.verbose_logs)
    del argv
    from absl import logging

    from kdig_tf import cli
    if not FLAGS["verbosity"].present:
        # The converter logs every SavedModel step at INFO.
        logging.set_verbosity(logging.WARNING)
    cli.run(_benchmark)


def _ints(values, name):
    from kdig_tf.errors import InvalidArgumentError

    try:
        parsed = [int(value) for value in values]
    except ValueError as err:
        raise InvalidArgumentError(f"--{name} must be integers, got {values}") from err
    if not parsed or min(parsed) < 1:
        raise InvalidArgumentError(f"--{name} needs values >= 1, got {values}")
    return parsed


def _calibration_images(kind):
    """Float images for int8 calibration, preprocessed for ``kind`` ("unit" / "normalized")."""
    import numpy as np
    import tensorflow as tf

    from kdig_tf import data, export

    preprocess = data.preprocess_teacher if kind == "normalized" else data.preprocess_student
    if FLAGS.calibration_split:
        split, info = data.load(FLAGS.dataset, FLAGS.calibration_split, FLAGS.data_dir)
        return export.representative_from_split(split, preprocess, FLAGS.num_calibration), data.class_names(info)
    rng = np.random.default_rng(FLAGS.seed)
    images = rng.integers(0, 256, size=(FLAGS.num_calibration, 32, 32, 3), dtype=np.uint8)
    return np.asarray(preprocess(tf.constant(images))), None


def _load_weights(model, path):
    from kdig_tf.errors import NotAModelError, WeightKeyError

    if not os.path.isfile(path):
        raise NotAModelError(f"no such weights file: {path}")
    try:
        model.load_weights(path)
    except (ValueError, KeyError) as err:
        raise WeightKeyError(f"{path} does not fit {model.name}: {str(err).splitlines()[0]}") from err
    except OSError as err:
        raise NotAModelError(f"cannot read weights {path}: {str(err).splitlines()[0]}") from err


def _benchmark():
    import tf_keras as keras

    from kdig_tf import benchmark, export, models
    from kdig_tf.errors import InvalidArgumentError, UnknownKeyError
    from kdig_tf.io_utils import atomic_path, atomic_write_json

    specs = [benchmark.parse_model_spec(spec) for spec in FLAGS.models]
    if not specs:
        raise InvalidArgumentError("--models is empty")
    if len({spec["name"] for spec in specs}) != len(specs):
        raise InvalidArgumentError(f"duplicate --models entries: {FLAGS.models}")
    if FLAGS.weights and len(FLAGS.weights) != len(specs):
        raise InvalidArgumentError(f"--weights needs one entry per model ({len(specs)}), got {len(FLAGS.weights)}")
    unknown = [mode for mode in FLAGS.modes if mode not in export.CONVERSION_MODES]
    if unknown or not FLAGS.modes:
        raise UnknownKeyError(f"unknown --modes {unknown}; known: {sorted(export.CONVERSION_MODES)}")
    batch_sizes = _ints(FLAGS.batch_sizes, "batch_sizes")
    warmup_runs, num_runs = _ints(FLAGS.warmup_runs, "warmup_runs"), _ints(FLAGS.num_runs, "num_runs")
    if FLAGS.num_calibration < 1:
        raise InvalidArgumentError("--num_calibration must be >= 1")
    if FLAGS.num_rounds < 1:
        raise InvalidArgumentError(f"--num_rounds must be >= 1, got {FLAGS.num_rounds}")
    keras.utils.set_random_seed(FLAGS.seed)

    entries, described = [], []
    for index, spec in enumerate(specs):
        model = benchmark.build_model(spec)
        weights = FLAGS.weights[index] if FLAGS.weights else ""
        if weights:
            _load_weights(model, weights)
        kind = "normalized" if spec["kind"] == "teacher" else "unit"
        calibration, labels = _calibration_images(kind) if "int8" in FLAGS.modes else (None, None)
        params, macs = models.count_trainable_params(model), benchmark.count_macs(model)
        described.append(dict(spec, params=params, macs=macs, weights=weights or "random"))
        for mode in FLAGS.modes:
            path = os.path.join(FLAGS.output_dir, f"{spec['name']}_{mode}.tflite")
            export.convert(model, path, mode, representative_images=calibration if mode == "int8" else None,
                           int8_io=FLAGS.int8_io and mode == "int8", input_kind=kind, labels=labels)
            entries.append(dict(name=spec["name"], mode=mode, path=path, params=params, macs=macs))
            print(f"converted {spec['name']} ({mode}) -> {path}", flush=True)

    reference = (specs[0]["name"], FLAGS.modes[0])
    teacher = next((spec for spec in specs if spec["kind"] == "teacher"), None)
    if teacher is not None:
        reference = (teacher["name"], "fp32" if "fp32" in FLAGS.modes else FLAGS.modes[0])
    report = benchmark.benchmark_models(entries, batch_sizes, FLAGS.num_threads, warmup_runs, num_runs,
                                        isolate=FLAGS.isolate, reference=reference, num_rounds=FLAGS.num_rounds)
    report["models"] = described
    report["command"] = " ".join(sys.argv)
    markdown = benchmark.to_markdown(report)
    stem = os.path.join(FLAGS.output_dir, FLAGS.output_name)
    atomic_write_json(stem + ".json", report)
    with atomic_path(stem + ".md") as tmp:
        with open(tmp, "w") as handle:
            handle.write(markdown)
    print(markdown)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    cli.main(main)
