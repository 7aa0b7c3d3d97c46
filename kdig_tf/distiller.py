"""Knowledge distillation as a ``keras.Model``, in the vocabulary of ``keras.distillation``.

    Distiller(teacher, student, distillation_losses=[LogitsDistillation(T), AttentionTransfer(...)],
              distillation_loss_weights=[alpha, gamma], student_loss_weight=1 - alpha)

per example  L = student_loss_weight * CE(y, z_s) + sum_i w_i * D_i,  averaged over the batch.
The paper's objective, alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE (+ gamma * AT),
is :func:`paper_distiller`; ``alpha`` weights the **KD term** (0.01 in the paper), which peer
libraries do not agree on, so the weights are always explicit here.

Both models take pixels (``kdig_tf.models``: pixel models, or bare kdig_tf networks, which
are wrapped). Training data are ``[0, 1]`` images, as kdig_tf's input pipelines yield them:
elements ``(images, labels)`` or ``({"images", "teacher_logits", "example_id"}, labels)``.
Each model's network runs on the images mapped by its own ``InputSpec``, the same float
operations as before models carried their preprocessing. Cached teacher logits (from the
IG/logit store, keyed by example id) are used when the batch has them; otherwise the frozen
teacher runs on the batch the student sees.
"""
import kdig_tf  # noqa: F401

import tensorflow as tf
import tf_keras as keras

from kdig_tf import loading, models
from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError

IMAGES = "images"
TEACHER_LOGITS = "teacher_logits"
EXAMPLE_ID = "example_id"


class DistillationLoss:
    """A per-example distillation term between teacher and student outputs."""

    name = "distillation_loss"
    # "logits": compares the models' outputs; "features": outputs of named layers.
    kind = "logits"

    def per_example(self, teacher_outputs, student_outputs):
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.utils.register_keras_serializable(package="kdig_tf")
class LogitsDistillation(DistillationLoss):
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) per example."""

    name = "kd_loss"

    def __init__(self, temperature=2.5):
        if not float(temperature) > 0.0:
            raise InvalidArgumentError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def per_example(self, teacher_logits, student_logits):
        t = self.temperature
        teacher_log_probs = tf.nn.log_softmax(teacher_logits / t, axis=-1)
        student_log_probs = tf.nn.log_softmax(student_logits / t, axis=-1)
        kl = tf.reduce_sum(tf.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
        return t * t * kl

    def get_config(self):
        return {"temperature": self.temperature}


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

    def per_example(self, teacher_features, student_features):
        if teacher_features.shape[1:3] != student_features.shape[1:3]:
            raise ShapeMismatchError(
                f"attention transfer needs equal spatial sizes: teacher {teacher_features.shape[1:3]} "
                f"vs student {student_features.shape[1:3]}")
        difference = attention_map(teacher_features) - attention_map(student_features)
        return tf.reduce_mean(tf.square(difference), axis=-1)

    def get_config(self):
        return {"teacher_layer": self.teacher_layer, "student_layer": self.student_layer}


@keras.utils.register_keras_serializable(package="kdig_tf")
class KDLoss:
    """The paper's objective on logits: alpha * LogitsDistillation(T) + (1 - alpha) * CE, batch mean."""

    def __init__(self, alpha=0.01, temperature=2.5):
        if not 0.0 <= float(alpha) <= 1.0:
            raise InvalidArgumentError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.logits_distillation = LogitsDistillation(temperature)
        self.temperature = self.logits_distillation.temperature

    def terms(self, labels, student_logits, teacher_logits=None):
        """Per-example (kd, ce) terms; kd is zero when there are no teacher logits."""
        ce = keras.losses.sparse_categorical_crossentropy(labels, student_logits, from_logits=True)
        if teacher_logits is None:
            return tf.zeros_like(ce), ce
        return self.logits_distillation.per_example(teacher_logits, student_logits), ce

    def __call__(self, labels, student_logits, teacher_logits=None):
        kd, ce = self.terms(labels, student_logits, teacher_logits)
        return tf.reduce_mean(self.alpha * kd + (1.0 - self.alpha) * ce)

    def get_config(self):
        return {"alpha": self.alpha, "temperature": self.temperature}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


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


