"""The decoded pictures of a folder, kept between runs: one file per folder
under $XDG_CACHE_HOME/lenet_tf/folders/ (default ~/.cache), keyed by each
picture's path, size and modification time (lenet_tf.folders reads through it).

NumPy only: the folder is read while TensorFlow imports.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import threading
import zlib
from pathlib import Path

import numpy as np

from lenet_tf.decoding import RECIPE_VERSION
from lenet_tf.registry import IMAGE_SIZE


def cache_path(root: Path) -> Path:
    """Where the decoded arrays of the folder `root` are kept: one file per folder, named by its absolute path."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:24]
    return base / "lenet_tf" / "folders" / f"{digest}.npy"


def read_cache(path: Path) -> tuple[list[tuple[str, int, int]], np.ndarray | None]:
    """The cached pictures' keys (path, size, mtime) and arrays; no keys when there is no usable cache."""
    try:
        with open(path, "rb") as handle:
            arrays = [np.load(handle, allow_pickle=False) for _ in _CACHE_ARRAYS]
    except (OSError, ValueError, EOFError):
        return [], None  # No cache yet, or a damaged one: decode again.
    recipe, paths, images, sizes, mtimes, checksum = arrays
    if str(recipe) != RECIPE_VERSION or not len(paths) == len(sizes) == len(mtimes) == len(images) \
            or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8 \
            or checksum.shape != () or int(checksum) != zlib.crc32(images):
        return [], None  # Another recipe's, or pixels not as written (a crash before they reached the disk).
    return list(zip(paths.tolist(), sizes.tolist(), mtimes.tolist())), images


# The cache file: these arrays, one after the other, each in NumPy's .npy format (an .npz's
# zip layer would cost more than the reading itself). The pixels come before the sizes and
# times, which a first read learns only at its end; the CRC-32 of the pixels, last, shows
# they are what was written, without the cost of forcing them to the disk before the rename.
_CACHE_ARRAYS = ("recipe", "paths", "images", "sizes", "mtimes", "checksum")


class CacheWriter:
    """Writes a folder's cache while its pictures are decoded: the pixels of
    each batch as it lands (os.pwrite, beside the decoding workers), the keys
    at the end, then renames the file into place, so that a reader sees the
    old cache or the new one. A cache that cannot be written (its folder not
    writable, a full disk) is skipped, and the run says so in one line."""

    def __init__(self, path: Path, relatives: list[str]):
        self.path, self.count = path, len(relatives)
        self.temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        self.handle = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_abandoned(path)
            self.handle = open(self.temporary, "wb")
            _UNFINISHED.add(self.temporary)
            np.save(self.handle, np.array(RECIPE_VERSION), allow_pickle=False)
            np.save(self.handle, np.array(relatives, str), allow_pickle=False)
            np.lib.format.write_array_header_1_0(self.handle, {"descr": "|u1", "fortran_order": False,
                                                               "shape": (self.count, IMAGE_SIZE, IMAGE_SIZE)})
            self.handle.flush()
            self.pixels_at = self.handle.tell()
            self.handle.truncate(self.pixels_at + self.count * IMAGE_SIZE * IMAGE_SIZE)
        except OSError as error:
            self.abandon(error)

    def write_rows(self, images: np.ndarray, start: int, stop: int) -> None:
        if self.handle is None:
            return
        pixels = memoryview(images[start:stop]).cast("B")
        offset, written = self.pixels_at + start * IMAGE_SIZE * IMAGE_SIZE, 0
        try:
            while written < len(pixels):
                written += os.pwrite(self.handle.fileno(), pixels[written:], offset + written)
        except OSError as error:
            self.abandon(error)  # A full disk: no cache this time.

    def finish(self, images: np.ndarray, sizes: list[int], mtimes: list[int]) -> None:
        if self.handle is None:
            return
        try:
            self.handle.seek(0, os.SEEK_END)
            for array in (np.array(sizes, np.int64), np.array(mtimes, np.int64), np.array(zlib.crc32(images))):
                np.save(self.handle, array, allow_pickle=False)
            self.handle.close()
            os.replace(self.temporary, self.path)
            _UNFINISHED.discard(self.temporary)
            self.path.with_suffix(".npz").unlink(missing_ok=True)  # The cache as earlier versions kept it.
        except OSError as error:
            self.abandon(error)
        self.handle = None

    def abandon(self, error: OSError | None = None) -> None:
        """Drops the unfinished file; with the error that made it fail, says so."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        with contextlib.suppress(OSError):  # Not a folder, say: then there is no file either.
            self.temporary.unlink(missing_ok=True)
        _UNFINISHED.discard(self.temporary)
        if error is not None:
            print(f"cannot keep the decoded pictures in {self.path.parent} ({error.strerror or error}); training "
                  "on without that cache, so the next run decodes them again (point $XDG_CACHE_HOME at a "
                  "writable folder to keep it)", flush=True)  # stdout: stderr is silenced while TensorFlow imports.


# The cache files being written: removed if the process exits first (a stop
# during the read ends the thread that reads without letting it clean up).
_UNFINISHED: set[Path] = set()


@atexit.register
def _remove_unfinished() -> None:
    for path in list(_UNFINISHED):
        path.unlink(missing_ok=True)


def _remove_abandoned(path: Path) -> None:
    """Removes the unfinished cache files of `path` whose process is gone (killed, say)."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            os.kill(int(leftover.name.split(".")[-3]), 0)
        except (ValueError, IndexError, ProcessLookupError):
            leftover.unlink(missing_ok=True)
        except PermissionError:
            pass  # Another user's process, alive.


def write_cache(path: Path, keys: list[tuple[str, int, int]], images: np.ndarray) -> None:
    """The pictures' keys (path, size, mtime) and arrays, at once."""
    paths, sizes, mtimes = (list(column) for column in zip(*keys)) if keys else ([], [], [])
    writer = CacheWriter(path, paths)
    writer.write_rows(images, 0, len(images))
    writer.finish(images, sizes, mtimes)
