import kdig_tf  # noqa: F401

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from scipy import stats as scipy_stats

from kdig_tf import benchmark, campaigns, cli, experiments
from kdig_tf.errors import (InvalidArgumentError, StaleRunError, TestSplitSelectionError,
                            UnknownKeyError, VerificationError)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeDistill:
    """Stands in for the pipeline: writes results.json with accuracy ``score(flags)``, half an
    hour of training per seed + 1, and a two-epoch history.csv ending there; counts calls.

    ``flags`` is the run's parsed DistillConfig as a dict, plus its workdir.
    """

    def __init__(self, score, fail=()):
        self.score, self.fail, self.calls = score, set(fail), []

    def __call__(self, config, workdir):
        flags = dict(dataclasses.asdict(config), workdir=workdir)
        self.calls.append(flags)
        print("fake distill", flags["method"], flags["seed"])
        key = os.path.relpath(workdir, os.path.dirname(os.path.dirname(workdir)))
        if key in self.fail:
            raise RuntimeError(f"fake failure of {key}")
        keep = flags["keep_blocks"]
        results = {"val_accuracy": self.score(flags), "val_split": flags["val_split"],
                   "method": flags["method"], "seed": flags["seed"], "trainable_params": 1000 * keep,
                   "compression": 2_236_682 / (1000 * keep), "train_seconds": 1800.0 * (1 + flags["seed"]),
                   "flags": flags,
                   "student_path": os.path.join(workdir, "student.h5")}
        open(results["student_path"], "wb").close()
        with open(os.path.join(workdir, "history.csv"), "w") as handle:
            handle.write(f"epoch,val_accuracy\n0,{results['val_accuracy'] / 200}\n1,{results['val_accuracy'] / 100}\n")
        with open(os.path.join(workdir, "results.json"), "w") as handle:
            json.dump(results, handle)
        return results


def quiet(_message):
    pass


def make_flagfile(tmp_path, text="--epochs=3\n--alpha=0.3\n"):
    path = tmp_path / "base.cfg"
    path.write_text("# base\n" + text)
    return str(path)


def test_runner_skips_finished_runs_and_retries_failed_ones(tmp_path):
    runs = experiments.seed_runs(str(tmp_path / "runs"), ["student", "kd"], [0, 1])
    assert [run.name for run in runs] == ["student/seed0", "kd/seed0", "student/seed1", "kd/seed1"]
    fake = FakeDistill(lambda flags: 90.0, fail={"kd/seed1"})
    rows = experiments.run_campaign(runs, launcher=fake, log=quiet)
    assert len(fake.calls) == 4
    assert [row["status"] for row in rows] == ["ok", "ok", "ok", "failed"]
    assert rows[3]["error"] == "RuntimeError: fake failure of kd/seed1" and rows[3]["val_accuracy"] is None
    assert rows[0]["error"] is None
    # What a run prints goes to its log, and so does the traceback of a failure.
    assert "fake distill student 0" in open(os.path.join(runs[0].workdir, "log.txt")).read()
    failed_log = open(os.path.join(runs[3].workdir, "log.txt")).read()
    assert "Traceback" in failed_log and "RuntimeError: fake failure of kd/seed1" in failed_log

    messages = []
    fake.fail.clear()
    rows = experiments.run_campaign(runs, launcher=fake, log=messages.append)
    assert [call["workdir"] for call in fake.calls[4:]] == [os.path.abspath(runs[3].workdir)]
    assert [row["status"] for row in rows] == ["skipped", "skipped", "skipped", "ok"]
    assert sum("] skip " in message for message in messages) == 3

    rows = experiments.run_campaign(runs, launcher=fake, log=quiet)
    assert len(fake.calls) == 5  # nothing left to launch
    assert all(row["status"] == "skipped" and row["val_accuracy"] == 90.0 for row in rows)


def test_finished_run_whose_outputs_are_gone_is_launched_again(tmp_path):
    # git keeps results.json and student.h5 but not .tflite exports: a fresh clone must remake them.
    runs = experiments.seed_runs(str(tmp_path / "runs"), ["kd"], [0, 1])
    fake = FakeDistill(lambda flags: 90.0)
    experiments.run_campaign(runs, launcher=fake, log=quiet)
    results_path = os.path.join(runs[0].workdir, "results.json")
    results = json.loads(open(results_path).read())
    results["tflite"] = {"int8": {"path": "/elsewhere/checkout/student_int8.tflite"}}
    open(results_path, "w").write(json.dumps(results))
    assert experiments.missing_outputs(runs[0].workdir, results) == ["student_int8.tflite"]

    messages = []
    rows = experiments.run_campaign(runs, launcher=fake, log=messages.append, dry_run=True)
    assert len(fake.calls) == 2 and [row["status"] for row in rows] == ["pending", "skipped"]
    assert any("student_int8.tflite missing" in message for message in messages)
    rows = experiments.run_campaign(runs, launcher=fake, log=quiet)
    assert [call["workdir"] for call in fake.calls[2:]] == [os.path.abspath(runs[0].workdir)]
    assert [row["status"] for row in rows] == ["ok", "skipped"]

    # Found by name in the run's own workdir when results.json comes from another checkout.
    open(os.path.join(runs[1].workdir, "student_int8.tflite"), "wb").close()
    moved = dict(results, student_path="/elsewhere/student.h5")
    assert experiments.missing_outputs(runs[1].workdir, moved) == []
    os.remove(os.path.join(runs[1].workdir, "student.h5"))
    assert experiments.missing_outputs(runs[1].workdir, moved) == ["student.h5"]


