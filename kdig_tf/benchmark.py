"""Honest TFLite latency: LiteRT interpreter timings, model size, parameters, MACs, RSS.

Timings follow TFLite's ``benchmark_model`` names: *init* (load the model, build the
interpreter, apply the default XNNPACK delegate, allocate tensors), *first inference*,
*warmup avg* (over the warmup runs, the first included) and *inference avg* (over the
measured runs), plus median, p90, min and the sample standard deviation (ddof=1; None
for a single run). Only ``invoke()`` is timed; the input is set once.

By default each measurement runs in a fresh subprocess that imports only numpy and
LiteRT (not TensorFlow), so its peak RSS belongs to that one model: in-process,
``ru_maxrss`` is a process-wide high-water mark dominated by TensorFlow itself and
never decreases from one model to the next. The child is also free of TensorFlow's
thread pools, which would otherwise compete with the interpreter for the cores.

Memory (Linux, from ``/proc/self/status``): ``peak_rss_mb`` is the process's overall
peak (VmHWM after the runs, the imports included), the figure ``benchmark_model`` calls
"overall peak memory footprint". ``baseline_rss_mb`` is the *current* resident set
(VmRSS) just before the model is loaded, after numpy and LiteRT are imported.
``model_rss_mb`` is the peak resident set while the model is loaded and run minus that
baseline. In the worker the high-water mark is reset (``/proc/self/clear_refs``) right
after reading the baseline, so the peak counts only the model's phase and
``model_rss_method`` says ``exact``; where the reset is impossible (in-process, where it
would disturb the caller's own accounting, or a kernel that refuses it) the process-wide
peak is used and the figure is an ``upper bound`` (an import that peaked above steady use
inflates it, never hides model memory). Without ``/proc`` (macOS) ``peak_rss_mb`` comes
from ``ru_maxrss`` and ``baseline_rss_mb``/``model_rss_mb`` are None.

``benchmark_models`` times the models in interleaved rounds (A B C, A B C, ...) and
reports medians over rounds and per-round speed-up ratios; see its docstring.

TensorFlow is imported lazily (MAC counting, tables need none of it), which keeps the
subprocess light: ``python -m kdig_tf.benchmark '<json>'`` is the worker entry point.
"""
import kdig_tf  # noqa: F401  (selects tf-keras before TensorFlow loads)

import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

from kdig_tf.errors import InvalidArgumentError, NotAModelError, ShapeMismatchError

LATENCY_KEYS = ("init_ms", "first_inference_ms", "warmup_avg_ms", "inference_avg_ms",
                "inference_median_ms", "inference_p90_ms", "inference_min_ms", "inference_std_ms")
MEMORY_KEYS = ("peak_rss_mb", "baseline_rss_mb", "model_rss_mb", "model_rss_method", "rss_scope")


# --------------------------------------------------------------------------- MACs

def count_macs(model):
    """Multiply-accumulates of one forward pass (batch 1) of a Keras model.

    Counts Conv2D (``H_out*W_out*C_out * k_h*k_w * C_in/groups``), DepthwiseConv2D
    (``H_out*W_out*C_out * k_h*k_w``) and Dense (``inputs * units`` per position). BatchNorm,
    activations, additions and pooling are ignored: they are cheap, and BN folds into
    the convolutions at conversion. Nested models and tfmot wrappers are followed.
    """
    import tf_keras as keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_macs(layer)
            continue
        inner = getattr(layer, "layer", layer)  # tfmot QAT / pruning wrappers
        if isinstance(inner, keras.layers.DepthwiseConv2D):
            _, height, width, channels = layer.output_shape
            total += height * width * channels * int(np.prod(inner.kernel_size))
        elif isinstance(inner, keras.layers.Conv2D):
            _, height, width, channels = layer.output_shape
            in_channels = layer.input_shape[-1]
            total += height * width * channels * int(np.prod(inner.kernel_size)) * in_channels // inner.groups
        elif isinstance(inner, keras.layers.Dense):
            positions = int(np.prod(layer.input_shape[1:-1])) if len(layer.input_shape) > 2 else 1
            total += positions * layer.input_shape[-1] * inner.units
    return int(total)


