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
as it is. The decoded arrays are cached per folder (lenet_tf.folder_cache),
keyed by each file's path, size and modification time, so a second run
decodes nothing and an edited file is decoded again.

A folder reaches training, export and evaluation as a value: a FolderDataset
(`FolderDataset.scan` for a --data-dir, `from_record` for a model card,
`from_run` for a run folder) whose `info` is the DatasetInfo that carries its
class names, framing and flip safety. Nothing is registered by name.

NumPy and Pillow only: the folder is read while TensorFlow imports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import os
import re
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import numpy as np

from lenet_tf.decoding import FOLDER_FRAMING, POOL_MIN_FILES, RECIPE_VERSION, DecoderPool, decode_files, usable_cores
from lenet_tf.folder_cache import CacheWriter, cache_path, read_cache, write_cache
from lenet_tf.errors import UsageError
from lenet_tf.registry import IMAGE_SIZE, DatasetInfo
from lenet_tf.run_dir import RunDir

# The name a folder of pictures has as a dataset (in config.json and model cards).
FOLDER_DATASET = "folder"
# The names of the picture formats read here (Pillow reads each), any case.
PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
# Phones' own format, which neither Pillow nor libspng reads: counted and named, not skipped in silence.
UNREAD_SUFFIXES = frozenset({".heic", ".heif"})
DEFAULT_TEST_SPLIT = 0.1
# A read taking longer than this shows its progress on stderr.
_PROGRESS_AFTER_SECONDS = 2.0


@dataclass
class FolderListing:
    """What a folder holds, from its directory entries alone (nothing decoded):
    one entry per picture in each list and array, in the folder's sorted order."""

    root: Path
    layout: str  # "classes" or "train_test"
    class_names: tuple[str, ...]
    relatives: list[str]  # Paths below the folder, '/'-separated: train/cat/1.png or cat/1.png.
    labels: np.ndarray  # int32
    in_test_folder: np.ndarray  # bool: below test/ (train_test layout)
    # Each file's size and modification time (ns); None until asked (with_sizes) or read (read_pictures).
    sizes: list[int] | None = None
    mtimes: list[int] | None = None
    # Pictures in a format that is not read (UNREAD_SUFFIXES), below the folder.
    unread: list[str] = field(default_factory=list)

    def with_sizes(self) -> "FolderListing":
        """This listing with every file's size and modification time, asked of the file system now."""
        if self.sizes is not None:
            return self
        sizes, mtimes = [], []
        prefix = os.path.join(self.root, "")  # Joined once: os.path.join per file took longer than the stat.
        for relative in self.relatives:
            path = prefix + relative
            try:
                details = os.stat(path)
            except OSError as error:
                raise UsageError(f"cannot read {path}: {error.strerror}") from None
            if details.st_size == 0:
                raise UsageError(f"{path} is empty (0 bytes); remove it or copy it again")
            sizes.append(details.st_size)
            mtimes.append(details.st_mtime_ns)
        return self.sized(sizes, mtimes)

    def sized(self, sizes: list[int], mtimes: list[int]) -> "FolderListing":
        return FolderListing(self.root, self.layout, self.class_names, self.relatives, self.labels,
                             self.in_test_folder, sizes, mtimes, self.unread)

    def keys(self) -> list[tuple[str, int, int]]:
        """(path, size, modification time) of each file: what the cache is keyed by."""
        assert self.sizes is not None and self.mtimes is not None, "keys() of a listing without sizes"
        return list(zip(self.relatives, self.sizes, self.mtimes))

    def fingerprint(self) -> dict[str, list[int]]:
        return {relative: [size, mtime] for relative, size, mtime in self.keys()}

    def describe(self) -> str:
        kind = "train/ and test/ with one subfolder per class" if self.layout == "train_test" \
            else "one subfolder per class"
        return f"{kind}: {len(self.class_names)} classes, {len(self.relatives)} pictures"

    def unread_note(self) -> str | None:
        """One line naming the pictures that were not read, or None when every picture was."""
        if not self.unread:
            return None
        return (f"{len(self.unread)} HEIC picture(s) were not read (for example {self.unread[0]}): "
                "export them from the phone as JPEG to train on them")

    def __len__(self) -> int:
        return len(self.relatives)