def test_run_arguments_config_and_command(tmp_path, monkeypatch):
    flagfile = make_flagfile(tmp_path)
    runs = experiments.seed_runs(str(tmp_path / "out"), ["kd_ig_shuffled"], [3], subset_fraction=0.8,
                                 common={"epochs": 2})
    args = experiments.run_args(flagfile, runs[0].overrides, runs[0].workdir)
    assert args == [f"--flagfile={flagfile}", f"--workdir={os.path.abspath(runs[0].workdir)}", "--epochs=2",
                    "--method=kd_ig", "--cached_targets_order=shuffled", "--seed=3", "--subset_fraction=0.8",
                    "--subset_seed=3"]
    assert runs[0].workdir == os.path.join(str(tmp_path), "out", "kd_ig_shuffled", "seed3")
    # absl parses the flagfile (comments, --alpha) and the overrides win over it.
    config, workdir = experiments.parse_run(flagfile, runs[0].overrides, runs[0].workdir)
    assert (config.epochs, config.alpha, config.method, config.cached_targets_order, config.seed,
            config.subset_fraction, config.subset_seed) == (2, 0.3, "kd_ig", "shuffled", 3, 0.8, 3)
    assert workdir == os.path.abspath(runs[0].workdir)
    # The table's command repeats the run by hand: paths inside the working directory are relative.
    monkeypatch.chdir(tmp_path)
    assert experiments.display_command(args + ["--teacher=/elsewhere/t.h5"]) == (
        "python scripts/distill.py --flagfile=base.cfg --workdir=out/kd_ig_shuffled/seed3 --epochs=2 "
        "--method=kd_ig --cached_targets_order=shuffled --seed=3 --subset_fraction=0.8 --subset_seed=3 "
        "--teacher=/elsewhere/t.h5")
    with pytest.raises(InvalidArgumentError, match="no such flagfile"):
        experiments.parse_run(str(tmp_path / "missing.cfg"), {})
    with pytest.raises(InvalidArgumentError, match="epochz"):
        experiments.parse_run(flagfile, {"epochz": 1})


def test_bad_flags_stop_the_campaign_before_any_run(tmp_path):
    fake = FakeDistill(lambda flags: 90.0)
    runs = experiments.seed_runs(str(tmp_path / "runs"), ["student", "kd"], [0], common={"epochz": 2})
    with pytest.raises(InvalidArgumentError, match="epochz"):
        experiments.run_campaign(runs, launcher=fake, log=quiet)
    runs = experiments.seed_runs(str(tmp_path / "runs"), ["student", "kd"], [0], common={"alpha": 1.5})
    with pytest.raises(InvalidArgumentError, match="alpha"):
        experiments.run_campaign(runs, launcher=fake, log=quiet)
    assert fake.calls == [] and not os.path.exists(tmp_path / "runs")


class Interrupted(KeyboardInterrupt):
    pass


def test_keyboard_interrupt_stops_the_campaign(tmp_path):
    runs = experiments.seed_runs(str(tmp_path / "runs"), ["student", "kd"], [0])

    def interrupted(config, workdir):
        raise Interrupted

    with pytest.raises(Interrupted):
        experiments.run_campaign(runs, launcher=interrupted, log=quiet, rows_dir=str(tmp_path))
    assert not os.path.exists(runs[1].workdir)  # the second run was never started


def old_runner_run(tmp_path, flagfile, overrides):
    """A run directory exactly as the subprocess runner left a finished run (e.g. results/cifar10_long)."""
    workdir = tmp_path / "out" / "runs" / "student" / "seed0"
    workdir.mkdir(parents=True)
    (workdir / "command.json").write_text(json.dumps({
        "flagfile": os.path.abspath(flagfile), "flagfile_sha256": experiments.sha256_file(flagfile),
        "overrides": overrides}, indent=2))
    (workdir / "student.h5").write_bytes(b"")
    (workdir / "results.json").write_text(json.dumps({
        "method": "student", "seed": 0, "val_accuracy": 88.5, "val_split": "train[45000:]",
        "trainable_params": 543498, "compression": 4.12, "train_seconds": 3600.0,
        "student_path": str(workdir / "student.h5"), "tflite": {}}))
    return workdir


def test_run_finished_by_the_subprocess_runner_is_skipped_and_checked(tmp_path):
    flagfile = make_flagfile(tmp_path, "--epochs=30\n--store_dir=runs/store\n--export_modes=\n")
    old_runner_run(tmp_path, flagfile, ["--data_dir=../shared/tensorflow_datasets", "--method=student",
                                        "--seed=0"])
    out = str(tmp_path / "out")
    fake = FakeDistill(by_arm)
    data_dir = "--data_dir=../shared/tensorflow_datasets"
    summary = campaigns.run_ablation(out, flagfile, ["student", "kd"], [0, 1], extra_flags=data_dir,
                                     launcher=fake, log=quiet)
    assert [(call["method"], call["seed"]) for call in fake.calls] == [("kd", 0), ("student", 1), ("kd", 1)]
    assert summary["arms"]["student"]["values"] == [88.5, ACCURACIES["student"][1]]
    with open(os.path.join(out, "runs.json")) as handle:
        assert [row["status"] for row in json.load(handle)] == ["skipped", "ok", "ok", "ok"]

    # Another override, or another base flagfile, and the old run is stale.
    with pytest.raises(StaleRunError, match="data_dir"):
        campaigns.run_ablation(out, flagfile, ["student", "kd"], [0, 1], extra_flags="--data_dir=elsewhere",
                               launcher=fake, log=quiet)
    with open(flagfile, "a") as handle:
        handle.write("--batch_size=7\n")
    with pytest.raises(StaleRunError, match="base flagfile"):
        campaigns.run_ablation(out, flagfile, ["student", "kd"], [0, 1], extra_flags=data_dir, launcher=fake,
                               log=quiet)
    assert len(fake.calls) == 3


