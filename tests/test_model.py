import numpy as np
import pytest

from lenet_tf.config import TrainConfig
from lenet_tf.model import build_model, layer_summary

# The book's layer_summary for the classic LeNet-5 on one 28x28 image.
CLASSIC_SHAPES = {
    "conv1": (1, 28, 28, 6),
    "pool1": (1, 14, 14, 6),
    "conv2": (1, 10, 10, 16),
    "pool2": (1, 5, 5, 16),
    "flatten": (1, 400),
    "dense1": (1, 120),
    "dense2": (1, 84),
    "logits": (1, 10),
}


def test_classic_model_has_the_books_shapes_and_61706_parameters():
    model = build_model(TrainConfig())
    assert model.count_params() == 61_706
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 61_706
    tensor = np.zeros((1, 28, 28, 1), np.uint8)
    shapes = {}
    for layer in model.layers:
        tensor = layer(tensor)
        shapes[layer.name] = tuple(tensor.shape)
    assert {name: shapes[name] for name in CLASSIC_SHAPES} == CLASSIC_SHAPES


def test_classic_layers_are_sigmoid_average_pooling_glorot():
    model = build_model(TrainConfig())
    conv1 = model.get_layer("conv1")
    assert conv1.activation.__name__ == "sigmoid"
    assert conv1.padding == "same" and model.get_layer("conv2").padding == "valid"
    assert type(model.get_layer("pool1")).__name__ == "AveragePooling2D"
    assert type(conv1.kernel_initializer).__name__ == "GlorotUniform"
    assert model.get_layer("logits").activation.__name__ == "linear"


def test_model_takes_raw_uint8_and_scales_inside():
    model = build_model(TrainConfig())
    assert model.inputs[0].dtype == "uint8"
    white = np.full((1, 28, 28, 1), 255, np.uint8)
    scaled = model.get_layer("rescale")(white)
    np.testing.assert_allclose(np.asarray(scaled), 1.0, rtol=1e-6)


def test_layer_summary_lists_every_layer_with_shapes_and_total():
    text = layer_summary(build_model(TrainConfig()))
    for name, shape in CLASSIC_SHAPES.items():
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        assert str(shape) in line
    assert "total trainable parameters: 61,706" in text


@pytest.mark.parametrize(
    "overrides, expected_layer_types",
    [
        (dict(activation="relu", pooling="max"), {"MaxPooling2D"}),
        (dict(batch_norm=True), {"FusedBatchNormalization"}),
        (dict(dropout=0.3), {"Dropout"}),
    ],
)
def test_book_exercise_knobs_change_the_architecture(overrides, expected_layer_types):
    model = build_model(TrainConfig(**overrides))
    assert expected_layer_types <= {type(layer).__name__ for layer in model.layers}
    assert model(np.zeros((2, 28, 28, 1), np.uint8)).shape == (2, 10)


def test_conv_and_dense_counts_and_widths_follow_the_config():
    model = build_model(TrainConfig(conv_filters=(8, 16, 32), kernel_size=(3,), dense_units=(64,)))
    conv_layers = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    dense_layers = [layer for layer in model.layers if type(layer).__name__ == "Dense"]
    assert [layer.filters for layer in conv_layers] == [8, 16, 32]
    assert all(layer.kernel_size == (3, 3) for layer in conv_layers)
    assert [layer.units for layer in dense_layers] == [64, 10]


def test_batch_norm_momentum_reaches_every_batch_norm_layer_and_bad_values_are_refused():
    from lenet_tf.errors import UsageError

    model = build_model(TrainConfig(batch_norm=True, batch_norm_momentum=0.9))
    momenta = [layer.momentum for layer in model.layers if type(layer).__name__ == "FusedBatchNormalization"]
    assert momenta == [0.9] * 4  # Two conv and two hidden dense layers.
    with pytest.raises(UsageError, match="--batch-norm-momentum"):
        TrainConfig(batch_norm_momentum=1.0).validate()


def test_first_conv_without_batch_norm_keeps_its_bias_and_activation_and_its_maps_are_still_found():
    from lenet_tf.model import conv_block_outputs

    model = build_model(TrainConfig(batch_norm=True, first_conv_batch_norm=False, activation="relu"))
    conv1 = model.get_layer("conv1")
    assert conv1.use_bias and conv1.activation.__name__ == "relu"
    assert model.get_layer("conv2").use_bias is False  # Batch norm's shift stands in for it.
    assert [layer.name for layer in conv_block_outputs(model)] == ["conv1", "conv2_relu"]


def test_test_time_flip_averages_each_images_logits_with_its_mirrors_in_inference_only(tmp_path):
    import dataclasses

    import keras

    from lenet_tf.errors import UsageError

    config = TrainConfig(activation="relu", batch_norm=True, test_time_flip=True)
    model = build_model(config)
    plain = build_model(dataclasses.replace(config, test_time_flip=False))
    assert model.count_params() == plain.count_params()
    plain.set_weights(model.get_weights())
    # Asymmetric images, so that a mirror is another input.
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    mirrored = images[:, :, ::-1]
    logits = keras.ops.convert_to_numpy(model(images, training=False))
    expected = (keras.ops.convert_to_numpy(plain(images, training=False))
                + keras.ops.convert_to_numpy(plain(mirrored, training=False))) / 2
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(mirrored, training=False)), logits, atol=1e-6)
    assert not np.allclose(expected, keras.ops.convert_to_numpy(plain(images, training=False)), atol=1e-3)
    # Training sees each image once, as the model without the flip does.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(images, training=True)),
                               keras.ops.convert_to_numpy(plain(images, training=True)), rtol=1e-5, atol=1e-5)
    # It survives the .keras file, and one image in gives one row out.
    model.save(tmp_path / "flip.keras")
    loaded = keras.models.load_model(tmp_path / "flip.keras", compile=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(images[:1], training=False)),
                               keras.ops.convert_to_numpy(model(images[:1], training=False)), atol=1e-6)
    with pytest.raises(UsageError, match="--test-time-flip mirrors images, which changes the class of mnist"):
        TrainConfig(dataset="mnist", test_time_flip=True).validate()
