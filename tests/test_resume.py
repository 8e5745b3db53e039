"""Fault tolerance: SIGKILL and resume, diverged runs, unwritable or full output folders."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lenet_tf.config import TrainConfig
from lenet_tf.errors import UsageError
from lenet_tf.io_utils import ensure_writable_dir
from lenet_tf.train import CHECKPOINT_FILE, train_and_evaluate

from conftest import REPO_ROOT, read_scalars, wait_for_backed_up_epoch


@pytest.mark.slow
def test_killed_run_resumes_from_its_backup_and_finishes(tmp_path, mnist_dir):
    run_dir, export_dir = tmp_path / "run", tmp_path / "exports"
    command = [sys.executable, "-m", "lenet_tf", "train", "--dataset", "mnist", "--data-dir", str(mnist_dir),
               "--limit-train", "20000", "--limit-test", "1000", "--epochs", "5", "--batch-size", "64",
               "--activation", "relu", "--learning-rate", "0.1", "--run-dir", str(run_dir),
               "--export-dir", str(export_dir), "--image-every-epochs", "0"]
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    first = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metadata = run_dir / "backup" / "training_metadata.json"
    backed_up_epochs = wait_for_backed_up_epoch(metadata, [first])
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert backed_up_epochs >= 1
    assert not (run_dir / "metrics.json").exists()
    assert not list(export_dir.glob("*/[0-9]*"))  # No version was published.

    second = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    epochs_started = [int(line.split()[1].split("/")[0]) for line in second.stdout.splitlines()
                      if line.startswith("Epoch ")]
    # Resumed: the epochs already backed up are not run again.
    assert epochs_started[0] >= 2 and epochs_started[-1] == 5
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run_this_session"] == len(epochs_started) < 5
    assert len(metrics["history"]["loss"]) == 5  # The whole run, across both sessions.
    assert metrics["test_accuracy"] > 0.9
    steps = [step for step, _ in read_scalars(run_dir / "logs" / "train")["epoch_loss"]]
    assert sorted(set(steps)) == [0, 1, 2, 3, 4]
    version = Path(metrics["export_version_dir"])
    card = json.loads((version / "metadata.json").read_text())
    assert card["parity"]["float32"]["top1_agreement"] == 1.0
    assert not (run_dir / "backup").exists()  # Cleared once the run completed.


def test_diverged_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, small_real_datasets):
    import keras
    import numpy as np

    base = dict(dataset="mnist", batch_size=64, activation="relu", run_dir=str(tmp_path / "run"),
                export_formats=(), image_every_epochs=0)
    train_and_evaluate(TrainConfig(epochs=1, learning_rate=0.1, **base), datasets=small_real_datasets)
    good = keras.models.load_model(tmp_path / "run" / CHECKPOINT_FILE).get_weights()
    with pytest.raises(UsageError, match=r"the loss became nan \(diverged\); lower --learning-rate"):
        train_and_evaluate(TrainConfig(epochs=3, learning_rate=1e6, **base), datasets=small_real_datasets)
    kept = keras.models.load_model(tmp_path / "run" / CHECKPOINT_FILE).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(good, kept))
    assert all(np.isfinite(weight).all() for weight in kept)


def test_output_folder_without_enough_free_space_is_refused(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(UsageError, match="MiB free under the run directory"):
        ensure_writable_dir(tmp_path, "run directory", min_free_bytes=free * 2 + 2**30)


def test_read_only_output_folder_is_refused_before_training(tmp_path, small_real_datasets):
    if os.geteuid() == 0:
        # Root writes through permission bits; a read-only bind is what stops it.
        read_only = Path("/proc/self")
    else:
        read_only = tmp_path / "locked"
        read_only.mkdir()
        read_only.chmod(0o500)
    config = TrainConfig(dataset="mnist", run_dir=str(read_only / "run"), export_formats=())
    with pytest.raises(UsageError, match="cannot write the run directory"):
        train_and_evaluate(config, datasets=small_real_datasets)


def test_backup_with_a_half_written_epoch_record_falls_back_to_the_previous_one(tmp_path):
    """A kill while Keras writes its backup metadata leaves it truncated; the
    previous backup (double_checkpoint) is used instead of crashing the resume."""
    import keras

    from lenet_tf.callbacks import GuardedBackupAndRestore
    from lenet_tf.train import build_compiled_model

    model = build_compiled_model(TrainConfig())
    backup = GuardedBackupAndRestore(str(tmp_path / "backup"), double_checkpoint=True)
    backup.set_model(model)
    backup.on_epoch_end(0, {"loss": 1.0})
    backup.on_epoch_end(1, {"loss": 0.9})  # Epoch 1's files become the previous pair.
    metadata = tmp_path / "backup" / "training_metadata.json"
    metadata.write_text(metadata.read_text()[:5])  # Cut short, as a kill mid-write would.

    resumed_model = build_compiled_model(TrainConfig())
    resumed = GuardedBackupAndRestore(str(tmp_path / "backup"), double_checkpoint=True)
    resumed.set_model(resumed_model)
    resumed.on_train_begin()
    assert resumed_model._initial_epoch == 1  # Resumes after the first epoch, not from scratch.
    assert keras.ops.convert_to_numpy(resumed_model.get_layer("conv1").kernel).shape == (5, 5, 1, 6)

    # With no previous pair to fall back on, the user is told what to do.
    metadata.write_text(metadata.read_text()[:5])
    (tmp_path / "backup" / "training_metadata.json.bkp").unlink()
    again = GuardedBackupAndRestore(str(tmp_path / "backup"), double_checkpoint=True)
    again.set_model(build_compiled_model(TrainConfig()))
    with pytest.raises(UsageError, match="is damaged .* delete that folder"):
        again.on_train_begin()
