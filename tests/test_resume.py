"""Fault tolerance: SIGKILL and resume, damaged backups, unwritable or full output folders, run-folder locks."""

import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lenet_tf.config import TrainConfig
from lenet_tf.errors import UsageError
from lenet_tf.io_utils import ensure_writable_dir
from lenet_tf.run_dir import RunDir
from lenet_tf.train import train_and_evaluate

from conftest import REPO_ROOT, backed_up_epochs, read_scalars, run_main, wait_for, wait_for_backed_up_epoch


@pytest.mark.slow
def test_killed_run_resumes_from_its_backup_and_finishes(tmp_path, fashion_mnist_dir):
    run_dir, export_dir = tmp_path / "run", tmp_path / "exports"
    command = [sys.executable, "-m", "lenet_tf", "train", "--dataset", "fashion_mnist",
               "--limit-train", "8192", "--limit-test", "1000", "--epochs", "4", "--batch-size", "64",
               "--activation", "relu", "--learning-rate", "0.1", "--run-dir", str(run_dir),
               "--export-dir", str(export_dir), "--image-every-epochs", "0"]
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    first = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backed_up_epochs = wait_for_backed_up_epoch(RunDir(run_dir).backup_metadata, [first])
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert backed_up_epochs >= 1
    assert not (run_dir / "metrics.json").exists()
    assert not list(export_dir.glob("*/[0-9]*"))  # No version was published.

    second = run_main(*command[3:])  # The rerun needs no process of its own: the killed one is gone.
    assert second.returncode == 0, second.stderr[-3000:]
    epochs_started = [int(line.split()[1].split("/")[0]) for line in second.stdout.splitlines()
                      if line.startswith("Epoch ")]
    # Resumed: the epochs already backed up are not run again.
    assert epochs_started[0] >= 2 and epochs_started[-1] == 4
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs_run_this_session"] == len(epochs_started) < 4
    losses = metrics["history"]["loss"]
    assert len(losses) == 4  # The whole run, across both sessions.
    # The first resumed epoch starts from the backed-up weights, not from new
    # ones: its loss is below the first epoch's, which started from scratch.
    assert losses[epochs_started[0] - 1] < losses[0]
    assert metrics["test_loss"] < math.log(10)  # Below an untrained model's (chance: ln 10).
    steps = [step for step, _ in read_scalars(run_dir / "logs" / "train")["epoch_loss"]]
    assert sorted(set(steps)) == [0, 1, 2, 3]
    version = Path(metrics["export_version_dir"])
    card = json.loads((version / "metadata.json").read_text())
    assert card["parity"]["float32"]["top1_agreement"] == 1.0
    assert not (run_dir / "backup").exists()  # Cleared once the run completed.