# --------------------------------------------------------------------------- latency

def _proc_status_mb(field):
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss_mb():
    """Peak resident memory of this process so far (since the last reset), in MiB.

    On Linux this reads VmHWM: ``ru_maxrss`` survives ``exec``, so a worker forked from
    a parent holding TensorFlow would report the parent's ~1 GB peak.
    """
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1.0 / 1024 if sys.platform != "darwin" else 1.0 / (1024 * 1024)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reset_peak_rss():
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _random_input(detail, rng):
    dtype = np.dtype(detail["dtype"])
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=detail["shape"], endpoint=True).astype(dtype)
    return rng.random(detail["shape"], dtype=np.float32).astype(dtype)


def _check_counts(batch_size, num_threads, warmup_runs, num_runs):
    if batch_size < 1 or num_threads < 1 or warmup_runs < 1 or num_runs < 1:
        raise InvalidArgumentError(
            f"batch_size, num_threads, warmup_runs and num_runs must be >= 1, got "
            f"{batch_size}, {num_threads}, {warmup_runs}, {num_runs}")


def _sample_std(values):
    """Sample standard deviation (ddof=1), as elsewhere in the project; None for n < 2."""
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1)) if values.size > 1 else None


def _measure(path, batch_size, num_threads, warmup_runs, num_runs, seed=0, reset_peak=False):
    """Time the interpreter in this process; returns the latency dict (ms) plus memory (MiB).

    ``reset_peak`` resets the process's VmHWM before loading the model so ``model_rss_mb``
    is exact (the worker does; in-process it would clobber the caller's high-water mark).
    """
    from ai_edge_litert.interpreter import Interpreter

    import_peak_rss = _peak_rss_mb()              # Python, numpy, LiteRT: before the model
    baseline_rss = _proc_status_mb("VmRSS")       # resident now, not a peak
    reset = reset_peak and baseline_rss is not None and _reset_peak_rss()
    start = time.perf_counter()
    interpreter = Interpreter(model_path=path, num_threads=num_threads)
    detail = interpreter.get_input_details()[0]
    if int(detail["shape"][0]) != batch_size:
        interpreter.resize_tensor_input(detail["index"], [batch_size, *detail["shape"][1:]])
    interpreter.allocate_tensors()
    init_ms = 1e3 * (time.perf_counter() - start)

    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], _random_input(detail, np.random.default_rng(seed)))

    def timed_invoke():
        begin = time.perf_counter()
        interpreter.invoke()
        return 1e3 * (time.perf_counter() - begin)

    warmup = [timed_invoke() for _ in range(warmup_runs)]
    runs = np.array([timed_invoke() for _ in range(num_runs)])
    after_peak_rss = _peak_rss_mb()               # since the reset if there was one
    peak_rss = max(import_peak_rss, after_peak_rss)
    if baseline_rss is None:
        model_rss, method = None, "unavailable (no /proc/self/status)"
    elif reset:
        model_rss, method = after_peak_rss - baseline_rss, "exact (VmHWM reset before loading the model)"
    else:
        model_rss, method = peak_rss - baseline_rss, "upper bound (process-wide VmHWM, imports included)"
    return {
        "init_ms": init_ms,
        "first_inference_ms": warmup[0],
        "warmup_avg_ms": float(np.mean(warmup)),
        "inference_avg_ms": float(runs.mean()),
        "inference_median_ms": float(np.median(runs)),
        "inference_p90_ms": float(np.percentile(runs, 90)),
        "inference_min_ms": float(runs.min()),
        "inference_std_ms": _sample_std(runs),
        "peak_rss_mb": peak_rss,
        "baseline_rss_mb": baseline_rss,
        "model_rss_mb": model_rss,
        "model_rss_method": method,
    }


