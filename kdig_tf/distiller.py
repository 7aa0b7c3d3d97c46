"""Knowledge distillation as a ``keras.Model`` that follows Keras 3's ``keras.distillation.Distiller``.

    distiller = Distiller(teacher, student, distillation_losses=[LogitsDistillation(T), AttentionTransfer(...)],
                          distillation_loss_weights=[w_kd, w_at], student_loss_weight=slw)
    distiller.compile(optimizer, loss=None, metrics=[LabelAccuracy()])   # loss: the student loss
    distiller.fit(dataset)

per example  L = slw * L_student(y, z_s) + (1 - slw) * sum_i w_i * D_i,  averaged over the (global) batch,
as in Keras. The student loss comes from ``compile(loss=...)`` (default: cross-entropy from logits, sparse
for class ids and categorical for the soft labels of a mix), the metrics from ``compile(metrics=...)``.
The Distiller overrides ``compute_loss`` only: the stock ``train_step``/``test_step`` reduce the gradients
under a ``tf.distribute`` strategy and scale the loss under ``mixed_float16``. This module holds the one
definition of the objective (:meth:`Distiller.compute_loss`); :func:`paper_distiller` is the paper's
(1 - alpha) * CE + alpha * T^2 * KL (+ gamma * AT), with an optional free KD weight and KD loss.

Differences from Keras, each for a reason:

- ``call`` takes ``[0, 1]`` images (or the training dict below) and runs the network behind the student's
  preprocessing layers: both models are *pixel models* (``kdig_tf.models``; bare kdig_tf networks are
  wrapped), and each network sees its own input space with the float operations of kdig_tf's pipelines.
  ``distiller.student``/``distiller.teacher`` are the models passed in, as in Keras.
- Batches are ``(images, labels)`` or ``({"images", "teacher_logits", "example_id"}, labels)``: cached
  teacher logits (from the IG/logit store) are used when the batch has them; otherwise the frozen
  teacher runs on exactly the batch the student sees.
- ``student_loss_scale`` (default 1) multiplies the student loss, so that an objective whose CE weight is 1
  next to distillation terms (the paper's ``at``: CE + gamma * AT), which Keras's convex weights cannot
  express, stays exact.
- Metrics ``loss`` (the total), ``ce_loss`` (the student loss) and one per distillation loss (``kd_loss``,
  ``at_loss``) are tracked per example, so an epoch's value is its mean over examples.
- With feature losses the student runs once per step, through one feature extractor that returns its
  logits and every feature map the losses read (Keras runs it a second time).
"""
import kdig_tf  # noqa: F401

import tensorflow as tf
import tf_keras as keras

from kdig_tf import distribute, loading, models
from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError, UnknownKeyError

IMAGES = "images"
TEACHER_LOGITS = "teacher_logits"
EXAMPLE_ID = "example_id"
LOGITS = "logits"
# Masks non-target classes out of a softmax without infinities (as the DKD authors do).
_MASK_OFFSET = 1000.0
# Attributes of the logits ``call`` returns: the student's feature maps of the same forward pass and
# whether it ran in training mode (Keras carries masks on tensors the same way).
_FEATURES_ATTR = "_kdig_student_features"
_TRAINING_ATTR = "_kdig_training"


class DistillationLoss:
    """A per-example distillation term between teacher and student outputs (Keras's ``DistillationLoss``).

    ``kind`` is ``"logits"`` (compares the models' logits) or ``"features"`` (outputs of the layers
    ``teacher_layer``/``student_layer``). ``uses_labels``: :meth:`per_example` needs the labels.
    """

    name = "distillation_loss"
    kind = "logits"
    uses_labels = False
    teacher_layer = None
    student_layer = None

    def per_example(self, teacher_outputs, student_outputs, labels=None):
        raise NotImplementedError

    def compute_loss(self, teacher_outputs, student_outputs, labels=None):
        """The batch mean of :meth:`per_example` (Keras's scalar form)."""
        return tf.reduce_mean(self.per_example(teacher_outputs, student_outputs, labels))

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _check_temperature(temperature):
    if not float(temperature) > 0.0:
        raise InvalidArgumentError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def softened_kl(teacher_logits, student_logits, temperature):
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) per example."""
    t = temperature
    teacher_log_probs = tf.nn.log_softmax(teacher_logits / t, axis=-1)
    student_log_probs = tf.nn.log_softmax(student_logits / t, axis=-1)
    kl = tf.reduce_sum(tf.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return t * t * kl


@keras.utils.register_keras_serializable(package="kdig_tf")
class LogitsDistillation(DistillationLoss):
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) per example (Hinton et al.)."""

    name = "kd_loss"

    def __init__(self, temperature=2.5):
        self.temperature = _check_temperature(temperature)

    def per_example(self, teacher_logits, student_logits, labels=None):
        return softened_kl(teacher_logits, student_logits, self.temperature)

    def get_config(self):
        return {"temperature": self.temperature}


