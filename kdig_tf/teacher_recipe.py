"""The fast teacher recipe: train a :mod:`kdig_tf.teachers` network to a strong, resumable teacher.

One :class:`TeacherRecipe` holds every choice, and each feature can be switched off on its
own (``whitening``, ``label_smoothing=0``, ``lookahead``, ``cutout=0``, ``translate=0``,
``flip``, ``tta_level=0``, ``lr_schedule``). :func:`train_teacher` runs it on any dataset that
:func:`kdig_tf.data.load` reads and writes a pixel model (the dataset's own mean/std inside).

The optimiser follows the speed-run parametrisation translated to a mean-reduced loss:
Nesterov SGD, *coupled* weight decay (gradient += wd * w, so it passes through the momentum),
and a larger step for BatchNorm biases (``bias_lr_scale``, their decay per step unchanged).

Everything random is stateless and keyed by (seed, step): the batch at global step s is the
same whether the run was killed and resumed or not. That needs the split in memory (uint8,
about 150 MB for CIFAR's 45k images). Resume is by a checkpoint of model, optimiser,
lookahead state and epoch, written after every epoch.
"""
import kdig_tf  # noqa: F401

import dataclasses
import math
import os
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras

from kdig_tf import data, guards, locks, models, pipeline, teachers
from kdig_tf.distribute import PRECISIONS, precision_policy
from kdig_tf.errors import InvalidArgumentError, NotAModelError, StaleRunError
from kdig_tf.io_utils import atomic_path, atomic_write_json, read_epoch_log, read_json_or_none

LR_SCHEDULES = ("triangular", "cosine", "constant")
TEACHER_FILE = "teacher.keras"
SUMMARY_FILE = "teacher.json"
HISTORY_FILE = "history.csv"
CHECKPOINT_DIR = "checkpoint"
RECIPE_FILE = "recipe.json"
# Number of training images the whitening statistics are computed from.
WHITENING_IMAGES = 5000


@dataclasses.dataclass(frozen=True)
class TeacherRecipe:
    """Architecture and training recipe of a speedrun teacher (defaults: airbench96-like, batch 256)."""
    widths: tuple = teachers.PRESET_WIDTHS["l"]
    convs_per_block: int = 3
    whitening: bool = True
    epochs: int = 31
    batch_size: int = 256
    # Keras (mean-loss) learning rate; 0.2935 at batch 256 is airbench's 9.0 per 1024 examples.
    learning_rate: float = 0.2935
    momentum: float = 0.85
    # Coupled decay: gradient += weight_decay * w (airbench's 0.012 per 1024 examples at lr 9.0).
    weight_decay: float = 0.012 / 9.0
    bias_lr_scale: float = 64.0
    label_smoothing: float = 0.2
    lookahead: bool = True
    lookahead_every: int = 5
    translate: int = 4
    flip: bool = True
    cutout: int = 12
    tta_level: int = 2
    lr_schedule: str = "triangular"
    warmup_fraction: float = 0.1
    precision: str = "float32"
    seed: int = 0

    def validate(self):
        numbers = {name: getattr(self, name) for name in ("learning_rate", "momentum", "weight_decay", "bias_lr_scale",
                                                          "label_smoothing", "warmup_fraction")}
        for name, value in numbers.items():
            if not math.isfinite(float(value)):
                raise InvalidArgumentError(f"{name} must be finite, got {value}")
        if self.epochs < 1 or self.batch_size < 1:
            raise InvalidArgumentError("epochs and batch_size must be >= 1")
        if not self.learning_rate > 0:
            raise InvalidArgumentError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise InvalidArgumentError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0 or self.bias_lr_scale <= 0:
            raise InvalidArgumentError("weight_decay must be >= 0 and bias_lr_scale > 0")
        if not 0 <= self.label_smoothing < 1:
            raise InvalidArgumentError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.warmup_fraction < 1:
            raise InvalidArgumentError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.translate < 0 or self.cutout < 0 or self.lookahead_every < 1:
            raise InvalidArgumentError("translate and cutout must be >= 0 and lookahead_every >= 1")
        if self.tta_level not in (0, 1, 2):
            raise InvalidArgumentError(f"tta_level must be 0, 1 or 2, got {self.tta_level}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InvalidArgumentError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise InvalidArgumentError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        return self

    def to_json(self):
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------- augmentation

def augment_batch(images, seed, translate=0, flip=False, cutout=0):
    """Random translate (reflect padding), horizontal flip and cutout of a float batch [B,H,W,C].

    Stateless: the same ``seed`` (shape [2], int64) gives the same batch. Cutout zeroes a
    ``cutout`` x ``cutout`` square placed wholly inside the image (zero is the mean in the
    normalised space it is applied in).
    """
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5)
    if translate:
        padded = tf.pad(images, [[0, 0], [translate, translate], [translate, translate], [0, 0]], mode="REFLECT")
        top = tf.random.stateless_uniform([batch], seeds[0], maxval=2 * translate + 1, dtype=tf.int32)
        left = tf.random.stateless_uniform([batch], seeds[1], maxval=2 * translate + 1, dtype=tf.int32)
        rows = top[:, None] + tf.range(height)[None, :]
        columns = left[:, None] + tf.range(width)[None, :]
        images = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), columns, axis=2, batch_dims=1)
    if flip:
        mirrored = tf.random.stateless_uniform([batch], seeds[2]) < 0.5
        images = tf.where(mirrored[:, None, None, None], tf.reverse(images, axis=[2]), images)
    if cutout:
        top = tf.random.stateless_uniform([batch], seeds[3], maxval=tf.maximum(height - cutout + 1, 1), dtype=tf.int32)
        left = tf.random.stateless_uniform([batch], seeds[4], maxval=tf.maximum(width - cutout + 1, 1), dtype=tf.int32)
        row_in = (tf.range(height)[None, :] >= top[:, None]) & (tf.range(height)[None, :] < top[:, None] + cutout)
        col_in = (tf.range(width)[None, :] >= left[:, None]) & (tf.range(width)[None, :] < left[:, None] + cutout)
        square = row_in[:, :, None] & col_in[:, None, :]
        images = tf.where(square[..., None], tf.zeros_like(images), images)
    return images


