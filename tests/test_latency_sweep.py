import kdig_tf  # noqa: F401

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from kdig_tf import pareto
from kdig_tf.errors import InvalidArgumentError, UnknownKeyError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def point(name, latency, accuracy, **extra):
    return dict(name=name, latency_median_ms=latency, accuracy=accuracy, **extra)


def names(rows):
    return [row["name"] for row in rows]


def quiet(_message):
    pass


def test_pareto_front_removes_dominated_points_and_keeps_ties():
    points = [
        point("b", 2.0, 85.0),
        point("c", 2.0, 84.0),            # same latency as b, less accurate: dominated
        point("d", 3.0, 85.0),            # as accurate as b, slower: dominated
        point("a", 1.0, 80.0),
        point("a_twin", 1.0, 80.0),       # exact tie with a: both stay
        point("g", 4.0, 90.0),
        point("h", 3.5, 70.0),            # dominated by everything faster and better
        point("unknown", 0.5, None),      # no accuracy: ignored
        point("nan", 0.1, float("nan")),  # ignored too
    ]
    assert names(pareto.pareto_front(points)) == ["a", "a_twin", "b", "g"]
    assert pareto.pareto_front([]) == []
    assert names(pareto.pareto_front([point("solo", 1.0, 50.0)])) == ["solo"]
    # Minimising y instead (e.g. error rate): h, slow but lowest, joins the fastest pair.
    assert names(pareto.pareto_front(points, maximize_y=False)) == ["a", "a_twin", "h"]
    # Any keys: MACs as a capacity proxy.
    macs = [dict(name="x", latency_median_ms=1.0, macs=5), dict(name="y", latency_median_ms=2.0, macs=4)]
    assert names(pareto.pareto_front(macs, y_key="macs")) == ["x"]


def test_select_fast_and_speedups():
    reference = {"median_ms": 10.0, "p90_ms": 20.0, "macs": 1000}
    rows = [
        dict(name="teacher", role="teacher", mode="fp32", latency_median_ms=10.0, latency_p90_ms=20.0, macs=1000),
        dict(name="teacher", role="teacher", mode="int8", latency_median_ms=5.0, latency_p90_ms=8.0, macs=1000),
        dict(name="exact", role="student", mode="fp32", latency_median_ms=1.0, latency_p90_ms=4.0, macs=100,
             accuracy=70.0),
        dict(name="just_below", role="student", mode="fp32", latency_median_ms=1.0001, latency_p90_ms=1.0,
             macs=90, accuracy=99.0),
        dict(name="fast_int8", role="student", mode="int8", latency_median_ms=0.25, latency_p90_ms=0.5, macs=100,
             accuracy=75.0),
        dict(name="no_acc", role="student", mode="int8", latency_median_ms=0.1, latency_p90_ms=0.2, macs=10,
             accuracy=None),
        dict(name="untimed", role="student", mode="fp32", latency_median_ms=None, latency_p90_ms=None, macs=10),
    ]
    pareto.add_speedups(rows, reference)
    by_name = {(row["name"], row["mode"]): row for row in rows}
    assert by_name[("exact", "fp32")]["speedup_median"] == pytest.approx(10.0)
    assert by_name[("exact", "fp32")]["speedup_p90"] == pytest.approx(5.0)
    assert by_name[("fast_int8", "int8")]["speedup_vs_teacher_same_mode"] == pytest.approx(20.0)
    assert by_name[("fast_int8", "int8")]["mac_ratio"] == pytest.approx(10.0)
    assert by_name[("untimed", "fp32")]["speedup_median"] is None
    # >= 10x inclusive, students only, most accurate first, unknown accuracy last.
    assert names(pareto.select_fast(rows, 10.0)) == ["fast_int8", "exact", "no_acc"]
    assert names(pareto.select_fast(rows, 1.5)) == ["just_below", "fast_int8", "exact", "no_acc"]
    assert pareto.select_fast(rows, 1000.0) == []
    with pytest.raises(InvalidArgumentError):
        pareto.select_fast(rows, 0.0)


