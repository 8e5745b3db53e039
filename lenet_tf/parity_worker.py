"""Runs exported models on saved images in a process of its own (see export.py).

Usage: python -m lenet_tf.parity_worker IMAGES.npy OUT.npz NAME=PATH [NAME=PATH ...]
   or: python -m lenet_tf.parity_worker --wait

With --wait the worker first imports its runtimes, then reads the same
arguments as one JSON list from stdin. The exporter starts it that way before
it writes the models, so that TensorFlow's import (seconds) happens while
the models are being written rather than after. An empty stdin (the export
failed) ends it quietly.
"""

import json
import sys

import numpy as np

from lenet_tf.inference import load_predictor
from lenet_tf.quiet import import_tensorflow_quietly


def main(argv: list[str]) -> int:
    if argv == ["--wait"]:
        import_tensorflow_quietly()  # The SavedModel runtime; LiteRT's and ONNX Runtime's imports are light.
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        argv = json.loads(line)
    images_path, output_path, *models = argv
    images = np.load(images_path)
    probabilities = {}
    for entry in models:
        name, path = entry.split("=", 1)
        probabilities[name] = load_predictor(path).predict(images)
    np.savez(output_path, **probabilities)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
