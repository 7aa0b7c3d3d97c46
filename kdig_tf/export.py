"""TFLite export: fp32 / fp16 / dynamic-range / full-int8 conversion, a JSON sidecar,
a LiteRT wrapper, export checks, quantisation-aware training and magnitude pruning.

Every ``.tflite`` gets a sidecar ``<name>.json`` describing how to feed it (input shape,
dtype, quantisation, [0,1] or mean/std input), its labels and where it came from, so
that a device runner needs nothing but the two files (see ``scripts/deploy``).
"""
import kdig_tf  # noqa: F401  (selects tf-keras before TensorFlow loads)

import json
import os

import numpy as np
import tensorflow as tf
import tf_keras as keras

from ai_edge_litert.interpreter import Interpreter

from kdig_tf import guards, models
from kdig_tf.errors import (InvalidArgumentError, NonFiniteOutputError, NotAModelError, ShapeMismatchError,
                            SidecarMismatchError, TFLiteChecksumError, UnknownKeyError, UnsupportedLayerError)
from kdig_tf.io_utils import atomic_path, atomic_write_json, sha256_file

SIDECAR_FORMAT = "kdig_tf.tflite_sidecar"
SIDECAR_VERSION = 1
# unit: pixels / 255; normalized: (pixels / 255 - mean) / std; pixels: float pixels as they are.
INPUT_KINDS = ("unit", "normalized", "pixels")
IMAGE_CHANNELS = (1, 3)
# Name of the TFLite metadata entry holding the labels (newline-separated UTF-8).
LABELS_METADATA_NAME = "kdig_labels"
TFLITE_IDENTIFIER = b"TFL3"


# --------------------------------------------------------------------------- conversion

def _set_fp32(converter, representative, int8_io):
    return {"optimizations": [], "supported_types": []}


def _set_fp16(converter, representative, int8_io):
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
    return {"optimizations": ["DEFAULT"], "supported_types": ["float16"]}


def _set_dynamic(converter, representative, int8_io):
    # Weights stored as int8, activations quantised on the fly at run time.
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return {"optimizations": ["DEFAULT"], "supported_types": []}


def _set_int8(converter, representative, int8_io):
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    options = {"optimizations": ["DEFAULT"], "supported_types": []}
    if representative is not None:
        def generate():
            for image in representative:
                yield [image[None]]
        converter.representative_dataset = generate
        # Fail the conversion rather than silently leave float ops in an "int8" model. Not
        # for QAT models without calibration data: the converter then wrongly demands a
        # representative dataset, and their fake-quant nodes already make every op int8.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        options["supported_ops"] = ["TFLITE_BUILTINS_INT8"]
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return options


CONVERSION_MODES = {
    "fp32": _set_fp32,
    "fp16": _set_fp16,
    "dynamic": _set_dynamic,
    "int8": _set_int8,
}


def sidecar_path(tflite_path):
    return os.path.splitext(tflite_path)[0] + ".json"


def image_input_shape(model):
    """(height, width, channels) of a single-input NHWC image model, else ShapeMismatchError."""
    if not isinstance(model, keras.Model):
        raise NotAModelError(f"expected a tf-keras Model, got {type(model).__name__}")
    if len(model.inputs) != 1:
        raise ShapeMismatchError(f"expected one image input, model has {len(model.inputs)} inputs")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[-1] not in IMAGE_CHANNELS or None in shape[1:]:
        raise ShapeMismatchError(
            f"expected an NHWC image input with fixed H, W and C in {IMAGE_CHANNELS}, got {shape}")
    return tuple(int(dim) for dim in shape[1:])


