#!/usr/bin/env python3
"""Classify images with a kdig_tf ``.tflite`` model on a device (Raspberry Pi, Termux...).

    python run_tflite.py student_int8.tflite photo.jpg more_photos/ --top_k 3

Standalone on purpose: needs only numpy, Pillow and either ``ai-edge-litert`` or
``tflite-runtime`` (no TensorFlow, no kdig_tf). Preprocessing comes from the sidecar
``<model>.json`` written at export: resize to the input size, scale to [0, 1], apply
mean/std for "normalized" models, quantise for int8-input models.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

EXIT_BAD_INPUT = 2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


class RunnerError(Exception):
    """Bad input: reported as one line on stderr with exit code 2."""


def load_interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise RunnerError("neither ai-edge-litert nor tflite-runtime is installed "
                              "(pip install ai-edge-litert)") from None
    return Interpreter


def read_sidecar(model_path, sidecar_path=None):
    sidecar_path = sidecar_path or os.path.splitext(model_path)[0] + ".json"
    try:
        with open(sidecar_path) as handle:
            sidecar = json.load(handle)
        spec = sidecar["input"]
        if spec["input_kind"] not in ("unit", "normalized", "pixels"):
            raise RunnerError(f"unknown input_kind {spec['input_kind']!r} in {sidecar_path}")
        return sidecar
    except FileNotFoundError:
        raise RunnerError(f"no sidecar {sidecar_path} (copy the .json next to the .tflite)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunnerError(f"unreadable sidecar {sidecar_path}: {err}") from None


def load_model(model_path, num_threads):
    if not os.path.isfile(model_path):
        raise RunnerError(f"no such model file: {model_path}")
    interpreter_class = load_interpreter_class()
    try:
        interpreter = interpreter_class(model_path=model_path, num_threads=num_threads)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as err:
        raise RunnerError(f"cannot load {model_path}: {str(err).splitlines()[0]}") from None
    return interpreter


def check_sidecar(interpreter, sidecar):
    detail = interpreter.get_input_details()[0]
    shape, dtype = list(detail["shape"][1:]), np.dtype(detail["dtype"]).name
    if list(sidecar["input"]["shape"][1:]) != shape or sidecar["input"]["dtype"] != dtype:
        raise RunnerError(f"sidecar describes input {sidecar['input']['shape']} {sidecar['input']['dtype']}, "
                          f"the model has {[1] + shape} {dtype}")


def find_images(paths):
    images = []
    for path in paths:
        if os.path.isdir(path):
            images += sorted(os.path.join(path, name) for name in os.listdir(path)
                             if name.lower().endswith(IMAGE_SUFFIXES))
        elif os.path.isfile(path):
            images.append(path)
        else:
            raise RunnerError(f"no such file or folder: {path}")
    if not images:
        raise RunnerError(f"no images found in {paths}")
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
        raise RunnerError(f"cannot read image {image_path}: {err}") from None
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


def classify(interpreter, sidecar, image_paths, top_k):
    input_index = interpreter.get_input_details()[0]["index"]
    output = interpreter.get_output_details()[0]
    scale, zero_point = output["quantization"]
    labels = sidecar.get("labels") or None
    results = []
    for path in image_paths:
        interpreter.set_tensor(input_index, preprocess(path, sidecar["input"]))
        start = time.perf_counter()
        interpreter.invoke()
        latency_ms = 1e3 * (time.perf_counter() - start)
        logits = interpreter.get_tensor(output["index"])[0].astype(np.float32)
        if scale:
            logits = (logits - zero_point) * scale
        probabilities = softmax(logits)
        best = np.argsort(-probabilities, kind="stable")[:top_k]
        results.append({
            "image": path,
            "latency_ms": latency_ms,
            "top_k": [{"index": int(index),
                       "label": labels[index] if labels else str(int(index)),
                       "probability": float(probabilities[index])} for index in best],
        })
    return results


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Classify images with a kdig_tf .tflite model.")
    parser.add_argument("model", help="the .tflite file (its .json sidecar must sit next to it)")
    parser.add_argument("images", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--sidecar", default=None, help="sidecar JSON (default: <model>.json)")
    parser.add_argument("--top_k", type=int, default=1, help="how many classes to print per image")
    parser.add_argument("--num_threads", type=int, default=1, help="interpreter threads")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.top_k < 1 or args.num_threads < 1:
            raise RunnerError("--top_k and --num_threads must be >= 1")
        sidecar = read_sidecar(args.model, args.sidecar)
        interpreter = load_model(args.model, args.num_threads)
        check_sidecar(interpreter, sidecar)
        results = classify(interpreter, sidecar, find_images(args.images), args.top_k)
    except RunnerError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps({"model": args.model, "results": results}, indent=2))
    else:
        for result in results:
            guesses = ", ".join(f"{guess['label']} {guess['probability']:.3f}" for guess in result["top_k"])
            print(f"{result['image']}: {guesses} ({result['latency_ms']:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
