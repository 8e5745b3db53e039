"""Reading a folder of pictures: the package's first read and cached start
against one pass of Keras's image_dataset_from_directory, side by side; and
training images/s from the folder against the IDX files of the same digits.

    LENET_TF_DATA_DIR=DIR python -m benchmarks.folders [--repeats 3] [--limit N] [--training-rounds 2]

DIR is a folder holding mnist/ (the four IDX files).

Writes the 70,000 MNIST digits as PNG files into train/<digit>/ and
test/<digit>/ of a temporary folder (so the files are in the page cache, as
a folder that was just copied or read is), then, in rounds that alternate
the order, each after 2 s for the machine to settle, times: the package's
first read, as a training run does it (from --data-dir to the arrays of
both splits: listing, decoding on every core, caching), with an empty cache;
one pass of `keras.utils.image_dataset_from_directory(color_mode="grayscale",
image_size=(28, 28))` over train/ and over test/; the package's cached start
(listing, then every array from the cache); and reading the same digits
from the four IDX files, for scale. Prints medians with the range, the
ratio of Keras's time to the first read, and the machine. Then trains in
fresh processes on the folder and on the IDX files, in pairs, and prints
the training images/s of each and their ratio."""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import shlex
import shutil
import statistics
import struct
import tempfile
import time
from pathlib import Path

import numpy as np


_SETTLE_SECONDS = 2.0


def write_png_folder(root: Path, limit: int | None = None) -> tuple[int, Path]:
    """MNIST's digits as PNG files in train/ and test/ class folders; returns how
    many, and a folder of the same digits as IDX files."""
    from PIL import Image

    from lenet_tf.data import find_local_data, load_local

    found = find_local_data("mnist")
    if found is None:
        raise SystemExit("no local MNIST: set LENET_TF_DATA_DIR to a folder holding mnist/ with the four IDX files")
    data = load_local(found)
    count = 0
    idx_dir = root / "idx"
    idx_dir.mkdir(parents=True)
    for split, images, labels, prefix in (("train", data.train_images, data.train_labels, "train"),
                                          ("test", data.test_images, data.test_labels, "t10k")):
        images, labels = images[:limit, ..., 0], labels[:limit]
        for digit in range(10):
            (root / "pictures" / split / str(digit)).mkdir(parents=True)
        for index, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(root / "pictures" / split / str(label) / f"{index:05d}.png")
        count += len(images)
        (idx_dir / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">4B3I", 0, 0, 8, 3, *images.shape) + images.tobytes()))
        (idx_dir / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">4BI", 0, 0, 8, 1, len(labels)) + labels.astype(np.uint8).tobytes()))
    return count, idx_dir


def cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes, all threads."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def package_read(folder: Path) -> tuple[float, float, int]:
    """Seconds and CPU seconds to list and read the folder as a training run
    does (from `--data-dir` to the arrays of both splits); and how many pictures were decoded."""
    from lenet_tf import folders

    started, cpu_started = time.perf_counter(), cpu_seconds()
    dataset = folders.FolderDataset.scan(folder)
    dataset.start_decoders()
    datasets = dataset.load()
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    assert len(datasets.train_images) + len(datasets.test_images) == len(dataset.listing)
    return seconds, cpu, dataset.decoded


def keras_pass(folder: Path) -> tuple[float, float]:
    """Seconds and CPU seconds for one pass of image_dataset_from_directory over train/ and test/."""
    import keras

    started, cpu_started = time.perf_counter(), cpu_seconds()
    count = 0
    for split in ("train", "test"):
        dataset = keras.utils.image_dataset_from_directory(folder / split, color_mode="grayscale",
                                                           image_size=(28, 28), verbose=False)
        for images, _ in dataset:
            count += int(images.shape[0])
    return time.perf_counter() - started, cpu_seconds() - cpu_started


# The book's recipe: no preset setting depends on the dataset, so the two runs differ in where the arrays come from.
TRAINING_FLAGS = ["--preset", "classic", "--epochs", "3", "--format", "", "--image-every-epochs", "0"]