def test_grid_parsing():
    assert pareto.parse_widths(["1.0", " 0.35"]) == [1.0, 0.35]
    assert pareto.candidate_grid([14, 6], [1.0, 0.35]) == [
        ("k14_w1", 14, 1.0, 1), ("k14_w0.35", 14, 0.35, 1), ("k6_w1", 6, 1.0, 1), ("k6_w0.35", 6, 0.35, 1)]
    assert pareto.candidate_grid([6], [1.0], ["k14_w0.50_s2", "k12_w0.35"])[1:] == [
        ("k14_w0.5_s2", 14, 0.5, 2), ("k12_w0.35", 12, 0.35, 1)]
    for bad in (["k6_w1"], ["k14_w0.5_s2", "k14_w0.5_s2"], ["k14_w0.5_s3"], ["k19_w1"], ["k14_w0"], ["k14"],
                ["k14_w0.5_s2 extra"]):
        with pytest.raises(InvalidArgumentError):
            pareto.candidate_grid([6], [1.0], bad)
    for bad in (["0"], ["-1"], ["a"], [], ["0.5", "0.50"]):
        with pytest.raises(InvalidArgumentError):
            pareto.parse_widths(bad)
    assert pareto.parse_modes(["fp32", "int8"]) == ["fp32", "int8"]
    for bad in ([], ["fp32", "fp32"], ["fp64"]):
        with pytest.raises(InvalidArgumentError):
            pareto.parse_modes(bad)


def small_teacher():
    """A stand-in reference that converts in a second (the real teacher takes ~10-30 s)."""
    import tf_keras as keras

    from kdig_tf import models

    keras.utils.set_random_seed(0)
    return models.build_student(4, input_shape=pareto.IMAGE_SHAPE, name="stand_in_teacher")


def size_latency(path, num_threads, warmup_runs, num_runs):
    """Fake latency: 1 ms per 10 kB of model file."""
    ms = os.path.getsize(path) / 1e4
    return {"inference_median_ms": ms, "inference_p90_ms": 1.5 * ms, "inference_avg_ms": 1.1 * ms}


def test_latency_only_end_to_end(tmp_path):
    out = str(tmp_path / "sweep")
    report = pareto.run_latency_sweep(out, ["1", "2"], ["0.25"], ["fp32"], num_runs=2, warmup_runs=1,
                                      num_calibration=4, teacher=small_teacher(), latency_fn=size_latency,
                                      command="test", log=quiet)
    rows = report["rows"]
    assert [(row["name"], row["mode"]) for row in rows][0] == ("teacher", "fp32")
    assert {row["name"] for row in rows} == {"teacher", "k1_w0.25", "k2_w0.25"}
    assert report["reference"]["drift"] == pytest.approx(1.0)
    assert report["fast_candidates"] == ["k1_w0.25:fp32", "k2_w0.25:fp32"]  # no accuracy: fastest first
    assert report["pareto"]["y"] == "macs" and report["best_fast"] is None
    student = next(row for row in rows if row["name"] == "k2_w0.25")
    assert student["speedup_median"] == pytest.approx(rows[0]["latency_median_ms"] / student["latency_median_ms"])
    assert student["macs"] > 0 and student["params"] > 0 and student["weights"] == "random"
    for suffix in ("json", "md", "png"):
        assert os.path.getsize(os.path.join(out, f"latency_sweep.{suffix}")) > 0
    saved = json.loads(open(os.path.join(out, "latency_sweep.json")).read())
    assert saved["command"] == "test" and saved["machine"]["cpu_count"] == os.cpu_count()
    assert len(saved["machine"]["load_average_before"]) == 3 and saved["settings"]["num_threads"] == 1
    assert "| k1_w0.25 | 1 | 0.25 | 1 | fp32 |" in open(os.path.join(out, "latency_sweep.md")).read()

    # Again with real LiteRT timings (2 runs, in-process): the conversions are reused.
    stamps = {name: os.path.getmtime(os.path.join(out, "tflite", name))
              for name in os.listdir(os.path.join(out, "tflite")) if name.endswith(".tflite")}
    report = pareto.run_latency_sweep(out, ["1", "2"], ["0.25"], ["fp32"], num_runs=2, warmup_runs=1,
                                      num_calibration=4, isolate=False, teacher=small_teacher(), command="test",
                                      log=quiet)
    assert all(row["latency_median_ms"] > 0 for row in report["rows"])
    assert "in-process" in report["rows"][1]["latency"]["rss_scope"]
    assert stamps == {name: os.path.getmtime(os.path.join(out, "tflite", name)) for name in stamps}


