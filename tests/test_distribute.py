"""Multi-replica (MirroredStrategy on logical CPUs) and multi-worker training on loopback."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lenet_tf.run_dir import RunDir

from conftest import REPO_ROOT, backed_up_epochs, free_ports, run_cli, run_main, wait_for, wait_for_backed_up_epoch

COMMON = ["--dataset", "fashion_mnist", "--activation", "relu", "--format", "", "--image-every-epochs", "0"]


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_two_mirrored_replicas_match_one_replica(tmp_path, fashion_mnist_dir):
    """Same data, seed and global batch (1 x 128 vs 2 x 64): the same SGD steps.

    The tolerance, 1e-3 relative on the losses, allows for float summation
    order (per-replica means, then the cross-replica all-reduce) over 16
    steps at a learning rate small enough not to amplify it; measured
    differences are about 1e-4.
    """
    base = [*COMMON, "--limit-train", "1024", "--limit-test", "500",
            "--epochs", "2", "--learning-rate", "0.05"]
    # One replica in this process; two need a process that splits its CPU before TensorFlow starts.
    single = run_main("train", *base, "--strategy", "default", "--batch-size", "128", "--run-dir", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    mirrored = run_cli("train", *base, "--strategy", "mirrored", "--logical-cpus", "2", "--batch-size", "64",
                       "--run-dir", str(tmp_path / "two"))
    assert mirrored.returncode == 0, mirrored.stderr[-3000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert (one["replicas"], two["replicas"]) == (1, 2)
    assert one["global_batch_size"] == two["global_batch_size"] == 128
    assert two["strategy"] == "mirrored" and len(two["devices"]) == 2
    for key in ("loss",):
        for a, b in zip(one["history"][key], two["history"][key]):
            assert b == pytest.approx(a, rel=1e-3)
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-3)


def test_mirrored_replicas_train_and_export_splits_that_do_not_divide_evenly(tmp_path, fashion_mnist_dir):
    """17 training and 9 test examples on 2 replicas of 4: TensorFlow fails a
    replica with an empty share of a batch, and Keras a first batch shared
    unevenly; the run trains on 16 an epoch and evaluates all 9 (in 6 + 3)."""
    completed = run_cli("train", *COMMON, "--strategy", "mirrored", "--logical-cpus", "2", "--batch-size", "4",
                        "--limit-train", "17", "--limit-test", "9", "--epochs", "1", "--format", "saved_model",
                        "--run-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "exports"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = _metrics(tmp_path / "run")
    assert (metrics["replicas"], metrics["train_examples"], metrics["test_examples"]) == (2, 16, 9)
    card = json.loads((Path(metrics["export_version_dir"]) / "metadata.json").read_text())
    assert card["parity"]["saved_model"]["top1_agreement"] == 1.0


def test_predicting_fewer_images_than_replicas_can_share_gives_the_same_probabilities():
    """7 images on 8 replicas (the out-of-distribution dashboard's count): no
    batch gives every replica a share, so one device computes them, and the
    answers are those of `model.predict` over all 8 replicas."""
    script = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 8)
from lenet_tf.config import TrainConfig
from lenet_tf.model import predict_probabilities
from lenet_tf.optimization import build_compiled_model
with tf.distribute.MirroredStrategy([f"/cpu:{index}" for index in range(8)]).scope():
    model = build_compiled_model(TrainConfig())
images = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
few, all_replicas = predict_probabilities(model, images[:7]), predict_probabilities(model, images)
print(few.shape, float(np.abs(few - all_replicas[:7]).max()))
"""
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert completed.returncode == 0, completed.stderr[-3000:]
    shape, difference = completed.stdout.strip().rsplit(" ", 1)
    assert shape == "(7, 10)" and float(difference) < 1e-6


def test_malformed_tf_config_is_one_line(tmp_path):
    completed = run_main("train", "--strategy", "multi_worker", "--run-dir", str(tmp_path / "run"),
                         env={"TF_CONFIG": "{not json"})
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1].startswith("lenet-tf train: error: TF_CONFIG is malformed")
    assert "Traceback" not in completed.stderr
    completed = run_main("train", "--strategy", "multi_worker", "--run-dir", str(tmp_path / "run"),
                         env={"TF_CONFIG": json.dumps({"cluster": {"worker": ["127.0.0.1:1"]},
                                                       "task": {"type": "worker", "index": 3}})})
    assert completed.returncode == 2 and "task worker:3 is not in the cluster" in completed.stderr


def test_multi_worker_without_cluster_is_one_line(tmp_path):
    completed = run_main("train", "--strategy", "multi_worker", "--run-dir", str(tmp_path / "run"),
                         env={"TF_CONFIG": ""})
    assert completed.returncode == 2 and "needs TF_CONFIG" in completed.stderr
    completed = run_main("train", "--worker-hosts", "127.0.0.1:1,127.0.0.1:2", "--task-index", "5")
    assert completed.returncode == 2 and "--task-index 5 is outside --worker-hosts" in completed.stderr


