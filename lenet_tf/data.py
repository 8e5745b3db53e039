"""Finding, reading and streaming the data: IDX files, tfds, and a tf.data pipeline.

Where data comes from, first match wins (the facts about each dataset,
folder names included, live in lenet_tf.registry):
  1. an explicit `data_dir` (the `--data-dir` flag): the four IDX files;
  2. the environment variable LENET_TF_DATA_DIR: a data root holding one
     folder per dataset (`mnist/`, `fashion-mnist/`), or the four files themselves;
  3. the system folder a package manager fills (`apt-get install dataset-fashion-mnist`);
  4. the Keras cache: ~/.keras/datasets/<folder>/ with the four files, or the
     single .npz that `keras.datasets.mnist.load_data()` downloads;
  5. tensorflow_datasets, which downloads when the machine is online.
"""

from __future__ import annotations

import concurrent.futures
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lenet_tf.errors import UsageError
from lenet_tf.registry import IDX_STEMS, IMAGE_SIZE, NUM_CLASSES, DatasetInfo, dataset_info

DATA_DIR_ENV = "LENET_TF_DATA_DIR"

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte), and
# the number of dimensions.
_UBYTE_TYPE = 0x08
# No real IDX file in this family is anywhere near this; a header claiming more
# is corrupt, and trusting it would allocate absurd memory.
_MAX_IDX_BYTES = 1 << 31


