"""What every benchmark shares: statistics, the machine's description, synthetic
data, the plain-Keras baseline, and writing Markdown between marker lines."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def summarise(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": len(values)}


def synthetic_data(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, count).astype(np.int32)


def plain_keras_model():
    """The book's LeNet (lenet_tf.model's classic layers) as a tutorial feeds it:
    float32 inputs already scaled to [0, 1], no uint8 input or Rescaling layer,
    compiled with the book's SGD at 0.9."""
    import keras

    from lenet_tf.config import TrainConfig
    from lenet_tf.model import build_model

    classic = build_model(TrainConfig())
    model = keras.Sequential([keras.Input(shape=classic.input_shape[1:]),
                              *[layer for layer in classic.layers if not isinstance(layer, keras.layers.Rescaling)]])
    model.compile(optimizer=keras.optimizers.SGD(0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


class EpochTimer:
    """Collects per-epoch wall times inside model.fit."""

    def __new__(cls):
        import keras

        class Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.seconds: list[float] = []

            def on_epoch_begin(self, epoch, logs=None):
                self._start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.seconds.append(time.perf_counter() - self._start)

        return Timer()


def machine_description() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import keras
    import tensorflow as tf

    return {"cpu": model, "cores": os.cpu_count(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "date": datetime.date.today().isoformat(),
            "gpus": [device.name for device in tf.config.list_physical_devices("GPU")]}


def markers(name: str) -> tuple[str, str]:
    """The pair of lines a generated block lives between in a docs page."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def has_markers(path: Path, name: str = "bench") -> bool:
    start, end = markers(name)
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return False
    return start in lines and end in lines and lines.index(start) < lines.index(end)


def replace_between_markers(path: Path, markdown: str, name: str = "bench") -> None:
    """Replaces what lies between a block's marker lines, so a page's numbers are the tool's output."""
    from lenet_tf.io_utils import write_text_atomic

    start, end = markers(name)
    text = path.read_text()
    head, rest = text.split(start + "\n", 1)
    _, tail = rest.split(end, 1)
    write_text_atomic(path, f"{head}{start}\n{markdown.strip()}\n{end}{tail}")


def table_cell(summary: dict[str, float]) -> str:
    return f"{summary['median']:,.0f} ({summary['min']:,.0f}..{summary['max']:,.0f})"
