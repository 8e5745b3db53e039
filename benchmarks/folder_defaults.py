"""What a user gets from a folder of their own pictures with no flag but
--data-dir, against the TensorFlow tutorial's CNN on the same split.

    python -m benchmarks.folder_defaults FOLDER [FOLDER ...] [--mnist-png] [--per-class 10]

For each FOLDER (class subfolders, or train/ and test/ with them) and, with
--mnist-png, the 70,000 MNIST digits written as PNG files (LENET_TF_DATA_DIR
must hold mnist/): the package's own split of the folder (its test/, or 10 %
of each class held out) is laid out as train/ and test/ links in a scratch
folder, so both sides train and test on the same pictures. Then, each in a
fresh process and timed as a whole command:

- `python train.py --data-dir SPLIT` (the default export included, an empty
  picture cache, as a user's first run);
- the tutorial's script (benchmarks.tutorial_cnn: the pictures' own size in
  colour, 15 epochs);
- `python train.py --data-dir SMALL` on --per-class pictures a class of the
  training split (and the same test split): it must train and export.

Prints each folder's test accuracies, wall times and their ratios, and the
machine. The folders themselves stay outside the repository; name where each
came from beside the numbers (docs/folders.md)."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent


def split_folder(source: Path, destination: Path, per_class: int | None = None) -> tuple[int, int]:
    """The package's train/test split of `source` as links under destination/train and destination/test
    (only the first `per_class` training pictures of each class, when given); returns the two counts."""
    from lenet_tf.folders import FolderDataset

    folder = FolderDataset.scan(source)
    listing = folder.listing
    is_test = folder._test_mask(listing)
    taken: dict[int, int] = {}
    counts = [0, 0]
    for relative, label, test in zip(listing.relatives, listing.labels, is_test):
        if not test:
            taken[label] = taken.get(label, 0) + 1
            if per_class is not None and taken[label] > per_class:
                continue
        target = destination / ("test" if test else "train") / listing.class_names[label] / \
            relative.replace("/", "__")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(listing.root / relative)
        counts[bool(test)] += 1
    return counts[0], counts[1]


def timed(command: list[str], environment: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if finished.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({finished.returncode}):\n{finished.stderr[-3000:]}")
    return seconds, finished.stdout


def package_run(split: Path, scratch: Path, name: str) -> tuple[float, dict]:
    environment = dict(os.environ, XDG_CACHE_HOME=str(scratch / f"cache-{name}"))
    run_dir, export_dir = scratch / f"run-{name}", scratch / f"exports-{name}"
    seconds, _ = timed([sys.executable, "train.py", "--data-dir", str(split), "--run-dir", str(run_dir),
                        "--export-dir", str(export_dir)], environment)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if not metrics.get("exports"):
        raise SystemExit(f"the run on {split} exported nothing")
    return seconds, metrics


def tutorial_run(split: Path) -> tuple[float, float]:
    seconds, output = timed([sys.executable, "-m", "benchmarks.tutorial_cnn", str(split / "train"),
                             str(split / "test")], dict(os.environ))
    return seconds, float(re.search(r"test_accuracy=([0-9.]+)", output).group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--mnist-png", action="store_true", help="also the 70,000 MNIST digits as PNG files")
    parser.add_argument("--per-class", type=int, default=10, help="the small folder's pictures a class")
    args = parser.parse_args(argv)
    from benchmarks.common import machine_description
    from benchmarks.folders import write_png_folder

    with tempfile.TemporaryDirectory(prefix="lenet-folder-defaults-") as scratch_name:
        scratch = Path(scratch_name)
        folders = {folder.name: folder.resolve() for folder in args.folders}
        if args.mnist_png:
            write_png_folder(scratch / "mnist_png")
            folders["MNIST as PNG"] = scratch / "mnist_png" / "pictures"
        rows = []
        for index, (name, folder) in enumerate(folders.items()):
            split, small = scratch / f"split-{index}", scratch / f"small-{index}"
            train_count, test_count = split_folder(folder, split)
            split_folder(folder, small, per_class=args.per_class)
            ours_seconds, ours = package_run(split, scratch, f"full-{index}")
            peer_seconds, peer_accuracy = tutorial_run(split)
            small_seconds, small_run = package_run(small, scratch, f"small-{index}")
            rows.append((name, train_count, test_count, ours, ours_seconds, peer_accuracy, peer_seconds,
                         small_run, small_seconds))
            print(f"{name}: {train_count} training, {test_count} test pictures; no-flag run: test accuracy "
                  f"{ours['test_accuracy']:.4f} in {ours_seconds:.1f} s (batch {ours['global_batch_size']}, "
                  f"{len(ours['history']['loss'])} of {ours['epochs']} epochs, kept epoch {ours.get('kept_epoch')}); "
                  f"tutorial CNN: {peer_accuracy:.4f} in {peer_seconds:.1f} s; accuracy difference "
                  f"{ours['test_accuracy'] - peer_accuracy:+.4f}, wall time ratio {ours_seconds / peer_seconds:.2f}; "
                  f"{args.per_class} a class: test accuracy {small_run['test_accuracy']:.4f} in "
                  f"{small_seconds:.1f} s, exported", flush=True)
        machine = machine_description()
        print(f"\n{machine['date']}, {machine['cores']} cores of {machine['cpu']}, TensorFlow "
              f"{machine['tensorflow']}, Keras {machine['keras']}")
        print("| folder | training / test pictures | `train.py --data-dir` | tutorial CNN | wall time, ours / "
              f"tutorial's | {args.per_class} a class |")
        print("|---|---|---|---|---|---|")
        for name, train_count, test_count, ours, ours_seconds, peer_accuracy, peer_seconds, small_run, small_seconds \
                in rows:
            print(f"| {name} | {train_count:,} / {test_count:,} | {ours['test_accuracy']:.3f} in {ours_seconds:.0f} s "
                  f"| {peer_accuracy:.3f} in {peer_seconds:.0f} s | {ours_seconds / peer_seconds:.2f} | "
                  f"{small_run['test_accuracy']:.3f} in {small_seconds:.0f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
