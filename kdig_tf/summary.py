"""What a user reads at the end of a run: one block on the console, the same as a table in results.md.

Teacher and student accuracy on the validation split, every ``.tflite`` with its accuracy
and size, parameters and compression, the weights kept, any warning, and where the files
are. Everything comes from the results dict (results.json), so a finished run returned
without work prints the same summary.
"""
import kdig_tf  # noqa: F401

import os

from kdig_tf.io_utils import atomic_path

RESULTS_MD = "results.md"


def _percent(value):
    return "n/a" if value is None else f"{value:.2f} %"


def _kib(num_bytes):
    return "" if num_bytes is None else f"{num_bytes / 1024:,.0f} KiB"


def rows(results):
    """[(model, accuracy or None, file bytes or None, parameters or None, path)] of a run, teacher first."""
    flags = results.get("flags", {})
    found = []
    check = results.get("teacher_check")
    if check is not None or results.get("teacher_params") is not None:
        teacher = flags.get("teacher", "")
        found.append(("teacher", None if check is None else check.get("accuracy"),
                      os.path.getsize(teacher) if teacher and os.path.isfile(teacher) else None,
                      results.get("teacher_params"), os.path.abspath(teacher) if teacher else ""))
    student_path = results.get("student_path", "")
    found.append(("student (Keras)", results.get("val_accuracy"),
                  os.path.getsize(student_path) if student_path and os.path.isfile(student_path) else None,
                  results.get("trainable_params"), student_path))
    for name, entry in sorted((results.get("tflite") or {}).items()):
        if entry:
            found.append((f"student {name} (.tflite)", entry.get("val_accuracy"), entry.get("file_bytes"),
                          results.get("trainable_params"), entry.get("path", "")))
    return found


def _compression(results):
    return (f"teacher {results.get('teacher_params'):,} / student {results.get('trainable_params'):,} trainable "
            "parameters")


def _kept(results):
    selection = results.get("selection") or {}
    if selection.get("keep") == "best":
        return (f"weights of epoch {selection.get('best_epoch')} of {results.get('epochs_logged')} (best on the "
                "validation split: an optimistic estimate)")
    if selection.get("ema_decay"):
        return f"weight average (EMA, decay {selection['ema_decay']}) after the last epoch"
    return "weights after the last epoch"


def text(results, workdir):
    """The console summary (several lines, no trailing newline)."""
    flags = results.get("flags", {})
    compression = results.get("compression")
    lines = [f"== {results.get('method')} on {flags.get('dataset')}: trained on {flags.get('train_split')} "
             f"({results.get('num_train')} images), scored on {results.get('val_split')} "
             f"({results.get('num_val')} images) =="]
    for model, accuracy, size, params, path in rows(results):
        details = ", ".join(part for part in (_kib(size), None if params is None else f"{params:,} params") if part)
        lines.append(f"  {model:<24} {_percent(accuracy):>9}   {details}   {os.path.basename(path)}")
    if compression is not None:
        lines.append(f"  compression: {compression:.2f}x ({_compression(results)})")
    lines.append(f"  kept: {_kept(results)}")
    for warning in results.get("warnings", []):
        lines.append(f"  warning: {warning}")
    lines.append(f"  files: {os.path.abspath(workdir)} (results.json, {RESULTS_MD}, student.h5, .tflite + .json "
                 "sidecars, history.csv)")
    return "\n".join(lines)


def markdown(results):
    """results.md: the summary as a table."""
    flags = results.get("flags", {})
    out = [f"# {results.get('method')} on `{flags.get('dataset')}`", "",
           f"Trained on `{flags.get('train_split')}` ({results.get('num_train')} images), scored on "
           f"`{results.get('val_split')}` ({results.get('num_val')} images). Kept: {_kept(results)}.", "",
           "| model | val acc (%) | file (KiB) | parameters | file |", "|---|---|---|---|---|"]
    for model, accuracy, size, params, path in rows(results):
        out.append(f"| {model} | {'n/a' if accuracy is None else f'{accuracy:.2f}'} | "
                   f"{'' if size is None else f'{size / 1024:,.0f}'} | {'' if params is None else f'{params:,}'} | "
                   f"`{path}` |")
    if results.get("compression") is not None:
        out += ["", f"Compression: {results['compression']:.2f}x ({_compression(results)})."]
    selection = results.get("selection") or {}
    if selection.get("bias"):
        out += ["", f"Selection: {selection['bias']}."]
    for warning in results.get("warnings", []):
        out += ["", f"Warning: {warning}."]
    return "\n".join(out) + "\n"


def write_markdown(results, workdir):
    """Write results.md atomically; returns its path."""
    path = os.path.join(workdir, RESULTS_MD)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as handle:
            handle.write(markdown(results))
    return path