def standardize_logits(logits, epsilon=1e-7):
    """Z-scored logits per example: (z - mean(z)) / (std(z) + epsilon), std over classes (population)."""
    mean, variance = tf.nn.moments(logits, axes=[-1], keepdims=True)
    return (logits - mean) / (tf.sqrt(variance) + epsilon)


@keras.utils.register_keras_serializable(package="kdig_tf")
class StandardizedLogitsDistillation(DistillationLoss):
    """Logit-standardised KD (Sun et al., CVPR 2024): :func:`softened_kl` of the z-scored logits at base
    temperature T. The standard deviation is the population one, as in the paper (the authors' code
    divides by n - 1, which equals a base temperature sqrt(n / (n - 1)) times larger)."""

    name = "kd_loss"

    def __init__(self, temperature=2.0):
        self.temperature = _check_temperature(temperature)

    def per_example(self, teacher_logits, student_logits, labels=None):
        return softened_kl(standardize_logits(teacher_logits), standardize_logits(student_logits), self.temperature)

    def get_config(self):
        return {"temperature": self.temperature}


def target_classes(labels, num_classes):
    """Class ids from labels that are ids [B] or distributions [B, C] (a mix: the dominant class)."""
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 2 and labels.shape[-1] == num_classes:
        return tf.argmax(labels, axis=-1)
    return tf.cast(tf.reshape(labels, [-1]), tf.int64)


