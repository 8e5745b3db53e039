"""Training a run, stage by stage, in the order the data flows:

    prepare outputs -> load data -> make pipelines -> build the model (and
    resume it) -> fit -> evaluate -> write results (metrics, dashboards) -> export

The seam is `train_and_evaluate(config, datasets=None, placement=None)`:
tests pass small in-memory datasets and a strategy; the CLI passes neither.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import keras
import numpy as np
import tensorflow as tf

from lenet_tf import dashboards
from lenet_tf.callbacks import (
    AtomicCheckpoint, Backup, BackupCallback, BestEpoch, EpochHistory, EpochTensorBoard, HonourStop,
    StopOnNonFiniteLoss, ThroughputCallback, check_workers_resume_together, save_atomically,
)
from lenet_tf.config import TrainConfig, validation_count
from lenet_tf.data import (
    BackgroundLoad, Datasets, evaluation_batch_size, examples_per_epoch, load_datasets, make_dataset,
)
from lenet_tf.distribute import Placement, make_placement, take_back_sigterm
from lenet_tf.errors import StoppedError, UsageError
from lenet_tf.folders import check_unchanged, record_folder
from lenet_tf.io_utils import (
    ensure_writable_dir, full_disk_message, is_full_disk_error, peak_rss_mib, reporting_full_disk,
    write_json_atomic,
)
from lenet_tf.keras_compat import adapt_model_for_multi_worker, build_before_fit
from lenet_tf.model import build_model, whiten_first_conv
from lenet_tf.optimization import build_compiled_model
from lenet_tf.registry import DatasetInfo, resolve_dataset
from lenet_tf.run_dir import RunDir, folder_for_training, holding


class NonFiniteLossError(UsageError):
    pass


@dataclass
class Pipelines:
    """The tf.data pipelines of a run and the sizes they were built from."""

    train: tf.data.Dataset
    validation: tf.data.Dataset
    test: tf.data.Dataset
    # What the training pipeline draws from (without a held-out validation part).
    train_images: np.ndarray
    global_batch_size: int
    replicas: int = 1
    # The held-out validation split, when there is one (else None).
    validation_images: np.ndarray | None = None
    validation_labels: np.ndarray | None = None

    @property
    def train_count(self) -> int:
        """Training examples per epoch (all, but for a few under several replicas: examples_per_epoch)."""
        return examples_per_epoch(len(self.train_images), self.global_batch_size, self.replicas)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.train_count // self.global_batch_size)


def train_and_evaluate(
    config: TrainConfig,
    datasets: Datasets | None = None,
    placement: Placement | None = None,
    out: TextIO | None = None,
    started: float | None = None,
    background_load: BackgroundLoad | None = None,
    extra_callbacks: tuple[keras.callbacks.Callback, ...] = (),
    evaluate_test: bool = True,
    dataset: DatasetInfo | None = None,
) -> dict[str, Any]:
    """Trains, evaluates and exports one run; returns the metrics dict it writes.

    Args:
        config: the run configuration (validated here). A `config.run_dir`
            that holds a finished run is not continued: the run goes to a
            folder beside it (`run_dir.folder_for_training`), said in the
            first line and in the metrics' `run_dir`.
        datasets: in-memory splits to use instead of loading `config.dataset`.
        placement: the strategy to train under; created from the config if None.
        out: where progress lines go (default: sys.stdout as it is at the call).
        started: when the user started waiting (`time.time()`), for the
            metrics' wall times; the CLI passes its process's start. Default: now.
        background_load: the data, if already being read (the CLI starts
            reading before it imports TensorFlow); used when it is for
            `config.dataset` and `config.data_dir`.
        extra_callbacks: Keras callbacks run after the run's own each epoch
            (`lenet-tf tune` reports validation accuracy to its pruner).
        evaluate_test: False for a run that must not see the test split (a
            tuning trial, which chooses on its validation split): no test
            evaluation, and the image dashboards show the validation split.
            Needs `config.validation_split`.
        dataset: what `config.dataset` names, as a value: a folder of
            pictures' FolderDataset.info (its classes, framing and files).
            None: the built-in dataset `config.dataset`.
    """
    clock = Clock(time.time() if started is None else started)
    out = out or sys.stdout
    config.validate(dataset)
    dataset = resolve_dataset(config.dataset, dataset)
    if not evaluate_test and not config.validation_split:
        raise UsageError("a run without the test split needs --validation-split to validate on")
    # The strategy comes first: multi-worker collectives must be set up before
    # any other TensorFlow op runs in this process.
    placement = placement or make_placement(config)
    run_dir = folder_for_training(config.run_dir)
    if run_dir.is_finished():
        print(f"{run_dir} holds the run this SLURM job finished before it was started again; nothing left to "
              "train", file=out, flush=True)
        return json.loads(run_dir.metrics.read_text())
    if run_dir.root != Path(config.run_dir):
        how = "resumes the interrupted run" if run_dir.backup_metadata.is_file() else "is a new run"
        print(f"{config.run_dir} holds a finished run, which is never continued: this one {how} in {run_dir}",
              file=out, flush=True)
        config = dataclasses.replace(config, run_dir=str(run_dir))
    data = datasets if datasets is not None else background_load
    try:
        if placement.is_chief:
            with holding(run_dir, "training"):
                return _run(config, dataset, data, placement, run_dir, run_dir, out, clock, extra_callbacks,
                            evaluate_test)
        # Non-chief workers write to a scratch folder that is removed
        # afterwards, so that only the chief's outputs exist.
        scratch = RunDir(worker_scratch_dir(run_dir.root, placement.task_index))
        try:
            return _run(config, dataset, data, placement, run_dir, scratch, out, clock, extra_callbacks,
                        evaluate_test)
        finally:
            shutil.rmtree(scratch.root, ignore_errors=True)
    except (UsageError, StoppedError):
        raise
    except Exception as error:
        # A full disk can surface from any library that writes (Keras, h5py,
        # TensorFlow's event writer), in any of their exception types.
        if is_full_disk_error(error):
            raise StoppedError(full_disk_message(error, run_dir.root)) from None
        if isinstance(error, tf.errors.OpError) and placement.name == "multi_worker":
            # A collective op failed: a peer died or froze mid-step (or mid-evaluation).
            raise StoppedError(_lost_worker_message(error, config)) from None
        raise


def worker_scratch_dir(run_dir: Path, task_index: int) -> Path:
    """An empty scratch folder for a non-chief worker, named after the run and the worker,
    so a worker restarted after a kill clears what the killed one left."""
    run_key = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
    scratch = Path(tempfile.gettempdir()) / f"lenet-worker{task_index}-{run_key}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    return scratch


@dataclass
class Clock:
    """Time since the user started waiting, and where it went, stage by stage."""

    started: float  # time.time() when the user started waiting.
    stages: dict[str, float] = field(default_factory=dict)

    def seconds(self) -> float:
        return time.time() - self.started

    def mark(self, stage: str) -> None:
        """Ends `stage`: it took the time since the previous mark (or the start)."""
        self.stages[stage] = self.seconds() - sum(self.stages.values())


def _run(config: TrainConfig, dataset: DatasetInfo, datasets: Datasets | BackgroundLoad | None,
         placement: Placement, run_dir: RunDir, write_to: RunDir, out: TextIO, clock: Clock,
         extra_callbacks: tuple[keras.callbacks.Callback, ...] = (), evaluate_test: bool = True) -> dict[str, Any]:
    """The stages of a run on `dataset`. `run_dir` is the run's folder (the chief's backup is
    read from it); `write_to` is where this process writes (a scratch folder on
    non-chief workers). `extra_callbacks`, `evaluate_test`: as train_and_evaluate's."""
    clock.mark("start-up (interpreter, TensorFlow, strategy)")
    _prepare_outputs(config, placement, write_to)
    datasets = _load_data(config, dataset, datasets)
    clock.mark("data")
    pipelines = _make_pipelines(config, datasets, placement.replicas)
    layout = f" ({datasets.layout})" if datasets.layout else ""
    print(f"training on {pipelines.train_count} {config.dataset} images from {datasets.source}{layout}; "
          f"strategy {placement.name} over {placement.replicas} replica(s) {', '.join(placement.devices)}; "
          f"global batch {pipelines.global_batch_size}", file=out, flush=True)
    # A folder of pictures: a resume refuses a folder that changed, before the backup is restored
    # (a class added or removed would make the backup not load, read as a damaged backup).
    check_unchanged(dataset.folder, run_dir.root, resuming=Backup(run_dir.backup).record_path.exists())
    model, epochs_done = _build_model(config, dataset, placement, pipelines, run_dir)
    record_folder(dataset.folder, write_to.root)
    # After the resume: a resume that fails keeps the interrupted run's config.
    config.write(write_to.config)
    clock.mark("pipelines and model")
    throughput = ThroughputCallback(pipelines.train_count)
    # A run kept from the test split shows its validation split in the image dashboards.
    shown = datasets if evaluate_test else dataclasses.replace(
        datasets, test_images=pipelines.validation_images, test_labels=pipelines.validation_labels)
    callbacks = make_callbacks(config, write_to, shown, throughput, placement.is_chief, dataset) + list(extra_callbacks)
    history, epochs_run, kept_epoch = _fit(config, model, pipelines, epochs_done, callbacks, write_to, out)
    clock.mark("fit (training, validation, checkpoints, epoch dashboards)")
    evaluation = _evaluate(config, model, pipelines, history, epochs_run, clock, kept_epoch, evaluate_test)
    clock.mark("test evaluation")
    metrics = _metrics(config, dataset, placement, shown, pipelines, history, epochs_run, evaluation, throughput)
    if config.early_stopping_patience:
        metrics["kept_epoch"] = len(history.get("loss", [])) if kept_epoch is None else kept_epoch + 1
    _write_results_and_export(config, dataset, model, datasets, metrics, write_to, callbacks, clock,
                              export=placement.is_chief and bool(config.export_formats))
    metrics["wall_seconds"] = clock.seconds()
    # A list, not a dict: metrics.json sorts keys, and the stages read in the order they ran.
    metrics["stage_seconds"] = [[stage, seconds] for stage, seconds in clock.stages.items()]
    metrics["training_seconds"] = sum(throughput.epoch_seconds)
    # Training, evaluation and the in-process part of the export; the parity
    # check and ONNX conversion run in child processes of their own.
    metrics["peak_rss_mib"] = peak_rss_mib()
    with reporting_full_disk(write_to.metrics):
        write_json_atomic(write_to.metrics, metrics)
    if placement.is_chief:
        Backup(write_to.backup).clear()  # The run is complete: nothing left to resume.
    _print_summary(metrics, placement, out)
    return metrics