@pytest.mark.slow
def test_two_workers_on_loopback_train_once_on_a_folder_of_pictures_and_only_the_chief_writes(tmp_path,
                                                                                                fashion_mnist_dir):
    """Each worker reads the same folder of PNG files (real Fashion-MNIST, three
    classes in train/ and test/): one run, with the folder's classes and model
    name, the same global metrics on both workers, image dashboards every
    epoch, and the checkpoint and export written once, by the chief.
    (Multi-worker runs on the IDX files: the kill-and-resume tests below and
    SLURM's srun test.)"""
    from PIL import Image

    from lenet_tf.data import load_idx_dir

    data = load_idx_dir(fashion_mnist_dir)
    folder = tmp_path / "garments"
    names = {0: "t-shirt", 1: "trouser", 8: "bag"}
    for split, images, labels, count in (("train", data.train_images, data.train_labels, 1500),
                                         ("test", data.test_images, data.test_labels, 300)):
        for label, name in names.items():
            (folder / split / name).mkdir(parents=True)
            for index in [row for row in range(len(labels)) if labels[row] == label][:count // 3]:
                Image.fromarray(images[index, ..., 0]).save(folder / split / name / f"{index:05d}.png")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run_dir, export_dir = tmp_path / "run", tmp_path / "exports"
    results = _finish(_start_workers(run_dir, scratch, limit_train=1500, epochs=2, data=("--data-dir", str(folder)),
                                     image_every_epochs=1, formats="saved_model,tflite",
                                     environment={"XDG_CACHE_HOME": str(tmp_path / "cache")}))
    assert [returncode for returncode, _, _ in results] == [0, 0], "\n".join(err[-2000:] for _, _, err in results)
    outputs = [stdout for _, stdout, _ in results]
    metrics = _metrics(run_dir)
    assert metrics["strategy"] == "multi_worker" and metrics["replicas"] == 2
    assert metrics["global_batch_size"] == 128
    assert metrics["class_names"] == ["bag", "t-shirt", "trouser"]
    # It learns: the training loss falls, and the test loss ends below an
    # untrained model's ln 3.
    losses = metrics["history"]["loss"]
    assert len(losses) == 2 and losses[1] < losses[0] and metrics["test_loss"] < math.log(3)
    # Both workers saw the same global metrics, the run's own.
    chief_line = [line for line in outputs[0].splitlines() if line.startswith("loss ")]
    worker_line = [line for line in outputs[1].splitlines() if line.startswith("loss ")]
    assert len(chief_line) == 1 and chief_line[0].split(",")[:3] == worker_line[0].split(",")[:3]
    assert chief_line[0].split(",")[0] == f"loss {metrics['train_loss']:.3f}"
    # The chief's outputs exist once; the other worker's scratch folders are gone.
    assert sorted(path.name for path in export_dir.iterdir()) == ["lenet_garments"]
    assert sorted(path.name for path in (export_dir / "lenet_garments").iterdir()) == ["1"]
    assert (run_dir / "checkpoints" / "last.keras").is_file()
    assert not [path for path in scratch.iterdir() if path.name.startswith("lenet-worker")]
    assert len(list((tmp_path / "cache" / "lenet_tf" / "folders").iterdir())) == 1  # One cache, for both.


def _start_workers(run_dir: Path, scratch: Path, run_dirs: list[Path] | None = None,
                   limit_train: int = 4096, epochs: int = 4, image_every_epochs: int = 0,
                   formats: str = "", data: tuple[str, ...] = ("--dataset", "fashion_mnist"),
                   environment: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Two workers on fresh loopback ports, exporting `formats` (none by default) beside `run_dir`;
    `run_dirs` gives each its own --run-dir."""
    hosts = ",".join(f"127.0.0.1:{port}" for port in free_ports(2))
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TMPDIR=str(scratch), **(environment or {}))
    return [
        subprocess.Popen(
            [sys.executable, "-m", "lenet_tf", "train", *data, "--limit-train", str(limit_train),
             "--limit-test", "512", "--epochs", str(epochs), "--batch-size", "64",
             "--activation", "relu", "--learning-rate", "0.1", "--image-every-epochs", str(image_every_epochs),
             "--strategy", "multi_worker", "--worker-hosts", hosts, "--task-index", str(index),
             "--run-dir", str((run_dirs or [run_dir, run_dir])[index]), "--export-dir", str(run_dir.parent / "exports"),
             "--format", formats],
            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for index in range(2)
    ]


def _finish(workers: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    try:
        outputs = [worker.communicate(timeout=300) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return [(worker.returncode, stdout, stderr) for worker, (stdout, stderr) in zip(workers, outputs)]


@pytest.mark.slow
def test_two_workers_killed_together_resume_from_the_chiefs_backup(tmp_path, fashion_mnist_dir):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run_dir = tmp_path / "run"
    workers = _start_workers(run_dir, scratch)
    metadata = RunDir(run_dir).backup_metadata
    backed_up_epochs = wait_for_backed_up_epoch(metadata, workers)
    # Worker 1 first, and both before waiting: killed second, it could notice
    # the chief's loss first and exit cleanly, removing its scratch folder.
    for worker in reversed(workers):
        worker.send_signal(signal.SIGKILL)
    for worker in workers:
        worker.communicate()
    assert backed_up_epochs >= 1 and not (run_dir / "metrics.json").exists()  # Killed mid-run.
    assert [path for path in scratch.iterdir() if path.name.startswith("lenet-worker1-")]  # Left by the kill.
    # Read again: the chief may have backed up one more epoch before the kill landed.
    backup_files = {path.name: path.read_bytes() for path in metadata.parent.iterdir()}

    # A worker that cannot see the chief's backup (here: another run folder)
    # would start over while the chief resumes: both stop with one line.
    mismatched = _finish(_start_workers(run_dir, scratch, run_dirs=[run_dir, tmp_path / "elsewhere"]))
    for returncode, _, stderr in mismatched:
        assert returncode == 2, stderr[-2000:]
        last_line = stderr.strip().splitlines()[-1]
        assert last_line.startswith("lenet-tf train: error: the workers disagree on where to resume")
        assert "Traceback" not in stderr
    assert {path.name: path.read_bytes() for path in metadata.parent.iterdir()} == backup_files  # Untouched.

    results = _finish(_start_workers(run_dir, scratch))
    assert [returncode for returncode, _, _ in results] == [0, 0], "\n".join(err[-2000:] for _, _, err in results)
    epochs_started = [[int(line.split()[1].split("/")[0]) for line in stdout.splitlines() if line.startswith("Epoch ")]
                      for _, stdout, _ in results]
    # Both resumed after the backed-up epochs, together, and ran to the end.
    assert epochs_started[0] == epochs_started[1]
    assert epochs_started[0][0] >= backed_up_epochs + 1 >= 2 and epochs_started[0][-1] == 4
    # The same final metrics on both (the time each waited may differ).
    final_lines = [[line.split(", tested")[0] for line in stdout.splitlines() if line.startswith("loss ")]
                   for _, stdout, _ in results]
    assert len(final_lines[0]) == 1 and final_lines[0] == final_lines[1]
    metrics = _metrics(run_dir)
    losses = metrics["history"]["loss"]
    assert len(losses) == 4  # Every epoch accounted for, across both sessions.
    # The first resumed epoch starts from the chief's backed-up weights, not
    # from new ones: its loss is below the first epoch's, which started from scratch.
    assert losses[epochs_started[0][0] - 1] < losses[0]
    assert metrics["test_loss"] < math.log(10)  # Below an untrained model's (chance: ln 10).
    assert not (run_dir / "backup").exists()  # Deleted by the chief once complete.
    assert not [path for path in scratch.iterdir() if path.name.startswith("lenet-worker")]


@pytest.mark.slow
def test_a_lost_worker_ends_the_survivor_with_one_line_and_a_restart_resumes(tmp_path, fashion_mnist_dir):
    """One of two workers dies (SIGKILL) mid-run, and in the restart one freezes
    (SIGSTOP): each time the chief stops within 60 s with one line and keeps its
    backup, and the next restart of both resumes from it; the third finishes."""
    import time

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run_dir = tmp_path / "run"
    backup = RunDir(run_dir).backup_metadata
    epochs = 5
    resumed_from = 0
    for stop_signal in (signal.SIGKILL, signal.SIGSTOP):
        workers = _start_workers(run_dir, scratch, limit_train=4096, epochs=epochs)
        # A backup from this session: an epoch beyond the one it resumed from.
        wait_for(lambda: backed_up_epochs(backup) > resumed_from, workers, "a backed-up epoch")
        backed_up = backed_up_epochs(backup)
        lost, survivor = workers[1], workers[0]
        lost.send_signal(stop_signal)
        lost_at = time.monotonic()
        try:
            _, stderr = survivor.communicate(timeout=120)
            survivor_seconds = time.monotonic() - lost_at
        finally:
            lost.kill()
            lost.communicate()
        what = signal.Signals(stop_signal).name
        assert survivor.returncode not in (0, None), f"{what}: {stderr[-2000:]}"
        assert survivor_seconds <= 60, f"{what}: the survivor took {survivor_seconds:.0f} s to stop"
        last_line = stderr.strip().splitlines()[-1]
        assert last_line.startswith("lenet-tf train: error: "), f"{what}: {stderr[-3000:]}"
        assert "of this multi-worker run was lost" in last_line and "restart every worker" in last_line
        assert "Traceback" not in stderr
        resumed_from = json.loads(backup.read_text())["epoch"]
        assert backed_up <= resumed_from < epochs  # The chief's last backup is intact, the run unfinished.

    results = _finish(_start_workers(run_dir, scratch, limit_train=4096, epochs=epochs))
    assert [returncode for returncode, _, _ in results] == [0, 0], "\n".join(err[-2000:] for _, _, err in results)
    epochs_started = [int(line.split()[1].split("/")[0]) for line in results[0][1].splitlines()
                      if line.startswith("Epoch ")]
    assert epochs_started == list(range(resumed_from + 1, epochs + 1))
    metrics = _metrics(run_dir)
    assert len(metrics["history"]["loss"]) == epochs  # Every epoch accounted for, across the three sessions.