@pytest.mark.parametrize("other_cpus, warned", [(1.5, True), (0.0, False)])
def test_competing_processes_during_the_timings_are_reported(tmp_path, monkeypatch, fixed_cpu_competition,
                                                             other_cpus, warned):
    """The warning rests on CPU others used while the models were timed, not on the load average."""
    fixed_cpu_competition(other_cpus, wall_seconds=3.0)
    monkeypatch.setattr(pareto.benchmark, "load_average", lambda: [9.0, 9.0, 9.0])  # ignored for the warning
    out = str(tmp_path / "sweep")
    report = pareto.run_latency_sweep(out, ["1"], ["0.25"], ["fp32"], num_runs=2, warmup_runs=1,
                                      num_calibration=4, teacher=small_teacher(), latency_fn=size_latency,
                                      command="test", log=quiet)
    assert report["machine"]["timing_competition"]["other_processes_cpus"] == other_cpus
    assert any("competed for the cores" in warning for warning in report["warnings"]) == warned
    markdown = open(os.path.join(out, "latency_sweep.md")).read()
    assert f"other processes kept {other_cpus:.2f} CPUs busy on average during the 3 s of timings" in markdown
    assert ("competed for the cores" in markdown) == warned


def fake_distill(fail=()):
    """Stands in for the pipeline: a results.json whose exported .tflite files are placeholders."""
    calls = []

    def launch(config, workdir):
        flags = dict(dataclasses.asdict(config), workdir=workdir)
        calls.append(flags)
        if any(f"/{name}/" in workdir for name in fail):
            raise RuntimeError("fake failure")
        exports = {}
        for mode in config.modes():
            path = os.path.join(workdir, f"student_{mode}.tflite")
            with open(path, "wb") as handle:
                # Distinct bytes per mode: accuracies are cached by file hash.
                handle.write(mode.encode() + b"x" * int(1000 * config.width_multiplier * config.keep_blocks
                                                        / config.stem_stride))
            exports[mode] = {"path": path}
        fine_tuned = (["qat_int8"] if config.qat_epochs else []) + \
            ([f"pruned_{mode}" for mode in config.modes()] if config.prune_sparsity else [])
        for mode in fine_tuned:  # smaller files than the plain exports, so faster for size_latency
            path = os.path.join(workdir, f"student_{mode}.tflite")
            with open(path, "wb") as handle:
                handle.write(mode.encode().ljust(12, b"x"))
            exports[mode] = {"path": path}
        results = {"val_accuracy": 50.0 + config.keep_blocks, "tflite": exports, "flags": flags}
        with open(os.path.join(workdir, "results.json"), "w") as handle:
            json.dump(results, handle)
        return results
    return launch, calls


def recorded_overrides(workdir):
    with open(os.path.join(workdir, "command.json")) as handle:
        return json.load(handle)["overrides"]