@pytest.mark.slow
def test_sigterm_stops_a_run_in_one_line_and_the_rerun_resumes(tmp_path, fashion_mnist_dir):
    """SIGTERM (a scheduler stopping the job) mid-training and again mid-export:
    each time one line and exit 143, a backup to resume from and no half-written
    version; the third command finishes the run. (A stop that lands as the
    export's staging folder is made: test_export.py.)"""
    run_dir, model_dir = RunDir(tmp_path / "run"), tmp_path / "exports" / "lenet_fashion_mnist"
    command = [sys.executable, "-m", "lenet_tf", "train", "--limit-train", "4096", "--limit-test", "500",
               "--epochs", "3", "--batch-size", "64", "--activation", "relu", "--learning-rate", "0.1",
               "--run-dir", str(run_dir.root), "--export-dir", str(tmp_path / "exports"), "--image-every-epochs", "0",
               "--format", "saved_model,tflite,tflite-int8"]
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))

    def terminate_when(state, what: str) -> subprocess.CompletedProcess:
        # Output to files, not pipes: a pipe nobody reads while we wait could fill and stall the run.
        with open(tmp_path / "stdout", "w+") as stdout, open(tmp_path / "stderr", "w+") as stderr:
            process = subprocess.Popen(command, env=environment, stdout=stdout, stderr=stderr, text=True)
            try:
                wait_for(state, [process], what)
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=300)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            stdout.seek(0), stderr.seek(0)
            return subprocess.CompletedProcess(command, process.returncode, stdout.read(), stderr.read())

    def stopped_in_one_line(completed):
        assert completed.returncode == 143, completed.stderr[-3000:]
        assert completed.stderr.strip().splitlines()[-1] == (
            "lenet-tf train: terminated (SIGTERM); run the same command again to resume")
        assert "Traceback" not in completed.stderr

    stopped_in_one_line(terminate_when(lambda: backed_up_epochs(run_dir.backup_metadata) >= 1, "a backed-up epoch"))
    assert 1 <= backed_up_epochs(run_dir.backup_metadata) < 3 and not run_dir.metrics.exists()

    # Every epoch trained, the export under way in its hidden staging folder:
    # its SavedModel written, its TFLite conversions and parity check still to come.
    stopped_in_one_line(terminate_when(lambda: any(model_dir.glob(".staging-*/saved_model.pb")),
                                       "a SavedModel in the export's staging folder"))
    assert backed_up_epochs(run_dir.backup_metadata) == 3
    assert list(model_dir.iterdir()) == []  # The unfinished version was removed, none published.

    finished = run_main(*command[3:])
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "no epochs left to train: the backup held all 3" in finished.stdout
    metrics = json.loads(run_dir.metrics.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert metrics["epochs_run_this_session"] == 0 and metrics["examples_per_sec"] is None
    assert len(metrics["history"]["loss"]) == 3
    assert [path.name for path in model_dir.iterdir()] == ["1"]


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
    config = TrainConfig(dataset="fashion_mnist", run_dir=str(read_only / "run"), export_formats=())
    with pytest.raises(UsageError, match="cannot write the run directory"):
        train_and_evaluate(config, datasets=small_real_datasets)


def test_backup_is_atomic_and_a_damaged_one_is_one_line(tmp_path):
    """Every backup names weights that were completely written; a backup damaged
    anyway (a disk error, a user's edit) stops the resume with what to do."""
    import keras
    import numpy as np

    from lenet_tf.callbacks import Backup
    from lenet_tf.optimization import build_compiled_model

    backup = Backup(tmp_path / "backup")
    model = build_compiled_model(TrainConfig())
    assert backup.restore(model) == 0  # No backup yet: start from epoch 0.
    backup.save(model, 1)
    model.get_layer("conv1").kernel.assign(np.ones((5, 5, 1, 6), np.float32))
    backup.save(model, 2)
    assert sorted(path.name for path in backup.directory.iterdir()) == [
        f"epoch-2.{os.getpid()}.weights.h5", "training_metadata.json"]  # Only the latest weights are kept.

    resumed = build_compiled_model(TrainConfig())
    assert Backup(tmp_path / "backup").restore(resumed) == 2
    assert np.array_equal(keras.ops.convert_to_numpy(resumed.get_layer("conv1").kernel), np.ones((5, 5, 1, 6)))
    assert resumed.optimizer.built  # Its state came back with the weights.

    weights = next(backup.directory.glob("*.weights.h5"))
    weights.write_bytes(weights.read_bytes()[:100])  # Damaged after it was written.
    with pytest.raises(UsageError, match=r"the backup in .*backup is damaged \(.*\); delete that folder"):
        Backup(tmp_path / "backup").restore(build_compiled_model(TrainConfig()))
    backup.record_path.write_text('{"epoch": 2')
    with pytest.raises(UsageError, match="is damaged"):
        Backup(tmp_path / "backup").epochs_done()


def test_a_kill_while_the_backup_is_written_leaves_the_previous_one(tmp_path):
    """Weights half-written by a killed save are never named by the record."""
    from lenet_tf.callbacks import Backup
    from lenet_tf.optimization import build_compiled_model

    backup = Backup(tmp_path / "backup")
    model = build_compiled_model(TrainConfig())
    backup.save(model, 3)
    (backup.directory / f"epoch-4.{os.getpid() + 1}.weights.h5").write_bytes(b"\x89HDF\r\n")  # Cut short.
    assert Backup(tmp_path / "backup").restore(build_compiled_model(TrainConfig())) == 3


@pytest.mark.slow
def test_two_trainings_on_one_run_dir_the_second_refuses_at_once(tmp_path, fashion_mnist_dir):
    run_dir = RunDir(tmp_path / "run")
    command = [sys.executable, "-m", "lenet_tf", "train", "--limit-train", "8192", "--limit-test", "500",
               "--epochs", "4", "--run-dir", str(run_dir.root), "--format", "", "--image-every-epochs", "0"]
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    first = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_backed_up_epoch(run_dir.backup_metadata, [first])
        first.send_signal(signal.SIGSTOP)  # Holds still (and holds the lock) while the second tries.

        def snapshot():
            return {path: path.stat().st_mtime_ns for path in run_dir.root.rglob("*")}

        before = snapshot()
        second = run_main(*command[3:])  # The lock is the operating system's: it holds within a process too.
        assert second.returncode == 2 and "Traceback" not in second.stderr
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"lenet-tf train: error: the run directory {run_dir} is in use by training "
                               f"process {first.pid} on host ")
        assert snapshot() == before  # The second wrote nothing.
    finally:
        first.kill()  # Killed mid-run: its lock goes with it.
        first.wait()
    third = run_main(*command[3:])
    assert third.returncode == 0, third.stderr[-3000:]


