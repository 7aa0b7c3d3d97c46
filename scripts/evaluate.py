"""Top-1 accuracy of a model file on a split of a tfds dataset or an image folder.

    python scripts/evaluate.py --weights=student.pt --split=train --data_dir=../shared/tensorflow_datasets

``--weights`` may be a PyTorch state dict (.pt), a full tf-keras model (.h5/.keras), a
weights-only file (*.weights.h5, with --arch/--keep_blocks) or a TFLite model (.tflite,
int8 or float). The teacher gets mean/std-normalised inputs, students raw [0, 1]. For a
.tflite the input kind (and mean/std) comes from the sidecar JSON that
``kdig_tf.export.convert`` writes next to it; only without a sidecar is it guessed from
the tensor names (the result's ``input_kind_source`` says which). ``--dataset=folder:PATH``
reads a folder of class folders (see ``kdig_tf.data``). A model that is not one of kdig_tf's
MobileNetV2s is labelled by its own name and parameter count (a .tflite's from its sidecar).
"""
import os
import sys


import kdig_tf  # noqa: F401
from absl import flags

from kdig_tf import cli
from kdig_tf import logs

FLAGS = flags.FLAGS


def _define_flags():
    # Defined only when run as a script, so tests can import evaluate() without global flags.
    logs.define_flags(FLAGS)
    flags.DEFINE_string("weights", "runs/teacher/teacher.h5",
                        "Model file: .pt, .h5/.keras (full model), *.weights.h5 or .tflite.")
    flags.DEFINE_enum("arch", None, ["teacher", "student"],
                      "Architecture; inferred for .pt, full Keras models and kdig_tf TFLite files.")
    flags.DEFINE_integer("keep_blocks", None, "Student depth, for weights-only files.")
    flags.DEFINE_string("dataset", "cifar10", "A tfds dataset name, or folder:PATH (one subfolder of images per "
                        "class; class names are the sorted folder names).")
    flags.DEFINE_string("split", "train[45000:]", "Split to evaluate on, in tfds slicing syntax (train[45000:], "
                        "train[90%:]); a folder's splits are its split folders (train, test...) or else train.")
    flags.DEFINE_string("data_dir", None, "tfds data_dir (default: $TFDS_DATA_DIR).")
    flags.DEFINE_integer("batch_size", 256, "Batch size (Keras models).")
    flags.DEFINE_integer("limit", 0, "If > 0, evaluate only the first this many examples.")
    flags.DEFINE_string("output_json", None, "Where to write the result as JSON (optional).")


def main(argv):
    logs.quiet(FLAGS.verbose_logs)
    del argv
    from kdig_tf import cli
    cli.run(run_evaluation, FLAGS.weights, arch=FLAGS.arch, keep_blocks=FLAGS.keep_blocks,
            dataset=FLAGS.dataset, split=FLAGS.split, data_dir=FLAGS.data_dir,
            batch_size=FLAGS.batch_size, limit=FLAGS.limit, output_json=FLAGS.output_json)


def tflite_predictor(path):
    """(predict function, tensor names, number of classes) for a .tflite classifier."""
    from kdig_tf import export

    model = export.TFLiteModel(path)
    names = [tensor["name"] for tensor in model.interpreter.get_tensor_details()]
    return model.predict, names, int(model.output_spec["shape"][-1])


