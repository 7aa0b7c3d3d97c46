import kdig_tf  # noqa: F401

import os

import pytest
from scipy import stats as scipy_stats

from kdig_tf import reports, stats
from kdig_tf.errors import InvalidArgumentError

PNG = b"\x89PNG\r\n\x1a\n"


def write_history(workdir, rows):
    """A Keras CSVLogger file: (epoch, val_accuracy) rows, in the order given."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "history.csv"), "w") as handle:
        handle.write("epoch,accuracy,val_accuracy\n")
        for epoch, val_accuracy in rows:
            handle.write(f"{epoch},0.5,{val_accuracy}\n")


def test_learning_curves_read_every_run_that_logged_an_epoch(tmp_path):
    finished, resumed, fresh = (str(tmp_path / name) for name in ("student0", "kd0", "kd1"))
    write_history(finished, [(0, 0.5), (1, 0.75), (2, 0.9)])
    # Killed after logging epoch 1 but before backing it up: the resumed run logs it again.
    write_history(resumed, [(0, 0.4), (1, 0.6), (1, 0.65)])
    rows = [{"run": "student/seed0", "arm": "student", "seed": 0, "status": "ok", "workdir": finished},
            {"run": "kd/seed0", "arm": "kd", "seed": 0, "status": "pending", "workdir": resumed},
            {"run": "kd/seed1", "arm": "kd", "seed": 1, "status": "pending", "workdir": fresh}]
    curves = reports.learning_curves(rows, "history.csv")
    assert [(curve["run"], curve["finished"], curve["epochs"]) for curve in curves] == [
        ("student/seed0", True, [1, 2, 3]), ("kd/seed0", False, [1, 2])]
    assert curves[0]["values"] == [50.0, 75.0, 90.0]
    assert curves[1]["values"] == [40.0, 65.0]  # the later row of epoch 1: its weights survived

    path = str(tmp_path / "curves.png")
    reports.plot_learning_curves(curves, path, "val acc (%)", "curves")
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "kd0", "student0"]  # no temporary file left


def test_learning_curves_plot_a_single_epoch(tmp_path):
    write_history(str(tmp_path / "run"), [(0, 0.3)])
    rows = [{"run": "student/seed0", "arm": "student", "seed": 0, "status": "ok", "workdir": str(tmp_path / "run")}]
    path = str(tmp_path / "curves.png")
    reports.plot_learning_curves(reports.learning_curves(rows, "history.csv"), path, "val acc (%)", "one epoch")
    assert os.path.getsize(path) > 0


def test_plotting_no_curve_is_a_named_error(tmp_path):
    with pytest.raises(InvalidArgumentError):
        reports.plot_learning_curves([], str(tmp_path / "curves.png"), "val acc (%)", "none")
    assert not os.listdir(tmp_path)


def finished_rows(values_by_arm):
    return [{"arm": arm, "run": f"{arm}/seed{seed}", "seed": seed, "status": "ok", "val_accuracy": value}
            for arm, values in values_by_arm.items() for seed, value in enumerate(values)]


def test_ablation_plot_draws_each_seed_in_its_own_colour_linked_across_arms(tmp_path):
    rows = finished_rows({"student": [91.8, 91.2], "kd": [91.4], "kd_ig": [90.8, 90.9]})
    rows[0]["status"] = "pending"  # student/seed0 unfinished: seed 0 has points in kd and kd_ig only
    path = str(tmp_path / "ablation.png")
    figure = reports.plot_arms(reports.summarize_arms(rows), path, "val acc (%)", "ablation")
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG
    (axes,) = figure.axes
    points = {collection.get_label(): collection.get_offsets() for collection in axes.collections
              if collection.get_label().startswith("seed")}
    assert sorted(points) == ["seed 0", "seed 1"]
    # Columns 0, 1, 2 = student, kd, kd_ig; seed 0 sits left of the column, seed 1 right.
    assert [round(x, 2) for x in points["seed 0"][:, 0]] == [0.97, 1.97]
    assert list(points["seed 0"][:, 1]) == [91.4, 90.8]
    assert [round(x, 2) for x in points["seed 1"][:, 0]] == [0.03, 2.03]
    assert list(points["seed 1"][:, 1]) == [91.2, 90.9]
    links = [line for line in axes.lines if len(line.get_xdata()) > 1 and line.get_linestyle() == "-"]
    assert sorted(list(line.get_ydata()) for line in links) == [[91.2, 90.9], [91.4, 90.8]]


def test_ablation_plot_and_paired_test_skip_a_run_without_a_seed(tmp_path):
    rows = finished_rows({"student": [91.8, 91.2, 90.5], "kd": [91.4, 91.0, 90.1]})
    rows[2]["seed"] = rows[5]["seed"] = None  # e.g. a row written by hand
    arms = reports.summarize_arms(rows)
    assert arms["kd"]["vs_reference_paired"]["seeds"] == [0, 1]
    figure = reports.plot_arms(arms, str(tmp_path / "ablation.png"), "val acc (%)", "ablation")
    points = {collection.get_label(): collection.get_offsets() for collection in figure.axes[0].collections
              if not collection.get_label().startswith("_")}  # error bars are "_nolegend_"
    assert sorted(points) == ["no seed", "seed 0", "seed 1"]
    assert [tuple(point) for point in points["no seed"]] == [(0.0, 90.5), (1.0, 90.1)]


def test_contrasts_match_scipy_and_holm_adjusts_over_the_contrasts():
    values = {"student": [90.0, 91.0, 92.0], "kd": [91.0, 91.5, 93.2], "kd_ig": [91.4, 92.3, 93.5],
              "kd_online": [90.1, 91.6, 92.0]}
    arms = reports.summarize_arms(finished_rows(values))
    tests = reports.contrast_tests(arms, reports.parse_contrasts(["kd_ig:kd", "kd_online:kd"], list(arms)))
    paired_p = [scipy_stats.ttest_rel(values[arm], values["kd"]).pvalue for arm in ("kd_ig", "kd_online")]
    welch_p = [scipy_stats.ttest_ind(values[arm], values["kd"], equal_var=False).pvalue
               for arm in ("kd_ig", "kd_online")]
    assert [test["paired"]["p"] for test in tests] == pytest.approx(paired_p)
    assert [test["welch"]["p"] for test in tests] == pytest.approx(welch_p)
    smaller, larger = sorted(paired_p)
    assert sorted(test["paired"]["p_holm"] for test in tests) == pytest.approx(
        [min(1.0, 2 * smaller), min(1.0, max(2 * smaller, larger))])
    assert tests[0]["paired"]["mean_diff"] == pytest.approx(0.5)
    # The family against the reference is adjusted on its own, for the paired test as well.
    against_student = [arms[arm]["vs_reference_paired"]["p"] for arm in ("kd", "kd_ig", "kd_online")]
    assert [arms[arm]["vs_reference_paired"]["p_holm"] for arm in ("kd", "kd_ig", "kd_online")] == pytest.approx(
        stats.holm(against_student))


@pytest.mark.parametrize("texts, message", [
    (["kd_ig"], "form arm:other"), (["kd_ig:"], "form arm:other"), (["kd_ig:kd_igg"], "kd_igg"),
    (["kd:kd"], "itself"), (["kd_ig:kd", " kd_ig : kd "], "twice")])
def test_bad_contrasts_are_named_errors(texts, message):
    with pytest.raises(InvalidArgumentError, match=message):
        reports.parse_contrasts(texts, ["student", "kd", "kd_ig"])


def test_findings_say_significant_not_significant_and_not_testable():
    values = {"student": [90.0, 91.0, 92.0], "kd": [92.0, 93.1, 94.0], "kd_ig": [89.0, 92.5, 91.6],
              "kd_online": [91.0]}
    arms = reports.summarize_arms(finished_rows(values))
    summary = stats.finite_or_none({"arms": arms, "reference": "student", "contrasts": reports.contrast_tests(
        arms, reports.parse_contrasts(["kd_ig:kd"], list(arms)))})
    lines = {line.split(":")[0]: line for line in reports.findings_markdown(summary) if line.startswith("- ")}
    assert set(lines) == {"- `kd` - `student`", "- `kd_ig` - `student`", "- `kd_online` - `student`",
                          "- `kd_ig` - `kd`"}
    assert "over 3 seeds" in lines["- `kd` - `student`"] and "**significant**" in lines["- `kd` - `student`"]
    assert "`kd` is higher" in lines["- `kd` - `student`"]
    assert "not significant" in lines["- `kd_ig` - `student`"]
    assert "not testable yet" in lines["- `kd_online` - `student`"]
    # A lone contrast: Holm leaves its p as it is (0.109, not significant).
    assert "paired p = 0.1091, Holm-adjusted p = 0.1091: not significant" in lines["- `kd_ig` - `kd`"]