def _prepare_outputs(config: TrainConfig, placement: Placement, write_to: RunDir) -> None:
    """Fails in the first second, not after an hour, when outputs cannot be written."""
    ensure_writable_dir(write_to.root, "run directory")
    if placement.is_chief and config.export_formats:
        from lenet_tf.export import check_can_export

        check_can_export(config)


def _load_data(config: TrainConfig, dataset: DatasetInfo, datasets: Datasets | BackgroundLoad | None) -> Datasets:
    if isinstance(datasets, BackgroundLoad):
        datasets = datasets.result(dataset, config.data_dir)
    if datasets is None:
        datasets = load_datasets(dataset, config.data_dir)
    datasets = datasets.limited(config.limit_train, config.limit_test)
    if len(datasets.train_images) == 0 or len(datasets.test_images) == 0:
        raise UsageError("the training or test split is empty; check the data files and --limit-train/--limit-test")
    if any(index >= len(datasets.test_images) for index in config.activation_indices):
        raise UsageError(f"--activation-indices must be below the {len(datasets.test_images)} test examples")
    return datasets


def _make_pipelines(config: TrainConfig, datasets: Datasets, replicas: int) -> Pipelines:
    """Training, validation and test pipelines.

    With a validation split, hyperparameters are chosen on a seeded, held-out
    part of the training split and the test split is only evaluated once, at
    the end; without one, validation runs on the test split, as in the book.
    """
    keras.utils.set_random_seed(config.seed)
    global_batch_size = config.batch_size * replicas
    train_images, train_labels = datasets.train_images, datasets.train_labels
    _check_enough_for_the_replicas("test split", len(datasets.test_images), global_batch_size, replicas,
                                   "--limit-test")
    test = make_dataset(datasets.test_images, datasets.test_labels, global_batch_size, False, config.seed,
                        replicas=replicas)
    validation = test
    validation_images = validation_labels = None
    if config.validation_split:
        order = np.random.default_rng(config.seed).permutation(len(train_images))
        held_out = order[: validation_count(len(order), config.validation_split)]
        kept = order[len(held_out):]
        _check_enough_for_the_replicas("validation split", len(held_out), global_batch_size, replicas,
                                       "--validation-split")
        validation_images, validation_labels = train_images[held_out], train_labels[held_out]
        validation = make_dataset(validation_images, validation_labels, global_batch_size, False,
                                  config.seed, replicas=replicas)
        train_images, train_labels = train_images[kept], train_labels[kept]
    if global_batch_size > len(train_images):
        raise UsageError(
            f"the global batch size {global_batch_size} is larger than the {len(train_images)} "
            "training examples; lower --batch-size or raise --limit-train"
            + (" or lower --validation-split" if config.validation_split else "")
        )
    train = make_dataset(train_images, train_labels, global_batch_size, True, config.seed, augment=config.augment,
                         replicas=replicas)
    return Pipelines(train, validation, test, train_images, global_batch_size, replicas, validation_images,
                     validation_labels)