def test_finished_run_with_other_flags_is_stale(tmp_path):
    flagfile = make_flagfile(tmp_path)
    fake = FakeDistill(lambda flags: 90.0)
    runs = experiments.seed_runs(str(tmp_path / "runs"), ["kd"], [0], common={"epochs": 2})
    experiments.run_campaign(runs, flagfile, launcher=fake, log=quiet)
    changed = experiments.seed_runs(str(tmp_path / "runs"), ["kd"], [0], common={"epochs": 3})
    with pytest.raises(StaleRunError, match="epochs"):
        experiments.run_campaign(changed, flagfile, launcher=fake, log=quiet)
    with open(flagfile, "a") as handle:
        handle.write("--batch_size=7\n")
    with pytest.raises(StaleRunError, match="base flagfile"):
        experiments.run_campaign(runs, flagfile, launcher=fake, log=quiet)
    assert len(fake.calls) == 1


def test_an_edited_flagfile_stales_a_finished_run_only_if_its_training_settings_change(tmp_path):
    from kdig_tf import pipeline

    flagfile = make_flagfile(tmp_path)
    fake = FakeDistill(lambda flags: 90.0)

    def recording(config, workdir):
        pipeline.claim_workdir(workdir, pipeline.training_settings(config))
        return fake(config, workdir)

    runs = experiments.seed_runs(str(tmp_path / "runs"), ["student"], [0])
    experiments.run_campaign(runs, flagfile, launcher=recording, log=quiet)
    with open(flagfile, "a") as handle:
        handle.write("# a comment, and a check-only flag\n--verbose=1\n")
    rows = experiments.run_campaign(runs, flagfile, launcher=recording, log=quiet)
    assert [row["status"] for row in rows] == ["skipped"] and len(fake.calls) == 1
    with open(flagfile, "a") as handle:
        handle.write("--batch_size=7\n")
    with pytest.raises(StaleRunError, match="base flagfile .* batch_size"):
        experiments.run_campaign(runs, flagfile, launcher=recording, log=quiet)


@pytest.mark.parametrize("split", ["test", "test[:50%]", " TEST ", "train[:10]+test", "test[10%:]"])
def test_split_guard_refuses_test(split):
    with pytest.raises(TestSplitSelectionError):
        experiments.check_selection_split(split)
    assert experiments.check_selection_split(split, final_report=True) == split


@pytest.mark.parametrize("split", ["train[45000:]", "validation", "train", "", "contest"])
def test_split_guard_accepts_other_splits(split):
    assert experiments.check_selection_split(split) == split


def test_hparam_search_refuses_test_splits(tmp_path):
    fake = FakeDistill(lambda flags: 90.0)
    space = {"alpha": campaigns.parse_search_values("alpha", "0.1,0.5")}
    with pytest.raises(TestSplitSelectionError):
        campaigns.run_hparam_search(str(tmp_path / "a"), None, space, val_split="test[:50%]",
                                    launcher=fake, log=quiet)
    # A test split hidden in the base flagfile is refused too.
    flagfile = make_flagfile(tmp_path, "--eval_split=test\n")
    with pytest.raises(TestSplitSelectionError):
        campaigns.run_hparam_search(str(tmp_path / "b"), flagfile, space, launcher=fake, log=quiet)
    assert fake.calls == []


def test_hparam_script_refuses_test_split(tmp_path):
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "hparam_search.py"), "--val_split=test",
         f"--output_dir={tmp_path}", "--flagfile_base="],
        capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "error: TestSplitSelectionError" in completed.stderr
    assert os.listdir(tmp_path) == []


def test_grid_search_ranks_on_validation_and_writes_best_flagfile(tmp_path):
    flagfile = make_flagfile(tmp_path, "--epochs=3\n--alpha=0.3\n--temperature=1\n")
    space = {"alpha": campaigns.parse_search_values("alpha", "0.1,0.5"),
             "temperature": campaigns.parse_search_values("temperature", "2,4")}
    # Best at alpha 0.5, T 2.
    fake = FakeDistill(lambda f: 90.0 + 10 * float(f["alpha"]) - float(f["temperature"]))
    out = str(tmp_path / "search")
    report = campaigns.run_hparam_search(out, flagfile, space, method="kd", launcher=fake, log=quiet)
    assert len(fake.calls) == 4
    assert all(call["val_split"] == "train[45000:]" and call["method"] == "kd" for call in fake.calls)
    assert [t["params"] for t in report["trials"]][:2] == [{"alpha": 0.5, "temperature": 2.0},
                                                           {"alpha": 0.5, "temperature": 4.0}]
    assert report["best"]["mean"] == pytest.approx(93.0)
    best, _ = cli.distill_config([f"--flagfile={os.path.join(out, 'best.cfg')}"])
    assert best.epochs == 3 and best.method == "kd" and best.val_split == "train[45000:]"
    assert best.alpha == 0.5 and best.temperature == 2.0
    assert best.store_dir == os.path.abspath(os.path.join(out, "store"))
    text = open(os.path.join(out, "best.cfg")).read()
    assert "--workdir" not in text and "--seed" not in text
    assert os.path.isfile(os.path.join(out, "trials.md")) and os.path.isfile(os.path.join(out, "runs.csv"))


