"""Honest TFLite latency: LiteRT interpreter timings, model size, parameters, MACs, peak RSS.

Timings follow TFLite's ``benchmark_model`` names: *init* (load the model, build the
interpreter, apply the default XNNPACK delegate, allocate tensors), *first inference*,
*warmup avg* (over the warmup runs, the first included) and *inference avg* (over the
measured runs), plus median and p90. Only ``invoke()`` is timed; the input is set once.

By default each measurement runs in a fresh subprocess that imports only numpy and
LiteRT (not TensorFlow), so its peak RSS belongs to that one model: in-process,
``ru_maxrss`` is a process-wide high-water mark dominated by TensorFlow itself and
never decreases from one model to the next. The child is also free of TensorFlow's
thread pools, which would otherwise compete with the interpreter for the cores.

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

from kdig_tf.errors import InvalidArgumentError, NotAModelError

LATENCY_KEYS = ("init_ms", "first_inference_ms", "warmup_avg_ms", "inference_avg_ms",
                "inference_median_ms", "inference_p90_ms", "inference_min_ms", "inference_std_ms")
MEMORY_KEYS = ("peak_rss_mb", "baseline_rss_mb", "model_rss_mb", "rss_scope")


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

def _rss_mb():
    """Peak resident memory of this process so far, in MiB.

    On Linux this reads VmHWM: ``ru_maxrss`` survives ``exec``, so a worker forked from
    a parent holding TensorFlow would report the parent's ~1 GB peak.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1.0 / 1024 if sys.platform != "darwin" else 1.0 / (1024 * 1024)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


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


def _measure(path, batch_size, num_threads, warmup_runs, num_runs, seed=0):
    """Time the interpreter in this process; returns the latency dict (ms) plus RSS."""
    from ai_edge_litert.interpreter import Interpreter

    baseline_rss = _rss_mb()
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
    peak_rss = _rss_mb()
    return {
        "init_ms": init_ms,
        "first_inference_ms": warmup[0],
        "warmup_avg_ms": float(np.mean(warmup)),
        "inference_avg_ms": float(runs.mean()),
        "inference_median_ms": float(np.median(runs)),
        "inference_p90_ms": float(np.percentile(runs, 90)),
        "inference_min_ms": float(runs.min()),
        "inference_std_ms": float(runs.std()),
        "peak_rss_mb": peak_rss,
        "baseline_rss_mb": baseline_rss,
        "model_rss_mb": peak_rss - baseline_rss,
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
        result = _measure(**request)
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

def benchmark_models(entries, batch_sizes=(1, 64), num_threads=1, warmup_runs=(5,), num_runs=(50,),
                     isolate=True, reference=("teacher", "fp32")):
    """Measure every ``entries`` model at every batch size; returns the report dict.

    Each entry is a dict with ``name``, ``mode``, ``path`` (.tflite), ``params`` and ``macs``.
    ``warmup_runs``/``num_runs`` give one value per batch size (the last one repeats).
    Speed-ups are relative to the ``reference`` (name, mode) entry at the same batch size,
    measured in this same call, so background load affects both sides alike.
    """
    if not entries:
        raise InvalidArgumentError("nothing to benchmark")
    batch_sizes = [int(size) for size in batch_sizes]
    env = environment()
    rows = []
    for index, batch_size in enumerate(batch_sizes):
        warmup = _per_batch(warmup_runs, index)
        runs = _per_batch(num_runs, index)
        for entry in entries:
            latency = measure_latency(entry["path"], batch_size, num_threads, warmup, runs, isolate)
            rows.append(dict(
                model=entry["name"], mode=entry["mode"], batch_size=batch_size, num_threads=int(num_threads),
                warmup_runs=warmup, num_runs=runs, file_size_bytes=os.path.getsize(entry["path"]),
                params=int(entry["params"]), macs=int(entry["macs"]), path=entry["path"],
                per_image_ms=latency["inference_avg_ms"] / batch_size, **latency))
    _add_speedups(rows, reference)
    env["load_average_end"] = _load_average()
    return {"rows": rows, "reference": {"model": reference[0], "mode": reference[1]}, "environment": env}


def _per_batch(values, index):
    values = [int(value) for value in np.atleast_1d(values)]
    return values[min(index, len(values) - 1)]


def _add_speedups(rows, reference):
    for row in rows:
        base = next((other for other in rows if other["model"] == reference[0]
                     and other["mode"] == reference[1] and other["batch_size"] == row["batch_size"]), None)
        row["speedup_vs_reference"] = base["inference_avg_ms"] / row["inference_avg_ms"] if base else None
        # The median shrugs off the latency spikes of a loaded machine.
        row["median_speedup_vs_reference"] = (
            base["inference_median_ms"] / row["inference_median_ms"] if base else None)
        row["mac_ratio_vs_reference"] = base["macs"] / row["macs"] if base and row["macs"] else None


def _load_average():
    return [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment():
    from importlib import metadata

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": _load_average(),
        "ai_edge_litert": metadata.version("ai-edge-litert"),
        "tensorflow": metadata.version("tensorflow"),  # without importing it: workers stay TF-free
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
            else:
                cells.append(fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    reference = report["reference"]
    env = report["environment"]
    lines += [
        "",
        f"Speed-up = latency of {reference['model']} ({reference['mode']}) / latency of the row (avg or "
        "median), same batch size, measured in the same run.",
        f"LiteRT {env['ai_edge_litert']} (XNNPACK), {env['cpu_count']} CPUs, {env['machine']}, "
        f"load average {env['load_average']} at start, {env.get('load_average_end')} at end. "
        f"Peak RSS: {report['rows'][0]['rss_scope']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    _worker_main(sys.argv)
