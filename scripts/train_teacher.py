"""Train a teacher, resumably: the paper's CIFAR MobileNetV2 (default) or the fast speedrun ResNet.

    python scripts/train_teacher.py --workdir=runs/teacher --data_dir=../shared/tensorflow_datasets
    python scripts/train_teacher.py --flagfile=flags/teacher_speedrun.cfg --workdir=runs/teacher_speedrun \
        --data_dir=../shared/tensorflow_datasets

``--arch=speedrun`` trains :mod:`kdig_tf.teachers` with :mod:`kdig_tf.teacher_recipe` (any dataset,
any image size >= 16 px); each recipe feature is a flag that switches it off on its own:
``--nowhitening``, ``--label_smoothing=0``, ``--nolookahead``, ``--cutout=0``, ``--translate=0``,
``--noflip``, ``--tta_level=0``, ``--lr_schedule=cosine|constant``. Flags not given keep the
recipe's defaults (``TeacherRecipe``). It writes ``teacher.keras`` (a float32 pixel model, the
final weights) and ``teacher.json`` (val accuracy with and without TTA, params, MACs, hours).

MobileNetV2 recipe (the paper preset):
Recipe: SGD with Nesterov momentum, linear warmup then cosine decay, decoupled weight
decay (not applied to BatchNorm or biases), random crop + flip, optional label smoothing.
Trains on ``train[:45000]`` and selects the best epoch on ``train[45000:]``.

A killed run restarts at its last finished epoch (``BackupAndRestore``). The best
validation checkpoint is ``<workdir>/best.weights.h5``; at the end the best model is
written as ``<workdir>/teacher.h5`` (a full tf-keras model) with ``teacher.json``.
Rerunning a finished run only exports again; a workdir whose log has epochs but no
checkpoint to resume from is refused rather than silently retrained from scratch.
``--init_weights`` starts a new workdir from a trained teacher (a second cosine cycle).
"""
import os


import kdig_tf  # noqa: F401
from absl import flags

from kdig_tf import cli
from kdig_tf import logs

