"""Runs exported models on saved images in a process of its own (see export.py).

Usage: python -m lenet_tf.parity_worker IMAGES.npy OUT.npz NAME=PATH [NAME=PATH ...]
"""

import sys

import numpy as np

from lenet_tf.inference import load_predictor


def main(argv: list[str]) -> int:
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
