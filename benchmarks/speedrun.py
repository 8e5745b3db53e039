"""The speedrun: how long a user waits for a good model, over many seeds, each in a fresh process.

    python -m benchmarks.speedrun --dataset fashion_mnist --seeds 10 --target 0.925 --time-target 45
    python -m benchmarks.speedrun --dataset mnist --seeds 10 --target 0.990 --time-target 10

For every seed, `python train.py --preset fast --seed S` runs in a process of its own
(exports included, as a user runs it). Read back from its metrics.json and TensorBoard
events: the test accuracy (reported once, at the end), the seconds from the process's start
until that accuracy was known (TensorFlow's import, data loading and the per-epoch dashboards
included; the final image dashboards and the export come after it), the whole process's wall
time with the export, and when the validation curve first reached the target. Time targets
are for a machine on which the yardstick (benchmarks/yardstick.py) takes 10 s; the yardstick
is timed in the same run, before each seed and after the last. A shared or throttled machine
can drop into a slow mode for seconds to minutes (yardstick runs far apart in a row), so
the time verdict is given twice: against the target scaled by the run's fastest yardstick
(strict: a seed caught in the slow mode is held to the fast mode's pace), and with each seed's
wait scaled by the faster of the yardstick runs just before and after it (the machine that
seed ran on). Every seed is reported, the losing ones too.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import has_markers, machine_description, replace_between_markers
from benchmarks.runs import train_in_fresh_process, validation_curve
from lenet_tf.io_utils import child_environment

REPOSITORY = Path(__file__).resolve().parent.parent
YARDSTICK_REFERENCE_SECONDS = 10.0


def time_yardstick(repeats: int, examples: int | None = None) -> list[float]:
    """Wall seconds of the yardstick process, `repeats` times (on its first `examples` training images)."""
    seconds = []
    for _ in range(repeats):
        command = [sys.executable, "-m", "benchmarks.yardstick", *(["--examples", str(examples)] if examples else [])]
        completed = subprocess.run(command, cwd=REPOSITORY,
                                   capture_output=True, text=True, env=child_environment())
        if completed.returncode != 0:
            raise RuntimeError(f"the yardstick failed:\n{completed.stderr[-2000:]}")
        seconds.append(float(completed.stdout.strip().splitlines()[-1]))
    return seconds


def run_seed(dataset: str, preset: str, seed: int, scratch: Path, extra: list[str], target: float) -> dict[str, Any]:
    run_dir = scratch / f"run-{seed}"
    run = train_in_fresh_process(["--preset", preset, "--dataset", dataset, "--seed", str(seed),
                                  "--export-dir", str(scratch / "exports"), *extra], run_dir)
    metrics = run.metrics
    curve = validation_curve(run.run_dir, since=run.launched)
    reached = next(((epoch, seconds) for epoch, accuracy, seconds in curve if accuracy >= target), None)
    return {
        "seed": seed,
        "test_accuracy": metrics["test_accuracy"],
        "seconds_to_tested_model": metrics["seconds_to_tested_model"],
        "process_seconds_with_export": run.seconds,
        "training_seconds": metrics.get("training_seconds"),
        "examples_per_sec": metrics["examples_per_sec"],
        "stage_seconds": metrics.get("stage_seconds", []),
        "validation_curve": [[epoch, accuracy] for epoch, accuracy, _ in curve],
        "first_reached_target": {"epoch": reached[0], "seconds": reached[1]} if reached else None,
    }


def neighbouring_yardsticks(yardstick: list[float], positions: list[int], seed_index: int) -> float:
    """The faster of the yardstick runs just before and just after seed number `seed_index`.

    `positions[k]` is how many seeds had run when yardstick run k started. The
    machine's speed mode changes over seconds to minutes, so the runs beside
    a seed measure the machine that seed ran on better than the run's fastest;
    the faster of the two keeps the verdict on the strict side.
    """
    before = [seconds for seconds, position in zip(yardstick, positions) if position <= seed_index]
    after = [seconds for seconds, position in zip(yardstick, positions) if position > seed_index]
    return min(([before[-1]] if before else []) + ([after[0]] if after else []))


def summarise(runs: list[dict[str, Any]], yardstick: list[float], positions: list[int], target: float,
              time_target: float) -> dict[str, Any]:
    accuracies = [run["test_accuracy"] for run in runs]
    waits = [run["seconds_to_tested_model"] for run in runs]
    scale = min(yardstick) / YARDSTICK_REFERENCE_SECONDS  # The strictest: see the module's docstring.
    # Each wait as it would be on a machine whose yardstick takes 10 s, by the yardstick runs beside it.
    waits_on_reference = [wait * YARDSTICK_REFERENCE_SECONDS / neighbouring_yardsticks(yardstick, positions, index)
                          for index, wait in enumerate(waits)]
    stages: dict[str, list[float]] = {}
    for run in runs:
        for stage, seconds in run["stage_seconds"]:
            stages.setdefault(stage, []).append(seconds)
    return {
        "accuracy": {"mean": statistics.fmean(accuracies), "std": statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
                     "min": min(accuracies), "max": max(accuracies)},
        "seconds_to_tested_model": {"median": statistics.median(waits), "max": max(waits)},
        "yardstick_seconds": yardstick,
        "yardstick_after_seeds": positions,
        "scaled_time_target": time_target * scale,
        "accuracy_target": target,
        "mean_meets_accuracy_target": statistics.fmean(accuracies) >= target,
        "every_run_within_time_target": max(waits) <= time_target * scale,
        "seconds_to_tested_model_on_reference": waits_on_reference,
        "every_run_within_time_target_by_neighbours": max(waits_on_reference) <= time_target,
        "median_stage_seconds": {stage: statistics.median(values) for stage, values in stages.items()},
    }


def to_markdown(result: dict[str, Any]) -> str:
    machine, summary, settings = result["machine"], result["summary"], result["settings"]
    accuracy, waits = summary["accuracy"], summary["seconds_to_tested_model"]
    # Flags passed through to train.py belong in both commands: without them
    # the block would describe the preset as it stands, not what ran.
    extra = "".join(f" {flag}" for flag in settings.get("extra", ()))
    interleaving = ("one before each seed and one after the last"
                    if summary["yardstick_after_seeds"] == list(range(len(result["runs"]) + 1))
                    else "spread among the seeds")
    lines = [
        f"Measured {machine['date']} on {machine['cores']} cores of {machine['cpu']}; TensorFlow "
        f"{machine['tensorflow']}, Keras {machine['keras']}. `python -m benchmarks.speedrun --dataset "
        f"{settings['dataset']} --preset {settings['preset']} --seeds {len(result['runs'])} --target "
        f"{settings['target']} --time-target {settings['time_target']:g}{' --' + extra if extra else ''}`: each "
        f"seed a fresh `python train.py --preset {settings['preset']} --dataset {settings['dataset']} --seed S"
        f"{extra}` process.",
        "",
        f"Yardstick (plain Keras, classic LeNet, one epoch, TensorFlow import included): "
        f"{', '.join(f'{seconds:.1f}' for seconds in summary['yardstick_seconds'])} s, in the order they ran, "
        f"{interleaving}; by the fastest, the {settings['time_target']:g} s target scales to "
        f"**{summary['scaled_time_target']:.1f} s** on this machine. The column \"on a 10 s machine\" scales each "
        "seed's wait instead by the faster of the yardstick runs just before and after it.",
        "",
        "| seed | test accuracy | tested after (s) | on a 10 s machine (s) | process with export (s) | training (s) | "
        f"images/s | validation first ≥ {settings['target']} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run, on_reference in zip(result["runs"], summary["seconds_to_tested_model_on_reference"]):
        reached = run["first_reached_target"]
        reached_text = f"epoch {reached['epoch']}, {reached['seconds']:.1f} s" if reached else "not reached"
        lines.append(f"| {run['seed']} | {run['test_accuracy']:.4f} | {run['seconds_to_tested_model']:.1f} | "
                     f"{on_reference:.1f} | {run['process_seconds_with_export']:.1f} | {run['training_seconds']:.1f} | "
                     f"{run['examples_per_sec']:,.0f} | {reached_text} |")
    lines += [
        "",
        f"Test accuracy **{accuracy['mean']:.4f}** ± {accuracy['std']:.4f} (min {accuracy['min']:.4f}, max "
        f"{accuracy['max']:.4f}) against a target of {settings['target']} for the mean: "
        f"{'reached' if summary['mean_meets_accuracy_target'] else 'not reached'}. Tested after "
        f"{waits['median']:.1f} s (median), {waits['max']:.1f} s at most, against {summary['scaled_time_target']:.1f} s "
        f"for every run: {'within' if summary['every_run_within_time_target'] else 'not within'}. Each scaled by the "
        f"yardstick runs beside it, {max(summary['seconds_to_tested_model_on_reference']):.1f} s at most against "
        f"{settings['time_target']:g} s: "
        f"{'within' if summary['every_run_within_time_target_by_neighbours'] else 'not within'}.",
        "",
        "Where a run's wait goes (median over the seeds, seconds):",
        "",
        "| stage | seconds |",
        "| --- | --- |",
    ]
    lines += [f"| {stage} | {seconds:.2f} |" for stage, seconds in summary["median_stage_seconds"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speedrun", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.925, help="test accuracy the mean must reach")
    parser.add_argument("--time-target", type=float, default=45.0,
                        help="seconds every run may take on a machine whose yardstick takes 10 s")
    parser.add_argument("--yardstick-repeats", type=int,
                        help="yardstick runs, spread among the seeds (default: one before each seed and one after the last)")
    parser.add_argument("--yardstick-examples", type=int,
                        help="the yardstick on its first N training images: a quick check of this script, whose "
                        "time verdicts then mean nothing (default: all)")
    parser.add_argument("--output", type=Path, default=Path("speedrun_results.json"))
    parser.add_argument("--doc", type=Path, help="also write the Markdown into this page between "
                        "<!-- speedrun-<dataset>:start/end --> lines")
    parser.add_argument("extra", nargs="*", help="further flags for train.py, after --")
    args = parser.parse_args(argv)
    if args.yardstick_repeats is not None and args.yardstick_repeats < 1:
        parser.error(f"--yardstick-repeats must be at least 1 (got {args.yardstick_repeats})")
    block = f"speedrun-{args.dataset}"
    if args.doc and not has_markers(args.doc, block):
        parser.error(f"--doc {args.doc} has no <!-- {block}:start --> and <!-- {block}:end --> lines")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    # The yardstick runs spread among the seeds (before the first, ..., after the
    # last), so that a machine changing speed mid-benchmark shows in both.
    repeats = args.yardstick_repeats or len(seeds) + 1
    yardstick_after = collections.Counter(round(index * len(seeds) / max(repeats - 1, 1)) for index in range(repeats))
    yardstick, positions, runs = [], [], []
    with tempfile.TemporaryDirectory(prefix="lenet-speedrun-") as scratch:
        for done in range(len(seeds) + 1):
            yardstick += time_yardstick(yardstick_after[done], args.yardstick_examples)
            positions += [done] * yardstick_after[done]
            if done == len(seeds):
                break
            runs.append(run_seed(args.dataset, args.preset, seeds[done], Path(scratch), args.extra, args.target))
            print(f"seed {seeds[done]}: test accuracy {runs[-1]['test_accuracy']:.4f}, tested after "
                  f"{runs[-1]['seconds_to_tested_model']:.1f} s", flush=True)
    result = {
        "machine": {**machine_description(), "date": datetime.date.today().isoformat()},
        "settings": {"dataset": args.dataset, "preset": args.preset, "target": args.target,
                     "time_target": args.time_target, "extra": args.extra},
        "runs": runs,
        "summary": summarise(runs, yardstick, positions, args.target, args.time_target),
    }
    markdown = to_markdown(result)
    print(markdown)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    if args.doc:
        replace_between_markers(args.doc, markdown, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
