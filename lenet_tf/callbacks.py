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

from lenet_tf.errors import UsageError
from lenet_tf.io_utils import write_json_atomic


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

    def examples_per_sec(self) -> float:
        """Throughput over the epochs after the first, which pays for tracing."""
        steady = self.epoch_seconds[1:] or self.epoch_seconds
        return self.examples_per_epoch * len(steady) / sum(steady) if steady else float("nan")


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras's TensorBoard callback, marked async-safe when it writes per epoch
    and does not profile: its batch hook then only writes the model graph once."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        profiling = bool(self._start_batch or self._stop_batch)
        self.async_safe = self.update_freq == "epoch" and not profiling


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


class GuardedBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that never backs up a diverged (NaN/Inf) epoch.

    Saving is per epoch, so its batch hook does nothing: async-safe. Under
    multi-worker training every worker checks, before the first step, that
    all of them resume from the same epoch.
    """

    async_safe = True

    def on_train_begin(self, logs=None):
        damage = self._restore()
        # Other workers wait for this one here, so it takes part even when damaged.
        check_workers_resume_together(self.model, self.backup_dir, damaged=damage is not None)
        if damage:
            raise damage

    def _restore(self) -> UsageError | None:
        """Restores the latest backup, if any; returns the error to raise if it is damaged."""
        try:
            super().on_train_begin()
        except (OSError, ValueError, KeyError) as error:
            # Keras writes the epoch metadata in place, so a kill mid-write can
            # leave it unreadable (its own fallback only covers the weights).
            # Fall back to the previous backup pair, which double_checkpoint keeps.
            if not (os.path.exists(self._prev_weights_path) and os.path.exists(self._prev_training_metadata_path)):
                return _damaged_backup_error(self.backup_dir, error)
            shutil.copyfile(self._prev_weights_path, self._weights_path)
            shutil.copyfile(self._prev_training_metadata_path, self._training_metadata_path)
            self._load_model()
        return None

    def on_epoch_end(self, epoch, logs=None):
        if _finite_loss(logs):
            super().on_epoch_end(epoch, logs)


class ChiefBackupReader(GuardedBackupAndRestore):
    """A non-chief worker's backup callback: restores from the chief's backup, writes nothing.

    The weights are the same on every worker, so one backup (the chief's, on a
    folder all workers can read, as TensorFlow's multi-worker guide asks)
    serves them all. Workers that kept backups of their own could come back
    at different epochs after a kill, and their collectives would then fail
    mid-step. Reading never repairs: a damaged latest pair is skipped for the
    previous one, which is what the chief restores from in that case.
    """

    def _restore(self) -> UsageError | None:
        try:
            self._load_model()
        except (OSError, ValueError, KeyError) as error:
            self._weights_path = self._prev_weights_path
            self._training_metadata_path = self._prev_training_metadata_path
            try:
                self._load_model()
            except (OSError, ValueError, KeyError):
                return _damaged_backup_error(self.backup_dir, error)
        return None

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass  # The chief deletes its backup once the run is complete.


def check_workers_resume_together(model: keras.Model, backup_dir: str, damaged: bool = False) -> None:
    """Under a multi-worker strategy, stops every worker with one clear line
    unless all of them start from the same epoch (a no-op otherwise).

    A worker whose backup is damaged takes part as epoch -1, so the others
    stop too instead of waiting for it in their first collective op.
    """
    import tensorflow as tf

    strategy = model.distribute_strategy
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    epoch = -1.0 if damaged else float(getattr(model, "_initial_epoch", None) or 0)

    @tf.function
    def sums():
        # Equal epochs on all n replicas exactly when n * sum(e^2) == sum(e)^2.
        local = tf.constant([epoch, epoch * epoch, 1.0])
        return strategy.reduce("SUM", strategy.run(lambda: tf.identity(local)), axis=None)

    total, squares_total, replicas = (float(value) for value in sums().numpy())
    if replicas * squares_total != total * total and not damaged:
        raise UsageError(
            f"the workers disagree on where to resume (this one would start at epoch {int(epoch) + 1}); the "
            f"chief's backup in {backup_dir} must be readable by every worker, or delete it to start the run over"
        )


def _damaged_backup_error(backup_dir: str, error: Exception) -> UsageError:
    return UsageError(f"the backup in {backup_dir} is damaged ({error}); delete that folder to start the run over")


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.keras")
        try:
            self.model.save(temporary)
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)


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
