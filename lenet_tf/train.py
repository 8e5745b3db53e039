"""Training: strategy, compile, callbacks, model.fit, metrics, export.

The seam is `train_and_evaluate(config, datasets=None, placement=None)`:
tests pass small in-memory datasets and a strategy; the CLI passes neither.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import keras
import numpy as np
import tensorflow as tf

from lenet_tf import dashboards
from lenet_tf.callbacks import (
    AtomicCheckpoint, ChiefBackupReader, EpochHistory, EpochTensorBoard, GuardedBackupAndRestore, StopOnNonFiniteLoss,
    ThroughputCallback,
)
from lenet_tf.config import TrainConfig
from lenet_tf.data import CLASS_NAMES, Datasets, load_datasets, make_dataset
from lenet_tf.distribute import Placement, adapt_model_for_multi_worker, make_placement
from lenet_tf.errors import UsageError
from lenet_tf.io_utils import ensure_writable_dir, peak_rss_mib, write_json_atomic
from lenet_tf.model import build_model

# Names of the files and folders inside a run directory, in one place.
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
LOGS_DIR = "logs"
CHECKPOINT_FILE = "checkpoints/last.keras"
BACKUP_DIR = "backup"
CURVES_FILE = "curves.png"
HISTORY_FILE = "history.json"


class NonFiniteLossError(UsageError):
    pass


@keras.saving.register_keras_serializable(package="lenet_tf")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy on logits against integer labels with label smoothing.

    Keras's sparse cross-entropy has no label_smoothing; this is the same loss
    as CategoricalCrossentropy(label_smoothing=s) on one-hot labels, without
    one-hot labels in the pipeline:
    (1 - s) * -log p[y] + s * mean over classes of -log p[k].
    """

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        log_probabilities = keras.ops.log_softmax(y_pred, axis=-1)
        labels = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        true_class = -keras.ops.take_along_axis(log_probabilities, labels[:, None], axis=-1)[:, 0]
        uniform = -keras.ops.mean(log_probabilities, axis=-1)
        return (1.0 - self.label_smoothing) * true_class + self.label_smoothing * uniform

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int):
    """A constant rate, or linear warm-up then cosine decay to 0 over the run."""
    if config.lr_schedule == "constant" and not config.warmup_epochs:
        return config.learning_rate
    total_steps = max(1, config.epochs * steps_per_epoch)
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
    if config.lr_schedule == "constant":
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            [warmup_steps], [config.learning_rate * 0.1, config.learning_rate])
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else config.learning_rate,
        warmup_target=config.learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
        decay_steps=max(1, total_steps - warmup_steps),
    )


def build_compiled_model(config: TrainConfig, steps_per_epoch: int = 1) -> keras.Model:
    """The model, compiled as the book does (SGD, cross-entropy on logits,
    accuracy), plus the optional momentum, weight decay, schedule and label
    smoothing of the modern preset.

    Call inside `strategy.scope()` so the variables are mirrored.
    """
    model = build_model(config)
    loss = (SmoothedSparseCrossentropy(config.label_smoothing) if config.label_smoothing
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate=learning_rate_schedule(config, steps_per_epoch),
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay or None,
        ),
        loss=loss,
        metrics=["accuracy"],
        steps_per_execution=effective_steps_per_execution(config),
    )
    return model


def effective_steps_per_execution(config: TrainConfig) -> int:
    """`config.steps_per_execution` under the default strategy, 1 under any other.

    Keras 3.15's multi-step loop fails inside tf.distribute strategies
    ("You must feed a value for placeholder tensor ..."), measured with
    mirrored and multi-worker runs here; one step per call is what works there.
    """
    return config.steps_per_execution if not tf.distribute.has_strategy() else 1


def make_callbacks(config: TrainConfig, write_dir: Path, datasets: Datasets,
                   throughput: ThroughputCallback, chief_run_dir: Path | None = None) -> list[keras.callbacks.Callback]:
    """Every callback of a training run, in the order they must run.

    `chief_run_dir` is given on non-chief workers: they restore from the
    chief's backup there instead of keeping one of their own.
    """
    logs_dir = write_dir / LOGS_DIR
    if chief_run_dir is None:
        # double_checkpoint keeps the previous backup, used if the latest one
        # was cut short by a kill mid-write.
        backup = GuardedBackupAndRestore(str(write_dir / BACKUP_DIR), double_checkpoint=True)
    else:
        backup = ChiefBackupReader(str(chief_run_dir / BACKUP_DIR), double_checkpoint=True)
    return [
        throughput,  # First, so the others see examples_per_sec in the logs.
        StopOnNonFiniteLoss(),
        # An epoch's history and checkpoint are written before its backup, so
        # a kill in between never leaves a backed-up epoch unrecorded.
        EpochHistory(write_dir / HISTORY_FILE),
        AtomicCheckpoint(write_dir / CHECKPOINT_FILE),
        backup,
        dashboards.ImageDashboardsCallback(
            logs_dir, datasets.test_images, datasets.test_labels, CLASS_NAMES[config.dataset],
            config.image_every_epochs, config.activation_indices, seed=config.seed,
        ),
        EpochTensorBoard(
            log_dir=str(logs_dir),
            update_freq=int(config.tensorboard_update_freq)
            if config.tensorboard_update_freq.isdigit()
            else config.tensorboard_update_freq,
            histogram_freq=config.histogram_freq,
            profile_batch=config.profile_batch or 0,
        ),
    ]