def measure_latency(path, batch_size=1, num_threads=1, warmup_runs=5, num_runs=50, isolate=True):
    """Latency (ms) and memory of one ``.tflite`` at one batch size.

    ``isolate`` runs the measurement in a fresh Python that imports no TensorFlow (see
    the module docstring); ``rss_scope`` says which kind of peak RSS was measured.
    """
    batch_size, num_threads, warmup_runs, num_runs = map(int, (batch_size, num_threads, warmup_runs, num_runs))
    _check_counts(batch_size, num_threads, warmup_runs, num_runs)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise NotAModelError(f"no such (or empty) .tflite file: {path}")
    request = dict(path=os.path.abspath(path), batch_size=batch_size, num_threads=num_threads,
                   warmup_runs=warmup_runs, num_runs=num_runs)
    if not isolate:
        try:
            result = _measure(**request)
        except (ValueError, RuntimeError) as err:
            raise NotAModelError(f"LiteRT cannot run {path}: {str(err).splitlines()[0]}") from err
        return dict(result, rss_scope="in-process (high-water mark of the whole process)")
    completed = subprocess.run([sys.executable, "-m", "kdig_tf.benchmark", json.dumps(request)],
                               capture_output=True, text=True, check=False)
    lines = completed.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = completed.stderr.strip().splitlines()[-1:] or ["no output"]
        raise NotAModelError(f"benchmark worker failed on {path}: {tail[0]}") from None
    if "error" in result:
        raise NotAModelError(f"LiteRT cannot run {path}: {result['error']}")
    return dict(result, rss_scope="subprocess (numpy + LiteRT only)")


def _worker_main(argv):
    request = json.loads(argv[1])
    try:
        result = _measure(**request, reset_peak=True)
    except (ValueError, RuntimeError) as err:
        result = {"error": str(err).splitlines()[0] if str(err) else type(err).__name__}
    print(json.dumps(result))


# --------------------------------------------------------------------------- model specs

def parse_model_spec(spec):
    """``teacher``, ``teacher:<width>``, ``student:<keep_blocks or 4.12x>[:<width>]`` -> dict."""
    parts = [part.strip() for part in str(spec).strip().split(":")]
    kind = parts[0]
    try:
        if kind == "teacher" and len(parts) <= 2:
            width = float(parts[1]) if len(parts) == 2 and parts[1] else 1.0
            return {"kind": "teacher", "keep_blocks": None, "compression": None, "width": width,
                    "name": "teacher" + (f"_w{width:g}" if width != 1.0 else "")}
        if kind == "student" and len(parts) in (2, 3) and parts[1]:
            width = float(parts[2]) if len(parts) == 3 and parts[2] else 1.0
            compression = parts[1] if parts[1].endswith("x") else None
            keep_blocks = None if compression else int(parts[1])
            name = f"student_{compression or f'k{keep_blocks}'}" + (f"_w{width:g}" if width != 1.0 else "")
            return {"kind": "student", "keep_blocks": keep_blocks, "compression": compression,
                    "width": width, "name": name}
    except ValueError:
        pass
    raise InvalidArgumentError(
        f"bad model spec {spec!r}; use teacher, teacher:<width>, student:<keep_blocks>[:<width>] "
        "or student:<factor>x[:<width>]")


def build_model(spec, num_classes=10, input_shape=(32, 32, 3)):
    """A randomly initialised Keras model for a parsed (or string) spec."""
    from kdig_tf import models

    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    if spec["kind"] == "teacher":
        return models.build_teacher(num_classes, spec["width"], input_shape)
    return models.build_student(spec["keep_blocks"], spec["compression"], num_classes, spec["width"],
                                input_shape)


# --------------------------------------------------------------------------- tables

