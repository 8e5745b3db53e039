"""A folder of the user's own pictures as a dataset: one subfolder per class.

Two layouts, as `keras.utils.image_dataset_from_directory` reads them:

    PHOTOS/cat/*.jpg, PHOTOS/dog/*.png, ...          a test split is held out
    PHOTOS/train/<class>/..., PHOTOS/test/<class>/... the same classes in both

Class names are the subfolder names, sorted (Keras's order); a class folder's
pictures may sit in subfolders of it. Hidden files and folders (a leading
dot) and files whose names are not pictures' (README.txt, Thumbs.db) are
ignored; a file with a picture's name that cannot be decoded stops the run,
naming it and counting such files.

Every picture becomes the model's 28x28 input by the recipe `predict` and
the web page use (lenet_tf.images): grey, inverted when its border is light
(dark on light becomes light on dark, as in the built-in datasets), the
border's level taken as black, then cropped to the object and scaled so its
longer side is 28 pixels, centred. A picture that is already 28x28 is used
as it is. The decoded arrays are cached per folder under
$XDG_CACHE_HOME/lenet_tf/folders/ (default ~/.cache), keyed by each file's
path, size and modification time, so a second run decodes nothing and an
edited file is decoded again.

NumPy, Pillow and OpenCV only: the folder is read while TensorFlow imports.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import re
import stat
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import numpy as np

from lenet_tf.errors import UsageError
from lenet_tf.registry import IMAGE_SIZE, DatasetInfo, Framing, dataset_info, register_dataset
from lenet_tf.run_dir import RunDir

# The name a folder of pictures has as a dataset (in config.json and model cards).
FOLDER_DATASET = "folder"
# The names of the picture formats read here (Pillow reads each), any case.
PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
# Like Fashion-MNIST: the object's longer side fills the canvas, centred by its box.
FOLDER_FRAMING = Framing(longest_side=IMAGE_SIZE, centre="box", keep_model_size=True)
DEFAULT_TEST_SPLIT = 0.1
# Changes whenever the recipe does, so that no cache made by another recipe is used.
RECIPE_VERSION = "1"
# Below this many pictures, starting worker processes costs more than it saves.
_POOL_MIN_FILES = 400
_CHUNK_FILES = 500
# A read taking longer than this shows its progress on stderr.
_PROGRESS_AFTER_SECONDS = 2.0


class PictureFile(NamedTuple):
    relative: str  # Path below the folder, '/'-separated: train/cat/1.png or cat/1.png.
    size: int
    mtime_ns: int
    label: int
    in_test_folder: bool = False


@dataclass
class FolderListing:
    """What a folder holds, from its directory entries alone (nothing decoded)."""

    root: Path
    layout: str  # "classes" or "train_test"
    class_names: tuple[str, ...]
    files: list[PictureFile]
    # Whether every file's size and modification time are known (scan_folder(sizes=False) leaves them to later).
    sized: bool = True

    def with_sizes(self) -> "FolderListing":
        """This listing with every file's size and modification time, asked of the file system now."""
        if self.sized:
            return self
        files = []
        for file in self.files:
            path = os.path.join(self.root, file.relative)
            try:
                details = os.stat(path)
            except OSError as error:
                raise UsageError(f"cannot read {path}: {error.strerror}") from None
            if details.st_size == 0:
                raise UsageError(f"{path} is empty (0 bytes); remove it or copy it again")
            files.append(file._replace(size=details.st_size, mtime_ns=details.st_mtime_ns))
        return FolderListing(self.root, self.layout, self.class_names, files)

    def fingerprint(self) -> dict[str, list[int]]:
        assert self.sized, "fingerprint() of a listing without sizes"
        return {file.relative: [file.size, file.mtime_ns] for file in self.files}

    def describe(self) -> str:
        kind = "train/ and test/ with one subfolder per class" if self.layout == "train_test" \
            else "one subfolder per class"
        return f"{kind}: {len(self.class_names)} classes, {len(self.files)} pictures"


