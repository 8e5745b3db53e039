"""A disk that fills up mid-run or mid-export, on a small tmpfs mounted by the test (root only)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lenet_tf.run_dir import RunDir

from conftest import REPO_ROOT, run_main, wait_for, wait_for_backed_up_epoch

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a size-limited tmpfs needs root; run the suite as root to cover a full disk")


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs: above the 50 MiB a run asks for at its start, small enough to fill."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _fill(directory: Path) -> Path:
    """Writes a file until the file system has no byte left; returns it."""
    filler = directory / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 1 << 10, 1):  # Big pieces, then the last partial ones.
            try:
                while True:
                    os.write(descriptor, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(descriptor)
    return filler


def _train_command(run_dir: Path, export_dir: Path) -> list[str]:
    return [sys.executable, "-m", "lenet_tf", "train", "--dataset", "fashion_mnist", "--limit-train", "8192",
            "--limit-test", "1000", "--epochs", "4", "--batch-size", "64", "--activation", "relu",
            "--learning-rate", "0.1", "--run-dir", str(run_dir), "--export-dir", str(export_dir),
            "--image-every-epochs", "1", "--format", ""]


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_stops_it_with_one_line_and_a_rerun_resumes(small_disk, tmp_path,
                                                                               fashion_mnist_dir):
    import keras

    from lenet_tf.callbacks import Backup

    run_dir = RunDir(small_disk / "run")
    command = _train_command(run_dir.root, tmp_path / "exports")
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    training = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for_backed_up_epoch(run_dir.backup_metadata, [training]) >= 1
    filler = _fill(small_disk)  # Another program takes every byte left.
    _, stderr = training.communicate(timeout=300)
    assert training.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("lenet-tf train: error: no space left on the device"), stderr[-3000:]
    assert str(small_disk) in last_line and "run the same command again" in last_line
    assert not run_dir.metrics.exists()
    # What was complete before the disk filled still loads.
    checkpoint = keras.models.load_model(run_dir.checkpoint)
    from lenet_tf.config import TrainConfig
    from lenet_tf.optimization import build_compiled_model

    epochs_done = Backup(run_dir.backup).restore(build_compiled_model(TrainConfig.read(run_dir.config)))
    assert 1 <= epochs_done < 4 and checkpoint.count_params() == 61_706

    filler.unlink()  # Space freed: the same command resumes.
    resumed = run_main(*command[3:])  # The rerun needs no process of its own: the stopped one is gone.
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epochs_started = [int(line.split()[1].split("/")[0]) for line in resumed.stdout.splitlines()
                      if line.startswith("Epoch ")]
    assert epochs_started[0] == epochs_done + 1 and epochs_started[-1] == 4
    metrics = json.loads(run_dir.metrics.read_text())
    assert len(metrics["history"]["loss"]) == 4


@pytest.mark.slow
def test_an_export_that_runs_out_of_space_publishes_nothing_and_keeps_earlier_versions(small_disk, tmp_path,
                                                                                       fashion_mnist_dir):
    run_dir = tmp_path / "run"
    trained = run_main("train", "--limit-train", "2000", "--limit-test", "500", "--epochs", "1",
                       "--run-dir", str(run_dir), "--export-dir", str(small_disk / "exports"),
                       "--format", "saved_model", "--image-every-epochs", "0")
    assert trained.returncode == 0, trained.stderr[-3000:]
    model_dir = small_disk / "exports" / "lenet_fashion_mnist"
    first = {path.name: path.read_bytes() for path in (model_dir / "1").rglob("*") if path.is_file()}
    export_command = [sys.executable, "-m", "lenet_tf", "export", "--run-dir", str(run_dir),
                      "--export-dir", str(small_disk / "exports")]

    # A disk that is already full is refused before the checkpoint is loaded.
    filler = _fill(small_disk)
    refused = run_main(*export_command[3:], "--format", "saved_model")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1].startswith("lenet-tf export: error: only 0 MiB free")
    filler.unlink()

    # Another program fills the disk once the export has begun writing.
    exporting = subprocess.Popen(export_command + ["--format", "saved_model,tflite,tflite-int8"], cwd=REPO_ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    wait_for(lambda: any(path.name.startswith(".staging-") for path in model_dir.iterdir()), [exporting],
             "the export's staging folder")
    filler = _fill(small_disk)
    _, stderr = exporting.communicate(timeout=600)
    assert exporting.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("lenet-tf export: error: no space left on the device"), last_line
    assert "no version was published" in last_line
    assert sorted(path.name for path in model_dir.iterdir()) == ["1"]  # No new version, no staging left.
    assert {path.name: path.read_bytes() for path in (model_dir / "1").rglob("*") if path.is_file()} == first
    filler.unlink()
    again = run_main("export", "--run-dir", str(run_dir), "--export-dir", str(small_disk / "exports"),
                     "--format", "saved_model")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(path.name for path in model_dir.iterdir()) == ["1", "2"]