def train_and_evaluate(
    config: TrainConfig,
    datasets: Datasets | None = None,
    placement: Placement | None = None,
    out: TextIO = sys.stdout,
) -> dict[str, Any]:
    """Trains, evaluates and exports one run; returns the metrics dict it writes.

    Args:
        config: the validated run configuration.
        datasets: in-memory splits to use instead of loading `config.dataset`.
        placement: the strategy to train under; created from the config if None.
        out: where progress lines go.
    """
    config.validate()
    started = time.perf_counter()
    # The strategy comes first: multi-worker collectives must be set up before
    # any other TensorFlow op runs in this process.
    placement = placement or make_placement(config)
    run_dir = Path(config.run_dir)
    # Non-chief workers write to a scratch folder that is removed afterwards,
    # so that only the chief's outputs exist. Its name is fixed per run and
    # worker, so a worker restarted after a kill clears what the killed one left.
    write_dir = run_dir if placement.is_chief else worker_scratch_dir(run_dir, placement.task_index)
    try:
        return _run(config, datasets, placement, run_dir, write_dir, started, out)
    finally:
        if not placement.is_chief:
            shutil.rmtree(write_dir, ignore_errors=True)


def worker_scratch_dir(run_dir: Path, task_index: int) -> Path:
    """An empty scratch folder for a non-chief worker, named after the run and the worker."""
    run_key = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
    scratch = Path(tempfile.gettempdir()) / f"lenet-worker{task_index}-{run_key}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    return scratch


def _make_pipelines(config: TrainConfig, datasets: Datasets, global_batch_size: int):
    """Training, validation and test pipelines, and the number of training examples.

    With a validation split, hyperparameters are chosen on a seeded, held-out
    part of the training split and the test split is only evaluated once, at
    the end; without one, validation runs on the test split, as in the book.
    """
    train_images, train_labels = datasets.train_images, datasets.train_labels
    test_data = make_dataset(datasets.test_images, datasets.test_labels, global_batch_size, False, config.seed)
    validation_data = test_data
    if config.validation_split:
        order = np.random.default_rng(config.seed).permutation(len(train_images))
        held_out = order[: int(round(len(order) * config.validation_split))]
        kept = order[len(held_out):]
        validation_data = make_dataset(train_images[held_out], train_labels[held_out], global_batch_size,
                                       False, config.seed)
        train_images, train_labels = train_images[kept], train_labels[kept]
    train_data = make_dataset(train_images, train_labels, global_batch_size, True, config.seed,
                              augment=config.augment)
    return train_data, validation_data, test_data, len(train_images)


