"""What a run shows in TensorBoard beyond Keras's scalars, and a static curves PNG.

Written under <run_dir>/logs/, beside Keras's `train` and `validation` runs:

  logs/images/      confusion matrix, prediction grid, conv activation maps,
                    out-of-distribution predictions, per-class PR curves
                    (every N epochs and at the end)
  logs/plugins/     the Embedding Projector's files, at the end (lenet_tf.projector)
  logs/             HParams session (hyperparameters + final test metrics), op graph
  curves.png        train loss, train accuracy, test accuracy per epoch (the book's plot)

Figures are drawn with matplotlib (Agg backend, no display) and stored as
image summaries, as the TensorBoard image tutorial does.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from lenet_tf.evaluate import confusion_matrix
from lenet_tf.model import conv_block_outputs, predict_probabilities
from lenet_tf.projector import write_pr_curves, write_projector

IMAGES_RUN = "images"
# Every setting by which the presets differ, so that the HParams dashboard can
# tell their runs apart and sort them by any of them.
HPARAM_KEYS = ("preset", "activation", "pooling", "learning_rate", "batch_size", "epochs", "dataset", "seed",
               "batch_norm", "dropout", "conv_filters", "dense_units", "strategy", "kernel_size", "crop",
               "whiten_first_conv", "optimizer", "momentum", "weight_decay", "label_smoothing", "lr_schedule",
               "warmup_epochs", "augment", "test_time_flip", "validation_split")
FINAL_METRIC_TAGS = ("final/test_accuracy", "final/test_loss", "final/train_accuracy", "final/train_loss",
                     "final/validation_accuracy", "final/validation_loss")


def _figure_to_image(figure) -> np.ndarray:
    """Renders a matplotlib figure to a (1, H, W, 4) uint8 RGBA array and closes it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    image = tf.io.decode_png(buffer.getvalue(), channels=4)
    return image.numpy()[np.newaxis]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # Headless: training machines have no display.
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_figure(confusion: np.ndarray, class_names: Sequence[str], title: str):
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 7))
    # Row-normalised colours, raw counts as text: rare and common classes read alike.
    normalised = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    for row in range(len(class_names)):
        for column in range(len(class_names)):
            axes.text(column, row, str(confusion[row, column]), ha="center", va="center", fontsize=8,
                      color="white" if normalised[row, column] > 0.5 else "black")
    figure.tight_layout()
    return figure