@dataclass
class FolderDataset:
    """A registered folder of pictures: where it is and how its test split is chosen."""

    root: Path
    class_names: tuple[str, ...]
    test_split: float = DEFAULT_TEST_SPLIT
    seed: int = 0
    flip_keeps_class: bool = False
    # The listing, once scanned (a dataset registered from a model card is
    # scanned only if its pictures are read).
    listing: FolderListing | None = field(default=None, repr=False)
    # The files a run recorded: reading a folder that differs from them is refused.
    recorded_files: dict[str, list[int]] | None = field(default=None, repr=False)
    # The digest of the held-out files a model card recorded: a split that differs from it is refused.
    recorded_held_out: str | None = field(default=None, repr=False)
    recorded_held_out_count: int = field(default=0, repr=False)
    # Pictures decoded (not taken from the cache) by the last load: a test counts them.
    decoded: int = 0
    held_out: list[str] = field(default_factory=list, repr=False)
    # The file of each training and test example, in the order of the last load's arrays.
    train_files: list[str] = field(default_factory=list, repr=False)
    test_files: list[str] = field(default_factory=list, repr=False)

    def load(self, data_dir: str | None = None):
        """The Datasets of this folder, or of `data_dir`, which must hold the same classes."""
        root = self.root if data_dir is None else Path(data_dir).expanduser().resolve()
        if self.listing is None or root != self.listing.root:
            self.listing = scan_folder(root, sizes=False)
        # Here, not when the folder was registered: asking for every file's size is what takes
        # long in a large folder, and this runs while TensorFlow imports.
        listing = self.listing = self.listing.with_sizes()
        if listing.class_names != self.class_names:
            raise UsageError(f"{listing.root} holds the classes {', '.join(listing.class_names)}, but the model "
                             f"knows {', '.join(self.class_names)}; pass a folder with the model's classes")
        if self.recorded_files is not None:
            changes = describe_changes(self.recorded_files, listing.fingerprint())
            if changes:
                raise UsageError(f"{listing.root} changed since the run read it ({changes}); restore it, or "
                                 "train a new run (another --run-dir)")
        images, self.decoded = read_pictures(listing)
        return self._datasets(listing, images)

    def _datasets(self, listing: FolderListing, images: np.ndarray):
        from lenet_tf.data import Datasets

        labels = np.array([file.label for file in listing.files], np.int32)
        if listing.layout == "train_test":
            is_test = np.array([file.in_test_folder for file in listing.files], bool)
            split = "test/ holds the test split"
        else:
            is_test = held_out_split(labels, self.test_split, self.seed)
            split = f"{self.test_split:.0%} of each class held out for testing (seed {self.seed})"
        self.held_out = [file.relative for file, test in zip(listing.files, is_test) if test]
        if self.recorded_held_out is not None and held_out_digest(self.held_out) != self.recorded_held_out:
            # The split is drawn by position in the folder's file list: a picture added or removed
            # moves it, and the test split would take pictures the model was trained on.
            raise UsageError(f"{listing.root} changed since the model was trained: its test split is no longer "
                             f"the {self.recorded_held_out_count} pictures held out from training; evaluate on "
                             "the folder as it was then")
        # In a seeded order rather than class by class, so that --limit-train and --limit-test take every class.
        order = np.random.default_rng(self.seed)
        train_rows, test_rows = order.permutation(np.flatnonzero(~is_test)), order.permutation(np.flatnonzero(is_test))
        self.train_files = [listing.files[row].relative for row in train_rows]
        self.test_files = [listing.files[row].relative for row in test_rows]
        return Datasets(images[train_rows][..., np.newaxis], labels[train_rows], images[test_rows][..., np.newaxis],
                        labels[test_rows], source=str(listing.root),
                        layout=f"{listing.describe()} ({', '.join(listing.class_names)}); {split}")

    def card(self) -> dict[str, Any]:
        """What a model card keeps: enough to name the classes, frame new pictures and find the test split."""
        return {
            "path": str(self.root),
            "class_names": list(self.class_names),
            "flip_keeps_class": self.flip_keeps_class,
            "test_split": self.test_split,
            "seed": self.seed,
            "held_out_count": len(self.held_out),
            "held_out_sha256": held_out_digest(self.held_out),
            "recipe": picture_recipe(),
        }

    def record(self) -> dict[str, Any]:
        """What the run folder keeps: the card, the held-out pictures and every file's size and time."""
        return {**self.card(), "layout": self.listing.layout if self.listing else None,
                "held_out": self.held_out, "files": self.listing.fingerprint() if self.listing else {}}


