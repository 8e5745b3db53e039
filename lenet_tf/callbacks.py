"""The callbacks of a training run.

Keras dispatches training steps asynchronously only while no callback does
work after each batch; one that does forces a device sync every step, which
cost about 30 % of a LeNet epoch here. So every callback of a run works at
epoch granularity, and those that override the batch hooks without using
them say so with `async_safe`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import keras

from lenet_tf import stop
from lenet_tf.errors import UsageError
from lenet_tf.io_utils import reporting_full_disk, write_json_atomic
from lenet_tf.run_dir import BACKUP_RECORD_FILE


class HonourStop(keras.callbacks.Callback):
    """Raises a stop's interrupt again at each batch and epoch, when its first
    one was lost (see lenet_tf/stop.py): the run stops there, as it would have.
    At the start of each batch, whose hooks get no logs: nothing waits for a step."""

    async_safe = True

    def on_epoch_begin(self, epoch, logs=None):
        stop.raise_if_requested()

    def on_train_batch_begin(self, batch, logs=None):
        stop.raise_if_requested()

    def on_test_batch_begin(self, batch, logs=None):
        stop.raise_if_requested()


class ThroughputCallback(keras.callbacks.Callback):
    """Measures training examples/sec per epoch, excluding validation.

    The clock runs from the start of an epoch to the start of its validation
    pass. The number goes into the epoch logs, so History and TensorBoard
    both record it.
    """

    def __init__(self, examples_per_epoch: int):
        super().__init__()
        self.examples_per_epoch = examples_per_epoch
        self.epoch_seconds: list[float] = []
        self._epoch_start = 0.0
        self._train_end: float | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._train_end = None

    def on_test_begin(self, logs=None):
        if self._train_end is None:
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        end = self._train_end or time.perf_counter()
        seconds = end - self._epoch_start
        self.epoch_seconds.append(seconds)
        if logs is not None:
            logs["examples_per_sec"] = self.examples_per_epoch / seconds

    def examples_per_sec(self) -> float | None:
        """Throughput over the epochs after the first, which pays for tracing;
        None when no epoch ran (a resumed run whose backup had every epoch)."""
        steady = self.epoch_seconds[1:] or self.epoch_seconds
        return self.examples_per_epoch * len(steady) / sum(steady) if steady else None


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras's TensorBoard callback, marked async-safe when it writes per epoch
    and does not profile: its batch hook then only writes the model graph once.

    Each epoch's scalars are flushed to disk at the end of the epoch, before
    the run's backup records it: a run killed after a backup resumes after
    that epoch, so its curves would otherwise keep a hole where the queued,
    never-written scalars were. (Keras keeps the writers in the private
    `_writers`, verified on 3.15; tests/test_resume.py finds the hole if that changes.)
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.async_safe = self.update_freq == "epoch" and not kwargs.get("profile_batch")

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        for writer in self._writers.values():
            writer.flush()


def _finite_loss(logs) -> bool:
    return math.isfinite(float((logs or {}).get("loss", 0.0)))


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training after an epoch whose loss is NaN or Inf.

    Keras's TerminateOnNaN checks every batch, which forces a sync per step;
    a diverged run is caught one epoch later here, at no per-step cost, and
    the checkpoint and backup callbacks below refuse to save that epoch.
    """

    def on_epoch_end(self, epoch, logs=None):
        if not _finite_loss(logs):
            self.model.stop_training = True


class Backup:
    """A run's backup: the weights with the optimizer's state, and how many epochs they have seen.

    Keras's BackupAndRestore writes its weights and its epoch record in place,
    one after the other, so a kill or a full disk mid-write leaves a pair that
    does not load. Here every epoch's weights go to a new file, and a small
    record that names that file is then renamed into place: at every instant
    the record names complete weights of the epoch it states.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.record_path = self.directory / BACKUP_RECORD_FILE

    def epochs_done(self) -> int:
        """Epochs the backup holds (0 without a backup); raises UsageError if it is damaged."""
        record = self._record()
        return int(record["epoch"]) if record else 0

    def _record(self) -> dict | None:
        if not self.record_path.exists():
            return None
        try:
            record = json.loads(self.record_path.read_text())
            int(record["epoch"])
            if not (self.directory / str(record["weights"])).is_file():
                raise FileNotFoundError(f"{record['weights']} is missing")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise self._damaged(error) from None
        return record

    def restore(self, model: keras.Model) -> int:
        """Loads the backed-up weights and optimizer state into `model`; returns the epochs done.

        Call inside the strategy's scope: the optimizer's variables are
        created here if training has not created them yet.
        """
        record = self._record()
        if not record:
            return 0
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        try:
            model.load_weights(self.directory / record["weights"])
        except Exception as error:  # h5py and Keras raise many types for a damaged file.
            raise self._damaged(error) from None
        return int(record["epoch"])

    def save(self, model: keras.Model, epochs_done: int) -> None:
        weights_name = f"epoch-{epochs_done}.{os.getpid()}.weights.h5"
        weights_path = self.directory / weights_name
        with reporting_full_disk(weights_path):
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                model.save_weights(weights_path)
            except BaseException:
                weights_path.unlink(missing_ok=True)
                raise
        with reporting_full_disk(self.record_path):
            write_json_atomic(self.record_path, {"epoch": epochs_done, "weights": weights_name})
        for stale in self.directory.glob("*.weights.h5"):
            if stale.name != weights_name:
                stale.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _damaged(self, error: Exception) -> UsageError:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return UsageError(f"the backup in {self.directory} is damaged ({reason}); "
                          "delete that folder to start the run over")


class BackupCallback(keras.callbacks.Callback):
    """Backs the run up after every epoch whose loss is finite."""

    def __init__(self, backup: Backup):
        super().__init__()
        self.backup = backup

    def on_epoch_end(self, epoch, logs=None):
        if _finite_loss(logs):
            self.backup.save(self.model, epoch + 1)


def check_workers_resume_together(strategy, epochs_done: int, backup_dir: Path) -> None:
    """Under a multi-worker strategy, stops every worker with one clear line
    unless all of them start from the same epoch (a no-op otherwise).

    A worker whose backup is damaged takes part with epochs_done = -1, so the
    others stop too instead of waiting for it in their first collective op.
    """
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    epoch = float(epochs_done)

    @tf.function
    def sums():
        # Equal epochs on all n replicas exactly when n * sum(e^2) == sum(e)^2.
        local = tf.constant([epoch, epoch * epoch, 1.0])
        return strategy.reduce("SUM", strategy.run(lambda: tf.identity(local)), axis=None)

    total, squares_total, replicas = (float(value) for value in sums().numpy())
    if replicas * squares_total != total * total and epochs_done >= 0:
        raise UsageError(
            f"the workers disagree on where to resume (this one would start at epoch {epochs_done + 1}); the "
            f"chief's backup in {backup_dir} must be readable by every worker, or delete it to start the run over"
        )


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves the whole model (.keras) after every epoch, atomically.

    Keras's ModelCheckpoint writes in place, so a kill mid-save leaves a
    corrupt file; here the model goes to a temporary file that is renamed
    over the old one, so the checkpoint is always a complete epoch.
    """

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    def on_epoch_end(self, epoch, logs=None):
        if not _finite_loss(logs):
            return  # Keep the last good checkpoint.
        save_atomically(self.model, self.path)