FLAGS = flags.FLAGS
logs.define_flags(FLAGS)
flags.DEFINE_string("workdir", "runs/teacher", "Output directory (checkpoints, logs, final model).")
flags.DEFINE_string("dataset", "cifar10", "tfds dataset name.")
flags.DEFINE_string("data_dir", None, "tfds data_dir (default: $TFDS_DATA_DIR).")
flags.DEFINE_string("train_split", "train[:45000]", "Training split.")
flags.DEFINE_string("val_split", "train[45000:]", "Validation split used for model selection.")
flags.DEFINE_integer("epochs", 60, "Number of epochs.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("learning_rate", 0.1, "Peak learning rate.")
flags.DEFINE_float("warmup_epochs", 2.0, "Linear warmup length in epochs.")
flags.DEFINE_float("momentum", 0.9, "Nesterov momentum.")
flags.DEFINE_float(
    "weight_decay", 5e-3,
    "Decoupled weight decay, applied as w -= lr * wd * w outside the momentum. 5e-3 at lr 0.1 "
    "shrinks weights as fast as the classic coupled 5e-4 with momentum 0.9.")
flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing for the cross-entropy.")
flags.DEFINE_float("width_multiplier", 1.0, "Width multiplier of the teacher.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("verbose", 1, "Keras verbosity: 1 = progress bar, 2 = one line per epoch.")
flags.DEFINE_integer("limit_train", 0, "If > 0, use only this many training images (smoke tests).")
flags.DEFINE_string("init_weights", None, "Start a new run from this teacher (.h5/.keras/weights file) "
                    "instead of random weights, e.g. a second, shorter cosine cycle at a lower --learning_rate. "
                    "Ignored when the workdir resumes.")
flags.DEFINE_enum("arch", "mobilenetv2", ["mobilenetv2", "speedrun"], "Teacher family.")
flags.DEFINE_list("widths", None, "speedrun: channels of the three blocks (default 128,512,512).")
flags.DEFINE_integer("convs_per_block", None, "speedrun: 2 (plain) or 3 (last two residual; default).")
flags.DEFINE_bool("whitening", True, "speedrun: frozen 2x2 patch-whitening first conv (else a trainable conv).")
flags.DEFINE_bool("lookahead", True, "speedrun: lookahead weight averaging every 5 steps.")
flags.DEFINE_integer("translate", None, "speedrun: random translation in pixels (reflect padding; 0 = off).")
flags.DEFINE_bool("flip", True, "speedrun: random horizontal flip.")
flags.DEFINE_integer("cutout", None, "speedrun: cutout square side in pixels (0 = off).")
flags.DEFINE_integer("tta_level", None, "speedrun: test-time augmentation reported in teacher.json: "
                     "0 none, 1 mirror, 2 mirror + 1-pixel shifts.")
flags.DEFINE_enum("lr_schedule", None, ["triangular", "cosine", "constant"],
                  "speedrun: learning-rate schedule (triangular: warm-up from 0.2x, then linear to 0).")
flags.DEFINE_float("warmup_fraction", None, "speedrun: warm-up as a fraction of all steps.")
flags.DEFINE_float("bias_lr_scale", None, "speedrun: step multiplier of BatchNorm biases.")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_float16", "mixed_bfloat16"],
                  "speedrun: Keras mixed-precision policy for training (the saved teacher is float32).")
flags.DEFINE_integer("image_size", None, "Resize every image to this square size (needed for folders of mixed sizes).")
flags.DEFINE_bool("export_only", False, "Do not train: export the best checkpoint so far as teacher.h5 "
                  "(e.g. an interim teacher while a long run continues).")


def main(argv):
    logs.quiet(FLAGS.verbose_logs)
    del argv
    from kdig_tf import cli
    cli.run(_train_speedrun if FLAGS.arch == "speedrun" else _train)


# speedrun flag -> TeacherRecipe field, for the flags that override the recipe only when given.
_RECIPE_FLAGS = {"epochs": "epochs", "batch_size": "batch_size", "learning_rate": "learning_rate",
                 "momentum": "momentum", "weight_decay": "weight_decay", "label_smoothing": "label_smoothing",
                 "seed": "seed", "convs_per_block": "convs_per_block", "whitening": "whitening",
                 "lookahead": "lookahead", "translate": "translate", "flip": "flip", "cutout": "cutout",
                 "tta_level": "tta_level", "lr_schedule": "lr_schedule", "warmup_fraction": "warmup_fraction",
                 "bias_lr_scale": "bias_lr_scale", "precision": "precision"}


def _macs(pixel_model):
    from kdig_tf import benchmark
    return {"macs": benchmark.count_macs(pixel_model)}


def _train_speedrun():
    import dataclasses

    from kdig_tf import teacher_recipe
    from kdig_tf.errors import InvalidArgumentError

    overrides = {field: FLAGS[flag].value for flag, field in _RECIPE_FLAGS.items()
                 if FLAGS[flag].present and FLAGS[flag].value is not None}
    if FLAGS.widths is not None:
        try:
            overrides["widths"] = tuple(int(w) for w in FLAGS.widths)
        except ValueError as err:
            raise InvalidArgumentError(f"--widths needs three integers, got {FLAGS.widths}") from err
    if FLAGS.init_weights or FLAGS.width_multiplier != 1.0:
        raise InvalidArgumentError("--init_weights and --width_multiplier are MobileNetV2 options; "
                                   "use --widths for the speedrun teacher")
    recipe = dataclasses.replace(teacher_recipe.TeacherRecipe(), **overrides)
    if FLAGS.export_only:
        raise InvalidArgumentError("--export_only is a MobileNetV2 option: a speedrun run exports when it finishes")
    summary = teacher_recipe.train_teacher(
        recipe, FLAGS.workdir, dataset=FLAGS.dataset, train_split=FLAGS.train_split, val_split=FLAGS.val_split,
        data_dir=FLAGS.data_dir, image_size=FLAGS.image_size, limit_train=FLAGS.limit_train,
        verbose=FLAGS.verbose, summary_extras=_macs)
    print(f"teacher: val_accuracy={summary['val_accuracy']:.2f}% (TTA level {summary['tta_level']}: "
          f"{summary['val_accuracy_tta']:.2f}%) on {FLAGS.val_split}, {summary['trainable_params']:,} parameters "
          f"-> {FLAGS.workdir}/{teacher_recipe.TEACHER_FILE}")


def _train():
    import time

    import tensorflow as tf
    import tf_keras as keras

    from kdig_tf import data, guards, models
    from kdig_tf.errors import InvalidArgumentError, NotAModelError, ShapeMismatchError, StaleRunError
    from kdig_tf.io_utils import atomic_path, atomic_write_json, holds_files, read_epoch_log

    if FLAGS.epochs < 1 or FLAGS.batch_size < 1:
        raise InvalidArgumentError("epochs and batch_size must be >= 1")
    if not 0.0 <= FLAGS.label_smoothing < 1.0:
        raise InvalidArgumentError(f"label_smoothing must be in [0, 1), got {FLAGS.label_smoothing}")
    guards.require_finite(**{name: FLAGS[name].value for name in _OWN_FLAGS})  # nan passes every range check
    keras.utils.set_random_seed(FLAGS.seed)
    os.makedirs(FLAGS.workdir, exist_ok=True)

    train_raw, info = data.load(FLAGS.dataset, FLAGS.train_split, FLAGS.data_dir)
    val_raw, _ = data.load(FLAGS.dataset, FLAGS.val_split, FLAGS.data_dir)
    if FLAGS.limit_train:
        train_raw = train_raw.take(FLAGS.limit_train)
        val_raw = val_raw.take(max(FLAGS.limit_train // 4, 1))
    num_train = int(train_raw.reduce(0, lambda count, _: count + 1))
    steps_per_epoch = -(-num_train // FLAGS.batch_size)
    num_classes = data.num_classes(info)

    train_ds = data.classification_dataset(
        train_raw, data.preprocess_teacher, FLAGS.batch_size, training=True, seed=FLAGS.seed)
    val_ds = data.classification_dataset(val_raw, data.preprocess_teacher, 256)

    model = models.build_teacher(num_classes=num_classes, width_multiplier=FLAGS.width_multiplier)
    total_steps = FLAGS.epochs * steps_per_epoch
    warmup_steps = int(FLAGS.warmup_epochs * steps_per_epoch)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else FLAGS.learning_rate,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=FLAGS.learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )
    optimizer = keras.optimizers.SGD(
        learning_rate=schedule, momentum=FLAGS.momentum, nesterov=True, weight_decay=FLAGS.weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=FLAGS.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    one_hot = lambda x, y: (x, tf.one_hot(y, num_classes))  # noqa: E731
    train_ds, val_ds = train_ds.map(one_hot), val_ds.map(one_hot)

    best_path = os.path.join(FLAGS.workdir, "best.weights.h5")
    history_path = os.path.join(FLAGS.workdir, "history.csv")
    backup_dir = os.path.join(FLAGS.workdir, "backup")
    epochs_done = read_epoch_log(history_path).get("epoch", [])
    resumable = holds_files(backup_dir)
    finished = len(epochs_done) >= FLAGS.epochs and not resumable
    if epochs_done and not resumable and not finished:
        # BackupAndRestore would start from epoch 0 and append to this log: hours lost, log corrupted.
        raise StaleRunError(f"{history_path} logs {len(epochs_done)} epochs but {backup_dir} holds no "
                            f"checkpoint to resume from (was the run finished with fewer than --epochs="
                            f"{FLAGS.epochs}?); use a new --workdir")
    if finished and not FLAGS.export_only:
        print(f"training finished earlier ({len(epochs_done)} epochs logged in {history_path}); exporting")
    start = time.time()
    if FLAGS.init_weights and not FLAGS.export_only and not finished and not resumable:
        from kdig_tf import loading
        source = loading.load_model(FLAGS.init_weights, arch="teacher", num_classes=num_classes,
                                    width_multiplier=FLAGS.width_multiplier)
        if [w.shape for w in source.weights] != [w.shape for w in model.weights]:
            raise ShapeMismatchError(f"{FLAGS.init_weights} does not match the teacher architecture "
                                     f"(width_multiplier={FLAGS.width_multiplier})")
        model.set_weights(source.get_weights())
        print(f"initialised from {FLAGS.init_weights}")
    if not FLAGS.export_only and not finished:
        # The epoch is logged and checkpointed before it is backed up: a kill in between makes
        # the resumed run redo and log it again (read_epoch_log keeps the later row), never
        # skip a row.
        callbacks = [
            guards.DivergenceGuard(),  # first: a diverged epoch is neither checkpointed nor logged
            # After a restart, only an epoch better than every earlier one may replace best.weights.h5.
            keras.callbacks.ModelCheckpoint(
                best_path, monitor="val_accuracy", mode="max", save_best_only=True, save_weights_only=True,
                initial_value_threshold=max(read_epoch_log(history_path).get("val_accuracy", []), default=None)),
            keras.callbacks.TensorBoard(os.path.join(FLAGS.workdir, "tensorboard")),
            keras.callbacks.CSVLogger(history_path, append=True),
            keras.callbacks.BackupAndRestore(backup_dir),
        ]
        model.fit(train_ds, validation_data=val_ds, epochs=FLAGS.epochs, callbacks=callbacks,
                  verbose=FLAGS.verbose)
        epochs_done = read_epoch_log(history_path).get("epoch", [])
    if not os.path.exists(best_path):
        raise NotAModelError(f"no checkpoint at {best_path}: train first")
    model.load_weights(best_path)
    _, val_accuracy = model.evaluate(val_ds, verbose=0)
    final_path = os.path.join(FLAGS.workdir, "teacher.h5")
    with atomic_path(final_path) as tmp_path:
        model.save(tmp_path, include_optimizer=False)
    summary = {
        "epochs_finished": len(epochs_done),
        "epochs_planned": FLAGS.epochs,
        "val_accuracy": 100.0 * float(val_accuracy),
        "val_split": FLAGS.val_split,
        "train_split": FLAGS.train_split,
        "num_train": num_train,
        "trainable_params": models.count_trainable_params(model),
        "train_seconds_this_process": time.time() - start,
        "flags": {name: FLAGS[name].value for name in _OWN_FLAGS},
    }
    atomic_write_json(os.path.join(FLAGS.workdir, "teacher.json"), summary)
    print(f"teacher: val_accuracy={summary['val_accuracy']:.2f}% on {FLAGS.val_split} -> {final_path}")


_OWN_FLAGS = ("workdir", "dataset", "data_dir", "train_split", "val_split", "epochs", "batch_size",
              "learning_rate", "warmup_epochs", "momentum", "weight_decay", "label_smoothing",
              "width_multiplier", "seed", "limit_train", "init_weights")

if __name__ == "__main__":
    cli.main(main)
