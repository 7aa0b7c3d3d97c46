"""Campaign reports: per-arm statistics, markdown tables and matplotlib plots of the run rows.

Rows are what ``experiments.run_campaign`` returns; only finished runs count. matplotlib
is imported when a plot is drawn, not with the module.
"""
import kdig_tf  # noqa: F401

import math
import os

import numpy as np

from kdig_tf import stats
from kdig_tf.errors import InvalidArgumentError
from kdig_tf.experiments import FINISHED, SHUFFLED_SUFFIX, format_flag_value
from kdig_tf.io_utils import atomic_path, read_epoch_log, subplots


# --------------------------------------------------------------------------- summaries

def summarize_arms(rows, metric="val_accuracy", reference="student", confidence=0.95):
    """Per arm: n, mean, sd, min, max of ``metric`` over finished runs, and tests vs ``reference``.

    ``vs_reference`` is Welch's test, Cohen's d, Hedges' g and the mean difference with its
    CI; ``p_holm`` adjusts the p-values over all arms tested against the reference. An arm
    ``X_shuffled`` is also compared with ``X`` (``vs_aligned``): the misalignment control.
    ``vs_reference_paired`` / ``vs_aligned_paired`` add the paired t-test over the seeds both
    arms finished (runs with the same seed start from the same student and batches).
    ``train_hours`` lists the finished runs' training time (their rows' ``train_seconds``).
    """
    arms, values, seeds, unfinished, seconds = [], {}, {}, {}, {}
    for row in rows:
        arm = row["arm"]
        if arm not in values:
            arms.append(arm)
            values[arm], seeds[arm], unfinished[arm], seconds[arm] = [], [], [], []
        if row["status"] in FINISHED and row.get(metric) is not None:
            values[arm].append(float(row[metric]))
            seeds[arm].append(row.get("seed"))
            if row.get("train_seconds") is not None:
                seconds[arm].append(float(row["train_seconds"]))
        elif row["status"] not in FINISHED:
            unfinished[arm].append(row["run"])
    summary = {}
    for arm in arms:
        entry = {"n": 0} if not values[arm] else stats.summarize(values[arm])
        entry.update(values=values[arm], seeds=seeds[arm], unfinished=unfinished[arm],
                     train_hours=[value / 3600 for value in seconds[arm]])
        if arm != reference:
            welch, paired = _welch_and_paired(values, seeds, arm, reference, confidence)
            _set_present(entry, vs_reference=welch, vs_reference_paired=paired)
        aligned = arm[:-len(SHUFFLED_SUFFIX)] if arm.endswith(SHUFFLED_SUFFIX) else None
        if aligned:
            welch, paired = _welch_and_paired(values, seeds, arm, aligned, confidence)
            _set_present(entry, vs_aligned=welch and dict(welch, arm=aligned),
                         vs_aligned_paired=paired and dict(paired, arm=aligned))
        summary[arm] = entry
    # One family per question: the arms against the reference, and the misalignment controls.
    for key in ("vs_reference", "vs_reference_paired", "vs_aligned", "vs_aligned_paired"):
        _holm_adjust([summary[arm][key] for arm in arms if key in summary[arm]])
    return summary


def _holm_adjust(tests):
    """Adds ``p_holm`` to every test dict: Holm's adjustment over the given family."""
    for test, adjusted in zip(tests, stats.holm([test["p"] for test in tests])):
        test["p_holm"] = adjusted


def parse_contrasts(texts, arms):
    """``["kd_ig:kd"]`` -> ``[("kd_ig", "kd")]``: each contrast tests ``arm - other``.

    Both sides must be arms of the campaign and differ; a contrast may appear once.
    """
    contrasts = []
    for text in texts:
        parts = [part.strip() for part in str(text).split(":")]
        if len(parts) != 2 or not all(parts):
            raise InvalidArgumentError(f"contrast {text!r} is not of the form arm:other (e.g. kd_ig:kd)")
        missing = [part for part in parts if part not in arms]
        if missing:
            raise InvalidArgumentError(f"contrast {text!r} names {missing}, not among the arms {list(arms)}")
        if parts[0] == parts[1]:
            raise InvalidArgumentError(f"contrast {text!r} compares an arm with itself")
        if tuple(parts) in contrasts:
            raise InvalidArgumentError(f"contrast {text!r} is given twice")
        contrasts.append(tuple(parts))
    return contrasts