ROUND_KEYS = LATENCY_KEYS + ("peak_rss_mb", "baseline_rss_mb", "model_rss_mb")
SPEEDUP_KEYS = (("speedup_vs_reference", "inference_avg_ms"),
                ("median_speedup_vs_reference", "inference_median_ms"))


def benchmark_models(entries, batch_sizes=(1, 64), num_threads=1, warmup_runs=(5,), num_runs=(50,),
                     isolate=True, reference=("teacher", "fp32"), num_rounds=3, measure_fn=None):
    """Measure every ``entries`` model at every batch size; returns the report dict.

    Each entry is a dict with ``name``, ``mode``, ``path`` (.tflite), ``params`` and ``macs``.
    ``warmup_runs``/``num_runs`` give one value per batch size (the last one repeats).

    At each batch size the models are timed in ``num_rounds`` interleaved rounds
    (A B C, A B C, ...; each measurement a fresh ``measure_fn`` call, by default
    ``measure_latency``, i.e. a fresh subprocess). Every row keeps its per-round results
    under ``rounds``. The row's latencies are the median over rounds of each round's
    value (``inference_median_ms`` is the median of per-round medians, ``inference_p90_ms``
    the median of per-round p90s, ``inference_std_ms`` the median of per-round sample SDs,
    and so on for init, first inference, warmup avg and avg), except ``inference_min_ms``,
    the minimum over all rounds. Memory: ``peak_rss_mb`` and ``model_rss_mb`` are the
    maximum over rounds, ``baseline_rss_mb`` the median.

    Speed-ups are relative to the ``reference`` (name, mode) entry at the same batch size:
    in round r the ratio is reference latency in round r / row latency in round r, and
    ``speedup_vs_reference`` (from the avg) and ``median_speedup_vs_reference`` (from the
    median) are the medians of those ratios over rounds, with ``_min``/``_max`` over rounds
    beside them. Models never run at the same time, so load that changes between two
    measurements still shows up in a ratio; interleaving spreads slow drifts over all
    models instead of charging them to whichever model ran during them, and the min-max
    range shows how much the ratio moved. It is not a guarantee that load hit all
    models alike.
    """
    if not entries:
        raise InvalidArgumentError("nothing to benchmark")
    num_rounds = int(num_rounds)
    if num_rounds < 1:
        raise InvalidArgumentError(f"num_rounds must be >= 1, got {num_rounds}")
    measure_fn = measure_fn or measure_latency
    batch_sizes = [int(size) for size in batch_sizes]
    env = environment()
    rows = []
    with CpuCompetition() as competition:  # summarising rows inside costs next to nothing
        for index, batch_size in enumerate(batch_sizes):
            warmup = _per_batch(warmup_runs, index)
            runs = _per_batch(num_runs, index)
            results = [[] for _ in entries]
            for _ in range(num_rounds):
                for position, entry in enumerate(entries):
                    results[position].append(measure_fn(entry["path"], batch_size=batch_size,
                                                        num_threads=num_threads, warmup_runs=warmup, num_runs=runs,
                                                        isolate=isolate))
            for entry, rounds in zip(entries, results):
                summary = _summarise_rounds(rounds)
                rows.append(dict(
                    model=entry["name"], mode=entry["mode"], batch_size=batch_size, num_threads=int(num_threads),
                    warmup_runs=warmup, num_runs=runs, num_rounds=num_rounds,
                    file_size_bytes=os.path.getsize(entry["path"]), params=int(entry["params"]),
                    macs=int(entry["macs"]), path=entry["path"],
                    per_image_ms=summary["inference_avg_ms"] / batch_size, **summary,
                    rounds=[{key: result.get(key) for key in ROUND_KEYS} for result in rounds]))
    _add_speedups(rows, reference)
    env["load_average_end"] = load_average()
    env["measurement_competition"] = competition.summary()
    return {"rows": rows, "reference": {"model": reference[0], "mode": reference[1]}, "num_rounds": num_rounds,
            "environment": env}


