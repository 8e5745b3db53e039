"""`lenet-tf tune` on real Fashion-MNIST: what a search finds, and what --parallel saves.

    python -m benchmarks.tune                       # both parts, about 15 minutes on 2 cores
    python -m benchmarks.tune --part search --trials 8 --epochs 5 --parallel 2
    python -m benchmarks.tune --part parallel --parallel-trials 4 --parallel-epochs 2
    python -m benchmarks.tune --part folder --folder PHOTOS --folder-trials 8
    python -m benchmarks.tune --part parallel --folder PHOTOS   # the parallel part on Fashion-MNIST and PHOTOS

search: `lenet-tf tune --preset classic --epochs 5 --trials 8` (the classic
preset untuned reaches about 0.81 test accuracy after 10 epochs,
docs/results.md); prints the best trial's validation and test accuracy, its
settings and the wall time. Target: a test accuracy of at least 0.85.

parallel: the same 4-trial search with --parallel 1 and then --parallel 2,
each in a fresh folder and process, pruning off and the settings that decide
a trial's cost (widths, batch size, batch norm, augmentation, activation,
pooling) fixed, so that both runs train the same amount: only the speed
differs. Prints both wall times and their ratio. Target: --parallel 2
finishes in at most 0.8 of --parallel 1's time on 2 cores.

folder: `lenet-tf tune --data-dir PHOTOS --trials 8`, from the folder's
defaults (the preset a folder of pictures gets, no other flag): the first
trial trains those defaults; prints its validation accuracy, the best
trial's, and whether the search improved on it (best.json says so).

Each run is `python -m lenet_tf tune ...` in a process of its own; the
numbers come from its best.json and its wall time, with the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_description
from lenet_tf.io_utils import child_environment

# The settings that decide how long a trial takes, fixed for the parallel comparison.
_FIXED_COST = ["--batch-size", "128", "--conv-filters", "6,16", "--dense-units", "120,84", "--no-batch-norm",
               "--augment", "none", "--activation", "relu", "--pooling", "max"]


def run_tune(arguments: list[str], scratch: Path) -> dict[str, Any]:
    """`python -m lenet_tf tune ARGUMENTS` in a fresh process; its best.json, command and wall time."""
    command = [sys.executable, "-m", "lenet_tf", "tune", *arguments, "--run-dir", str(scratch / "run"),
               "--export-dir", str(scratch / "exports")]
    started = time.time()
    completed = subprocess.run(command, capture_output=True, text=True, env=child_environment())
    seconds = time.time() - started
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{completed.stderr[-3000:]}")
    best = json.loads((scratch / "run" / "best.json").read_text())
    return {"command": "lenet-tf tune " + " ".join(arguments), "wall_seconds": seconds, "best": best}


def search(trials: int, epochs: int, parallel: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        return run_tune(["--preset", "classic", "--epochs", str(epochs), "--trials", str(trials), "--parallel",
                         str(parallel), "--format", "saved_model"], Path(scratch))


def parallel_speedup(trials: int, epochs: int, folder: str | None = None) -> dict[str, Any]:
    """The parallel part on real Fashion-MNIST (classic preset), or on a folder
    of photos from its recipe at the batch the recipe gives a folder of about
    2,000 pictures (32), where one trial's small steps leave cores idle."""
    data = ["--preset", "classic"] if folder is None else ["--data-dir", folder]
    fixed = _FIXED_COST if folder is None else ["--batch-size", "32", *_FIXED_COST[2:]]
    runs = {}
    for parallel in (1, 2):
        with tempfile.TemporaryDirectory() as scratch:
            runs[parallel] = run_tune([*data, "--epochs", str(epochs), "--trials", str(trials),
                                       "--parallel", str(parallel), "--no-prune", "--format", "", *fixed],
                                      Path(scratch))
    return {"parallel_1": runs[1], "parallel_2": runs[2],
            "ratio": runs[2]["wall_seconds"] / runs[1]["wall_seconds"]}


def folder_search(folder: str, trials: int, parallel: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        return run_tune(["--data-dir", folder, "--trials", str(trials), "--parallel", str(parallel), "--format", ""],
                        Path(scratch))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("search", "parallel", "both", "folder"), default="both")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=2, help="workers for the search part")
    parser.add_argument("--parallel-trials", type=int, default=4)
    parser.add_argument("--parallel-epochs", type=int, default=2)
    parser.add_argument("--folder", help="a folder of photos, one subfolder per class (the folder part; with "
                        "--part parallel, the parallel part on it too)")
    parser.add_argument("--folder-trials", type=int, default=8)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"machine": machine_description()}
    if args.part in ("search", "both"):
        result["search"] = search(args.trials, args.epochs, args.parallel)
        best = result["search"]["best"]
        print(f"search: {result['search']['command']}: best of {best['trials']} trials ({best['pruned']} pruned): "
              f"trial {best['trial']}, validation accuracy {best['validation_accuracy']:.4f}, test accuracy "
              f"{best['test_accuracy']:.4f} in {result['search']['wall_seconds']:.0f} s; settings "
              f"{best['settings']}", flush=True)
    if args.part in ("parallel", "both"):
        result["parallel"] = parallel_speedup(args.parallel_trials, args.parallel_epochs)
    if args.part == "parallel" and args.folder:
        result["parallel_folder"] = parallel_speedup(args.parallel_trials, args.parallel_epochs, args.folder)
    for part in ("parallel", "parallel_folder"):
        if part in result:
            one, two = result[part]["parallel_1"], result[part]["parallel_2"]
            print(f"{part}: {one['command']}: {one['wall_seconds']:.0f} s; with --parallel 2: "
                  f"{two['wall_seconds']:.0f} s (ratio {result[part]['ratio']:.2f})", flush=True)
    if args.part == "folder":
        if not args.folder:
            parser.error("--part folder needs --folder PHOTOS")
        result["folder"] = folder_search(args.folder, args.folder_trials, args.parallel)
        best = result["folder"]["best"]
        start = best.get("starting_settings")
        verdict = ("no starting settings to compare (outside the space)" if start is None else
                   f"starting settings (trial {start['trial']}) validation accuracy {start['validation_accuracy']:.4f}; "
                   + ("improved" if best["improved"] else "not improved"))
        print(f"folder: {result['folder']['command']}: {verdict}; best trial {best['trial']} validation accuracy "
              f"{best['validation_accuracy']:.4f}, test accuracy {best['test_accuracy']:.4f} in "
              f"{result['folder']['wall_seconds']:.0f} s; settings {best['settings']}", flush=True)
    machine = result["machine"]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, TensorFlow {machine['tensorflow']}, "
          f"Keras {machine['keras']}, {machine['date']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
