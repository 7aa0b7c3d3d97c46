"""Knowledge distillation as a ``keras.Model`` with its own train and test steps.

    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(y, z_s) + gamma * AT

``alpha`` weights the **KD term**, as in the paper (alpha = 0.01 there), not the
cross-entropy: peer libraries disagree on this, so the name is explicit here.
AT is the attention-transfer loss of Zagoruyko & Komodakis: the mean squared difference
of L2-normalised attention maps (channel mean of F^2) at one teacher and one student layer.

Teacher logits come from the precompute store by default (the dataset yields them);
without a store the frozen teacher runs online in inference mode.
"""
import kdig_tf  # noqa: F401

import tensorflow as tf
import tf_keras as keras

from kdig_tf import data
from kdig_tf.errors import InvalidArgumentError, ShapeMismatchError


@keras.utils.register_keras_serializable(package="kdig_tf")
class KDLoss:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, averaged over the batch."""

    def __init__(self, alpha=0.01, temperature=2.5):
        if not 0.0 <= float(alpha) <= 1.0:
            raise InvalidArgumentError(f"alpha must be in [0, 1], got {alpha}")
        if not float(temperature) > 0.0:
            raise InvalidArgumentError(f"temperature must be > 0, got {temperature}")
        self.alpha = float(alpha)
        self.temperature = float(temperature)

    def terms(self, labels, student_logits, teacher_logits=None):
        """Per-example (kd, ce) terms; kd is zero when there are no teacher logits."""
        ce = keras.losses.sparse_categorical_crossentropy(labels, student_logits, from_logits=True)
        if teacher_logits is None:
            return tf.zeros_like(ce), ce
        t = self.temperature
        teacher_log_probs = tf.nn.log_softmax(teacher_logits / t, axis=-1)
        student_log_probs = tf.nn.log_softmax(student_logits / t, axis=-1)
        kl = tf.reduce_sum(tf.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
        return t * t * kl, ce

    def __call__(self, labels, student_logits, teacher_logits=None):
        kd, ce = self.terms(labels, student_logits, teacher_logits)
        return tf.reduce_mean(self.alpha * kd + (1.0 - self.alpha) * ce)

    def get_config(self):
        return {"alpha": self.alpha, "temperature": self.temperature}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def attention_map(features):
    """[B,H,W,C] -> L2-normalised [B,H*W] channel mean of F^2."""
    attention = tf.reduce_mean(tf.square(features), axis=-1)
    return tf.math.l2_normalize(tf.reshape(attention, [tf.shape(attention)[0], -1]), axis=-1)


@keras.utils.register_keras_serializable(package="kdig_tf")
class AttentionTransferLoss:
    """gamma * mean squared difference of normalised attention maps, per example."""

    def __init__(self, gamma=0.8, teacher_layer="features_13_add", student_layer="features_13_add"):
        if float(gamma) < 0.0:
            raise InvalidArgumentError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
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
        return {"gamma": self.gamma, "teacher_layer": self.teacher_layer, "student_layer": self.student_layer}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _with_features(model, layer_name):
    """A model returning (logits, features at ``layer_name``)."""
    try:
        layer = model.get_layer(layer_name)
    except ValueError as err:
        raise InvalidArgumentError(f"{model.name} has no layer {layer_name!r}") from err
    return keras.Model(model.inputs, [model.outputs[0], layer.output], name=f"{model.name}_with_features")


class Distiller(keras.Model):
    """Trains ``student`` from labels, cached or online teacher logits, and optional AT.

    Training elements are ``(student_input, label)``, ``(student_input, label,
    teacher_logits)`` or ``(student_input, label, teacher_logits, example_id)``, as
    ``kdig_tf.overlay.training_dataset`` yields them. Without cached logits the teacher
    runs online on ``teacher_preprocess(student_input)``.

    ``save``/``save_weights``-free export: :meth:`save_student` (and ``save``) write the
    student alone, loadable with plain tf-keras.
    """

    def __init__(self, student, teacher=None, kd_loss=None, at_loss=None,
                 teacher_preprocess=data.normalize_teacher, **kwargs):
        super().__init__(name=kwargs.pop("name", "distiller"), **kwargs)
        self.student = student
        self.kd_loss = kd_loss or KDLoss(alpha=0.0)
        self.at_loss = at_loss if at_loss is not None and at_loss.gamma > 0 else None
        self.teacher_preprocess = teacher_preprocess
        self.teacher = teacher
        if teacher is not None:
            teacher.trainable = False
            if teacher.output_shape[-1] != student.output_shape[-1]:
                raise ShapeMismatchError(
                    f"teacher has {teacher.output_shape[-1]} classes, student {student.output_shape[-1]}")
        if self.at_loss is not None:
            if teacher is None:
                raise InvalidArgumentError("attention transfer needs the teacher model (features run online)")
            self._teacher_with_features = _with_features(teacher, self.at_loss.teacher_layer)
            self._student_with_features = _with_features(student, self.at_loss.student_layer)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.kd_tracker = keras.metrics.Mean(name="kd_loss")
        self.ce_tracker = keras.metrics.Mean(name="ce_loss")
        self.at_tracker = keras.metrics.Mean(name="at_loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.ce_tracker]
        if self.kd_loss.alpha > 0:
            trackers.append(self.kd_tracker)
        if self.at_loss is not None:
            trackers.append(self.at_tracker)
        return trackers + [self.accuracy]

    def call(self, inputs, training=False):
        return self.student(inputs, training=training)

    @staticmethod
    def _unpack(batch):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise InvalidArgumentError("training elements must be (input, label[, teacher_logits[, id]])")
        teacher_logits = batch[2] if len(batch) > 2 else None
        return batch[0], batch[1], teacher_logits

    def _teacher_outputs(self, inputs, cached_logits, training):
        """(teacher logits or None, teacher features or None), never differentiated."""
        needs_logits = self.kd_loss.alpha > 0 and cached_logits is None
        if self.at_loss is not None:
            logits, features = self._teacher_with_features(self.teacher_preprocess(inputs), training=False)
            logits = cached_logits if cached_logits is not None else logits
            return tf.stop_gradient(logits), tf.stop_gradient(features)
        if needs_logits:
            if self.teacher is None:
                if not training:
                    return None, None  # plain (input, label) validation: report CE and accuracy
                raise InvalidArgumentError("alpha > 0 needs cached teacher logits or a teacher model")
            return tf.stop_gradient(self.teacher(self.teacher_preprocess(inputs), training=False)), None
        return cached_logits, None

    def _loss_terms(self, inputs, labels, cached_logits, training):
        teacher_logits, teacher_features = self._teacher_outputs(inputs, cached_logits, training)
        if self.at_loss is not None:
            student_logits, student_features = self._student_with_features(inputs, training=training)
            at = self.at_loss.per_example(teacher_features, student_features)
        else:
            student_logits = self.student(inputs, training=training)
            at = tf.zeros(tf.shape(labels)[:1])
        if teacher_logits is not None and self.kd_loss.alpha == 0:
            teacher_logits = None  # no KD term: skip the KL computation
        kd, ce = self.kd_loss.terms(labels, student_logits, teacher_logits)
        gamma = self.at_loss.gamma if self.at_loss is not None else 0.0
        alpha = self.kd_loss.alpha
        total = alpha * kd + (1.0 - alpha) * ce + gamma * at
        return student_logits, {"loss": total, "kd_loss": kd, "ce_loss": ce, "at_loss": at}

    def _update_metrics(self, labels, logits, terms):
        self.loss_tracker.update_state(terms["loss"])
        self.kd_tracker.update_state(terms["kd_loss"])
        self.ce_tracker.update_state(terms["ce_loss"])
        self.at_tracker.update_state(terms["at_loss"])
        self.accuracy.update_state(labels, logits)
        return {metric.name: metric.result() for metric in self.metrics}

    def train_step(self, batch):
        inputs, labels, cached_logits = self._unpack(batch)
        with tf.GradientTape() as tape:
            logits, terms = self._loss_terms(inputs, labels, cached_logits, training=True)
            # Gradients are summed over replicas, so each replica averages over the global batch.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            loss = tf.reduce_mean(terms["loss"]) / replicas
            loss += tf.add_n(self.student.losses) / replicas if self.student.losses else 0.0
        variables = self.student.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return self._update_metrics(labels, logits, terms)

    def test_step(self, batch):
        inputs, labels, cached_logits = self._unpack(batch)
        logits, terms = self._loss_terms(inputs, labels, cached_logits, training=False)
        return self._update_metrics(labels, logits, terms)

    def save_student(self, filepath, **kwargs):
        """Write the student alone (no teacher, no kdig_tf objects)."""
        kwargs.setdefault("include_optimizer", False)
        self.student.save(filepath, **kwargs)

    def save(self, filepath, *args, **kwargs):
        """Saving a distiller saves its student: the teacher is a training-time dependency."""
        self.save_student(filepath, *args, **kwargs)

    def get_config(self):
        return {"kd_loss": self.kd_loss.get_config(),
                "at_loss": self.at_loss.get_config() if self.at_loss is not None else None}
