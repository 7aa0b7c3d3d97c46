#!/usr/bin/env python3
"""Classify images with a kdig_tf ``.tflite`` model on a device (Raspberry Pi, Termux...).

    python run_tflite.py student_int8.tflite photo.jpg more_photos/ --top_k 3
    python run_tflite.py student_int8.tflite val_images/   # val_images/<class name>/*.png: prints an accuracy

Standalone on purpose: needs only numpy, Pillow and either ``ai-edge-litert`` or
``tflite-runtime`` (no TensorFlow, no kdig_tf). Preprocessing comes from the sidecar
``<model>.json`` written at export: resize to the input size, scale to [0, 1], apply
mean/std for "normalized" models, quantise for int8-input models.

Before it runs, the model's sha256 must match the sidecar's ``tflite_sha256`` (a damaged
or edited file is refused; ``--no_verify`` skips the check). Folders are searched
recursively; when the folders directly inside a folder given on the command line are all
named after the model's labels, their images are scored and an accuracy line is printed.
A model whose outputs are NaN or Inf is an error, never a label. Errors are one line,
``error: <Name>: <message>``, with exit code 2.
"""
import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

EXIT_BAD_INPUT = 2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


class RunnerError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


class UsageError(RunnerError):
    """The command line cannot be parsed, or an option is out of range."""


class MissingDependencyError(RunnerError):
    """Neither ai-edge-litert nor tflite-runtime is installed."""


class SidecarError(RunnerError):
    """The sidecar JSON is missing, unreadable, or describes another model."""


class TFLiteChecksumError(RunnerError):
    """The .tflite's sha256 is not the tflite_sha256 its sidecar records."""


class ModelLoadError(RunnerError):
    """The .tflite file is missing or the interpreter cannot load it."""


class ImageError(RunnerError):
    """An image path does not exist or cannot be decoded, or no images were found."""


class NonFiniteOutputError(RunnerError):
    """The model's outputs hold NaN or Inf, so they name no class."""


def load_interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise MissingDependencyError("neither ai-edge-litert nor tflite-runtime is installed "
                                         "(pip install ai-edge-litert)") from None
    return Interpreter