def _median(values):
    values = [value for value in values if value is not None]
    return float(np.median(values)) if values else None


def _extreme(function, values):
    values = [value for value in values if value is not None]
    return float(function(values)) if values else None


def _summarise_rounds(rounds):
    """One row's figures from its per-round ``measure_fn`` results (see ``benchmark_models``)."""
    summary = {key: _median([result.get(key) for result in rounds]) for key in LATENCY_KEYS}
    summary["inference_min_ms"] = _extreme(min, [result.get("inference_min_ms") for result in rounds])
    summary["peak_rss_mb"] = _extreme(max, [result.get("peak_rss_mb") for result in rounds])
    summary["baseline_rss_mb"] = _median([result.get("baseline_rss_mb") for result in rounds])
    summary["model_rss_mb"] = _extreme(max, [result.get("model_rss_mb") for result in rounds])
    summary["model_rss_method"] = rounds[0].get("model_rss_method")
    summary["rss_scope"] = rounds[0].get("rss_scope")
    return summary


def _per_batch(values, index):
    values = [int(value) for value in np.atleast_1d(values)]
    return values[min(index, len(values) - 1)]


def _add_speedups(rows, reference):
    """Per-round ratios against the reference row, and their median, min and max over rounds."""
    for row in rows:
        base = next((other for other in rows if other["model"] == reference[0]
                     and other["mode"] == reference[1] and other["batch_size"] == row["batch_size"]), None)
        for key, latency in SPEEDUP_KEYS:
            ratios = []
            for index, result in enumerate(row["rounds"]):
                base_value = base["rounds"][index].get(latency) if base and index < len(base["rounds"]) else None
                value = result.get(latency)
                ratio = base_value / value if base_value is not None and value else None
                result[key] = ratio
                ratios.append(ratio)
            # Medians shrug off the latency spikes of a loaded machine; min/max show the spread.
            row[key] = _median(ratios)
            row[key + "_min"] = _extreme(min, ratios)
            row[key + "_max"] = _extreme(max, ratios)
        row["mac_ratio_vs_reference"] = base["macs"] / row["macs"] if base and row["macs"] else None