# --------------------------------------------------------------------------- optimiser and schedule

class RecipeSGD(keras.optimizers.SGD):
    """Nesterov SGD with coupled weight decay and a larger step for BatchNorm biases.

    Each gradient becomes ``scale * g + weight_decay * w`` before the momentum, with
    ``scale = bias_lr_scale`` for BatchNorm betas and 1 elsewhere: their step is
    ``bias_lr_scale`` times larger while their decay per step is the same (as in airbench).
    """

    def __init__(self, learning_rate, momentum, coupled_weight_decay=0.0, bias_lr_scale=1.0, name="RecipeSGD",
                 **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=True, name=name, **kwargs)
        self.coupled_weight_decay = float(coupled_weight_decay)
        self.bias_lr_scale = float(bias_lr_scale)

    def update_step(self, gradient, variable):
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        if self.bias_lr_scale != 1.0 and _is_norm_bias(variable):
            gradient = gradient * tf.cast(self.bias_lr_scale, gradient.dtype)
        if self.coupled_weight_decay:
            gradient = gradient + tf.cast(self.coupled_weight_decay, variable.dtype) * variable
        return super().update_step(gradient, variable)

    def get_config(self):
        config = super().get_config()
        config.update(coupled_weight_decay=self.coupled_weight_decay, bias_lr_scale=self.bias_lr_scale)
        config.pop("nesterov", None)
        return config


def _is_norm_bias(variable):
    return variable.name.split("/")[-1].startswith("beta")


class RecipeSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """triangular: linear 0.2x -> 1x over the warm-up, then linear to 0; cosine: linear 0 -> 1x, then cosine to 0."""

    def __init__(self, peak, total_steps, warmup_steps, kind):
        self.peak, self.total_steps, self.warmup_steps, self.kind = float(peak), int(total_steps), int(warmup_steps), kind

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        total = float(max(self.total_steps, 1))
        warmup = float(self.warmup_steps)
        if self.kind == "constant":
            return tf.constant(self.peak, tf.float32)
        start = 0.2 if self.kind == "triangular" else 0.0
        rising = start + (1.0 - start) * step / max(warmup, 1.0)
        progress = tf.clip_by_value((step - warmup) / max(total - warmup, 1.0), 0.0, 1.0)
        falling = 1.0 - progress if self.kind == "triangular" else 0.5 * (1.0 + tf.cos(math.pi * progress))
        return self.peak * tf.where(step < warmup, rising, falling)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "kind": self.kind}


# --------------------------------------------------------------------------- lookahead

