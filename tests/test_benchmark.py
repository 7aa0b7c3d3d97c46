import kdig_tf  # noqa: F401

import json
import os
import subprocess
import sys
import time
import types

import numpy as np
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
    report = benchmark.benchmark_models(entries, batch_sizes=[1, 3], warmup_runs=[1], num_runs=[2, 3],
                                        num_rounds=2)
    rows = report["rows"]
    assert [(row["model"], row["batch_size"], row["num_runs"]) for row in rows] == [
        ("teacher", 1, 2), ("student", 1, 2), ("teacher", 3, 3), ("student", 3, 3)]
    assert report["num_rounds"] == 2
    for row in rows:
        assert row["file_size_bytes"] == os.path.getsize(tiny_tflite)
        assert row["per_image_ms"] == pytest.approx(row["inference_avg_ms"] / row["batch_size"])
        assert row["num_rounds"] == 2 and len(row["rounds"]) == 2
        assert row["model_rss_method"].startswith("exact")
        if row["model"] == "teacher":
            assert row["speedup_vs_reference"] == pytest.approx(1.0)
            assert row["median_speedup_vs_reference_min"] == pytest.approx(1.0)
        else:
            assert row["mac_ratio_vs_reference"] == pytest.approx(2.0)
    markdown = benchmark.to_markdown(report)
    assert markdown.count("\n| student | fp32 |") == 2
    assert "avg ms" in markdown and "p90 ms" in markdown and "first ms" in markdown
    assert "2 interleaved round(s)" in markdown and "speedup range (median)" in markdown
    json.dumps(report, allow_nan=False)  # serialisable as is


def fake_latency(median, avg=None):
    """A ``measure_latency``-shaped result with chosen timings."""
    avg = median if avg is None else avg
    return dict(init_ms=1.0, first_inference_ms=2 * median, warmup_avg_ms=median, inference_avg_ms=avg,
                inference_median_ms=median, inference_p90_ms=1.5 * median, inference_min_ms=0.5 * median,
                inference_std_ms=0.1, peak_rss_mb=50.0, baseline_rss_mb=40.0, model_rss_mb=10.0,
                model_rss_method="exact (fake)", rss_scope="fake")


def fake_entries(tmp_path, names):
    entries = []
    for name in names:
        path = tmp_path / f"{name}.tflite"
        path.write_bytes(b"not really a model")
        entries.append(dict(name=name, mode="fp32", path=str(path), params=1, macs=1))
    return entries


def test_benchmark_models_interleaves_rounds(tmp_path):
    entries = fake_entries(tmp_path, ["teacher", "a", "b"])
    calls = []

    def measure(path, **kwargs):
        calls.append((os.path.basename(path), kwargs["batch_size"]))
        return fake_latency(1.0)

    report = benchmark.benchmark_models(entries, batch_sizes=[1, 4], warmup_runs=[1], num_runs=[2],
                                        num_rounds=3, measure_fn=measure)
    abc = ["teacher.tflite", "a.tflite", "b.tflite"]
    # A B C A B C A B C at batch 1, then the same at batch 4 (the old code timed A B C once).
    assert calls == [(name, 1) for name in abc * 3] + [(name, 4) for name in abc * 3]
    assert [len(row["rounds"]) for row in report["rows"]] == [3] * 6


@pytest.mark.parametrize("other_cpus, flagged", [(1.2, True), (0.01, False)])
def test_benchmark_report_says_how_busy_the_machine_was(tmp_path, fixed_cpu_competition, other_cpus, flagged):
    fixed_cpu_competition(other_cpus, wall_seconds=5.0)
    entries = fake_entries(tmp_path, ["teacher", "student"])
    report = benchmark.benchmark_models(entries, batch_sizes=[1], warmup_runs=[1], num_runs=[2],
                                        measure_fn=lambda path, **kwargs: fake_latency(1.0))
    assert report["environment"]["measurement_competition"]["other_processes_cpus"] == other_cpus
    markdown = benchmark.to_markdown(report)
    assert f"other processes kept {other_cpus:.2f} CPUs busy on average during the 5 s of measurements" in markdown
    assert ("not a quiet machine" in markdown) == flagged