def test_search_spaces():
    space = {"alpha": campaigns.parse_search_values("alpha", "0.01:0.9"),
             "temperature": campaigns.parse_search_values("temperature", "1:20:log"),
             "p": campaigns.parse_search_values("p", "0.2,0.8")}
    trials = campaigns.random_trials(space, 25, seed=3)
    assert trials == campaigns.random_trials(space, 25, seed=3)
    assert all(0.01 <= t["alpha"] <= 0.9 and 1 <= t["temperature"] <= 20 and t["p"] in (0.2, 0.8)
               for t in trials)
    with pytest.raises(InvalidArgumentError):
        campaigns.grid_trials(space)
    assert len(campaigns.grid_trials({"alpha": ("choice", [0.1, 0.2]), "p": ("choice", [0.5, 0.6, 0.7])})) == 6
    for flag, text in [("alpha", "1.5"), ("temperature", "0"), ("alpha", "0.5:0.1"), ("p", "a,b"), ("p", "0:1:log")]:
        with pytest.raises(InvalidArgumentError):
            campaigns.parse_search_values(flag, text)


def test_arms_and_extra_flags():
    assert experiments.parse_arm("kd_ig_shuffled") == {"method": "kd_ig", "cached_targets_order": "shuffled"}
    with pytest.raises(UnknownKeyError):
        experiments.parse_arm("kd_igg")
    for arm in ("student_shuffled", "at_shuffled"):
        with pytest.raises(InvalidArgumentError):
            experiments.parse_arm(arm)
    assert experiments.parse_extra_flags("--epochs=5 --export_modes='' --nofoo") == {
        "epochs": "5", "export_modes": "", "nofoo": None}
    with pytest.raises(InvalidArgumentError):
        experiments.parse_extra_flags("--seed=3")
    assert experiments.resolve_seeds([], 3) == [0, 1, 2]
    assert experiments.resolve_seeds(["4", "2"], 3) == [4, 2]


ACCURACIES = {"student": [90.0, 91.0, 92.0], "kd": [92.0, 93.0, 94.5], "kd_ig": [93.0, 94.0, 93.5],
              "kd_ig_shuffled": [91.0, 92.5, 92.0]}


def by_arm(flags):
    arm = flags["method"] + ("_shuffled" if flags.get("cached_targets_order") == "shuffled" else "")
    return ACCURACIES[arm][int(flags["seed"])]


def test_ablation_summary_and_plot(tmp_path):
    out = str(tmp_path / "ablation")
    fake = FakeDistill(by_arm)
    summary = campaigns.run_ablation(out, make_flagfile(tmp_path), list(ACCURACIES), [0, 1, 2],
                                     subset_fraction=0.8, extra_flags="--epochs=1", launcher=fake, log=quiet,
                                     contrasts=["kd_ig:kd"])
    assert len(fake.calls) == 12
    assert {call["subset_seed"] for call in fake.calls} == {0, 1, 2}
    assert {call["store_dir"] for call in fake.calls} == {os.path.abspath(os.path.join(out, "store"))}
    with open(os.path.join(out, "summary.json")) as handle:
        assert json.load(handle) == summary
    student, kd = summary["arms"]["student"], summary["arms"]["kd"]
    assert (student["n"], student["mean"], student["sd"], student["min"], student["max"]) == (3, 91.0, 1.0, 90.0, 92.0)
    assert "vs_reference" not in student
    reference = scipy_stats.ttest_ind(ACCURACIES["kd"], ACCURACIES["student"], equal_var=False)
    assert kd["vs_reference"]["t"] == pytest.approx(reference.statistic)
    assert kd["vs_reference"]["p"] == pytest.approx(reference.pvalue)
    assert kd["vs_reference"]["mean_diff"] == pytest.approx(93.1666667 - 91.0)
    assert kd["vs_reference"]["p_holm"] >= kd["vs_reference"]["p"]
    paired = scipy_stats.ttest_rel(ACCURACIES["kd"], ACCURACIES["student"])
    assert kd["vs_reference_paired"]["p"] == pytest.approx(paired.pvalue)
    assert kd["vs_reference_paired"]["seeds"] == [0, 1, 2]
    assert kd["vs_reference_paired"]["p_holm"] >= kd["vs_reference_paired"]["p"]
    (contrast,) = summary["contrasts"]
    assert (contrast["arm"], contrast["other"], contrast["n"]) == ("kd_ig", "kd", [3, 3])
    assert contrast["paired"]["p"] == pytest.approx(scipy_stats.ttest_rel(ACCURACIES["kd_ig"], ACCURACIES["kd"]).pvalue)
    assert contrast["welch"]["p"] == pytest.approx(
        scipy_stats.ttest_ind(ACCURACIES["kd_ig"], ACCURACIES["kd"], equal_var=False).pvalue)
    shuffled = summary["arms"]["kd_ig_shuffled"]
    assert shuffled["vs_aligned"]["arm"] == "kd_ig" and shuffled["vs_aligned"]["mean_diff"] < 0
    assert shuffled["vs_aligned_paired"]["t"] == pytest.approx(
        scipy_stats.ttest_rel(ACCURACIES["kd_ig_shuffled"], ACCURACIES["kd_ig"]).statistic)
    assert all("--cached_targets_order=shuffled" in command for command in shuffled["commands"])
    assert len(shuffled["commands"]) == 3
    for name in ("runs.csv", "runs.json", "summary.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    for name in ("ablation.png", "curves.png"):
        with open(os.path.join(out, name), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "runs.csv")) as handle:
        assert len(handle.read().strip().splitlines()) == 13
    markdown = open(os.path.join(out, "summary.md")).read()
    assert "| kd | 3 | 93.17 ± 1.26 |" in markdown and "Misalignment control" in markdown
    assert "| kd_ig - kd | 3 / 3 | +0.33 [" in markdown
    # Paired kd - student: p = 0.0059, Holm over the 3 arms tested against student: 0.0176.
    assert "- `kd` - `student`: +2.17 points (mean of the per-seed differences over 3 seeds" in markdown
    assert "paired p = 0.0059, Holm-adjusted p = 0.0176: **significant**" in markdown
    assert markdown.index("## Findings") < markdown.index("## Wall time")
    assert kd["train_hours"] == [0.5, 1.0, 1.5]
    assert "| kd | 3 | 1.00 | 0.50 | 1.50 | 3.00 |" in markdown and "| all | 12 |  |  |  | 12.00 |" in markdown

    # Rerunning launches nothing and reproduces the summary.
    again = campaigns.run_ablation(out, make_flagfile(tmp_path), list(ACCURACIES), [0, 1, 2],
                                   subset_fraction=0.8, extra_flags="--epochs=1", launcher=fake, log=quiet)
    assert len(fake.calls) == 12 and again["arms"] == summary["arms"]


