"""Quiet by default: what a script prints is kdig_tf's own output, not the libraries' log noise.

A CPU-only run used to print 80-odd lines before any result: TensorFlow's start-up banner
(twice: two of its shared libraries log it), "failed call to cuInit", oneDNN and CPU-feature
notes, the HDF5 "legacy format" warning that every ``.h5`` save raises, tfds deprecation
notes and Keras' "compiled metrics have yet to be built". A newcomer reads them as failures.

:func:`quiet` is what every script calls first (scripts only: importing the package changes
no logging). Unless ``verbose``, it

* sets ``TF_CPP_MIN_LOG_LEVEL=2`` (TensorFlow's C++ INFO and WARNING lines) unless the user
  set it, and imports TensorFlow and lists its devices with stderr closed, because the
  start-up lines and the cuInit failure are printed before that setting is read;
* sets absl's and the ``tensorflow`` logger's level to WARNING and drops the known noise
  (:data:`NOISE`) that libraries log at WARNING level;
* ignores Python's deprecation, future and user warnings (the HDF5 one among them; kdig_tf
  still saves students as ``.h5`` because tfmot and older readers need that format).

It prints one line (the banner) to stderr. ``verbose=True`` (``--verbose_logs``, or
``KDIG_VERBOSE_LOGS=1``) shows everything. Warnings meant for the user (a weak teacher, a
run too short to converge) are kdig_tf's own, printed with :func:`warn`, and never hidden.
"""
import contextlib
import importlib.metadata
import logging
import os
import sys
import warnings

VERBOSE_FLAG = "verbose_logs"
VERBOSE_ENV = "KDIG_VERBOSE_LOGS"
# Log messages (substrings) that libraries emit at WARNING level and that say nothing to a user.
NOISE = (
    "saving your model as an HDF5 file",
    "compiled metrics have yet to be built",
    "No training configuration found in the save file",
    "is deprecated",
    "will be removed in a future version",
    "Instructions for updating",
    "has no dataset_info.json",
    "Skipping variable loading for optimizer",
    "does not have a `build()` method implemented",
    "AutoGraph could not transform",
)
_HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, UserWarning, ImportWarning)
_state = {"quiet": None, "banner": False}


def define_flags(flag_values):
    """Define ``--verbose_logs`` on ``flag_values`` (a script's ``FLAGS``)."""
    from absl import flags

    flags.DEFINE_bool(VERBOSE_FLAG, False, "Show TensorFlow's C++ logs, absl INFO logs and Python warnings "
                      "(hidden by default).", flag_values=flag_values)


def verbose_requested(argv=None):
    """Whether ``--verbose_logs`` is on the command line or KDIG_VERBOSE_LOGS is set, before flags are parsed."""
    argv = sys.argv if argv is None else argv
    if os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    on = (f"--{VERBOSE_FLAG}", f"--{VERBOSE_FLAG}=true", f"--{VERBOSE_FLAG}=1")
    return any(str(arg).lower() in on for arg in argv)


class NoiseFilter(logging.Filter):
    """Drops records at WARNING level or below whose message holds one of :data:`NOISE`."""

    def filter(self, record):
        if record.levelno > logging.WARNING:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(noise in message for noise in NOISE)


_FILTER = NoiseFilter()


@contextlib.contextmanager
def _stderr_closed():
    """Point file descriptor 2 at /dev/null (C++ code writes there, not to sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _import_tensorflow_quietly():
    if "tensorflow" in sys.modules:
        return  # already imported: its start-up lines are out
    with _stderr_closed():
        import tensorflow as tf

        tf.config.list_physical_devices()  # device discovery prints the cuInit failure on CPU-only machines


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def banner(verbose=False):
    """The one line a script prints about itself and its environment."""
    import kdig_tf

    devices = ""
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        devices = " on GPU" if tf.config.list_physical_devices("GPU") else " on CPU"
    logs = "all logs shown" if verbose else "library logs hidden (--verbose_logs shows them)"
    return f"kdig_tf {kdig_tf.__version__}, TensorFlow {_version('tensorflow')}{devices}; {logs}"


def quiet(verbose=None, show_banner=True):
    """Keep library logs and warnings below warning level out of the way unless ``verbose``; print the banner once.

    ``verbose=None`` reads the command line and environment (:func:`verbose_requested`), for
    calls made before flags are parsed. Call it before anything imports TensorFlow to hide
    TensorFlow's start-up lines too; later calls only adjust the Python-side levels.
    """
    from absl import logging as absl_logging

    verbose = verbose_requested() if verbose is None else bool(verbose)
    if verbose:
        absl_logging.set_verbosity(absl_logging.INFO)
        for logger in (logging.getLogger("tensorflow"), logging.getLogger("absl")):
            logger.removeFilter(_FILTER)
        if _state["quiet"]:
            warnings.resetwarnings()
    else:
        if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # subprocesses inherit it
        _import_tensorflow_quietly()
        absl_logging.set_verbosity(absl_logging.WARNING)
        for name in ("tensorflow", "absl"):
            logger = logging.getLogger(name)
            logger.setLevel(logging.WARNING)
            logger.addFilter(_FILTER)
        # absl's handler is where absl and TensorFlow records end up when a script runs under absl.
        absl_logging.get_absl_handler().addFilter(_FILTER)
        for category in _HIDDEN_WARNINGS:
            warnings.filterwarnings("ignore", category=category)
    _state["quiet"] = not verbose
    if show_banner and not _state["banner"]:
        _state["banner"] = True
        print(banner(verbose), file=sys.stderr, flush=True)


@contextlib.contextmanager
def hdf5_on_purpose():
    """Silence tf-keras' "HDF5 file ... legacy" warning around a save that needs ``.h5`` (tfmot and
    older readers load it; kdig_tf's students are ``student.h5``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HDF5 file.*legacy.*")
        yield


def warn(message):
    """A warning for the user (never hidden): ``warning: <message>`` on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