def test_resuming_with_settings_that_change_the_model_names_them_and_keeps_the_run(tmp_path, small_real_datasets):
    """A backup from a run with other layers is not damaged: the error says what
    changed, and the interrupted run's config stays for a resume with its flags."""
    from lenet_tf.callbacks import Backup
    from lenet_tf.config import preset
    from lenet_tf.optimization import build_compiled_model

    interrupted = preset("fast", "fashion_mnist")
    interrupted.whiten_first_conv, interrupted.first_conv_batch_norm = False, True
    interrupted.run_dir, interrupted.export_formats = str(tmp_path / "run"), ()
    run_dir = RunDir(interrupted.run_dir)
    run_dir.root.mkdir(parents=True)
    interrupted.write(run_dir.config)
    Backup(run_dir.backup).save(build_compiled_model(interrupted), 1)

    resumed = preset("fast", "fashion_mnist")  # Whitened, no batch norm after conv1.
    resumed.run_dir, resumed.export_formats = interrupted.run_dir, ()
    with pytest.raises(UsageError, match=r"other settings \(--first-conv-batch-norm True -> False; "
                                         r"--whiten-first-conv False -> True\).*resume with that run's flags"):
        train_and_evaluate(resumed, datasets=small_real_datasets)
    assert TrainConfig.read(run_dir.config) == interrupted


def test_resuming_with_other_training_settings_is_refused_and_location_changes_are_not(tmp_path, small_real_datasets):
    """--momentum 0.9 -> 0 loads the weights but not the optimizer (Keras skips
    it with a warning, its step count too): refused, not silently restarted."""
    from lenet_tf.callbacks import Backup
    from lenet_tf.optimization import build_compiled_model

    interrupted = TrainConfig(activation="relu", learning_rate=0.05, momentum=0.9, epochs=2, batch_size=64,
                              run_dir=str(tmp_path / "run"), export_formats=(), image_every_epochs=0)
    run_dir = RunDir(interrupted.run_dir)
    run_dir.root.mkdir(parents=True)
    interrupted.write(run_dir.config)
    model = build_compiled_model(interrupted)
    model.optimizer.build(model.trainable_variables)  # Its momentum slots, as after an epoch of training.
    Backup(run_dir.backup).save(model, 1)

    other = dataclasses.replace(interrupted, momentum=0.0, seed=3)
    with pytest.raises(UsageError, match=r"other settings \(--seed 0 -> 3; --momentum 0.9 -> 0.0\); resume with"):
        train_and_evaluate(other, datasets=small_real_datasets)
    # Where the run writes and what it reports may change: it resumes at epoch 2.
    moved = dataclasses.replace(interrupted, export_dir=str(tmp_path / "elsewhere"), image_every_epochs=1,
                                preset="modern")
    metrics = train_and_evaluate(moved, datasets=small_real_datasets, out=io.StringIO())
    assert metrics["epochs_run_this_session"] == 1