def test_train_path_with_a_fake_distill(tmp_path):
    out = str(tmp_path / "sweep")
    base = tmp_path / "base.cfg"
    base.write_text("--method=kd_ig\n--epochs=1\n--val_split=train[45000:46000]\n")
    launch, calls = fake_distill(fail=("k1_w0.25",))
    evaluated = []

    def accuracy(path, flags):
        evaluated.append(path)
        keep = int(os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(path))))[1])
        return {"accuracy": 60.0 + keep + (0.5 if "fp32" in path else 0.0), "num_examples": 1000}

    kwargs = dict(train=True, flagfile=str(base), num_runs=2, warmup_runs=1, num_calibration=4, teacher=small_teacher(),
                  latency_fn=size_latency, accuracy_fn=accuracy, launcher=launch, command="test", log=quiet)
    report = pareto.run_latency_sweep(out, ["2", "1"], ["0.25"], ["fp32"], ["k2_w0.25_s2"], **kwargs)
    assert len(calls) == 3
    assert {(c["keep_blocks"], c["width_multiplier"], c["stem_stride"], c["export_modes"], c["epochs"])
            for c in calls} == {(2, 0.25, 1, "fp32", 1), (1, 0.25, 1, "fp32", 1), (2, 0.25, 2, "fp32", 1)}
    assert all(c["store_dir"].endswith(os.path.join("sweep", "store")) for c in calls)
    # Only stride-2 runs get the flag, so stride-1 records stay what they were before it existed.
    strides = {c["workdir"]: [arg for arg in recorded_overrides(c["workdir"]) if "stem_stride" in arg] for c in calls}
    assert sorted(strides.values()) == [[], [], ["--stem_stride=2"]]
    by_name = {row["name"]: row for row in report["rows"]}
    assert by_name["k2_w0.25"]["weights"] == "trained" and by_name["k2_w0.25"]["accuracy"] == pytest.approx(62.5)
    assert by_name["k2_w0.25"]["accuracy_split"] == "train[45000:46000]"
    assert by_name["k1_w0.25"]["run_status"] == "failed" and by_name["k1_w0.25"]["accuracy"] is None
    assert by_name["k1_w0.25"]["weights"] == "random" and by_name["k1_w0.25"]["latency_median_ms"] > 0
    strided = by_name["k2_w0.25_s2"]
    assert strided["stem_stride"] == 2 and strided["weights"] == "trained" and strided["macs"] < by_name["k2_w0.25"]["macs"]
    # As accurate as k2_w0.25 and faster (a smaller fake file), so it alone is on the front.
    assert report["pareto"]["members"] == ["k2_w0.25_s2:fp32"] and report["val_split"] == "train[45000:46000]"
    assert report["best_fast"]["name"] == "k2_w0.25_s2"
    assert os.path.isfile(os.path.join(out, "runs.csv"))

    # Rerun: the finished run is skipped and its accuracy cached; the failed one is retried.
    report = pareto.run_latency_sweep(out, ["2", "1"], ["0.25"], ["fp32"], ["k2_w0.25_s2"],
                                      **dict(kwargs, launcher=launch))
    assert len(calls) == 4 and calls[-1]["keep_blocks"] == 1 and len(evaluated) == 2

    with pytest.raises(InvalidArgumentError):
        pareto.run_latency_sweep(str(tmp_path / "bad"), ["2"], ["0.25"], ["fp32"],
                                 **dict(kwargs, extra_flags="--width_multiplier=0.5"))


def test_trained_sweep_is_reported_from_a_moved_checkout(tmp_path):
    # results.json records absolute .tflite paths; a clone elsewhere must still find the files.
    base = tmp_path / "base.cfg"
    base.write_text("--method=kd_ig\n--epochs=1\n--store_dir=runs/store\n")
    launch, calls = fake_distill()
    kwargs = dict(train=True, flagfile=str(base), num_runs=2, warmup_runs=1, num_calibration=4,
                  teacher=small_teacher(), latency_fn=size_latency, launcher=launch, command="test", log=quiet,
                  accuracy_fn=lambda path, flags: {"accuracy": 61.0, "num_examples": 10})
    pareto.run_latency_sweep(str(tmp_path / "first" / "sweep"), ["1"], ["0.25"], ["fp32"], **kwargs)
    os.rename(tmp_path / "first", tmp_path / "moved")
    report = pareto.run_latency_sweep(str(tmp_path / "moved" / "sweep"), ["1"], ["0.25"], ["fp32"], **kwargs)
    assert len(calls) == 1
    trained = {row["name"]: row for row in report["rows"]}["k1_w0.25"]
    assert trained["weights"] == "trained" and trained["accuracy"] == 61.0
    assert trained["path"].startswith(str(tmp_path / "moved"))


def test_trained_sweep_times_the_qat_and_pruned_exports(tmp_path):
    base = tmp_path / "base.cfg"
    base.write_text("--method=kd_ig\n--epochs=1\n--qat_epochs=1\n--prune_sparsity=0.5\n")
    launch, calls = fake_distill()
    measured = {}

    def accuracy(path, flags):
        measured[os.path.basename(path)] = flags["qat_epochs"]
        return {"accuracy": 70.0 if "qat" in path else 60.0, "num_examples": 10}

    # Named candidates alone (empty grid lists), as for a few converged students.
    report = pareto.run_latency_sweep(str(tmp_path / "sweep"), [""], [], ["fp32", "int8"], ["k1_w0.25"], train=True,
                                      flagfile=str(base), num_runs=2, warmup_runs=1, num_calibration=4,
                                      teacher=small_teacher(), latency_fn=size_latency, accuracy_fn=accuracy,
                                      launcher=launch, command="test", log=quiet)
    assert len(calls) == 1
    student_modes = sorted(row["mode"] for row in report["rows"] if row["role"] == "student")
    assert student_modes == ["fp32", "int8", "pruned_fp32", "pruned_int8", "qat_int8"]
    assert sorted(measured) == [f"student_{mode}.tflite" for mode in student_modes]
    qat = next(row for row in report["rows"] if row["mode"] == "qat_int8")
    assert qat["weights"] == "trained" and qat["accuracy"] == 70.0 and qat["file_size_bytes"] == 12
    assert report["best_fast"]["mode"] == "qat_int8"
    table = (tmp_path / "sweep" / "latency_sweep.md").read_text()
    qat_line = next(line for line in table.splitlines() if "| qat_int8 |" in line)
    assert "| 70.00 | 0.0 |" in qat_line  # val accuracy, then the file size in KiB