def representative_from_split(ds, preprocess, n=256):
    """First ``n`` images of a split as a float32 array, already preprocessed for the model.

    ``ds`` yields ``(image, label, id)`` tuples (as ``kdig_tf.data.load``), ``(image, ...)``
    tuples or bare images; ``preprocess`` maps a uint8 image to the model's input.
    """
    if int(n) < 1:
        raise InvalidArgumentError(f"n must be >= 1, got {n}")
    images = ds.take(int(n)).map(lambda *element: preprocess(element[0]))
    arrays = list(images.as_numpy_iterator())
    if not arrays:
        raise InvalidArgumentError("the representative split is empty")
    return np.stack(arrays).astype(np.float32)


def _representative_array(images, expected_hwc):
    """Stack images or batches into (N, H, W, C) float32, checking every element's shape."""
    if isinstance(images, np.ndarray) or tf.is_tensor(images):
        images = [images]  # one array: a batch, or a single image
    chunks = []
    for element in images:  # else an iterable of images or batches (e.g. a tf.data.Dataset)
        element = np.asarray(element, np.float32)
        if element.ndim == 3:
            element = element[None]
        if element.ndim != 4 or element.shape[1:] != expected_hwc:
            raise ShapeMismatchError(
                f"representative images must be (H, W, C) = {expected_hwc} or batches of them, "
                f"got an element of shape {element.shape}")
        chunks.append(element)
    if not chunks or sum(len(chunk) for chunk in chunks) == 0:
        raise InvalidArgumentError("the representative dataset is empty")
    return np.concatenate(chunks)


def is_quantization_aware(model):
    """True for a model returned by ``quantize_aware`` (its quant ranges are already learned)."""
    return any(type(layer).__name__ in ("QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer")
               for layer in model.layers)


def convert(model, path, mode, representative_images=None, int8_io=False, input_kind="unit",
            labels=None, mean=None, std=None, embed_labels=True):
    """Convert a Keras image classifier to ``path`` (.tflite) plus ``<name>.json``; return the sidecar.

    ``representative_images``: float images already preprocessed for the model (draw them
    from the training split, e.g. with ``representative_from_split``); required for
    ``int8`` unless the model is quantisation-aware. ``int8_io`` makes the int8 model take
    and return int8 tensors instead of float ones. ``input_kind`` records what the model
    expects: "unit" ([0,1] pixels), "normalized" ((x - mean) / std, CIFAR-10 stats by default)
    or "pixels" ([0, 255] floats, for a model that does its own preprocessing).
    """
    if mode not in CONVERSION_MODES:
        raise UnknownKeyError(f"unknown conversion mode {mode!r}; known: {sorted(CONVERSION_MODES)}")
    if input_kind not in INPUT_KINDS:
        raise UnknownKeyError(f"unknown input_kind {input_kind!r}; known: {list(INPUT_KINDS)}")
    hwc = image_input_shape(model)
    guards.check_finite_weights(model, "the model to export")  # a diverged model would export and classify NaNs
    quantization_aware = is_quantization_aware(model)
    if int8_io and mode != "int8":
        raise InvalidArgumentError("int8_io needs mode='int8'")
    representative = None
    if representative_images is not None:
        representative = _representative_array(representative_images, hwc)
    if mode == "int8" and representative is None and not quantization_aware:
        raise InvalidArgumentError("mode 'int8' needs representative_images (or a quantisation-aware model)")
    mean, std = _normalisation(input_kind, mean, std, hwc[-1])
    if labels is not None:
        labels = [str(label) for label in labels]
        outputs = int(model.outputs[0].shape[-1])
        if len(labels) != outputs:
            raise ShapeMismatchError(f"{len(labels)} labels for a model with {outputs} outputs")

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    options = CONVERSION_MODES[mode](converter, representative, int8_io)
    try:
        payload = bytes(converter.convert())
    except Exception as err:  # the converter raises many unrelated types
        raise NotAModelError(f"TFLite conversion ({mode}) failed: {str(err).splitlines()[0]}") from err
    labels_embedded = False
    if labels and embed_labels:
        payload, labels_embedded = _embed_labels(payload, labels)

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(payload)
        model_io = _io_spec(Interpreter(model_path=tmp))
    sidecar = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "model_file": os.path.basename(path),
        "tflite_sha256": sha256_file(path),
        "input": dict(model_io["input"], input_kind=input_kind, mean=mean, std=std),
        "output": model_io["output"],
        "labels": labels,
        "labels_embedded": labels_embedded,
        "source_model": {
            "name": model.name,
            "weights_sha256": models.weights_fingerprint(model),
            # Trainable only, as everywhere else in kdig_tf (count_params adds BN statistics).
            "params": models.count_trainable_params(model),
            "params_including_non_trainable": int(model.count_params()),
        },
        "conversion": dict(
            options, mode=mode, int8_io=bool(int8_io), quantization_aware=quantization_aware,
            num_representative=0 if representative is None else int(len(representative))),
        "kdig_tf_version": kdig_tf.__version__,
        "tensorflow_version": tf.__version__,
    }
    atomic_write_json(sidecar_path(path), sidecar)
    return sidecar


