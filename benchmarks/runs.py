"""Whole runs: `python train.py` in a fresh process, and time to accuracy read from a run's events."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lenet_tf.run_dir import RunDir


def bench_full_run(extra_args: list[str]) -> dict[str, Any]:
    """Wall time and peak memory of `python train.py` in a fresh process."""
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, str(Path(__file__).resolve().parent.parent / "train.py"),
                   "--run-dir", f"{scratch}/run", "--export-dir", f"{scratch}/exports", *extra_args]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        completed = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if completed.returncode != 0:
            return {"command": " ".join(command[1:]), "error": completed.stderr.strip().splitlines()[-1:]}
        metrics = json.loads(RunDir(f"{scratch}/run").metrics.read_text())
    return {
        "command": " ".join(["python train.py", *extra_args]),
        "wall_seconds": wall,
        # The largest of train.py and its export helpers (parity check, ONNX), and train.py's own.
        "peak_rss_mib": max(peak_kib, before) / 1024,
        "train_py_peak_rss_mib": metrics.get("peak_rss_mib"),
        "test_accuracy": metrics["test_accuracy"],
        "examples_per_sec": metrics["examples_per_sec"],
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
