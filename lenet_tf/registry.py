"""The datasets this package knows by name, one entry each: every fact about a dataset in one place.

An entry says what the classes are called, where each source keeps the
files, how the dataset frames an object in its 28x28 images (so `predict`
and the web page can frame a user's picture the same way) and whether a
left-right mirror image keeps its class (so augmentation and test-time
flips are only used where they are safe). Adding a dataset of 28x28 grey
images with ten classes in the four standard IDX files (KMNIST, say) is one
`register_dataset(...)` call:

    register_dataset(DatasetInfo(
        name="kmnist", class_names=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        folder_name="kmnist", tfds_name="kmnist", framing=Framing(longest_side=28, centre="mass"),
        flip_keeps_class=False,
    ))

A folder of the user's pictures is not named here: it has a DatasetInfo of
its own, built from the folder (lenet_tf.folders.FolderDataset.info), that
the command line hands to training, export and evaluation as a value. Every
function that needs a dataset's facts takes either a name from this table or
such a value (`dataset_info` resolves both), so two folders can be used one
after the other, or side by side, in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lenet_tf.errors import UsageError

# Every dataset here is 28x28 grey images: the model's input size is this,
# whatever the dataset. The built-in ones have ten classes; a folder of
# pictures has as many as it has class folders (lenet_tf.folders).
IMAGE_SIZE = 28
# Raw uint8 pixels become [0, 1] by this factor: inside the model (its Rescaling
# layer) and in the whitening statistics of its first layer.
PIXEL_SCALE = 1.0 / 255.0
NUM_CLASSES = 10

# The four standard IDX file stems; each may be stored as .gz or uncompressed.
IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Framing:
    """How a dataset placed each object in its 28x28 images.

    The object's bounding box is scaled, keeping its aspect ratio, until its
    longer side is `longest_side` pixels, then placed on a black 28x28 canvas
    with its centre of mass (`centre="mass"`) or the centre of its bounding
    box (`centre="box"`) at the canvas centre.
    """

    longest_side: int
    centre: str = "box"
    # A picture that is already 28x28 is used as it is, whatever its framing:
    # for a folder of the user's pictures, where such a picture was framed by
    # its maker (and a dataset image saved as a file keeps every pixel).
    keep_model_size: bool = False

    def __post_init__(self):
        if self.centre not in ("box", "mass"):
            raise ValueError(f"Framing.centre must be 'box' or 'mass' (got {self.centre!r})")
        if not 1 <= self.longest_side <= IMAGE_SIZE:
            raise ValueError(f"Framing.longest_side must be 1..{IMAGE_SIZE} (got {self.longest_side})")


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: its name, classes, sources, framing and flip safety."""

    name: str  # As in --dataset and tensorflow_datasets, e.g. "fashion_mnist".
    class_names: tuple[str, ...]
    # Sub-folder name under a data root such as the Keras cache (~/.keras/datasets/<folder_name>/).
    folder_name: str
    tfds_name: str
    framing: Framing
    # Whether a left-right mirror image still shows the same class: true for
    # clothes, false for digits (a mirrored 3 is not a 3).
    flip_keeps_class: bool
    # A system folder that a package manager fills (Debian's dataset-fashion-mnist), if any.
    system_dir: Path | None = None
    # How to get the files on this kind of machine, for the "no data found" message.
    install_hint: str = ""
    # Keras's own download of this dataset: a single .npz in the Keras cache, if it has one.
    keras_npz_name: str | None = None
    # A folder of pictures (lenet_tf.folders.FolderDataset), read by it instead
    # of from IDX files; it also says what a run folder and a model card record
    # of it. Not compared: the folder is what the other fields were read from.
    folder: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if len(self.class_names) < 2:
            raise ValueError(f"{self.name}: a classifier needs at least 2 classes, got {len(self.class_names)}")


_REGISTRY: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    """Adds (or replaces) a dataset; from then on --dataset accepts its name."""
    _REGISTRY[info.name] = info
    return info


def unregister_dataset(name: str) -> None:
    _REGISTRY.pop(name, None)


def dataset_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def dataset_info(dataset: str | DatasetInfo) -> DatasetInfo:
    """`dataset` itself when it is a DatasetInfo (a folder of pictures, which
    is never registered); else the registered dataset called `dataset`, or a
    UsageError listing the known ones."""
    if isinstance(dataset, DatasetInfo):
        return dataset
    try:
        return _REGISTRY[dataset]
    except KeyError:
        raise UsageError(f"--dataset must be one of {', '.join(_REGISTRY)} (got {dataset!r})") from None


def resolve_dataset(name: str, dataset: DatasetInfo | None = None) -> DatasetInfo:
    """The dataset a config names `name`: `dataset` when a value is given (a
    folder of pictures' FolderDataset.info), else the registered `name`."""
    if dataset is None:
        return dataset_info(name)
    if dataset.name != name:
        raise ValueError(f"the config is for the dataset {name!r}, not {dataset.name!r}")
    return dataset


register_dataset(DatasetInfo(
    name="fashion_mnist",
    class_names=("t-shirt", "trouser", "pullover", "dress", "coat",
                 "sandal", "shirt", "sneaker", "bag", "ankle boot"),
    folder_name="fashion-mnist",
    tfds_name="fashion_mnist",
    # Xiao, Rasul, Vollgraf 2017: each product image was trimmed, resized so
    # its longest edge is 28 pixels, and centred.
    framing=Framing(longest_side=28, centre="box"),
    flip_keeps_class=True,
    system_dir=Path("/usr/share/datasets/fashion-mnist"),
    install_hint="run `apt-get install dataset-fashion-mnist`",
))

register_dataset(DatasetInfo(
    name="mnist",
    class_names=tuple(str(digit) for digit in range(10)),
    folder_name="mnist",
    tfds_name="mnist",
    # LeCun et al.: each digit was size-normalised to fit a 20x20 box keeping
    # its aspect ratio, then centred in 28x28 by its centre of mass.
    framing=Framing(longest_side=20, centre="mass"),
    flip_keeps_class=False,
    keras_npz_name="mnist.npz",
))