def run_evaluation(weights, arch=None, keep_blocks=None, dataset="cifar10", split="train[45000:]",
                   data_dir=None, batch_size=256, limit=0, output_json=None, progress=True):
    """Evaluate a model file on a split (tfds or folder:PATH); return (and optionally write) the result dict."""
    import time

    from kdig_tf import benchmark, data, loading, models
    from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError
    from kdig_tf.io_utils import atomic_write_json, sha256_file

    if batch_size < 1 or limit < 0:
        raise InvalidArgumentError("batch_size must be >= 1 and limit >= 0")
    loading.check_model_file(weights)
    recorded = None
    if weights.lower().endswith(".tflite"):
        from kdig_tf import export

        if output_json and os.path.abspath(output_json) == os.path.abspath(export.sidecar_path(weights)):
            raise InvalidArgumentError(f"--output_json {output_json} would overwrite the model's sidecar")
        predictor, names, num_outputs = tflite_predictor(weights)
        found_arch, found_keep = loading.describe_names(names)
        recorded = export.sidecar_input_spec(weights, required=False)
        # A .tflite holds constants, not trainable weights: the sidecar knows the model it came from.
        source_model = (export.load_sidecar(weights).get("source_model") or {}) if recorded is not None else {}
        trainable_params, model_name = source_model.get("params"), source_model.get("name")
        names_source = "tensor names"
        if recorded is None:
            print(f"warning: no sidecar {export.sidecar_path(weights)}; input kind guessed from "
                  f"{'--arch' if arch else 'tensor names'}", file=sys.stderr)
    else:
        # num_classes=None: a weights-only file gives its own classifier size.
        stored = loading.load_model(weights, arch=arch, keep_blocks=keep_blocks, num_classes=None)
        model = loading.as_pixel_model(stored)
        if model is stored and arch and models.split_preprocessing(model)[1] == models.PIXEL_INPUT:
            model = models.with_preprocessing(model, models.CIFAR10_TEACHER_INPUT if arch == "teacher"
                                              else models.UNIT_INPUT)
        core, spec = models.split_preprocessing(model)
        predictor = benchmark.keras_predictor(model)  # a pixel model: it scales its own input
        found_arch, found_keep = loading.describe_model(core)
        num_outputs = int(model.output_shape[-1])
        # Where the preprocessing came from: the file itself, or the kdig_tf architecture it holds.
        names_source = "layer names" if model is not stored else "model"
        trainable_params = models.count_trainable_params(model)
        model_name = core.name
    source = "--arch" if arch else names_source
    arch = arch or found_arch
    if arch == "student" and keep_blocks is None:
        keep_blocks = found_keep
    if weights.lower().endswith(".tflite"):
        if recorded is not None:
            spec, source = recorded, "sidecar"
        else:
            spec = models.CIFAR10_TEACHER_INPUT if loading.input_kind(arch) == "normalized" else models.UNIT_INPUT
        preprocess = spec.from_pixels
    else:
        preprocess = models.PIXEL_INPUT.from_pixels  # a pixel model: it scales its own input
    kind, mean, std = spec.space, spec.mean and list(spec.mean), spec.std and list(spec.std)

    ds, info = data.load(dataset, split, data_dir)
    if num_outputs != data.num_classes(info):
        raise ShapeMismatchError(
            f"{weights} predicts {num_outputs} classes but {dataset} has {data.num_classes(info)}")
    if limit:
        ds = ds.take(limit)
    total = data.count_examples(ds)

    if total == 0:
        raise InvalidArgumentError(f"split {split!r} of {dataset} is empty")
    start = time.time()
    scores = benchmark.evaluate_accuracy(predictor, ds, preprocess, batch_size, progress=progress)
    seconds = time.time() - start
    correct, count = scores["num_correct"], scores["num_examples"]
    result = {
        "accuracy": scores["accuracy"],
        "num_correct": correct,
        "num_examples": count,
        "dataset": dataset,
        "split": split,
        "weights": os.path.abspath(weights),
        "weights_sha256": sha256_file(weights),
        "arch": arch,
        "model_name": model_name,
        "trainable_params": trainable_params,
        "keep_blocks": keep_blocks if arch == "student" else None,
        "input_kind": kind,
        "input_kind_source": source,  # "sidecar", "tensor names", "layer names" or "--arch"
        "input_mean": mean,
        "input_std": std,
        "seconds": round(seconds, 2),
    }
    if output_json:
        atomic_write_json(output_json, result)
    depth = f" keep_blocks={keep_blocks}" if arch == "student" else ""
    params = f", {trainable_params:,} trainable parameters" if trainable_params is not None else ""
    # Not a kdig_tf MobileNetV2: the model's own name says more than "unknown".
    label = arch if arch != "unknown" or not model_name else model_name
    print(f"{os.path.basename(weights)}: accuracy={result['accuracy']:.2f}% ({correct}/{count}) "
          f"on {dataset} {split} [{label}{depth}, {kind} input from {source}{params}] in {seconds:.1f}s")
    return result


if __name__ == "__main__":
    _define_flags()
    cli.main(main)