def _check_enough_for_the_replicas(split: str, count: int, global_batch_size: int, replicas: int,
                                   flag: str) -> None:
    """Every replica must evaluate a share of every batch (data.evaluation_batch_size says why)."""
    if count == 0:
        raise UsageError(f"the {split} is empty; raise {flag}")
    if evaluation_batch_size(count, global_batch_size, replicas) is None:
        raise UsageError(f"the {split}'s {count} example(s) cannot be shared among the {replicas} replicas that "
                         f"evaluate it (each needs a share of every batch); change {flag} so that it holds a "
                         f"multiple of {replicas} examples, or run on fewer devices")


def _read_config(run_dir: RunDir) -> TrainConfig | None:
    """The config an earlier run wrote into this run folder, if it can be read."""
    try:
        return TrainConfig.read(run_dir.config) if run_dir.config.exists() else None
    except UsageError:
        return None


def _build_model(config: TrainConfig, dataset: DatasetInfo, placement: Placement, pipelines: Pipelines,
                 run_dir: RunDir) -> tuple[keras.Model, int]:
    """The compiled model, restored from the run's backup when there is one;
    returns it with the number of epochs it has already trained.

    Every worker of a multi-worker run restores from the chief's backup (the
    weights are the same on all of them), and all check that they resume together.
    A resume with settings that change what the run computes is refused,
    naming the settings that changed since the interrupted run (its config.json).
    """
    backup = Backup(run_dir.backup)
    try:
        epochs_done, damage = backup.epochs_done(), None
    except UsageError as error:
        epochs_done, damage = -1, error
    # Before any other collective op: a worker that would resume elsewhere
    # would otherwise run different collectives and wait forever. Other
    # workers wait for this one here, so it takes part even when damaged.
    check_workers_resume_together(placement.strategy, epochs_done, backup.directory)
    if damage:
        raise damage
    if epochs_done:
        # Keras would load such a backup anyway where the shapes allow, and
        # quietly skip an optimizer whose slots differ (--momentum 0.9 -> 0):
        # its step count too, so the rate schedule would start over.
        changed = _changed_settings_error(config, _read_config(run_dir), backup.directory)
        if changed:
            raise changed
    with placement.strategy.scope():
        model = build_compiled_model(config, pipelines.steps_per_epoch, dataset)
        if config.whiten_first_conv and not epochs_done:
            # From the training images only; a resumed run's kernels come from its backup.
            whiten_first_conv(model, pipelines.train_images)
        backup.restore(model)
    if placement.name == "multi_worker":
        adapt_model_for_multi_worker(model, placement.strategy, pipelines.train.element_spec)  # Builds it too.
    else:
        build_before_fit(model, placement.strategy, pipelines.train.element_spec)
    return model, epochs_done


