"""Benchmarks: the package's paths against plain Keras, measured in one process.

    python -m lenet_tf.bench                       # training + evaluation ratios, peak memory
    python -m lenet_tf.bench --export-dir exports/lenet_fashion_mnist/2   # + latency of every export
    python -m lenet_tf.bench --full-run            # + wall time of `python train.py` on real data
    python -m lenet_tf.bench --kernels             # + where one training step's time goes, kernel by kernel

Every number is a median over repeats after a warm-up, with the spread
(min..max) beside it; ratios compare runs made in the same process on the
same synthetic data (random uint8 images, 60,000 by default). Results are
printed as a table and written as JSON and Markdown (for the README).
Timing targets live here, never in unit tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lenet_tf.quiet import import_tensorflow_quietly


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": len(values)}


def synthetic_data(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, count).astype(np.int32)


def plain_keras_model():
    """The book's LeNet as a tutorial writes it: float32 inputs already scaled to [0, 1]."""
    import keras
    from keras import layers

    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        layers.Conv2D(6, 5, padding="same", activation="sigmoid"),
        layers.AveragePooling2D(2, 2),
        layers.Conv2D(16, 5, activation="sigmoid"),
        layers.AveragePooling2D(2, 2),
        layers.Flatten(),
        layers.Dense(120, activation="sigmoid"),
        layers.Dense(84, activation="sigmoid"),
        layers.Dense(10),
    ])
    model.compile(optimizer=keras.optimizers.SGD(0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


class _EpochTimer:
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


def bench_training(images, labels, repeats: int, batch_size: int) -> dict[str, Any]:
    """Images/s of one training epoch: the package's path vs plain Keras, same data.

    The two alternate epoch by epoch (one `fit` call each), so both sample the
    same stretches of this machine's swinging throughput; the ratio is the
    median of the per-pair ratios, each pair measured within seconds.
    """
    import keras

    from lenet_tf.config import TrainConfig
    from lenet_tf.data import Datasets, make_dataset
    from lenet_tf.callbacks import ThroughputCallback
    from lenet_tf.train import build_compiled_model, make_callbacks

    count = len(images)
    # Plain Keras: model.fit on float32 numpy arrays, as in the tutorials.
    keras.utils.set_random_seed(0)
    baseline = plain_keras_model()
    baseline_images = images.astype(np.float32) / 255.0
    timer = _EpochTimer()

    # The package: its model, tf.data pipeline and every callback of a real run.
    config = TrainConfig(batch_size=batch_size, image_every_epochs=0)
    keras.utils.set_random_seed(0)
    model = build_compiled_model(config)
    throughput = ThroughputCallback(count)
    data = make_dataset(images, labels, batch_size, shuffle=True, seed=0)
    with tempfile.TemporaryDirectory() as scratch:
        small_test = Datasets(images[:1], labels[:1], images[:256], labels[:256])
        # Drop the image dashboards: they run at epoch ends outside the timed span anyway.
        callbacks = [c for c in make_callbacks(config, Path(scratch), small_test, throughput)
                     if type(c).__name__ != "ImageDashboardsCallback"]
        for _ in range(1 + repeats):  # The first pair is the warm-up (tracing).
            baseline.fit(baseline_images, labels, batch_size=batch_size, epochs=1, verbose=0, callbacks=[timer])
            model.fit(data, epochs=1, verbose=0, callbacks=callbacks, shuffle=False)
    baseline_rates = [count / seconds for seconds in timer.seconds[1:]]
    package_rates = [count / seconds for seconds in throughput.epoch_seconds[1:]]
    pair_ratios = [package / base for package, base in zip(package_rates, baseline_rates)]
    return {"plain_keras": _summary(baseline_rates), "package": _summary(package_rates),
            "ratio": statistics.median(pair_ratios), "pair_ratios": _summary(pair_ratios)}


def bench_callback_overhead(images, labels, test_images, test_labels, epochs: int = 5) -> dict[str, Any]:
    """Whole-epoch wall time (training, validation, epoch-end work) with the default
    callbacks of a run (TensorBoard scalars per epoch, image dashboards every 5
    epochs, checkpoint, backup, history) against none, same model and data.
    """
    import keras

    from lenet_tf.config import TrainConfig
    from lenet_tf.data import Datasets, make_dataset
    from lenet_tf.callbacks import ThroughputCallback
    from lenet_tf.train import build_compiled_model, make_callbacks

    config = TrainConfig()  # Default settings: image dashboards every 5 epochs.
    train = make_dataset(images, labels, config.batch_size, shuffle=True, seed=0)
    test = make_dataset(test_images, test_labels, config.batch_size, shuffle=False, seed=0)
    names = ("no_callbacks", "default_callbacks")
    models, callbacks, timers = {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            keras.utils.set_random_seed(0)
            models[name] = build_compiled_model(config)
            timers[name] = _EpochTimer()
            callbacks[name] = []
            if name == "default_callbacks":
                datasets = Datasets(images, labels, test_images, test_labels)
                callbacks[name] = make_callbacks(config, Path(scratch), datasets, ThroughputCallback(len(images)))
        # The two alternate epoch by epoch (one fit call each, epoch numbers kept,
        # so the dashboards still come every 5 epochs), so both sample the same
        # stretches of this machine's swinging throughput. The timer goes last,
        # so its epoch end includes everyone else's; work at the end of each
        # fit call falls outside the timed epochs.
        for epoch in range(1 + epochs):
            for name in names:
                models[name].fit(train, validation_data=test, initial_epoch=epoch, epochs=epoch + 1, verbose=0,
                                 shuffle=False, callbacks=[*callbacks[name], timers[name]])
    seconds = {name: {**_summary(timers[name].seconds[1:]), "total": sum(timers[name].seconds[1:])} for name in names}
    # Totals, not medians: the image dashboards run on one epoch in five.
    seconds["overhead"] = seconds["default_callbacks"]["total"] / seconds["no_callbacks"]["total"] - 1.0
    return seconds


def bench_evaluation(images, repeats: int) -> dict[str, Any]:
    """Images/s of inference on the whole set: the package's predict path vs plain model.predict."""
    from lenet_tf.config import TrainConfig
    from lenet_tf.model import build_model, predict_probabilities

    baseline = plain_keras_model()
    scaled = images.astype(np.float32) / 255.0
    model = build_model(TrainConfig())
    timings: dict[str, list[float]] = {"plain_keras_predict": [], "package": []}
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        baseline.predict(scaled, verbose=0)
        middle = time.perf_counter()
        predict_probabilities(model, images)
        end = time.perf_counter()
        if repeat:  # The first pass pays for tracing.
            timings["plain_keras_predict"].append(len(images) / (middle - start))
            timings["package"].append(len(images) / (end - middle))
    results = {name: _summary(values) for name, values in timings.items()}
    pair_ratios = [package / base for package, base in zip(timings["package"], timings["plain_keras_predict"])]
    results["ratio"] = statistics.median(pair_ratios)
    results["pair_ratios"] = _summary(pair_ratios)
    return results


def _classic_training_step(batch_size: int):
    """One training step of the plain-Keras classic model as a tf.function, on random data."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = plain_keras_model()  # Compiled: its own loss and optimizer drive the step.
    images = tf.random.uniform([batch_size, 28, 28, 1])
    labels = tf.random.uniform([batch_size], 0, 10, tf.int32)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = model.loss(labels, model(images, training=True))
        model.optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    return step, (images, labels)


def bench_kernels(batch_size: int, repeats: int, calls: int = 40) -> dict[str, Any]:
    """Where one training step of the classic model goes: its heavy kernels, each
    timed alone at the step's shapes (the ops TensorFlow runs for it, oneDNN's on
    CPU), beside the whole step and a large matrix product.

    The convolution kernels set a floor that no framework-side change goes
    under: with everything else in the step free, training could be at most
    `step / convolutions` times faster than plain Keras.
    """
    import tensorflow as tf

    def uniform(*shape):
        return tf.random.uniform(shape)

    batch = batch_size
    conv1_flops = 2 * batch * 28 * 28 * 6 * 25
    conv2_flops = 2 * batch * 10 * 10 * 16 * 150
    dense_flops = 2 * batch * (400 * 120 + 120 * 84 + 84 * 10)
    unit = [1, 1, 1, 1]

    def sigmoid_pool_forward(pre_activation):
        return tf.nn.avg_pool2d(tf.sigmoid(pre_activation), 2, 2, "VALID")

    def sigmoid_pool_backward(activation, pooled_gradient):
        return tf.raw_ops.SigmoidGrad(y=activation, dy=tf.raw_ops.AvgPoolGrad(
            orig_input_shape=tf.shape(activation), grad=pooled_gradient,
            ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="VALID"))

    kernels: dict[str, tuple[Callable, tuple, int, bool]] = {
        # name: (function, arguments, floating-point operations, is a convolution)
        "conv1 forward (+bias)": (lambda x, w, b: tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b),
                                  (uniform(batch, 28, 28, 1), uniform(5, 5, 1, 6), uniform(6)), conv1_flops, True),
        "conv1 filter gradient": (lambda x, dy: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=[5, 5, 1, 6], out_backprop=dy, strides=unit, padding="SAME"),
            (uniform(batch, 28, 28, 1), uniform(batch, 28, 28, 6)), conv1_flops, True),
        "conv2 forward (+bias)": (lambda x, w, b: tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "VALID"), b),
                                  (uniform(batch, 14, 14, 6), uniform(5, 5, 6, 16), uniform(16)), conv2_flops, True),
        "conv2 input gradient": (lambda dy, w: tf.raw_ops.Conv2DBackpropInput(
            input_sizes=[batch, 14, 14, 6], filter=w, out_backprop=dy, strides=unit, padding="VALID"),
            (uniform(batch, 10, 10, 16), uniform(5, 5, 6, 16)), conv2_flops, True),
        "conv2 filter gradient": (lambda x, dy: tf.raw_ops.Conv2DBackpropFilter(
            input=x, filter_sizes=[5, 5, 6, 16], out_backprop=dy, strides=unit, padding="VALID"),
            (uniform(batch, 14, 14, 6), uniform(batch, 10, 10, 16)), conv2_flops, True),
        "block 1 sigmoid + pool, forward": (sigmoid_pool_forward, (uniform(batch, 28, 28, 6),), 0, False),
        "block 1 sigmoid + pool, backward": (sigmoid_pool_backward,
                                             (uniform(batch, 28, 28, 6), uniform(batch, 14, 14, 6)), 0, False),
        "block 2 sigmoid + pool, forward": (sigmoid_pool_forward, (uniform(batch, 10, 10, 16),), 0, False),
        "block 2 sigmoid + pool, backward": (sigmoid_pool_backward,
                                             (uniform(batch, 10, 10, 16), uniform(batch, 5, 5, 16)), 0, False),
        "dense layers, forward + both gradients": (_dense_forward_backward, (
            uniform(batch, 400), uniform(400, 120), uniform(120, 84), uniform(84, 10)), 3 * dense_flops, False),
    }
    step, step_arguments = _classic_training_step(batch_size)
    square = uniform(1024, 1024)
    timed = {name: (tf.function(function), arguments) for name, (function, arguments, _, _) in kernels.items()}
    timed["whole training step"] = (step, step_arguments)
    timed["1024x1024 matmul"] = (tf.function(tf.matmul), (square, square))
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for round_index in range(1 + repeats):  # Rounds interleave the kernels; round 0 warms up.
        for name, (function, arguments) in timed.items():
            start = time.perf_counter()
            for _ in range(calls):
                result = function(*arguments)
            tf.nest.flatten(result)[0].numpy()  # Waits for the last call.
            if round_index:
                samples[name].append((time.perf_counter() - start) / calls * 1e6)
    step_us = statistics.median(samples["whole training step"])
    peak_gflops = 2 * 1024**3 / statistics.median(samples["1024x1024 matmul"]) / 1e3
    rows = {}
    for name, (_, _, flops, _) in kernels.items():
        microseconds = statistics.median(samples[name])
        rows[name] = {"us": microseconds, "gflop_per_s": flops / microseconds / 1e3 if flops else None,
                      "share_of_step": microseconds / step_us}
    convolution_us = sum(rows[name]["us"] for name, entry in kernels.items() if entry[3])
    step_flops = 2 * conv1_flops + 3 * conv2_flops + 3 * dense_flops
    return {
        "batch_size": batch_size, "kernels": rows, "step_us": step_us,
        "step_images_per_s": batch_size / step_us * 1e6, "step_gflop_per_s": step_flops / step_us / 1e3,
        "convolutions_us": convolution_us, "ceiling_with_these_convolutions": step_us / convolution_us,
        "matmul_gflop_per_s": peak_gflops,
        "arithmetic_floor_us": step_flops / peak_gflops / 1e3,
    }


def _dense_forward_backward(features, kernel1, kernel2, kernel3):
    """The three dense layers' matrix products: forward, input and weight gradients."""
    import tensorflow as tf

    outputs = []
    hidden = features
    for kernel in (kernel1, kernel2, kernel3):
        following = tf.matmul(hidden, kernel)
        outputs.append(tf.matmul(following, kernel, transpose_b=True))  # Input gradient's shape.
        outputs.append(tf.matmul(hidden, following, transpose_a=True))  # Weight gradient's shape.
        hidden = following
    return outputs


def _latency(call: Callable[[], Any], calls: int) -> dict[str, float]:
    for _ in range(min(100, calls)):
        call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - start) / 1000)
    return {"p50_us": float(np.percentile(samples, 50)), "p99_us": float(np.percentile(samples, 99)), "calls": calls}