class Lookahead(keras.callbacks.Callback):
    """Every ``every`` steps: slow = slow + (1 - d) * (fast - slow); fast = slow (all float weights).

    ``d = 0.95**5 * (step / total)**3`` (airbench): no averaging early, strong averaging late.
    Its state is a ``tf.Module`` (``self.state``) so a checkpoint can carry it across a resume.
    """

    def __init__(self, model, total_steps, every=5):
        super().__init__()
        self.total_steps, self.every = int(total_steps), int(every)
        self._weights = [w for w in model.weights if w.dtype.is_floating]
        self.state = tf.Module()
        self.state.slow = [tf.Variable(w, trainable=False, name="slow") for w in self._weights]

    def decay(self, step):
        return 0.95 ** 5 * (min(step, self.total_steps) / self.total_steps) ** 3

    @tf.function
    def _update(self, decay):
        for slow, fast in zip(self.state.slow, self._weights):
            slow.assign(slow + (1.0 - decay) * (tf.cast(fast, slow.dtype) - slow))
            fast.assign(tf.cast(slow, fast.dtype))

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every == 0:
            self._update(tf.constant(self.decay(step), tf.float32))

    def on_epoch_end(self, epoch, logs=None):
        # The run ends on the slow weights (before the epoch is checkpointed, so a resume agrees).
        if int(self.model.optimizer.iterations.numpy()) >= self.total_steps:
            self._update(tf.constant(1.0, tf.float32))


