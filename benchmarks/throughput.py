"""Training and evaluation throughput of the package's paths against plain Keras, in one process."""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.common import EpochTimer, summarise, plain_keras_model


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
    from lenet_tf.optimization import build_compiled_model
    from lenet_tf.run_dir import RunDir
    from lenet_tf.train import make_callbacks

    count = len(images)
    # Plain Keras: model.fit on float32 numpy arrays, as in the tutorials.
    keras.utils.set_random_seed(0)
    baseline = plain_keras_model()
    baseline_images = images.astype(np.float32) / 255.0
    timer = EpochTimer()

    # The package: its model, tf.data pipeline and every callback of a real run.
    config = TrainConfig(batch_size=batch_size, image_every_epochs=0)
    keras.utils.set_random_seed(0)
    model = build_compiled_model(config)
    throughput = ThroughputCallback(count)
    data = make_dataset(images, labels, batch_size, shuffle=True, seed=0)
    with tempfile.TemporaryDirectory() as scratch:
        small_test = Datasets(images[:1], labels[:1], images[:256], labels[:256])
        # Drop the image dashboards: they run at epoch ends outside the timed span anyway.
        callbacks = [c for c in make_callbacks(config, RunDir(scratch), small_test, throughput)
                     if type(c).__name__ != "ImageDashboardsCallback"]
        for _ in range(1 + repeats):  # The first pair is the warm-up (tracing).
            baseline.fit(baseline_images, labels, batch_size=batch_size, epochs=1, verbose=0, callbacks=[timer])
            model.fit(data, epochs=1, verbose=0, callbacks=callbacks, shuffle=False)
    baseline_rates = [count / seconds for seconds in timer.seconds[1:]]
    package_rates = [count / seconds for seconds in throughput.epoch_seconds[1:]]
    pair_ratios = [package / base for package, base in zip(package_rates, baseline_rates)]
    return {"plain_keras": summarise(baseline_rates), "package": summarise(package_rates),
            "ratio": statistics.median(pair_ratios), "pair_ratios": summarise(pair_ratios)}


def bench_callback_overhead(images, labels, test_images, test_labels, epochs: int = 5) -> dict[str, Any]:
    """Whole-epoch wall time (training, validation, epoch-end work) with the default
    callbacks of a run (TensorBoard scalars per epoch, image dashboards every 5
    epochs, checkpoint, backup, history) against none, same model and data.
    """
    import keras

    from lenet_tf.config import TrainConfig
    from lenet_tf.data import Datasets, make_dataset
    from lenet_tf.callbacks import ThroughputCallback
    from lenet_tf.optimization import build_compiled_model
    from lenet_tf.run_dir import RunDir
    from lenet_tf.train import make_callbacks

    config = TrainConfig()  # Default settings: image dashboards every 5 epochs.
    train = make_dataset(images, labels, config.batch_size, shuffle=True, seed=0)
    test = make_dataset(test_images, test_labels, config.batch_size, shuffle=False, seed=0)
    names = ("no_callbacks", "default_callbacks")
    models, callbacks, timers = {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            keras.utils.set_random_seed(0)
            models[name] = build_compiled_model(config)
            timers[name] = EpochTimer()
            callbacks[name] = []
            if name == "default_callbacks":
                datasets = Datasets(images, labels, test_images, test_labels)
                callbacks[name] = make_callbacks(config, RunDir(scratch), datasets, ThroughputCallback(len(images)))
        # The two alternate epoch by epoch (one fit call each, epoch numbers kept,
        # so the dashboards still come every 5 epochs), so both sample the same
        # stretches of this machine's swinging throughput. The timer goes last,
        # so its epoch end includes everyone else's; work at the end of each
        # fit call falls outside the timed epochs.
        for epoch in range(1 + epochs):
            for name in names:
                models[name].fit(train, validation_data=test, initial_epoch=epoch, epochs=epoch + 1, verbose=0,
                                 shuffle=False, callbacks=[*callbacks[name], timers[name]])
    seconds = {name: {**summarise(timers[name].seconds[1:]), "total": sum(timers[name].seconds[1:])} for name in names}
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
    results = {name: summarise(values) for name, values in timings.items()}
    pair_ratios = [package / base for package, base in zip(timings["package"], timings["plain_keras_predict"])]
    results["ratio"] = statistics.median(pair_ratios)
    results["pair_ratios"] = summarise(pair_ratios)
    return results
