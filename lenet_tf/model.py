"""LeNet-5 as a Keras Sequential model, built from a TrainConfig."""

from __future__ import annotations

import io
from typing import TextIO

import keras
from keras import layers

from lenet_tf.config import TrainConfig
from lenet_tf.keras_compat import FusedBatchNormalization
from lenet_tf.registry import IMAGE_SIZE, PIXEL_SCALE, DatasetInfo, resolve_dataset
from lenet_tf.whitening import whitening_weights

# One definition of the model's input and its preprocessing, read by training,
# export and predict alike: raw uint8 pixels in, scaled to [0, 1] inside (PIXEL_SCALE).
INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
INPUT_DTYPE = "uint8"


def build_model(config: TrainConfig, dataset: DatasetInfo | None = None) -> keras.Sequential:
    """Builds the LeNet described by `config`; the default is the book's LeNet-5.

    One output per class of `dataset` (a folder of pictures: its
    FolderDataset.info), or of the built-in `config.dataset` when None.

    Classic layout: conv 6@5x5 (same) -> pool -> conv 16@5x5 (valid) -> pool ->
    flatten -> dense 120 -> dense 84 -> dense 10 logits. The first conv pads
    so that 28x28 inputs play the role of LeNet's original 32x32.
    """
    initializer = "glorot_uniform"  # Keras's default, spelled out because the book relies on it.
    pool = layers.AveragePooling2D if config.pooling == "avg" else layers.MaxPooling2D
    model_layers: list[layers.Layer] = [
        keras.Input(shape=INPUT_SHAPE, dtype=INPUT_DTYPE, name="image"),
        layers.Rescaling(PIXEL_SCALE, name="rescale"),
    ]
    if config.test_time_flip:
        model_layers.append(FlipViews(name="flip_views"))
    if config.crop:
        model_layers.append(layers.Cropping2D(config.crop, name="crop"))
    for index, (filters, kernel_size) in enumerate(zip(config.conv_filters, config.conv_kernel_sizes()), start=1):
        conv_batch_norm = config.batch_norm and (index > 1 or config.first_conv_batch_norm)
        model_layers.append(
            layers.Conv2D(
                filters,
                kernel_size=kernel_size,
                # Only the first conv may pad, as in the book.
                padding=config.first_conv_padding if index == 1 else "valid",
                kernel_initializer=initializer,
                name=f"conv{index}",
                # A whitened first layer keeps the kernels it is given (whiten_first_conv below).
                trainable=not (index == 1 and config.whiten_first_conv),
                **_activation_arguments(conv_batch_norm, config.activation),
            )
        )
        _append_batch_norm(model_layers, config, conv_batch_norm, f"conv{index}")
        model_layers.append(pool(pool_size=2, strides=2, name=f"pool{index}"))
    model_layers.append(layers.Flatten(name="flatten"))
    dense_batch_norm = config.batch_norm and config.dense_batch_norm
    for index, units in enumerate(config.dense_units, start=1):
        model_layers.append(layers.Dense(units, kernel_initializer=initializer, name=f"dense{index}",
                                         **_activation_arguments(dense_batch_norm, config.activation)))
        _append_batch_norm(model_layers, config, dense_batch_norm, f"dense{index}")
        if config.dropout:
            model_layers.append(layers.Dropout(config.dropout, name=f"dense{index}_dropout"))
    num_classes = len(resolve_dataset(config.dataset, dataset).class_names)
    model_layers.append(layers.Dense(num_classes, kernel_initializer=initializer, name="logits"))
    if config.test_time_flip:
        model_layers.append(MeanOfViews(name="mean_of_views"))
    return keras.Sequential(model_layers, name="lenet")


# Flip test-time augmentation as two layers of the model itself, so that
# evaluation, predict and every exported format (SavedModel, TFLite, ONNX, the
# web page) answer alike without code of their own. In training both layers
# pass their input through: the training pipeline flips images already.


@keras.saving.register_keras_serializable(package="lenet_tf")
class FlipViews(layers.Layer):
    """In inference, stacks each batch of images with its left-right mirror
    along the batch axis: N images in, 2N out (the N images, then their N
    mirrors); in training, the identity. MeanOfViews undoes the stacking."""

    def call(self, inputs, training=None):
        if training:
            return inputs
        return keras.ops.concatenate([inputs, keras.ops.flip(inputs, axis=2)], axis=0)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="lenet_tf")