def compare_training(folder: Path, idx_dir: Path, rounds: int, scratch: Path) -> None:
    """Training images/s (metrics.json's examples_per_sec: the epochs after the
    first, validation excluded) of `python train.py --data-dir` on the folder of
    PNG files and on the IDX files of the same digits, in fresh processes, in
    pairs that alternate the order; prints the medians and the ratio."""
    from benchmarks.runs import train_in_fresh_process

    speeds: dict[str, list[float]] = {"folder": [], "idx": []}
    ratios = []
    for round_index in range(rounds):
        order = ["folder", "idx"] if round_index % 2 == 0 else ["idx", "folder"]
        for name in order:
            data = ["--data-dir", str(folder)] if name == "folder" else ["--dataset", "mnist", "--data-dir", str(idx_dir)]
            run = train_in_fresh_process([*data, *TRAINING_FLAGS],
                                         scratch / f"run-{name}-{round_index}")
            speeds[name].append(run.metrics["examples_per_sec"])
        ratios.append(speeds["folder"][-1] / speeds["idx"][-1])
        print(f"training pair {round_index + 1}: folder {speeds['folder'][-1]:.0f} images/s, "
              f"IDX files {speeds['idx'][-1]:.0f} images/s", flush=True)
    print(f"Training images/s, `python train.py --data-dir DIR {shlex.join(TRAINING_FLAGS)}`, "
          f"{rounds} pairs, median (min-max): folder {statistics.median(speeds['folder']):.0f} "
          f"({min(speeds['folder']):.0f}-{max(speeds['folder']):.0f}), IDX files "
          f"{statistics.median(speeds['idx']):.0f} ({min(speeds['idx']):.0f}-{max(speeds['idx']):.0f}); "
          f"folder over IDX files {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")


def idx_read(idx_dir: Path) -> float:
    from lenet_tf.data import load_idx_dir

    started = time.perf_counter()
    load_idx_dir(idx_dir)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every measurement (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="the first N digits of each split (default: all)")
    parser.add_argument("--training-rounds", type=int, default=2,
                        help="pairs of training runs, folder and IDX files, for images/s (default: %(default)s; "
                             "0 skips them)")
    args = parser.parse_args(argv)

    from benchmarks.common import machine_description

    scratch = Path(tempfile.mkdtemp(prefix="lenet-folders-bench-"))
    os.environ["XDG_CACHE_HOME"] = str(scratch / "cache")
    try:
        started = time.perf_counter()
        count, idx_dir = write_png_folder(scratch, args.limit)
        folder = scratch / "pictures"
        print(f"wrote {count} PNG files in {time.perf_counter() - started:.1f} s", flush=True)
        keras_pass(folder)  # Once untimed: TensorFlow's own start-up is not the reading.
        times: dict[str, list[float]] = {"first read": [], "keras": [], "cached start": [], "idx": []}
        # CPU time, all threads and worker processes: on a machine shared with other work the wall
        # time depends on what else runs, the CPU time much less.
        cpu: dict[str, list[float]] = {"first read": [], "keras": [], "cached start": []}
        for round_index in range(args.repeats):
            order = ["first read", "keras"] if round_index % 2 == 0 else ["keras", "first read"]
            for name in order:
                # TensorFlow's threads stay busy a moment after a pass; each measurement starts on a quiet machine.
                time.sleep(_SETTLE_SECONDS)
                if name == "first read":
                    shutil.rmtree(scratch / "cache", ignore_errors=True)
                    seconds, cpu_time, decoded = package_read(folder)
                    assert decoded == count, (decoded, count)
                else:
                    seconds, cpu_time = keras_pass(folder)
                times[name].append(seconds)
                cpu[name].append(cpu_time)
            time.sleep(_SETTLE_SECONDS)
            seconds, cpu_time, decoded = package_read(folder)
            assert decoded == 0, decoded
            times["cached start"].append(seconds)
            cpu["cached start"].append(cpu_time)
            times["idx"].append(idx_read(idx_dir))
            print(f"round {round_index + 1}: " + ", ".join(f"{name} {values[-1]:.2f} s"
                                                          for name, values in times.items())
                  + "; CPU " + ", ".join(f"{name} {values[-1]:.2f} s" for name, values in cpu.items()), flush=True)
        machine = machine_description()
        print()
        print(f"{count} MNIST digits as PNG files (train/ and test/ class folders, in the page cache); "
              f"{machine['date']}, {machine['cores']} cores of {machine['cpu']}, TensorFlow {machine['tensorflow']}, "
              f"Keras {machine['keras']}; {args.repeats} rounds, median (min-max):")
        print()
        print("| reading | seconds | CPU seconds |")
        print("|---|---|---|")
        labels = {"first read": "lenet_tf, first read (list, decode on every core, cache)",
                  "keras": "keras.utils.image_dataset_from_directory, one pass",
                  "cached start": "lenet_tf, cached start (list, arrays from the cache)",
                  "idx": "the same digits from the four IDX files (.gz)"}
        for name, values in times.items():
            spent = cpu.get(name)
            print(f"| {labels[name]} | {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f}) | "
                  + (f"{statistics.median(spent):.2f} ({min(spent):.2f}-{max(spent):.2f})" if spent else "") + " |")
        print()
        for kind, table in (("wall", times), ("CPU", cpu)):
            ratios = [keras / ours for keras, ours in zip(table["keras"], table["first read"])]
            print(f"Keras's pass over lenet_tf's first read, {kind} time: {statistics.median(ratios):.1f}x "
                  f"({min(ratios):.1f}-{max(ratios):.1f}x)")
        if args.training_rounds:
            print()
            compare_training(folder, idx_dir, args.training_rounds, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
