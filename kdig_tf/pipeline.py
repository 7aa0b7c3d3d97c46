"""The end-to-end distillation run behind ``scripts/distill.py``, as a plain function.

``run_distillation(DistillConfig(...), workdir)`` makes sure the IG/logit store exists
(building it if missing, refusing one built with another teacher or settings), trains a
student with the chosen method, evaluates it, exports TFLite, and writes
``results.json`` **last**: a workdir without it is an unfinished run. A killed run
resumes at its last finished epoch; a run killed after training only redoes the
evaluation and export. With ``qat_epochs`` or ``prune_sparsity`` the trained student is
then fine-tuned, still with the KD loss, into a quantisation-aware and a pruned copy, each
exported and kept, so a rerun does not redo a finished one. Every ``.tflite`` is scored with
LiteRT on the whole validation split. ``run_config.json`` records the settings a workdir was started
with, and a later call with other training settings is refused (``StaleRunError``), so
a backup is never resumed under different flags.

Before any work, a validation split holding a class the training split lacks is refused
(:func:`preflight`, ``SplitClassMismatchError``) and the teacher is scored on the validation
split (:func:`check_teacher`, ``WeakTeacherError`` below its threshold). ``keep``,
``ema_decay`` and ``warmup_steps`` choose the weights a run ends with and its learning-rate
ramp (``kdig_tf.selection``, ``kdig_tf.schedules``); ``augment`` its augmentation. The end
of a run is summarised in ``results.md`` (``kdig_tf.summary``), written just before results.json.
"""
import kdig_tf  # noqa: F401

import dataclasses
import json
import os
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras

from kdig_tf import data, distiller, distribute, guards, loading, locks, mixing, models, overlay, records
from kdig_tf import logs, schedules, selection, summary, teacher_check
from kdig_tf.logs import hdf5_on_purpose  # by name: callbacks take an argument named logs
from kdig_tf.errors import (ChecksumMismatchError, CorruptRunFileError, DivergedError, InconsistentTeachingError,
                            InvalidArgumentError, KdigError,
                            NotAModelError, ShapeMismatchError, StaleRunError, UnknownKeyError)
from kdig_tf.io_utils import (atomic_path, atomic_write_json, holds_files, read_epoch_log, read_json_or_none,
                              sha256_file)

# method -> (uses KD, uses the IG overlay, uses attention transfer)
METHODS = {
    "student": (False, False, False),
    "kd": (True, False, False),
    "ig": (False, True, False),
    "kd_ig": (True, True, False),
    "at": (False, False, True),
    "kd_at": (True, False, True),
    "ig_at": (False, True, True),
    "kd_ig_at": (True, True, True),
    # Consistent teaching: the frozen teacher runs on the augmented view the student sees,
    # instead of its cached logits of the un-augmented image.
    "kd_online": (True, False, False),
    # The same with the IG overlay (maps from the store): the teacher scores the overlaid (and mixed) batch.
    "kd_ig_online": (True, True, False),
}
ONLINE_TEACHER_METHODS = ("kd_online", "kd_ig_online")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
RESULTS = "results.json"
RUN_CONFIG = "run_config.json"
HISTORY = "history.csv"
STUDENT = "student.h5"
BACKUP = "backup"
MACHINES = "machines.json"
FAILED = "failed.json"  # a run that diverged: why and where; it blocks reruns into the same workdir
# Settings that do not change what is trained: a run may be continued or re-exported with other values.
NON_TRAINING_FIELDS = ("verbose", "data_dir", "download", "store_dir", "eval_split", "export_modes", "ig_max_batch",
                       "teacher_min_accuracy", "skip_teacher_check",
                       "teacher_sha256")
# Settings that only check the inputs: a finished run is the same run whether or not they were given.
CHECK_ONLY_FIELDS = ("teacher_sha256", "teacher_min_accuracy", "skip_teacher_check")
# Training settings added after runs were recorded, with the value those runs had.
FIELDS_ADDED_LATER = {"teacher_sha256": "", "stem_stride": 1, "student": "", "image_size": 0, "download": True, "qat_epochs": 0, "qat_learning_rate": 1e-4, "prune_sparsity": 0.0,
                      "prune_epochs": 1, "prune_learning_rate": 1e-4, "augment": "crop_flip", "keep": "last",
                      "ema_decay": 0.0, "warmup_steps": 0, "teacher_min_accuracy": 0.0, "skip_teacher_check": False,
                      "kd_loss": "kl", "kd_weight": -1.0, "dkd_alpha": 1.0, "dkd_beta": 8.0, "mix": "none",
                      "mix_alpha": 1.0, "distribution": "default", "precision": "float32"}
# --augment=auto: the CIFAR recipe's crop and flip where it is known to help, nothing elsewhere.
CROP_FLIP_DATASETS = ("cifar10", "cifar100")
AUGMENT_CHOICES = ("auto",) + data.AUGMENTATIONS
# Outputs of the fine-tuning stages that follow the main training.
QAT_WEIGHTS = "student_qat.weights.h5"
QAT_TFLITE = "student_qat_int8.tflite"
PRUNED_STUDENT = "student_pruned.h5"
PRUNED_TFLITE = "student_pruned_{mode}.tflite"
TEACHER_HELP = ("train one with `python scripts/train_teacher.py --data_dir=<tfds dir>` (hours on a CPU), or "
                "pass --teacher=<.h5 | .keras | .pt>; the reference teacher lives in pretrained/teacher.h5")


class TeacherNotFoundError(NotAModelError):
    """The teacher file is missing."""