class Killed(KeyboardInterrupt):
    """Stands in for the session ending (Ctrl-C) in the middle of a campaign."""


def test_killed_ablation_leaves_an_up_to_date_table_and_summary(tmp_path):
    out = str(tmp_path / "ablation")
    fake = FakeDistill(by_arm)

    def killed_on_third_run(config, workdir):
        if len(fake.calls) == 2:
            raise Killed
        return fake(config, workdir)

    with pytest.raises(Killed):
        campaigns.run_ablation(out, make_flagfile(tmp_path), ["student", "kd"], [0, 1],
                               launcher=killed_on_third_run, log=quiet)
    with open(os.path.join(out, "runs.json")) as handle:
        assert [row["status"] for row in json.load(handle)] == ["ok", "ok", "pending", "pending"]
    with open(os.path.join(out, "summary.json")) as handle:
        partial = json.load(handle)
    assert partial["arms"]["student"]["values"] == [ACCURACIES["student"][0]]
    assert partial["arms"]["kd"]["unfinished"] == ["kd/seed1"]
    partial_markdown = open(os.path.join(out, "summary.md")).read()
    assert "Unfinished runs (rerun the same command to retry): student/seed1, kd/seed1" in partial_markdown
    assert "2 seeds planned per arm (0, 1)" in partial_markdown and "| kd | 1 | 92.00 ± n/a |" in partial_markdown
    assert "| kd | 1 | 0.50 | 0.50 | 0.50 | 0.50 |" in partial_markdown

    summary = campaigns.run_ablation(out, make_flagfile(tmp_path), ["student", "kd"], [0, 1],
                                     launcher=fake, log=quiet)
    assert len(fake.calls) == 4 and summary["arms"]["kd"]["n"] == 2
    with open(os.path.join(out, "runs.json")) as handle:
        assert [row["status"] for row in json.load(handle)] == ["skipped", "skipped", "ok", "ok"]


def test_one_arm_alone_then_report_only_restores_every_arm_in_the_tables(tmp_path):
    out = str(tmp_path / "ablation")
    fake = FakeDistill(by_arm)
    campaigns.run_ablation(out, make_flagfile(tmp_path), ["student", "kd"], [0], launcher=fake, log=quiet)
    alone = campaigns.run_ablation(out, make_flagfile(tmp_path), ["student"], [0, 1], launcher=fake, log=quiet)
    assert len(fake.calls) == 3 and set(alone["arms"]) == {"student"}  # the tables lost kd

    messages = []
    summary = campaigns.run_ablation(out, make_flagfile(tmp_path), ["student", "kd"], [0, 1], launcher=fake,
                                     report_only=True, log=messages.append)
    assert len(fake.calls) == 3  # launched nothing
    assert summary["arms"]["student"]["n"] == 2 and summary["arms"]["kd"]["n"] == 1
    assert summary["arms"]["kd"]["unfinished"] == ["kd/seed1"]
    assert any("would run" in message and "kd/seed1" in message for message in messages)
    with open(os.path.join(out, "summary.json")) as handle:
        assert json.load(handle) == summary
    with open(os.path.join(out, "runs.json")) as handle:
        assert [row["status"] for row in json.load(handle)] == ["skipped", "skipped", "skipped", "pending"]


@pytest.mark.parametrize("contrast", ["kd_ig:kd", "kd:kd", "kd", "kd:student:kd_ig"])
def test_bad_contrast_stops_the_ablation_before_any_run(tmp_path, contrast):
    fake = FakeDistill(by_arm)
    with pytest.raises(InvalidArgumentError, match="contrast"):
        campaigns.run_ablation(str(tmp_path / "a"), None, ["student", "kd"], [0], launcher=fake, log=quiet,
                               contrasts=[contrast])
    assert fake.calls == []


