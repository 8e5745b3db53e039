"""What each preset's micro model asks of a board: TFLM's arena, the model file's bytes, the
multiply-adds, and one invoke's time in TFLM's Python interpreter on this host (reference
kernels: a relative cost, not a board's). Prints a Markdown table (docs/on-device.md).

    python -m benchmarks.micro [--datasets fashion_mnist,mnist] [--presets classic,modern,fast,best]

Each preset's model is trained for one epoch on 6,000 training pictures first: the figures
depend on the architecture, not on how long it trained, but an untrained model's zero biases
make its file and arena a little smaller than a trained one's. About a minute a preset on 2 cores.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

TRAIN_PICTURES = 6000
TIMED_INVOKES = 200


def measure(dataset: str, preset_name: str) -> dict:
    import keras

    from lenet_tf import micro
    from lenet_tf.config import preset
    from lenet_tf.data import load_datasets
    from lenet_tf.inference import load_predictor
    from lenet_tf.model import build_model

    data = load_datasets(dataset).limited(TRAIN_PICTURES, 10)
    keras.utils.set_random_seed(0)
    model = build_model(preset(preset_name, dataset))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data.train_images, data.train_labels, epochs=1, batch_size=128, verbose=0)
    model_bytes = micro.convert_micro(model, data.train_images[:500])
    with tempfile.TemporaryDirectory(prefix="lenet-micro-") as scratch:
        path = Path(scratch) / micro.MICRO_FILE
        path.write_bytes(model_bytes)
        arena = micro.measure_arena_in_child(path)
        predictor = load_predictor(path, verify=False)
        started = time.perf_counter()
        predictor.predict(data.train_images[:TIMED_INVOKES])
        invoke_ms = (time.perf_counter() - started) / TIMED_INVOKES * 1000
    return {"arena": arena, "bytes": len(model_bytes), "multiply_adds": micro.multiply_adds(model_bytes),
            "invoke_ms": invoke_ms}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="fashion_mnist,mnist")
    parser.add_argument("--presets", default="classic,modern,fast,best")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    print("| dataset | preset | arena | model file | multiply-adds | TFLM time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dataset in args.datasets.split(","):
        for preset_name in args.presets.split(","):
            row = measure(dataset, preset_name)
            print(f"| {dataset} | {preset_name} | {row['arena']:,} B | {row['bytes']:,} B | "
                  f"{row['multiply_adds']:,} | {row['invoke_ms']:.1f} ms |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