def _run(config, datasets, placement, run_dir, write_dir, started, out) -> dict[str, Any]:
    # Fail in the first second, not after an hour, when outputs cannot be written.
    ensure_writable_dir(write_dir, "run directory")
    if placement.is_chief and config.export_formats:
        from lenet_tf.export import check_export_dependencies

        check_export_dependencies(config.export_formats)
        ensure_writable_dir(Path(config.export_dir), "export directory")
    if datasets is None:
        datasets = load_datasets(config.dataset, config.data_dir)
    datasets = datasets.limited(config.limit_train, config.limit_test)
    if len(datasets.train_images) == 0 or len(datasets.test_images) == 0:
        raise UsageError("the training or test split is empty; check the data files and --limit-train/--limit-test")
    if any(index >= len(datasets.test_images) for index in config.activation_indices):
        raise UsageError(
            f"--activation-indices must be below the {len(datasets.test_images)} test examples"
        )

    keras.utils.set_random_seed(config.seed)
    global_batch_size = config.batch_size * placement.replicas
    train_data, validation_data, test_data, train_count = _make_pipelines(config, datasets, global_batch_size)
    if global_batch_size > train_count:
        raise UsageError(
            f"the global batch size {global_batch_size} is larger than the {train_count} "
            "training examples; lower --batch-size or raise --limit-train"
        )
    steps_per_epoch = -(-train_count // global_batch_size)

    config.write(write_dir / CONFIG_FILE)
    print(
        f"training on {train_count} {config.dataset} images from {datasets.source}; "
        f"strategy {placement.name} over {placement.replicas} replica(s) {', '.join(placement.devices)}; "
        f"global batch {global_batch_size}",
        file=out,
        flush=True,
    )
    with placement.strategy.scope():
        model = build_compiled_model(config, steps_per_epoch)
    if placement.name == "multi_worker":
        adapt_model_for_multi_worker(model, placement.strategy, next(iter(train_data)))
    logs_dir = write_dir / LOGS_DIR
    dashboards.write_hparams_start(logs_dir, config, run_name=str(run_dir))
    throughput = ThroughputCallback(train_count)
    callbacks = make_callbacks(config, write_dir, datasets, throughput,
                               chief_run_dir=None if placement.is_chief else run_dir)
    history = model.fit(
        train_data,
        epochs=config.epochs,
        validation_data=validation_data,
        callbacks=callbacks,
        # The progress bar on a terminal; one line per epoch in logs and CI.
        verbose=1 if out.isatty() else 2,
        shuffle=False,  # The pipeline already shuffles, seeded, per epoch.
    )
    epochs_run = len(history.history.get("loss", []))
    last_loss = history.history["loss"][-1] if epochs_run else float("nan")
    if epochs_run and not math.isfinite(last_loss):
        raise NonFiniteLossError(
            f"training stopped: the loss became {last_loss} (diverged); lower --learning-rate "
            f"(was {config.learning_rate}). The last good checkpoint is in {write_dir / CHECKPOINT_FILE}"
        )
    test_loss, test_accuracy = model.evaluate(test_data, verbose=0)
    if config.validation_split:
        validation_loss, validation_accuracy = model.evaluate(validation_data, verbose=0)
    # Every epoch of the run, including those before an interruption.
    full_history = next(c for c in callbacks if isinstance(c, EpochHistory)).as_history()
    metrics: dict[str, Any] = {
        "dataset": config.dataset,
        "train_loss": full_history["loss"][-1] if full_history else float("nan"),
        "train_accuracy": full_history["accuracy"][-1] if full_history else float("nan"),
        "test_loss": float(test_loss),
        "test_accuracy": float(test_accuracy),
        "examples_per_sec": float(throughput.examples_per_sec()),
        "epochs": config.epochs,
        "epochs_run_this_session": epochs_run,
        "strategy": placement.name,
        "replicas": placement.replicas,
        "devices": list(placement.devices),
        "global_batch_size": global_batch_size,
        "train_examples": train_count,
        "validation": "test split" if not config.validation_split else f"{config.validation_split:.0%} of the training split",
        "test_examples": len(datasets.test_images),
        "history": full_history,
        "exports": {},
    }
    if config.validation_split:
        metrics["validation_loss"], metrics["validation_accuracy"] = float(validation_loss), float(validation_accuracy)
    dashboards.write_final_metrics(logs_dir, metrics, step=config.epochs - 1)
    dashboards.write_op_graph(logs_dir, model)
    dashboards.write_curves_png(full_history, write_dir / CURVES_FILE)
    if placement.is_chief and config.export_formats:
        from lenet_tf.export import export_model

        # Export a plain copy built outside the strategy: the exported graph
        # then holds ordinary variables, and the parity check's predict runs
        # locally (under multi-worker, a chief-only predict on the distributed
        # model would wait forever for the other workers).
        plain_model = build_model(config)
        plain_model.set_weights(model.get_weights())
        export = export_model(plain_model, config, datasets, metrics)
        metrics["exports"] = {key: str(path) for key, path in export.artifacts.items()}
        metrics["export_version_dir"] = str(export.version_dir)
    metrics["wall_seconds"] = time.perf_counter() - started
    # Training, evaluation and the in-process part of the export; the parity
    # check and ONNX conversion run in child processes of their own.
    metrics["peak_rss_mib"] = peak_rss_mib()
    write_json_atomic(write_dir / METRICS_FILE, metrics)
    device_kind = "GPU" if any("GPU" in device.upper() for device in placement.devices) else "CPU"
    print(
        f"loss {metrics['train_loss']:.3f}, train acc {metrics['train_accuracy']:.3f}, "
        f"test acc {metrics['test_accuracy']:.3f}",
        file=out,
    )
    print(f"{metrics['examples_per_sec']:.1f} examples/sec on {device_kind} ({', '.join(placement.devices)})", file=out)
    if metrics["exports"]:
        print(f"exported to {metrics['export_version_dir']}", file=out, flush=True)
    return metrics