def held_out_digest(relatives: list[str]) -> str:
    """SHA-256 of the sorted held-out paths (relative to the folder, so a copy elsewhere matches)."""
    return hashlib.sha256("\n".join(sorted(relatives)).encode()).hexdigest()


def picture_recipe() -> dict[str, Any]:
    """The recipe from any picture to the model's input, as the model card and run folder record it."""
    from lenet_tf import images

    return {
        "version": RECIPE_VERSION,
        "steps": [
            "decode with Pillow and apply the EXIF rotation",
            "flatten transparency onto black; convert to 8-bit grey (16-bit grey divided by 257)",
            f"invert when the median of the outermost pixels is above {images.LIGHT_BORDER} (dark on light)",
            "a 28x28 picture is used as it is",
            "any other: subtract the border's median level, crop to the pixels above "
            f"{images.OBJECT_THRESHOLD:.0%} of the brightest, scale the longer side to "
            f"{FOLDER_FRAMING.longest_side} pixels (Lanczos, aspect kept), centre its box on a black 28x28 canvas",
        ],
    }


def is_picture_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in PICTURE_SUFFIXES


def detect_layout(path: str | os.PathLike) -> str:
    """'idx' (the four IDX files), 'train_test' or 'classes'; UsageError when it is none of them."""
    from lenet_tf.data import _checked_folder, _idx_path
    from lenet_tf.registry import IDX_STEMS

    root = _checked_folder(Path(path).expanduser())
    idx_files = [stem for stem in IDX_STEMS.values() if _idx_path(root, stem)]
    if len(idx_files) == len(IDX_STEMS):
        return "idx"
    subfolders = _subfolders(root)
    if idx_files and not subfolders:
        return "idx"  # Some of the four: the IDX reader names those missing.
    if "train" in subfolders and "test" in subfolders:
        return "train_test"
    if not subfolders:
        loose = sum(1 for entry in os.scandir(root) if entry.is_file() and is_picture_name(entry.name))
        raise UsageError(
            f"{root} holds neither the four IDX files ({', '.join(IDX_STEMS.values())}, .gz or not) nor class "
            "subfolders of pictures" + (f" ({loose} pictures lie in it directly)" if loose else "")
            + "; put each class's pictures in a subfolder named after it (PHOTOS/cat/1.jpg, PHOTOS/dog/2.png)")
    return "classes"


def _subfolders(folder: Path) -> list[str]:
    """Names of the visible subfolders (symbolic links to folders included), sorted."""
    try:
        entries = list(os.scandir(folder))
    except OSError as error:
        raise UsageError(f"cannot read folder {folder}: {error.strerror}; fix its permissions") from None
    names = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():
                names.append(entry.name)
        except OSError as error:
            raise UsageError(f"cannot read {entry.path}: {error.strerror}") from None
    return sorted(names)


