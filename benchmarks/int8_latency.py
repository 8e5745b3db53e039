"""Batch-1 latency of the full-integer TFLite model against float32, with and
without the export's average-pool rewrite, measured in one process.

    python -m benchmarks.int8_latency runs/fashion_mnist

Converts a run's checkpoint four ways, calibrated as the export calibrates:
float32, dynamic-range, int8 with its average pools kept as TFLite
AVERAGE_POOL_2D ops, and int8 as the export writes it (from the twin whose
pools are depthwise convolutions). It times the models in interleaved rounds,
each through the interpreter as `Interpreter(model_path)` builds it (XNNPACK,
one thread) and, for float32 and the exported int8 file, also without the
default delegate (TFLite's own kernels) and with XNNPACK on two threads: which
is fastest differs between CPU kinds. Machines switch speed within seconds,
so each round measures every row back to back. The table reports the
fastest round's p50, the median of the per-round ratios to float32, and each
file's test accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import machine_description
from benchmarks.exports import latency
from lenet_tf.data import Datasets


def interpreter_call(interpreter, image: np.ndarray):
    """One batch-1 call through the interpreter API: set_tensor, invoke, get_tensor."""
    input_details = interpreter.get_input_details()[0]
    output_index = interpreter.get_output_details()[0]["index"]
    feed = image.astype(input_details["dtype"])

    def call():
        interpreter.set_tensor(input_details["index"], feed)
        interpreter.invoke()
        return interpreter.get_tensor(output_index)

    return call


def convert_variants(run_dir: Path, scratch: Path) -> tuple[dict[str, Path], Datasets]:
    """Writes the TFLite files to compare under `scratch`; returns them and the run's datasets."""
    import keras

    from lenet_tf.config import TrainConfig
    from lenet_tf.data import load_datasets
    from lenet_tf.export import (
        calibration_images, convert_tflite, pooling_as_depthwise_convolution, write_saved_model,
    )
    from lenet_tf.run_dir import RunDir

    run = RunDir(run_dir)
    config = TrainConfig.read(run.config)
    model = keras.models.load_model(run.checkpoint, compile=False)
    datasets = load_datasets(config.dataset, config.data_dir)
    calibration = calibration_images(datasets, config.seed)
    write_saved_model(model, scratch / "model")
    write_saved_model(pooling_as_depthwise_convolution(model), scratch / "twin")
    sources = {
        "float32": ("model", "float32"),
        "dynamic": ("model", "dynamic"),
        "int8, average pools kept": ("model", "int8"),
        "int8, as exported": ("twin", "int8"),
    }
    files = {}
    for name, (source, variant) in sources.items():
        files[name] = scratch / f"{source}.{variant}.tflite"
        files[name].write_bytes(convert_tflite(scratch / source, variant, calibration))
    return files, datasets


def accuracy_of(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    from lenet_tf.inference import load_predictor

    probabilities = load_predictor(path, verify=False).predict(images)
    return float(np.mean(np.argmax(probabilities, axis=-1) == labels))


# Extra rows: (file, interpreter setting) beside the default setting of every file.
SETTINGS = {
    "without the default delegate": {"experimental_op_resolver_type": "BUILTIN_WITHOUT_DEFAULT_DELEGATES"},
    "XNNPACK, 2 threads": {"num_threads": 2},
}
SETTING_FILES = ("float32", "int8, as exported")


def rows_of(files: dict[str, Path]) -> dict[str, tuple[str, dict]]:
    """Each table row: its file's name and the interpreter's keyword arguments."""
    rows = {name: (name, {}) for name in files}
    for file_name in SETTING_FILES:
        for setting, arguments in SETTINGS.items():
            rows[f"{file_name}, {setting}"] = (file_name, arguments)
    return rows


def measure(files: dict[str, Path], rounds: int, calls: int) -> dict[str, list[float]]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from lenet_tf.quiet import native_stderr_silenced

    def interpreter_for(path: Path, arguments: dict):
        arguments = dict(arguments)
        if "experimental_op_resolver_type" in arguments:
            arguments["experimental_op_resolver_type"] = OpResolverType[arguments["experimental_op_resolver_type"]]
        return Interpreter(model_path=str(path), **arguments)

    rows = rows_of(files)
    with native_stderr_silenced():
        interpreters = {name: interpreter_for(files[file_name], arguments)
                        for name, (file_name, arguments) in rows.items()}
    for interpreter in interpreters.values():
        interpreter.allocate_tensors()
    image = np.zeros((1, 28, 28, 1), np.uint8)
    calls_of = {name: interpreter_call(interpreter, image) for name, interpreter in interpreters.items()}
    p50s: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, call in calls_of.items():
            p50s[name].append(latency(call, calls)["p50_us"])
    return p50s


def markdown(p50s: dict[str, list[float]], accuracies: dict[str, float], files: dict[str, Path], rounds: int,
             calls: int) -> str:
    machine = machine_description()
    lines = [
        f"Measured {machine['date']} on {machine['cores']} cores of {machine['cpu']}; TensorFlow "
        f"{machine['tensorflow']}. {rounds} interleaved rounds of {calls:,} batch-1 calls per model "
        "through the interpreter API (set_tensor, invoke, get_tensor); XNNPACK on one thread unless the row "
        "says otherwise.",
        "",
        "| model | size | test accuracy | fastest round's p50 | median ratio to float32 (range) |",
        "| --- | --- | --- | --- | --- |",
    ]
    rows = rows_of(files)
    for name, samples in p50s.items():
        file_name = rows[name][0]
        ratios = [sample / baseline for sample, baseline in zip(samples, p50s["float32"])]
        ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f})"
        lines.append(f"| {name} | {files[file_name].stat().st_size / 1024:.0f} KiB | {accuracies[file_name]:.4f} | "
                     f"{min(samples):.1f} µs | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's folder (holds checkpoints/last.keras)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per model per round (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.rounds <= 0 or args.calls <= 0:
        parser.error("--rounds and --calls must be positive")
    with tempfile.TemporaryDirectory() as scratch:
        files, datasets = convert_variants(args.run_dir, Path(scratch))
        accuracies = {name: accuracy_of(path, datasets.test_images, datasets.test_labels)
                      for name, path in files.items()}
        p50s = measure(files, args.rounds, args.calls)
        print(markdown(p50s, accuracies, files, args.rounds, args.calls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