@dataclass
class FolderDataset:
    """A folder of pictures as a dataset: where it is, its classes and how its test split is chosen.

    Made by `scan` (a --data-dir), `from_record` (a model card's record) or
    `from_run` (a run folder's record); `info` is its DatasetInfo, the value
    that training, export and evaluation take.
    """

    root: Path
    class_names: tuple[str, ...]
    test_split: float = DEFAULT_TEST_SPLIT
    seed: int = 0
    flip_keeps_class: bool = False
    # The listing, once scanned (a folder made from a record is scanned
    # only if its pictures are read).
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
    # Decoding workers started before the load (start_decoders), which takes and ends them.
    decoders: DecoderPool | None = field(default=None, repr=False)

    @classmethod
    def scan(cls, path: str | os.PathLike, test_split: float = DEFAULT_TEST_SPLIT, seed: int = 0,
             flip_keeps_class: bool = False) -> "FolderDataset":
        """The folder at `path`, scanned and checked (decoding nothing)."""
        if not 0.0 < test_split < 1.0:
            raise UsageError(f"--test-split must be between 0 and 1 (got {test_split})")
        listing = scan_folder(path, sizes=False)
        return cls(listing.root, listing.class_names, test_split, seed, flip_keeps_class, listing)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "FolderDataset":
        """The folder a run folder or a model card recorded, without reading it;
        reading it later refuses files that differ from a run's record."""
        try:
            return cls(Path(record["path"]), tuple(record["class_names"]), float(record["test_split"]),
                       int(record["seed"]), bool(record["flip_keeps_class"]), recorded_files=record.get("files"),
                       recorded_held_out=record.get("held_out_sha256"),
                       recorded_held_out_count=int(record.get("held_out_count", 0)))
        except (KeyError, TypeError, ValueError) as error:
            raise UsageError(f"the record of the folder of pictures is damaged ({error!r})") from None

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike) -> "FolderDataset":
        """The folder of the run in `run_dir`, from its record (export --run-dir, a checkpoint)."""
        path = record_path(run_dir)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read {path}, the record of the run's folder of pictures: {error}") from None
        return cls.from_record(record)

    @property
    def info(self) -> DatasetInfo:
        """This folder as a dataset: its class names, the framing of its pictures, its flip safety."""
        return DatasetInfo(
            name=FOLDER_DATASET,
            class_names=tuple(self.class_names),
            folder_name=self.root.name,
            tfds_name="",
            framing=FOLDER_FRAMING,
            flip_keeps_class=self.flip_keeps_class,
            folder=self,
        )

    def start_decoders(self) -> None:
        """Starts the processes that decode the pictures now, if the next load
        will decode many: a training run calls this in its main thread before it
        starts reading in the background and importing TensorFlow, where the
        workers can be forked (lenet_tf.decoding.DecoderPool)."""
        if self.decoders is None and self.listing is not None and len(self.listing) >= POOL_MIN_FILES \
                and usable_cores() > 1 and not cache_path(self.root).exists():
            try:
                self.decoders = DecoderPool(usable_cores())
            except OSError:
                pass  # No process to spare now (a limit on processes, or on memory): the load tries again.

    def load(self, data_dir: str | None = None):
        """The Datasets of this folder, or of `data_dir`, which must hold the same classes."""
        decoders, self.decoders = self.decoders, None  # Used or not, ended before this returns.
        with decoders if decoders is not None else contextlib.nullcontext():
            root = self.root if data_dir is None else Path(data_dir).expanduser().resolve()
            if self.listing is None or root != self.listing.root:
                self.listing = scan_folder(root, sizes=False)
            listing = self.listing
            if listing.class_names != self.class_names:
                raise UsageError(f"{listing.root} holds the classes {', '.join(listing.class_names)}, but the "
                                 f"model knows {', '.join(self.class_names)}; pass a folder with the model's classes")
            if self.recorded_files is not None:
                # Here, not when the record was read: asking for every file's size is what takes
                # long in a large folder, and this runs while TensorFlow imports.
                listing = listing.with_sizes()
                changes = describe_changes(self.recorded_files, listing.fingerprint())
                if changes:
                    raise UsageError(f"{listing.root} changed since the run read it ({changes}); restore it, or "
                                     "train a new run (another --run-dir)")
            images, self.decoded, self.listing = read_pictures(listing, decoders=decoders)
        return self._datasets(self.listing, images)

    def _datasets(self, listing: FolderListing, images: np.ndarray):
        from lenet_tf.data import Datasets

        labels = listing.labels
        is_test = self._test_mask(listing)
        split = "test/ holds the test split" if listing.layout == "train_test" \
            else f"{self.test_split:.0%} of each class held out for testing (seed {self.seed})"
        self.held_out = [listing.relatives[row] for row in np.flatnonzero(is_test)]
        if self.recorded_held_out is not None and held_out_digest(self.held_out) != self.recorded_held_out:
            # The split is drawn by position in the folder's file list: a picture added or removed
            # moves it, and the test split would take pictures the model was trained on.
            raise UsageError(f"{listing.root} changed since the model was trained: its test split is no longer "
                             f"the {self.recorded_held_out_count} pictures held out from training; evaluate on "
                             "the folder as it was then")
        # In a seeded order rather than class by class, so that --limit-train and --limit-test take every class.
        order = np.random.default_rng(self.seed)
        train_rows, test_rows = order.permutation(np.flatnonzero(~is_test)), order.permutation(np.flatnonzero(is_test))
        self.train_files = [listing.relatives[row] for row in train_rows]
        self.test_files = [listing.relatives[row] for row in test_rows]
        return Datasets(images[train_rows][..., np.newaxis], labels[train_rows], images[test_rows][..., np.newaxis],
                        labels[test_rows], source=str(listing.root),
                        layout=f"{listing.describe()} ({', '.join(listing.class_names)}); {split}")

    def _test_mask(self, listing: FolderListing) -> np.ndarray:
        """Which of the listing's pictures form the test split."""
        if listing.layout == "train_test":
            return listing.in_test_folder
        return held_out_split(listing.labels, self.test_split, self.seed)

    def training_count(self) -> int:
        """How many pictures the training split holds, counted from the listing (nothing decoded)."""
        assert self.listing is not None, "training_count() of a folder made without its listing"
        return int(np.count_nonzero(~self._test_mask(self.listing)))

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


