"""Which weights a run ends with, and whether it trained long enough to trust them.

* ``keep="last"``: the weights after the last epoch (what every run did before these options).
* ``keep="best"``: the weights of the epoch with the highest validation accuracy
  (:class:`KeepBestWeights`). On a small validation set accuracy can swing by tens of points
  between epochs, and the last epoch may be a bad one. The price is selection bias: the
  reported validation accuracy is the maximum over epochs, an optimistic estimate, so
  results.json says so and an ``eval_split`` gives the unbiased figure.
* ``ema_decay > 0``: the optimizer keeps an exponential moving average of the weights
  (tf-keras' ``use_ema``; its slots are optimizer variables, so a resumed run restores
  them from the checkpoint) and the run ends with the average. Epoch validation still
  scores the raw weights, so it cannot be combined with ``keep="best"``. The average
  starts at the initial weights and keeps ``decay**steps`` of them, so a decay too slow for
  the run's length is refused (:func:`check_ema`).

:func:`step_warnings` names runs with fewer optimizer steps than a student needs to
converge (:data:`MIN_CONVERGENCE_STEPS`): epochs are a poor unit when a dataset has 1,500
images (15 epochs of batch 64 are 360 steps), so the run says so instead of silently
underfitting.
"""
import kdig_tf  # noqa: F401

import os

import numpy as np
import tf_keras as keras

from kdig_tf.errors import InvalidArgumentError
from kdig_tf.io_utils import atomic_path, atomic_write_json, read_json_or_none

KEEP_CHOICES = ("last", "best")
BEST_WEIGHTS = "student_best_weights.npz"  # get_weights() order, arr_0..
BEST_RECORD = "student_best.json"
# Fewer optimizer steps than this rarely train a student from scratch to convergence.
MIN_CONVERGENCE_STEPS = 1000
# A run may keep at most this fraction of its initial weights in the weight average.
MAX_EMA_INITIAL_SHARE = 0.01
SELECTION_BIAS = ("the validation accuracy is that of the best of {epochs} epochs, chosen on this same split: an "
                  "optimistic (selection-biased) estimate; report an eval_split for an unbiased one")


def check_keep(keep):
    if keep not in KEEP_CHOICES:
        raise InvalidArgumentError(f"keep must be one of {KEEP_CHOICES}, got {keep!r}")


def check_ema(ema_decay, keep="last", total_steps=None):
    """Refuse an EMA decay outside [0, 1), with keep=best, or too slow for ``total_steps``."""
    if not 0.0 <= ema_decay < 1.0:
        raise InvalidArgumentError(f"ema_decay must be in [0, 1) (0 = no weight average), got {ema_decay}")
    if ema_decay > 0 and keep == "best":
        raise InvalidArgumentError("keep=best picks an epoch by the raw weights' validation accuracy, while "
                                   "ema_decay > 0 ends with the averaged weights: use one of them")
    if ema_decay > 0 and total_steps and ema_decay ** total_steps > MAX_EMA_INITIAL_SHARE:
        raise InvalidArgumentError(
            f"ema_decay={ema_decay} keeps {100 * ema_decay ** total_steps:.0f} % of the untrained initial weights "
            f"after this run's {total_steps} steps; use ema_decay <= {MAX_EMA_INITIAL_SHARE ** (1 / total_steps):.4f} "
            "or train longer")


def step_warnings(total_steps, epochs, num_train, batch_size):
    """Warnings (a list of sentences) about a run too short to converge."""
    if total_steps >= MIN_CONVERGENCE_STEPS:
        return []
    wanted = -(-MIN_CONVERGENCE_STEPS * epochs // total_steps) if total_steps else epochs
    return [f"this run has only {total_steps} optimizer steps ({epochs} epoch{'s' * (epochs != 1)} of {num_train} "
            f"images at batch {batch_size}); a student usually needs {MIN_CONVERGENCE_STEPS}+ to converge and will "
            f"likely underfit: use about {wanted} epochs or a smaller batch"]


class KeepBestWeights(keras.callbacks.Callback):
    """Keeps the student of the epoch with the highest ``val_accuracy`` and restores it at the end.

    The best weights and a record of their epoch are written to the workdir each time they
    improve, so a run resumed after a kill still knows them. Put it ahead of the callback
    that saves the final student: ``on_train_end`` runs in list order. Ties keep the earlier
    epoch. ``fresh=True`` (a run starting at epoch 0) forgets what an earlier attempt kept.
    """

    def __init__(self, workdir, monitor="val_accuracy", fresh=False):
        super().__init__()
        self.weights_path = os.path.join(workdir, BEST_WEIGHTS)
        self.record_path = os.path.join(workdir, BEST_RECORD)
        self.monitor = monitor
        if fresh:
            for path in (self.record_path, self.weights_path):
                if os.path.exists(path):
                    os.remove(path)

    def best(self):
        """{"epoch" (0-based), monitor: value} of the best epoch so far, or None."""
        record = read_json_or_none(self.record_path) if os.path.exists(self.record_path) else None
        return record if isinstance(record, dict) and os.path.exists(self.weights_path) else None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        value = float(value)
        best = self.best()
        if best is not None and not value > best[self.monitor]:
            return
        with atomic_path(self.weights_path) as tmp:
            np.savez(tmp, *self.model.student_model.get_weights())
        atomic_write_json(self.record_path, {"epoch": int(epoch), self.monitor: value})

    def on_train_end(self, logs=None):
        if self.best() is not None:
            with np.load(self.weights_path) as stored:
                self.model.student_model.set_weights([stored[f"arr_{index}"] for index in range(len(stored.files))])


def selection_record(keep, workdir, epochs, val_split, ema_decay=0.0):
    """What results.json says about the weights a run kept."""
    record = {"keep": keep, "ema_decay": ema_decay, "selected_on": None}
    if keep == "best":
        best = read_json_or_none(os.path.join(workdir, BEST_RECORD)) or {}
        record.update(selected_on=val_split, best_epoch=None if "epoch" not in best else best["epoch"] + 1,
                      best_val_accuracy=None if "val_accuracy" not in best else 100.0 * best["val_accuracy"],
                      bias=SELECTION_BIAS.format(epochs=epochs))
    return record
