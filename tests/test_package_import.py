"""Importing kdig_tf (and drawing its plots) leaves the caller's environment alone, except for
the TensorFlow settings it must make before TensorFlow loads."""
import subprocess
import sys

import pytest

CHECK = """
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
# Third-party libraries set variables of their own (TF2_BEHAVIOR, HDF5_PLUGIN_PATH...) on import.
import h5py, matplotlib, scipy.stats, tensorflow, tensorflow_datasets, tf_keras, tqdm
import ai_edge_litert.interpreter
before = dict(os.environ)
backend = matplotlib.get_backend()
import kdig_tf
from kdig_tf import data, distiller, explain, export, loading, models, overlay, pareto, pipeline, records, reports
changed = {key for key in set(before) | set(os.environ) if before.get(key) != os.environ.get(key)}
assert not changed, changed
from kdig_tf.io_utils import subplots
figure, axes = subplots(figsize=(2, 2))
axes.plot([0, 1], [1, 0])
figure.savefig(os.path.join(sys.argv[1], "plot.png"))
assert matplotlib.get_backend() == backend, (backend, matplotlib.get_backend())
assert "matplotlib.pyplot" not in sys.modules
print("ok")
"""


def test_import_changes_no_environment_variable_and_no_matplotlib_backend(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "MPLBACKEND": "svg"}
    result = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "plot.png").stat().st_size > 0


ONEDNN = """
import os, sys
{before}
import kdig_tf
import tensorflow
from kdig_tf import benchmark
print(os.environ.get("TF_USE_LEGACY_KERAS"), os.environ.get("TF_ENABLE_ONEDNN_OPTS"), benchmark.tensorflow_onednn())
"""


TENSORFLOW_DEFAULT = """
import tensorflow
from tensorflow.python.util import _pywrap_util_port
print(bool(_pywrap_util_port.IsMklEnabled()))
"""


def _last_line(code, env):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(env, PATH="/usr/bin:/bin"))
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split("\n")[-2]


@pytest.mark.parametrize("env, before, expected", [
    ({}, "", "1 1 True"),  # the package's defaults
    ({"TF_ENABLE_ONEDNN_OPTS": "0"}, "", "1 0 False"),  # a user's choice is kept
    # Too late to choose: the package leaves TensorFlow's own default, which depends on the CPU
    # (off on AVX2-only CPUs, on where AVX-512 VNNI/BF16 exist).
    ({}, "import tensorflow", "1 None {tensorflow_default}"),
])
def test_import_turns_on_onednn_kernels_unless_told_otherwise_or_too_late(env, before, expected):
    if "{tensorflow_default}" in expected:
        expected = expected.format(tensorflow_default=_last_line(TENSORFLOW_DEFAULT, {}))
    assert _last_line(ONEDNN.format(before=before), env) == expected