def prediction_grid_figure(images, labels, predicted, probabilities, class_names, columns: int = 6,
                           captions: Sequence[str] | None = None):
    """Test images with true and predicted class; mistakes framed and titled in red.

    Without labels, `captions` (e.g. "uniform noise") stand in for the true class.
    One axes holding a mosaic, not one axes per image: laying out two dozen
    subplots took most of a second per figure.
    """
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    rows = int(np.ceil(len(images) / columns))
    cell_width, cell_height = 34, 50  # 28x28 pixels plus room for a two-line title above.
    mosaic = np.full((rows * cell_height, columns * cell_width), 255, np.uint8)
    figure, axes = plt.subplots(figsize=(columns * 1.6, rows * 1.9))
    axes.axis("off")
    for index in range(len(images)):
        top = (index // columns) * cell_height + cell_height - 31
        left = (index % columns) * cell_width + 3
        mosaic[top:top + 28, left:left + 28] = images[index, ..., 0]
        wrong = labels is not None and predicted[index] != labels[index]
        truth = f"true {class_names[labels[index]]}\n" if labels is not None else ""
        if captions is not None:
            truth = f"{captions[index]}\n"
        axes.text(left + 14, top - 2, f"{truth}pred {class_names[predicted[index]]} {probabilities[index]:.2f}",
                  ha="center", va="bottom", fontsize=7, color="red" if wrong else "black")
        if wrong:
            axes.add_patch(Rectangle((left - 1.5, top - 1.5), 30, 30, fill=False, edgecolor="red", linewidth=2))
    axes.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    figure.subplots_adjust(left=0.01, right=0.99, top=0.99, bottom=0.01)
    return figure


def activation_mosaic(inputs: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """One row per input: the input, then each channel of a conv layer's output.

    Every map is scaled to 0..1 on its own (so weak channels stay visible)
    and enlarged to 28x28 by repetition, keeping pixels sharp.
    """
    rows = []
    for image, channels in zip(inputs, maps):
        tiles = [image[..., 0].astype(np.float32) / 255.0]
        repeat = max(1, 28 // channels.shape[0])
        for channel in np.moveaxis(channels, -1, 0):
            low, high = float(channel.min()), float(channel.max())
            tile = (channel - low) / (high - low) if high > low else np.zeros_like(channel)
            tile = np.kron(tile, np.ones((repeat, repeat)))
            tiles.append(np.pad(tile, ((0, 28 - tile.shape[0]), (0, 28 - tile.shape[1]))))
        rows.append(np.concatenate([np.pad(tile, 1, constant_values=1.0) for tile in tiles], axis=1))
    return np.concatenate(rows, axis=0)


def activation_figure(inputs: np.ndarray, maps: np.ndarray, row_labels: Sequence[str], title: str):
    plt = _pyplot()
    mosaic = activation_mosaic(inputs, maps)
    figure, axes = plt.subplots(figsize=(max(4, mosaic.shape[1] / 30), max(3, mosaic.shape[0] / 30 + 0.6)))
    axes.imshow(mosaic, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axes.set_yticks([30 * row + 15 for row in range(len(row_labels))], row_labels, fontsize=8)
    axes.set_xticks([15] + [30 * column + 15 for column in range(1, maps.shape[-1] + 1)],
                    ["input"] + [str(channel) for channel in range(maps.shape[-1])], fontsize=7)
    axes.set_xlabel("channel")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def curves_figure(history: dict[str, list[float]], validation_label: str = "test acc"):
    """The book's training plot: train loss, train acc and the validation accuracy
    (on the test split, as in the book, or on a held-out validation split) against epoch."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.5))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for key, label, style in (("loss", "train loss", "-"), ("accuracy", "train acc", "--"),
                              ("val_accuracy", validation_label, "-.")):
        if key in history:
            axes.plot(epochs, history[key], style, label=label)
    axes.set_xlabel("epoch")
    if len(epochs) > 1:
        axes.set_xlim(1, len(epochs))
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def write_curves_png(history: dict[str, list[float]], path: Path, validation_label: str = "test acc") -> None:
    figure = curves_figure(history, validation_label)
    figure.savefig(path, dpi=100)
    _pyplot().close(figure)


def out_of_distribution_inputs(test_images: np.ndarray, seed: int) -> tuple[np.ndarray, list[str]]:
    """Inputs unlike the training data: noise, blank, white, and inverted test images."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    blank = np.zeros((1, 28, 28, 1), np.uint8)
    white = np.full((1, 28, 28, 1), 255, np.uint8)
    inverted = 255 - test_images[:3]
    names = ["uniform noise", "uniform noise", "blank", "white", "inverted", "inverted", "inverted"]
    return np.concatenate([noise, blank, white, inverted]), names


def default_activation_indices(test_labels: np.ndarray) -> list[int]:
    """The first test example of each class, so e.g. a pullover and a coat sit side by side."""
    return [int(np.flatnonzero(test_labels == label)[0]) for label in np.unique(test_labels)]


class ImageDashboardsCallback(keras.callbacks.Callback):
    """Writes the image dashboards every `every_epochs` epochs, and at the end
    when the run calls `write_final`."""

    def __init__(self, log_dir: Path, test_images: np.ndarray, test_labels: np.ndarray,
                 class_names: Sequence[str], every_epochs: int, activation_indices: Sequence[int] | None,
                 seed: int = 0, grid_size: int = 24):
        super().__init__()
        self.log_dir = Path(log_dir)
        self.writer = tf.summary.create_file_writer(str(Path(log_dir) / IMAGES_RUN))
        self.test_images, self.test_labels = test_images, test_labels
        self.class_names = list(class_names)
        self.every_epochs = every_epochs
        self.activation_indices = list(activation_indices or default_activation_indices(test_labels))
        self.ood_images, self.ood_names = out_of_distribution_inputs(test_images, seed)
        self.grid_size = grid_size
        self._last_epoch: int | None = None
        self._last_written_epoch: int | None = None
        self._activation_model: keras.Model | None = None

    def on_epoch_end(self, epoch, logs=None):
        self._last_epoch = epoch
        if self.every_epochs and (epoch + 1) % self.every_epochs == 0:
            self.write(epoch)

    def write_final(self) -> None:
        """The final model's pictures, unless the last epoch just wrote them.

        Called by the run after its test evaluation rather than at the end of
        `fit`, so that a user waiting for the test accuracy does not also wait
        for figures to be drawn."""
        if self._last_epoch is not None and self._last_written_epoch != self._last_epoch:
            self.write(self._last_epoch)
        # Every run ends with the final model's Projector view, a run resumed
        # with no epoch left to train included.
        write_projector(self.log_dir, self.model, self.test_images, self.test_labels, self.class_names)

    def write(self, epoch: int) -> None:
        """Step = epoch index, matching Keras's epoch scalars."""
        self._last_written_epoch = epoch
        probabilities = predict_probabilities(self.model, self.test_images)
        predicted = probabilities.argmax(axis=1)
        confusion = confusion_matrix(self.test_labels, predicted, len(self.class_names))
        with self.writer.as_default(step=epoch):
            tf.summary.image("confusion_matrix", _figure_to_image(confusion_matrix_figure(
                confusion, self.class_names, f"test split, epoch {epoch + 1}")))
            count = min(self.grid_size, len(self.test_images))
            tf.summary.image("test_predictions", _figure_to_image(prediction_grid_figure(
                self.test_images[:count], self.test_labels[:count], predicted[:count],
                probabilities[np.arange(count), predicted[:count]], self.class_names)))
            self._write_activations()
            ood_probabilities = predict_probabilities(self.model, self.ood_images)
            ood_predicted = ood_probabilities.argmax(axis=1)
            tf.summary.image("out_of_distribution", _figure_to_image(prediction_grid_figure(
                self.ood_images, None, ood_predicted, ood_probabilities.max(axis=1), self.class_names,
                columns=len(self.ood_images), captions=self.ood_names)))
            tf.summary.scalar("out_of_distribution/mean_max_probability", float(ood_probabilities.max(axis=1).mean()))
            write_pr_curves(self.test_labels, probabilities, self.class_names, step=epoch)
        self.writer.flush()

    def _write_activations(self) -> None:
        inputs = self.test_images[self.activation_indices]
        blocks = conv_block_outputs(self.model)
        if self._activation_model is None:
            # Built once: a new functional model per call costs about a second each time.
            self._activation_model = keras.Model(self.model.inputs, [layer.output for layer in blocks])
        maps = self._activation_model.predict_on_batch(inputs)
        labels = [f"#{index} {self.class_names[self.test_labels[index]]}" for index in self.activation_indices]
        for block, activations in zip(blocks, maps):
            name = block.name.split("_")[0]  # conv1, conv1_bn, conv1_relu -> conv1.
            # With flip test-time augmentation the mirrored images' maps follow; show the images' own.
            activations = keras.ops.convert_to_numpy(activations)[:len(inputs)]
            tf.summary.image(f"activations/{name}", _figure_to_image(activation_figure(
                inputs, activations, labels,
                f"{name} activations, one row per test image")))


def write_hparams_start(log_dir: Path, config: Any, run_name: str) -> None:
    """Records the run's hyperparameters for the HParams dashboard (session start)."""
    from tensorboard.plugins.hparams import api as hparams_api

    values = {}
    for key in HPARAM_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (tuple, list)):
            value = ",".join(str(item) for item in value)
        if value is not None:
            values[key] = value
    with tf.summary.create_file_writer(str(log_dir)).as_default():
        hparams_api.hparams(values, trial_id=run_name)


def write_final_metrics(log_dir: Path, metrics: dict[str, Any], step: int) -> None:
    """Final metrics as scalars in the HParams session's run, so runs compare side by side."""
    with tf.summary.create_file_writer(str(log_dir)).as_default(step=step):
        for tag in FINAL_METRIC_TAGS:
            key = tag.split("/", 1)[1]
            if key in metrics:
                tf.summary.scalar(tag, metrics[key])


def write_op_graph(log_dir: Path, model: keras.Model) -> None:
    """Traces one forward pass so the Graphs dashboard shows the op graph."""
    forward = tf.function(lambda images: model(images, training=False))
    writer = tf.summary.create_file_writer(str(log_dir))
    sample = tf.zeros((1, 28, 28, 1), tf.uint8)
    tf.summary.trace_on(graph=True, profiler=False)
    forward(sample)
    with writer.as_default():
        tf.summary.trace_export(name="lenet_forward", step=0)
    writer.flush()
