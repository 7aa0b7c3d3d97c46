"""Crash-safe file writing: write to a temporary name in the same folder, then rename."""
import contextlib
import csv
import hashlib
import json
import os
import tempfile

from kdig_tf.errors import CorruptRunFileError


@contextlib.contextmanager
def atomic_path(path, prefix=".tmp-"):
    """Yield a temporary path; rename it to ``path`` only if the block succeeds.

    The temporary name starts with ``prefix`` (which should start with ``.tmp-``), so that
    an owner can find the leftovers of a killed writer.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    handle, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    os.close(handle)
    # mkstemp creates 0600; give the final file the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, payload):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(payload)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def holds_files(directory):
    """True if ``directory`` exists and holds a file at any depth (BackupAndRestore leaves an
    empty folder behind when training ends)."""
    return any(files for _, _, files in os.walk(directory))


def read_epoch_log(history_path):
    """A Keras CSVLogger file as {column: [value per epoch]}, one row per epoch.

    kdig_tf logs an epoch before backing it up, so a kill in between makes the resumed
    run log that epoch twice; the later row belongs to the weights that survive. A repeated
    header row (two writers that each found the file empty) is skipped; any other row that
    is not numbers raises CorruptRunFileError naming the file and line.
    """
    if not os.path.exists(history_path):
        return {}
    rows = {}
    with open(history_path, newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            if all(key == value for key, value in row.items()):
                continue
            try:
                if None in row:
                    raise ValueError("more values than columns")
                rows[int(row["epoch"])] = {key: float(value) if value not in ("", None) else float("nan")
                                           for key, value in row.items()}
            except (KeyError, ValueError) as err:
                raise CorruptRunFileError(
                    f"{history_path} line {reader.line_num} is not an epoch row ({err}); remove that line (and the "
                    "rows after the last epoch the run's backup holds) or start a new workdir") from err
    columns = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            columns.setdefault(key, []).append(value)
    return columns


def read_json_or_none(path):
    """The JSON in ``path``, or None if it is missing or unreadable (e.g. an older crash)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def sha256_file(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def subplots(*args, **kwargs):
    """(Figure, axes) drawn off-screen, like ``pyplot.subplots`` but without pyplot.

    No global backend is selected and no figure is registered, so importing or calling
    kdig_tf never changes a notebook's matplotlib state; ``figure.savefig`` writes the file.
    """
    from matplotlib.figure import Figure

    figsize = kwargs.pop("figsize", None)
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*args, **kwargs)