def scan_folder(path: str | os.PathLike, sizes: bool = True) -> FolderListing:
    """Lists a folder of class folders (either layout) and checks it; UsageError on bad input.

    `sizes=False` leaves the sizes and modification times of plain files
    unasked (FolderListing.with_sizes asks later), and with them the check for empty files.
    """
    root = Path(path).expanduser().resolve()
    layout = detect_layout(root)
    if layout == "idx":
        raise UsageError(f"{root} holds IDX files, not class folders of pictures")
    if layout == "classes":
        class_names = tuple(_subfolders(root))
        _check_classes(class_names, root)
        files = [file for label, name in enumerate(class_names)
                 for file in _pictures(root, name, label, False, sizes)]
        return FolderListing(root, layout, class_names, files, sized=sizes)
    train_classes, test_classes = _subfolders(root / "train"), _subfolders(root / "test")
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        differences = ([f"only in train/: {', '.join(only_train)}"] if only_train else []) + \
                      ([f"only in test/: {', '.join(only_test)}"] if only_test else [])
        raise UsageError(f"{root}/train and {root}/test hold different classes ({'; '.join(differences)}); "
                         "give both the same class subfolders")
    class_names = tuple(train_classes)
    _check_classes(class_names, root / "train")
    files = []
    for split in ("train", "test"):
        for label, name in enumerate(class_names):
            files += _pictures(root, f"{split}/{name}", label, split == "test", sizes)
    return FolderListing(root, layout, class_names, files, sized=sizes)


def _check_classes(class_names: tuple[str, ...], folder: Path) -> None:
    if len(class_names) < 2:
        raise UsageError(f"{folder} holds one class folder ({class_names[0]}); a classifier needs at least 2, "
                         "one subfolder per class")


def _pictures(root: Path, class_folder: str, label: int, in_test: bool, sizes: bool = True) -> list[PictureFile]:
    """The pictures below root/class_folder, sorted by path; follows symbolic links, refusing loops."""
    found: list[PictureFile] = []
    seen_folders: set[tuple[int, int]] = set()

    def walk(folder: Path, relative: str) -> None:
        try:
            identity = folder.stat()
        except OSError as error:
            raise UsageError(f"cannot read {folder}: {error.strerror}") from None
        key = (identity.st_dev, identity.st_ino)
        if key in seen_folders:
            raise UsageError(f"{folder} leads back to a folder above it (a symbolic link loop); remove that link")
        seen_folders.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            raise UsageError(f"cannot read folder {folder}: {error.strerror}; fix its permissions") from None
        for entry in entries:
            if entry.name.startswith(".") or not (is_picture_name(entry.name) or entry.is_dir()):
                continue  # Hidden, or a file that is not a picture by its name: no need to ask for more.
            if not sizes and entry.is_file(follow_symlinks=False):  # The folder's entry says so, no stat.
                found.append(PictureFile(f"{relative}/{entry.name}", -1, -1, label, in_test))
                continue
            try:
                details = entry.stat()  # Follows symbolic links.
            except OSError as error:
                if entry.is_symlink():
                    raise UsageError(f"{entry.path} is a symbolic link that leads nowhere or in a loop "
                                     f"({error.strerror}); remove it") from None
                raise UsageError(f"cannot read {entry.path}: {error.strerror}") from None
            if stat.S_ISDIR(details.st_mode):
                walk(Path(entry.path), f"{relative}/{entry.name}")
            elif stat.S_ISREG(details.st_mode) and is_picture_name(entry.name):
                if details.st_size == 0:
                    raise UsageError(f"{entry.path} is empty (0 bytes); remove it or copy it again")
                found.append(PictureFile(f"{relative}/{entry.name}", details.st_size, details.st_mtime_ns, label,
                                         in_test))
        seen_folders.discard(key)  # Only a folder inside itself is a loop; two links to one folder are not.

    walk(root / class_folder, class_folder)
    if not found:
        raise UsageError(f"class folder {root / class_folder} holds no pictures "
                         f"({', '.join(sorted(PICTURE_SUFFIXES))}); add some or remove the folder")
    return found


def held_out_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded, stratified test split: `fraction` of each class (rounded, at
    least one picture of a class that has two), as a boolean mask."""
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(len(members) * fraction))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        else:
            count = 0
        is_test[rng.permutation(members)[:count]] = True
    return is_test


# --- decoding, in worker processes, and the cache ---------------------------

def cache_path(root: Path) -> Path:
    """Where the decoded arrays of the folder `root` are kept: one file per folder, named by its absolute path."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:24]
    return base / "lenet_tf" / "folders" / f"{digest}.npz"


