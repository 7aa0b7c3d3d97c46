"""benchmarks/train_throughput.py end to end, in a subprocess that mocks CIFAR-10 with tfds.testing."""
import json
import math
import os
import subprocess
import sys
from importlib import metadata

import pytest

from kdig_tf import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "train_throughput.py")
MOCK_RUNNER = """
import os, runpy, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow_datasets as tfds
sys.argv = [{script!r}] + sys.argv[1:]
with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    runpy.run_path({script!r}, run_name="__main__")
"""


def _run(tmp_path, *flags):
    runner = tmp_path / "mock_train_throughput.py"
    runner.write_text(MOCK_RUNNER.format(script=SCRIPT))
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TFDS_DATA_DIR", None)
    return subprocess.run([sys.executable, str(runner), *flags], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


def _positive_finite(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_writes_the_schema_with_positive_finite_ratios(tmp_path):
    output = tmp_path / "out" / "train_throughput.json"
    flagfile = tmp_path / "bench.cfg"
    # 10 examples: batch 4 ends each epoch on a partial batch of 2, which the image count must follow.
    flagfile.write_text("\n".join([
        "--split=train", f"--store_dir={tmp_path / 'store'}", "--examples_per_shard=6", "--keep_blocks=2",
        "--batch_sizes=4,8", "--repeats=1", "--steps=2", "--warmup_steps=1", "--intra_op_threads=1",
        "--inter_op_threads=1", "--recipe_note=tiny mock run", "--precision=mixed_bfloat16",
        f"--output={output}"]) + "\n")
    proc = _run(tmp_path, f"--flagfile={flagfile}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch 4 rep 0:" in proc.stdout and "batch 8 rep 0:" in proc.stdout

    result = json.loads(output.read_text())
    assert "--flagfile=" in result["command"] and result["recipe_note"] == "tiny mock run"
    assert result["protocol"]["repeats"] == 1 and result["protocol"]["steps"] == 2
    assert result["target_ratio"] == 0.9
    assert result["store"]["num_examples"] == 10 and result["store"]["shards"] == 2
    assert result["recipe"]["optimizer"] == "sgd" and result["recipe"]["weight_decay"] == 5e-4
    assert result["threads"]["intra_op_parallelism_threads"] == 1
    assert result["threads"]["inter_op_parallelism_threads"] == 1
    machine = result["machine"]
    # The values, not just the keys (benchmark.environment always has every key): this machine's.
    assert machine["cpu_count"] == os.cpu_count() and machine["tensorflow"] == metadata.version("tensorflow")
    assert machine["cpu_model"] == benchmark.cpu_model()
    assert len(machine["load_average_start"]) == 3 and len(machine["load_average_end"]) == 3
    competition = machine["measurement_competition"]
    assert competition["wall_seconds"] > 0
    assert competition["other_processes_cpus"] is None or competition["other_processes_cpus"] >= 0
    assert machine["cpu_flags"] == benchmark.cpu_flags()  # None where /proc/cpuinfo is not readable

    rows = result["batch_sizes"]
    assert [row["batch_size"] for row in rows] == [4, 8]
    assert [row["learning_rate"] for row in rows] == [0.1 * 4 / 128, 0.1 * 8 / 128]
    for row in rows:
        for arm in ("kd_ig", "student"):
            entry = row[arm]
            for side in ("in_memory", "pipeline"):
                assert len(entry[side]["images_per_second"]) == 1
                assert all(_positive_finite(rate) for rate in entry[side]["images_per_second"])
                assert entry[side]["median_images_per_second"] == entry[side]["images_per_second"][0]
            assert _positive_finite(entry["ratio"])
            assert entry["ratio"] == entry["pipeline"]["median_images_per_second"] \
                / entry["in_memory"]["median_images_per_second"]
            assert entry["meets_target"] == (entry["ratio"] >= 0.9)
            assert entry["retraces_during_measurements"] == 0  # both sides ran the same traced step
            precision = entry["precision"]
            assert precision["policy"] == "mixed_bfloat16" and len(precision["in_memory_images_per_second"]) == 1
            assert _positive_finite(precision["ratio_vs_float32"])
            assert precision["ratio_vs_float32"] == precision["median_images_per_second"] \
                / entry["in_memory"]["median_images_per_second"]

    best = max(rows, key=lambda row: (row["kd_ig"]["meets_target"],
                                      row["kd_ig"]["pipeline"]["median_images_per_second"]))
    assert result["chosen"]["batch_size"] == best["batch_size"]
    assert result["chosen"]["meets_target"] == best["kd_ig"]["meets_target"]
    assert result["student_chosen"]["arm"] == "student"
    assert result["precision"] == "mixed_bfloat16" and "mixed_bfloat16 in-memory img/s vs float32" in proc.stdout

    # A batch larger than the (reused) store is a named error with exit code 2.
    proc = _run(tmp_path, f"--store_dir={tmp_path / 'store'}", "--batch_sizes=64", f"--output={tmp_path / 'x.json'}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert any(line.startswith("error: InvalidArgumentError: ") for line in proc.stderr.splitlines())


@pytest.mark.slow
def test_images_in_batches_follow_partial_last_batches():
    # 10 examples in batches of 4 are epochs of 4, 4, 2 images. (A subprocess: the script defines absl flags.)
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import train_throughput as t; "
            "print(t.batch_sizes_in(0, 3, 10, 4), t.batch_sizes_in(1, 4, 10, 4), t.batch_sizes_in(0, 5, 8, 4))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["10", str(4 + 2 + 4 + 4), "20"]
