"""Runs exported models on saved images in a process of its own (see export.py).

Usage: python -m lenet_tf.parity_worker IMAGES.npy OUT.npz NAME=PATH [NAME=PATH ...]

A micro file runs in TFLM's interpreter; NAME=litert:PATH runs it in LiteRT's.
"""

import sys

# The exported formats load without Keras, which TensorFlow imports whole at
# its own import when it can (to register Keras's optimizers for SavedModels
# that need them; it carries on without): a None entry makes that import fail
# and saves each proof about a second of CPU (Keras imports matplotlib too).
sys.modules.setdefault("keras", None)

import numpy as np  # noqa: E402

from lenet_tf.inference import LITERT_PREFIX, load_predictor  # noqa: E402


def main(argv: list[str]) -> int:
    images_path, output_path, *models = argv
    images = np.load(images_path)
    probabilities = {}
    for entry in models:
        name, path = entry.split("=", 1)
        runtime = "litert" if path.startswith(LITERT_PREFIX) else "tflm"
        probabilities[name] = load_predictor(path.removeprefix(LITERT_PREFIX), micro_runtime=runtime).predict(images)
    np.savez(output_path, **probabilities)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