def _read_cache(path: Path) -> tuple[list[tuple[str, int, int]], np.ndarray | None]:
    """The cached pictures' keys (path, size, mtime) and arrays; no keys when there is no usable cache."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["recipe"]) != RECIPE_VERSION:
                return [], None
            keys = list(zip(cached["paths"].tolist(), cached["sizes"].tolist(), cached["mtimes"].tolist()))
            return keys, cached["images"]
    except (OSError, ValueError, KeyError, EOFError):
        return [], None  # No cache yet, or a damaged one: decode again.


def _write_cache(path: Path, files: list[PictureFile], images: np.ndarray) -> None:
    """Atomically, so a reader sees the old cache or the new one; a cache that cannot be written is skipped."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            np.savez(handle, recipe=np.array(RECIPE_VERSION), paths=np.array([file.relative for file in files]),
                     sizes=np.array([file.size for file in files], np.int64),
                     mtimes=np.array([file.mtime_ns for file in files], np.int64), images=images)
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)


def _decode_chunk(root: str, relatives: list[str]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decodes pictures (in a worker process): their arrays and, for each that failed, (path, reason)."""
    from lenet_tf.images import LIGHT_BORDER, border_level, prepare, read_picture

    images = np.zeros((len(relatives), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    plain_square = np.zeros(len(relatives), bool)
    failures = []
    for index, relative in enumerate(relatives):
        path = os.path.join(root, relative)
        try:
            pixels = _plain_png_pixels(path)
            if pixels is None:
                images[index] = read_picture(path, FOLDER_FRAMING)[..., 0]
            elif pixels.shape == (IMAGE_SIZE, IMAGE_SIZE):
                images[index] = pixels  # Inverted below if its border is light, with the chunk's others.
                plain_square[index] = True
            else:
                # to_grey of an 8-bit grey picture, then the recipe.
                grey = pixels.astype(np.float32)
                if border_level(grey) > LIGHT_BORDER:
                    grey = 255.0 - grey
                images[index] = prepare(grey, FOLDER_FRAMING)
        except UsageError as error:
            failures.append((relative, str(error)))
    # to_grey and prepare of an 8-bit 28x28 picture, in uint8: its pixels, inverted when the median
    # of its border is light; for the whole chunk at once, as border_level does for one picture
    # (tests/test_folders.py checks the two agree).
    rows = np.flatnonzero(plain_square)
    square = images[rows]
    border = np.sort(np.concatenate([square[:, 0], square[:, -1], square[:, :, 0], square[:, :, -1]], axis=1),
                     axis=1).astype(np.int32)
    middle = border.shape[1] // 2  # An even count: the median is the mean of the two middle levels.
    light = rows[border[:, middle - 1] + border[:, middle] > 2 * LIGHT_BORDER]
    images[light] = 255 - images[light]
    return images, failures


def _plain_png_pixels(path: str) -> np.ndarray | None:
    """The 8-bit grey levels of a plain PNG, read without Pillow's per-file
    overhead: by OpenCV where it is installed (8-bit grey or RGB), else by
    Pillow's own PNG decoder (8-bit grey); None for any other file or a damaged
    one, which read_picture reads with its limits and messages."""
    try:
        cv2 = _opencv()
        if cv2 is not None:
            return _opencv_png_pixels(path, cv2)
        plain = _plain_grey_png(path)
    except (struct.error, OSError, ValueError, zlib.error):
        return None  # A damaged or unreadable file: read_picture says what is wrong with it.
    if plain is None:
        return None
    return np.frombuffer(plain.tobytes(), np.uint8).reshape(plain.size[1], plain.size[0])


_OPENCV_UNLOADED = object()
_opencv_module: Any = _OPENCV_UNLOADED


def _opencv():
    """cv2, imported on first use (in the decoding workers, not while TensorFlow
    imports); None where it is not installed, and Pillow reads every picture."""
    global _opencv_module
    if _opencv_module is _OPENCV_UNLOADED:
        try:
            import cv2
        except ImportError:
            cv2 = None
        _opencv_module = cv2
    return _opencv_module


def _opencv_png_pixels(path: str, cv2) -> np.ndarray | None:
    """An 8-bit grey or RGB, non-interlaced PNG without transparency or EXIF,
    decoded by OpenCV (a PNG's pixels are exact, whichever library inflates
    them) and made grey with Pillow's integer weights, so that the array is
    the one read_picture makes; None for any other file."""
    from lenet_tf.images import MAX_FILE_BYTES

    descriptor = os.open(path, os.O_RDONLY)  # Not open(): its buffered file object costs more than the read.
    try:
        size = os.fstat(descriptor).st_size
        if size > MAX_FILE_BYTES:
            return None
        data = os.read(descriptor, size + 1)
    finally:
        os.close(descriptor)
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour_type, _, _, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    if depth != 8 or colour_type not in (0, 2) or interlace or not 0 < width * height <= _PLAIN_PNG_MAX_PIXELS:
        return None
    # Transparency or an EXIF rotation anywhere (or these letters inside the compressed pixels,
    # rarely): Pillow's whole reading.
    if b"tRNS" in data or b"eXIf" in data:
        return None
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None
    if pixels is None or pixels.dtype != np.uint8 or pixels.shape[:2] != (height, width):
        return None
    if colour_type == 0:
        return pixels if pixels.ndim == 2 else None
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        return None
    # Pillow's RGB to L: (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16; OpenCV's channels are B, G, R.
    wide = pixels.astype(np.uint32)
    return ((wide[..., 2] * 19595 + wide[..., 1] * 38470 + wide[..., 0] * 7471 + 0x8000) >> 16).astype(np.uint8)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _plain_grey_png(path: str):
    """An 8-bit grey, non-interlaced PNG without transparency or EXIF (what a
    dataset saved as files usually is), decoded by Pillow's own PNG decoder
    without its Python-level parsing of the file, a large part of the work for
    a small picture; None for any other file, a file too large or a damaged
    one (read_picture reads those, with its limits and its messages)."""
    from PIL import Image

    from lenet_tf.images import MAX_FILE_BYTES

    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size > MAX_FILE_BYTES or handle.read(8) != _PNG_SIGNATURE:
            return None
        data = _PNG_SIGNATURE + handle.read()
    position, size, pieces = len(_PNG_SIGNATURE), None, []
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if position + 12 + length > len(data):
            return None  # Truncated: read_picture says so.
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            if length != 13:
                return None
            width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or colour_type != 0 or interlace or not 0 < width * height <= _PLAIN_PNG_MAX_PIXELS:
                return None
            size = (width, height)
        elif kind == b"IDAT":
            pieces.append(body)
        elif kind == b"IEND":
            break
        elif kind in (b"tRNS", b"eXIf") or size is None:
            return None  # Transparency, an EXIF rotation, or chunks out of order: Pillow's whole reading.
        position += 12 + length
    if size is None or not pieces:
        return None
    try:
        return Image.frombytes("L", size, b"".join(pieces), "zip", "L")
    except (ValueError, OSError):
        return None  # Damaged: read_picture says how.


# Small pictures only: a large one is read by read_picture, with its limits.
_PLAIN_PNG_MAX_PIXELS = 4096 * 4096


def read_pictures(listing: FolderListing, progress: TextIO | None = None,
                  workers: int | None = None) -> tuple[np.ndarray, int]:
    """Every picture of `listing` as uint8 (N, 28, 28), from the cache where it
    has them, decoding the rest on every core; returns them with the count decoded.

    A picture that cannot be decoded raises UsageError naming it and how many
    failed; the pictures that did decode are cached all the same.
    """
    progress = sys.stderr if progress is None else progress
    started = time.monotonic()
    listing = listing.with_sizes()
    cache_file = cache_path(listing.root)
    cached_keys, cached_images = _read_cache(cache_file)
    keys = [(file.relative, file.size, file.mtime_ns) for file in listing.files]
    if cached_keys == keys:
        return cached_images, 0  # Nothing changed: the cache as it is.
    rows = {key: row for row, key in enumerate(cached_keys)}
    images = np.zeros((len(listing.files), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    missing = []
    for index, key in enumerate(keys):
        row = rows.get(key)
        if row is None:
            missing.append(index)
        else:
            images[index] = cached_images[row]
    if not missing:
        _write_cache(cache_file, listing.files, images)  # Pictures were removed: the cache follows.
        return images, 0
    failures: list[tuple[str, str]] = []
    chunks = [missing[start:start + _CHUNK_FILES] for start in range(0, len(missing), _CHUNK_FILES)]
    workers = workers or len(os.sched_getaffinity(0))
    root = str(listing.root)
    done, shown = 0, False

    def collect(chunk: list[int], result) -> None:
        nonlocal done, shown
        decoded, chunk_failures = result
        images[chunk] = decoded
        failures.extend(chunk_failures)
        done += len(chunk)
        if time.monotonic() - started > _PROGRESS_AFTER_SECONDS:
            shown = True
            print(f"\rreading {listing.root}: {done}/{len(missing)} pictures decoded", end="", file=progress,
                  flush=True)

    if len(missing) < _POOL_MIN_FILES or workers < 2:
        for chunk in chunks:
            collect(chunk, _decode_chunk(root, [listing.files[index].relative for index in chunk]))
    else:
        # Spawned, not forked: the parent may be importing TensorFlow in another thread meanwhile.
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_decode_chunk, root, [listing.files[index].relative for index in chunk]):
                       chunk for chunk in chunks}
            for future in concurrent.futures.as_completed(futures):
                collect(futures[future], future.result())
    if shown:
        print(f" in {time.monotonic() - started:.1f} s", file=progress, flush=True)
    failed = {relative for relative, _ in failures}
    good = [index for index, file in enumerate(listing.files) if file.relative not in failed]
    _write_cache(cache_file, [listing.files[index] for index in good], images[good])
    if failures:
        first = sorted(failures)[0][1]
        raise UsageError(f"{len(failures)} file(s) with a picture's name cannot be read as pictures, the first: "
                         f"{first}; fix or remove them")
    return images, len(missing)


# --- the folder as a registered dataset, and the run folder's record --------

def register_folder_dataset(path: str | os.PathLike, test_split: float = DEFAULT_TEST_SPLIT, seed: int = 0,
                            flip_keeps_class: bool = False) -> DatasetInfo:
    """Scans `path` (checking it, decoding nothing) and registers it as the dataset FOLDER_DATASET."""
    if not 0.0 < test_split < 1.0:
        raise UsageError(f"--test-split must be between 0 and 1 (got {test_split})")
    listing = scan_folder(path, sizes=False)
    return _register(FolderDataset(listing.root, listing.class_names, test_split, seed, flip_keeps_class, listing))


def default_name(dataset: str) -> str:
    """The registered folder's name made safe for a path or a model name (letters, digits, _ . -):
    each folder of pictures gets its own default run folder and exported model, not a shared one."""
    name = dataset_info(dataset).folder_name if dataset == FOLDER_DATASET else dataset
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or FOLDER_DATASET


def _register(folder: FolderDataset) -> DatasetInfo:
    return register_dataset(DatasetInfo(
        name=FOLDER_DATASET,
        class_names=tuple(folder.class_names),
        folder_name=folder.root.name,
        tfds_name="",
        framing=FOLDER_FRAMING,
        flip_keeps_class=folder.flip_keeps_class,
        loader=folder.load,
    ))


def registered_folder() -> FolderDataset | None:
    """The folder registered in this process, if any."""
    try:
        loader = dataset_info(FOLDER_DATASET).loader
    except UsageError:
        return None
    return getattr(loader, "__self__", None)


def register_from_record(record: dict[str, Any]) -> DatasetInfo:
    """Registers the folder a run folder or a model card recorded, without
    reading it; reading it later refuses files that differ from a run's record."""
    try:
        folder = FolderDataset(Path(record["path"]), tuple(record["class_names"]), float(record["test_split"]),
                               int(record["seed"]), bool(record["flip_keeps_class"]),
                               recorded_files=record.get("files"), recorded_held_out=record.get("held_out_sha256"),
                               recorded_held_out_count=int(record.get("held_out_count", 0)))
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"the record of the folder of pictures is damaged ({error!r})") from None
    return _register(folder)