def contrast_tests(arms, contrasts, confidence=0.95):
    """Planned comparisons ``arm - other`` from :func:`summarize_arms`' output.

    Each is Welch's test (``welch``) and, over the seeds both arms finished, the paired
    t-test (``paired``), each with ``p_holm``: Holm's adjustment over the contrasts.
    """
    values = {name: entry["values"] for name, entry in arms.items()}
    seeds = {name: entry["seeds"] for name, entry in arms.items()}
    tests = []
    for arm, other in contrasts:
        entry = {"arm": arm, "other": other, "n": [arms[arm]["n"], arms[other]["n"]]}
        welch, paired = _welch_and_paired(values, seeds, arm, other, confidence)
        tests.append(_set_present(entry, welch=welch, paired=paired))
    for key in ("welch", "paired"):
        _holm_adjust([entry[key] for entry in tests if key in entry])
    return tests


def _welch_and_paired(values, seeds, arm, other, confidence):
    """(Welch's test, paired t-test) of ``arm`` - ``other``; None for a test that cannot run
    (an arm without a finished run; fewer than 2 seeds both finished)."""
    if not (values.get(arm) and values.get(other)):
        return None, None
    return stats.compare(values[arm], values[other], confidence), _paired(values, seeds, arm, other, confidence)


def _set_present(entry, **tests):
    """``entry`` with the tests that ran (a missing test is left out, not stored as None)."""
    entry.update({key: test for key, test in tests.items() if test is not None})
    return entry


def _paired(values, seeds, arm, other, confidence):
    """Paired t-test of ``arm`` - ``other`` over the seeds both finished; None below 2 pairs."""
    by_seed = [dict(zip(seeds[name], values[name])) for name in (arm, other)]
    common = (set(by_seed[0]) & set(by_seed[1])) - {None}  # a run without a seed pairs with nothing
    if len(common) < 2:
        return None
    common = sorted(common)
    result = stats.paired_ttest([by_seed[0][seed] for seed in common], [by_seed[1][seed] for seed in common],
                                confidence)
    return dict(result, seeds=common)


def rank_trials(rows, params):
    """Trials sorted by mean validation accuracy (best first); trials with no finished run last."""
    trials = {}
    for row in rows:
        entry = trials.setdefault(row["trial"], {
            "trial": row["trial"], "params": {name: row[name] for name in params},
            "values": [], "seeds": [], "unfinished": [], "workdirs": []})
        entry["workdirs"].append(row["workdir"])
        if row["status"] in FINISHED and row.get("val_accuracy") is not None:
            entry["values"].append(float(row["val_accuracy"]))
            entry["seeds"].append(row["seed"])
        elif row["status"] not in FINISHED:
            entry["unfinished"].append(row["run"])
    ranked = []
    for entry in trials.values():
        if entry["values"]:
            entry.update(stats.summarize(entry["values"]))
        else:
            entry.update(n=0, mean=None, sd=None, min=None, max=None)
        entry["complete"] = not entry["unfinished"]
        ranked.append(entry)
    # Complete trials first; a trial with a failed seed must not win on fewer seeds.
    ranked.sort(key=lambda e: (not e["complete"], e["mean"] is None, -(e["mean"] or 0.0), e["trial"]))
    for rank, entry in enumerate(ranked, 1):
        entry["rank"] = rank
    return stats.finite_or_none(ranked)


def sweep_points(rows, keep_blocks, arms, latency, reference="student"):
    """One point per (keep_blocks, arm): accuracy stats, params, compression, latency."""
    points = []
    for keep in keep_blocks:
        subset = [row for row in rows if row["keep_blocks"] == keep]
        arm_stats = summarize_arms(subset, "val_accuracy", reference)
        for arm in arms:
            finished = [row for row in subset if row["arm"] == arm and row["status"] in FINISHED]
            first = finished[0] if finished else {}
            lat = latency.get(keep) or {}
            points.append(dict(
                arm_stats.get(arm, {"n": 0}), keep_blocks=keep, arm=arm,
                trainable_params=first.get("trainable_params"), compression=first.get("compression"),
                latency_ms=lat.get("inference_median_ms"), latency_avg_ms=lat.get("inference_avg_ms")))
    return stats.finite_or_none(points)


# --------------------------------------------------------------------------- markdown tables

def _fmt(value, spec=".2f"):
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _fmt_p(value):
    if value is None or not math.isfinite(value):
        return "n/a"
    return "<1e-4" if value < 1e-4 else f"{value:.4f}"