def _normalisation(input_kind, mean, std, channels):
    if input_kind in ("unit", "pixels"):
        if mean is not None or std is not None:
            raise InvalidArgumentError("mean/std only apply to input_kind='normalized'")
        return None, None
    if mean is None and std is None:
        mean, std = models.CIFAR10_MEAN, models.CIFAR10_STD
    if mean is None or std is None:
        raise InvalidArgumentError("give both mean and std")
    mean = [float(value) for value in np.ravel(mean)]
    std = [float(value) for value in np.ravel(std)]
    if len(mean) != channels or len(std) != channels:
        raise ShapeMismatchError(f"mean/std need {channels} values, got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise InvalidArgumentError(f"std must be > 0, got {std}")
    return mean, std


def _tensor_spec(detail):
    scale, zero_point = detail["quantization"]
    return {
        "name": detail["name"],
        "shape": [int(dim) for dim in detail["shape"]],
        "dtype": np.dtype(detail["dtype"]).name,
        # LiteRT reports (0.0, 0) for float tensors.
        "quantization": {"scale": float(scale), "zero_point": int(zero_point)} if scale else None,
    }


def _io_spec(interpreter):
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise NotAModelError(f"expected one input and one output, got {len(inputs)} and {len(outputs)}")
    return {"input": _tensor_spec(inputs[0]), "output": _tensor_spec(outputs[0])}


def _embed_labels(payload, labels):
    """Add a ``kdig_labels`` metadata entry; returns (payload, embedded?).

    The standard TFLite-Support metadata needs the ``tflite-support`` package, which this
    stack lacks; a plain named metadata buffer needs only the flatbuffer schema that ships
    with ai-edge-litert, and every interpreter ignores metadata it does not know.
    """
    try:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils

        tree = flatbuffer_utils.read_model_from_bytearray(bytearray(payload))
        tree.buffers.append(schema.BufferT())
        tree.buffers[-1].data = np.frombuffer("\n".join(labels).encode(), np.uint8)
        entry = schema.MetadataT()
        entry.name = LABELS_METADATA_NAME
        entry.buffer = len(tree.buffers) - 1
        tree.metadata = (tree.metadata or []) + [entry]
        return bytes(flatbuffer_utils.convert_object_to_bytearray(tree)), True
    except Exception:  # optional nicety: keep the plain model if the schema tools misbehave
        return payload, False


def read_embedded_labels(path):
    """Labels stored by ``convert`` in the .tflite metadata, or None."""
    from ai_edge_litert import schema_py_generated as schema

    payload = _read_tflite_bytes(path)
    tree = schema.Model.GetRootAs(payload, 0)
    for index in range(tree.MetadataLength()):
        entry = tree.Metadata(index)
        if entry.Name().decode() == LABELS_METADATA_NAME:
            return bytes(tree.Buffers(entry.Buffer()).DataAsNumpy()).decode().split("\n")
    return None


# --------------------------------------------------------------------------- running

def _read_tflite_bytes(path):
    if not os.path.isfile(path):
        raise NotAModelError(f"no such .tflite file: {path}")
    with open(path, "rb") as handle:
        payload = handle.read()
    if len(payload) < 8 or payload[4:8] != TFLITE_IDENTIFIER:
        raise NotAModelError(f"{path} is empty or not a TFLite flatbuffer")
    return payload


def verify_tflite(path):
    """Raise TFLiteChecksumError if ``path``'s sidecar records a ``tflite_sha256`` its bytes do not have.

    A model without a kdig_tf sidecar has nothing to verify; an unreadable sidecar is a NotAModelError.
    """
    json_path = sidecar_path(path)
    if not os.path.isfile(json_path):
        return
    try:
        with open(json_path) as handle:
            sidecar = json.load(handle)
    except (OSError, ValueError) as err:
        raise NotAModelError(f"unreadable sidecar {json_path}: {err} (verify=False skips the check)") from err
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        return  # a JSON file of something else that shares the model's name
    recorded, found = sidecar.get("tflite_sha256"), sha256_file(path)
    if recorded != found:
        raise TFLiteChecksumError(f"{path} has sha256 {found}, its sidecar {json_path} records {recorded}: the file "
                                  "was damaged or edited after export (verify=False runs it anyway)")


class TFLiteModel:
    """A ``.tflite`` classifier on the LiteRT interpreter that takes and returns floats.

    ``predict`` quantises float inputs for int8-input models, dequantises int8 outputs
    and resizes the batch dimension as needed; outputs that are not finite raise
    NonFiniteOutputError. With ``verify`` (the default) a model whose sidecar records
    another ``tflite_sha256`` is refused (TFLiteChecksumError) before it runs.
    """

    def __init__(self, path, num_threads=1, max_batch=64, verify=True):
        _read_tflite_bytes(path)
        if verify:
            verify_tflite(path)
        try:
            self.interpreter = Interpreter(model_path=path, num_threads=int(num_threads))
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise NotAModelError(f"LiteRT cannot load {path}: {str(err).splitlines()[0]}") from err
        self.path = path
        self.max_batch = int(max_batch)
        spec = _io_spec(self.interpreter)
        self.input_spec, self.output_spec = spec["input"], spec["output"]
        self._input_index = self.interpreter.get_input_details()[0]["index"]
        self._output_index = self.interpreter.get_output_details()[0]["index"]
        self._batch = self.input_spec["shape"][0]

    @property
    def input_shape(self):
        """(height, width, channels)."""
        return tuple(self.input_spec["shape"][1:])

    @property
    def input_dtype(self):
        return np.dtype(self.input_spec["dtype"])

    def reduced_precision_dtypes(self):
        """Sorted names of the graph's non-float32 tensor types that carry data (e.g. int8, float16).

        Empty for a pure fp32 model. Integer index tensors (int32 shapes, int64) do not count.
        """
        found = {np.dtype(detail["dtype"]).name for detail in self.interpreter.get_tensor_details()}
        return sorted(found & {"int8", "uint8", "int16", "float16"})

    def _resize(self, batch):
        if batch != self._batch:
            self.interpreter.resize_tensor_input(self._input_index, [batch, *self.input_shape])
            self.interpreter.allocate_tensors()
            self._batch = batch

    def predict(self, images):
        """Float images (N, H, W, C) or one (H, W, C), preprocessed as the Keras model's -> float logits."""
        images = np.asarray(images, np.float32)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1:] != self.input_shape:
            raise ShapeMismatchError(f"expected images of shape (N, {self.input_shape}), got {images.shape}")
        outputs = [self._predict_batch(images[start:start + self.max_batch])
                   for start in range(0, len(images), self.max_batch)]
        return np.concatenate(outputs) if outputs else np.zeros((0, *self.output_spec["shape"][1:]), np.float32)

    def _predict_batch(self, batch):
        self._resize(len(batch))
        self.interpreter.set_tensor(self._input_index, quantize(batch, self.input_spec))
        self.interpreter.invoke()
        outputs = dequantize(self.interpreter.get_tensor(self._output_index), self.output_spec)
        if not np.all(np.isfinite(outputs)):
            raise NonFiniteOutputError(f"{self.path} gives NaN or Inf outputs: its weights are damaged or it was "
                                       "exported from a diverged model")
        return outputs