# Checkpoint files are cut into shards of at most this size, so a run's state can be committed
# to a git host that refuses files over 100 MB (the large teacher's state is about 150 MB).
CHECKPOINT_SHARD_BYTES = 48 << 20


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves ``checkpoint`` (model, optimiser, lookahead, epoch) after each epoch, after it is logged."""

    def __init__(self, manager, epoch_variable):
        super().__init__()
        self.manager, self.epoch_variable = manager, epoch_variable
        policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=CHECKPOINT_SHARD_BYTES)
        self.options = tf.train.CheckpointOptions(experimental_sharding_callback=policy)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_variable.assign(epoch + 1)
        self.manager.save(checkpoint_number=epoch + 1, options=self.options)


# --------------------------------------------------------------------------- data

def load_split_in_memory(dataset, split, data_dir=None, image_size=None, limit=0):
    """(uint8 images [N,H,W,C], int64 labels [N], info) of a split."""
    raw, info = data.load(dataset, split, data_dir, image_size=image_size)
    if limit:
        raw = raw.take(limit)
    images, labels = [], []
    for image_batch, label_batch, _ in raw.batch(4096):
        images.append(image_batch.numpy())
        labels.append(label_batch.numpy())
    if not images:
        raise InvalidArgumentError(f"split {split!r} of {dataset} is empty")
    return np.concatenate(images), np.concatenate(labels).astype(np.int64), info


def channel_statistics(images):
    """Per-channel mean and std of uint8 images, in [0, 1] units (float64 accumulation)."""
    unit = images.astype(np.float64) / models.PIXEL_RANGE
    return tuple(float(v) for v in unit.mean(axis=(0, 1, 2))), tuple(float(v) for v in unit.std(axis=(0, 1, 2)))


def training_batches(images, labels, recipe, spec, num_classes, start_step, total_steps):
    """Dataset of (normalised augmented batch, smoothed-free one-hot labels) for global steps [start, total)."""
    count = len(images)
    steps_per_epoch = count // recipe.batch_size
    images = tf.constant(images)
    labels = tf.constant(labels)
    seed = int(recipe.seed)

    def batch_at(step):
        epoch = step // steps_per_epoch
        position = step % steps_per_epoch
        order = tf.argsort(tf.random.stateless_uniform([count], tf.stack([tf.constant(seed, tf.int64), epoch])))
        index = order[position * recipe.batch_size:(position + 1) * recipe.batch_size]
        batch = spec.from_pixels(tf.gather(images, index))
        batch = augment_batch(batch, tf.stack([tf.constant(seed + 1, tf.int64), step]), recipe.translate,
                              recipe.flip, recipe.cutout)
        return batch, tf.one_hot(tf.gather(labels, index), num_classes)

    return (tf.data.Dataset.range(start_step, total_steps)
            .map(batch_at, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def evaluation_batches(images, labels, spec, num_classes, batch_size=500):
    return (tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
            .map(lambda x, y: (spec.from_pixels(x), tf.one_hot(y, num_classes)))
            .prefetch(tf.data.AUTOTUNE))


def accuracy(model, images, labels, spec, tta_level=0, batch_size=500):
    """Top-1 accuracy (%) of a core ``model`` on uint8 images, with TTA level 0, 1 or 2."""
    correct = 0
    for start in range(0, len(images), batch_size):
        batch = spec.from_pixels(images[start:start + batch_size])
        logits = teachers.tta_logits(model, batch, tta_level)
        correct += int(np.sum(np.argmax(logits.numpy(), axis=1) == labels[start:start + batch_size]))
    return 100.0 * correct / len(images)


# --------------------------------------------------------------------------- the run

def build_core(recipe, num_classes, input_shape):
    return teachers.build_speedrun_teacher(num_classes, input_shape, widths=recipe.widths,
                                           convs_per_block=recipe.convs_per_block, whitening=recipe.whitening)


def train_teacher(recipe, workdir, dataset="cifar10", train_split="train[:45000]", val_split="train[45000:]",
                  data_dir=None, image_size=None, limit_train=0, verbose=1, callbacks=(), summary_extras=None):
    """Train (or resume) the teacher in ``workdir``; return the summary written to ``teacher.json``.

    Writes ``teacher.keras`` (a float32 pixel model, the final weights: no selection on val),
    ``history.csv`` (one row per epoch, with ``epoch_seconds``) and ``recipe.json``. A workdir
    made with another recipe is refused (StaleRunError); a finished one is only exported again.
    ``summary_extras(pixel_model) -> dict`` adds fields to the summary (e.g. MACs). A second
    process on the same workdir gets WorkdirBusyError; a diverged run stops with DivergedError.
    """
    recipe.validate()
    with locks.DirLock(workdir, what="workdir"):
        return _train_teacher_locked(recipe, workdir, dataset, train_split, val_split, data_dir, image_size,
                                     limit_train, verbose, callbacks, summary_extras)


def _train_teacher_locked(recipe, workdir, dataset, train_split, val_split, data_dir, image_size, limit_train,
                          verbose, callbacks, summary_extras):
    recipe_path = os.path.join(workdir, RECIPE_FILE)
    stored = read_json_or_none(recipe_path)
    wanted = {"recipe": recipe.to_json(), "dataset": dataset, "train_split": train_split, "val_split": val_split,
              "image_size": image_size, "limit_train": limit_train}
    if stored is not None and stored != wanted:
        changed = sorted(key for key in set(stored) | set(wanted) if stored.get(key) != wanted.get(key))
        raise StaleRunError(f"{workdir} holds a teacher run with other settings ({', '.join(changed)}); "
                            "use a new workdir")
    train_images, train_labels, info = load_split_in_memory(dataset, train_split, data_dir, image_size, limit_train)
    val_images, val_labels, _ = load_split_in_memory(dataset, val_split, data_dir, image_size,
                                                     max(limit_train // 4, 1) if limit_train else 0)
    num_classes = data.num_classes(info)
    if len(train_images) < recipe.batch_size:
        raise InvalidArgumentError(f"{len(train_images)} training images are fewer than one batch "
                                   f"({recipe.batch_size})")
    mean, std = channel_statistics(train_images)
    spec = models.InputSpec("normalized", mean, std)
    input_shape = tuple(train_images.shape[1:])
    steps_per_epoch = len(train_images) // recipe.batch_size
    total_steps = steps_per_epoch * recipe.epochs
    if stored is None:
        atomic_write_json(recipe_path, wanted)

    with precision_policy(recipe.precision):
        keras.utils.set_random_seed(recipe.seed)
        core = build_core(recipe, num_classes, input_shape)
    if recipe.whitening:
        teachers.init_whitening(core, spec.from_pixels(train_images[:WHITENING_IMAGES]).numpy())
    schedule = RecipeSchedule(recipe.learning_rate, total_steps, int(recipe.warmup_fraction * total_steps),
                              recipe.lr_schedule)
    optimizer = RecipeSGD(schedule, recipe.momentum, recipe.weight_decay, recipe.bias_lr_scale)
    core.compile(optimizer=optimizer,
                 loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=recipe.label_smoothing),
                 metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    lookahead = Lookahead(core, total_steps, recipe.lookahead_every) if recipe.lookahead else None
    epoch_variable = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    tracked = dict(model=core, optimizer=optimizer, epoch=epoch_variable)
    if lookahead is not None:
        tracked["lookahead"] = lookahead.state
    checkpoint = tf.train.Checkpoint(**tracked)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(workdir, CHECKPOINT_DIR), max_to_keep=1)
    history_path = os.path.join(workdir, HISTORY_FILE)
    logged = read_epoch_log(history_path).get("epoch", [])
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).expect_partial()
    elif logged:
        raise StaleRunError(f"{history_path} logs {len(logged)} epochs but {workdir}/{CHECKPOINT_DIR} holds no "
                            "checkpoint to resume from; use a new workdir")
    start_epoch = int(epoch_variable.numpy())
    start = time.time()
    if start_epoch < recipe.epochs:
        if start_epoch:
            print(f"resuming at epoch {start_epoch + 1} of {recipe.epochs}")
        train_ds = training_batches(train_images, train_labels, recipe, spec, num_classes,
                                    start_epoch * steps_per_epoch, total_steps)
        val_ds = evaluation_batches(val_images, val_labels, spec, num_classes)
        # The guard comes first: a diverged epoch is neither logged nor checkpointed.
        callback_list = [guards.DivergenceGuard("teacher training"), pipeline.EpochTimer()]
        callback_list += [lookahead] if lookahead else []
        callback_list += [keras.callbacks.CSVLogger(history_path, append=True),
                          EpochCheckpoint(manager, epoch_variable), *callbacks]
        core.fit(train_ds, validation_data=val_ds, epochs=recipe.epochs, initial_epoch=start_epoch,
                 steps_per_epoch=steps_per_epoch, callbacks=callback_list, verbose=verbose)
    return export_teacher(core, recipe, spec, workdir, num_classes, input_shape, val_images, val_labels,
                          dict(dataset=dataset, train_split=train_split, val_split=val_split,
                               num_train=len(train_images), steps_per_epoch=steps_per_epoch,
                               train_seconds_this_process=time.time() - start), summary_extras)


def float32_pixel_teacher(core, recipe, spec, num_classes, input_shape):
    """The trained core's weights in a float32 network, wrapped as a pixel model."""
    with precision_policy("float32"):
        clean = build_core(recipe, num_classes, input_shape)
    clean.set_weights([w.numpy().astype(np.float32) for w in core.weights])
    return models.with_preprocessing(clean, spec, name=f"{clean.name}_pixels")


