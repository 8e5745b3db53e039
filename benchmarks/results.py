"""The results table and the ablation of the modern preset, run on real data.

    python -m benchmarks.results table     # datasets x presets x seeds -> results/results.{md,json}
    python -m benchmarks.results ablation  # modern minus one change at a time -> results/ablation.{md,json}

Each run is `python -m lenet_tf train ...` in a fresh process, so runs cannot
leak state into each other; its metrics.json is read back. The table trains
on the whole training split and reports the test split once, at the end (no
epoch or setting is chosen from it). The ablation holds out 10 % of the
training split (`--validation-split 0.1`) and compares validation accuracy
only: the test split is never used to choose a hyperparameter.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import has_markers, machine_description, replace_between_markers
from benchmarks.runs import train_in_fresh_process

# Published reference points shown beside our numbers (see README for sources).
PUBLISHED = {
    ("fashion_mnist", "classic"): "0.78-0.85 (D2L, LeNet chapter)",
    ("fashion_mnist", "modern"): "0.922-0.925 (Fashion-MNIST benchmark, 2-conv nets < 100k params)",
    ("mnist", "classic"): "0.9905 (LeCun et al. 1998, LeNet-5)",
    ("mnist", "modern"): "0.9905 (LeCun et al. 1998, LeNet-5)",
}
# One change of the modern preset undone per row: the flags that undo it.
ABLATIONS = {
    "modern (all changes)": [],
    "no augmentation": ["--augment", "none"],
    "no label smoothing": ["--label-smoothing", "0"],
    "no weight decay": ["--weight-decay", "0"],
    "no batch norm": ["--no-batch-norm"],
    "no momentum": ["--momentum", "0", "--no-nesterov"],
    "constant learning rate (no warm-up, no cosine)": ["--lr-schedule", "constant", "--warmup-epochs", "0"],
    "average pooling": ["--pooling", "avg"],
    "sigmoid": ["--activation", "sigmoid"],
}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_training(arguments: list[str], run_dir: Path) -> dict[str, Any]:
    """One training run in a fresh process, without exports or image dashboards; returns its metrics plus
    wall time and the command that ran."""
    arguments = [*arguments, "--format", "", "--image-every-epochs", "0"]
    run = train_in_fresh_process(arguments, run_dir)
    return {**run.metrics, "wall_seconds_process": run.seconds, "command": shlex.join(["python", "train.py", *arguments])}


def _mean_spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def run_table(datasets: list[str], presets: list[str], seeds: list[int], output: Path,
              data_dirs: dict[str, str]) -> dict[str, Any]:
    rows = []
    for dataset in datasets:
        for preset in presets:
            runs = []
            for seed in seeds:
                arguments = ["--dataset", dataset, "--preset", preset, "--seed", str(seed)]
                if data_dirs.get(dataset):
                    arguments += ["--data-dir", data_dirs[dataset]]
                metrics = run_training(arguments, output / "runs" / f"{dataset}-{preset}-seed{seed}")
                runs.append(metrics)
                print(f"{dataset} {preset} seed {seed}: test accuracy {metrics['test_accuracy']:.4f} "
                      f"in {metrics['wall_seconds_process']:.0f} s", flush=True)
            rows.append({
                "dataset": dataset, "preset": preset, "seeds": seeds, "epochs": runs[0]["epochs"],
                "test_accuracy": _mean_spread([run["test_accuracy"] for run in runs]),
                "wall_seconds": _mean_spread([run["wall_seconds_process"] for run in runs]),
                "published": PUBLISHED.get((dataset, preset), ""),
                "command": runs[0]["command"].replace(" --seed 0", "") + " --seed S",
            })
    return {"rows": rows, "commit": _commit(), "date": datetime.date.today().isoformat(), "cores": os.cpu_count(),
            "machine": machine_description()}


def run_ablation(dataset: str, seed: int, output: Path, data_dir: str | None) -> dict[str, Any]:
    rows = []
    for name, flags in ABLATIONS.items():
        arguments = ["--dataset", dataset, "--preset", "modern", "--seed", str(seed), "--validation-split", "0.1", *flags]
        if data_dir:
            arguments += ["--data-dir", data_dir]
        slug = name.split(" (")[0].replace(" ", "-").replace(",", "")
        metrics = run_training(arguments, output / "ablation-runs" / f"{dataset}-{slug}-seed{seed}")
        rows.append({"change": name, "flags": " ".join(flags), "validation_accuracy": metrics["validation_accuracy"],
                     "wall_seconds": metrics["wall_seconds_process"]})
        print(f"{name}: validation accuracy {metrics['validation_accuracy']:.4f}", flush=True)
    return {"rows": rows, "dataset": dataset, "seed": seed, "commit": _commit(),
            "date": datetime.date.today().isoformat(), "cores": os.cpu_count(), "machine": machine_description()}


def _machine_words(result: dict[str, Any]) -> str:
    """"2 cores of AMD EPYC, TensorFlow 2.21.0, Keras 3.15.1": speeds differ
    by several times between machines of the same size."""
    machine = result["machine"]
    return (f"{machine['cores']} cores of {machine['cpu']}, TensorFlow {machine['tensorflow']}, "
            f"Keras {machine['keras']}" + (f", GPU {', '.join(machine['gpus'])}" if machine["gpus"] else ""))


def table_markdown(table: dict[str, Any]) -> str:
    lines = [f"Generated by `python -m benchmarks.results table` at commit {table['commit']} on {table['date']}, "
             f"{_machine_words(table)}; mean ± standard deviation over seeds.", "",
             "| dataset | preset | epochs | seeds | test accuracy (mean ± std) | min..max | "
             "process time per run, without export or image dashboards | published |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in table["rows"]:
        accuracy, wall = row["test_accuracy"], row["wall_seconds"]
        lines.append(f"| {row['dataset']} | {row['preset']} | {row['epochs']} | {len(row['seeds'])} | "
                     f"**{accuracy['mean']:.4f}** ± {accuracy['std']:.4f} | {accuracy['min']:.4f}..{accuracy['max']:.4f} | "
                     f"{wall['mean']:.0f} s | {row['published']} |")
    return "\n".join(lines) + "\n"


def ablation_markdown(ablation: dict[str, Any]) -> str:
    base = ablation["rows"][0]["validation_accuracy"]
    lines = [f"Generated by `python -m benchmarks.results ablation` at commit {ablation['commit']} on {ablation['date']}, "
             f"{_machine_words(ablation)}: {ablation['dataset']}, seed {ablation['seed']}, validation = 10 % of the "
             "training split.", "",
             "| change undone | flags | validation accuracy | vs modern |", "| --- | --- | --- | --- |"]
    for row in ablation["rows"]:
        delta = row["validation_accuracy"] - base
        lines.append(f"| {row['change']} | `{row['flags']}` | {row['validation_accuracy']:.4f} | {delta * 100:+.2f} pt |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.results", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("table")
    table.add_argument("--datasets", default="fashion_mnist,mnist")
    table.add_argument("--presets", default="classic,modern")
    table.add_argument("--seeds", default="0,1,2")
    table.add_argument("--mnist-dir", help="folder with the MNIST IDX files (default: searched)")
    ablation = commands.add_parser("ablation")
    ablation.add_argument("--dataset", default="fashion_mnist")
    ablation.add_argument("--seed", type=int, default=0)
    ablation.add_argument("--mnist-dir")
    for sub in (table, ablation):
        sub.add_argument("--output", type=Path, default=Path("results"))
        sub.add_argument("--doc", type=Path, help="also put the Markdown into this docs page, between its "
                         "<!-- results:start/end --> (table) or <!-- ablation:start/end --> lines")
    args = parser.parse_args(argv)
    block = "results" if args.command == "table" else "ablation"
    if args.doc and not has_markers(args.doc, block):
        parser.error(f"--doc {args.doc} has no <!-- {block}:start --> and <!-- {block}:end --> lines")
    args.output.mkdir(parents=True, exist_ok=True)
    data_dirs = {"mnist": args.mnist_dir}
    if args.command == "table":
        result = run_table(args.datasets.split(","), args.presets.split(","),
                           [int(seed) for seed in args.seeds.split(",")], args.output, data_dirs)
        markdown = table_markdown(result)
    else:
        result = run_ablation(args.dataset, args.seed, args.output, data_dirs.get(args.dataset))
        markdown = ablation_markdown(result)
    (args.output / f"{args.command if args.command == 'ablation' else 'results'}.json").write_text(
        json.dumps(result, indent=2) + "\n")
    (args.output / f"{args.command if args.command == 'ablation' else 'results'}.md").write_text(markdown)
    print(markdown)
    if args.doc:
        replace_between_markers(args.doc, markdown, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
