"""Is the teacher worth distilling from? Its accuracy on the validation split, once per run.

A teacher whose BatchNorm statistics are unusable, whose classes are in another order, or
whose preprocessing does not match the data scores at chance in inference mode, and a
student distilled from it learns noise. :func:`check_teacher` measures the teacher on the
validation split before any IG or training, caches the figure in ``teacher_check.json``
(keyed by the teacher's weights fingerprint and the data), and raises ``WeakTeacherError``
when the teacher is not clearly above chance: below ``min_accuracy`` percent, by default
:data:`CHANCE_MULTIPLE` times chance (15 % for 10 classes, 50 % for 3).

A split too small to tell a chance-level teacher from that threshold is reported as
``inconclusive`` rather than judged: the check decides only when a teacher at chance would
measure below the threshold with about 97.7 % probability (two binomial standard
deviations), i.e. with at least 4 c (1 - c) / (t - c)^2 images (c = chance, t = threshold):
144 for 10 classes at the default threshold, 32 for 3 classes.

Only inference runs here: no random op, so the run's random stream and its trained
student are the same with or without the check.
"""
import kdig_tf  # noqa: F401

import math
import os

from kdig_tf.errors import WeakTeacherError
from kdig_tf.io_utils import atomic_write_json, read_json_or_none

TEACHER_CHECK = "teacher_check.json"
# The default threshold, as a multiple of chance accuracy.
CHANCE_MULTIPLE = 1.5
PASSED, WEAK, INCONCLUSIVE = "passed", "weak", "inconclusive"


def chance_accuracy(num_classes):
    """Accuracy in percent of a teacher that guesses (or always names one class of a balanced set)."""
    return 100.0 / num_classes


def threshold(num_classes, min_accuracy=0.0):
    """The accuracy (percent) a teacher must reach: ``min_accuracy`` if > 0, else CHANCE_MULTIPLE x chance."""
    return float(min_accuracy) if min_accuracy > 0 else CHANCE_MULTIPLE * chance_accuracy(num_classes)


def examples_needed(num_classes, threshold_percent):
    """Validation images needed to tell a chance-level teacher from ``threshold_percent`` (2 binomial sd)."""
    chance, target = chance_accuracy(num_classes) / 100.0, threshold_percent / 100.0
    if target <= chance:
        return 0  # a threshold at or below chance never refuses on evidence: nothing to tell apart
    return math.ceil(4.0 * chance * (1.0 - chance) / (target - chance) ** 2 - 1e-9)  # 144, not 144.00000000000003


def verdict(accuracy, num_examples, num_classes, min_accuracy=0.0):
    """(verdict, threshold, examples needed): PASSED, WEAK or INCONCLUSIVE (a split too small to judge)."""
    limit = threshold(num_classes, min_accuracy)
    needed = examples_needed(num_classes, limit)
    if accuracy >= limit:
        return PASSED, limit, needed
    return (WEAK if num_examples >= needed else INCONCLUSIVE), limit, needed


def measure(teacher, val_raw, progress=False):
    """{"accuracy" (percent), "num_correct", "num_examples"} of a pixel-model teacher on (image, label, id) examples."""
    from kdig_tf import benchmark

    return benchmark.evaluate_accuracy(benchmark.keras_predictor(teacher), val_raw, progress=progress)


def check_teacher(teacher, val_raw, num_classes, workdir, key, min_accuracy=0.0, skip=False, progress=False):
    """Measure (or read from ``workdir``'s cache) the teacher on the validation split and judge it.

    ``key`` identifies what is measured (teacher fingerprint, dataset, split, image size); a
    cache with another key is measured again. Returns the record written to
    ``teacher_check.json`` (and kept in results.json). Raises WeakTeacherError for a weak
    teacher unless ``skip``.
    """
    path = os.path.join(workdir, TEACHER_CHECK)
    cached = read_json_or_none(path) if os.path.exists(path) else None
    if isinstance(cached, dict) and cached.get("key") == key and "accuracy" in cached:
        scores = {name: cached[name] for name in ("accuracy", "num_correct", "num_examples")}
    else:
        scores = measure(teacher, val_raw, progress)
    outcome, limit, needed = verdict(scores["accuracy"], scores["num_examples"], num_classes, min_accuracy)
    record = {"key": key, **scores, "num_classes": int(num_classes), "chance": chance_accuracy(num_classes),
              "threshold": limit, "examples_needed": needed, "verdict": outcome, "skipped": bool(skip)}
    atomic_write_json(path, record)
    if outcome == WEAK and not skip:
        raise WeakTeacherError(
            f"the teacher scores {scores['accuracy']:.2f} % on validation split {key.get('val_split')!r} "
            f"({scores['num_examples']} images, {num_classes} classes: chance is {record['chance']:.1f} %), below "
            f"the {limit:.1f} % a teacher must reach (--teacher_min_accuracy). Check its preprocessing (it must take "
            "pixels in [0, 255]), its class order (sorted folder names) and its BatchNorm statistics; "
            "--skip_teacher_check distils from it anyway")
    return record


def describe(record):
    """One line about a check record, for the console."""
    line = (f"teacher: {record['accuracy']:.2f} % on the validation split ({record['num_examples']} images; "
            f"chance {record['chance']:.1f} %, required {record['threshold']:.1f} %)")
    if record["verdict"] == INCONCLUSIVE:
        line += (f": too few images to judge it ({record['examples_needed']} needed), not checked")
    elif record["verdict"] == WEAK:
        line += ": WEAK, distilling anyway (--skip_teacher_check)"
    return line