def quantize(values, spec):
    """Float array -> the tensor's dtype, using its (scale, zero_point) when quantised."""
    dtype = np.dtype(spec["dtype"])
    if spec["quantization"] is None:
        return values.astype(dtype)
    info = np.iinfo(dtype)
    scaled = np.round(values / spec["quantization"]["scale"]) + spec["quantization"]["zero_point"]
    return np.clip(scaled, info.min, info.max).astype(dtype)


def dequantize(values, spec):
    if spec["quantization"] is None:
        return values.astype(np.float32)
    quant = spec["quantization"]
    return ((values.astype(np.float32) - quant["zero_point"]) * quant["scale"]).astype(np.float32)


def load_sidecar(path):
    """Read the sidecar of ``path`` (.tflite or .json) and check it describes the .tflite next to it."""
    json_path = sidecar_path(path)
    tflite_path = path if not path.endswith(".json") else None
    try:
        with open(json_path) as handle:
            sidecar = json.load(handle)
    except FileNotFoundError as err:
        raise NotAModelError(f"no sidecar {json_path} next to the model") from err
    except (OSError, ValueError) as err:
        raise NotAModelError(f"unreadable sidecar {json_path}: {err}") from err
    if (not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT
            or not isinstance(sidecar.get("input"), dict)):
        raise NotAModelError(f"{json_path} is not a kdig_tf sidecar")
    if tflite_path is None:
        tflite_path = os.path.join(os.path.dirname(json_path), sidecar.get("model_file", ""))
    actual = TFLiteModel(tflite_path, verify=False)  # the input is compared first, then the hash below
    for key in ("shape", "dtype", "quantization"):
        expected = sidecar["input"].get(key)
        if key == "shape":
            # The batch dimension is resizable; compare H, W, C only.
            expected, found = expected[1:] if expected else expected, actual.input_spec[key][1:]
        else:
            found = actual.input_spec[key]
        if expected != found:
            raise SidecarMismatchError(
                f"sidecar {json_path} says input {key} {expected}, {tflite_path} has {found}")
    if sidecar.get("tflite_sha256") not in (None, sha256_file(tflite_path)):
        raise TFLiteChecksumError(f"sidecar {json_path} was written for a different {tflite_path} (its tflite_sha256 "
                                  "differs: the .tflite was damaged, edited or replaced)")
    return sidecar


