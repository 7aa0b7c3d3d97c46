"""Learning-rate schedules counted in optimizer steps, with an optional linear warm-up.

A run's length in epochs means little across datasets (an epoch of CIFAR-10 is 700 steps
at batch 64, an epoch of a 1,500-image folder is 24), so the warm-up is given in steps and
the cosine decay spans the run's steps after it.
"""
import kdig_tf  # noqa: F401

import tensorflow as tf
import tf_keras as keras

from kdig_tf.errors import InvalidArgumentError, UnknownKeyError

LR_SCHEDULES = ("constant", "cosine")


class WarmupThen(keras.optimizers.schedules.LearningRateSchedule):
    """``peak * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then ``after(step - warmup_steps)``.

    ``after`` is a schedule or a constant rate; the ramp ends at ``peak``, its starting rate.
    """

    def __init__(self, peak, warmup_steps, after):
        super().__init__()
        self.peak, self.warmup_steps, self.after = float(peak), int(warmup_steps), after

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = float(self.warmup_steps)
        ramp = self.peak * (step + 1.0) / warmup
        later = self.after(tf.maximum(step - warmup, 0.0)) if callable(self.after) else tf.constant(self.after)
        return tf.where(step < warmup, ramp, tf.cast(later, tf.float32))

    def get_config(self):
        after = keras.optimizers.schedules.serialize(self.after) if callable(self.after) else self.after
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "after": after}

    @classmethod
    def from_config(cls, config):
        after = config["after"]
        if isinstance(after, dict):
            after = keras.optimizers.schedules.deserialize(after)
        return cls(config["peak"], config["warmup_steps"], after)


def learning_rate(rate, schedule="constant", total_steps=1, warmup_steps=0):
    """The optimizer's learning rate: a float for a constant rate without warm-up (as before
    warm-up existed, so such runs build the very same optimizer), else a schedule."""
    if schedule not in LR_SCHEDULES:
        raise UnknownKeyError(f"unknown lr_schedule {schedule!r}; known: {LR_SCHEDULES}")
    if warmup_steps < 0:
        raise InvalidArgumentError(f"warmup_steps must be >= 0, got {warmup_steps}")
    after = rate
    if schedule == "cosine":
        after = keras.optimizers.schedules.CosineDecay(rate, max(int(total_steps) - int(warmup_steps), 1))
    if warmup_steps == 0:
        return after
    return WarmupThen(rate, warmup_steps, after)