def _ci(cmp):
    return f"[{_fmt(cmp['ci_low'], '+.2f')}, {_fmt(cmp['ci_high'], '+.2f')}]"


def _diff_ci(cmp):
    return f"{cmp['mean_diff']:+.2f} {_ci(cmp)}"


def arms_markdown(arms, reference, metric_label):
    lines = [
        f"| arm | n | {metric_label} mean ± sd | min | max | Δ vs {reference} [95% CI] | t | dof | p | p (Holm) "
        f"| Cohen's d | Hedges' g | paired Δ [95% CI] | paired p | paired p (Holm) | pairs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, entry in arms.items():
        cmp = entry.get("vs_reference")
        if entry["n"]:
            spread = f"{_fmt(entry['mean'])} ± {_fmt(entry.get('sd'))}"
            low, high = _fmt(entry["min"]), _fmt(entry["max"])
        else:
            spread, low, high = "no finished runs", "", ""
        paired = entry.get("vs_reference_paired")
        if cmp:
            tests = [_diff_ci(cmp), _fmt(cmp["t"]), _fmt(cmp["dof"], ".1f"), _fmt_p(cmp["p"]),
                     _fmt_p(cmp.get("p_holm")), _fmt(cmp["cohens_d"]), _fmt(cmp["hedges_g"])]
            tests += _paired_cells(paired)
        else:
            tests = ["(reference)" if arm == reference else "n/a"] + [""] * 10
        lines.append("| " + " | ".join([arm, str(entry["n"]), spread, low, high, *tests]) + " |")
    return "\n".join(lines)


def _paired_cells(paired):
    if not paired:
        return ["n/a", "n/a", "n/a", "< 2"]
    return [_diff_ci(paired), _fmt_p(paired["p"]), _fmt_p(paired.get("p_holm")), str(paired["n"])]


def contrasts_markdown(contrasts):
    """Lines of a '## Contrasts' section: one row per planned comparison ``arm - other``."""
    lines = ["## Contrasts", "",
             "Planned comparisons (`--contrasts`); Holm's adjustment over these contrasts, separately for "
             "Welch's and the paired test.", "",
             "| contrast | n | Δ [95% CI] | Welch p | Welch p (Holm) | Hedges' g | paired Δ [95% CI] "
             "| paired p | paired p (Holm) | pairs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in contrasts:
        name = f"{entry['arm']} - {entry['other']}"
        sizes = " / ".join(map(str, entry["n"]))
        welch = entry.get("welch")
        cells = ([_diff_ci(welch), _fmt_p(welch["p"]), _fmt_p(welch.get("p_holm")), _fmt(welch["hedges_g"])]
                 if welch else ["n/a"] * 4) + _paired_cells(entry.get("paired"))
        lines.append("| " + " | ".join([name, sizes, *cells]) + " |")
    return lines


def _finding(arm, other, sizes, welch, paired, alpha, label=""):
    """One plain-language bullet: the difference, the test that decides and its verdict.

    The paired test decides when at least 2 seeds are paired (the design pairs seeds), else Welch's.
    """
    head = f"- `{arm}` - `{other}`{label}"
    if not welch:
        return f"{head}: no finished runs on one side yet."
    test, name = (paired, "paired") if paired else (welch, "Welch")
    how = (f"mean of the per-seed differences over {paired['n']} seeds" if paired
           else f"difference of the means of {sizes[0]} and {sizes[1]} runs")
    p, p_holm = test.get("p"), test.get("p_holm")
    text = f"{head}: {test['mean_diff']:+.2f} points ({how}"
    if p is None or not math.isfinite(p) or p_holm is None or not math.isfinite(p_holm):
        return (text + "); not testable yet: a test needs at least 2 runs per arm (and differences "
                       "that vary between seeds).")
    text += f", 95 % CI {_ci(test)}); {name} p = {_fmt_p(p)}, Holm-adjusted p = {_fmt_p(p_holm)}: "
    if p_holm < alpha:
        return text + f"**significant** at the {alpha:.0%} level (`{arm}` is {'higher' if test['mean_diff'] > 0 else 'lower'})."
    return text + f"not significant at the {alpha:.0%} level; these runs cannot tell the two arms apart."


def findings_markdown(summary, alpha=0.05):
    """Lines of a '## Findings' section: every test of the report in words, with its verdict."""
    arms, reference = summary["arms"], summary["reference"]
    lines = ["## Findings", "",
             f"Each line says whether a difference is significant at the {alpha:.0%} level after Holm's "
             f"adjustment within its family (the arms against `{reference}`, the misalignment controls, the "
             f"contrasts). The paired test decides when at least 2 seeds are paired, else Welch's test.", ""]
    for arm, entry in arms.items():
        if "vs_reference" in entry:
            lines.append(_finding(arm, reference, (entry["n"], arms[reference]["n"]), entry["vs_reference"],
                                  entry.get("vs_reference_paired"), alpha))
    for arm, entry in arms.items():
        if "vs_aligned" in entry:
            other = entry["vs_aligned"]["arm"]
            lines.append(_finding(arm, other, (entry["n"], arms[other]["n"]), entry["vs_aligned"],
                                  entry.get("vs_aligned_paired"), alpha, " (misalignment control)"))
    for entry in summary.get("contrasts", []):
        lines.append(_finding(entry["arm"], entry["other"], entry["n"], entry.get("welch"), entry.get("paired"),
                              alpha))
    return lines


def ablation_markdown(summary):
    splits = summary["splits"]
    lines = [
        "# Ablation",
        "",
        f"Validation accuracy (%) on `{splits['val_split']}`, {summary['protocol']}. Welch's t-test "
        f"(two-sided) and effect sizes against `{summary['reference']}`; Holm's adjustment over the arms "
        f"tested against it. The paired columns test the per-seed differences (runs with the same seed "
        f"start from the same student and see the same batches), Holm-adjusted over the same arms.",
        "",
        arms_markdown(summary["arms"], summary["reference"], "val acc"),
    ]
    for arm, entry in summary["arms"].items():
        if "vs_aligned" in entry:
            cmp = entry["vs_aligned"]
            paired = entry.get("vs_aligned_paired")
            paired_text = (f"; paired over {paired['n']} seeds: {_diff_ci(paired)}, p = {_fmt_p(paired['p'])}"
                           if paired else "")
            lines += ["", f"Misalignment control: `{arm}` - `{cmp['arm']}` = {_diff_ci(cmp)}, "
                          f"p = {_fmt_p(cmp['p'])} (Welch), Hedges' g = {_fmt(cmp['hedges_g'])}{paired_text}."]
    if summary.get("eval_arms"):
        lines += ["", f"## Final report on `{splits['eval_split']}`", "",
                  arms_markdown(summary["eval_arms"], summary["reference"], "eval acc")]
    unfinished = [name for entry in summary["arms"].values() for name in entry["unfinished"]]
    if unfinished:
        lines += ["", f"Unfinished runs (rerun the same command to retry): {', '.join(unfinished)}"]
    if summary.get("contrasts"):
        lines += ["", *contrasts_markdown(summary["contrasts"])]
    lines += ["", *findings_markdown(summary)]
    lines += ["", *wall_time_markdown(summary["arms"])]
    lines += ["", "## Commands", ""]
    for arm, entry in summary["arms"].items():
        lines += [f"- `{arm}`:"] + [f"  - `{command}`" for command in entry["commands"]]
    return "\n".join(lines) + "\n"


def wall_time_markdown(arms):
    """Lines of a '## Wall time' section: the finished runs' training hours per arm and in all."""
    lines = ["## Wall time", "",
             "Training time of the finished runs (each run's `train_seconds`: its epochs' time, summed "
             "over resumed sessions; the machine can change between sessions, see each run's "
             "`machines.json`).", "",
             "| arm | timed runs | hours per run (mean) | min | max | hours in all |", "|---|---|---|---|---|---|"]
    every = []
    for arm, entry in arms.items():
        hours = entry.get("train_hours", [])
        every += hours
        cells = [_fmt(np.mean(hours)), _fmt(min(hours)), _fmt(max(hours)), _fmt(sum(hours))] if hours else [""] * 4
        lines.append("| " + " | ".join([arm, str(len(hours)), *cells]) + " |")
    lines.append(f"| all | {len(every)} |  |  |  | {_fmt(sum(every))} |")
    return lines


def trials_markdown(ranked, params, val_split, method):
    header = " | ".join(params)
    lines = [
        "# Hyper-parameter search",
        "",
        f"Method `{method}`, scored on the validation split `{val_split}` only (mean over seeds).",
        "",
        f"| rank | trial | {header} | n | val acc mean ± sd | status |",
        "|" + "---|" * (len(params) + 5),
    ]
    for entry in ranked:
        values = " | ".join(format_flag_value(entry["params"][name]) for name in params)
        status = "complete" if entry["complete"] else f"unfinished: {', '.join(entry['unfinished'])}"
        lines.append(f"| {entry['rank']} | {entry['trial']} | {values} | {entry['n']} "
                     f"| {_fmt(entry['mean'])} ± {_fmt(entry['sd'])} | {status} |")
    return "\n".join(lines) + "\n"


def sweep_markdown(points, val_split, reference):
    lines = [
        "# Compression sweep",
        "",
        f"Validation accuracy (%) on `{val_split}`; latency = median fp32 TFLite inference, batch 1, "
        f"1 thread (one measurement per architecture). Δ is against `{reference}` at the same size.",
        "",
        "| keep_blocks | compression | params | latency (ms) | arm | n | val acc mean ± sd | Δ [95% CI] | p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for point in points:
        cmp = point.get("vs_reference")
        delta = (f"{cmp['mean_diff']:+.2f} [{_fmt(cmp['ci_low'], '+.2f')}, {_fmt(cmp['ci_high'], '+.2f')}] "
                 f"| {_fmt_p(cmp['p'])}") if cmp else " | "
        compression = _fmt(point["compression"]) + "x" if point["compression"] is not None else "n/a"
        params = f"{point['trainable_params']:,}" if point["trainable_params"] is not None else "n/a"
        spread = f"{_fmt(point['mean'])} ± {_fmt(point.get('sd'))}" if point["n"] else "no finished runs"
        lines.append(f"| {point['keep_blocks']} | {compression} | {params} | {_fmt(point['latency_ms'], '.3f')} "
                     f"| {point['arm']} | {point['n']} | {spread} | {delta} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots


def plot_arms(arms, path, ylabel, title):
    """A strip plot: one column per arm, the mean ± sd as a marker and error bar, and every seed as
    a point in its own colour, linked across arms by a faint line: the paired tests compare seeds
    within a pair, and the lines show those pairs.

    No bars: the y axis is cut to the data, and a bar's length would then exaggerate the gaps.
    Returns the figure (already written to ``path``).
    """
    names = list(arms)
    figure, axes = subplots(figsize=(max(4.0, 1.3 * len(names) + 1.5), 4.0))
    for x, arm in enumerate(names):
        entry = arms[arm]
        if entry["n"]:
            sd = entry.get("sd")
            axes.errorbar(x, entry["mean"], yerr=sd if sd is not None else None, fmt="_", color="k",
                          capsize=6, markersize=20, zorder=3)
    seeds = sorted({seed for arm in names for seed in arms[arm].get("seeds", []) if seed is not None})
    unseeded = [(x, value) for x, arm in enumerate(names)
                for seed, value in zip(arms[arm].get("seeds", []), arms[arm]["values"]) if seed is None]
    if unseeded:
        # A run without a seed pairs with nothing: drawn at the column centre, unlinked.
        axes.scatter(*zip(*unseeded), s=16, color="0.5", marker="x", zorder=4, label="no seed")
    for index, seed in enumerate(seeds):
        # A fixed offset per seed rather than random jitter: the figure is reproducible and a
        # seed sits at the same place in every column.
        offset = 0.06 * (index - (len(seeds) - 1) / 2)
        points = [(x + offset, arms[arm]["values"][arms[arm]["seeds"].index(seed)])
                  for x, arm in enumerate(names) if seed in arms[arm].get("seeds", [])]
        xs, ys = zip(*points)
        color = f"C{index % 10}"
        axes.plot(xs, ys, "-", color=color, linewidth=0.8, alpha=0.35, zorder=2)
        axes.scatter(xs, ys, s=16, color=color, zorder=4, label=f"seed {seed}")
    finished = [value for arm in names for value in arms[arm]["values"]]
    if finished:
        low, high = min(finished), max(finished)
        pad = max(0.5, 0.15 * (high - low))
        axes.set_ylim(low - pad, high + pad)  # an axis from zero would hide sub-point differences
    if seeds or unseeded:
        axes.legend(fontsize=8, loc="best")
    axes.set_xticks(range(len(names)))
    axes.set_xticklabels([f"{arm}\n(n={arms[arm]['n']})" for arm in names])
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=150, format="png")
    return figure


def learning_curves(rows, history_name, column="val_accuracy"):
    """Per run with a logged epoch: {"run", "arm", "seed", "finished", "epochs" (1-based),
    "values"} (``column`` in % after each epoch), read from ``<workdir>/<history_name>``
    (a Keras CSVLogger file).

    Unfinished runs are included as logged so far (the figure marks them): unlike the tables,
    a curve is for watching a campaign, not for testing it.
    """
    curves = []
    for row in rows:
        history = read_epoch_log(os.path.join(row["workdir"], history_name)) if row.get("workdir") else {}
        values = history.get(column)
        if not values:
            continue
        # Keras logs 0-based epochs; plotted at their own numbers, a gap cannot shift later points.
        curves.append({"run": row["run"], "arm": row.get("arm"), "seed": row.get("seed"),
                       "finished": row["status"] in FINISHED,
                       "epochs": [int(epoch) + 1 for epoch in history["epoch"]],
                       "values": [100.0 * value for value in values]})
    return curves


def plot_learning_curves(curves, path, ylabel, title, zoom_fraction=1 / 3):
    """Every run's curve, one colour per arm (dashed: unfinished), and beside it the last
    ``zoom_fraction`` of the epochs with the y axis cut to the data there, where arms differ by
    tenths of a point."""
    if not curves:
        raise InvalidArgumentError("no learning curve to plot: no run has logged an epoch")
    arms = list(dict.fromkeys(curve["arm"] for curve in curves))
    figure, (full, zoom) = subplots(1, 2, figsize=(11.0, 4.2))
    longest = max(max(curve["epochs"]) for curve in curves)
    zoom_from = max(1, round(longest * (1 - zoom_fraction)))
    tail = []
    for curve in curves:
        color = f"C{arms.index(curve['arm']) % 10}"
        style = "-" if curve["finished"] else "--"
        for axes in (full, zoom):
            axes.plot(curve["epochs"], curve["values"], style, color=color, linewidth=1.2, alpha=0.85)
        tail += [value for epoch, value in zip(curve["epochs"], curve["values"]) if epoch >= zoom_from]
    for index, arm in enumerate(arms):
        mine = [curve for curve in curves if curve["arm"] == arm]
        done = sum(curve["finished"] for curve in mine)
        unfinished = f", {len(mine) - done} unfinished, dashed" if len(mine) > done else ""
        full.plot([], [], "-", color=f"C{index % 10}", label=f"{arm} ({done} finished{unfinished})")
    zoom.set_xlim(zoom_from - 0.5, longest + 0.5)
    if tail:
        low, high = min(tail), max(tail)
        pad = max(0.25, 0.1 * (high - low))
        zoom.set_ylim(low - pad, high + pad)
    for axes in (full, zoom):
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
    full.set_ylabel(ylabel)
    full.set_title(title)
    zoom.set_title(f"epochs {zoom_from}-{longest} (y axis cut to the data)")
    full.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=150, format="png")


def plot_sweep(points, path, val_split):
    """Accuracy vs compression (log x), one line per arm, latency written above each size."""
    figure, axes = subplots(figsize=(7.5, 4.5))
    arms = list(dict.fromkeys(point["arm"] for point in points))
    for index, arm in enumerate(arms):
        mine = sorted((p for p in points if p["arm"] == arm and p["n"] and p["compression"]),
                      key=lambda p: p["compression"])
        if mine:
            axes.errorbar([p["compression"] for p in mine], [p["mean"] for p in mine],
                          yerr=[p.get("sd") or 0.0 for p in mine], marker="o", capsize=3,
                          label=arm, color=f"C{index}")
    labelled = {}
    for point in points:
        if point["n"] and point["compression"]:
            best = labelled.get(point["keep_blocks"])
            if best is None or point["mean"] > best["mean"]:
                labelled[point["keep_blocks"]] = point
    for point in labelled.values():
        if point["latency_ms"] is not None:
            axes.annotate(f"k={point['keep_blocks']}\n{point['latency_ms']:.2f} ms",
                          (point["compression"], point["mean"]), textcoords="offset points", xytext=(0, 10),
                          ha="center", fontsize=7)
    axes.set_xscale("log")
    ticks = sorted({point["compression"] for point in points if point["compression"]})
    if ticks:
        axes.set_xticks(ticks, [f"{tick:.{2 if tick < 10 else 1 if tick < 100 else 0}f}x" for tick in ticks])
        axes.minorticks_off()
    axes.set_xlabel("compression (teacher params / student params, log scale)")
    axes.set_ylabel(f"validation accuracy (%) on {val_split}")
    axes.set_title("Accuracy vs compression (fp32 TFLite latency, batch 1, 1 thread)")
    axes.grid(alpha=0.3, which="both")
    if arms:
        axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=150, format="png")
