"""Benchmarks: the package's paths against plain Keras, measured in one process.

    python -m benchmarks.bench                       # training + evaluation ratios
    python -m benchmarks.bench --export-dir exports/lenet_fashion_mnist/2   # + latency of every export
    python -m benchmarks.bench --full-run            # + wall time of `python train.py` on real data
    python -m benchmarks.bench --kernels             # + where one training step's time goes, kernel by kernel

Every number is a median over repeats after a warm-up, with the spread
(min..max) beside it; ratios compare runs made in the same process on the
same synthetic data (random uint8 images, 60,000 by default). Results are
printed as a table and written as JSON and Markdown (--doc PAGE: between its bench markers).
Timing targets live here, never in unit tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import (
    README_END, README_START, table_cell, has_markers, machine_description, replace_between_markers, synthetic_data,
)
from benchmarks.exports import bench_exports
from benchmarks.kernels import kernels_markdown, bench_kernels
from benchmarks.runs import bench_full_run, time_to_accuracy
from benchmarks.throughput import bench_callback_overhead, bench_evaluation, bench_training
from lenet_tf.quiet import import_tensorflow_quietly


def to_markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [f"Measured {machine['date']} on {machine['cores']} cores of {machine['cpu']}"
             f"{', GPUs ' + ', '.join(machine['gpus']) if machine['gpus'] else ''}; "
             f"TensorFlow {machine['tensorflow']}, Keras {machine['keras']}. "
             f"Median of {results['settings']['repeats']} repeats after a warm-up (min..max).", ""]
    if "training" in results:
        training, evaluation = results["training"], results["evaluation"]
        lines += ["Each repeat measures plain Keras and lenet_tf back to back; the ratio is the median of "
                  "the per-repeat ratios (their range in brackets).", "",
                  "| measurement | plain Keras | lenet_tf | ratio |", "| --- | --- | --- | --- |"]
        for label, block, base in (("training, images/s", training, "plain_keras"),
                                   ("evaluation, images/s", evaluation, "plain_keras_predict")):
            spread = block["pair_ratios"]
            lines.append(f"| {label} | {table_cell(block[base])} | {table_cell(block['package'])} | "
                         f"{block['ratio']:.2f}x ({spread['min']:.2f}..{spread['max']:.2f}) |")
        lines.append("")
    if "kernels" in results:
        lines += kernels_markdown(results["kernels"])
    if "exports" in results:
        lines += ["Batch-1 latency: TFLite through the interpreter API (set_tensor, invoke, get_tensor; the "
                  "signature runner's p50 in brackets), the SavedModel through its `serving_default` signature, "
                  "ONNX through an onnxruntime session, the web page's model inside the page in Chromium "
                  "(onnxruntime-web, measured with performance.now(), 0.1 ms resolution).", "",
                  "| format | size | test accuracy | max abs Δp vs Keras | top-1 agreement | batch-1 p50 | batch-1 p99 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, numbers in results["exports"].items():
            if name.startswith("_"):
                continue
            runner = f" ({numbers['signature_runner_p50_us']:.1f})" if "signature_runner_p50_us" in numbers else ""
            lines.append(
                f"| {name} | {numbers['bytes'] / 1024:.0f} KiB | {numbers.get('test_accuracy', float('nan')):.4f} | "
                f"{numbers.get('max_abs_probability_diff', float('nan')):.1e} | {numbers.get('top1_agreement', float('nan')):.4f} | "
                f"{numbers['p50_us']:.1f} µs{runner} | {numbers['p99_us']:.0f} µs |")
        lines.append("")
    if "callback_overhead" in results:
        block = results["callback_overhead"]
        lines.append(f"Default callbacks (TensorBoard per epoch, image dashboards every 5 epochs, checkpoint, "
                     f"backup, history) over 5 epochs with validation: {block['default_callbacks']['total']:.1f} s "
                     f"vs {block['no_callbacks']['total']:.1f} s without, an overhead of "
                     f"{block['overhead'] * 100:.1f} %.")
        lines.append("")
    for entry in results.get("time_to_accuracy", []):
        if "error" in entry:
            lines.append(f"{entry['run_dir']}: {entry['error']}.")
        else:
            lines.append(f"{entry['run_dir']}: validation accuracy {entry['accuracy']:.4f} ≥ {entry['target']} "
                         f"after epoch {entry['epoch']}, {entry['seconds']:.0f} s from the start of training.")
    if results.get("time_to_accuracy"):
        lines.append("")
    for key in ("full_run",):
        if key in results:
            run = results[key]
            if "error" in run:
                lines.append(f"`{run['command']}` failed: {run['error']}")
            else:
                own = run.get("train_py_peak_rss_mib")
                own_text = f" ({own:,.0f} MiB in train.py itself)" if own else ""
                lines.append(f"`{run['command']}`: {run['wall_seconds']:.1f} s wall, peak RSS {run['peak_rss_mib']:,.0f} MiB "
                             f"over train.py and its export helper processes{own_text}, "
                             f"test accuracy {run['test_accuracy']:.4f}, {run['examples_per_sec']:.0f} examples/s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=60_000, help="synthetic training images (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="default: %(default)s")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs/passes after the warm-up (default: %(default)s)")
    parser.add_argument("--skip-training", action="store_true", help="only the export latencies")
    parser.add_argument("--export-dir", type=Path, help="an export version folder to measure latency on")
    parser.add_argument("--latency-calls", type=int, default=5000, help="batch-1 calls per TFLite model (default: %(default)s)")
    parser.add_argument("--kernels", action="store_true",
                        help="also time each heavy kernel of one training step (where the step's time goes)")
    parser.add_argument("--callback-overhead", action="store_true",
                        help="also measure the default callbacks' cost per epoch (6 epochs twice)")
    parser.add_argument("--time-to-accuracy", type=Path, nargs="*", default=[], metavar="RUN_DIR",
                        help="finished run folders: seconds until validation accuracy first reached --target")
    parser.add_argument("--target", type=float, default=0.90, help="accuracy for --time-to-accuracy (default: %(default)s)")
    parser.add_argument("--full-run", action="store_true", help="also time `python train.py` with defaults on real data")
    parser.add_argument("--output", type=Path, default=Path("bench_results.json"), help="JSON output (default: %(default)s)")
    parser.add_argument("--markdown", type=Path, help="also write the Markdown table here")
    parser.add_argument("--doc", type=Path,
                        help=f"also put the Markdown into this file between the lines {README_START} and {README_END}")
    args = parser.parse_args(argv)
    for name in ("examples", "batch_size", "repeats", "latency_calls"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.doc and not has_markers(args.doc):
        parser.error(f"--doc {args.doc} has no lines {README_START} and {README_END} to write between")
    if args.export_dir and not (args.export_dir / "metadata.json").is_file():
        parser.error(f"--export-dir {args.export_dir} is not an export version folder (no metadata.json)")
    import_tensorflow_quietly()
    results: dict[str, Any] = {"machine": machine_description(),
                               "settings": {"examples": args.examples, "batch_size": args.batch_size,
                                            "repeats": args.repeats}}
    if not args.skip_training:
        images, labels = synthetic_data(args.examples)
        results["training"] = bench_training(images, labels, args.repeats, args.batch_size)
        results["evaluation"] = bench_evaluation(images[:10_000], args.repeats)
    if args.kernels:
        results["kernels"] = bench_kernels(args.batch_size, max(args.repeats, 5))
    if args.callback_overhead:
        images, labels = synthetic_data(args.examples)
        test_images, test_labels = synthetic_data(10_000, seed=1)
        results["callback_overhead"] = bench_callback_overhead(images, labels, test_images, test_labels)
    if args.export_dir:
        results["exports"] = bench_exports(args.export_dir, args.latency_calls)
    if args.full_run:
        results["full_run"] = bench_full_run([])
    if args.time_to_accuracy:
        results["time_to_accuracy"] = [time_to_accuracy(run_dir, args.target) for run_dir in args.time_to_accuracy]
    markdown = to_markdown(results)
    print(markdown)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown)
    if args.doc:
        replace_between_markers(args.doc, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