def load_average():
    return [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _machine_busy_cpu_seconds():
    """Non-idle CPU time of all processes since boot, from /proc/stat (Linux), or None."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    # steal is time the hypervisor gave to other guests: a competitor too.
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds():
    """CPU time of this process and of its children that have been waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


# Average CPUs other processes may keep busy while we measure before a report calls the machine
# busy (a quiet machine here shows about 0.01-0.05).
QUIET_OTHER_CPUS = 0.2


class CpuCompetition:
    """How much CPU *other* processes used while a measurement ran.

    The load average cannot say this: a timing loop adds its own load to it, and in a sweep that
    trained first the one-minute average still carries the training. Here the machine's non-idle
    CPU time (``/proc/stat``) minus this process's and its finished children's is what others
    took. ``other_cpus`` is that as an average number of busy CPUs (None off Linux).
    Isolated timings run in child processes that are waited for, so they count as our own.
    In a container whose /proc/stat is the host's, other tenants count too (an upper bound).

        with CpuCompetition() as competition:
            ...time models...
        competition.summary()
    """

    def __enter__(self):
        self._start = (_machine_busy_cpu_seconds(), _own_cpu_seconds(), time.monotonic())
        self.other_cpu_seconds = self.wall_seconds = self.other_cpus = None
        return self

    def __exit__(self, *exc_info):
        machine_start, own_start, wall_start = self._start
        machine_end, own_end = _machine_busy_cpu_seconds(), _own_cpu_seconds()
        self.wall_seconds = time.monotonic() - wall_start
        if machine_start is not None and machine_end is not None:
            # Clock ticks are coarse (10 ms), so a small negative difference is rounding, not a gain.
            self.other_cpu_seconds = max(0.0, (machine_end - machine_start) - (own_end - own_start))
            self.other_cpus = self.other_cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else None
        return False

    def summary(self):
        return {"other_processes_cpu_seconds": _round_or_none(self.other_cpu_seconds, 2),
                "other_processes_cpus": _round_or_none(self.other_cpus, 3),
                "wall_seconds": _round_or_none(self.wall_seconds, 2)}


def competition_text(summary, activity="measurements"):
    """'other processes kept N CPUs busy on average during the T s of <activity>', or None if unknown."""
    if not summary or summary.get("other_processes_cpus") is None:
        return None
    return (f"other processes kept {summary['other_processes_cpus']:.2f} CPUs busy on average during the "
            f"{summary['wall_seconds']:.0f} s of {activity}")


def machine_was_busy(summary):
    """True if a ``CpuCompetition.summary()`` shows other processes above ``QUIET_OTHER_CPUS``."""
    other = (summary or {}).get("other_processes_cpus")
    return other is not None and other > QUIET_OTHER_CPUS


def _competition_clause(summary):
    text = competition_text(summary)
    if text is None:
        return ""
    return f"; {text}" + (" (**not a quiet machine**: rerun)" if machine_was_busy(summary) else "")


def _round_or_none(value, digits):
    return None if value is None else round(float(value), digits)


def cpu_model():
    """The CPU's model name (Linux), or None. Sessions here land on AMD and Intel machines alike,
    and latency ratios differ between them, so every benchmark records it."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# /proc/cpuinfo flags that decide which TensorFlow / oneDNN kernels run.
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags(path="/proc/cpuinfo"):
    """The relevant instruction-set flags of the first CPU: {flag: present}, or None off Linux."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return {flag: flag in present for flag in CPU_FLAGS}
    except OSError:
        pass
    return None


def tensorflow_onednn():
    """Whether this process's TensorFlow runs its oneDNN CPU kernels; None if TensorFlow is
    not imported here (asking would import it, and LiteRT timing workers stay TF-free)."""
    if "tensorflow" not in sys.modules:
        return None
    try:
        from tensorflow.python.util import _pywrap_util_port  # no public API tells
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def environment():
    from importlib import metadata

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "load_average": load_average(),
        "ai_edge_litert": metadata.version("ai-edge-litert"),
        "tensorflow": metadata.version("tensorflow"),  # without importing it: workers stay TF-free
        "tensorflow_onednn": tensorflow_onednn(),
        "kdig_tf": kdig_tf.__version__,
    }


MARKDOWN_COLUMNS = (
    ("model", "model", "{}"), ("mode", "mode", "{}"), ("batch", "batch_size", "{}"),
    ("params", "params", "{:,}"), ("MACs (M)", "macs", None), ("size (KB)", "file_size_bytes", None),
    ("init ms", "init_ms", "{:.1f}"), ("first ms", "first_inference_ms", "{:.2f}"),
    ("warmup avg ms", "warmup_avg_ms", "{:.2f}"), ("avg ms", "inference_avg_ms", "{:.2f}"),
    ("median ms", "inference_median_ms", "{:.2f}"), ("p90 ms", "inference_p90_ms", "{:.2f}"),
    ("ms/image", "per_image_ms", "{:.3f}"), ("peak RSS MB", "peak_rss_mb", "{:.1f}"),
    ("speedup (avg)", "speedup_vs_reference", "{:.2f}x"),
    ("speedup (median)", "median_speedup_vs_reference", "{:.2f}x"),
    ("speedup range (median)", "median_speedup_vs_reference_min", None),
)