@keras.utils.register_keras_serializable(package="kdig_tf")
class DecoupledDistillation(DistillationLoss):
    """Decoupled KD (Zhao et al., CVPR 2022): T^2 * (alpha * TCKD + beta * NCKD) per example.

    TCKD is the KL between the binary (target, rest) probabilities of teacher and student at
    temperature T; NCKD the KL between their distributions over the non-target classes. With mixed
    (soft) labels the target is the dominant class. The authors' warm-up of the loss is not included.
    """

    name = "kd_loss"
    uses_labels = True

    def __init__(self, alpha=1.0, beta=8.0, temperature=4.0):
        if not (float(alpha) >= 0.0 and float(beta) >= 0.0):
            raise InvalidArgumentError(f"DKD weights must be >= 0, got alpha={alpha} and beta={beta}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.temperature = _check_temperature(temperature)

    def per_example(self, teacher_logits, student_logits, labels=None):
        if labels is None:
            raise InvalidArgumentError("decoupled KD needs the labels (the target class)")
        t = self.temperature
        num_classes = student_logits.shape[-1]
        target = tf.one_hot(target_classes(labels, num_classes), num_classes, dtype=student_logits.dtype)

        def binary_log_probs(logits):
            log_probs = tf.nn.log_softmax(logits / t, axis=-1)
            log_target = tf.reduce_sum(log_probs * target, axis=-1)
            log_rest = tf.reduce_logsumexp(log_probs - _MASK_OFFSET * target, axis=-1)
            return tf.stack([log_target, log_rest], axis=-1)

        def kl(teacher_log_probs, student_log_probs):
            # multiply_no_nan: a class the teacher gives probability 0 adds 0, not 0 * inf.
            return tf.reduce_sum(tf.math.multiply_no_nan(teacher_log_probs - student_log_probs,
                                                         tf.exp(teacher_log_probs)), axis=-1)

        tckd = kl(binary_log_probs(teacher_logits), binary_log_probs(student_logits))
        nckd = kl(tf.nn.log_softmax(teacher_logits / t - _MASK_OFFSET * target, axis=-1),
                  tf.nn.log_softmax(student_logits / t - _MASK_OFFSET * target, axis=-1))
        return t * t * (self.alpha * tckd + self.beta * nckd)

    def get_config(self):
        return {"alpha": self.alpha, "beta": self.beta, "temperature": self.temperature}


# --kd_loss name -> class of the KD term.
KD_LOSSES = {"kl": LogitsDistillation, "kl_standardized": StandardizedLogitsDistillation,
             "dkd": DecoupledDistillation}


def kd_loss_from_name(name, temperature, dkd_alpha=1.0, dkd_beta=8.0):
    """The KD term ``name`` (a key of KD_LOSSES) at ``temperature``; UnknownKeyError for another name."""
    if name not in KD_LOSSES:
        raise UnknownKeyError(f"unknown kd_loss {name!r}; known: {sorted(KD_LOSSES)}")
    if name == "dkd":
        return DecoupledDistillation(dkd_alpha, dkd_beta, temperature)
    return KD_LOSSES[name](temperature)


def attention_map(features):
    """[B,H,W,C] -> L2-normalised [B,H*W] channel mean of F^2."""
    attention = tf.reduce_mean(tf.square(features), axis=-1)
    return tf.math.l2_normalize(tf.reshape(attention, [tf.shape(attention)[0], -1]), axis=-1)


@keras.utils.register_keras_serializable(package="kdig_tf")
class AttentionTransfer(DistillationLoss):
    """Mean squared difference of normalised attention maps (Zagoruyko & Komodakis), per example.

    ``teacher_layer``/``student_layer`` name the layers; :func:`matching_feature_layers` picks
    a pair by spatial size when they are not given.
    """

    name = "at_loss"
    kind = "features"

    def __init__(self, teacher_layer, student_layer):
        if not teacher_layer or not student_layer:
            raise InvalidArgumentError("attention transfer needs a teacher_layer and a student_layer")
        self.teacher_layer = teacher_layer
        self.student_layer = student_layer

    def per_example(self, teacher_features, student_features, labels=None):
        if teacher_features.shape[1:3] != student_features.shape[1:3]:
            raise ShapeMismatchError(
                f"attention transfer needs equal spatial sizes: teacher {teacher_features.shape[1:3]} "
                f"vs student {student_features.shape[1:3]}")
        difference = attention_map(teacher_features) - attention_map(student_features)
        return tf.reduce_mean(tf.square(difference), axis=-1)

    def get_config(self):
        return {"teacher_layer": self.teacher_layer, "student_layer": self.student_layer}


def is_label_distribution(labels, logits):
    """True for labels [B, C] that are distributions over the C classes (a mix), False for class ids
    ([B], or [B, 1] as Keras's compiled metrics reshape them)."""
    classes = logits.shape[-1]
    return labels.shape.rank == logits.shape.rank and labels.shape[-1] == classes and classes != 1


def label_accuracy(labels, logits):
    """Per-example accuracy for class-id labels or label distributions [B, C] (their dominant class)."""
    if is_label_distribution(labels, logits):
        return keras.metrics.categorical_accuracy(labels, logits)
    return keras.metrics.sparse_categorical_accuracy(labels, logits)


@keras.utils.register_keras_serializable(package="kdig_tf")
class LabelAccuracy(keras.metrics.MeanMetricWrapper):
    """``accuracy`` for both kinds of labels a Distiller sees: class ids (validation) and mixed labels."""

    def __init__(self, name="accuracy", dtype=None):
        super().__init__(label_accuracy, name, dtype=dtype)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


def default_student_loss(labels, logits):
    """Cross-entropy from logits per example: sparse for class ids, categorical for label distributions."""
    if is_label_distribution(labels, logits):
        return keras.losses.categorical_crossentropy(labels, logits, from_logits=True)
    return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def spatial_layers(model, size):
    """Names of the 4-D layers of ``model`` whose output is ``size`` x ``size``, deepest last."""
    names = []
    for layer in model.layers:
        shape = getattr(layer, "output_shape", None)
        if isinstance(shape, tuple) and len(shape) == 4 and tuple(shape[1:3]) == tuple(size):
            names.append(layer.name)
    return names


def matching_feature_layers(teacher, student):
    """(teacher_layer, student_layer): the student's deepest 4-D layer and the teacher's deepest
    layer of the same spatial size; MissingFeatureLayerError when no sizes match."""
    teacher_core, _ = models.split_preprocessing(loading.as_pixel_model(teacher))
    student_core, _ = models.split_preprocessing(loading.as_pixel_model(student))
    for layer in reversed(student_core.layers):
        shape = getattr(layer, "output_shape", None)
        if isinstance(shape, tuple) and len(shape) == 4 and not isinstance(layer, keras.layers.InputLayer):
            candidates = spatial_layers(teacher_core, shape[1:3])
            if candidates:
                return candidates[-1], layer.name
    raise MissingFeatureLayerError(f"no layer of {teacher.name} has the spatial size of a layer of {student.name}: "
                                   "attention transfer needs matching feature maps (give the layers explicitly)")


class MissingFeatureLayerError(ShapeMismatchError):
    """No teacher and student layers with the same spatial size for attention transfer."""


def feature_extractor(network, layer_names):
    """``network`` itself without layers to read, else a model returning {"logits", <layer>: features}."""
    if not layer_names:
        return network
    outputs = {LOGITS: network.outputs[0]}
    for name in layer_names:
        try:
            outputs[name] = network.get_layer(name).output
        except ValueError as err:
            raise InvalidArgumentError(f"{network.name} has no layer {name!r}") from err
    return keras.Model(network.inputs, outputs, name=f"{network.name}_features")


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _unique(names):
    return list(dict.fromkeys(name for name in names if name))


def global_batch_mean(per_example):
    """This replica's share of the mean over the global batch (every replica's examples).

    Summing the replicas' gradients, as the optimizer does under a strategy, then gives the
    gradient of the global mean, also when a last partial batch splits unevenly.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tf.reduce_mean(per_example)
    count = tf.cast(tf.shape(per_example)[0], per_example.dtype)
    return tf.reduce_sum(per_example) / context.all_reduce(tf.distribute.ReduceOp.SUM, count)


class Distiller(keras.Model):
    """Trains ``student`` from labels and a frozen ``teacher`` (online, or through cached logits).

    ``teacher`` may be None when every training batch carries cached teacher logits and no
    feature loss is used. :meth:`save_student` (and ``save``) write the student pixel model alone,
    which loads in plain tf-keras (in float32, whatever the training precision).
    """

    def __init__(self, teacher, student, distillation_losses=None, distillation_loss_weights=None,
                 student_loss_weight=0.5, student_loss_scale=1.0, name="distiller", **kwargs):
        # The Distiller's own inputs are not cast to a mixed policy's float16: images and cached
        # logits stay float32 (the networks cast their inputs); its policy still makes
        # compile() wrap the optimizer for loss scaling under mixed_float16.
        kwargs.setdefault("autocast", False)
        super().__init__(name=name, **kwargs)
        self.distillation_losses = _as_list(distillation_losses)
        weights = _as_list(distillation_loss_weights)
        if distillation_loss_weights is None:
            weights = [1.0] * len(self.distillation_losses)
        if len(weights) != len(self.distillation_losses):
            raise InvalidArgumentError(f"{len(weights)} distillation_loss_weights for "
                                       f"{len(self.distillation_losses)} distillation_losses")
        if any(not float(weight) >= 0 for weight in weights) or not 0.0 <= float(student_loss_weight) <= 1.0:
            raise InvalidArgumentError("weights must be >= 0 and student_loss_weight in [0, 1]")
        if not float(student_loss_scale) > 0:
            raise InvalidArgumentError(f"student_loss_scale must be > 0, got {student_loss_scale}")
        names = [loss.name for loss in self.distillation_losses]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"two distillation losses share a name: {names}")
        self.distillation_loss_weights = [float(weight) for weight in weights]
        self.student_loss_weight = float(student_loss_weight)
        self.student_loss_scale = float(student_loss_scale)
        # Each coefficient is folded in double precision, so the paper's preset multiplies by the
        # same float32 constants as kdig_tf's objective always did (same weights, bit for bit).
        self._student_coefficient = self.student_loss_weight * self.student_loss_scale
        self._coefficients = [(1.0 - self.student_loss_weight) * weight for weight in self.distillation_loss_weights]

        # The student first: trainable_variables (and so the optimizer's slots) follow its order.
        self.student = student
        self._student_pixels = loading.as_pixel_model(student)
        self._student_network, self._student_input = models.split_preprocessing(self._student_pixels)
        self.teacher = teacher
        self._teacher_pixels = self._teacher_network = self._teacher_input = None
        if teacher is not None:
            teacher.trainable = False
            self._teacher_pixels = loading.as_pixel_model(teacher)
            self._teacher_pixels.trainable = False
            if self._teacher_pixels.output_shape[-1] != self._student_pixels.output_shape[-1]:
                raise ShapeMismatchError(f"teacher has {self._teacher_pixels.output_shape[-1]} classes, student "
                                         f"{self._student_pixels.output_shape[-1]}")
            self._teacher_network, self._teacher_input = models.split_preprocessing(self._teacher_pixels)
        features = [loss for loss in self.distillation_losses if loss.kind == "features"]
        if features and teacher is None:
            raise InvalidArgumentError(f"{features[0].name} needs the teacher model (its features run online)")
        self._uses_logits = any(loss.kind == "logits" for loss in self.distillation_losses)
        # One extractor per model: a single forward pass gives the logits and every feature map read.
        self._student_layers = _unique(loss.student_layer for loss in features)
        self._teacher_layers = _unique(loss.teacher_layer for loss in features)
        self._student_extractor = feature_extractor(self._student_network, self._student_layers)
        self._teacher_extractor = None if teacher is None else \
            feature_extractor(self._teacher_network, self._teacher_layers)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.student_loss_tracker = keras.metrics.Mean(name="ce_loss")
        self.term_trackers = {loss.name: keras.metrics.Mean(name=loss.name) for loss in self.distillation_losses}
        self._student_loss = None

    @property
    def student_model(self):
        """The student as a pixel model: the model passed in, wrapped if it was a bare kdig_tf network."""
        return self._student_pixels

    @property
    def coefficients(self):
        """(coefficient of the student loss, [coefficient of each distillation loss]) in the per-example sum."""
        return self._student_coefficient, list(self._coefficients)

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, loss_weights=None, **kwargs):
        """``loss``: the student loss (a Keras loss, its name, or a function of (labels, logits) per
        example); None is cross-entropy from logits. ``metrics`` are computed on (labels, student logits)."""
        if loss_weights is not None:
            raise InvalidArgumentError("a Distiller weighs its losses with student_loss_weight and "
                                       "distillation_loss_weights, not compile(loss_weights=...)")
        self._student_loss = None if loss is None else keras.losses.get(loss)
        super().compile(optimizer=optimizer, loss=None, metrics=metrics, **kwargs)

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        children = super()._trackable_children(save_type, **kwargs)
        if save_type == "checkpoint":
            # Training checkpoints (BackupAndRestore) keep the layout of runs started before the
            # Distiller took pixel models: "student"/"teacher" are the networks behind the
            # preprocessing, so those runs resume here with every weight and optimizer slot.
            children = dict(children, student=self._student_network, student_model=self._student_pixels)
            if self.teacher is not None:
                children.update(teacher=self._teacher_network, teacher_model=self._teacher_pixels)
        return children

    @staticmethod
    def _unpack_inputs(inputs):
        """(images, cached teacher logits or None) of a batch's inputs."""
        if isinstance(inputs, dict):
            if IMAGES not in inputs:
                raise InvalidArgumentError(f"the input dict has no {IMAGES!r}: {sorted(inputs)}")
            return inputs[IMAGES], inputs.get(TEACHER_LOGITS)
        if isinstance(inputs, (tuple, list)):
            raise InvalidArgumentError("training elements must be (images, labels) or "
                                       f"({{{IMAGES!r}, {TEACHER_LOGITS!r}, {EXAMPLE_ID!r}}}, labels)")
        return inputs, None

    def _student_forward(self, images, training):
        """(float32 logits, {layer: float32 features}) of one student forward pass."""
        outputs = self._student_extractor(self._student_input.from_unit(images), training=training)
        if not self._student_layers:
            return tf.cast(outputs, tf.float32), {}
        return tf.cast(outputs[LOGITS], tf.float32), {name: tf.cast(outputs[name], tf.float32)
                                                      for name in self._student_layers}

    def call(self, inputs, training=None):
        """Student logits (float32) for ``[0, 1]`` images or a batch's input dict."""
        images, _ = self._unpack_inputs(inputs)
        logits, features = self._student_forward(images, training)
        # compute_loss reads the features of this same forward pass (the student runs once).
        setattr(logits, _FEATURES_ATTR, features)
        mode = tf.get_static_value(training) if training is not None else False
        setattr(logits, _TRAINING_ATTR, True if mode is None else bool(mode))  # a symbolic flag counts as training
        return logits

    def _teacher_outputs(self, images, cached_logits, training):
        """(teacher logits or None, {layer: features}), float32 and never differentiated."""
        need_logits = self._uses_logits and cached_logits is None
        if self._teacher_extractor is None:
            if need_logits and training:
                raise InvalidArgumentError("a logits distillation loss needs cached teacher logits or a teacher model")
            return cached_logits, {}  # plain (images, labels) validation without a teacher: no logits term
        if not (need_logits or self._teacher_layers):
            return cached_logits, {}
        outputs = self._teacher_extractor(self._teacher_input.from_unit(images), training=False)
        if not self._teacher_layers:
            outputs = {LOGITS: outputs}
        features = {name: tf.stop_gradient(tf.cast(outputs[name], tf.float32)) for name in self._teacher_layers}
        if cached_logits is None:
            cached_logits = tf.stop_gradient(tf.cast(outputs[LOGITS], tf.float32))
        return cached_logits, features

    def _student_loss_per_example(self, labels, logits):
        loss = self._student_loss
        if loss is None:
            values = default_student_loss(labels, logits)
        elif isinstance(loss, keras.losses.Loss):
            values = loss.call(labels, logits)  # per example, before the loss's own reduction
        else:
            values = loss(labels, logits)
        if values.shape.rank != 1:
            raise ShapeMismatchError(f"the student loss must give one value per example, got shape {values.shape}")
        return values

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        """The objective: per example slw * L_student + sum_i (1 - slw) * w_i * D_i, then the mean."""
        if sample_weight is not None:
            raise InvalidArgumentError("a Distiller takes no sample weights (mixed labels carry soft targets)")
        images, cached_logits = self._unpack_inputs(x)
        training = getattr(y_pred, _TRAINING_ATTR, True) if y_pred is not None else True
        student_features = getattr(y_pred, _FEATURES_ATTR, None) if y_pred is not None else None
        if y_pred is None or (self._student_layers and student_features is None):
            y_pred, student_features = self._student_forward(images, training)  # not from call()
        teacher_logits, teacher_features = self._teacher_outputs(images, cached_logits, training)
        student_loss = self._student_loss_per_example(y, y_pred)
        terms = {}
        # Addition is commutative in floating point, so starting from the student term gives the
        # same bits as alpha * kd + (1 - alpha) * ce + gamma * at.
        total = self._student_coefficient * student_loss
        for loss, coefficient in zip(self.distillation_losses, self._coefficients):
            if loss.kind == "features":
                term = loss.per_example(teacher_features[loss.teacher_layer], student_features[loss.student_layer])
            elif teacher_logits is None:
                term = tf.zeros_like(student_loss)
            else:
                term = loss.per_example(teacher_logits, y_pred, y if loss.uses_labels else None)
            terms[loss.name] = term
            total = coefficient * term + total
        self.loss_tracker.update_state(total)
        self.student_loss_tracker.update_state(student_loss)
        for name, term in terms.items():
            self.term_trackers[name].update_state(term)
        loss = global_batch_mean(total)
        if self.student.losses:  # regularisation: each replica adds its share
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            loss += tf.add_n(self.student.losses) / replicas
        return loss

    def save_student(self, filepath, **kwargs):
        """Write the student alone: a float32 pixel model, no teacher, no kdig_tf objects."""
        kwargs.setdefault("include_optimizer", False)
        distribute.float32_copy(self._student_pixels).save(filepath, **kwargs)

    def save(self, filepath, *args, **kwargs):
        """Saving a distiller saves its student: the teacher is a training-time dependency."""
        self.save_student(filepath, *args, **kwargs)

    def get_config(self):
        """Models, losses and weights; the models are serialised as architectures (Keras semantics)."""
        return {"name": self.name,
                "teacher": None if self.teacher is None else keras.layers.serialize(self.teacher),
                "student": keras.layers.serialize(self.student),
                "distillation_losses": [keras.utils.serialize_keras_object(loss) for loss in self.distillation_losses],
                "distillation_loss_weights": list(self.distillation_loss_weights),
                "student_loss_weight": self.student_loss_weight,
                "student_loss_scale": self.student_loss_scale}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("teacher", "student"):
            if config.get(key) is not None:
                config[key] = keras.layers.deserialize(config[key], custom_objects=custom_objects)
        config["distillation_losses"] = [keras.utils.deserialize_keras_object(loss, custom_objects=custom_objects)
                                         for loss in config.get("distillation_losses", [])]
        return cls(**config)


def keras_weights(student_weight, term_weights):
    """(student_loss_weight, distillation_loss_weights, student_loss_scale) of the objective
    ``student_weight * L_student + sum_i term_weights[i] * D_i`` in the Distiller's (Keras's) form."""
    if student_weight < 0 or any(weight < 0 for weight in term_weights):
        raise InvalidArgumentError(f"loss weights must be >= 0, got {student_weight} and {term_weights}")
    if not any(term_weights):
        return 1.0, list(term_weights), student_weight or 1.0
    if student_weight < 1.0:
        return student_weight, [weight / (1.0 - student_weight) for weight in term_weights], 1.0
    # slw = 1/2 and powers of two: (1 - slw) * 2w == w and slw * 2s == s exactly.
    return 0.5, [2.0 * weight for weight in term_weights], 2.0 * student_weight


def paper_distiller(teacher, student, alpha=0.01, temperature=2.5, gamma=0.0, at_layers=None, kd_weight=None,
                    kd_loss=None):
    """The paper's objective: (1 - alpha) * CE + alpha * KD(T), plus gamma * AT when gamma > 0.

    ``kd_weight`` (default ``alpha``) frees the KD weight: (1 - alpha) * CE + kd_weight * KD; ``kd_loss``
    (default ``LogitsDistillation(temperature)``) is the KD term. ``at_layers`` = (teacher_layer,
    student_layer); by default matched by spatial size. A KD weight of 0 drops the KD term (the plain
    student), and ``teacher`` may then be None.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise InvalidArgumentError(f"alpha must be in [0, 1], got {alpha}")
    kd_weight = float(alpha) if kd_weight is None else float(kd_weight)
    if not kd_weight >= 0:
        raise InvalidArgumentError(f"kd_weight must be >= 0, got {kd_weight}")
    if not float(gamma) >= 0:
        raise InvalidArgumentError(f"gamma must be >= 0, got {gamma}")
    kd_loss = kd_loss if kd_loss is not None else LogitsDistillation(temperature)
    losses, weights = [], []
    if kd_weight > 0:
        losses.append(kd_loss)
        weights.append(kd_weight)
    if gamma > 0:
        if teacher is None:
            raise InvalidArgumentError("attention transfer needs the teacher model")
        teacher_layer, student_layer = at_layers or matching_feature_layers(teacher, student)
        losses.append(AttentionTransfer(teacher_layer, student_layer))
        weights.append(float(gamma))
    student_loss_weight, weights, scale = keras_weights(1.0 - float(alpha), weights)
    return Distiller(teacher, student, losses, weights, student_loss_weight=student_loss_weight,
                     student_loss_scale=scale)