def export_teacher(core, recipe, spec, workdir, num_classes, input_shape, val_images, val_labels, extra,
                   summary_extras=None):
    """Write ``teacher.keras`` and ``teacher.json`` (val accuracy with and without TTA)."""
    history = read_epoch_log(os.path.join(workdir, HISTORY_FILE))
    epochs_done = len(history.get("epoch", []))
    if epochs_done < recipe.epochs:
        raise NotAModelError(f"{workdir} has {epochs_done} of {recipe.epochs} epochs: train first")
    pixel_model = float32_pixel_teacher(core, recipe, spec, num_classes, input_shape)
    teacher_core, _ = models.split_preprocessing(pixel_model)
    weights = [w.numpy() for w in teacher_core.weights]
    if not all(np.all(np.isfinite(w)) for w in weights):
        raise InvalidArgumentError("the trained teacher has non-finite weights; lower the learning rate")
    plain = accuracy(teacher_core, val_images, val_labels, spec, 0)
    with_tta = accuracy(teacher_core, val_images, val_labels, spec, recipe.tta_level) if recipe.tta_level else plain
    path = os.path.join(workdir, TEACHER_FILE)
    with atomic_path(path) as tmp:
        pixel_model.save(tmp)  # not compiled: no optimizer state
    seconds = history.get("epoch_seconds", [])
    summary = {
        "recipe": recipe.to_json(),
        "epochs_finished": epochs_done,
        "val_accuracy": plain,
        "val_accuracy_tta": with_tta,
        "tta_level": recipe.tta_level,
        "trainable_params": models.count_trainable_params(teacher_core),
        "input_mean": list(spec.mean),
        "input_std": list(spec.std),
        "train_hours": float(np.nansum(seconds)) / 3600.0 if seconds else None,
        "train_images_per_second": (extra["num_train"] // recipe.batch_size * recipe.batch_size * len(seconds)
                                    / float(np.nansum(seconds))) if seconds else None,
        **extra,
        **(summary_extras(pixel_model) if summary_extras else {}),
    }
    atomic_write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    return summary
