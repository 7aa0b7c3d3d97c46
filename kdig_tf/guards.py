"""Guards against results that look fine but are not: non-finite numbers and full disks.

``nan <= 0`` and ``nan > 0`` are both False, so a range check lets NaN through; every
setting is therefore checked for finiteness on its own (:func:`require_finite`).
:class:`DivergenceGuard` stops ``fit`` at the first non-finite loss or weight, before the
epoch is logged, backed up or saved. :func:`disk_full_as_error` turns a full disk, which
Python, h5py and TensorFlow each report in their own way, into one :class:`OutOfSpaceError`.
"""
import kdig_tf  # noqa: F401

import contextlib
import dataclasses
import errno
import math
import numbers
import os
import shutil

import numpy as np
import tensorflow as tf
import tf_keras as keras

from kdig_tf.errors import (DivergedError, InvalidArgumentError, KdigError, NonFiniteWeightsError,
                            OutOfSpaceError)

NO_SPACE_TEXT = "No space left on device"


def require_finite(**values):
    """Raise InvalidArgumentError for the first real number among ``values`` that is NaN or infinite."""
    for name, value in values.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
            raise InvalidArgumentError(f"{name} must be a finite number, got {value}")


def require_finite_fields(config):
    """:func:`require_finite` over every field of a dataclass (e.g. a ``DistillConfig``)."""
    require_finite(**{field.name: getattr(config, field.name) for field in dataclasses.fields(config)})


def non_finite_weights(model):
    """Names of the float weights of ``model`` that hold NaN or Inf (empty if all are finite)."""
    weights = [weight for weight in model.weights if weight.dtype.is_floating]
    if not weights:
        return []
    finite = tf.stack([tf.reduce_all(tf.math.is_finite(weight)) for weight in weights]).numpy()
    return [weight.name for weight, ok in zip(weights, finite) if not ok]


def check_finite_weights(model, what="model"):
    """Raise NonFiniteWeightsError if any weight of ``model`` is NaN or Inf."""
    bad = non_finite_weights(model)
    if bad:
        raise NonFiniteWeightsError(f"{what} {model.name} has non-finite weights in {len(bad)} tensors "
                                    f"(first: {bad[0]}); it diverged in training and cannot be used")


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training with DivergedError at the first non-finite loss (each step) or weight (each epoch).

    Put it ahead of the callbacks that log, back up or save: Keras calls callbacks in list
    order and skips ``on_train_end`` after an exception, so the diverged epoch is neither
    logged nor checkpointed, and no final model is written. ``stage`` names the training
    (e.g. ``"training"``, ``"qat"``) in the message.
    """

    def __init__(self, stage="training"):
        super().__init__()
        self.stage = stage
        self._epoch = 0
        # Read only the loss: converting every log to numpy each step would cost more.
        self._supports_tf_logs = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.all(np.isfinite(np.asarray(loss))):
            self._diverged(f"loss is {float(np.asarray(loss).ravel()[0])}", batch)

    def on_epoch_end(self, epoch, logs=None):
        bad = non_finite_weights(self.model)
        if bad:
            self._diverged(f"{len(bad)} weight tensors are non-finite (first: {bad[0]})", self.params.get("steps"))

    def _diverged(self, what, step):
        steps = self.params.get("steps") if self.params else None
        of = f" of {steps}" if steps else ""
        raise DivergedError(f"{self.stage} diverged at epoch {self._epoch} (0-based, as in history.csv), step "
                            f"{step}{of}: {what}", epoch=self._epoch, step=step, stage=self.stage)


def is_out_of_space(err):
    """True if ``err`` reports a full disk (OSError ENOSPC, or TensorFlow's or h5py's wording of it)."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    return NO_SPACE_TEXT in str(err)


def free_bytes(path):
    """Free bytes on the file system holding ``path`` (its nearest existing ancestor), or None."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@contextlib.contextmanager
def disk_full_as_error(path, needed_bytes=None):
    """Turn a full disk inside the block into OutOfSpaceError naming the path and the bytes needed.

    ``needed_bytes`` is an estimate (or a function computing one when the disk is full).
    Named errors pass through unchanged. The caller's writes must be atomic, so that what is
    on disk is still resumable after the failure.
    """
    try:
        yield
    except KdigError:
        raise
    except Exception as err:
        if not is_out_of_space(err):
            raise
        where = getattr(err, "filename", None) or path
        try:
            needed = needed_bytes() if callable(needed_bytes) else needed_bytes
        except Exception:  # an estimate must not hide the real failure
            needed = None
        free = free_bytes(where)
        needs = f"about {int(needed):,} bytes needed" if needed else "bytes needed unknown"
        has = "" if free is None else f"{free:,} bytes free, "
        raise OutOfSpaceError(f"no space left on device writing {where} ({has}{needs}); free some space and "
                              "rerun the same command: finished work is kept", path=where,
                              needed_bytes=needed) from err