def test_ablation_refuses_test_split_unless_final_report(tmp_path):
    fake = FakeDistill(by_arm)
    with pytest.raises(TestSplitSelectionError):
        campaigns.run_ablation(str(tmp_path / "a"), None, ["student", "kd"], [0],
                               extra_flags="--eval_split=test", launcher=fake, log=quiet)
    assert fake.calls == []
    summary = campaigns.run_ablation(str(tmp_path / "b"), None, ["student", "kd"], [0, 1],
                                     extra_flags="--eval_split=test", final_report=True, launcher=fake, log=quiet)
    assert summary["final_report"] and summary["splits"]["eval_split"] == "test"


def test_compression_sweep_with_fake_latency(tmp_path):
    out = str(tmp_path / "sweep")
    fake = FakeDistill(lambda f: 80.0 + f["keep_blocks"] + (1.0 if f["method"] == "kd" else 0.0) + f["seed"] * 0.5)
    measured = []

    def latency_fn(results, workdir, tflite_dir, keep, warmup_runs, num_runs):
        measured.append(keep)
        return {"inference_median_ms": 0.1 * keep, "inference_avg_ms": 0.11 * keep}

    report = campaigns.run_compression_sweep(out, None, ["14", "4"], ["student", "kd"], [0, 1],
                                             latency_fn=latency_fn, launcher=fake, log=quiet)
    assert len(fake.calls) == 8 and sorted(measured) == [4, 14]
    assert {call["keep_blocks"] for call in fake.calls} == {14, 4}
    point = next(p for p in report["points"] if p["keep_blocks"] == 4 and p["arm"] == "kd")
    assert point["mean"] == pytest.approx(85.25) and point["latency_ms"] == pytest.approx(0.4)
    assert point["trainable_params"] == 4000 and point["vs_reference"]["mean_diff"] == pytest.approx(1.0)
    assert os.path.isfile(os.path.join(out, "sweep.png")) and os.path.isfile(os.path.join(out, "sweep.md"))
    campaigns.run_compression_sweep(out, None, ["14", "4"], ["student", "kd"], [0, 1],
                                    latency_fn=latency_fn, launcher=fake, log=quiet)
    assert len(fake.calls) == 8 and len(measured) == 2  # runs and latencies are cached


def test_ablation_script_dry_run_prints_relative_distill_commands(tmp_path):
    (tmp_path / "base.cfg").write_text("--epochs=1\n")
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "ablation.py"), "--flagfile_base=base.cfg",
         "--methods=student,kd", "--seeds=0", "--output_dir=out", "--extra_flags=--batch_size=8", "--dry_run"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert ("would run: python scripts/distill.py --flagfile=base.cfg --workdir=out/runs/kd/seed0 "
            "--store_dir=out/store --batch_size=8 --method=kd --seed=0") in completed.stdout
    assert not os.path.exists(tmp_path / "out" / "runs")
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "ablation.py"), "--flagfile_base=base.cfg",
         "--methods=student,kd", "--seeds=0", "--output_dir=out", "--status"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "kd/seed0       not started    0/1" in completed.stdout
    assert "0/2 runs finished, 2 epochs left" in completed.stdout and "no epoch timed yet" in completed.stdout
    assert not os.path.exists(tmp_path / "out" / "runs")


def write_history(workdir, epoch_seconds):
    os.makedirs(workdir, exist_ok=True)
    rows = [f"{epoch},{seconds},0.5" for epoch, seconds in enumerate(epoch_seconds)]
    with open(os.path.join(workdir, "history.csv"), "w") as handle:
        handle.write("\n".join(["epoch,epoch_seconds,val_accuracy"] + rows) + "\n")


def write_backup(workdir, last_saved_epoch):
    """A checkpoint in BackupAndRestore's layout, saved after epoch ``last_saved_epoch`` (0-based)."""
    import tensorflow as tf

    epoch = tf.Variable(last_saved_epoch, dtype=tf.int64)
    tf.train.Checkpoint(ckpt_saved_epoch=epoch).save(os.path.join(workdir, "backup", "chief", "ckpt"))


def test_ablation_status_counts_epochs_and_estimates_the_time_left(tmp_path):
    flagfile = make_flagfile(tmp_path)  # 3 epochs per run
    output_dir = str(tmp_path / "out")
    runs_dir = os.path.join(output_dir, "runs")
    campaigns.run_ablation(output_dir, flagfile, ["student"], [0], launcher=FakeDistill(lambda flags: 90.0),
                           log=quiet)
    write_history(os.path.join(runs_dir, "student", "seed0"), [10, 12, 14])
    # Killed after logging its third epoch but before backing it up: it resumes at epoch 2,
    # and the third epoch's time counts for nothing.
    write_history(os.path.join(runs_dir, "kd", "seed0"), [20, 22, 99])
    write_backup(os.path.join(runs_dir, "kd", "seed0"), 1)
    # An epoch log without a checkpoint is discarded on launch.
    write_history(os.path.join(runs_dir, "kd_ig", "seed0"), [500])

    statuses, estimate = campaigns.ablation_status(output_dir, flagfile, ["student", "kd", "kd_ig"], [0])
    assert [(status["run"], status["state"], status["epochs_done"], status["epochs"]) for status in statuses] == [
        ("student/seed0", "finished", 3, 3), ("kd/seed0", "in progress", 2, 3), ("kd_ig/seed0", "not started", 0, 3)]
    assert statuses[1]["epoch_seconds"] == [20, 22] and statuses[2]["epoch_seconds"] == []
    assert estimate["runs_finished"] == 1 and estimate["runs"] == 3 and estimate["epochs_left"] == 4
    # kd_ig is not timed yet: it borrows the median over every arm's counted epochs (10, 12, 14, 20, 22).
    assert estimate["seconds_per_epoch"] == {"student": 12, "kd": 21, "kd_ig": 14}
    assert estimate["assumed_arms"] == ["kd_ig"]
    assert estimate["seconds_left"] == pytest.approx(21 * 1 + 14 * 3)
    text = experiments.status_text(statuses, estimate)
    assert "1/3 runs finished, 4 epochs left" in text and "kd_ig 14 s (not timed yet" in text

    os.remove(os.path.join(runs_dir, "student", "seed0", "student.h5"))
    statuses, estimate = campaigns.ablation_status(output_dir, flagfile, ["student"], [0])
    assert statuses[0]["state"] == "not started" and estimate["seconds_left"] is None
    assert "no epoch timed yet" in experiments.status_text(statuses, estimate)