def test_script_rejects_bad_flags():
    completed = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "latency_sweep.py"), "--widths=0",
                                "--output_dir=/nonexistent/never"], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1].startswith("error: InvalidArgumentError:")


# --------------------------------------------------------------------------- student specs (issue 45)

TINY_SPECS = ["resnet:width=4,depth=8", "vgg:channels=4-8,repeats=1-1,strides=1-2"]


def test_spec_candidates_are_named_by_their_canonical_text():
    specs = pareto.spec_candidates(["resnet:width=4,depth=8", " ", "shufflenetv2:width=0.5"])
    assert [name for name, _ in specs] == ["resnet:depth=8,width=4", "shufflenetv2:width=0.5"]
    with pytest.raises(InvalidArgumentError, match="listed twice"):
        pareto.spec_candidates(["resnet:depth=8,width=4", "resnet:width=4,depth=8"])
    for bad, error in (("resnet:depth=9", InvalidArgumentError), ("densenet:depth=9", UnknownKeyError)):
        with pytest.raises(error):
            pareto.spec_candidates([bad])
    # File names: a grid name as it was; spec names without punctuation, distinct even when the
    # punctuation alone differs.
    assert pareto.file_stem("k14_w0.75_s2") == "k14_w0.75_s2"
    stems = {pareto.file_stem(name) for name in ("vgg:channels=4-8", "vgg:channels=4,8", "vgg:channels=4_8")}
    assert len(stems) == 3 and all(re.fullmatch(r"[A-Za-z0-9._]+", stem) for stem in stems)


def test_screen_of_two_tiny_specs(tmp_path, fixed_cpu_competition):
    """The int8 screen: specs alone (no grid), timed against the fp32 teacher of the same run."""
    from kdig_tf import benchmark, models

    fixed_cpu_competition(0.0, wall_seconds=2.0)
    out = str(tmp_path / "screen")
    teacher = small_teacher()
    report = pareto.run_latency_sweep(out, [""], [], ["int8"], student_specs=TINY_SPECS, num_runs=2, warmup_runs=1,
                                      num_calibration=4, teacher=teacher, latency_fn=size_latency, command="test",
                                      log=quiet)
    rows = report["rows"]
    assert [(row["name"], row["mode"]) for row in rows][:2] == [("teacher", "fp32"), ("teacher", "int8")]
    students = {row["name"]: row for row in rows if row["role"] == "student"}
    assert sorted(students) == ["resnet:depth=8,width=4", "vgg:channels=4-8,repeats=1-1,strides=1-2"]
    reference = rows[0]["latency_median_ms"]
    for name, row in students.items():
        core = models.parse_student_spec(name).build_core(10, pareto.IMAGE_SHAPE)
        assert row["mode"] == "int8" and row["student"] == name and row["keep_blocks"] is None
        assert row["family"] == name.split(":")[0]
        assert row["params"] == models.count_trainable_params(core) and row["macs"] == benchmark.count_macs(core)
        assert row["speedup_median"] == pytest.approx(reference / row["latency_median_ms"])
        assert row["fast"] == (row["speedup_median"] >= 10.0)
        sidecar = json.loads(open(os.path.splitext(row["path"])[0] + ".json").read())
        assert sidecar["conversion"]["mode"] == "int8" and sidecar["conversion"]["num_representative"] == 4
        assert os.path.dirname(row["path"]) == os.path.join(out, "tflite")
    assert report["settings"]["student_specs"] == sorted(students)
    assert report["settings"]["keep_blocks"] == [] and report["settings"]["modes"] == ["int8"]
    table = open(os.path.join(out, "latency_sweep.md")).read()
    assert any(line.startswith("| candidate |") and line.endswith("| >= 10x |") for line in table.splitlines())
    for name, row in students.items():
        line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {row['params']:,} |" in line and f"| {row['speedup_median']:.2f}x |" in line
        assert line.endswith("| yes |") == row["fast"]

    # The same two for real: LiteRT, in-process, a couple of runs each.
    report = pareto.run_latency_sweep(out, [""], [], ["int8"], student_specs=TINY_SPECS, num_runs=3, warmup_runs=1,
                                      num_calibration=4, isolate=False, teacher=teacher, command="test", log=quiet)
    assert all(row["latency_median_ms"] > 0 for row in report["rows"])
    assert all(row["speedup_median"] > 0 for row in report["rows"] if row["role"] == "student")


