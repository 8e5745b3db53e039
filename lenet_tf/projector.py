"""What the model learned, in TensorBoard's Embedding Projector and PR curves dashboards.

At the end of a run, <run_dir>/logs/plugins/org_tensorflow_tensorboard_projector/
(where the Projector looks for a run's files) holds:

  projector_config.pbtxt  the embedding's files and the size of one thumbnail
  features.tsv            per sampled test image, the features the model's last
                          layer (the logits) reads
  metadata.tsv            per image: test index, true class, predicted class,
                          whether the prediction was correct, its confidence
  sprite.png              the same images at 28x28 in a square grid, so every
                          point shows its picture

The folder is written beside its final place and renamed into it whole, so a
run stopped while writing it leaves the previous folder or none, never a
half-written one.

Per-class precision-recall curves of the test split (`pr_curves/<class>`)
are written with the image dashboards (lenet_tf.dashboards).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from lenet_tf.io_utils import current_umask
from lenet_tf.model import MeanOfViews

PROJECTOR_DIR = Path("plugins") / "org_tensorflow_tensorboard_projector"  # tensorboard.plugins.projector's.
TENSOR_NAME = "penultimate_features"
# At least 2,000 points: enough for every class to form a cluster, few enough
# for t-SNE to run in a browser.
SAMPLE_SIZE = 2000
# A fixed seed, not the run's: every run of a dataset shows the same images,
# so two runs' projections can be compared point by point.
SAMPLE_SEED = 0
PR_CURVE_THRESHOLDS = 201  # TensorBoard's default.
_STAGING_PREFIX = ".projector-staging-"


def balanced_sample(labels: np.ndarray, size: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED) -> np.ndarray:
    """Sorted indices of a seeded sample of `size` examples, as evenly spread
    over the classes as their counts allow (a class with fewer gives all it
    has, the others share the rest); every index when there are no more."""
    if len(labels) <= size:
        return np.arange(len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    chosen, remaining = [], size
    # Smallest class first, so what a small class cannot give goes to the larger ones.
    for done, position in enumerate(np.argsort(counts, kind="stable")):
        take = min(counts[position], math.ceil(remaining / (len(classes) - done)))
        chosen.append(rng.permutation(np.flatnonzero(labels == classes[position]))[:take])
        remaining -= take
    return np.sort(np.concatenate(chosen))


def penultimate_features(model: keras.Model, images: np.ndarray,
                         batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """The features the model's logits layer reads, and the model's softmax
    probabilities, for uint8 `images`.

    With test-time flips the model computes features for each image and its
    mirror and answers with the mean of their logits; the features returned
    are the mean of the two views' features, which the (linear) logits layer
    maps to exactly those mean logits: the features behind the model's answer.

    The layers are called one by one, eagerly: no graph to trace, and no
    collective op under a multi-worker strategy when only the chief calls it.
    """
    logits_index = next(index for index, layer in enumerate(model.layers) if layer.name == "logits")
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        hidden = tf.convert_to_tensor(images[start:start + batch_size])
        for layer in model.layers[:logits_index]:
            hidden = layer(hidden, training=False)
        outputs = hidden
        for layer in model.layers[logits_index:]:
            outputs = layer(outputs, training=False)
            if isinstance(layer, MeanOfViews):
                hidden = layer(hidden, training=False)
        features.append(keras.ops.convert_to_numpy(hidden))
        logits.append(keras.ops.convert_to_numpy(outputs))
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(np.concatenate(logits), axis=-1))
    return np.concatenate(features).astype(np.float32), probabilities


def sprite_sheet(images: np.ndarray) -> np.ndarray:
    """The images (N, 28, 28[, 1]) in a square grid, row by row, black where
    the grid has no image: the Projector finds image i at row i // columns."""
    images = images.reshape(len(images), images.shape[1], images.shape[2])
    columns = max(1, math.ceil(math.sqrt(len(images))))
    rows = math.ceil(len(images) / columns)
    height, width = images.shape[1:]
    grid = np.zeros((rows * columns, height, width), np.uint8)
    grid[:len(images)] = images
    return grid.reshape(rows, columns, height, width).transpose(0, 2, 1, 3).reshape(rows * height, columns * width)


def metadata_table(indices: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                   class_names: Sequence[str]) -> str:
    """The metadata TSV: a header, then one row per point, in the tensor's order."""
    names = [" ".join(str(name).split()) for name in class_names]  # No tab or newline may break a row.
    predicted = probabilities.argmax(axis=1)
    rows = ["index\ttrue class\tpredicted class\tcorrect\tconfidence"]
    for index, label, guess, confidence in zip(indices, labels, predicted, probabilities.max(axis=1)):
        rows.append(f"{index}\t{names[label]}\t{names[guess]}\t{'yes' if label == guess else 'no'}\t{confidence:.4f}")
    return "\n".join(rows) + "\n"


def write_projector(log_dir: Path, model: keras.Model, test_images: np.ndarray, test_labels: np.ndarray,
                    class_names: Sequence[str]) -> Path:
    """Writes the Projector's files for a balanced sample of the test split
    into <log_dir>/plugins/org_tensorflow_tensorboard_projector/, replacing
    what an earlier write left there; returns that folder."""
    from google.protobuf import text_format
    from tensorboard.plugins import projector

    indices = balanced_sample(test_labels)
    images = test_images[indices]
    features, probabilities = penultimate_features(model, images)
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = TENSOR_NAME
    embedding.tensor_path = "features.tsv"
    embedding.tensor_shape.extend(features.shape)
    embedding.metadata_path = "metadata.tsv"
    embedding.sprite.image_path = "sprite.png"
    embedding.sprite.single_image_dim.extend([images.shape[2], images.shape[1]])  # Width, height.

    target = Path(log_dir) / PROJECTOR_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f"{_STAGING_PREFIX}*"):  # From a run killed while writing.
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=_STAGING_PREFIX))
    try:
        np.savetxt(staging / "features.tsv", features, fmt="%.6g", delimiter="\t")
        (staging / "metadata.tsv").write_text(metadata_table(indices, test_labels[indices], probabilities,
                                                             class_names))
        (staging / "sprite.png").write_bytes(tf.io.encode_png(sprite_sheet(images)[..., np.newaxis]).numpy())
        (staging / "projector_config.pbtxt").write_text(text_format.MessageToString(config))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; give it ordinary permissions.
        _replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _replace_folder(new: Path, target: Path) -> None:
    """Puts folder `new` at `target`: the old one is moved aside first (a
    stop in between leaves no folder there, which the Projector skips), then
    removed."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=_STAGING_PREFIX))
        target.rename(old / "old")
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_pr_curves(labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], step: int) -> None:
    """One precision-recall curve per class, `pr_curves/<class>`, into the
    default summary writer: each class against the rest, by its probability."""
    from tensorboard.plugins.pr_curve import summary as pr_curve_summary

    for label, name in enumerate(class_names):
        proto = pr_curve_summary.pb(name, labels=labels == label, predictions=probabilities[:, label],
                                    num_thresholds=PR_CURVE_THRESHOLDS,
                                    description=f"test images of class {name} against all others, "
                                                "by the probability the model gives it")
        value = proto.value[0]
        tf.summary.write(f"pr_curves/{name}", tf.make_ndarray(value.tensor), step=step,
                         metadata=value.metadata.SerializeToString())