# Where a run reads and writes, where it runs and what it reports, not what
# it computes: free to differ on resume (the preset's name is only a record).
_FREE_ON_RESUME = ("run_dir", "export_dir", "data_dir", "worker_hosts", "task_index", "strategy", "logical_cpus",
                   "steps_per_execution", "preset", "model_name", "export_formats", "tensorboard_update_freq",
                   "histogram_freq", "profile_batch", "image_every_epochs", "activation_indices")


def _changed_settings_error(config: TrainConfig, interrupted_config: TrainConfig | None,
                            backup_dir: Path) -> UsageError | None:
    """A resume continues the interrupted run: with other model, data or
    training settings it would be half one run and half another, or not load
    at all. Names the settings that changed, or None when none did."""
    if interrupted_config is None:
        return None
    before, now = interrupted_config.to_json_dict(), config.to_json_dict()
    changed = [f"--{name.replace('_', '-')} {before.get(name)} -> {value}" for name, value in now.items()
               if name not in _FREE_ON_RESUME and before.get(name) != value]
    if not changed:
        return None
    return UsageError(f"the backup in {backup_dir} was written by a run with other settings "
                      f"({'; '.join(changed)}); resume with that run's flags (its config.json), delete "
                      "that folder to start over, or pass another --run-dir")


