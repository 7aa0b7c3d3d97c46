"""Named exceptions. Every user-facing failure is a subclass of KdigError so that
scripts can turn it into a one-line message and a non-zero exit."""


class KdigError(Exception):
    """Base class for every error kdig_tf raises on bad input."""


class UnknownDatasetError(KdigError):
    """The tfds dataset name is not registered, or not prepared in data_dir."""


class UnknownSplitError(KdigError):
    """The requested split does not exist in the prepared dataset."""


class UnknownKeyError(KdigError):
    """A registry lookup (method, compression factor, baseline...) failed."""


class WeightKeyError(KdigError):
    """A state dict has missing or unexpected keys for the target network."""


class ShapeMismatchError(KdigError):
    """A tensor, map or weight does not have the shape the receiver expects."""


class NotAModelError(KdigError):
    """A file is missing, empty, corrupt, or not a model kdig_tf can read."""


class InvalidArgumentError(KdigError, ValueError):
    """A numeric argument is outside its valid range (p, alpha, T, steps...)."""


class MissingDependencyError(KdigError):
    """An optional dependency (e.g. PyTorch for .pt files) is not installed."""


class SidecarMismatchError(ShapeMismatchError):
    """A .tflite sidecar JSON does not describe the model next to it (shape, dtype, quantisation, hash)."""


class UnsupportedLayerError(KdigError):
    """A layer type cannot be handled (e.g. tfmot cannot quantise it)."""


class TestSplitSelectionError(KdigError):
    """A split named ``test`` would be used for selection or tuning without --final_report."""

    __test__ = False  # not a pytest test class, despite the name


class StaleRunError(KdigError):
    """A run directory holds a run (finished or partial) made with other settings than asked for now."""


class UnreadableImageError(KdigError):
    """An image file cannot be read or decoded (missing, corrupt, truncated, or a format TF misreads)."""


class CorruptRunFileError(KdigError):
    """A bookkeeping file of a run directory exists but cannot be read."""


class VerificationError(KdigError):
    """A run's saved model does not reproduce the numbers recorded for it (or cannot be evaluated)."""


class DivergedError(KdigError):
    """Training produced a non-finite loss or weight (NaN or Inf); ``stage``, ``epoch`` and ``step`` say where."""

    def __init__(self, message, epoch=None, step=None, stage=None):
        super().__init__(message)
        self.epoch, self.step, self.stage = epoch, step, stage


class WorkdirBusyError(KdigError):
    """Another live process holds the lock of a run or store directory."""


class OutOfSpaceError(KdigError):
    """The disk filled up while writing; ``path`` and ``needed_bytes`` (an estimate) say where and how much."""

    def __init__(self, message, path=None, needed_bytes=None):
        super().__init__(message)
        self.path, self.needed_bytes = path, needed_bytes


class FlagError(KdigError):
    """A command line could not be parsed: an unknown or malformed flag, or a flagfile that cannot be read."""


class NonFiniteWeightsError(KdigError):
    """A model to be exported or saved holds NaN or Inf weights."""


class NonFiniteOutputError(KdigError):
    """A model's outputs hold NaN or Inf, so they name no class."""


class ChecksumMismatchError(NotAModelError):
    """A file's sha256 differs from the one given or recorded for it (damaged, edited or replaced)."""


class TFLiteChecksumError(SidecarMismatchError, ChecksumMismatchError):
    """A .tflite's bytes do not match the tflite_sha256 its sidecar records."""


class SplitClassMismatchError(KdigError):
    """The validation split holds a class that the training split lacks or holds only a few examples of."""


class WeakTeacherError(KdigError):
    """The teacher is not clearly above chance on the validation split, so distilling from it would teach noise."""


class InconsistentTeachingError(KdigError):
    """Cached teacher logits were asked for with a mix: they score un-mixed images, not the batch the student sees."""


class DistributionError(KdigError):
    """A tf.distribute strategy cannot be made here (no TPU, a bad TF_CONFIG, ...)."""