def sidecar_input_spec(path, required=True):
    """The :class:`models.InputSpec` the sidecar of the .tflite ``path`` records.

    "normalized" without statistics means the CIFAR-10 ones (sidecars written before they
    were recorded). With ``required=False`` a model without a sidecar gives None; a sidecar
    that exists but is unreadable or invalid always raises rather than fall back to a guess.
    """
    json_path = sidecar_path(path)
    if not required and not os.path.isfile(json_path):
        return None
    recorded = load_sidecar(path)["input"]
    kind = recorded.get("input_kind")
    if kind not in INPUT_KINDS:
        raise NotAModelError(f"sidecar {json_path} has input_kind {kind!r}, expected one of {list(INPUT_KINDS)}")
    if kind != "normalized":
        return models.InputSpec(kind)
    mean, std = recorded.get("mean"), recorded.get("std")
    if mean is None and std is None:
        return models.CIFAR10_TEACHER_INPUT
    try:
        return models.InputSpec(kind, tuple(float(value) for value in mean), tuple(float(value) for value in std))
    except (TypeError, ValueError, InvalidArgumentError) as err:
        raise NotAModelError(f"sidecar {json_path} has an invalid mean/std: {err}") from err


def check_export(keras_model, tflite_path, images, labels):
    """Compare a converted model with its Keras source on preprocessed float ``images``."""
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels).reshape(-1)
    if len(images) != len(labels) or len(images) == 0:
        raise ShapeMismatchError(f"{len(images)} images but {len(labels)} labels (need the same, > 0)")
    reference = keras_model.predict(images, batch_size=64, verbose=0)
    if not np.all(np.isfinite(reference)):
        raise NonFiniteOutputError(f"the Keras model behind {tflite_path} gives NaN or Inf logits")
    lite = TFLiteModel(tflite_path)
    logits = lite.predict(images)  # NonFiniteOutputError for NaN or Inf logits
    if logits.shape != reference.shape:
        raise ShapeMismatchError(f"tflite logits {logits.shape} vs keras {reference.shape}")
    keras_top1, lite_top1 = reference.argmax(-1), logits.argmax(-1)
    reduced = lite.reduced_precision_dtypes()
    return {
        "num_images": int(len(images)),
        "keras_accuracy": float(np.mean(keras_top1 == labels)),
        "tflite_accuracy": float(np.mean(lite_top1 == labels)),
        "top1_agreement": float(np.mean(keras_top1 == lite_top1)),
        # Meaningful for float models; for quantised ones it shows the quantisation error.
        "max_abs_logit_diff": float(np.max(np.abs(logits - reference))),
        # An int8 model with float I/O has unquantised I/O tensors, so look inside the graph.
        "float_io": lite.input_spec["quantization"] is None and lite.output_spec["quantization"] is None,
        "float_model": not reduced,
        "reduced_precision_dtypes": reduced,
    }