def make_callbacks(config: TrainConfig, write_to: RunDir, datasets: Datasets, throughput: ThroughputCallback,
                   is_chief: bool = True, dataset: DatasetInfo | None = None) -> list[keras.callbacks.Callback]:
    """Every callback of a training run, in the order they must run (only the chief backs up).
    `dataset`: as train_and_evaluate's."""
    info = resolve_dataset(config.dataset, dataset)
    history = EpochHistory(write_to.history)
    callbacks = [
        HonourStop(),
        throughput,  # Before the others, so they see examples_per_sec in the logs.
        StopOnNonFiniteLoss(),
        # An epoch's history, checkpoint and dashboards are written before its
        # backup, so a kill in between never leaves a backed-up epoch unrecorded.
        history,
        AtomicCheckpoint(write_to.checkpoint),
        # After the history, which it reads the best epoch from.
        *([BestEpoch(write_to.best_weights, history, config.early_stopping_patience)]
          if config.early_stopping_patience else []),
        dashboards.ImageDashboardsCallback(
            write_to.logs, datasets.test_images, datasets.test_labels, info.class_names,
            config.image_every_epochs, config.activation_indices, seed=config.seed,
        ),
        EpochTensorBoard(
            log_dir=str(write_to.logs),
            update_freq=int(config.tensorboard_update_freq) if config.tensorboard_update_freq.isdigit()
            else config.tensorboard_update_freq,
            histogram_freq=config.histogram_freq,
            profile_batch=config.profile_batch or 0,
        ),
    ]
    if is_chief:
        callbacks.append(BackupCallback(Backup(write_to.backup)))
    return callbacks


