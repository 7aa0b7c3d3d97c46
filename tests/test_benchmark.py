import kdig_tf  # noqa: F401

import json
import os
import subprocess
import sys

import pytest
import tf_keras as keras

from kdig_tf import benchmark, export, models
from kdig_tf.errors import InvalidArgumentError, NotAModelError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def single_layer_model(layer, input_shape):
    return keras.Sequential([keras.Input(input_shape), layer])


def test_count_macs_matches_hand_formulas():
    # Conv2D: H_out * W_out * C_out * k_h * k_w * C_in.
    conv = single_layer_model(keras.layers.Conv2D(4, 3, padding="same"), (8, 8, 3))
    assert benchmark.count_macs(conv) == 8 * 8 * 4 * 3 * 3 * 3
    # Stride 2, valid padding: (8 - 3) // 2 + 1 = 3 output rows and columns.
    strided = single_layer_model(keras.layers.Conv2D(4, 3, strides=2), (8, 8, 3))
    assert benchmark.count_macs(strided) == 3 * 3 * 4 * 3 * 3 * 3
    # Depthwise: one k x k filter per channel.
    depthwise = single_layer_model(keras.layers.DepthwiseConv2D(3, padding="same"), (8, 8, 3))
    assert benchmark.count_macs(depthwise) == 8 * 8 * 3 * 3 * 3
    dense = single_layer_model(keras.layers.Dense(5), (10,))
    assert benchmark.count_macs(dense) == 10 * 5
    grouped = single_layer_model(keras.layers.Conv2D(4, 1, groups=2), (8, 8, 4))
    assert benchmark.count_macs(grouped) == 8 * 8 * 4 * (4 // 2)


def test_count_macs_of_the_paper_networks():
    # The paper quotes ~88.0 M MACs for the teacher and ~58.7 M for the 4.1x student.
    assert benchmark.count_macs(models.build_teacher()) == 87_976_448
    assert benchmark.count_macs(models.build_student(keep_blocks=14)) == 58_696_640


def test_parse_model_spec():
    assert benchmark.parse_model_spec("teacher")["name"] == "teacher"
    assert benchmark.parse_model_spec("teacher:0.5")["width"] == 0.5
    student = benchmark.parse_model_spec("student:14:0.5")
    assert (student["keep_blocks"], student["width"], student["name"]) == (14, 0.5, "student_k14_w0.5")
    assert benchmark.parse_model_spec("student:4.12x")["compression"] == "4.12x"
    for bad in ("", "teacher:wide", "student", "student:fourteen", "robot:3", "student:1:2:3"):
        with pytest.raises(InvalidArgumentError):
            benchmark.parse_model_spec(bad)


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bench") / "tiny.tflite")
    export.convert(models.build_student(keep_blocks=2), path, "fp32")
    return path


@pytest.mark.parametrize("isolate", [True, False])
def test_measure_latency_reports_every_key(tiny_tflite, isolate):
    result = benchmark.measure_latency(tiny_tflite, batch_size=2, warmup_runs=1, num_runs=2, isolate=isolate)
    for key in benchmark.LATENCY_KEYS + benchmark.MEMORY_KEYS:
        assert key in result, key
    for key in benchmark.LATENCY_KEYS:
        assert result[key] >= 0.0
    assert result["inference_avg_ms"] > 0.0
    assert result["inference_min_ms"] <= result["inference_median_ms"] <= result["inference_p90_ms"]
    assert result["peak_rss_mb"] >= result["baseline_rss_mb"] > 0
    assert result["rss_scope"].startswith("subprocess" if isolate else "in-process")


def test_isolated_worker_does_not_carry_tensorflow_memory(tiny_tflite):
    # TensorFlow is loaded in this process; the worker must not inherit its footprint.
    result = benchmark.measure_latency(tiny_tflite, warmup_runs=1, num_runs=1)
    assert "tensorflow" in sys.modules
    assert result["peak_rss_mb"] < 400


def test_benchmark_models_table_and_speedups(tiny_tflite):
    entries = [dict(name="teacher", mode="fp32", path=tiny_tflite, params=10, macs=200),
               dict(name="student", mode="fp32", path=tiny_tflite, params=5, macs=100)]
    report = benchmark.benchmark_models(entries, batch_sizes=[1, 3], warmup_runs=[1], num_runs=[2, 3])
    rows = report["rows"]
    assert [(row["model"], row["batch_size"], row["num_runs"]) for row in rows] == [
        ("teacher", 1, 2), ("student", 1, 2), ("teacher", 3, 3), ("student", 3, 3)]
    for row in rows:
        assert row["file_size_bytes"] == os.path.getsize(tiny_tflite)
        assert row["per_image_ms"] == pytest.approx(row["inference_avg_ms"] / row["batch_size"])
        if row["model"] == "teacher":
            assert row["speedup_vs_reference"] == pytest.approx(1.0)
        else:
            assert row["mac_ratio_vs_reference"] == pytest.approx(2.0)
    markdown = benchmark.to_markdown(report)
    assert markdown.count("\n| student | fp32 |") == 2
    assert "avg ms" in markdown and "p90 ms" in markdown and "first ms" in markdown
    json.dumps(report)  # serialisable as is


def test_measure_latency_named_errors(tmp_path, tiny_tflite):
    with pytest.raises(NotAModelError):
        benchmark.measure_latency(str(tmp_path / "absent.tflite"))
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(NotAModelError):
        benchmark.measure_latency(str(corrupt), num_runs=1, warmup_runs=1)
    with pytest.raises(InvalidArgumentError):
        benchmark.measure_latency(tiny_tflite, num_runs=0)


def test_benchmark_script_writes_json_and_markdown(tmp_path):
    out = tmp_path / "results"
    command = [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"), "--models=student:1,student:2",
               "--modes=fp32", "--batch_sizes=1", "--num_runs=2", "--warmup_runs=1", f"--output_dir={out}"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads((out / "benchmark.json").read_text())
    assert [row["model"] for row in report["rows"]] == ["student_k1", "student_k2"]
    # No teacher: the first model is the reference.
    assert report["rows"][0]["speedup_vs_reference"] == pytest.approx(1.0)
    assert "| student_k2 | fp32 | 1 |" in (out / "benchmark.md").read_text()
    assert (out / "student_k2_fp32.tflite").is_file() and (out / "student_k2_fp32.json").is_file()


def test_benchmark_script_bad_spec_exits_2(tmp_path):
    command = [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"), "--models=robot",
               f"--output_dir={tmp_path}"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1].startswith("error: InvalidArgumentError:")