def test_speedup_is_median_of_per_round_ratios(tmp_path):
    entries = fake_entries(tmp_path, ["teacher", "student"])
    # Load drifts: the teacher is slow in round 0, the student in round 2.
    timings = {"teacher": iter([(20.0, 30.0), (10.0, 10.0), (10.0, 10.0)]),
               "student": iter([(5.0, 5.0), (4.0, 5.0), (8.0, 20.0)])}

    def measure(path, **kwargs):
        median, avg = next(timings[os.path.basename(path)[:-len(".tflite")]])
        return fake_latency(median, avg)

    report = benchmark.benchmark_models(entries, batch_sizes=[1], warmup_runs=[1], num_runs=[2],
                                        num_rounds=3, measure_fn=measure)
    teacher, student = report["rows"]
    # Latency: median over rounds of the per-round figure.
    assert teacher["inference_median_ms"] == 10.0 and student["inference_median_ms"] == 5.0
    assert student["inference_p90_ms"] == 7.5 and student["inference_avg_ms"] == 5.0
    assert student["inference_min_ms"] == 2.0  # min over all rounds
    # Per-round median ratios 4.0, 2.5, 1.25 -> median 2.5 (the ratio of the medians would be 2.0).
    assert [result["median_speedup_vs_reference"] for result in student["rounds"]] == [4.0, 2.5, 1.25]
    assert student["median_speedup_vs_reference"] == 2.5
    assert (student["median_speedup_vs_reference_min"], student["median_speedup_vs_reference_max"]) == (1.25, 4.0)
    # Avg ratios 6.0, 2.0, 0.5 -> median 2.0; the spread is kept.
    assert student["speedup_vs_reference"] == 2.0
    assert (student["speedup_vs_reference_min"], student["speedup_vs_reference_max"]) == (0.5, 6.0)
    assert teacher["median_speedup_vs_reference"] == 1.0
    assert "1.25-4.00x" in benchmark.to_markdown(report)


def test_benchmark_models_without_reference_and_bad_rounds(tmp_path):
    entries = fake_entries(tmp_path, ["a"])
    report = benchmark.benchmark_models(entries, batch_sizes=[1], num_rounds=2,
                                        measure_fn=lambda path, **kwargs: fake_latency(1.0))
    row = report["rows"][0]
    assert row["median_speedup_vs_reference"] is None and row["speedup_vs_reference_max"] is None
    assert "| a | fp32 |" in benchmark.to_markdown(report)
    with pytest.raises(InvalidArgumentError):
        benchmark.benchmark_models(entries, num_rounds=0, measure_fn=lambda path, **kwargs: fake_latency(1.0))


def scripted_clock(monkeypatch, seconds):
    """``benchmark.time.perf_counter`` returns ``seconds`` in turn (init start/end, then begin/end per invoke)."""
    ticks = iter(seconds)
    monkeypatch.setattr(benchmark, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))


def test_inference_std_uses_ddof_1(tiny_tflite, monkeypatch):
    # init 10 ms; one warmup invoke of 1 ms; timed invokes of 1, 3 and 6 ms.
    scripted_clock(monkeypatch, [0.0, 0.010, 1.0, 1.001, 2.0, 2.001, 3.0, 3.003, 4.0, 4.006])
    result = benchmark._measure(tiny_tflite, batch_size=1, num_threads=1, warmup_runs=1, num_runs=3)
    assert result["init_ms"] == pytest.approx(10.0) and result["first_inference_ms"] == pytest.approx(1.0)
    assert result["inference_avg_ms"] == pytest.approx(10.0 / 3)
    assert result["inference_std_ms"] == pytest.approx(np.std([1.0, 3.0, 6.0], ddof=1))  # 2.52, not 2.05
    scripted_clock(monkeypatch, [0.0, 0.010, 1.0, 1.001, 2.0, 2.004])
    single = benchmark._measure(tiny_tflite, batch_size=1, num_threads=1, warmup_runs=1, num_runs=1)
    assert single["inference_std_ms"] is None  # undefined for one run, not 0


def test_model_rss_is_not_hidden_by_an_import_peak(tiny_tflite, monkeypatch):
    # Importing LiteRT peaked at 300 MiB; 100 MiB stay resident; loading and running the model peak at 140.
    state = {"reset": False}

    def status(field):
        if field == "VmRSS":
            return 100.0
        return 140.0 if state["reset"] else 300.0

    def reset():
        state["reset"] = True
        return True

    monkeypatch.setattr(benchmark, "_proc_status_mb", status)
    monkeypatch.setattr(benchmark, "_reset_peak_rss", reset)
    exact = benchmark._measure(tiny_tflite, batch_size=1, num_threads=1, warmup_runs=1, num_runs=1, reset_peak=True)
    # The old peak-minus-peak gave 300 - 300 = 0 MiB.
    assert (exact["peak_rss_mb"], exact["baseline_rss_mb"], exact["model_rss_mb"]) == (300.0, 100.0, 40.0)
    assert exact["model_rss_method"].startswith("exact")
    state["reset"] = False
    monkeypatch.setattr(benchmark, "_reset_peak_rss", lambda: False)
    bound = benchmark._measure(tiny_tflite, batch_size=1, num_threads=1, warmup_runs=1, num_runs=1, reset_peak=True)
    assert bound["model_rss_mb"] == 200.0 and bound["model_rss_method"].startswith("upper bound")


