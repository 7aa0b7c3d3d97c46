"""benchmarks/onednn_agreement.py end to end on a tiny student (its workers are subprocesses)."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "onednn_agreement.py")


def test_both_backends_are_measured_with_their_own_kernels_and_agree_to_round_off(tmp_path):
    output = tmp_path / "out" / "onednn_agreement.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, SCRIPT, "--keep_blocks=2", "--batch_size=8", "--timing_batch_size=4",
                             "--timing_steps=2", "--warmup_steps=1", "--repeats=2", f"--output={output}"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert "x the img/s of Eigen" in result.stdout

    # Each timing worker ran on the kernels it was meant to: the setting reached TensorFlow.
    assert [run["tensorflow_onednn"] for run in report["timing"]["eigen"]["runs"]] == [False, False]
    assert [run["tensorflow_onednn"] for run in report["timing"]["onednn"]["runs"]] == [True, True]
    speeds = {backend: report["timing"][backend]["median_images_per_second"] for backend in ("eigen", "onednn")}
    assert all(math.isfinite(speed) and speed > 0 for speed in speeds.values())
    assert math.isclose(report["onednn_speedup"], speeds["onednn"] / speeds["eigen"])

    # Same weights and batch on all three sides: the losses agree to float32 precision...
    losses = report["loss"]
    assert abs(losses["eigen"] - losses["float64"]) < 1e-5 and abs(losses["onednn"] - losses["float64"]) < 1e-5
    # ...and so do the gradients of every variable with a non-zero true gradient.
    for backend in ("eigen", "onednn"):
        errors = report["relative_gradient_error"][backend]
        assert errors["all"]["count"] + len(report["zero_true_gradient_variables"]) == 11  # 2-block student
        assert errors["kernels"]["count"] == 4  # stem, depthwise, projection, dense
        assert 0 < errors["all"]["median"] < 1e-3, errors["all"]
    assert report["settings"]["keep_blocks"] == 2 and report["machine"]["cpu_count"] >= 1