@dataclasses.dataclass
class DistillConfig:
    """Every setting of a run. Defaults are the paper's (arXiv 2503.13008)."""
    method: str = "kd_ig"
    teacher: str = "pretrained/teacher.h5"
    student: str = ""
    dataset: str = "cifar10"
    data_dir: str = None
    download: bool = True
    image_size: int = 0
    train_split: str = "train[:45000]"
    val_split: str = "train[45000:]"
    eval_split: str = None
    subset_fraction: float = 1.0
    subset_seed: int = 0
    alpha: float = 0.01
    temperature: float = 2.5
    p: float = 0.1
    beta: float = 0.5
    power_low: float = 1.0
    power_high: float = 2.0
    paper_overlay: bool = False
    cached_targets_order: str = "aligned"
    gamma: float = 0.8
    at_teacher_layer: str = "features_13_add"
    at_student_layer: str = "features_13_add"
    epochs: int = 100
    batch_size: int = 64
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    seed: int = 0
    keep_blocks: int = 14
    width_multiplier: float = 1.0
    stem_stride: int = 1
    store_dir: str = None
    ig_steps: int = 50
    ig_method: str = "gausslegendre"
    ig_baseline: str = "zeros"
    ig_max_batch: int = 256
    map_encoding: str = "float16"
    examples_per_shard: int = 2500
    export_modes: str = "fp32"
    qat_epochs: int = 0
    qat_learning_rate: float = 1e-4
    prune_sparsity: float = 0.0
    prune_epochs: int = 1
    prune_learning_rate: float = 1e-4
    teacher_sha256: str = ""
    augment: str = "auto"
    keep: str = "last"
    ema_decay: float = 0.0
    warmup_steps: int = 0
    teacher_min_accuracy: float = 0.0
    skip_teacher_check: bool = False
    kd_loss: str = "kl"
    kd_weight: float = -1.0
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    mix: str = "none"
    mix_alpha: float = 1.0
    distribution: str = "default"
    precision: str = "float32"
    verbose: int = 1

    def validate(self):
        """Raise a named error for any bad setting before anything is written."""
        guards.require_finite_fields(self)  # range checks below let NaN through (nan <= 0 is False)
        if self.method not in METHODS:
            raise UnknownKeyError(f"unknown method {self.method!r}; known: {sorted(METHODS)}")
        self.validate_objective()
        overlay.check_overlay_args(self.p, self.beta, (self.power_low, self.power_high))
        if self.gamma < 0:
            raise InvalidArgumentError(f"gamma must be >= 0, got {self.gamma}")
        if self.optimizer not in OPTIMIZERS:
            raise UnknownKeyError(f"unknown optimizer {self.optimizer!r}; known: {OPTIMIZERS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UnknownKeyError(f"unknown lr_schedule {self.lr_schedule!r}; known: {LR_SCHEDULES}")
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise InvalidArgumentError("epochs, batch_size and learning_rate must be positive")
        if not 0 <= self.seed < 2**31:
            raise InvalidArgumentError(f"seed must be in [0, 2**31), got {self.seed}")
        if not 0.0 < self.subset_fraction <= 1.0:
            raise InvalidArgumentError(f"subset_fraction must be in (0, 1], got {self.subset_fraction}")
        if self.cached_targets_order not in overlay.TARGET_ORDERS:
            raise UnknownKeyError(f"cached_targets_order must be one of {overlay.TARGET_ORDERS}")
        if self.teacher_online and self.cached_targets_order != "aligned":
            raise InvalidArgumentError(f"{self.method} reads no cached targets: cached_targets_order must be "
                                       "'aligned'")
        models.resolve_keep_blocks(self.keep_blocks)
        if self.student and not models.is_model_file(self.student):
            models.parse_student_spec(self.student)
        if self.student and (self.keep_blocks, self.width_multiplier, self.stem_stride) != (14, 1.0, 1):
            raise InvalidArgumentError("give the student either by --student or by --keep_blocks/--width_multiplier/"
                                       "--stem_stride, not both")
        if self.image_size < 0:
            raise InvalidArgumentError(f"image_size must be >= 0, got {self.image_size}")
        if self.stem_stride not in models.STEM_STRIDES:
            raise InvalidArgumentError(f"stem_stride must be one of {models.STEM_STRIDES}, got {self.stem_stride}")
        if self.stem_stride != 1 and self.uses_at:
            raise InvalidArgumentError("attention transfer needs the teacher's feature-map sizes: use stem_stride=1 "
                                       f"with method {self.method!r}")
        if self.ig_steps < 1:
            raise InvalidArgumentError(f"ig_steps must be >= 1, got {self.ig_steps}")
        if self.qat_epochs < 0 or self.prune_epochs < 0:
            raise InvalidArgumentError(f"qat_epochs and prune_epochs must be >= 0, got {self.qat_epochs} "
                                       f"and {self.prune_epochs}")
        if not 0.0 <= self.prune_sparsity < 1.0:
            raise InvalidArgumentError(f"prune_sparsity must be in [0, 1), got {self.prune_sparsity}")
        if self.prune_sparsity > 0 and self.prune_epochs < 1:
            raise InvalidArgumentError("prune_sparsity > 0 needs prune_epochs >= 1 (pruning happens while training)")
        if not (self.qat_learning_rate > 0 and self.prune_learning_rate > 0):
            raise InvalidArgumentError("qat_learning_rate and prune_learning_rate must be positive")
        for mode in self.modes():
            from kdig_tf import export
            if mode not in export.CONVERSION_MODES:
                raise UnknownKeyError(f"unknown export mode {mode!r}; known: {sorted(export.CONVERSION_MODES)}")
        if self.teacher_sha256 and not (len(self.teacher_sha256) == 64
                                        and all(char in "0123456789abcdef" for char in self.teacher_sha256.lower())):
            raise InvalidArgumentError(f"teacher_sha256 must be 64 hex digits, got {self.teacher_sha256!r}")
        self.validate_user_data_options()

    def validate_user_data_options(self):
        """The checks of augment, keep, ema_decay, warmup_steps and the teacher check's threshold."""
        if self.augment not in AUGMENT_CHOICES:
            raise UnknownKeyError(f"unknown augment {self.augment!r}; known: {AUGMENT_CHOICES}")
        selection.check_keep(self.keep)
        selection.check_ema(self.ema_decay, self.keep)
        if self.warmup_steps < 0:
            raise InvalidArgumentError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.teacher_min_accuracy <= 100.0:
            raise InvalidArgumentError(f"teacher_min_accuracy is a percentage in [0, 100] (0 = 1.5x chance), got "
                                       f"{self.teacher_min_accuracy}")

    def augmentation(self):
        """The training augmentation, ``augment`` with ``auto`` resolved: crop_flip for CIFAR, else none."""
        if self.augment != "auto":
            return self.augment
        name = str(self.dataset).split(":")[0].split("/")[0]
        return "crop_flip" if not data.is_folder_dataset(self.dataset) and name in CROP_FLIP_DATASETS else "none"

    def validate_objective(self):
        """The checks of the loss (alpha, T, kd_loss and its weights), the mix, distribution and precision."""
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidArgumentError(f"alpha must be in [0, 1], got {self.alpha}")
        if not (self.kd_weight >= 0 or self.kd_weight == -1.0):
            raise InvalidArgumentError(f"kd_weight must be >= 0, or -1 for alpha, got {self.kd_weight}")
        distiller.kd_loss_from_name(self.kd_loss, self.temperature, self.dkd_alpha, self.dkd_beta)
        mixing.check_mix(self.mix, self.mix_alpha)
        if self.mix != "none" and self.uses_kd and not self.teacher_online:
            raise InconsistentTeachingError(
                f"method {self.method!r} reads cached teacher logits, computed on un-mixed images, so they cannot "
                f"score the {self.mix} batch the student sees: use an online teacher "
                f"({', '.join(ONLINE_TEACHER_METHODS)}) or --mix=none")
        distribute.check_strategy(self.distribution)
        distribute.check_precision(self.precision)

    @property
    def kd_weight_effective(self):
        """The KD term's weight: kd_weight, or alpha when kd_weight is -1; 0 for methods without KD."""
        if not self.uses_kd:
            return 0.0
        return self.alpha if self.kd_weight == -1.0 else self.kd_weight

    def modes(self):
        return [mode.strip() for mode in (self.export_modes or "").split(",") if mode.strip()]

    @property
    def uses_kd(self):
        return METHODS[self.method][0]

    @property
    def uses_ig(self):
        return METHODS[self.method][1]

    @property
    def uses_at(self):
        return METHODS[self.method][2]

    @property
    def teacher_online(self):
        """KD logits come from the teacher on each training batch, not from the store."""
        return self.method in ONLINE_TEACHER_METHODS

    def effective(self):
        """(alpha, p, gamma) after the method switches terms off."""
        return (self.alpha if self.uses_kd else 0.0, self.p if self.uses_ig else 0.0,
                self.gamma if self.uses_at else 0.0)


# One line of help per DistillConfig field: the text of the matching scripts/distill.py flag.
FIELD_HELP = {
    "method": "student | kd | ig | kd_ig | at | kd_at | ig_at | kd_ig_at | kd_online (the teacher runs on each "
              "augmented batch instead of its cached logits) | kd_ig_online (the same with the IG overlay).",
    "teacher": "Teacher: any Keras classifier taking pixels in [0, 255] (.keras, .h5 or a SavedModel dir), or "
               "a kdig_tf/authors' MobileNetV2 (.h5, .pt), which is given its CIFAR normalisation.",
    "student": "Student: a built-in spec such as mobilenetv2:keep=14,width=1.0,stem_stride=1, or a Keras model file "
               "whose architecture is trained from a fresh initialisation. Empty: mobilenetv2 from --keep_blocks, "
               "--width_multiplier and --stem_stride.",
    "dataset": "Any tfds name, or folder:PATH (one subfolder of images per class; ids are the relative paths).",
    "data_dir": "tfds data_dir (default: $TFDS_DATA_DIR).",
    "download": "Download and prepare a tfds dataset that is not prepared in data_dir (prepared data is never "
                "downloaded again, so this works offline).",
    "image_size": "Resize every image to image_size x image_size (0: keep the dataset's size).",
    "train_split": "Split the student trains on (the store covers it).",
    "val_split": "Validation split: the only one used for selection.",
    "eval_split": "Optional extra split to report (e.g. a final test report).",
    "subset_fraction": "Train on a class-stratified random fraction of train_split (Monte Carlo protocol).",
    "subset_seed": "Seed of the stratified subset.",
    "alpha": "The paper's loss alpha*T^2*KL + (1-alpha)*CE: the CE weighs 1-alpha, the KD term alpha (or kd_weight).",
    "temperature": "Distillation temperature T (> 0).",
    "p": "Probability of overlaying the IG map on an image.",
    "beta": "Overlay weight: x <- (1-beta) x + beta m.",
    "power_low": "The map is raised to s = exp(U(ln power_low, ln power_high)).",
    "power_high": "Upper end of the random map power.",
    "paper_overlay": "Reproduce the authors' code: do not crop/flip the map with its image.",
    "cached_targets_order": "aligned, or shuffled: the misalignment control pairing images with other images' targets.",
    "gamma": "Weight of attention transfer (methods with 'at').",
    "at_teacher_layer": "Teacher layer for attention transfer.",
    "at_student_layer": "Student layer for attention transfer.",
    "epochs": "Training epochs.",
    "batch_size": "Batch size.",
    "optimizer": "adam or sgd (Nesterov, momentum 0.9).",
    "learning_rate": "Initial learning rate.",
    "lr_schedule": "constant or cosine.",
    "weight_decay": "Decoupled weight decay (0 = none).",
    "seed": "Seed of initialisation, shuffling, augmentation and overlay draws.",
    "keep_blocks": "Student = first keep_blocks teacher feature modules (14 = 4.1x).",
    "width_multiplier": "Student width multiplier.",
    "stem_stride": "Student stem stride: 1 (the teacher's) or 2 (4x fewer MACs; not with attention transfer).",
    "store_dir": "IG/logit store directory (default <workdir>/store); share it between runs.",
    "ig_steps": "IG quadrature steps.",
    "ig_method": "gausslegendre | riemann_left | riemann_right | riemann_middle | riemann_trapezoid.",
    "ig_baseline": "zeros (in the teacher's normalised space) | black | blur | uniform.",
    "ig_max_batch": "Path points per gradient batch (memory bound; results do not depend on it).",
    "map_encoding": "float16, or uint8 with a per-map scale.",
    "examples_per_shard": "Records per store shard (the unit of resume).",
    "export_modes": "Comma-separated TFLite modes: fp32, fp16, dynamic, int8 ('' = none).",
    "qat_epochs": "After training, fine-tune a quantisation-aware copy with the KD loss for this many epochs and "
                  "export it as student_qat_int8.tflite (0 = no QAT).",
    "qat_learning_rate": "Constant Adam learning rate of the QAT fine-tuning.",
    "prune_sparsity": "After training, magnitude-prune a copy to this fraction of zero Conv2D/Dense weights while "
                      "fine-tuning with the KD loss; exported as student_pruned_<mode>.tflite (0 = no pruning).",
    "prune_epochs": "Fine-tuning epochs of the pruned copy (the sparsity ramps up over them).",
    "prune_learning_rate": "Constant Adam learning rate of the pruning fine-tuning.",
    "teacher_sha256": "sha256 of the teacher file (e.g. from its model card): refuse a teacher whose bytes differ "
                      "('' = not checked).",
    "augment": "Training augmentation: crop_flip | crop | flip | none | auto. The crop pads by an eighth of the image "
               "size (4 px at 32 px). auto (default) = crop_flip for cifar10/cifar100, where it is the known recipe, "
               "and none for any other data: a mirrored or shifted image is not always the same class (digits, text, "
               "medical scans), and a small dataset trained without augmentation is a safe baseline.",
    "keep": "Weights the run ends with: last (the last epoch) or best (the epoch with the best validation accuracy; "
            "results.json states the selection bias).",
    "ema_decay": "If > 0, end with an exponential moving average of the weights with this decay (e.g. 0.99); "
                 "not with keep=best.",
    "warmup_steps": "Optimizer steps of linear learning-rate warm-up before the schedule (0 = none).",
    "teacher_min_accuracy": "Refuse a teacher below this validation accuracy in percent (WeakTeacherError); 0 = 1.5x "
                            "chance. Judged only on a validation split large enough to tell.",
    "skip_teacher_check": "Distil even from a teacher the check finds weak (it is still measured and reported).",
    "kd_loss": "The KD term: kl (T^2 * KL at temperature T) | kl_standardized (KL of z-scored logits, base "
               "temperature T) | dkd (decoupled KD: dkd_alpha * TCKD + dkd_beta * NCKD, at T).",
    "kd_weight": "Weight of the KD term: the loss is (1-alpha)*CE + kd_weight*KD (+ gamma*AT). -1 (default): alpha, "
                 "the paper's alpha*KD + (1-alpha)*CE. E.g. --alpha=0.9 --kd_weight=9 is CE 0.1 + KD 9.",
    "dkd_alpha": "DKD weight of the target-class term (TCKD); only with --kd_loss=dkd.",
    "dkd_beta": "DKD weight of the non-target-class term (NCKD); only with --kd_loss=dkd.",
    "mix": "none | mixup | cutmix of each training batch (after augmentation and the IG overlay), with mixed labels "
           "for the CE. Needs an online teacher for KD (kd_online, kd_ig_online): cached logits are refused.",
    "mix_alpha": "Strength of the mix: the mixing weight is drawn from Beta(mix_alpha, mix_alpha) per image.",
    "distribution": "default (one device) | mirrored (the GPUs of this machine) | multi_worker (the machines of "
                    "TF_CONFIG; the chief writes the outputs) | tpu. batch_size is the global batch; the learning "
                    "rate is not rescaled.",
    "precision": "float32 | mixed_float16 (loss scaling) | mixed_bfloat16 for the student's layers (built-in "
                 "student specs; a --student model file keeps its saved types). Logits and losses stay float32; "
                 "student.h5 is saved in float32.",
    "verbose": "Keras verbosity: 1 = progress bar, 2 = one line per epoch.",
}


def load_teacher(path, num_classes=None):
    """The teacher as a pixel model (``kdig_tf.models``): any classifier file, legacy ones wrapped."""
    if not path or not os.path.exists(path):
        raise TeacherNotFoundError(f"no teacher at {path!r}: {TEACHER_HELP}")
    return loading.load_pixel_model(path, arch="teacher" if str(path).endswith(".h5") else None,
                                    num_classes=num_classes)


def load_split(config, split):
    """(examples, info) of one split of config's dataset, at config's image size."""
    return data.load(config.dataset, split, config.data_dir, download=config.download,
                     image_size=config.image_size or None)


def build_student_model(config, num_classes, image_shape):
    """The untrained student of ``config`` as a pixel model, seeded by the global seed.

    ``--student`` is a built-in spec or a Keras model file whose architecture is re-initialised;
    without it, the MobileNetV2 of ``keep_blocks``/``width_multiplier``/``stem_stride``.
    """
    if config.student and models.is_model_file(config.student):
        architecture = loading.load_pixel_model(config.student, num_classes=None)
        student = models.fresh_copy(architecture)
        if student.output_shape[-1] != num_classes:
            raise ShapeMismatchError(f"{config.student} has {student.output_shape[-1]} outputs, {config.dataset} "
                                     f"has {num_classes} classes")
        if tuple(student.input_shape[1:]) != tuple(image_shape):
            raise ShapeMismatchError(f"{config.student} takes {tuple(student.input_shape[1:])} images, the data are "
                                     f"{tuple(image_shape)} (see --image_size)")
        return student
    if config.student:
        spec = models.parse_student_spec(config.student)
    else:
        spec = models.StudentSpec("mobilenetv2", (("keep", config.keep_blocks), ("stem_stride", config.stem_stride),
                                                  ("width", config.width_multiplier)))
    return models.with_preprocessing(spec.build_core(num_classes, tuple(image_shape)), spec.input_spec)


def data_image_shape(info, config):
    shape = data.image_shape(info, config.image_size or None)
    if None in shape:
        raise InvalidArgumentError(f"{config.dataset} has images of varying size: give --image_size")
    return tuple(int(dim) for dim in shape)


def logits_store_dir(store_dir):
    """Where the methods without the IG overlay keep a logits-only store: beside ``store_dir``."""
    return os.path.normpath(store_dir) + "_logits"


def ensure_store(config, teacher, store_dir, progress=True, teacher_hash=None):
    """Open the store for ``config``, building it first if it does not exist.

    A method without the IG overlay needs only the teacher's logits. It reads the finished
    store in ``store_dir`` if there is one, and otherwise a logits-only store in
    :func:`logits_store_dir`, which costs one teacher pass instead of IG for every image.
    Both give the same logits and the same batches, so the trained student is the same.
    """
    teacher_hash = teacher_hash or records.weights_fingerprint(teacher)
    if config.uses_ig or os.path.exists(os.path.join(store_dir, records.MANIFEST)):
        targets = records.TeacherTargets.for_model(teacher, steps=config.ig_steps, method=config.ig_method,
                                                   baseline=config.ig_baseline, max_batch=config.ig_max_batch)
        map_encoding = config.map_encoding
    else:
        targets = records.TeacherTargets.for_model(teacher, with_maps=False)
        store_dir, map_encoding = logits_store_dir(store_dir), records.NO_MAPS
    image_size = config.image_size or None
    expected = records.store_settings(config.dataset, config.train_split, teacher_hash, targets.settings(),
                                      map_encoding, image_size=image_size)
    if not os.path.exists(os.path.join(store_dir, records.MANIFEST)):
        records.precompute_store(store_dir, targets, teacher_hash, config.dataset, config.train_split,
                                 config.data_dir, examples_per_shard=config.examples_per_shard,
                                 map_encoding=map_encoding, progress=progress, image_size=image_size)
    return records.Store(store_dir, expected=expected)


def stratified_indices(labels, fraction, seed):
    """Sorted indices of a class-stratified random subset (the paper's Monte Carlo protocol)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(rng.choice(members, size=max(1, int(round(fraction * len(members)))), replace=False))
    return np.sort(np.concatenate(chosen))


def plain_training_dataset(ds, batch_size, seed=0, keep=None, epochs=None, initial_epoch=0, augment="crop_flip",
                           mix=None):
    """(input, label, id) batches with the same augmentation as the store pipeline, no targets.

    ``epochs``/``initial_epoch`` as in :func:`kdig_tf.overlay.seeded_epochs`; ``augment`` is
    one of ``data.AUGMENTATIONS``; ``mix`` a :class:`kdig_tf.mixing.Mix` (labels become distributions).
    """
    data.check_augmentation(augment)
    num_examples = data.count_examples(ds)
    if keep is not None:
        table = overlay.index_mask(keep, num_examples)
        ds = ds.enumerate().filter(lambda index, example: tf.gather(table, index)).map(lambda index, example: example)
        num_examples = len(keep)
    batches = overlay.seeded_epochs(ds, batch_size, seed, shuffle_buffer=num_examples, epochs=epochs,
                                    initial_epoch=initial_epoch)

    def augmented(batch, batch_seed):
        images, labels, ids = batch
        crop_seed, _ = overlay.split_batch_seed(batch_seed)
        inputs = data.augment_batch(tf.cast(images, tf.float32) / 255.0, crop_seed, augment)
        if mix is not None:
            inputs, labels = mix(inputs, labels, batch_seed)
        return inputs, labels, ids
    return batches.map(augmented, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def resume_epoch(backup_dir):
    """The epoch a BackupAndRestore checkpoint in ``backup_dir`` resumes at (0 without one)."""
    checkpoint = tf.train.latest_checkpoint(os.path.join(backup_dir, "chief"))
    if checkpoint is None:
        return 0
    try:
        return int(tf.train.load_variable(checkpoint, "ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE")) + 1
    except (tf.errors.NotFoundError, ValueError) as err:
        raise NotAModelError(f"{checkpoint} is not a readable BackupAndRestore checkpoint: {err}") from err


def _subset_keep(config, store, raw_train):
    if config.subset_fraction >= 1.0:
        return None
    if store is not None:
        labels = store.read_all()["label"]
    else:
        labels = np.array([int(label) for _, label, _ in raw_train])
    return stratified_indices(labels, config.subset_fraction, config.subset_seed)


def _optimizer(config, steps_per_epoch):
    learning_rate = schedules.learning_rate(config.learning_rate, config.lr_schedule, config.epochs * steps_per_epoch,
                                            config.warmup_steps)
    # The weight average lives in the optimizer's variables, so BackupAndRestore checkpoints it.
    ema = {"use_ema": True, "ema_momentum": config.ema_decay} if config.ema_decay > 0 else {}
    if config.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate, weight_decay=config.weight_decay or None, **ema)
    return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, weight_decay=config.weight_decay or None,
                                **ema)


def evaluate_student(student_model, config, split):
    """(accuracy in percent, number of examples) of a pixel model on one split."""
    from kdig_tf import benchmark

    raw, _ = load_split(config, split)
    scores = benchmark.evaluate_accuracy(benchmark.keras_predictor(student_model), raw)
    return scores["accuracy"], scores["num_examples"]


def distiller_batches(ds, cached_logits=True):
    """Pipeline batches -> the Distiller's ``({"images", ["teacher_logits",] "example_id"}, labels)``.

    Takes ``(images, labels, ids)`` (plain pipeline) or ``(images, labels, logits, ids)`` (store).
    ``cached_logits=False`` drops the store's logits: the teacher then scores each batch online.
    """
    def to_inputs(images, labels, *rest):
        inputs = {distiller.IMAGES: images, distiller.EXAMPLE_ID: rest[-1]}
        if len(rest) == 2 and cached_logits:
            inputs[distiller.TEACHER_LOGITS] = rest[0]
        return inputs, labels
    return ds.map(to_inputs)


def validation_dataset(val_raw, teacher=None, batch_size=256):
    """Batches of ``({"images"[, "teacher_logits"]}, labels)`` for the validation split, [0, 1] images.

    With a teacher (a pixel model), its logits are computed once here, in the same pass as the
    images, so validation reports the real KD term instead of zero and cannot misalign them.
    """
    pixels, labels, logits = [], [], []
    if teacher is not None:
        core, spec = models.split_preprocessing(loading.as_pixel_model(teacher))
    for images, batch_labels, _ in val_raw.batch(batch_size):
        pixels.append(images.numpy())
        labels.append(batch_labels.numpy())
        if teacher is not None:
            logits.append(core(spec.from_pixels(images), training=False).numpy())
    features = {distiller.IMAGES: np.concatenate(pixels)}
    if teacher is not None:
        features[distiller.TEACHER_LOGITS] = np.concatenate(logits)

    def to_unit(batch, batch_labels):
        return dict(batch, **{distiller.IMAGES: data.to_unit_range(batch[distiller.IMAGES])}), batch_labels
    return tf.data.Dataset.from_tensor_slices((features, np.concatenate(labels))).batch(batch_size).map(to_unit)


class EpochTimer(keras.callbacks.Callback):
    """Adds ``epoch_seconds`` to each epoch's logs, so the CSV log keeps it across restarts."""

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self._started


class SaveStudentAtEnd(keras.callbacks.Callback):
    """Writes the trained student before ``BackupAndRestore`` deletes its backup.

    Placed ahead of it in the callback list, so no moment exists at which a kill would lose
    both the backup and the trained student.
    """

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_end(self, logs=None):
        with atomic_path(self.path) as tmp, hdf5_on_purpose():
            self.model.save_student(tmp)


def training_settings(config, teacher_hash=None):
    """What a run's trained student depends on: every setting but NON_TRAINING_FIELDS, plus the teacher."""
    settings = {key: value for key, value in dataclasses.asdict(config).items() if key not in NON_TRAINING_FIELDS}
    settings["teacher_sha256"] = teacher_hash
    settings["augment"] = config.augmentation()  # what auto meant for this dataset is what was trained
    return settings


def _with_resolved_augment(flags):
    """A flags dict with ``augment=auto`` replaced by what it means for its dataset."""
    if flags.get("augment") != "auto":
        return flags
    return dict(flags, augment=DistillConfig(dataset=flags.get("dataset", DistillConfig.dataset)).augmentation())


def claim_workdir(workdir, settings):
    """Record ``settings`` in a new workdir, or check that an existing one was started with them."""
    path = os.path.join(workdir, RUN_CONFIG)
    if not os.path.exists(path):
        leftovers = [name for name in (RESULTS, STUDENT, HISTORY) if os.path.exists(os.path.join(workdir, name))]
        leftovers += [BACKUP] if holds_files(os.path.join(workdir, BACKUP)) else []
        if leftovers:
            raise StaleRunError(f"{workdir} holds {leftovers} from a run of unrecorded settings; "
                                "use a new --workdir or delete it")
        atomic_write_json(path, settings)
        return
    changes = settings_changes(workdir, settings)
    if changes:
        raise StaleRunError(f"{workdir} was started with other settings ({'; '.join(changes)}); "
                            "use a new --workdir or delete it")


def settings_changes(workdir, settings):
    """["key: recorded -> now", ...] between a workdir's recorded training settings and ``settings``."""
    path = os.path.join(workdir, RUN_CONFIG)
    try:
        with open(path) as handle:
            recorded = json.load(handle)
    except (OSError, ValueError) as err:
        raise StaleRunError(f"{path} is unreadable ({err}); use a new --workdir or delete it") from err
    # A run recorded before a setting existed was trained with that setting's default.
    recorded = dict({key: value for key, value in FIELDS_ADDED_LATER.items() if key not in NON_TRAINING_FIELDS},
                    **recorded)
    return [f"{key}: {recorded.get(key)!r} -> {settings.get(key)!r}"
            for key in sorted(set(recorded) | set(settings)) if recorded.get(key) != settings.get(key)]


def read_training_machines(workdir):
    """The machines.json list of ``workdir`` ([] if there is none yet)."""
    path = os.path.join(workdir, MACHINES)
    if not os.path.exists(path):
        return []
    entries = read_json_or_none(path)
    if not isinstance(entries, list):
        raise CorruptRunFileError(f"{path} is not a JSON list; delete it (it only records where epochs ran)")
    return entries


def record_training_machine(workdir, first_epoch):
    """Add to machines.json the machine and kernels that train this run from ``first_epoch`` on.

    A campaign resumes its runs on whatever machine a session gets, and float32 round-off
    differs between CPUs and between TensorFlow's kernel libraries (Eigen, oneDNN), so a
    reader of the results needs to know which epochs ran where.
    """
    from kdig_tf import benchmark

    environment = benchmark.environment()
    entry = {"first_epoch": int(first_epoch), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             **{key: environment[key] for key in ("cpu_model", "cpu_count", "cpu_flags", "tensorflow",
                                                  "tensorflow_onednn")}}
    atomic_write_json(os.path.join(workdir, MACHINES), read_training_machines(workdir) + [entry])


def _finished_results(workdir, config):
    """The results of an identical finished run in ``workdir``, else None."""
    results = read_json_or_none(os.path.join(workdir, RESULTS))
    if results is None or not isinstance(results.get("flags"), dict):
        return None
    recorded, asked = dict(FIELDS_ADDED_LATER, **results["flags"]), dataclasses.asdict(config)
    recorded, asked = _with_resolved_augment(recorded), _with_resolved_augment(asked)
    for key in CHECK_ONLY_FIELDS:
        recorded.pop(key, None), asked.pop(key, None)
    return results if recorded == asked else None


def _distiller(config, teacher, student_model, attention=True):
    """The Distiller of ``config``'s method; attention transfer layers by flag or by matching sizes.

    ``attention=False`` leaves attention transfer out (the fine-tuning stages).
    """
    alpha, _, gamma = config.effective()
    at_layers = None
    if config.at_teacher_layer and config.at_student_layer:
        at_layers = (config.at_teacher_layer, config.at_student_layer)
    kd_loss = distiller.kd_loss_from_name(config.kd_loss, config.temperature, config.dkd_alpha, config.dkd_beta)
    return distiller.paper_distiller(teacher, student_model, alpha, config.temperature, gamma if attention else 0.0,
                                     at_layers, kd_weight=config.kd_weight_effective, kd_loss=kd_loss)


def _teacher_params(config, teacher):
    """The teacher's trainable parameters (the compression factor's numerator), None without a teacher."""
    if teacher is None:
        if not config.teacher or not os.path.exists(config.teacher):
            return None
        try:
            teacher = load_teacher(config.teacher)
        except KdigError:  # a method without a teacher must not fail on an unreadable teacher file
            return None
    return models.count_trainable_params(teacher)


def run_distillation(config, workdir, progress=True, extra_callbacks=()):
    """Run one distillation end to end and return the results dict (also in results.json).

    An identical finished run in ``workdir`` is returned as it is. ``extra_callbacks`` are
    appended to ``fit``'s callbacks (e.g. for notebooks or tests).

    The workdir is locked for the whole call: another process gets ``WorkdirBusyError``.
    Training stops with ``DivergedError`` at the first non-finite loss or weight; no student
    or export is written, ``failed.json`` records where, and later calls into the workdir are
    refused. A full disk raises ``OutOfSpaceError`` and leaves the run resumable.
    """
    config.validate()
    # Made before TensorFlow runs anything: a multi-worker strategy configures its collectives once.
    strategy = distribute.make_strategy(config.distribution)
    if not distribute.is_chief(strategy):
        return _run_as_worker(config, workdir, strategy, progress, extra_callbacks)
    with locks.DirLock(workdir, what="workdir", remove_empty=True):
        refuse_diverged_run(workdir)
        check_teacher_sha256(config)
        with guards.disk_full_as_error(workdir, lambda: space_needed(config, workdir)):
            try:
                return _run_locked(config, workdir, progress, extra_callbacks, strategy)
            except DivergedError as err:
                raise record_divergence(workdir, err) from err


# What to lower after a divergence, per stage of a run.
DIVERGENCE_ADVICE = {"training": "--learning_rate", "fine-tuning": "--qat_learning_rate / --prune_learning_rate"}


def record_divergence(workdir, err):
    """Write ``failed.json`` for a DivergedError; return the error to raise, saying what to do."""
    advice = (f"start a new --workdir with a lower {DIVERGENCE_ADVICE.get(err.stage, '--learning_rate')} "
              f"(or delete {workdir})")
    atomic_write_json(os.path.join(workdir, FAILED), {
        "error": type(err).__name__, "message": str(err), "stage": err.stage, "epoch": err.epoch, "step": err.step,
        "advice": advice, "failed_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return DivergedError(f"{err}; recorded in {os.path.join(workdir, FAILED)}: {advice}", epoch=err.epoch,
                         step=err.step, stage=err.stage)


def refuse_diverged_run(workdir):
    """Raise DivergedError if ``workdir`` holds a run that diverged (it would diverge again)."""
    path = os.path.join(workdir, FAILED)
    if not os.path.exists(path):
        return
    record = read_json_or_none(path) or {}
    raise DivergedError(f"{workdir} holds a run that diverged ({record.get('message', 'see ' + path)}); "
                        f"rerunning it would diverge again: {record.get('advice', 'start a new --workdir')}",
                        epoch=record.get("epoch"), step=record.get("step"), stage=record.get("stage"))


def check_teacher_sha256(config):
    """Raise ChecksumMismatchError if ``config.teacher_sha256`` is given and the teacher file differs."""
    if not config.teacher_sha256 or not (config.uses_kd or config.uses_ig or config.uses_at):
        return
    if not os.path.exists(config.teacher):
        return  # load_teacher names the missing teacher
    if not os.path.isfile(config.teacher):
        raise InvalidArgumentError(f"--teacher_sha256 needs a teacher file, {config.teacher} is a directory")
    found = sha256_file(config.teacher)
    if found != config.teacher_sha256.lower():
        raise ChecksumMismatchError(f"teacher {config.teacher} has sha256 {found}, not {config.teacher_sha256} as "
                                    "--teacher_sha256 says: the file was changed or replaced; restore it (its model "
                                    "card gives the sha256) or drop --teacher_sha256")


def space_needed(config, workdir):
    """About how many bytes a run still writes, for OutOfSpaceError (None if nothing hints at it).

    The student's size comes from student.h5, else its backup checkpoint (weights and two
    optimizer slots), else the teacher file (a compressed student is smaller). A run writes
    a checkpoint, student.h5 and one file per export.
    """
    student = os.path.join(workdir, STUDENT)
    backup = os.path.join(workdir, BACKUP)
    backup_bytes = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(backup)
                       for name in names)
    if os.path.isfile(student):
        model_bytes = os.path.getsize(student)
    elif backup_bytes:
        model_bytes = backup_bytes // 3
    elif config.teacher and os.path.isfile(config.teacher):
        model_bytes = os.path.getsize(config.teacher)
    else:
        return None
    return model_bytes * (4 + len(config.modes()))


def preflight(config, class_names=None):
    """Checks that need only the splits' labels, made before any work; returns warnings about the run.

    Raises SplitClassMismatchError if the validation split holds a class the training split
    lacks (or holds a handful of), and InvalidArgumentError for a weight average too slow for
    the run's length; warns (returns sentences) when the run has too few optimizer steps.
    """
    labels = {split: data.split_labels(config.dataset, split, config.data_dir, download=config.download)
              for split in {config.train_split, config.val_split}}
    data.check_split_classes(labels[config.train_split], labels[config.val_split], class_names, config.train_split,
                             config.val_split)
    num_train = len(labels[config.train_split])
    if config.subset_fraction < 1.0:
        num_train = len(stratified_indices(labels[config.train_split], config.subset_fraction, config.subset_seed))
    total_steps = config.epochs * -(-num_train // config.batch_size)
    selection.check_ema(config.ema_decay, config.keep, total_steps)
    found = selection.step_warnings(total_steps, config.epochs, num_train, config.batch_size)
    for warning in found:
        logs.warn(warning)
    return found


def check_store_holds_split(store, config):
    """Raise StoreMismatchError if a folder dataset's store holds other images than its training split.

    The store's manifest names the split (``train[:90%]``), not the images: a store built
    before folder splits were cut from their hashed, stratified order holds another slice,
    which may overlap the validation split.
    """
    if not data.is_folder_dataset(config.dataset):
        return  # a tfds split is the same images as when its store was built
    stored = {example_id.decode() if isinstance(example_id, bytes) else example_id for example_id in store.verify_ids()}
    wanted = set(data.folder_split_ids(config.dataset, config.train_split))
    if stored != wanted:
        raise records.StoreMismatchError(
            f"store {store.store_dir} holds {len(stored - wanted)} images that are not in split {config.train_split!r} "
            f"of {config.dataset} (and lacks {len(wanted - stored)} that are): it was built from another cut of the "
            "folder (folder splits are now cut from a fixed, stratified order); delete it or give a new --store_dir")


def check_teacher(config, teacher, teacher_hash, workdir, num_classes, progress=True):
    """The teacher's accuracy on the validation split (cached in teacher_check.json); WeakTeacherError if weak."""
    val_raw, _ = load_split(config, config.val_split)
    key = {"teacher_fingerprint": teacher_hash, "dataset": config.dataset, "val_split": config.val_split,
           "image_size": config.image_size}
    record = teacher_check.check_teacher(teacher, val_raw, num_classes, workdir, key, config.teacher_min_accuracy,
                                         config.skip_teacher_check, progress)
    if progress:
        print(teacher_check.describe(record), flush=True)
    return record


def _run_as_worker(config, workdir, strategy, progress, extra_callbacks):
    """A non-chief worker of a multi-worker run: the chief's run in lockstep, with the chief's backup
    (BackupAndRestore reads it on every worker), every other output in a temporary directory."""
    refuse_diverged_run(workdir)  # what stops the chief before training stops this worker too
    check_teacher_sha256(config)
    finished = _finished_results(workdir, config)
    if finished is not None:
        return finished
    with distribute.worker_workdir(workdir, strategy) as own_workdir:
        return _run_locked(config, own_workdir, progress, extra_callbacks, strategy, shared_workdir=workdir)


def _run_locked(config, workdir, progress, extra_callbacks, strategy=None, shared_workdir=None):
    """:func:`run_distillation` once ``workdir`` is locked; ``shared_workdir`` holds the backup if not ``workdir``."""
    strategy = strategy or distribute.make_strategy("default")
    finished = _finished_results(workdir, config)
    if finished is not None:
        return _reexport_if_missing(finished, config, workdir)
    keras.utils.set_random_seed(config.seed)
    alpha, p, gamma = config.effective()
    _, info = load_split(config, config.val_split)  # fail early on bad data
    num_classes = data.num_classes(info)
    image_shape = data_image_shape(info, config)
    run_warnings = preflight(config, data.class_names(info))
    if config.qat_epochs > 0:
        check_qat_supported(config, num_classes, image_shape)  # the student is seeded again before it is built
    started = time.time()

    teacher = None
    store = None
    if config.uses_kd or config.uses_ig or config.uses_at:
        teacher = load_teacher(config.teacher, num_classes)
        if teacher.output_shape[-1] != num_classes:
            raise InvalidArgumentError(f"teacher has {teacher.output_shape[-1]} classes, {config.dataset} "
                                       f"has {num_classes}")
        expected = tuple(teacher.input_shape[1:])
        if any(want is not None and want != have for want, have in zip(expected, image_shape)):
            raise ShapeMismatchError(f"teacher takes {expected} images, {config.dataset} gives {image_shape} "
                                     "(see --image_size)")
    teacher_hash = None if teacher is None else records.weights_fingerprint(teacher)
    os.makedirs(workdir, exist_ok=True)
    claim_workdir(workdir, training_settings(config, teacher_hash))
    if shared_workdir and os.path.exists(os.path.join(shared_workdir, RUN_CONFIG)):
        # Reads only: the run in the chief's workdir must be this one.
        claim_workdir(shared_workdir, training_settings(config, teacher_hash))
    checked_teacher = None if teacher is None else check_teacher(config, teacher, teacher_hash, workdir, num_classes,
                                                                 progress)
    if (config.uses_kd and not config.teacher_online) or config.uses_ig:
        store = ensure_store(config, teacher, config.store_dir or os.path.join(workdir, "store"), progress,
                             teacher_hash)
        store.check_fits(num_classes, image_shape)
        check_store_holds_split(store, config)
    store_seconds = time.time() - started
    raw_train = None if store is not None else load_split(config, config.train_split)[0]
    keep = _subset_keep(config, store, raw_train)

    if store is not None:
        num_train = store.num_examples if keep is None else len(keep)
    else:
        num_train = data.count_examples(raw_train) if keep is None else len(keep)
    steps_per_epoch = -(-num_train // config.batch_size)
    val_raw, _ = load_split(config, config.val_split)
    student_path = os.path.join(workdir, STUDENT)
    history_path = os.path.join(workdir, HISTORY)
    backup_dir = os.path.join(shared_workdir or workdir, BACKUP)
    mix = mixing.make_mix(config.mix, config.mix_alpha, num_classes)

    if os.path.exists(student_path):  # trained by an earlier call with these settings (checked above)
        student_model = loading.load_pixel_model(student_path)
    else:
        if not holds_files(backup_dir) and os.path.exists(history_path):
            os.remove(history_path)  # epochs logged by a run that left no checkpoint cannot be resumed
        # The input stream starts where BackupAndRestore will resume, so a resumed run trains
        # on exactly the batches an uninterrupted one would have.
        first_epoch = resume_epoch(backup_dir)
        read_epoch_log(history_path)  # a damaged log is refused (CorruptRunFileError) before training, not after
        if store is not None:
            train_ds = overlay.training_dataset(
                store, config.batch_size, p=p, beta=config.beta, power_range=(config.power_low, config.power_high),
                seed=config.seed, paper_mode=config.paper_overlay, cached_targets_order=config.cached_targets_order,
                keep_indices=keep, epochs=config.epochs, initial_epoch=first_epoch, augment=config.augmentation(),
                mix=mix)
        else:
            train_ds = plain_training_dataset(raw_train, config.batch_size, config.seed, keep, epochs=config.epochs,
                                              initial_epoch=first_epoch, augment=config.augmentation(), mix=mix)
        # Without cached logits in a batch the Distiller asks the teacher (kd_online, kd_ig_online).
        train_ds = distribute.shard_by_data(distiller_batches(train_ds, not config.teacher_online), strategy)
        val_ds = distribute.shard_by_data(
            validation_dataset(val_raw, teacher if config.kd_weight_effective > 0 else None), strategy)
        online_teacher = teacher if gamma > 0 or config.teacher_online else None
        # Models and optimizer are made in the strategy's scope (batch_size stays the global batch).
        with strategy.scope():
            if online_teacher is not None and config.distribution != "default":
                online_teacher = load_teacher(config.teacher, num_classes)  # its variables too, before the seed
            # Reseeded here because loading the teacher and building the store consume random
            # ops: every arm of a campaign then starts from the same weights for the same seed
            # (and sees the same batches), so arms can be compared seed by seed.
            keras.utils.set_random_seed(config.seed)
            with distribute.precision_policy(config.precision):
                model = _distiller(config, online_teacher, build_student_model(config, num_classes, image_shape))
            student_model = model.student
            model.compile(optimizer=_optimizer(config, steps_per_epoch), metrics=[distiller.LabelAccuracy()])
            model(tf.zeros((1,) + tuple(model.student.input_shape[1:])))  # BackupAndRestore needs a built model
        record_training_machine(workdir, first_epoch)
        # Order matters. The timer writes into the logs CSVLogger reads. An epoch is logged
        # before it is backed up, so a kill in between makes a duplicate row (read_epoch_log
        # keeps the later one), never a missing one. The student is saved before
        # BackupAndRestore removes the backup at the end of training. The divergence guard
        # comes before all three, so a non-finite epoch is neither logged, backed up nor saved.
        # KeepBestWeights restores the best epoch before the student is saved.
        keep_best = [selection.KeepBestWeights(workdir, fresh=first_epoch == 0)] if config.keep == "best" else []
        callbacks = [EpochTimer(), guards.DivergenceGuard(), *keep_best, SaveStudentAtEnd(student_path),
                     keras.callbacks.CSVLogger(history_path, append=True),
                     keras.callbacks.BackupAndRestore(backup_dir), *extra_callbacks]
        model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                  callbacks=callbacks, verbose=config.verbose if progress else 0)
        if config.distribution != "default" or config.precision != "float32":
            student_model = loading.load_pixel_model(student_path)  # float32, outside the strategy: for eval and export
    history = read_epoch_log(history_path)
    val_accuracy, num_val = evaluate_student(student_model, config, config.val_split)
    student_params = models.count_trainable_params(student_model)
    teacher_params = _teacher_params(config, teacher)
    results = {
        "method": config.method, "seed": config.seed,
        "val_accuracy": val_accuracy, "val_split": config.val_split, "num_val": num_val,
        "effective": {"alpha": alpha, "p": p, "gamma": gamma},
        "trainable_params": student_params,
        "teacher_params": teacher_params,
        "compression": None if teacher_params is None else teacher_params / student_params,
        "student_model": student_model.name,
        "image_shape": list(image_shape),
        "num_train": num_train,
        # Summed over epochs, across restarts; the store is timed apart (this process only).
        "train_seconds": float(np.nansum(history.get("epoch_seconds", [np.nan]))),
        "store_seconds_this_process": store_seconds,
        "student_path": os.path.abspath(student_path),
        "store": None if store is None else {"dir": os.path.abspath(store.store_dir),
                                              "teacher_sha256": store.manifest["teacher_sha256"],
                                              "ig": store.manifest["ig"]},
        "history": {key: values for key, values in history.items() if key != "epoch"},
        "epochs_logged": len(history.get("epoch", [])),
        "machines": read_training_machines(workdir),
        "flags": dataclasses.asdict(config),
        "augment": config.augmentation(),
        "teacher_check": checked_teacher,
        "selection": selection.selection_record(config.keep, workdir, len(history.get("epoch", [])), config.val_split,
                                                config.ema_decay),
        "warnings": run_warnings,
    }
    if config.eval_split:
        results["eval_accuracy"], results["num_eval"] = evaluate_student(student_model, config, config.eval_split)
        results["eval_split"] = config.eval_split
    student, spec = models.split_preprocessing(student_model)
    val = validation_arrays(val_raw, config.val_split, spec)
    results["tflite"] = _export(student, spec, config, workdir, info, val=val)
    source = TrainingSource(config, teacher, store, raw_train, keep, steps_per_epoch, spec, progress, mix)
    exports, stages = _compression_stages(student, spec, config, workdir, val, info, source)
    results["tflite"].update(exports)
    results.update(stages)
    summary.write_markdown(results, workdir)  # before results.json, which marks a finished run
    atomic_write_json(os.path.join(workdir, RESULTS), results)
    return results


def _reexport_if_missing(results, config, workdir):
    """A finished run's results, after remaking any .tflite export that is not on disk.

    Exports are derived from student.h5 (and the kept fine-tuned models) and not kept by
    git, so a fresh checkout of a finished run lacks them; remaking them needs neither the
    teacher nor the store.
    """
    plain = [f"student_{mode}.tflite" for mode in config.modes()]
    if all(os.path.isfile(os.path.join(workdir, name)) for name in plain + _stage_exports(config)):
        return results
    student_path = os.path.join(workdir, STUDENT)
    if not os.path.isfile(student_path):
        raise NotAModelError(f"{workdir} has results but no {STUDENT}: delete the workdir to retrain")
    val_raw, info = load_split(config, config.val_split)
    student, spec = models.split_preprocessing(loading.load_pixel_model(student_path))
    val = validation_arrays(val_raw, config.val_split, spec)
    tflite = dict(results.get("tflite") or {})
    if not all(os.path.isfile(os.path.join(workdir, name)) for name in plain):
        tflite.update(_export(student, spec, config, workdir, info, val=val))
    exports, stages = _compression_stages(student, spec, config, workdir, val, info, source=None)
    results = dict(results, tflite=dict(tflite, **exports), **stages)
    summary.write_markdown(results, workdir)
    atomic_write_json(os.path.join(workdir, RESULTS), results)
    return results


def validation_arrays(val_raw, split, spec, batch_size=256):
    """The whole validation split as the input of the network behind ``spec``: {"images", "labels", "split"}."""
    batches = val_raw.map(lambda image, label, _: (spec.from_pixels(image), label),
                          num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    images, labels = [], []
    for image_batch, label_batch in batches.as_numpy_iterator():
        images.append(image_batch)
        labels.append(label_batch)
    if not labels:
        raise InvalidArgumentError(f"validation split {split!r} is empty")
    return {"images": np.concatenate(images), "labels": np.concatenate(labels), "split": split}


def _representative(config, spec):
    """int8 calibration images, from the training split (exports are checked on validation ones)."""
    from kdig_tf import export

    train_raw, _ = load_split(config, config.train_split)
    return export.representative_from_split(train_raw, spec.from_pixels, n=256)


def _convert(student, spec, path, mode, info, representative=None):
    """Export the network behind the student's preprocessing; the sidecar says how to feed it."""
    from kdig_tf import export

    return export.convert(student, path, mode, representative_images=representative if mode == "int8" else None,
                          input_kind=spec.space, mean=spec.mean, std=spec.std, labels=data.class_names(info))


def _export(student, spec, config, workdir, info, check_images=512, val=None):
    """Convert to every requested mode, check each file against the Keras student and score it."""
    if not config.modes():
        return {}
    representative = _representative(config, spec) if "int8" in config.modes() else None
    from tqdm.auto import tqdm

    exported = {}
    for mode in tqdm(config.modes(), desc="TFLite export + scoring", unit="file", disable=not config.verbose):
        path = os.path.join(workdir, f"student_{mode}.tflite")
        _convert(student, spec, path, mode, info, representative)
        exported[mode] = score_export(student, path, val, check_images)
    return exported


# Written into a .tflite's sidecar once it is scored; a sidecar without them is an unfinished export.
SCORE_FIELDS = ("val_accuracy", "val_split", "num_val", "file_bytes")
STAGE_RECORDS = ("qat", "pruning")


def score_export(model, path, val, check_images=512, **record):
    """Check ``path`` against its Keras ``model`` on the first validation images, score it with
    LiteRT on all of them, add both (and ``record``) to its sidecar; return its results entry."""
    from kdig_tf import export

    images, labels = val["images"], val["labels"]
    check = export.check_export(model, path, images[:check_images], labels[:check_images])
    # val_accuracy is in percent, like results["val_accuracy"].
    export.add_to_sidecar(path, export_check=check, val_accuracy=export.evaluate_tflite(path, images, labels),
                          val_split=val["split"], num_val=int(len(labels)), file_bytes=os.path.getsize(path),
                          **record)
    return scored_export(path, val["split"])


def scored_export(path, val_split):
    """The results entry of a .tflite already exported and scored on ``val_split``, else None."""
    from kdig_tf import export

    if not os.path.isfile(path):
        return None
    try:
        sidecar = export.load_sidecar(path)
    except KdigError:
        return None
    if sidecar.get("val_split") != val_split or not all(key in sidecar for key in SCORE_FIELDS + ("export_check",)):
        return None
    return {"path": os.path.abspath(path), **sidecar["export_check"],
            **{key: sidecar[key] for key in SCORE_FIELDS + STAGE_RECORDS if key in sidecar}}


def _pruned_modes(config):
    return ["fp32"] + [mode for mode in config.modes() if mode != "fp32"]


def _stage_exports(config):
    """File names of the QAT and pruned exports ``config`` asks for."""
    names = [QAT_TFLITE] if config.qat_epochs > 0 else []
    if config.prune_sparsity > 0:
        names += [PRUNED_TFLITE.format(mode=mode) for mode in _pruned_modes(config)]
    return names


def stage_seed(seed, stage):
    """The seed of a fine-tuning stage ("qat" or "prune"), derived from the run's seed alone."""
    return int(np.random.SeedSequence([seed, {"qat": 1, "prune": 2}[stage]]).generate_state(1)[0] % 2**31)


def check_qat_supported(config, num_classes, image_shape):
    """Raise UnsupportedLayerError if tfmot cannot wrap this config's student network for QAT."""
    from kdig_tf import export

    student, _ = models.split_preprocessing(build_student_model(config, num_classes, image_shape))
    export.quantize_aware(student)


class TrainingSource:
    """The data and KD loss of the main fit, for the fine-tuning stages after it.

    A stage sees the same kind of batches (store targets with the overlay, or plain
    images) under its own seed, and the same KD loss with a constant-rate Adam. Attention
    transfer is left out: tfmot's wrappers rename the layers it reads.
    """

    def __init__(self, config, teacher, store, raw_train, keep, steps_per_epoch, spec, progress=True, mix=None):
        self.config, self.teacher, self.store, self.spec = config, teacher, store, spec
        self.raw_train, self.keep, self.mix = raw_train, keep, mix
        self.steps_per_epoch, self.progress = steps_per_epoch, progress

    def dataset(self, seed, epochs):
        """``epochs`` epochs back to back (known length, so tfmot can plan its pruning schedule)."""
        config = self.config
        _, p, _ = config.effective()
        if self.store is not None:
            ds = overlay.training_dataset(
                self.store, config.batch_size, p=p, beta=config.beta, power_range=(config.power_low, config.power_high),
                seed=seed, paper_mode=config.paper_overlay, cached_targets_order=config.cached_targets_order,
                keep_indices=self.keep, epochs=epochs, augment=config.augmentation(), mix=self.mix)
        else:
            ds = plain_training_dataset(self.raw_train, config.batch_size, seed, self.keep, epochs=epochs,
                                        augment=config.augmentation(), mix=self.mix)
        ds = distiller_batches(ds, not config.teacher_online)
        return ds.apply(tf.data.experimental.assert_cardinality(self.steps_per_epoch * epochs))

    def fit(self, model, dataset, epochs, learning_rate, callbacks=()):
        """Train the network ``model`` in place on ``dataset`` (from :meth:`dataset`) with the run's KD loss."""
        online = self.config.kd_weight_effective > 0 and self.config.teacher_online
        teacher = self.teacher if online else None  # else logits are cached
        model = models.with_preprocessing(model, self.spec)
        trainer = _distiller(self.config, teacher, model, attention=False)
        trainer.compile(optimizer=keras.optimizers.Adam(learning_rate), metrics=[distiller.LabelAccuracy()])
        trainer.fit(dataset, epochs=epochs, steps_per_epoch=self.steps_per_epoch,
                    callbacks=[guards.DivergenceGuard("fine-tuning"), *callbacks],
                    verbose=self.config.verbose if self.progress else 0)
        return model


def _need_training(source, workdir, name):
    if source is None:
        raise NotAModelError(f"{workdir} has results but no {name}: delete the workdir to retrain")


def _compression_stages(student, spec, config, workdir, val, info, source=None):
    """Run the QAT and pruning stages config asks for; return (results["tflite"] entries, results entries).

    An export already scored is kept; a fine-tuned model on disk is re-exported, not
    retrained. ``source`` is the :class:`TrainingSource`; None (a finished run) forbids training.
    """
    exports, stages = {}, {}
    if config.qat_epochs > 0:
        exports["qat_int8"] = _qat_stage(student, spec, config, workdir, val, info, source)
        stages["qat"] = exports["qat_int8"]["qat"]
    if config.prune_sparsity > 0:
        for mode, entry in _pruning_stage(student, spec, config, workdir, val, info, source).items():
            exports[f"pruned_{mode}"] = entry
        stages["pruning"] = exports["pruned_fp32"]["pruning"]
    return exports, stages


def _qat_stage(student, spec, config, workdir, val, info, source):
    from kdig_tf import export

    path = os.path.join(workdir, QAT_TFLITE)
    done = scored_export(path, config.val_split)
    if done is not None:
        return done
    seed = stage_seed(config.seed, "qat")
    weights = os.path.join(workdir, QAT_WEIGHTS)
    keras.utils.set_random_seed(seed)
    qat = export.quantize_aware(student)
    if os.path.isfile(weights):
        qat.load_weights(weights)
    else:
        _need_training(source, workdir, QAT_WEIGHTS)
        source.fit(qat, source.dataset(seed, config.qat_epochs), config.qat_epochs, config.qat_learning_rate)
        with atomic_path(weights) as tmp:
            qat.save_weights(tmp)
    # Learned fake-quant ranges replace calibration data.
    _convert(qat, spec, path, "int8", info)
    record = {"epochs": config.qat_epochs, "learning_rate": config.qat_learning_rate, "seed": seed,
              "weights_path": os.path.abspath(weights)}
    return score_export(qat, path, val, qat=record)


def _pruning_stage(student, spec, config, workdir, val, info, source):
    from kdig_tf import export

    modes = _pruned_modes(config)
    paths = {mode: os.path.join(workdir, PRUNED_TFLITE.format(mode=mode)) for mode in modes}
    entries = {mode: scored_export(paths[mode], config.val_split) for mode in modes}
    todo = [mode for mode in modes if entries[mode] is None]
    if not todo:
        return entries
    seed = stage_seed(config.seed, "prune")
    model_path = os.path.join(workdir, PRUNED_STUDENT)
    if os.path.isfile(model_path):
        pruned = loading.load_model(model_path)
    else:
        _need_training(source, workdir, PRUNED_STUDENT)
        keras.utils.set_random_seed(seed)

        def fit_fn(model, dataset, callbacks=()):
            source.fit(model, dataset, config.prune_epochs, config.prune_learning_rate, callbacks)

        # epochs=1: the dataset already holds every epoch, and prune sizes its schedule from it.
        pruned = export.prune(student, source.dataset(seed, config.prune_epochs), config.prune_sparsity,
                              epochs=1, fit_fn=fit_fn)
        with atomic_path(model_path) as tmp:
            pruned.save(tmp, include_optimizer=False)
        todo = modes  # every export must come from this model
    record = {"target_sparsity": config.prune_sparsity, "sparsity": export.sparsity(pruned),
              "epochs": config.prune_epochs, "learning_rate": config.prune_learning_rate, "seed": seed,
              "student_path": os.path.abspath(model_path)}
    representative = _representative(config, spec) if "int8" in todo else None
    for mode in todo:
        _convert(pruned, spec, paths[mode], mode, info, representative)
        entries[mode] = score_export(pruned, paths[mode], val, pruning=record)
    return entries
