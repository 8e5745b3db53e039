"""Decoding a folder's pictures into the model's 28x28 inputs, on every core.

Worker processes, one per core, read the pictures; the parent hands each a
batch of files at a time, sized to take about a quarter of a second, so that
a slow file (a large JPEG) holds up nobody and the progress line moves, and
reads each batch's pixels straight into its rows of the result. The workers
never import TensorFlow: a training run forks them before it starts
importing it (DecoderPool).

Plain PNGs (8-bit grey or RGB, without transparency or EXIF: what a dataset
saved as files nearly always is) are decoded by libspng (pyspng), which reads
a 28x28 digit in about a quarter of Pillow's time, and the recipe's inversion
of 28x28 pictures is decided for a whole batch at once; a PNG's pixels are
exact whoever decodes them. Every other file, and any PNG libspng refuses, is
read by lenet_tf.images.read_picture (Pillow), with its limits and its
messages. Both give the same arrays (tests/test_decoding.py).

Each file's size and modification time come from the descriptor the file was
read through (read_picture opens a file it reads once more), so the folder's
cache key describes the bytes read, not those of an earlier look.
"""

from __future__ import annotations

import fcntl
import gc
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from typing import BinaryIO, NamedTuple

import numpy as np
import pyspng

from lenet_tf.errors import UsageError
from lenet_tf.images import LIGHT_BORDER, MAX_FILE_BYTES, border_level, prepare, read_picture
from lenet_tf.registry import IMAGE_SIZE, Framing

# Changes whenever the recipe does, so that no cache made by another recipe is used.
RECIPE_VERSION = "1"
# Like Fashion-MNIST: the object's longer side fills the canvas, centred by its box.
FOLDER_FRAMING = Framing(longest_side=IMAGE_SIZE, centre="box", keep_model_size=True)
# Below this many pictures, starting worker processes costs more than it saves.
POOL_MIN_FILES = 400
# A batch handed to a worker is sized to take about this long ...
_BATCH_SECONDS = 0.25
# ... between these bounds: the first batches are small, so that every worker starts at once.
_FIRST_BATCH_FILES = 256
_SMALLEST_BATCH_FILES = 64
_MAX_BATCH_FILES = 8192

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Larger PNGs go to read_picture, whose Pillow refuses decompression bombs with its own message.
_FAST_PNG_MAX_PIXELS = 4096 * 4096


class Decoded(NamedTuple):
    """Pictures decoded from files: the arrays, each file's size and modification
    time as read, and (path, message) for each file that could not be decoded."""

    images: np.ndarray  # uint8 (N, 28, 28); zeros where a file failed.
    sizes: np.ndarray  # int64 (N,)
    mtimes: np.ndarray  # int64 (N,), nanoseconds
    failures: list[tuple[str, str]]


# --- one batch, in one process --------------------------------------------------