def describe_changes(before: dict[str, list[int]], now: dict[str, list[int]]) -> str:
    """'2 added (a/x.png, ...), 1 removed (...), 1 edited (...)', or '' when equal."""
    added = sorted(set(now) - set(before))
    removed = sorted(set(before) - set(now))
    edited = sorted(name for name in set(now) & set(before) if list(now[name]) != list(before[name]))
    parts = []
    for count_word, names in (("added", added), ("removed", removed), ("edited", edited)):
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            parts.append(f"{len(names)} {count_word}: {shown}")
    return "; ".join(parts)


def record_path(run_dir: str | os.PathLike) -> Path:
    return RunDir(Path(run_dir)).dataset_record


def check_unchanged(dataset: str, run_dir: str | os.PathLike, resuming: bool) -> None:
    """For a folder dataset resumed from a backup: refuses a folder that changed
    since the run started (naming what changed), and a run whose record of its
    folder is missing or unreadable. Runs before the backup is restored: a class
    added or removed changes the model's output width, and the backup would not load."""
    folder = registered_folder() if dataset == FOLDER_DATASET else None
    if folder is None or not resuming:
        return
    record = folder.record()
    path = record_path(run_dir)
    try:
        before = json.loads(path.read_text())
        if not isinstance(before, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        if _interrupted_dataset(run_dir) not in (None, FOLDER_DATASET):
            return  # The run trained on another dataset: the check of changed settings names that.
        raise UsageError(f"cannot read {path}, the record of the folder of pictures this run started with "
                         f"({error}); start a new run (another --run-dir)") from None
    changes = describe_changes(before.get("files", {}), record["files"])
    if before.get("path") != record["path"]:
        changes = f"it was {before.get('path')}" + (f"; {changes}" if changes else "")
    elif before.get("class_names") != record["class_names"]:
        changes = (f"the classes were {', '.join(map(str, before.get('class_names') or []))}, now "
                   f"{', '.join(record['class_names'])}") + (f"; {changes}" if changes else "")
    elif before.get("test_split") != record["test_split"] or before.get("seed") != record["seed"]:
        changes = changes or (f"the test split was {before.get('test_split')} with seed {before.get('seed')}")
    if changes:
        raise UsageError(f"the folder {record['path']} is not the one this run started with ({changes}); "
                         "resume with the folder as it was, or start a new run (another --run-dir)")


def _interrupted_dataset(run_dir: str | os.PathLike) -> str | None:
    """The dataset in the run folder's config.json, if it can be read."""
    try:
        return json.loads(RunDir(Path(run_dir)).config.read_text()).get("dataset")
    except (OSError, ValueError, AttributeError):
        return None


def record_folder(dataset: str, write_to: str | os.PathLike) -> None:
    """For a folder dataset: writes the folder's record into the run folder. No-op otherwise."""
    from lenet_tf.io_utils import write_json_atomic

    folder = registered_folder() if dataset == FOLDER_DATASET else None
    if folder is not None:
        write_json_atomic(record_path(write_to), folder.record())


def register_recorded_run(run_dir: str | os.PathLike) -> None:
    """Registers the folder of the run in `run_dir`, from its record (export --run-dir, a checkpoint)."""
    path = record_path(run_dir)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read {path}, the record of the run's folder of pictures: {error}") from None
    register_from_record(record)