def bench_exports(version_dir: Path, calls: int) -> dict[str, Any]:
    """Batch-1 latency of the SavedModel signature and each TFLite file, plus size and parity."""
    import tensorflow as tf

    from lenet_tf.inference import INPUT_KEY, SIGNATURE_KEY, tflite_interpreter_class
    from lenet_tf.quiet import native_stderr_silenced

    card = json.loads((version_dir / "metadata.json").read_text())
    image = np.zeros((1, 28, 28, 1), np.uint8)
    results = {}
    serve = tf.saved_model.load(str(version_dir)).signatures[SIGNATURE_KEY]
    tensor = tf.constant(image)
    saved_model_bytes = sum(entry["bytes"] for name, entry in card["files"].items()
                            if not name.endswith((".tflite", ".onnx")))
    results["saved_model"] = {"bytes": saved_model_bytes, **_latency(lambda: serve(image=tensor), max(200, calls // 10))}
    for path in sorted(version_dir.glob("*.tflite")):
        variant = path.name.split(".")[1]
        with native_stderr_silenced():
            runner_interpreter = tflite_interpreter_class()(model_path=str(path))
            direct = tflite_interpreter_class()(model_path=str(path))
        runner = runner_interpreter.get_signature_runner(SIGNATURE_KEY)
        runner_latency = _latency(lambda runner=runner: runner(**{INPUT_KEY: image}), calls)
        # The interpreter API proper (set_tensor, invoke, get_tensor) skips the
        # signature runner's per-call dictionary and shape checks. A second
        # interpreter, so no array from the runner pins the first one's buffers.
        details = direct.get_signature_runner(SIGNATURE_KEY)
        input_details = details.get_input_details()[INPUT_KEY]
        output_index = details.get_output_details()["probabilities"]["index"]
        del details  # It holds the interpreter's buffers, which allocate_tensors refuses.
        direct.allocate_tensors()
        feed = image.astype(input_details["dtype"])

        def invoke(direct=direct, input_index=input_details["index"], output_index=output_index, feed=feed):
            direct.set_tensor(input_index, feed)
            direct.invoke()
            return direct.get_tensor(output_index)

        results[variant] = {"bytes": path.stat().st_size, **_latency(invoke, calls),
                            "signature_runner_p50_us": runner_latency["p50_us"]}
    onnx_path = version_dir / "lenet.onnx"
    if onnx_path.is_file():
        import onnxruntime

        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        results["onnx"] = {"bytes": onnx_path.stat().st_size,
                           **_latency(lambda: session.run(["probabilities"], {"image": image}), calls)}
    for name, numbers in results.items():
        numbers.update(card["parity"].get(name, {}))
    results["_keras_test_accuracy"] = card["parity"]["keras"]["test_accuracy"]
    return results


def bench_full_run(extra_args: list[str]) -> dict[str, Any]:
    """Wall time and peak memory of `python train.py` in a fresh process."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, str(Path(__file__).resolve().parent.parent / "train.py"),
                   "--run-dir", f"{scratch}/run", "--export-dir", f"{scratch}/exports", *extra_args]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if completed.returncode != 0:
            return {"command": " ".join(command[1:]), "error": completed.stderr.strip().splitlines()[-1:]}
        metrics = json.loads(Path(f"{scratch}/run/metrics.json").read_text())
    return {
        "command": " ".join(["python train.py", *extra_args]),
        "wall_seconds": wall,
        # The largest of train.py and its export helpers (parity check, ONNX), and train.py's own.
        "peak_rss_mib": max(peak_kib, before) / 1024,
        "train_py_peak_rss_mib": metrics.get("peak_rss_mib"),
        "test_accuracy": metrics["test_accuracy"],
        "examples_per_sec": metrics["examples_per_sec"],
    }


def time_to_accuracy(run_dir: Path, target: float) -> dict[str, Any]:
    """Seconds from a run's start to the end of the first epoch whose validation
    accuracy reached `target`, read from its TensorBoard event files (the
    HParams session start marks the start of training)."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def events(folder: Path, tag: str):
        accumulator = EventAccumulator(str(folder), size_guidance={"tensors": 0})
        accumulator.Reload()
        return accumulator.Tensors(tag) if tag in accumulator.Tags()["tensors"] else []

    logs = Path(run_dir) / "logs"
    starts = events(logs, "_hparams_/session_start_info")
    if not starts:
        return {"run_dir": str(run_dir), "error": "no HParams session start in the event files"}
    for event in events(logs / "validation", "epoch_accuracy"):
        accuracy = float(tf.make_ndarray(event.tensor_proto))
        if accuracy >= target:
            return {"run_dir": str(run_dir), "target": target, "epoch": event.step + 1, "accuracy": accuracy,
                    "seconds": event.wall_time - starts[0].wall_time}
    return {"run_dir": str(run_dir), "target": target, "error": "target never reached"}


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


def to_markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [f"Measured {machine['date']} on {machine['cores']} cores of {machine['cpu']}"
             f"{', GPUs ' + ', '.join(machine['gpus']) if machine['gpus'] else ''}; "
             f"TensorFlow {machine['tensorflow']}, Keras {machine['keras']}. "
             f"Median of {results['settings']['repeats']} repeats after a warm-up (min..max).", ""]
    if "training" in results:
        training, evaluation = results["training"], results["evaluation"]
        lines += ["Each repeat measures plain Keras and lenet_tf back to back; the ratio is the median of "
                  "the per-repeat ratios (their range in brackets).", "",
                  "| measurement | plain Keras | lenet_tf | ratio |", "| --- | --- | --- | --- |"]
        for label, block, base in (("training, images/s", training, "plain_keras"),
                                   ("evaluation, images/s", evaluation, "plain_keras_predict")):
            spread = block["pair_ratios"]
            lines.append(f"| {label} | {_cell(block[base])} | {_cell(block['package'])} | "
                         f"{block['ratio']:.2f}x ({spread['min']:.2f}..{spread['max']:.2f}) |")
        lines.append("")
    if "kernels" in results:
        lines += _kernels_markdown(results["kernels"])
    if "exports" in results:
        lines += ["Batch-1 latency: TFLite through the interpreter API (set_tensor, invoke, get_tensor; the "
                  "signature runner's p50 in brackets), the SavedModel through its `serving_default` signature, "
                  "ONNX through an onnxruntime session.", "",
                  "| format | size | test accuracy | max abs Δp vs Keras | top-1 agreement | batch-1 p50 | batch-1 p99 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, numbers in results["exports"].items():
            if name.startswith("_"):
                continue
            runner = f" ({numbers['signature_runner_p50_us']:.1f})" if "signature_runner_p50_us" in numbers else ""
            lines.append(
                f"| {name} | {numbers['bytes'] / 1024:.0f} KiB | {numbers.get('test_accuracy', float('nan')):.4f} | "
                f"{numbers.get('max_abs_probability_diff', float('nan')):.1e} | {numbers.get('top1_agreement', float('nan')):.4f} | "
                f"{numbers['p50_us']:.1f} µs{runner} | {numbers['p99_us']:.0f} µs |")
        lines.append("")
    if "callback_overhead" in results:
        block = results["callback_overhead"]
        lines.append(f"Default callbacks (TensorBoard per epoch, image dashboards every 5 epochs, checkpoint, "
                     f"backup, history) over 5 epochs with validation: {block['default_callbacks']['total']:.1f} s "
                     f"vs {block['no_callbacks']['total']:.1f} s without, an overhead of "
                     f"{block['overhead'] * 100:.1f} %.")
        lines.append("")
    for entry in results.get("time_to_accuracy", []):
        if "error" in entry:
            lines.append(f"{entry['run_dir']}: {entry['error']}.")
        else:
            lines.append(f"{entry['run_dir']}: validation accuracy {entry['accuracy']:.4f} ≥ {entry['target']} "
                         f"after epoch {entry['epoch']}, {entry['seconds']:.0f} s from the start of training.")
    if results.get("time_to_accuracy"):
        lines.append("")
    for key in ("full_run",):
        if key in results:
            run = results[key]
            if "error" in run:
                lines.append(f"`{run['command']}` failed: {run['error']}")
            else:
                own = run.get("train_py_peak_rss_mib")
                own_text = f" ({own:,.0f} MiB in train.py itself)" if own else ""
                lines.append(f"`{run['command']}`: {run['wall_seconds']:.1f} s wall, peak RSS {run['peak_rss_mib']:,.0f} MiB "
                             f"over train.py and its export helper processes{own_text}, "
                             f"test accuracy {run['test_accuracy']:.4f}, {run['examples_per_sec']:.0f} examples/s.")
    return "\n".join(lines) + "\n"


def _kernels_markdown(block: dict[str, Any]) -> list[str]:
    lines = [f"One classic training step at batch {block['batch_size']}, each heavy kernel timed alone "
             "at the step's shapes (median µs per call):", "",
             "| kernel | µs | GFLOP/s | share of the whole step |", "| --- | --- | --- | --- |"]
    for name, row in block["kernels"].items():
        rate = f"{row['gflop_per_s']:.0f}" if row["gflop_per_s"] else "–"
        lines.append(f"| {name} | {row['us']:,.0f} | {rate} | {row['share_of_step'] * 100:.0f} % |")
    lines += ["", f"Whole step {block['step_us']:,.0f} µs ({block['step_images_per_s']:,.0f} images/s, "
              f"{block['step_gflop_per_s']:.0f} GFLOP/s). The five convolution kernels alone take "
              f"{block['convolutions_us']:,.0f} µs, so with everything else free a step could be at most "
              f"{block['ceiling_with_these_convolutions']:.2f}x faster. A 1024x1024 matmul runs at "
              f"{block['matmul_gflop_per_s']:.0f} GFLOP/s; at that rate the step's arithmetic would take "
              f"{block['arithmetic_floor_us']:,.0f} µs.", ""]
    return lines


def _cell(summary: dict[str, float]) -> str:
    return f"{summary['median']:,.0f} ({summary['min']:,.0f}..{summary['max']:,.0f})"


README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


def _has_markers(path: Path) -> bool:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return False
    return README_START in lines and README_END in lines and lines.index(README_START) < lines.index(README_END)


def replace_between_markers(path: Path, markdown: str) -> None:
    """Replaces what lies between the marker lines, so the README's numbers are the bench's."""
    from lenet_tf.io_utils import write_text_atomic

    text = path.read_text()
    head, rest = text.split(README_START + "\n", 1)
    _, tail = rest.split(README_END, 1)
    write_text_atomic(path, f"{head}{README_START}\n{markdown.strip()}\n{README_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lenet_tf.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=60_000, help="synthetic training images (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="default: %(default)s")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs/passes after the warm-up (default: %(default)s)")
    parser.add_argument("--skip-training", action="store_true", help="only the export latencies")
    parser.add_argument("--export-dir", type=Path, help="an export version folder to measure latency on")
    parser.add_argument("--latency-calls", type=int, default=5000, help="batch-1 calls per TFLite model (default: %(default)s)")
    parser.add_argument("--kernels", action="store_true",
                        help="also time each heavy kernel of one training step (where the step's time goes)")
    parser.add_argument("--callback-overhead", action="store_true",
                        help="also measure the default callbacks' cost per epoch (6 epochs twice)")
    parser.add_argument("--time-to-accuracy", type=Path, nargs="*", default=[], metavar="RUN_DIR",
                        help="finished run folders: seconds until validation accuracy first reached --target")
    parser.add_argument("--target", type=float, default=0.90, help="accuracy for --time-to-accuracy (default: %(default)s)")
    parser.add_argument("--full-run", action="store_true", help="also time `python train.py` with defaults on real data")
    parser.add_argument("--output", type=Path, default=Path("bench_results.json"), help="JSON output (default: %(default)s)")
    parser.add_argument("--markdown", type=Path, help="also write the Markdown table here")
    parser.add_argument("--readme", type=Path,
                        help=f"also put the Markdown into this file between the lines {README_START} and {README_END}")
    args = parser.parse_args(argv)
    for name in ("examples", "batch_size", "repeats", "latency_calls"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.readme and not _has_markers(args.readme):
        parser.error(f"--readme {args.readme} has no lines {README_START} and {README_END} to write between")
    if args.export_dir and not (args.export_dir / "metadata.json").is_file():
        parser.error(f"--export-dir {args.export_dir} is not an export version folder (no metadata.json)")
    import_tensorflow_quietly()
    results: dict[str, Any] = {"machine": machine_description(),
                               "settings": {"examples": args.examples, "batch_size": args.batch_size,
                                            "repeats": args.repeats}}
    if not args.skip_training:
        images, labels = synthetic_data(args.examples)
        results["training"] = bench_training(images, labels, args.repeats, args.batch_size)
        results["evaluation"] = bench_evaluation(images[:10_000], args.repeats)
    if args.kernels:
        results["kernels"] = bench_kernels(args.batch_size, max(args.repeats, 5))
    if args.callback_overhead:
        images, labels = synthetic_data(args.examples)
        test_images, test_labels = synthetic_data(10_000, seed=1)
        results["callback_overhead"] = bench_callback_overhead(images, labels, test_images, test_labels)
    if args.export_dir:
        results["exports"] = bench_exports(args.export_dir, args.latency_calls)
    if args.full_run:
        results["full_run"] = bench_full_run([])
    if args.time_to_accuracy:
        results["time_to_accuracy"] = [time_to_accuracy(run_dir, args.target) for run_dir in args.time_to_accuracy]
    markdown = to_markdown(results)
    print(markdown)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown)
    if args.readme:
        replace_between_markers(args.readme, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