def evaluate_tflite(path, images, labels, num_threads=None, batch_size=256):
    """Top-1 accuracy (percent) of a .tflite on preprocessed float ``images`` with LiteRT.

    Large batches keep the interpreter busy: 5,000 CIFAR images take seconds, not minutes.
    """
    from kdig_tf import benchmark

    images = np.asarray(images, np.float32)
    labels = np.asarray(labels).reshape(-1)
    if len(images) != len(labels) or len(images) == 0:
        raise ShapeMismatchError(f"{len(images)} images but {len(labels)} labels (need the same, > 0)")
    lite = TFLiteModel(path, num_threads=num_threads or os.cpu_count() or 1, max_batch=batch_size)
    batches = ((images[start:start + batch_size], labels[start:start + batch_size])
               for start in range(0, len(images), batch_size))
    correct, count = benchmark.count_correct(lite.predict, batches)
    return 100.0 * correct / count


# What convert writes to describe the file itself; later additions may not change it.
_SIDECAR_CORE = ("format", "format_version", "model_file", "tflite_sha256", "input", "output")


def add_to_sidecar(path, **fields):
    """Add ``fields`` (e.g. an accuracy) to the sidecar of ``path``; returns the new sidecar.

    The .tflite is not touched, so the recorded ``tflite_sha256`` stays valid.
    """
    clash = sorted(set(fields) & set(_SIDECAR_CORE))
    if clash:
        raise InvalidArgumentError(f"sidecar fields {clash} describe the file itself and cannot be replaced")
    sidecar = dict(load_sidecar(path), **fields)
    atomic_write_json(sidecar_path(path), sidecar)
    return sidecar


# --------------------------------------------------------------------------- QAT and pruning

def quantize_aware(model):
    """Wrap a tf-keras model for quantisation-aware training (fake-quant, BN folded into convs).

    MobileNetV2's layers (Conv2D/DepthwiseConv2D + BatchNormalization + ReLU(6), Add,
    ZeroPadding2D, GlobalAveragePooling2D, Dense, Dropout) are all in tfmot's default
    8-bit registry, so no QuantizeConfig is needed.
    """
    import tensorflow_model_optimization as tfmot

    image_input_shape(model)
    try:
        return tfmot.quantization.keras.quantize_model(model)
    except RuntimeError as err:  # tfmot's message for a layer type it cannot quantise
        raise UnsupportedLayerError(str(err).splitlines()[0]) from err


