"""The machine's yardstick: a plain-Keras process that trains the book's classic LeNet for one
epoch on Fashion-MNIST (model.fit on float32 numpy arrays, batch 256, SGD at 0.9, validation on
the test split), TensorFlow's import included. Prints its own wall time in seconds.

    python -m benchmarks.yardstick

Speedrun times are quoted for a machine where this takes 10 s; benchmarks/speedrun.py times
it in the same run and scales its targets by it.
"""

import os
import sys


def main(argv: list[str] | None = None) -> int:
    import argparse

    from lenet_tf.io_utils import process_start_time

    parser = argparse.ArgumentParser(prog="python -m benchmarks.yardstick", description=__doc__.split("\n\n")[0])
    # Fewer examples make a quick check of the scripts that call it (the suite's);
    # its seconds are then no yardstick.
    parser.add_argument("--examples", type=int, help="train on the first N training images (default: all 60,000)")
    args = parser.parse_args(argv)

    started = process_start_time()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import time

    from benchmarks.common import plain_keras_model
    from lenet_tf.data import load_datasets

    data = load_datasets("fashion_mnist")
    model = plain_keras_model()
    examples = args.examples or len(data.train_images)
    model.fit(data.train_images[:examples].astype("float32") / 255, data.train_labels[:examples], batch_size=256,
              epochs=1, verbose=0,
              validation_data=(data.test_images.astype("float32") / 255, data.test_labels))
    print(f"{time.time() - started:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
