"""What a run folder holds, in one place: training writes it, export, evaluation and the benchmarks read it.

    <run_dir>/
        config.json            the resolved TrainConfig of the run
        metrics.json           final metrics, written last (its presence means the run finished,
                               and no training continues it: folder_for_training)
        history.json           every epoch's logs, across interruptions
        curves.png             the book's training plot
        checkpoints/last.keras the latest complete epoch's model
        backup/                the last finished epoch's weights and optimizer state (callbacks.Backup), while a run is unfinished
        dataset.json           with --data-dir PHOTOS: the folder, its held-out split, every file's size and time
        logs/                  TensorBoard event files
        .lock                  who is running in this folder now
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lenet_tf.errors import UsageError


# The backup's record of its last epoch (lenet_tf.callbacks.Backup writes it).
BACKUP_RECORD_FILE = "training_metadata.json"
# A folder of pictures' record (lenet_tf.folders writes it).
DATASET_RECORD_FILE = "dataset.json"


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoints" / "last.keras"

    @property
    def best_weights(self) -> Path:
        """With early stopping: the weights of the best epoch so far (by validation accuracy)."""
        return self.root / "checkpoints" / "best.weights.h5"

    @property
    def backup(self) -> Path:
        return self.root / "backup"

    @property
    def backup_metadata(self) -> Path:
        """The backup's record of the last backed-up epoch."""
        return self.backup / BACKUP_RECORD_FILE

    @property
    def dataset_record(self) -> Path:
        """With a folder of pictures: the folder, its held-out split and its files, as the run read them."""
        return self.root / DATASET_RECORD_FILE

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def has_checkpoint(self) -> bool:
        return self.config.is_file() and self.checkpoint.is_file()

    def is_finished(self) -> bool:
        """Whether a run finished here: metrics.json is the last file a run writes."""
        return self.metrics.is_file()

    def __str__(self) -> str:
        return str(self.root)


def folder_for_training(requested: str | Path) -> RunDir:
    """The folder a training asked to write to `requested` trains in.

    A finished run is never continued (a second run's epochs in its folder
    would be drawn over the first's in TensorBoard): `requested` itself,
    unless it holds a finished run, else the first of `requested`-2,
    `requested`-3, ... that does not. That is a new folder beside the
    finished ones, or an interrupted run there, which the same command
    thereby resumes. Every worker of a multi-worker run and every start of a
    requeued SLURM job reads the same folders, so all find the same one. One
    finished run is the answer: one that an earlier start of this very SLURM
    job finished (requeued after its run finished, before the job ended).
    """
    requested = Path(requested)
    named = requested if requested.name else requested.resolve()  # "." has no name to number.
    number = 1
    while True:
        candidate = RunDir(requested if number == 1 else named.with_name(f"{named.name}-{number}"))
        if not candidate.is_finished() or _finished_by_an_earlier_start_of_this_slurm_job(candidate):
            return candidate
        number += 1


@contextlib.contextmanager
def holding(run_dir: RunDir, purpose: str, exclusive: bool = True) -> Iterator[None]:
    """Holds the run folder's lock for the duration: one training at a time,
    and no export reading the checkpoint while a training writes it.

    Training holds it exclusively, exports share it. The lock is the
    operating system's (flock), so it goes away with its process, however
    that process ends: a run killed with SIGKILL never blocks its rerun.
    The exclusive holder records who it is, for the message another process
    gets; a holder on another host sharing the folder is reported the same
    way, never broken, with one exception: a SLURM job requeued onto another
    node takes over the lock of its own earlier start, which SLURM ended
    before starting it again (a shared file system can keep the lock of a
    node that went down). Where the file system cannot lock, nothing is enforced.
    """
    import fcntl

    created = not run_dir.root.exists()
    try:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(run_dir.lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise UsageError(f"cannot write the run directory {run_dir}: {error.strerror}; choose a writable folder") from None
    try:
        try:
            fcntl.flock(descriptor, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            if not (exclusive and _held_by_an_earlier_start_of_this_slurm_job(descriptor)):
                raise UsageError(f"the run directory {run_dir} is in use by {_holder(descriptor)}; wait for it to "
                                 "finish, or pass another --run-dir") from None
        except OSError:
            pass  # A file system without locks (some network mounts): run unguarded.
        if exclusive:
            _record_holder(descriptor, purpose)
        yield
    finally:
        if created and exclusive:
            _remove_if_only_the_lock(run_dir)
        os.close(descriptor)  # Releases the lock.


def _remove_if_only_the_lock(run_dir: RunDir) -> None:
    """A run that stopped before writing anything (a bad flag found late, no
    memory for the model) leaves no folder behind that it created."""
    try:
        if [entry.name for entry in run_dir.root.iterdir()] == [run_dir.lock.name]:
            run_dir.lock.unlink()
            run_dir.root.rmdir()
    except OSError:
        pass  # Something appeared meanwhile: leave it.


def _record_holder(descriptor: int, purpose: str) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
              "since": datetime.datetime.now().isoformat(timespec="seconds"), **_slurm_job()}
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
    except OSError:
        pass  # Only the message to a second process needs it.


def _slurm_job() -> dict:
    """The SLURM job this process runs in, and how many times SLURM has started it before (requeues)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return {}
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return {"slurm_job_id": job_id, "slurm_restart_count": int(restarts) if restarts.isdigit() else 0}


def _held_by_an_earlier_start_of_this_slurm_job(descriptor: int) -> bool:
    """Whether the lock's holder is this very SLURM job before a requeue.

    SLURM runs a job once at a time: when it starts a job again (requeued
    after preemption, a node failure or `scontrol requeue`), the earlier
    start has ended, whatever lock the file system still keeps for it.
    """
    try:
        return _an_earlier_start_of_this_slurm_job(os.pread(descriptor, 4096, 0).decode())
    except (OSError, ValueError):
        return False


def _finished_by_an_earlier_start_of_this_slurm_job(run_dir: RunDir) -> bool:
    """Whether the last training in `run_dir` (the lock's record outlives its
    holder) was this very SLURM job before a requeue."""
    try:
        return _an_earlier_start_of_this_slurm_job(run_dir.lock.read_text())
    except (OSError, ValueError):
        return False


def _an_earlier_start_of_this_slurm_job(record: str) -> bool:
    """Whether a lock's record names this process's SLURM job, started fewer times than now."""
    ours = _slurm_job()
    try:
        holder = json.loads(record)
        return bool(ours) and str(holder["slurm_job_id"]) == ours["slurm_job_id"] and \
            int(holder["slurm_restart_count"]) < ours["slurm_restart_count"]
    except (ValueError, KeyError, TypeError):
        return False


def _holder(descriptor: int) -> str:
    unknown = "another process (an export reading its checkpoint, or one that has just started)"
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0).decode())
        pid, host = int(holder["pid"]), str(holder["host"])
        if host == socket.gethostname() and not process_alive(pid):
            return unknown  # The record of an earlier holder; the lock is someone else's.
        return f"{holder['purpose']} process {pid} on host {host} (since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return unknown


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Alive, owned by someone else.
    return True