def _is_unread_name(name: str) -> bool:
    return not name.startswith(".") and name[name.rfind("."):].lower() in UNREAD_SUFFIXES


def is_picture_name(name: str) -> bool:
    # os.path.splitext's suffix for a name without a leading dot, without its cost (a folder may hold 100,000).
    return not name.startswith(".") and name[name.rfind("."):].lower() in PICTURE_SUFFIXES


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
    unasked (FolderListing.with_sizes or read_pictures asks later), and with
    them the check for empty files.
    """
    root = Path(path).expanduser().resolve()
    layout = detect_layout(root)
    if layout == "idx":
        raise UsageError(f"{root} holds IDX files, not class folders of pictures")
    if layout == "classes":
        class_names = tuple(_subfolders(root))
        _check_classes(class_names, root)
        class_folders = [(name, label, False) for label, name in enumerate(class_names)]
    else:
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
        class_folders = [(f"{split}/{name}", label, split == "test")
                         for split in ("train", "test") for label, name in enumerate(class_names)]
    relatives, labels, in_test, file_sizes, mtimes, unread = [], [], [], [], [], []
    for class_folder, label, is_test in class_folders:
        found = _pictures(root, class_folder, sizes)
        relatives += found.relatives
        unread += found.unread
        labels.append(np.full(len(found.relatives), label, np.int32))
        in_test.append(np.full(len(found.relatives), is_test))
        if sizes:
            file_sizes += found.sizes
            mtimes += found.mtimes
    return FolderListing(root, layout, class_names, relatives, np.concatenate(labels), np.concatenate(in_test),
                         file_sizes if sizes else None, mtimes if sizes else None, unread)


def _check_classes(class_names: tuple[str, ...], folder: Path) -> None:
    if len(class_names) < 2:
        raise UsageError(f"{folder} holds one class folder ({class_names[0]}); a classifier needs at least 2, "
                         "one subfolder per class")


_entry_name = operator.attrgetter("name")


class _Found(NamedTuple):
    relatives: list[str]
    sizes: list[int]  # Empty when not asked for.
    mtimes: list[int]
    unread: list[str]  # Pictures in a format that is not read (UNREAD_SUFFIXES).


def _pictures(root: Path, class_folder: str, sizes: bool = True) -> _Found:
    """The pictures below root/class_folder, sorted by path; follows symbolic links, refusing loops."""
    found = _Found([], [], [], [])
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
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=_entry_name)
        except OSError as error:
            raise UsageError(f"cannot read folder {folder}: {error.strerror}; fix its permissions") from None
        prefix = f"{relative}/"
        if not sizes and all(entry.is_file(follow_symlinks=False) for entry in entries):
            # Plain files only, the usual class folder: the pictures by name, no folder to walk, nothing to ask.
            for entry in entries:  # One pass, one suffix a name: a folder may hold 100,000.
                name = entry.name
                suffix = "" if name.startswith(".") else name[name.rfind("."):].lower()
                if suffix in PICTURE_SUFFIXES:
                    found.relatives.append(prefix + name)
                elif suffix in UNREAD_SUFFIXES:
                    found.unread.append(prefix + name)
            seen_folders.discard(key)
            return
        for entry in entries:
            name = entry.name
            picture = is_picture_name(name)
            if not picture and (name.startswith(".") or not entry.is_dir()):
                if _is_unread_name(name):
                    found.unread.append(prefix + name)
                continue  # Hidden, or a file that is not a picture by its name: no need to ask for more.
            if picture and not sizes and entry.is_file(follow_symlinks=False):  # The entry says so, no stat.
                found.relatives.append(prefix + name)
                continue
            try:
                details = entry.stat()  # Follows symbolic links.
            except OSError as error:
                if entry.is_symlink():
                    raise UsageError(f"{entry.path} is a symbolic link that leads nowhere or in a loop "
                                     f"({error.strerror}); remove it") from None
                raise UsageError(f"cannot read {entry.path}: {error.strerror}") from None
            if stat.S_ISDIR(details.st_mode):
                walk(Path(entry.path), prefix + name)
            elif stat.S_ISREG(details.st_mode) and picture:
                if details.st_size == 0:
                    raise UsageError(f"{entry.path} is empty (0 bytes); remove it or copy it again")
                found.relatives.append(prefix + name)
                if sizes:
                    found.sizes.append(details.st_size)
                    found.mtimes.append(details.st_mtime_ns)
        seen_folders.discard(key)  # Only a folder inside itself is a loop; two links to one folder are not.

    walk(root / class_folder, class_folder)
    if not found.relatives:
        heic = " (only HEIC pictures, which are not read: export them as JPEG)" if found.unread else ""
        raise UsageError(f"class folder {root / class_folder} holds no pictures "
                         f"({', '.join(sorted(PICTURE_SUFFIXES))}){heic}; add some or remove the folder")
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


# --- reading, through the cache ----------------------------------------------

class FolderPictures(NamedTuple):
    """A folder's pictures as read: the arrays, how many were decoded (not taken
    from the cache), and the listing with every file's size and modification time."""

    images: np.ndarray  # uint8 (N, 28, 28), in the listing's order.
    decoded: int
    listing: FolderListing