def read_sidecar(model_path, sidecar_path=None):
    sidecar_path = sidecar_path or os.path.splitext(model_path)[0] + ".json"
    try:
        with open(sidecar_path) as handle:
            sidecar = json.load(handle)
        spec = sidecar["input"]
        if spec["input_kind"] not in ("unit", "normalized", "pixels"):
            raise SidecarError(f"unknown input_kind {spec['input_kind']!r} in {sidecar_path}")
        return sidecar
    except FileNotFoundError:
        raise SidecarError(f"no sidecar {sidecar_path} (copy the .json next to the .tflite)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SidecarError(f"unreadable sidecar {sidecar_path}: {err}") from None


def verify_model(model_path, sidecar):
    """Refuse a model whose bytes are not the ones the sidecar was written for."""
    if not os.path.isfile(model_path):
        raise ModelLoadError(f"no such model file: {model_path}")
    digest = hashlib.sha256()
    with open(model_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    recorded = sidecar.get("tflite_sha256")
    if recorded != digest.hexdigest():
        what = f"its sidecar records {recorded}" if recorded else "its sidecar records no tflite_sha256"
        raise TFLiteChecksumError(f"{model_path} has sha256 {digest.hexdigest()}, {what}: the file was damaged "
                                  "or edited after export (--no_verify runs it anyway)")


def load_model(model_path, num_threads):
    if not os.path.isfile(model_path):
        raise ModelLoadError(f"no such model file: {model_path}")
    interpreter_class = load_interpreter_class()
    try:
        interpreter = interpreter_class(model_path=model_path, num_threads=num_threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        raise ModelLoadError(f"cannot load {model_path}: {str(err).splitlines()[0]}") from None
    return interpreter


def check_sidecar(interpreter, sidecar):
    detail = interpreter.get_input_details()[0]
    shape, dtype = list(detail["shape"][1:]), np.dtype(detail["dtype"]).name
    if list(sidecar["input"]["shape"][1:]) != shape or sidecar["input"]["dtype"] != dtype:
        raise SidecarError(f"sidecar describes input {sidecar['input']['shape']} {sidecar['input']['dtype']}, "
                           f"the model has {[1] + shape} {dtype}")


def images_under(folder):
    """Image files at any depth under ``folder``, in a stable order."""
    found = []
    for root, folders, names in os.walk(folder):
        folders.sort()
        found += [os.path.join(root, name) for name in sorted(names) if name.lower().endswith(IMAGE_SUFFIXES)]
    return found


def find_images(paths, labels=None):
    """[(image path, true label or None)]: files as given, folders searched recursively.

    An image's true label is the name of the folder it sits under directly inside a folder
    given here, when that folder's subfolders are all named after ``labels``.
    """
    images = []
    for path in paths:
        if os.path.isdir(path):
            subfolders = sorted(name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name)))
            labelled = bool(labels) and bool(subfolders) and set(subfolders) <= set(labels)
            for image in images_under(path):
                relative = os.path.relpath(image, path).split(os.sep)
                images.append((image, relative[0] if labelled and len(relative) > 1 else None))
        elif os.path.isfile(path):
            images.append((path, None))
        else:
            raise ImageError(f"no such file or folder: {path}")
    if not images:
        raise ImageError(f"no images found in {paths}")
    return images


def preprocess(image_path, spec):
    """Image file -> input tensor [1, H, W, C] in the model's dtype."""
    from PIL import Image, UnidentifiedImageError

    _, height, width, channels = spec["shape"]
    try:
        with Image.open(image_path) as image:
            image = image.convert("RGB" if channels == 3 else "L")
            if image.size != (width, height):
                image = image.resize((width, height), Image.BILINEAR)
            pixels = np.asarray(image, np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as err:
        raise ImageError(f"cannot read image {image_path}: {err}") from None
    pixels = pixels.reshape(1, height, width, channels)
    if spec["input_kind"] == "pixels":  # a model that scales its own input
        pixels = pixels * 255.0
    elif spec["input_kind"] == "normalized":
        pixels = (pixels - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    dtype = np.dtype(spec["dtype"])
    if spec.get("quantization"):
        info = np.iinfo(dtype)
        scaled = np.round(pixels / spec["quantization"]["scale"]) + spec["quantization"]["zero_point"]
        return np.clip(scaled, info.min, info.max).astype(dtype)
    return pixels.astype(dtype)


def softmax(logits):
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def classify(interpreter, sidecar, images, top_k):
    """One result per (image path, true label or None) of :func:`find_images`."""
    input_index = interpreter.get_input_details()[0]["index"]
    output = interpreter.get_output_details()[0]
    scale, zero_point = output["quantization"]
    labels = sidecar.get("labels") or None
    results = []
    for path, true_label in images:
        interpreter.set_tensor(input_index, preprocess(path, sidecar["input"]))
        start = time.perf_counter()
        interpreter.invoke()
        latency_ms = 1e3 * (time.perf_counter() - start)
        logits = interpreter.get_tensor(output["index"])[0].astype(np.float32)
        if scale:
            logits = (logits - zero_point) * scale
        if not np.all(np.isfinite(logits)):
            raise NonFiniteOutputError(f"the model gives NaN or Inf outputs for {path}: its weights are damaged or "
                                       "it was exported from a diverged model")
        probabilities = softmax(logits)
        best = np.argsort(-probabilities, kind="stable")[:top_k]
        result = {
            "image": path,
            "latency_ms": latency_ms,
            "top_k": [{"index": int(index),
                       "label": labels[index] if labels else str(int(index)),
                       "probability": float(probabilities[index])} for index in best],
        }
        if true_label is not None:
            result["true_label"] = true_label
        results.append(result)
    return results


def accuracy(results):
    """{"correct", "total", "accuracy"} over the images with a true label (from class folders), else None."""
    scored = [result for result in results if "true_label" in result]
    if not scored:
        return None
    correct = sum(result["top_k"][0]["label"] == result["true_label"] for result in scored)
    return {"correct": correct, "total": len(scored), "accuracy": 100.0 * correct / len(scored)}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv):
    parser = _Parser(description="Classify images with a kdig_tf .tflite model.")
    parser.add_argument("model", help="the .tflite file (its .json sidecar must sit next to it)")
    parser.add_argument("images", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--sidecar", default=None, help="sidecar JSON (default: <model>.json)")
    parser.add_argument("--top_k", type=int, default=1, help="how many classes to print per image")
    parser.add_argument("--num_threads", type=int, default=1, help="interpreter threads")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--no_verify", action="store_true",
                        help="run the model even if its sha256 differs from the sidecar's tflite_sha256")
    return parser.parse_args(argv)


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.top_k < 1 or args.num_threads < 1:
            raise UsageError("--top_k and --num_threads must be >= 1")
        sidecar = read_sidecar(args.model, args.sidecar)
        if not args.no_verify:
            verify_model(args.model, sidecar)
        interpreter = load_model(args.model, args.num_threads)
        check_sidecar(interpreter, sidecar)
        results = classify(interpreter, sidecar, find_images(args.images, sidecar.get("labels")), args.top_k)
    except RunnerError as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    score = accuracy(results)
    if args.json:
        print(json.dumps({"model": args.model, "results": results, "accuracy": score}, indent=2))
    else:
        for result in results:
            guesses = ", ".join(f"{guess['label']} {guess['probability']:.3f}" for guess in result["top_k"])
            print(f"{result['image']}: {guesses} ({result['latency_ms']:.2f} ms)")
        if score is not None:
            print(f"accuracy: {score['accuracy']:.2f}% ({score['correct']}/{score['total']} images in class folders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