def _files_and_times(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*")}


def test_the_same_command_after_a_finished_run_trains_a_new_run_beside_it(tmp_path, fashion_mnist_dir, capsys,
                                                                          monkeypatch):
    """A finished run is never continued: the same command (or another
    preset) again is a new run in the next free runs/<dataset>-N, said in its
    first line, so TensorBoard shows two runs instead of one run's curves
    drawn over the other's; the finished folder is left as it was."""
    from lenet_tf.cli import main

    monkeypatch.chdir(tmp_path)
    command = ["train", "--data-dir", str(fashion_mnist_dir), "--limit-train", "512", "--limit-test", "256",
               "--batch-size", "64", "--epochs", "2", "--format", "", "--image-every-epochs", "0"]
    assert main(command) == 0
    first = RunDir("runs/fashion_mnist")
    assert first.metrics.is_file()
    before = _files_and_times(first.root)
    capsys.readouterr()

    assert main(command) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "runs/fashion_mnist holds a finished run, which is never continued: this one is a new run in "
        "runs/fashion_mnist-2")
    assert _files_and_times(first.root) == before
    second = RunDir("runs/fashion_mnist-2")
    metrics = json.loads(second.metrics.read_text())
    assert metrics["run_dir"] == "runs/fashion_mnist-2" and metrics["epochs_run_this_session"] == 2
    assert TrainConfig.read(second.config).run_dir == "runs/fashion_mnist-2"
    # Its TensorBoard curves are its own: each epoch once.
    assert [step for step, _ in read_scalars(second.logs / "train")["epoch_loss"]] == [0, 1]

    assert main([*command, "--preset", "modern"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("this one is a new run in runs/fashion_mnist-3")
    assert json.loads(RunDir("runs/fashion_mnist-3").metrics.read_text())["epochs_run_this_session"] == 2
    assert sorted(path.name for path in Path("runs").iterdir()) == [
        "fashion_mnist", "fashion_mnist-2", "fashion_mnist-3"]


class _StopAfterFirstEpoch(Exception):
    pass


def test_an_interrupted_run_beside_a_finished_one_resumes_and_a_slurm_requeue_finds_it(tmp_path,
                                                                                      small_real_datasets,
                                                                                      monkeypatch):
    """Beside a finished run, SLURM job 44 is stopped after its first backed-up
    epoch in run-2; requeued, it resumes there; requeued after its run
    finished, it trains nothing. A run started anywhere else is a new one."""
    import keras

    class StopAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise _StopAfterFirstEpoch()  # After the run's own callbacks: epoch 1 is backed up.

    def start(restart_count: int | None, **arguments):
        for name in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
            monkeypatch.delenv(name, raising=False)
        if restart_count is not None:
            monkeypatch.setenv("SLURM_JOB_ID", "44")
            monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart_count))
        out = io.StringIO()
        return train_and_evaluate(config, datasets=small_real_datasets, out=out, **arguments), out.getvalue()

    config = TrainConfig(dataset="fashion_mnist", epochs=2, batch_size=64, activation="relu", learning_rate=0.1,
                         run_dir=str(tmp_path / "run"), export_formats=(), image_every_epochs=0)
    start(None)
    with pytest.raises(_StopAfterFirstEpoch):
        start(0, extra_callbacks=(StopAfterFirstEpoch(),))
    second = RunDir(tmp_path / "run-2")
    assert backed_up_epochs(second.backup_metadata) == 1 and not second.metrics.exists()

    metrics, out = start(1)  # Requeued: SLURM runs the same command again.
    assert out.splitlines()[0] == (f"{tmp_path / 'run'} holds a finished run, which is never continued: this one "
                                   f"resumes the interrupted run in {second}")
    assert metrics["run_dir"] == str(second) and metrics["epochs_run_this_session"] == 1
    assert len(metrics["history"]["loss"]) == 2

    again, out = start(2)  # Requeued once more, after its run had finished.
    assert out == f"{second} holds the run this SLURM job finished before it was started again; nothing left to train\n"
    assert again == json.loads(second.metrics.read_text())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run", "run-2"]

    metrics, _ = start(None)  # The same command on a workstation: a new run.
    assert metrics["run_dir"] == str(tmp_path / "run-3") and metrics["epochs_run_this_session"] == 2


def test_every_worker_finds_the_chiefs_run_folder_before_and_after_the_chief_creates_it(tmp_path):
    """Non-chief workers write nothing there: they find the folder from the same
    files as the chief, whether they look before or after it started writing."""
    from lenet_tf.run_dir import folder_for_training

    assert folder_for_training(tmp_path / "run") == RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    RunDir(tmp_path / "run").config.write_text("{}")  # Unfinished: continued.
    assert folder_for_training(tmp_path / "run") == RunDir(tmp_path / "run")
    RunDir(tmp_path / "run").metrics.write_text("{}")  # Finished.
    assert folder_for_training(tmp_path / "run") == RunDir(tmp_path / "run-2")  # Before the chief made it.
    (tmp_path / "run-2").mkdir()
    RunDir(tmp_path / "run-2").config.write_text("{}")
    assert folder_for_training(tmp_path / "run") == RunDir(tmp_path / "run-2")  # While the chief trains there.