def _default_fit(model, dataset, epochs=1, learning_rate=1e-4, callbacks=()):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model.fit(dataset, epochs=epochs, callbacks=list(callbacks), verbose=0)


def fine_tune(model, dataset, epochs=1, fit_fn=None, learning_rate=1e-4, callbacks=()):
    """Train ``model`` on batched ``(image, int label)`` data; returns the model.

    ``fit_fn(model, dataset)`` replaces the default (Adam + cross-entropy on logits), e.g.
    with distillation; when ``callbacks`` is not empty (pruning) it is called as
    ``fit_fn(model, dataset, callbacks=callbacks)`` and must pass them to ``fit``.
    """
    if int(epochs) < 1:
        raise InvalidArgumentError(f"epochs must be >= 1, got {epochs}")
    if fit_fn is None:
        _default_fit(model, dataset, int(epochs), learning_rate, callbacks)
    elif callbacks:
        fit_fn(model, dataset, callbacks=list(callbacks))
    else:
        fit_fn(model, dataset)
    return model


def _count_batches(dataset):
    batches = int(dataset.cardinality())
    if batches < 0:
        batches = int(dataset.reduce(0, lambda count, *_: count + 1))
    if batches == 0:
        raise InvalidArgumentError("the fine-tuning dataset is empty")
    return batches


def prune(model, dataset, target_sparsity=0.5, epochs=1, fit_fn=None, learning_rate=1e-4,
          frequency=100, begin_step=0):
    """Magnitude-prune Conv2D/Dense kernels to ``target_sparsity`` while fine-tuning.

    Sparsity ramps from 0 to the target with a PolynomialDecay schedule over the training
    steps, then the pruning wrappers are stripped: the returned plain model has the zeros
    baked into its kernels (depthwise kernels are not pruned by tfmot). ``model`` itself
    is left untouched.
    """
    import tensorflow_model_optimization as tfmot

    if not 0.0 < float(target_sparsity) < 1.0:
        raise InvalidArgumentError(f"target_sparsity must be in (0, 1), got {target_sparsity}")
    image_input_shape(model)
    total_steps = _count_batches(dataset) * int(epochs)
    # Leave one spare step so the last scheduled mask update surely runs.
    last_step = max(total_steps - 2, begin_step)
    frequency = max(1, min(int(frequency), last_step - begin_step))
    end_step = begin_step + (last_step - begin_step) // frequency * frequency
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=float(target_sparsity), begin_step=begin_step,
        end_step=end_step, frequency=frequency)
    # prune_low_magnitude wraps the caller's layer objects, so training would prune them too.
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(copy, pruning_schedule=schedule)
    fine_tune(wrapped, dataset, epochs, fit_fn, learning_rate,
              callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    return tfmot.sparsity.keras.strip_pruning(wrapped)


def _kernels(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _kernels(layer)
            continue
        inner = getattr(layer, "layer", layer)  # pruning / quantisation wrappers
        if isinstance(inner, keras.layers.DepthwiseConv2D):
            continue
        if isinstance(inner, (keras.layers.Conv2D, keras.layers.Dense)):
            yield inner.kernel


def sparsity(model):
    """Fraction of exactly-zero weights over all Conv2D and Dense kernels (depthwise excluded)."""
    zeros = total = 0
    for kernel in _kernels(model):
        values = keras.backend.get_value(kernel)
        zeros += int(np.count_nonzero(values == 0))
        total += values.size
    if total == 0:
        raise InvalidArgumentError("the model has no Conv2D or Dense kernels")
    return zeros / total