def decode_batch(root: str, relatives: list[str]) -> Decoded:
    """The pictures root/relative, each by the folder recipe (read_picture's arrays).

    A file that cannot be opened or read has size -1 and a failure; an empty
    file has size 0 and is left as zeros, for the caller to refuse by its size.
    """
    count = len(relatives)
    images = np.zeros((count, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    sizes, mtimes = [-1] * count, [0] * count
    failures: list[tuple[str, str]] = []
    model_sized: list[tuple[int, np.ndarray]] = []  # (index, grey levels) of 28x28 PNGs, prepared together.
    others = []
    prefix = f"{root}/"
    for index, relative in enumerate(relatives):
        path = prefix + relative
        try:
            descriptor = os.open(path, os.O_RDONLY)  # Not open(): its buffered file object costs more than the read.
            try:
                details = os.fstat(descriptor)
                # Past read_picture's size limit, the file is left to it, which refuses it.
                data = os.read(descriptor, details.st_size + 1) if details.st_size <= MAX_FILE_BYTES else None
            finally:
                os.close(descriptor)
        except OSError as error:
            failures.append((relative, f"{path}: cannot read ({error.strerror})"))
            continue
        sizes[index], mtimes[index] = details.st_size, details.st_mtime_ns
        if not details.st_size:
            continue
        grey = _plain_png_levels(data) if data else None
        if grey is None:
            others.append(index)
        elif grey.shape == (IMAGE_SIZE, IMAGE_SIZE):
            model_sized.append((index, grey))
        else:
            images[index] = _recipe_for_grey(grey[np.newaxis])[0]
    if model_sized:
        rows = [index for index, _ in model_sized]
        images[rows] = _recipe_for_grey(np.stack([grey for _, grey in model_sized]))
    for index in others:
        try:
            images[index] = read_picture(prefix + relatives[index], FOLDER_FRAMING)[..., 0]
        except UsageError as error:
            failures.append((relatives[index], str(error)))
        except Exception as error:  # A decoder's own failure on a strange file: that file's, not the run's.
            failures.append((relatives[index], f"{prefix + relatives[index]}: cannot decode the image "
                                               f"({type(error).__name__}: {error})"))
    return Decoded(images, np.array(sizes, np.int64), np.array(mtimes, np.int64), failures)


def _plain_png_levels(data: bytes) -> np.ndarray | None:
    """The grey levels (height, width) of a plain PNG, decoded by libspng
    (pyspng), as read_picture's Pillow makes them; None for any other file,
    left to read_picture.

    Plain: 8-bit grey or RGB (the header's bit depth and colour type), no
    transparency (Pillow composites it) and no EXIF (Pillow turns the picture
    by its orientation). A chunk name found in the compressed data by chance
    only sends the file to Pillow, which gives the same pixels, slower.
    """
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" \
            or data[24] != 8 or data[25] not in (0, 2) or b"tRNS" in data or b"eXIf" in data:
        return None
    width, height = struct.unpack(">II", data[16:24])
    if width * height > _FAST_PNG_MAX_PIXELS or not _checksums_hold(data):
        return None  # Damaged: read_picture refuses it, in Pillow's words.
    try:
        pixels = pyspng.load(data)
    except Exception:  # Damaged: read_picture says how, in Pillow's words.
        return None
    if pixels.dtype != np.uint8 or pixels.shape[:2] != (height, width):
        return None
    return pixels if pixels.ndim == 2 else _grey_levels(pixels[np.newaxis])[0]


def _checksums_hold(data: bytes) -> bool:
    """Whether every chunk of a PNG has its CRC-32 and the file ends with its
    last chunk. pyspng tells libspng to ignore the checksums (a choice of
    its own, for speed), so a damaged file would decode to wrong pixels
    without a word; zlib's CRC-32, in C, costs a fraction of the decoding."""
    position, end = len(_PNG_SIGNATURE), len(data)
    while position + 12 <= end:
        length = int.from_bytes(data[position:position + 4], "big")
        stop = position + 8 + length
        if stop + 4 > end or zlib.crc32(data[position + 4:stop]) != int.from_bytes(data[stop:stop + 4], "big"):
            return False
        position = stop + 4
    return position == end


def _grey_levels(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, height, width, 1 or 3) -> uint8 grey (N, height, width), with
    Pillow's integer weights for RGB, as to_grey makes it."""
    if pixels.shape[3] == 1:
        return pixels[..., 0]
    wide = pixels.astype(np.uint32)
    # Pillow's RGB to L: (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16.
    return ((wide[..., 0] * 19595 + wide[..., 1] * 38470 + wide[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)


def _recipe_for_grey(grey: np.ndarray) -> np.ndarray:
    """to_grey's inversion and prepare for 8-bit grey pictures of one size,
    uint8 (N, height, width): read_picture's arrays, (N, 28, 28)."""
    if grey.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        prepared = np.empty((len(grey), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        for index, picture in enumerate(grey):
            levels = picture.astype(np.float32)
            prepared[index] = prepare(255.0 - levels if border_level(levels) > LIGHT_BORDER else levels,
                                      FOLDER_FRAMING)
        return prepared
    # A 28x28 picture is used as it is, inverted when its border is light: when the median of
    # its border's 4 x 28 levels (corners twice, as border_level counts them), the mean of the
    # two middle ones, is above LIGHT_BORDER. Counted for every picture at once; sorted only
    # where the count leaves it open (tests/test_decoding.py checks this against border_level).
    sides = (grey[:, 0], grey[:, -1], grey[:, :, 0], grey[:, :, -1])
    half = 2 * IMAGE_SIZE  # Of the 112 levels, the middle two are the 56th and 57th smallest.
    above = sum((side > LIGHT_BORDER).sum(axis=1) for side in sides)
    light = above > half  # At least 57 above: both middle levels are, and so is their mean.
    # Exactly 56 above: the 57th is above, the 56th not; their mean may be either side.
    for index in np.flatnonzero(above == half):
        border = np.sort(np.concatenate([side[index] for side in sides])).astype(np.int32)
        light[index] = border[half - 1] + border[half] > 2 * LIGHT_BORDER
    if light.any():
        grey = grey.copy()
        grey[light] = 255 - grey[light]
    return grey


# --- worker processes -----------------------------------------------------------

def decode_files(root: str, relatives: list[str], workers: int | None = None,
                 on_batch: Callable[[np.ndarray, int, int], None] | None = None,
                 pool: DecoderPool | None = None) -> Decoded:
    """decode_batch for many files, on `pool`, or on `workers` processes started
    here (default: every core this process may use). on_batch(images, start,
    stop) is called once rows start:stop of `images` are decoded, one call at a
    time, while the workers decode the next ones."""
    if pool is not None and len(relatives) >= POOL_MIN_FILES:
        return pool.decode(root, relatives, on_batch)
    workers = workers or usable_cores()
    if len(relatives) < POOL_MIN_FILES or workers < 2:
        decoded = decode_batch(root, relatives)
        if on_batch:
            on_batch(decoded.images, 0, len(relatives))
        return decoded
    with DecoderPool(workers) as pool:
        return pool.decode(root, relatives, on_batch)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


class _Worker(NamedTuple):
    pid: int
    requests: BinaryIO  # The parent's ends of the two pipes.
    answers: BinaryIO
    process: subprocess.Popen | None  # A fresh interpreter's; None for a forked worker.


class DecoderPool:
    """Worker processes that decode batches of pictures.

    Forked when this process runs no other Python thread (then a worker starts
    in milliseconds, with NumPy already imported, and no Python lock can be held
    by a thread missing from the copy; native libraries such as OpenBLAS
    prepare their own threads for a fork); otherwise started as a fresh
    interpreter, which takes a fraction of a second. A training run makes its
    pool before it starts reading in the background and importing TensorFlow
    (lenet_tf.folders.FolderDataset.start_decoders).
    """

    def __init__(self, workers: int, fork: bool | None = None):
        """`fork`: True or False to choose; None forks when this process runs no other Python thread."""
        self.workers: list[_Worker] = []
        try:
            for _ in range(workers):
                self.workers.append(_start_worker(threading.active_count() == 1 if fork is None else fork))
        except BaseException:
            self.close()
            raise

    def decode(self, root: str, relatives: list[str],
               on_batch: Callable[[np.ndarray, int, int], None] | None = None) -> Decoded:
        """decode_batch of `relatives` on the workers; on_batch as decode_files calls it."""
        count = len(relatives)
        result = Decoded(np.zeros((count, IMAGE_SIZE, IMAGE_SIZE), np.uint8), np.zeros(count, np.int64),
                         np.zeros(count, np.int64), [])
        lock = threading.Lock()
        state = {"next": 0}
        errors: list[BaseException] = []

        def feed(worker: _Worker) -> None:
            batch = _FIRST_BATCH_FILES
            try:
                while True:
                    with lock:
                        start = state["next"]
                        remaining = count - start
                        if remaining <= 0 or errors:
                            return
                        # The last batches are shared out evenly, so that no worker finishes long after the others.
                        fair_share = -(-remaining // len(self.workers))
                        size = min(remaining, max(_SMALLEST_BATCH_FILES, min(batch, fair_share)))
                        state["next"] = start + size
                    started = time.monotonic()
                    # Each worker's pictures land in their rows directly; the rows do not overlap.
                    sizes, mtimes, failures = _ask(worker, root, relatives[start:start + size],
                                                   result.images[start:start + size])
                    elapsed = max(time.monotonic() - started, 1e-3)
                    batch = int(min(_MAX_BATCH_FILES, max(_SMALLEST_BATCH_FILES, size * _BATCH_SECONDS / elapsed)))
                    with lock:
                        result.sizes[start:start + size] = sizes
                        result.mtimes[start:start + size] = mtimes
                        result.failures.extend(failures)
                        if on_batch and not errors:
                            on_batch(result.images, start, start + size)
            except BaseException as error:  # Raised again by decode(), in the caller's thread.
                with lock:
                    errors.append(error)

        feeders = [threading.Thread(target=feed, args=(worker,), name="decode-pictures", daemon=True)
                   for worker in self.workers]
        for feeder in feeders:
            feeder.start()
        try:
            for feeder in feeders:
                feeder.join()
        except BaseException as interruption:  # Ctrl-C in this thread: no batch lands after this returns.
            with lock:
                errors.append(interruption)
            for worker in self.workers:
                _stop(worker)
            for feeder in feeders:
                feeder.join()
            raise
        if errors:
            raise errors[0]
        return result

    def close(self, stop_now: bool = False) -> None:
        """Ends the workers: each exits when its requests end, or at once when `stop_now`
        (the read was interrupted: a batch under way would otherwise be finished first)."""
        for worker in self.workers:
            if stop_now:
                _stop(worker)
            try:
                worker.requests.close()
            except OSError:
                pass
        for worker in self.workers:
            try:
                _wait(worker)
            finally:
                worker.answers.close()
        self.workers = []

    def __enter__(self) -> "DecoderPool":
        return self

    def __exit__(self, exception_type, *_) -> None:
        self.close(stop_now=exception_type is not None)


def _start_worker(fork: bool) -> _Worker:
    to_worker, from_parent = os.pipe()
    to_parent, from_worker = os.pipe()
    worker_ends = (to_worker, from_worker)  # Read requests, write answers.
    try:
        if fork:
            process = None
            pid = os.fork()
            if pid == 0:
                _forked_worker(*worker_ends)
        else:
            # The package's folder first on the path: found as this process found it (a source checkout too).
            package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {package_parent!r}); "
                       f"from lenet_tf.decoding import serve; serve({to_worker}, {from_worker})"]
            # Its own session: Ctrl-C reaches the parent, which ends the workers, and not a
            # worker still importing NumPy, which would print a traceback.
            process = subprocess.Popen(command, pass_fds=worker_ends, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
    except BaseException:
        for descriptor in (to_worker, from_parent, to_parent, from_worker):
            os.close(descriptor)
        raise
    for descriptor in worker_ends:
        os.close(descriptor)
    try:
        # A batch's answer is megabytes: a larger pipe moves it in fewer switches between the two processes.
        fcntl.fcntl(to_parent, _SET_PIPE_SIZE, _PIPE_BYTES)
    except OSError:
        pass  # The system's limit is lower (/proc/sys/fs/pipe-max-size): the default size works too.
    return _Worker(pid if process is None else process.pid, os.fdopen(from_parent, "wb"), os.fdopen(to_parent, "rb"),
                   process)


def _forked_worker(requests: int, answers: int) -> None:
    """A forked worker's life; never returns into the parent's code."""
    code = 1
    try:
        os.setsid()  # Its own session, as a fresh interpreter's: Ctrl-C reaches the parent only.
        # Every other descriptor closed: another worker's pipe kept open here would hide the
        # end of its requests, and a run folder's lock must go with the parent.
        os.closerange(3, min(requests, answers))
        os.closerange(min(requests, answers) + 1, max(requests, answers))
        os.closerange(max(requests, answers) + 1, _MAX_DESCRIPTORS)
        serve(requests, answers)
        code = 0
    finally:
        os._exit(code)


_MAX_DESCRIPTORS = 65536
_SET_PIPE_SIZE = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux's fcntl command (Python 3.10+ names it).
_PIPE_BYTES = 1 << 20  # The most one pipe may have by default (/proc/sys/fs/pipe-max-size).


def _ask(worker: _Worker, root: str, relatives: list[str], images: np.ndarray):
    """Has the worker decode `relatives` into `images` (uint8, contiguous); returns their sizes, times, failures."""
    try:
        pickle.dump((root, relatives), worker.requests, protocol=pickle.HIGHEST_PROTOCOL)
        worker.requests.flush()
        answer = pickle.load(worker.answers)
        if isinstance(answer, str):
            raise RuntimeError(f"decoding {len(relatives)} pictures from {os.path.join(root, relatives[0])} on "
                               f"failed: {answer}")
        sizes, mtimes, failures = answer
        pixels, received = memoryview(images).cast("B"), 0
        while received < len(pixels):
            count = worker.answers.readinto(pixels[received:])
            if not count:
                raise EOFError
            received += count
    except (EOFError, OSError, ValueError, pickle.UnpicklingError):
        raise RuntimeError(f"a process decoding pictures stopped while reading {len(relatives)} pictures from "
                           f"{os.path.join(root, relatives[0])} on") from None
    return sizes, mtimes, failures


def _wait(worker: _Worker) -> None:
    """Waits for a worker that was told to end; kills it if it has not within seconds."""
    if worker.process is not None:
        try:
            worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
        return
    deadline = time.monotonic() + 5
    while os.waitpid(worker.pid, os.WNOHANG)[0] == 0:
        if time.monotonic() > deadline:
            os.kill(worker.pid, signal.SIGKILL)
            os.waitpid(worker.pid, 0)
            return
        time.sleep(0.002)


def _stop(worker: _Worker) -> None:
    try:
        os.kill(worker.pid, signal.SIGKILL)  # Not yet waited for: the pid is still this worker's.
    except ProcessLookupError:
        pass


def serve(requests: int, answers: int) -> None:
    """A worker's loop, until the requests end: (root, relatives) in; out, the
    pictures' sizes, times and failures, then their pixels as they lie in memory
    (the parent reads them into its array's rows: no copy of them is pickled)."""
    # The parent stops on Ctrl-C or SIGTERM and then ends this worker's requests; a
    # KeyboardInterrupt here would only print a traceback beside the parent's one line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Decoding makes no reference cycles, and a forked worker holds every object of its parent
    # (TensorFlow's, when it is imported): a collection would walk them all, and copy the
    # memory pages it touches.
    gc.freeze()
    gc.disable()
    with os.fdopen(requests, "rb") as inbox, os.fdopen(answers, "wb") as outbox:
        while True:
            try:
                root, relatives = pickle.load(inbox)
            except EOFError:
                return
            try:
                try:
                    decoded = decode_batch(root, relatives)
                except Exception as error:  # Not a picture's fault (those are failures): told to the parent.
                    pickle.dump(f"{type(error).__name__}: {error}", outbox)
                    outbox.flush()
                    continue
                pickle.dump((decoded.sizes, decoded.mtimes, decoded.failures), outbox,
                            protocol=pickle.HIGHEST_PROTOCOL)
                outbox.write(memoryview(decoded.images).cast("B"))
                outbox.flush()
            except BrokenPipeError:
                return  # The parent is gone.