def test_train_path_distils_spec_candidates_with_the_student_flag(tmp_path):
    base = tmp_path / "base.cfg"
    base.write_text("--method=kd_ig\n--epochs=1\n--val_split=train[45000:46000]\n")
    launch, calls = fake_distill()
    report = pareto.run_latency_sweep(str(tmp_path / "sweep"), [""], [], ["fp32"], student_specs=TINY_SPECS[:1],
                                      train=True, flagfile=str(base), num_runs=2, warmup_runs=1, num_calibration=4,
                                      teacher=small_teacher(), latency_fn=size_latency, launcher=launch,
                                      accuracy_fn=lambda path, flags: {"accuracy": 55.0, "num_examples": 10},
                                      command="test", log=quiet)
    assert [call["student"] for call in calls] == ["resnet:depth=8,width=4"]
    assert os.path.basename(os.path.dirname(os.path.dirname(calls[0]["workdir"]))) == \
        pareto.file_stem("resnet:depth=8,width=4")
    row = next(row for row in report["rows"] if row["role"] == "student")
    assert row["weights"] == "trained" and row["accuracy"] == 55.0 and row["family"] == "resnet"
    assert report["best_fast"] is None or report["best_fast"]["student"] == "resnet:depth=8,width=4"
    with pytest.raises(InvalidArgumentError, match="may not set"):
        pareto.run_latency_sweep(str(tmp_path / "bad"), [""], [], ["fp32"], student_specs=TINY_SPECS[:1], train=True,
                                 flagfile=str(base), extra_flags="--student=vgg", teacher=small_teacher(),
                                 latency_fn=size_latency, launcher=launch, command="test", log=quiet)


def test_screen_flagfile_covers_the_families_and_parses():
    lines = open(os.path.join(REPO, "flags", "screen_students.cfg")).read().splitlines()
    specs = [line.split("=", 1)[1] for line in lines if line.startswith("--student_spec=")]
    names = [name for name, _ in pareto.spec_candidates(specs)]  # parses, no duplicates
    assert {name.split(":")[0] for name in names} == {"mnv2", "resnet", "shufflenetv2", "vgg"}
    for wanted in ("mnv2:strides=1-2-2-2-1-2-1,width=0.5", "mnv2:strides=1-2-2-2-1-2-1,width=0.35",
                   "shufflenetv2:width=0.5", "shufflenetv2:width=0.25",
                   *(f"resnet:depth={depth},width={width}" for depth in (20, 14, 8) for width in (16, 8))):
        assert wanted in names
    assert "--modes=int8" in lines and "--num_threads=1" in lines and "--keep_blocks=" in lines


@pytest.mark.slow
def test_script_screens_two_specs_against_the_real_teacher(tmp_path):
    out = tmp_path / "screen"
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "latency_sweep.py"), "--keep_blocks=", "--widths=",
         "--modes=int8", *(f"--student_spec={spec}" for spec in TINY_SPECS), "--num_runs=3", "--warmup_runs=1",
         "--num_calibration=2", f"--output_dir={out}"], capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((out / "latency_sweep.json").read_text())
    assert report["reference"]["keras_name"] == "mobilenetv2_teacher" and report["reference"]["mode"] == "fp32"
    assert report["settings"]["num_threads"] == 1 and report["settings"]["isolate"] is True
    students = [row for row in report["rows"] if row["role"] == "student"]
    assert sorted(row["name"] for row in students) == sorted(name for name, _ in pareto.spec_candidates(TINY_SPECS))
    assert all(row["speedup_median"] > 1 for row in students)  # tiny nets beat the MobileNetV2
    assert "timing_competition" in report["machine"]