def read_pictures(listing: FolderListing, progress: TextIO | None = None, workers: int | None = None,
                  decoders: DecoderPool | None = None) -> FolderPictures:
    """Every picture of `listing` as uint8 (N, 28, 28), from the cache where it
    has them, decoding the rest on every core (lenet_tf.decoding): on
    `decoders` when a pool was started earlier, else on `workers` processes.

    A listing without sizes is sized here: by asking the file system when
    there is a cache to compare with, else by the decoding itself, which reads
    each file's size and time from the descriptor it reads it through. A
    picture that cannot be decoded raises UsageError naming it and how many
    failed; the pictures that did decode are cached all the same.
    """
    progress = sys.stderr if progress is None else progress
    started = time.monotonic()
    cache_file = cache_path(listing.root)
    cached_keys, cached_images = read_cache(cache_file)
    if cached_keys or listing.sizes is not None:
        listing = listing.with_sizes()
        keys = listing.keys()
        if cached_keys == keys:
            return FolderPictures(cached_images, 0, listing)  # Nothing changed: the cache as it is.
        rows = {key: row for row, key in enumerate(cached_keys)}
        cached_rows = np.array([rows.get(key, -1) for key in keys], np.int64)
    else:
        cached_rows = np.full(len(listing), -1, np.int64)
    missing = np.flatnonzero(cached_rows < 0)
    images = np.zeros((len(listing), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    kept = np.flatnonzero(cached_rows >= 0)
    if len(kept):
        images[kept] = cached_images[cached_rows[kept]]
    if not len(missing):
        write_cache(cache_file, keys, images)  # Pictures were removed: the cache follows.
        return FolderPictures(images, 0, listing)
    # The first read of a folder writes its cache as the pictures land.
    writer = CacheWriter(cache_file, listing.relatives) if len(missing) == len(listing) else None
    done, shown = 0, False

    def landed(decoded_images: np.ndarray, start: int, stop: int) -> None:
        nonlocal done, shown
        if writer is not None:
            writer.write_rows(decoded_images, start, stop)
        done += stop - start
        if time.monotonic() - started > _PROGRESS_AFTER_SECONDS:
            shown = True
            print(f"\rreading {listing.root}: {done}/{len(missing)} pictures decoded", end="", file=progress,
                  flush=True)

    try:
        decoded = decode_files(str(listing.root), [listing.relatives[index] for index in missing], workers, landed,
                               decoders)
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    if shown:
        print(f" in {time.monotonic() - started:.1f} s", file=progress, flush=True)
    if len(missing) == len(listing):  # Every picture decoded (a first read): no copies.
        images, sizes, mtimes = decoded.images, decoded.sizes.tolist(), decoded.mtimes.tolist()
    else:
        images[missing] = decoded.images
        sizes, mtimes = list(listing.sizes), list(listing.mtimes)
        for index, size, mtime in zip(missing.tolist(), decoded.sizes.tolist(), decoded.mtimes.tolist()):
            sizes[index], mtimes[index] = size, mtime
    listing = listing.sized(sizes, mtimes)
    keys = listing.keys()
    failed = {relative for relative, _ in decoded.failures}
    empty = [listing.relatives[index] for index in missing if sizes[index] == 0]  # -1: could not be read.
    if failed or empty:
        if writer is not None:
            writer.abandon()
        good = [index for index, (relative, size, _) in enumerate(keys) if relative not in failed and size > 0]
        write_cache(cache_file, [keys[index] for index in good], images[good])
    elif writer is not None:
        writer.finish(images, sizes, mtimes)
    else:
        write_cache(cache_file, keys, images)
    if empty:
        raise UsageError(f"{listing.root / empty[0]} is empty (0 bytes); remove it or copy it again")
    if decoded.failures:
        first = sorted(decoded.failures)[0][1]
        raise UsageError(f"{len(decoded.failures)} file(s) with a picture's name cannot be read as pictures, the "
                         f"first: {first}; fix or remove them")
    return FolderPictures(images, len(missing), listing)


# --- the run folder's record of its folder -----------------------------------

def default_name(dataset: str | DatasetInfo) -> str:
    """A dataset's name made safe for a path or a model name (letters, digits, _ . -); for a folder of
    pictures, the folder's own name: each folder gets its own default run folder and exported model."""
    if isinstance(dataset, DatasetInfo):
        dataset = dataset.folder_name if dataset.folder is not None else dataset.name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", dataset).lstrip(".") or FOLDER_DATASET


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


def check_unchanged(folder: FolderDataset | None, run_dir: str | os.PathLike, resuming: bool) -> None:
    """For a folder of pictures resumed from a backup: refuses a folder that changed
    since the run started (naming what changed), and a run whose record of its
    folder is missing or unreadable. Runs before the backup is restored: a class
    added or removed changes the model's output width, and the backup would not load."""
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


def record_folder(folder: FolderDataset | None, write_to: str | os.PathLike) -> None:
    """For a folder of pictures: writes its record into the run folder. No-op for None."""
    from lenet_tf.io_utils import write_json_atomic

    if folder is not None:
        write_json_atomic(record_path(write_to), folder.record())