def _fit(config: TrainConfig, model: keras.Model, pipelines: Pipelines, epochs_done: int,
         callbacks: list[keras.callbacks.Callback], write_to: RunDir,
         out: TextIO) -> tuple[dict[str, list[float]], int, int | None]:
    """Runs model.fit from the first epoch not yet done; returns the whole run's
    history (every epoch, including those before an interruption), how many
    epochs this session ran, and the index of the epoch whose weights the
    model holds when that is not the last (early stopping keeps the best)."""
    dashboards.write_hparams_start(write_to.logs, config, run_name=config.run_dir)
    # Again here: a multi-worker runtime may install its own SIGTERM handler
    # after the strategy was created, and a stop must still stop the run.
    take_back_sigterm()
    best = next((callback for callback in callbacks if isinstance(callback, BestEpoch)), None)
    if best and best.stopped():
        epochs_done = config.epochs  # It stopped early: the same command again trains nothing more.
    session = model.fit(
        pipelines.train,
        epochs=config.epochs,
        initial_epoch=min(epochs_done, config.epochs),
        validation_data=pipelines.validation,
        callbacks=callbacks,
        # The progress bar on a terminal; one line per epoch in logs and CI.
        verbose=1 if out.isatty() else 2,
        shuffle=False,  # The pipeline already shuffles, seeded, per epoch.
    )
    epochs_run = len(session.history.get("loss", []))
    last_loss = session.history["loss"][-1] if epochs_run else float("nan")
    if epochs_run and not math.isfinite(last_loss):
        raise NonFiniteLossError(
            f"training stopped: the loss became {last_loss} (diverged); lower --learning-rate "
            f"(was {config.learning_rate}). The last good checkpoint is in {RunDir(config.run_dir).checkpoint}"
        )
    history = _callback_of_type(callbacks, EpochHistory).as_history()
    kept = best.restore_best(model) if best else None
    if kept is not None:
        print(f"kept the weights of epoch {kept + 1} of {len(history['loss'])}, the best on the validation split "
              f"(accuracy {history['val_accuracy'][kept]:.3f}, against {history['val_accuracy'][-1]:.3f} for the "
              "last)", file=out, flush=True)
        # The run's checkpoint is what `lenet-tf export --run-dir` exports: the kept weights too.
        save_atomically(model, write_to.checkpoint)
    return history, epochs_run, kept


def _callback_of_type(callbacks: list[keras.callbacks.Callback], kind: type):
    """The run's one callback of `kind` (make_callbacks adds exactly one of each)."""
    return next(callback for callback in callbacks if isinstance(callback, kind))


def _lost_worker_message(error: tf.errors.OpError, config: TrainConfig) -> str:
    """One line for a multi-worker run whose peer died or froze mid-step."""
    tasks = sorted(set(re.findall(r"/job:worker/replica:\d+/task:(\d+)", str(error.message))))
    which = f"worker {', '.join(tasks)}" if tasks else "a worker"
    return (f"{which} of this multi-worker run was lost ({type(error).__name__}); restart every worker with the "
            f"same command to resume from the chief's last backup in {RunDir(config.run_dir).backup}")


def _evaluate(config: TrainConfig, model: keras.Model, pipelines: Pipelines, history: dict[str, list[float]],
              epochs_run: int, clock: Clock, kept_epoch: int | None = None,
              evaluate_test: bool = True) -> dict[str, float]:
    """The test split, evaluated once (unless `evaluate_test` is False); the validation split too when there is one."""
    # fit has already evaluated these weights on its validation data, after
    # the last epoch or the kept one; a second pass would compute the same numbers.
    epoch = -1 if kept_epoch is None else kept_epoch
    last_validation = (history["val_loss"][epoch], history["val_accuracy"][epoch]) \
        if epochs_run and "val_loss" in history else None
    evaluation: dict[str, float] = {}
    if evaluate_test:
        if config.validation_split or last_validation is None:
            test_loss, test_accuracy = model.evaluate(pipelines.test, verbose=0)
        else:
            test_loss, test_accuracy = last_validation  # Validation ran on the test split, as in the book.
        evaluation.update(test_loss=float(test_loss), test_accuracy=float(test_accuracy))
    # The time a user waits for a trained and tested model, before any export.
    evaluation["seconds_to_tested_model"] = clock.seconds()
    if config.validation_split:
        validation_loss, validation_accuracy = last_validation or model.evaluate(pipelines.validation, verbose=0)
        evaluation.update(validation_loss=float(validation_loss), validation_accuracy=float(validation_accuracy))
    return evaluation


def _metrics(config: TrainConfig, dataset: DatasetInfo, placement: Placement, datasets: Datasets,
             pipelines: Pipelines, history: dict[str, list[float]], epochs_run: int, evaluation: dict[str, float],
             throughput: ThroughputCallback) -> dict[str, Any]:
    return {
        "dataset": config.dataset,
        "run_dir": config.run_dir,
        "class_names": list(dataset.class_names),
        "train_loss": history["loss"][-1] if history else float("nan"),
        "train_accuracy": history["accuracy"][-1] if history else float("nan"),
        **evaluation,
        # None, not NaN, when no epoch ran: NaN is not JSON that other tools read.
        "examples_per_sec": throughput.examples_per_sec(),
        "epochs": config.epochs,
        "epochs_run_this_session": epochs_run,
        "strategy": placement.name,
        "replicas": placement.replicas,
        "devices": list(placement.devices),
        "global_batch_size": pipelines.global_batch_size,
        "train_examples": pipelines.train_count,
        "validation": (f"{config.validation_split:.0%} of the training split" if config.validation_split
                       else "test split"),
        "test_examples": len(datasets.test_images) if "test_accuracy" in evaluation else 0,
        "history": history,
        "exports": {},
    }


