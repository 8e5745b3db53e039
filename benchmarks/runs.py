"""Whole runs: `python train.py` in a fresh process, and time to accuracy read from a run's events."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lenet_tf.io_utils import child_environment
from lenet_tf.run_dir import RunDir, folder_for_training

TRAIN_PY = Path(__file__).resolve().parent.parent / "train.py"


@dataclass
class TrainingProcess:
    """A finished `python train.py` process: the metrics.json it wrote and how long it ran."""

    run_dir: Path  # Where it trained: beside --run-dir when that held a finished run.
    metrics: dict[str, Any]
    launched: float  # time.time() when it started.
    seconds: float  # Its wall time, exports included.
    # The peak resident memory of this process's children so far, in MiB: at
    # least the largest of train.py and its export helpers (parity check, ONNX).
    children_peak_rss_mib: float


def train_in_fresh_process(arguments: list[str], run_dir: str | Path) -> TrainingProcess:
    """Runs `python train.py ARGUMENTS --run-dir RUN_DIR` in a fresh process, so
    that runs leak no state into each other; raises RuntimeError with its
    stderr's end when it fails."""
    command = [sys.executable, str(TRAIN_PY), *arguments, "--run-dir", str(run_dir)]
    # A folder that holds a finished run (a benchmark run again into its output) is not continued.
    trained_in = folder_for_training(run_dir)
    launched = time.time()
    completed = subprocess.run(command, capture_output=True, text=True, env=child_environment())
    seconds = time.time() - launched
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    return TrainingProcess(trained_in.root, json.loads(trained_in.metrics.read_text()), launched, seconds,
                           resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def bench_full_run(extra_args: list[str]) -> dict[str, Any]:
    """Wall time and peak memory of `python train.py` in a fresh process."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            run = train_in_fresh_process(["--export-dir", f"{scratch}/exports", *extra_args], f"{scratch}/run")
        except RuntimeError as error:
            return {"command": " ".join(["python train.py", *extra_args]), "error": str(error).splitlines()[-1:]}
    return {
        "command": " ".join(["python train.py", *extra_args]),
        "wall_seconds": run.seconds,
        # The largest of train.py and its export helpers (parity check, ONNX), and train.py's own.
        "peak_rss_mib": run.children_peak_rss_mib,
        "train_py_peak_rss_mib": run.metrics.get("peak_rss_mib"),
        "test_accuracy": run.metrics["test_accuracy"],
        "examples_per_sec": run.metrics["examples_per_sec"],
    }


def _events(folder: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    accumulator.Reload()
    return accumulator.Tensors(tag) if tag in accumulator.Tags()["tensors"] else []


def validation_curve(run_dir: Path, since: float) -> list[tuple[int, float, float]]:
    """(epoch, validation accuracy, seconds after `since`) for every epoch of a run, from its event files."""
    import tensorflow as tf

    return [(event.step + 1, float(tf.make_ndarray(event.tensor_proto)), event.wall_time - since)
            for event in _events(RunDir(run_dir).logs / "validation", "epoch_accuracy")]


def time_to_accuracy(run_dir: Path, target: float) -> dict[str, Any]:
    """Seconds from a run's start to the end of the first epoch whose validation
    accuracy reached `target`, read from its TensorBoard event files (the
    HParams session start marks the start of training)."""
    starts = _events(RunDir(run_dir).logs, "_hparams_/session_start_info")
    if not starts:
        return {"run_dir": str(run_dir), "error": "no HParams session start in the event files"}
    for epoch, accuracy, seconds in validation_curve(run_dir, since=starts[0].wall_time):
        if accuracy >= target:
            return {"run_dir": str(run_dir), "target": target, "epoch": epoch, "accuracy": accuracy, "seconds": seconds}
    return {"run_dir": str(run_dir), "target": target, "error": "target never reached"}