def _with_features(core, layer_name):
    """A model returning (logits, features at ``layer_name``)."""
    try:
        layer = core.get_layer(layer_name)
    except ValueError as err:
        raise InvalidArgumentError(f"{core.name} has no layer {layer_name!r}") from err
    return keras.Model(core.inputs, [core.outputs[0], layer.output], name=f"{core.name}_with_features")


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class Distiller(keras.Model):
    """Trains ``student`` from labels and a frozen ``teacher`` (online or through cached logits).

    ``teacher`` may be None when every training batch carries cached teacher logits and no
    feature loss is used. ``student_model``/``teacher_model`` are the pixel models;
    ``student``/``teacher`` the networks behind their preprocessing, which is what trains.
    :meth:`save_student` (and ``save``) write the student pixel model alone, which loads in
    plain tf-keras.
    """

    def __init__(self, teacher, student, distillation_losses=None, distillation_loss_weights=None,
                 student_loss_weight=0.5, name="distiller", **kwargs):
        super().__init__(name=name, **kwargs)
        self.distillation_losses = _as_list(distillation_losses)
        weights = _as_list(distillation_loss_weights) or [1.0] * len(self.distillation_losses)
        if len(weights) != len(self.distillation_losses):
            raise InvalidArgumentError(f"{len(weights)} distillation_loss_weights for "
                                       f"{len(self.distillation_losses)} distillation_losses")
        if any(float(weight) < 0 for weight in weights) or not 0.0 <= float(student_loss_weight) <= 1.0:
            raise InvalidArgumentError("weights must be >= 0 and student_loss_weight in [0, 1]")
        names = [loss.name for loss in self.distillation_losses]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"two distillation losses share a name: {names}")
        self.distillation_loss_weights = [float(weight) for weight in weights]
        self.student_loss_weight = float(student_loss_weight)

        # ``student``/``teacher`` are the networks behind the models' preprocessing layers, under
        # the attribute names of the Distiller before models carried preprocessing, so training
        # checkpoints (BackupAndRestore) of runs started then restore into this one.
        self.student_model = loading.as_pixel_model(student)
        self.student, self.student_input = models.split_preprocessing(self.student_model)
        self.teacher_model = None if teacher is None else loading.as_pixel_model(teacher)
        if self.teacher_model is not None:
            self.teacher_model.trainable = False
            if self.teacher_model.output_shape[-1] != self.student_model.output_shape[-1]:
                raise ShapeMismatchError(f"teacher has {self.teacher_model.output_shape[-1]} classes, student "
                                         f"{self.student_model.output_shape[-1]}")
            self.teacher, self.teacher_input = models.split_preprocessing(self.teacher_model)
        else:
            self.teacher, self.teacher_input = None, None
        self._features = {}
        for loss in self.distillation_losses:
            if loss.kind == "features":
                if self.teacher is None:
                    raise InvalidArgumentError(f"{loss.name} needs the teacher model (its features run online)")
                self._teacher_with_features = _with_features(self.teacher, loss.teacher_layer)
                self._student_with_features = _with_features(self.student, loss.student_layer)
                self._features[loss.name] = (self._teacher_with_features, self._student_with_features)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.kd_tracker = keras.metrics.Mean(name="kd_loss")
        self.ce_tracker = keras.metrics.Mean(name="ce_loss")
        self.at_tracker = keras.metrics.Mean(name="at_loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        known = {"kd_loss": self.kd_tracker, "at_loss": self.at_tracker}
        self._term_trackers = {loss.name: known.get(loss.name) or keras.metrics.Mean(name=loss.name)
                               for loss in self.distillation_losses}

    @property
    def metrics(self):
        return [self.loss_tracker, self.ce_tracker, *self._term_trackers.values(), self.accuracy]

    def call(self, images, training=False):
        """Student logits for [0, 1] images."""
        return self.student(self.student_input.from_unit(images), training=training)

    @staticmethod
    def _unpack(batch):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise InvalidArgumentError("training elements must be (images, labels) or "
                                       f"({{{IMAGES!r}, {TEACHER_LOGITS!r}, {EXAMPLE_ID!r}}}, labels)")
        inputs, labels = batch
        if isinstance(inputs, dict):
            if IMAGES not in inputs:
                raise InvalidArgumentError(f"the input dict has no {IMAGES!r}: {sorted(inputs)}")
            return inputs[IMAGES], labels, inputs.get(TEACHER_LOGITS)
        return inputs, labels, None

    def _teacher_logits(self, images, cached_logits, training):
        if cached_logits is not None:
            return cached_logits
        if self.teacher is None:
            if not training:
                return None  # plain (images, labels) validation: report CE and accuracy only
            raise InvalidArgumentError("a logits distillation loss needs cached teacher logits or a teacher model")
        return tf.stop_gradient(self.teacher(self.teacher_input.from_unit(images), training=False))

    def _loss_terms(self, images, labels, cached_logits, training):
        student_inputs = self.student_input.from_unit(images)
        feature_pairs = {}
        if self._features:
            teacher_inputs = self.teacher_input.from_unit(images)
            for name, (teacher_features, student_features) in self._features.items():
                _, t_features = teacher_features(teacher_inputs, training=False)
                student_logits, s_features = student_features(student_inputs, training=training)
                feature_pairs[name] = (tf.stop_gradient(t_features), s_features)
        else:
            student_logits = self.student(student_inputs, training=training)
        teacher_logits = None
        if any(loss.kind == "logits" for loss in self.distillation_losses):
            teacher_logits = self._teacher_logits(images, cached_logits, training)
        ce = keras.losses.sparse_categorical_crossentropy(labels, student_logits, from_logits=True)
        # Addition is commutative in floating point, so starting from the student term gives the
        # same bits as alpha * kd + (1 - alpha) * ce + gamma * at.
        total = self.student_loss_weight * ce
        terms = {"ce_loss": ce}
        for loss, weight in zip(self.distillation_losses, self.distillation_loss_weights):
            if loss.kind == "features":
                term = loss.per_example(*feature_pairs[loss.name])
            elif teacher_logits is None:
                term = tf.zeros_like(ce)
            else:
                term = loss.per_example(teacher_logits, student_logits)
            terms[loss.name] = term
            total = weight * term + total
        terms["loss"] = total
        return student_logits, terms

    def _update_metrics(self, labels, logits, terms):
        self.loss_tracker.update_state(terms["loss"])
        self.ce_tracker.update_state(terms["ce_loss"])
        for name, tracker in self._term_trackers.items():
            tracker.update_state(terms[name])
        self.accuracy.update_state(labels, logits)
        return {metric.name: metric.result() for metric in self.metrics}

    def train_step(self, batch):
        images, labels, cached_logits = self._unpack(batch)
        with tf.GradientTape() as tape:
            logits, terms = self._loss_terms(images, labels, cached_logits, training=True)
            # Gradients are summed over replicas, so each replica averages over the global batch.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            loss = tf.reduce_mean(terms["loss"]) / replicas
            loss += tf.add_n(self.student.losses) / replicas if self.student.losses else 0.0
        variables = self.student.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return self._update_metrics(labels, logits, terms)

    def test_step(self, batch):
        images, labels, cached_logits = self._unpack(batch)
        logits, terms = self._loss_terms(images, labels, cached_logits, training=False)
        return self._update_metrics(labels, logits, terms)

    def save_student(self, filepath, **kwargs):
        """Write the student alone: a pixel model, no teacher, no kdig_tf objects."""
        kwargs.setdefault("include_optimizer", False)
        self.student_model.save(filepath, **kwargs)

    def save(self, filepath, *args, **kwargs):
        """Saving a distiller saves its student: the teacher is a training-time dependency."""
        self.save_student(filepath, *args, **kwargs)

    def get_config(self):
        return {"distillation_losses": [keras.utils.serialize_keras_object(loss) for loss in self.distillation_losses],
                "distillation_loss_weights": self.distillation_loss_weights,
                "student_loss_weight": self.student_loss_weight}


def paper_distiller(teacher, student, alpha=0.01, temperature=2.5, gamma=0.0, at_layers=None):
    """The paper's objective: alpha * KD(T) + (1 - alpha) * CE, plus gamma * AT when gamma > 0.

    ``at_layers`` = (teacher_layer, student_layer); by default matched by spatial size.
    ``alpha == 0`` drops the KD term (the plain student), ``teacher`` may then be None.
    """
    kd_loss = KDLoss(alpha, temperature)  # validates alpha and T
    losses, weights = [], []
    if kd_loss.alpha > 0:
        losses.append(kd_loss.logits_distillation)
        weights.append(kd_loss.alpha)
    if float(gamma) < 0:
        raise InvalidArgumentError(f"gamma must be >= 0, got {gamma}")
    if gamma > 0:
        if teacher is None:
            raise InvalidArgumentError("attention transfer needs the teacher model")
        teacher_layer, student_layer = at_layers or matching_feature_layers(teacher, student)
        losses.append(AttentionTransfer(teacher_layer, student_layer))
        weights.append(float(gamma))
    return Distiller(teacher, student, losses, weights, student_loss_weight=1.0 - kd_loss.alpha)