def test_find_fp32_tflite(tmp_path):
    exported = tmp_path / "student_fp32.tflite"
    exported.write_bytes(b"x")
    (tmp_path / "student_int8.tflite").write_bytes(b"x")
    results = {"tflite": {"fp32": {"path": str(exported)}, "int8": {"path": str(tmp_path / "student_int8.tflite")}}}
    assert campaigns.find_fp32_tflite(results, str(tmp_path)) == str(exported)
    assert campaigns.find_fp32_tflite({}, str(tmp_path)) == str(exported)  # found by name
    exported.unlink()
    assert campaigns.find_fp32_tflite(results, str(tmp_path)) is None


# --------------------------------------------------------------------------- verification of saved students

class FakeEvaluate:
    """Stands in for scripts/evaluate.py: ``accuracy(run)`` per run key, ``params`` per run key."""

    def __init__(self, accuracy, params=None):
        self.accuracy, self.params, self.calls = accuracy, params or {}, []

    def __call__(self, weights, dataset, split, data_dir):
        run = os.path.relpath(os.path.dirname(weights), os.path.dirname(os.path.dirname(os.path.dirname(weights))))
        self.calls.append(dict(run=run, dataset=dataset, split=split, data_dir=data_dir))
        return {"accuracy": self.accuracy(run), "num_correct": 0, "num_examples": 5000,
                "trainable_params": self.params.get(run, 1000 * 14), "weights_sha256": "0" * 64}


def _finished_ablation(tmp_path, fail=()):
    out = str(tmp_path / "ablation")
    scores = {"student": 90.0, "kd": 91.0}
    campaigns.run_ablation(out, make_flagfile(tmp_path, "--keep_blocks=14\n--val_split=train[90%:]\n"),
                           ["student", "kd"], [0, 1], launcher=FakeDistill(lambda flags: scores[flags["method"]] +
                                                                          flags["seed"] / 10, fail=fail),
                           log=quiet)
    return out


def test_verify_runs_reevaluates_every_finished_run_and_writes_verify_json(tmp_path):
    out = _finished_ablation(tmp_path, fail=["kd/seed1"])
    recorded = {"student/seed0": 90.0, "student/seed1": 90.1, "kd/seed0": 91.0}
    # Within the tolerance: 0.1 points off passes.
    evaluate = FakeEvaluate(lambda run: recorded[run] + 0.1)
    messages = []
    report = campaigns.verify_runs(out, evaluate, data_dir="/data", tolerance_points=0.1, log=messages.append)
    assert sorted(call["run"] for call in evaluate.calls) == sorted(recorded)  # kd/seed1 failed: not checked
    assert {(call["dataset"], call["split"], call["data_dir"]) for call in evaluate.calls} == {
        ("cifar10", "train[90%:]", "/data")}
    assert report["all_ok"] and report["num_finished"] == 3 and report["num_unfinished"] == 1
    assert report["cpu"] == benchmark.cpu_model() and report["checked_at"].endswith("Z")
    with open(os.path.join(out, campaigns.VERIFY_FILE)) as handle:
        assert json.load(handle) == report
    run = {entry["run"]: entry for entry in report["runs"]}["kd/seed0"]
    assert run["recorded_accuracy"] == 91.0 and run["accuracy"] == pytest.approx(91.1)
    assert run["trainable_params"] == run["recorded_params"] == 14000 and run["weights"] == "runs/kd/seed0/student.h5"
    assert messages[-1].startswith("[3/3] ") and messages[-1].endswith("-> ok")


@pytest.mark.parametrize("case", ["accuracy", "params", "missing_student", "no_val_split"])
def test_verify_runs_names_the_runs_that_do_not_reproduce(tmp_path, case):
    out = _finished_ablation(tmp_path)
    accuracy = {"student/seed0": 90.0, "student/seed1": 90.1, "kd/seed0": 91.0, "kd/seed1": 91.1}
    params = {}
    if case == "accuracy":
        accuracy["kd/seed1"] = 90.9  # 0.2 points below the record
    elif case == "params":
        params["kd/seed1"] = 13999
    elif case == "missing_student":
        os.remove(os.path.join(out, "runs", "kd", "seed1", "student.h5"))
    else:  # a hand-edited results.json: a named problem, not a KeyError
        results_path = os.path.join(out, "runs", "kd", "seed1", experiments.RESULTS_FILE)
        with open(results_path) as handle:
            results = json.load(handle)
        del results["val_split"]
        with open(results_path, "w") as handle:
            json.dump(results, handle)
    evaluate = FakeEvaluate(accuracy.get, params)
    with pytest.raises(VerificationError, match=r"1 of 4 finished runs .*: kd/seed1 "):
        campaigns.verify_runs(out, evaluate, tolerance_points=0.1, log=quiet)
    with open(os.path.join(out, campaigns.VERIFY_FILE)) as handle:
        report = json.load(handle)
    assert not report["all_ok"] and report["num_failed"] == 1
    failed = [entry for entry in report["runs"] if not entry["ok"]]
    assert [entry["run"] for entry in failed] == ["kd/seed1"]
    expected = {"accuracy": "accuracy 90.90 % vs recorded 91.10 %", "params": "13999 trainable parameters",
                "missing_student": "is not on disk", "no_val_split": "records no val_split"}[case]
    assert expected in failed[0]["problems"][0]
    assert len(evaluate.calls) == (3 if case in ("missing_student", "no_val_split") else 4)