def test_isolated_worker_measures_model_memory_exactly(tiny_tflite):
    result = benchmark.measure_latency(tiny_tflite, warmup_runs=1, num_runs=1)
    assert result["model_rss_method"].startswith("exact")
    assert result["model_rss_mb"] >= 0.0
    assert result["baseline_rss_mb"] + result["model_rss_mb"] <= result["peak_rss_mb"] + 1e-6


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
               "--modes=fp32", "--batch_sizes=1", "--num_runs=2", "--warmup_runs=1", "--num_rounds=2",
               f"--output_dir={out}"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    report = json.loads((out / "benchmark.json").read_text())
    assert [row["model"] for row in report["rows"]] == ["student_k1", "student_k2"]
    # No teacher: the first model is the reference.
    assert report["rows"][0]["speedup_vs_reference"] == pytest.approx(1.0)
    assert report["num_rounds"] == 2 and [len(row["rounds"]) for row in report["rows"]] == [2, 2]
    assert "| student_k2 | fp32 | 1 |" in (out / "benchmark.md").read_text()
    assert (out / "student_k2_fp32.tflite").is_file() and (out / "student_k2_fp32.json").is_file()


@pytest.mark.parametrize("bad_flag", ["--models=robot", "--num_rounds=0"])
def test_benchmark_script_bad_spec_exits_2(tmp_path, bad_flag):
    command = [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"), bad_flag, f"--output_dir={tmp_path}"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1].startswith("error: InvalidArgumentError:")


def test_cpu_competition_subtracts_our_own_cpu(monkeypatch):
    machine = iter([100.0, 106.0])  # non-idle CPU seconds of the whole machine, start and end
    own = iter([10.0, 12.0])         # this process and its waited-for children
    clock = iter([0.0, 2.0])
    monkeypatch.setattr(benchmark, "_machine_busy_cpu_seconds", lambda: next(machine))
    monkeypatch.setattr(benchmark, "_own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(benchmark.time, "monotonic", lambda: next(clock))
    with benchmark.CpuCompetition() as competition:
        pass
    assert competition.other_cpu_seconds == pytest.approx(4.0)
    assert competition.other_cpus == pytest.approx(2.0)
    assert competition.summary() == {"other_processes_cpu_seconds": 4.0, "other_processes_cpus": 2.0,
                                     "wall_seconds": 2.0}


def test_cpu_competition_without_proc_stat(monkeypatch):
    monkeypatch.setattr(benchmark, "_machine_busy_cpu_seconds", lambda: None)
    with benchmark.CpuCompetition() as competition:
        pass
    assert competition.other_cpus is None and competition.summary()["other_processes_cpus"] is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")
def test_cpu_competition_sees_a_process_it_did_not_wait_for():
    # One second of CPU, however long a loaded machine takes to give it.
    busy_loop = "import time\nwhile time.process_time() < 1.0:\n    pass\n"
    with benchmark.CpuCompetition() as competition:
        competitor = subprocess.Popen([sys.executable, "-c", busy_loop])
        competitor_done = False
        while not competitor_done:  # poll() would reap it (then it counts as ours): watch /proc instead
            with open(f"/proc/{competitor.pid}/stat") as handle:
                competitor_done = handle.read().split(") ", 1)[1].startswith("Z")
            time.sleep(0.01)
    competitor.wait()
    assert competition.other_cpu_seconds > 0.8  # its second of CPU, less clock-tick rounding
    assert 0 < competition.other_cpus <= os.cpu_count() + 0.1


def test_environment_names_the_kernels_only_where_tensorflow_runs(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma\n")
    flags = benchmark.cpu_flags(str(cpuinfo))
    assert flags["avx2"] and flags["fma"] and not flags["avx512f"] and set(flags) == set(benchmark.CPU_FLAGS)
    assert benchmark.cpu_flags(str(tmp_path / "missing")) is None
    # This process runs TensorFlow; a LiteRT timing worker does not, and must not load it to answer.
    assert benchmark.environment()["tensorflow_onednn"] is (os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1")
    check = ("import sys\nfrom kdig_tf import benchmark\n"
             "print(benchmark.environment()['tensorflow_onednn'], 'tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["None", "False"]