def to_markdown(report):
    """The report as a Markdown table (plus a line saying what the speed-up is relative to)."""
    header = [title for title, _, _ in MARKDOWN_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        cells = []
        for _, key, fmt in MARKDOWN_COLUMNS:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif key == "macs":
                cells.append(f"{value / 1e6:.1f}")
            elif key == "file_size_bytes":
                cells.append(f"{value / 1024:.0f}")
            elif key == "median_speedup_vs_reference_min":
                cells.append(f"{value:.2f}-{row.get('median_speedup_vs_reference_max', value):.2f}x")
            else:
                cells.append(fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    reference = report["reference"]
    env = report["environment"]
    num_rounds = report.get("num_rounds", report["rows"][0].get("num_rounds", 1))
    lines += [
        "",
        f"Models timed in {num_rounds} interleaved round(s) (A B C, A B C, ...); latencies are the median "
        "over rounds of each round's figure (min: over all rounds).",
        f"Speed-up = median over rounds of (latency of {reference['model']} ({reference['mode']}) in round r / "
        "latency of the row in round r), avg or median, same batch size; range = min-max of the median "
        "ratio over rounds.",
        f"LiteRT {env['ai_edge_litert']} (XNNPACK), {env['cpu_count']} CPUs ({env.get('cpu_model') or env['machine']}), "
        f"load average {env['load_average']} at start, {env.get('load_average_end')} at end"
        f"{_competition_clause(env.get('measurement_competition'))}. "
        f"Peak RSS: {report['rows'][0]['rss_scope']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    _worker_main(sys.argv)


# --------------------------------------------------------------------------- accuracy

def count_correct(predict, batches, total=None, progress=False):
    """(num_correct, num_examples) of ``predict`` over ``(inputs, int labels)`` batches.

    The one place kdig_tf counts top-1 hits: Keras models, .tflite files, the pipeline's
    validation and the evaluate script all come through here.
    """
    from tqdm import tqdm

    correct = count = 0
    with tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for inputs, labels in batches:
            scores = np.asarray(predict(inputs))
            labels = np.asarray(labels).reshape(-1)
            if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
                raise ShapeMismatchError(f"model output has shape {scores.shape}, expected ({labels.shape[0]}, "
                                         "classes)")
            correct += int(np.sum(np.argmax(scores, axis=-1) == labels))
            count += int(labels.shape[0])
            bar.update(int(labels.shape[0]))
    return correct, count


def evaluate_accuracy(predict, examples, preprocess=None, batch_size=256, progress=False):
    """Top-1 accuracy of ``predict`` on ``(uint8 image, label, id)`` examples (``kdig_tf.data.load``).

    ``preprocess`` maps uint8 images to the model's input; by default float pixels, the
    input of every pixel model. Returns {"accuracy" (percent), "num_correct", "num_examples"}.
    """
    import tensorflow as tf

    from kdig_tf import data

    preprocess = preprocess or (lambda images: tf.cast(images, tf.float32))
    batches = (examples.map(lambda image, label, _id: (preprocess(image), label), num_parallel_calls=tf.data.AUTOTUNE)
               .batch(batch_size).prefetch(tf.data.AUTOTUNE))
    total = data.count_examples(examples) if progress else None
    correct, count = count_correct(predict, batches, total=total, progress=progress)
    if count == 0:
        raise InvalidArgumentError("no examples to evaluate on")
    return {"accuracy": 100.0 * correct / count, "num_correct": correct, "num_examples": count}


def keras_predictor(model):
    """Inference-mode forward pass of a Keras model, traced once."""
    import tensorflow as tf

    signature = [tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)]
    return tf.function(lambda inputs: model(inputs, training=False), input_signature=signature)


def tflite_predictor(path, num_threads=None, max_batch=256):
    """(predict, preprocess) of a kdig_tf .tflite: ``preprocess`` maps uint8 images to its input
    as its sidecar describes ([0, 1], mean/std normalised, or pixels)."""
    from kdig_tf import export

    model = export.TFLiteModel(path, num_threads=num_threads or os.cpu_count() or 1, max_batch=max_batch)
    return model.predict, export.sidecar_input_spec(path).from_pixels