class MeanOfViews(layers.Layer):
    """In inference, the mean of each image's logits and its mirror's (the two
    halves of the batch that FlipViews stacked); in training, the identity.
    Averaging logits rather than probabilities keeps the model's output logits,
    as the rest of the package expects."""

    def call(self, inputs, training=None):
        if training:
            return inputs
        return keras.ops.mean(keras.ops.reshape(inputs, (2, -1, inputs.shape[-1])), axis=0)

    def compute_output_shape(self, input_shape):
        return input_shape


def whiten_first_conv(model: keras.Model, images) -> None:
    """Sets the first conv layer's weights to whitening_weights of `images`
    (the training images), from the part of them the model's crop keeps;
    build_model has already frozen that layer."""
    conv = next(layer for layer in model.layers if isinstance(layer, layers.Conv2D))
    crop = next((layer.cropping[0][0] for layer in model.layers if isinstance(layer, layers.Cropping2D)), 0)
    conv.set_weights(whitening_weights(images, conv.kernel_size[0], conv.filters, conv.use_bias, crop))


def _activation_arguments(batch_norm: bool, activation: str) -> dict:
    """Without batch norm the activation lives inside the conv/dense layer, as in
    the book, so each layer's output is its activation map. With batch norm the
    order must be layer -> BN -> activation, and BN's shift makes a bias redundant."""
    if batch_norm:
        return {"activation": None, "use_bias": False}
    return {"activation": activation}


def _append_batch_norm(model_layers: list, config: TrainConfig, batch_norm: bool, name: str) -> None:
    if batch_norm:
        model_layers.append(FusedBatchNormalization(momentum=config.batch_norm_momentum, name=f"{name}_bn"))
        model_layers.append(layers.Activation(config.activation, name=f"{name}_{config.activation}"))


def layer_summary(model: keras.Model, out: TextIO | None = None) -> str:
    """Prints each layer's output shape for one 28x28 image, like the book's layer_summary.

    Each row also shows the layer's parameter count.
    """
    import numpy as np

    buffer = io.StringIO()
    tensor = np.zeros((1, *INPUT_SHAPE), dtype=INPUT_DTYPE)
    rows = []
    for layer in model.layers:
        tensor = layer(tensor)
        rows.append((layer.name, type(layer).__name__, tuple(tensor.shape), layer.count_params()))
    name_width = max(len(row[0]) for row in rows)
    class_width = max(len(row[1]) for row in rows)
    for name, class_name, shape, params in rows:
        buffer.write(f"{name:<{name_width}}  {class_name:<{class_width}}  output shape: {str(shape):<18} params: {params:,}\n")
    trainable = sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)
    buffer.write(f"total trainable parameters: {trainable:,}\n")
    text = buffer.getvalue()
    if out is not None:
        out.write(text)
    return text


def conv_block_outputs(model: keras.Model, count: int = 2) -> list[keras.layers.Layer]:
    """The layers whose outputs are the first `count` conv blocks' activation
    maps: what reaches each block's pooling layer (after the activation, and
    batch norm when present). Dashboards and the web page show these."""
    blocks, current = [], None
    for previous, layer in zip(model.layers, model.layers[1:]):
        if isinstance(previous, keras.layers.Conv2D):
            current = previous.name
        if current and isinstance(layer, (keras.layers.AveragePooling2D, keras.layers.MaxPooling2D)):
            blocks.append(previous)
            current = None
    return blocks[:count]


def predict_probabilities(model: keras.Model, images, batch_size: int = 1024):
    """Softmax probabilities (numpy) of a logits model on uint8 images."""
    import numpy as np

    from lenet_tf.data import evaluation_batch_size

    # A model built under a strategy predicts on every replica, which needs a
    # share of every batch (lenet_tf.data.evaluation_batch_size).
    size = evaluation_batch_size(len(images), batch_size, model.distribute_strategy.num_replicas_in_sync)
    if size is None:  # A few images, many replicas: one device computes them.
        logits = np.concatenate([keras.ops.convert_to_numpy(model(images[start:start + batch_size], training=False))
                                 for start in range(0, len(images), batch_size)])
    else:
        logits = model.predict(images, batch_size=size, verbose=0)
    return keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