def save_atomically(model: keras.Model, path: Path) -> None:
    """model.save (or save_weights, for a .weights.h5 path) to a temporary
    file renamed over `path`: a kill mid-save leaves the old file whole."""
    weights_only = path.name.endswith(".weights.h5")
    suffix = ".weights.h5" if weights_only else path.suffix
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    with reporting_full_disk(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            (model.save_weights if weights_only else model.save)(temporary)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


class BestEpoch(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the best validation accuracy (the
    later of equals: its learning rate has decayed further) in `path`, and
    stops training once `patience` epochs in a row did no better.

    The best epoch so far is read from the run's history, which EpochHistory
    (before this callback) has already written for this epoch, so a resumed
    run goes on with the best epoch of the whole run, not of this session.
    """

    def __init__(self, path: Path, history: "EpochHistory", patience: int):
        super().__init__()
        self.path = Path(path)
        self.history = history
        self.patience = patience

    def best_epoch(self) -> int | None:
        """The index of the best epoch recorded, or None before the first."""
        epochs = self.history.as_history().get("val_accuracy", [])
        if not epochs:
            return None
        best = max(epochs)
        return max(index for index, accuracy in enumerate(epochs) if accuracy == best)

    def stopped(self) -> bool:
        """Whether the epochs recorded already ran `patience` past the best:
        a run resumed after it stopped early has nothing left to train."""
        best, last = self.best_epoch(), len(self.history.as_history().get("val_accuracy", [])) - 1
        return best is not None and last - best >= self.patience

    def on_epoch_end(self, epoch, logs=None):
        if not _finite_loss(logs):
            return
        if self.best_epoch() == epoch:
            save_atomically(self.model, self.path)
        elif self.stopped():
            self.model.stop_training = True

    def restore_best(self, model: keras.Model) -> int | None:
        """Loads the best epoch's weights into `model` when it is not the last
        epoch trained; returns its index, or None when the last is best."""
        best, last = self.best_epoch(), len(self.history.as_history().get("val_accuracy", [])) - 1
        if best is None or best == last or not self.path.is_file():
            return None
        model.load_weights(self.path)
        return best


class EpochHistory(keras.callbacks.Callback):
    """Keeps every epoch's logs in <run_dir>/history.json across interruptions.

    Keras's History only covers the current session; after a resume the run's
    metrics and curves must still show every epoch. The first epoch of a
    session drops any recorded epoch at or after it (a fresh start, or a
    resume that repeats an epoch), so stale entries never survive.
    """

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        self.epochs: dict[int, dict[str, float]] = {}
        self._started = False

    def _recorded(self) -> dict[int, dict[str, float]]:
        try:
            return {int(key): value for key, value in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError):
            return {}

    def on_epoch_begin(self, epoch, logs=None):
        if not self._started:
            self._started = True
            self.epochs = {key: value for key, value in self._recorded().items() if key < epoch}

    def on_epoch_end(self, epoch, logs=None):
        self.epochs[epoch] = {key: float(value) for key, value in (logs or {}).items()}
        with reporting_full_disk(self.path):
            write_json_atomic(self.path, {str(key): value for key, value in sorted(self.epochs.items())})

    def as_history(self) -> dict[str, list[float]]:
        """Keras History layout: metric -> one value per epoch, in order."""
        # A session resumed after its last epoch had been backed up runs no
        # epoch at all; everything it reports was recorded before.
        epochs = self.epochs if self._started else self._recorded()
        history: dict[str, list[float]] = {}
        for epoch in sorted(epochs):
            for key, value in epochs[epoch].items():
                history.setdefault(key, []).append(value)
        return history