def _write_results(config: TrainConfig, metrics: dict[str, Any], write_to: RunDir,
                   callbacks: list[keras.callbacks.Callback]) -> None:
    """The final image dashboards and metrics in TensorBoard, and the book's curves as a PNG."""
    _callback_of_type(callbacks, dashboards.ImageDashboardsCallback).write_final()
    dashboards.write_final_metrics(write_to.logs, metrics, step=config.epochs - 1)
    with reporting_full_disk(write_to.curves):
        dashboards.write_curves_png(metrics["history"], write_to.curves,
                                    validation_label="validation acc" if config.validation_split else "test acc")


def _write_results_and_export(config: TrainConfig, dataset: DatasetInfo, model: keras.Model, datasets: Datasets,
                              metrics: dict[str, Any], write_to: RunDir, callbacks: list[keras.callbacks.Callback],
                              clock: Clock, export: bool) -> None:
    """The final dashboards and the export; with an export, the final figures
    (mostly matplotlib) are drawn in a second thread while this one exports
    (mostly TensorFlow's converter and the parity check's process)."""
    # Here, never beside the export: its trace switches on TensorFlow's
    # graph tracing for the whole process.
    dashboards.write_op_graph(write_to.logs, model)
    if not export:
        _write_results(config, metrics, write_to, callbacks)
        clock.mark("final dashboards and curves")
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="final-dashboards") as drawer:
        # A copy: the export adds keys to `metrics` while the figures read it.
        drawing = drawer.submit(_write_results, config, dict(metrics), write_to, callbacks)
        _export(config, dataset, model, datasets, metrics)
        clock.mark("export and its parity check (final dashboards drawn meanwhile)")
        drawing.result()
    clock.mark("final dashboards and curves (after the export)")


def _export(config: TrainConfig, dataset: DatasetInfo, model: keras.Model, datasets: Datasets,
            metrics: dict[str, Any]) -> None:
    from lenet_tf.export import export_model

    # Export a plain copy built outside the strategy: the exported graph then
    # holds ordinary variables, and the parity check's predict runs locally
    # (under multi-worker, a chief-only predict on the distributed model
    # would wait forever for the other workers).
    plain_model = build_model(config, dataset)
    plain_model.set_weights(model.get_weights())
    export = export_model(plain_model, config, datasets, metrics, dataset=dataset)
    metrics["exports"] = {key: str(path) for key, path in export.artifacts.items()}
    metrics["export_version_dir"] = str(export.version_dir)


def _print_summary(metrics: dict[str, Any], placement: Placement, out: TextIO) -> None:
    """The book's summary lines, plus how long the user waited for a tested model."""
    device_kind = "GPU" if any("GPU" in device.upper() for device in placement.devices) else "CPU"
    held_out = f"test acc {metrics['test_accuracy']:.3f}" if "test_accuracy" in metrics else \
        f"validation acc {metrics['validation_accuracy']:.3f} (test split not used)"
    print(f"loss {metrics['train_loss']:.3f}, train acc {metrics['train_accuracy']:.3f}, "
          f"{held_out}, tested after {metrics['seconds_to_tested_model']:.1f} s", file=out)
    if metrics["examples_per_sec"] is None:
        print(f"no epochs left to train: the backup held all {metrics['epochs']}", file=out)
    else:
        print(f"{metrics['examples_per_sec']:.1f} examples/sec on {device_kind} ({', '.join(placement.devices)})",
              file=out)
    if metrics["exports"]:
        print(f"exported to {metrics['export_version_dir']} ({metrics['wall_seconds']:.1f} s in all)",
              file=out, flush=True)