def test_verify_runs_refuses_bad_input(tmp_path):
    with pytest.raises(InvalidArgumentError, match="no readable campaign table"):
        campaigns.verify_runs(str(tmp_path), FakeEvaluate(lambda run: 0.0), log=quiet)
    out = _finished_ablation(tmp_path)
    for tolerance in (-0.1, float("nan")):
        with pytest.raises(InvalidArgumentError, match="tolerance_points"):
            campaigns.verify_runs(out, FakeEvaluate(lambda run: 0.0), tolerance_points=tolerance, log=quiet)
    assert not os.path.exists(os.path.join(out, campaigns.VERIFY_FILE))


def test_verify_script_exits_2_without_a_campaign(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "verify_runs.py"),
                             f"--output_dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == cli.EXIT_BAD_INPUT
    assert "error: InvalidArgumentError: no readable campaign table" in result.stderr


# --------------------------------------------------------------------------- in-process, on mock data

SMOKE = os.path.join(REPO, "flags", "smoke.cfg")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from kdig_tf import models

    path = str(tmp_path_factory.mktemp("teacher") / "teacher.h5")
    models.build_teacher(width_multiplier=0.25).save(path)
    return path


@pytest.fixture
def no_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a campaign run started a subprocess: {args[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


def mock_cifar10():
    import tensorflow_datasets as tfds

    return tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE)


def test_ablation_trains_every_run_in_process(tmp_path, tiny_teacher, no_subprocess, capfd):
    from test_evaluate import evaluate_script  # scripts/evaluate.py, loaded once by its own tests

    out = str(tmp_path / "ablation")
    messages = []
    with mock_cifar10():
        summary = campaigns.run_ablation(out, SMOKE, ["student", "kd"], [0], extra_flags=f"--teacher={tiny_teacher}",
                                         log=messages.append)
    with open(os.path.join(out, "runs.json")) as handle:
        rows = json.load(handle)
    assert [row["status"] for row in rows] == ["ok", "ok"], [row["error"] for row in rows]
    assert summary["arms"]["student"]["n"] == 1 and summary["arms"]["kd"]["n"] == 1
    with open(os.path.join(out, "summary.json")) as handle:
        assert json.load(handle) == summary
    results = json.loads(open(os.path.join(out, "runs", "kd", "seed0", "results.json")).read())
    assert results["flags"]["method"] == "kd" and results["flags"]["teacher"] == tiny_teacher
    assert results["flags"]["epochs"] == 1 and results["flags"]["store_dir"] == os.path.join(out, "store")
    assert os.path.isfile(os.path.join(out, "runs", "kd", "seed0", "student_fp32.tflite"))
    assert sum("] run " in message for message in messages) == 2
    # The runs' own output went to their logs, not to the console.
    for arm in ("student", "kd"):
        log = open(os.path.join(out, "runs", arm, "seed0", "log.txt")).read()
        assert "=== " in log and "Logging error" not in log
    console = capfd.readouterr()
    assert "img/s" not in console.out + console.err

    # The runner recognises its own finished runs.
    with mock_cifar10():
        rows = experiments.run_campaign(
            experiments.seed_runs(os.path.join(out, "runs"), ["student", "kd"], [0],
                                  common={"store_dir": os.path.join(out, "store"), "teacher": tiny_teacher}),
            SMOKE, log=quiet)
    assert [row["status"] for row in rows] == ["skipped", "skipped"]

    # The saved students reproduce the recorded accuracy and parameter count (scripts/evaluate.py).
    with mock_cifar10():
        report = campaigns.verify_runs(out, evaluate_script.run_evaluation, tolerance_points=0.0, log=quiet)
    assert report["all_ok"] and report["num_finished"] == 2, report
    for entry in report["runs"]:
        assert entry["trainable_params"] == entry["recorded_params"] > 0 and entry["num_examples"] == 12


def test_failed_run_is_reported_and_the_next_one_still_runs(tmp_path, no_subprocess):
    out = str(tmp_path / "ablation")
    with mock_cifar10():
        summary = campaigns.run_ablation(out, SMOKE, ["kd", "student"], [0], log=quiet,
                                         extra_flags="--teacher=/nonexistent/teacher.h5 --export_modes=")
    with open(os.path.join(out, "runs.json")) as handle:
        rows = json.load(handle)
    assert [row["status"] for row in rows] == ["failed", "ok"]
    assert rows[0]["error"].startswith("TeacherNotFoundError: no teacher at '/nonexistent/teacher.h5'")
    log = open(os.path.join(out, "runs", "kd", "seed0", "log.txt")).read()
    assert "Traceback (most recent call last)" in log and "TeacherNotFoundError" in log
    assert summary["arms"]["kd"]["unfinished"] == ["kd/seed0"] and summary["arms"]["student"]["n"] == 1
