"""Small helpers for the notebooks: tiny (smoke-test) mode, where the checkout is, where data lives.

``KDIG_TINY=1`` switches the notebooks in ``notebooks/`` to mock CIFAR-10
(``tfds.testing.mock_data``) and tiny models, so that the test suite runs them top to
bottom in a minute or so each, with no data and no network.
"""
import kdig_tf

import os
import sys
import tempfile

TINY_ENV = "KDIG_TINY"
REPO_ROOT_ENV = "KDIG_REPO_ROOT"
WORK_ROOT_ENV = "KDIG_WORK_ROOT"
TEACHER_ENV = "KDIG_TEACHER"
# Where the notebooks' install cell clones the repository (Colab).
CLONE_DIR = "kdig_tf_repo"
# Examples per split of the mock dataset (tiny mode).
TINY_NUM_EXAMPLES = 16
_FALSE = ("", "0", "false", "no", "off")


def tiny_mode(default=False):
    """``default`` unless ``$KDIG_TINY`` is set: then its value ('1' = tiny, '0' = full)."""
    value = os.environ.get(TINY_ENV)
    if value is None:
        return bool(default)
    return value.strip().lower() not in _FALSE


def in_colab():
    return "google.colab" in sys.modules


def _is_checkout(path):
    return (os.path.isfile(os.path.join(path, "scripts", "deploy", "run_tflite.py"))
            and os.path.isdir(os.path.join(path, "kdig_tf")))


def repo_root(start=None):
    """The kdig_tf checkout (with scripts/ and pretrained/), or None for a bare pip install.

    Looked for in ``$KDIG_REPO_ROOT``, then upwards from ``start`` (default: the working
    directory), then in ``./kdig_tf_repo`` (the Colab clone), then next to the imported
    package (an editable install).
    """
    start = start or os.getcwd()
    candidates = [os.environ.get(REPO_ROOT_ENV), start, os.path.join(start, CLONE_DIR),
                  os.path.dirname(os.path.dirname(os.path.abspath(kdig_tf.__file__)))]
    for candidate in candidates:
        path = os.path.abspath(candidate) if candidate else None
        while path:
            if _is_checkout(path):
                return path
            parent = os.path.dirname(path)
            path = parent if parent != path else None
    return None


def work_root(tiny, root=None):
    """Where a notebook writes: ``$KDIG_WORK_ROOT``, else a temporary folder in tiny mode,
    else ``<checkout>/runs/notebooks`` (git-ignored) or ``./kdig_runs``."""
    path = os.environ.get(WORK_ROOT_ENV)
    if not path:
        if tiny:
            path = tempfile.mkdtemp(prefix="kdig_notebook_")
        else:
            path = os.path.join(root, "runs", "notebooks") if root else os.path.abspath("kdig_runs")
    os.makedirs(path, exist_ok=True)
    return path


def data_dir(root=None):
    """tfds data_dir for full mode: ``$TFDS_DATA_DIR``, the shared folder next to the
    checkout (``../shared/tensorflow_datasets``), else ``~/tensorflow_datasets``."""
    if os.environ.get("TFDS_DATA_DIR"):
        return os.environ["TFDS_DATA_DIR"]
    if root:
        shared = os.path.join(os.path.dirname(root), "shared", "tensorflow_datasets")
        if os.path.isdir(shared):
            return shared
    return os.path.expanduser("~/tensorflow_datasets")


def find_teacher(root=None, work=None):
    """First existing teacher file: ``$KDIG_TEACHER``, ``<checkout>/pretrained/teacher.h5``,
    then the one notebook 01 trains (``<work>/quickstart/teacher.h5``); else None."""
    candidates = [os.environ.get(TEACHER_ENV),
                  os.path.join(root, "pretrained", "teacher.h5") if root else None,
                  os.path.join(work, "quickstart", "teacher.h5") if work else None]
    return next((path for path in candidates if path and os.path.isfile(path)), None)


def quiet():
    """Hide TensorFlow/tfds info and deprecation chatter in notebook outputs."""
    import logging
    import warnings

    import absl.logging
    import tensorflow as tf

    absl.logging.set_verbosity(absl.logging.ERROR)
    tf.get_logger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
    warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file")