@dataclass
class Datasets:
    """In-memory splits: images uint8 (N, 28, 28, 1), labels int32 (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str = "memory"
    # What kind of data `source` holds, for the run's first line ("IDX files", "one subfolder per class: ...").
    layout: str = ""

    def limited(self, limit_train: int | None, limit_test: int | None) -> "Datasets":
        if limit_train is None and limit_test is None:
            return self
        return Datasets(
            self.train_images[:limit_train],
            self.train_labels[:limit_train],
            self.test_images[:limit_test],
            self.test_labels[:limit_test],
            self.source,
            self.layout,
        )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (optionally gzip-compressed) into a uint8 array.

    Checks the magic number, the dimensions and that the payload length
    matches the header exactly; raises UsageError naming the file otherwise.
    """
    path = Path(path)
    try:
        with (_GzipFile(path) if path.suffix == ".gz" else open(path, "rb")) as handle:
            header = handle.read(4)
            if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] != _UBYTE_TYPE:
                raise UsageError(
                    f"{path} is not an unsigned-byte IDX file (bad magic number {header.hex() or 'empty'}); "
                    "re-download it"
                )
            rank = header[3]
            if not 1 <= rank <= 3:
                raise UsageError(f"{path} has an IDX rank of {rank}, expected 1 (labels) or 3 (images)")
            dims_bytes = handle.read(4 * rank)
            if len(dims_bytes) < 4 * rank:
                raise UsageError(f"{path} is truncated inside its header; re-download it")
            shape = struct.unpack(f">{rank}I", dims_bytes)
            expected = int(np.prod(shape, dtype=np.int64))
            if expected > _MAX_IDX_BYTES:
                raise UsageError(f"{path} claims {expected} bytes of data, which is not a real IDX file")
            payload = handle.read(expected + 1)
    except UsageError:
        raise
    except PermissionError:
        raise UsageError(f"cannot read {path}: permission denied; fix its permissions") from None
    except (OSError, EOFError, zlib.error) as error:
        # EOFError: a truncated stream; zlib.error: garbage.
        raise UsageError(f"cannot read {path}: {error}; re-download it") from None
    if len(payload) != expected:
        problem = "truncated" if len(payload) < expected else "longer than its header says"
        raise UsageError(
            f"{path} is {problem} ({len(payload)} data bytes, header says {expected}); re-download it"
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


class _GzipFile:
    """A .gz file's data, each read one zlib call.

    gzip.GzipFile reads in small pieces, taking the interpreter lock for
    each; one call per read leaves it free while zlib works, so a thread that
    reads the data runs beside TensorFlow's import (BackgroundLoad). Reads
    every member and skips zero padding between them, as gzip does.
    """

    def __init__(self, path: Path):
        self._pending = path.read_bytes()
        self._decompressor = zlib.decompressobj(wbits=_GZIP_WBITS)

    def read(self, size: int) -> bytes:
        pieces = []
        while size > 0:
            if self._decompressor.eof:
                self._pending = self._decompressor.unused_data.lstrip(b"\0")
                if not self._pending:
                    break
                self._decompressor = zlib.decompressobj(wbits=_GZIP_WBITS)
            piece = self._decompressor.decompress(self._pending, size)
            self._pending = self._decompressor.unconsumed_tail
            if not piece and not self._pending and not self._decompressor.eof:
                raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            pieces.append(piece)
            size -= len(piece)
        return b"".join(pieces)

    def __enter__(self) -> "_GzipFile":
        return self

    def __exit__(self, *exception) -> None:
        self._pending = b""


# zlib's window size plus 16: the gzip header and trailer around a deflate stream.
_GZIP_WBITS = 16 + zlib.MAX_WBITS


def _idx_path(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _has_idx_files(directory: Path) -> bool:
    return all(_idx_path(directory, stem) for stem in IDX_STEMS.values())


def load_idx_dir(directory: str | os.PathLike) -> Datasets:
    """Reads the four IDX files in `directory` and checks they fit together."""
    directory = Path(directory)
    arrays = {}
    for key, stem in IDX_STEMS.items():
        path = _idx_path(directory, stem)
        if path is None:
            raise UsageError(
                f"{directory} has no {stem}[.gz]; it needs the four IDX files "
                f"({', '.join(IDX_STEMS.values())})"
            )
        arrays[key] = read_idx(path)
    datasets = _checked_datasets(arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                                 arrays["test_labels"], str(directory))
    datasets.layout = "IDX files"
    return datasets


def _checked_datasets(train_images, train_labels, test_images, test_labels, source: str) -> Datasets:
    """Checks that images are (N, 28, 28[, 1]), labels (N,) in 0..9, and that the counts agree."""
    arrays = {"train": (np.asarray(train_images), np.asarray(train_labels)),
              "test": (np.asarray(test_images), np.asarray(test_labels))}
    checked = []
    for split, (images, labels) in arrays.items():
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise UsageError(f"{split} images in {source} have shape {images.shape}, expected (N, 28, 28)")
        if labels.ndim != 1:
            raise UsageError(f"{split} labels in {source} have shape {labels.shape}, expected (N,)")
        if len(images) != len(labels):
            raise UsageError(
                f"{source}: {len(images)} {split} images but {len(labels)} labels; the files come from different sets"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise UsageError(f"{split} labels in {source} go up to {labels.max()}, expected 0..{NUM_CLASSES - 1}")
        checked += [images.astype(np.uint8, copy=False)[..., np.newaxis], labels.astype(np.int32)]
    return Datasets(*checked, source=source)


def candidate_sources(info: DatasetInfo, data_dir: str | None = None) -> list[tuple[str, Path]]:
    """The local places searched, in order, each with a label for messages.

    A place is a folder of IDX files or, for the Keras cache, a .npz file.
    """
    candidates = []
    if data_dir:
        candidates.append(("--data-dir", Path(data_dir).expanduser()))
    if os.environ.get(DATA_DIR_ENV):
        root = Path(os.environ[DATA_DIR_ENV]).expanduser()
        candidates.append((DATA_DIR_ENV, root / info.folder_name))
        candidates.append((DATA_DIR_ENV, root))
    if info.system_dir is not None:
        candidates.append(("system package", info.system_dir))
    keras_datasets = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"
    candidates.append(("Keras cache", keras_datasets / info.folder_name))
    if info.keras_npz_name:
        candidates.append(("Keras cache", keras_datasets / info.keras_npz_name))
    return candidates


def find_local_data(dataset: str | DatasetInfo, data_dir: str | None = None) -> Path | None:
    """The first local folder (or Keras .npz) holding `dataset`, without downloading; None if none does."""
    for _, path in candidate_sources(dataset_info(dataset), data_dir):
        if _holds_data(path):
            return path
    return None


def _holds_data(path: Path) -> bool:
    try:
        if path.suffix == ".npz":
            return path.is_file()
        return path.is_dir() and _has_idx_files(path)
    except OSError:
        return False  # A default location we may not enter is simply not used.


def load_local(path: Path) -> Datasets:
    """Reads a folder of IDX files or a Keras .npz."""
    return load_keras_npz(path) if path.suffix == ".npz" else load_idx_dir(path)


def load_keras_npz(path: Path) -> Datasets:
    """Reads the .npz that keras.datasets downloads (x_train, y_train, x_test, y_test)."""
    try:
        with np.load(path) as arrays:
            splits = [arrays[key] for key in ("x_train", "y_train", "x_test", "y_test")]
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"cannot read {path}: {error}; delete it so Keras downloads it again") from None
    train_images, train_labels, test_images, test_labels = splits
    return _checked_datasets(train_images, train_labels, test_images, test_labels, str(path))


def load_datasets(dataset: str | DatasetInfo, data_dir: str | None = None, allow_download: bool = True) -> Datasets:
    """Loads both splits of `dataset` (a built-in's name, or a DatasetInfo
    such as a folder of pictures') from the first place that has them."""
    info = dataset_info(dataset)
    if info.folder is not None:
        return info.folder.load(data_dir)  # A folder of pictures (lenet_tf.folders).
    if data_dir:
        # A folder the user named must work: falling through to another source
        # would silently train on data they did not ask for.
        return load_idx_dir(_checked_folder(Path(data_dir).expanduser()))
    root = os.environ.get(DATA_DIR_ENV)
    if root:
        _checked_folder(Path(root).expanduser())
    found = find_local_data(info)
    if found is not None:
        return load_local(found)
    tfds_error = None
    if allow_download:
        try:
            return load_with_tfds(info)
        except UsageError:
            raise
        except Exception as error:  # tfds raises many types when offline.
            tfds_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    searched = ", ".join(f"{label} {path}" for label, path in candidate_sources(info))
    install_hint = f"{info.install_hint}, " if info.install_hint else ""
    raise UsageError(
        f"no {info.name} data found (searched {searched}"
        + (f"; tensorflow_datasets download failed: {tfds_error}" if allow_download else "")
        + f"); {install_hint}pass --data-dir DIR with the four IDX files, set {DATA_DIR_ENV} to a folder "
        f"holding {info.folder_name}/, or connect to the internet so tensorflow_datasets can download it"
    )


class BackgroundLoad:
    """Reads the local copy of a dataset in a daemon thread, so that a
    training process reads its data while it imports TensorFlow.

    Only local copies (the IDX folders and the Keras cache, read with numpy
    and zlib, which let the import run meanwhile); tensorflow_datasets needs
    TensorFlow, and a multi-worker run must create its strategy before any
    other TensorFlow op.
    """

    def __init__(self, dataset: str | DatasetInfo, data_dir: str | None):
        self._dataset, self._data_dir = dataset_info(dataset), data_dir
        self._loaded: concurrent.futures.Future = concurrent.futures.Future()
        if self._dataset.folder is not None:
            # In the main thread while no other thread runs: the decoding workers are forked here.
            self._dataset.folder.start_decoders()
        self.thread = threading.Thread(target=self._load, name="load-data", daemon=True)
        self.thread.start()

    def _load(self) -> None:
        try:
            self._loaded.set_result(load_datasets(self._dataset, self._data_dir, allow_download=False))
        except BaseException as error:  # Handed to whoever asks for the result.
            self._loaded.set_exception(error)

    def result(self, dataset: str | DatasetInfo, data_dir: str | None) -> Datasets | None:
        """The splits, if they were read for this dataset and data_dir; None
        otherwise, or if the local search failed: the caller then loads in
        the foreground (tensorflow_datasets included), which says why."""
        info = dataset_info(dataset)
        # A folder is the same dataset only as the same value: another scan may split it otherwise.
        if info != self._dataset or info.folder is not self._dataset.folder or data_dir != self._data_dir:
            return None
        try:
            return self._loaded.result()
        except UsageError:
            return None


def _checked_folder(path: Path) -> Path:
    try:
        is_folder = path.is_dir()
    except OSError as error:  # E.g. a parent folder the user may not enter.
        raise UsageError(f"cannot access data folder {path}: {error.strerror}; fix its permissions") from None
    if not is_folder:
        raise UsageError(f"data folder {path} does not exist or is not a folder")
    effective = os.access in os.supports_effective_ids  # Honour setuid/seteuid callers.
    if not os.access(path, os.R_OK | os.X_OK, effective_ids=effective):
        raise UsageError(f"data folder {path} is not readable; fix its permissions")
    return path


def load_with_tfds(info: DatasetInfo) -> Datasets:
    """Loads both splits through tensorflow_datasets (downloads when online)."""
    import tensorflow_datasets as tfds

    # TFDS_DATA_DIR as it is now: tensorflow_datasets reads it once, at its
    # import, so a process (a notebook, a test) that sets it later would get
    # the folder of the first import.
    builder = tfds.builder(info.tfds_name, data_dir=os.environ.get("TFDS_DATA_DIR") or None)
    if not builder.is_prepared():
        # Offline, tensorflow_datasets retries each file for minutes before it
        # gives up, even where DNS answers at once: ask its download host
        # first and fail in seconds.
        download_url = getattr(builder, "URL", None)
        if isinstance(download_url, str):
            check_host_answers(download_url)
        builder.download_and_prepare()
    splits = {}
    for split in ("train", "test"):
        images, labels = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
        splits[split] = (images, labels)
    return _checked_datasets(*splits["train"], *splits["test"], source="tensorflow_datasets")


def check_host_answers(url: str, timeout: float = 5.0) -> None:
    """Raises ConnectionError unless `url`'s host accepts a connection within
    `timeout` seconds, name lookup included (run in a thread, as the lookup
    itself takes no timeout)."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(error)

    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(timeout)
    if not outcome:
        raise ConnectionError(f"{host}:{port} did not answer within {timeout:g} s")
    if outcome[0] is not None:
        raise ConnectionError(f"cannot reach {host}:{port}: {outcome[0]}")


def examples_per_epoch(count: int, global_batch_size: int, replicas: int = 1) -> int:
    """How many of `count` training examples an epoch uses: all of them, unless
    the last batch would leave a replica without any.

    A replica handed an empty share of a training batch fails TensorFlow's
    gradient under MirroredStrategy (on CPU: a conv's "input depth must be
    evenly divisible by filter depth"). The few examples left over (fewer
    than the replicas) sit out that epoch instead: a different few each
    epoch, as the shuffle comes first.
    """
    remainder = count % global_batch_size
    return count - remainder if 0 < remainder < replicas else count


def evaluation_batch_size(count: int, global_batch_size: int, replicas: int = 1) -> int | None:
    """A batch size for evaluating all `count` examples on `replicas` replicas;
    None when there is none (fewer examples than replicas, or too few to share).

    Two failures to steer clear of, both under MirroredStrategy: a replica
    with an empty share of a batch (see examples_per_epoch; an evaluation,
    unlike an epoch of training, must see every example), and a first batch
    whose shares differ in size, which Keras 3 averages over the replicas to
    build the model (TensorFlow trainer's `_maybe_symbolic_build`). So: a
    multiple of the replica count that leaves no remainder or one of at least
    `replicas` examples, the largest up to the global batch, else the
    smallest above it (a small per-replica batch and an odd count).
    """
    if replicas <= 1:
        return global_batch_size
    shareable = [size for size in range(replicas, count + 1, replicas)
                 if count % size == 0 or count % size >= replicas]
    within = [size for size in shareable if size <= global_batch_size]
    return max(within) if within else min(shareable, default=None)


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    global_batch_size: int,
    shuffle: bool,
    seed: int,
    augment: str = "none",
    replicas: int = 1,
):
    """A tf.data pipeline over in-memory arrays, split among `replicas` replicas.

    Shuffling happens per example before batching, with a seed, and reshuffles
    every epoch; the cache sits before the shuffle so it stores the examples
    once and the shuffle still changes every epoch. A training pipeline
    (shuffle=True) yields examples_per_epoch examples an epoch; any other
    yields every example, in batches of evaluation_batch_size.
    """
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).cache()
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        kept = examples_per_epoch(len(images), global_batch_size, replicas)
        if kept < len(images):
            dataset = dataset.take(kept)
    else:
        global_batch_size = evaluation_batch_size(len(images), global_batch_size, replicas) or global_batch_size
    options = tf.data.Options()
    # Under multi-worker training every worker builds this same pipeline (same
    # seed, same order) and keeps its own share of each global batch: DATA
    # sharding. In-memory data has no files to shard by, so AUTO would fall
    # back to this anyway, with a warning.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # No autotuning: with it, on a few CPU cores, a pass over the data often
    # ended seconds late, in steps of the autotuner's doubling sleep (as if
    # deleting the iterator waited for its thread's next wake-up), however
    # soon the model was done; Keras makes an iterator for every epoch and
    # every validation pass. The AUTOTUNE settings below then take the number
    # of cores (at most 16), and an epoch of the fast preset runs as fast as
    # autotuning's best ones (docs/speedrun.md, Outside training).
    options.autotune.enabled = False
    dataset = dataset.batch(global_batch_size)
    if augment != "none":
        # Each batch takes its own seed from a seeded stream (new every epoch):
        # a stateful random op would hand out its draws in whatever order the
        # parallel map runs, and the same seed would not give the same run.
        batch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        dataset = tf.data.Dataset.zip(dataset, batch_seeds).map(
            lambda batch, batch_seed: (
                augment_batch(batch[0], shift="shift" in augment, flip="flip" in augment, seed=batch_seed), batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)


MAX_SHIFT = 2


def augment_batch(images, shift: bool = True, flip: bool = False, seed=None):
    """Shifts each uint8 image by up to MAX_SHIFT pixels in each direction
    (zero fill, like the black background) and, if `flip`, mirrors half of
    them left-right. Works on whole batches: pad once, then one random crop
    offset per image via a gather, no per-image Python. Flips alone cost
    almost nothing; the shifts' gathers cost a noticeable share of a small
    model's training throughput on two cores (docs/speedrun.md).

    `seed`: a shape [2] integer tensor makes the result a function of the
    images and the seed (stateless random ops); None draws from TensorFlow's
    global generator.
    """
    import tensorflow as tf

    batch = tf.shape(images)[0]
    shift_seed, flip_seed = (None, None) if seed is None else tf.unstack(tf.random.split(seed, 2))

    def uniform(shape, draw_seed, **kwargs):
        if draw_seed is None:
            return tf.random.uniform(shape, **kwargs)
        return tf.random.stateless_uniform(shape, draw_seed, **kwargs)

    if shift:
        padded = tf.pad(images, [[0, 0], [MAX_SHIFT, MAX_SHIFT], [MAX_SHIFT, MAX_SHIFT], [0, 0]])
        offsets = uniform([batch, 2], shift_seed, minval=0, maxval=2 * MAX_SHIFT + 1, dtype=tf.int32)
        rows = offsets[:, :1] + tf.range(IMAGE_SIZE)[None, :]
        columns = offsets[:, 1:] + tf.range(IMAGE_SIZE)[None, :]
        images = tf.gather(padded, rows, axis=1, batch_dims=1)
        images = tf.gather(images, columns, axis=2, batch_dims=1)
    if flip:
        mirror = uniform([batch, 1, 1, 1], flip_seed) < 0.5
        images = tf.where(mirror, tf.reverse(images, axis=[2]), images)
    return images
