"""Presets and the modern preset's training pieces: loss, schedule, augmentation, validation split."""

import math

import numpy as np
import pytest

from lenet_tf.cli import build_parser, config_from_args
from lenet_tf.config import TrainConfig, preset
from lenet_tf.data import augment_batch, make_dataset
from lenet_tf.errors import UsageError
from lenet_tf.model import build_model
from lenet_tf.optimization import SmoothedSparseCrossentropy, learning_rate_schedule
from lenet_tf.train import train_and_evaluate


def test_classic_preset_is_the_dataclass_default():
    assert preset("classic") == TrainConfig(preset="classic")


def test_modern_preset_stays_lenet_shaped_under_100k_parameters():
    model = build_model(preset("modern"))
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Conv2D") == 2 and kinds.count("Dense") == 3
    assert model.count_params() <= 100_000


def test_modern_preset_does_not_flip_digits():
    assert preset("modern", "fashion_mnist").augment == "shift_flip"
    assert preset("modern", "mnist").augment == "shift"
    with pytest.raises(UsageError, match="mirrors images"):
        TrainConfig(dataset="mnist", augment="shift_flip").validate()


def test_flags_override_preset_fields():
    args = build_parser().parse_args(["train", "--preset", "modern", "--epochs", "3", "--augment", "none"])
    config = config_from_args(args)
    assert config.preset == "modern" and config.epochs == 3 and config.augment == "none"
    assert config.momentum == 0.9 and config.batch_norm is True


def test_label_smoothing_loss_matches_keras_categorical_crossentropy():
    import keras

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(16, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 16)
    ours = SmoothedSparseCrossentropy(0.1)(labels, logits)
    reference = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)(
        np.eye(10, dtype=np.float32)[labels], logits)
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    assert float(SmoothedSparseCrossentropy(0.0)(labels, logits)) == pytest.approx(float(plain), rel=1e-5)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    config = TrainConfig(learning_rate=0.1, lr_schedule="cosine", warmup_epochs=1, epochs=10)
    schedule = learning_rate_schedule(config, steps_per_epoch=100)
    values = [float(schedule(step)) for step in (0, 50, 100, 550, 1000)]
    assert values[0] == pytest.approx(0.0, abs=1e-7)
    assert values[1] == pytest.approx(0.05, rel=1e-3)
    assert values[2] == pytest.approx(0.1, rel=1e-3)
    assert values[3] == pytest.approx(0.05, rel=1e-2)
    assert values[4] == pytest.approx(0.0, abs=1e-6)
    assert learning_rate_schedule(TrainConfig(), 100) == 0.9  # Classic: constant.


def test_constant_schedule_with_warmup_ramps_linearly_then_holds():
    config = TrainConfig(learning_rate=0.1, lr_schedule="constant", warmup_epochs=2, epochs=10)
    schedule = learning_rate_schedule(config, steps_per_epoch=100)
    values = [float(schedule(step)) for step in (0, 50, 100, 150, 200, 500, 999)]
    assert values == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1], abs=1e-7)


def test_linear_schedule_is_the_triangular_one_cycle():
    config = TrainConfig(learning_rate=0.2, lr_schedule="linear", warmup_epochs=1, epochs=5)
    schedule = learning_rate_schedule(config, steps_per_epoch=10)
    values = [float(schedule(step)) for step in (0, 5, 10, 30, 50)]
    assert values == pytest.approx([0.0, 0.1, 0.2, 0.1, 0.0], abs=1e-6)


def test_augmentation_shifts_by_at_most_two_pixels_and_keeps_dtype():
    import tensorflow as tf

    images = np.zeros((64, 28, 28, 1), np.uint8)
    images[:, 13, 13, 0] = 255  # One bright pixel in the middle of each image.
    tf.random.set_seed(0)
    shifted = augment_batch(tf.constant(images), shift=True, flip=False).numpy()
    assert shifted.dtype == np.uint8 and shifted.shape == images.shape
    positions = np.argwhere(shifted[..., 0] == 255)
    assert len(positions) == 64  # Nothing lost, nothing duplicated.
    assert np.abs(positions[:, 1:] - 13).max() <= 2
    assert len({tuple(p) for p in positions[:, 1:]}) > 5  # Offsets differ per image.
    flipped = augment_batch(tf.constant(images), shift=True, flip=True).numpy()
    columns = np.argwhere(flipped[..., 0] == 255)[:, 2]
    assert ((columns >= 11) & (columns <= 16)).all()  # 27 - 13 = 14, within 2 of a shift.


def test_validation_split_keeps_the_test_split_for_the_end(tmp_path, small_real_datasets):
    config = TrainConfig(dataset="fashion_mnist", epochs=1, batch_size=64, activation="relu", learning_rate=0.1,
                         validation_split=0.25, run_dir=str(tmp_path / "run"), export_formats=(),
                         image_every_epochs=0)
    metrics = train_and_evaluate(config, datasets=small_real_datasets)
    assert metrics["train_examples"] == 1500
    assert metrics["validation"] == "25% of the training split"
    assert metrics["history"]["val_accuracy"][0] == pytest.approx(metrics["validation_accuracy"], abs=1e-6)
    assert metrics["test_examples"] == 500
    # What the saved model scores on the quarter of the training split that the
    # seed held out, and on the whole test split: the two are not mixed up.
    import keras

    model = keras.models.load_model(tmp_path / "run" / "checkpoints" / "last.keras", compile=False)

    def accuracy_on(images, labels):
        return float(np.mean(model.predict(images, verbose=0).argmax(axis=1) == labels))

    held_out = np.random.default_rng(config.seed).permutation(2000)[:500]
    assert metrics["validation_accuracy"] == pytest.approx(accuracy_on(
        small_real_datasets.train_images[held_out], small_real_datasets.train_labels[held_out]), abs=1e-6)
    assert metrics["test_accuracy"] == pytest.approx(accuracy_on(
        small_real_datasets.test_images, small_real_datasets.test_labels), abs=1e-6)

    # A split that leaves less than a batch to train on says which flag to lower.
    config.validation_split, config.run_dir = 0.99, str(tmp_path / "too-small")
    with pytest.raises(UsageError, match=r"larger than the 20 training examples; .* or lower --validation-split"):
        train_and_evaluate(config, datasets=small_real_datasets)


def test_modern_preset_trains_and_exports_with_parity(tmp_path, small_real_datasets):
    config = preset("modern", "fashion_mnist")
    config.epochs, config.run_dir, config.export_dir = 2, str(tmp_path / "run"), str(tmp_path / "exports")
    config.export_formats = ("saved_model", "tflite", "tflite-int8")
    metrics = train_and_evaluate(config, datasets=small_real_datasets)
    # It learns: the training loss falls, and ends below an untrained model's
    # ln 10 (over seeds 0-4 on AMD EPYC, by 1.1 or more). Not its test
    # accuracy, which batch norm's statistics after 32 steps swing by tens of
    # points between seeds and between CPU kinds' kernels.
    losses = metrics["history"]["loss"]
    assert len(losses) == 2 and losses[1] < losses[0] and losses[1] < math.log(10)
    # Exported, and the parity check (float and int8 against Keras) passed.
    assert set(metrics["exports"]) == {"saved_model", "float32", "int8", "metadata"}


def test_fast_preset_stays_lenet_shaped_under_100k_parameters_and_never_flips_digits():
    # MNIST's model sees the central 24x24 of each image: a smaller map after every conv.
    for dataset, parameters, conv1_side in (("fashion_mnist", 83_018, 24), ("mnist", 55_370, 20)):
        model = build_model(preset("fast", dataset))
        kinds = [type(layer).__name__ for layer in model.layers]
        assert kinds.count("Conv2D") == 2 and kinds.count("Dense") == 2
        # After the convolutions only, and not after the whitened first one.
        assert kinds.count("FusedBatchNormalization") == 1
        assert model.count_params() == parameters  # The whitening kernels counted too.
        assert model.get_layer("conv1").output.shape == (None, conv1_side, conv1_side, 16)  # Unpadded 5x5.
        assert model.inputs[0].shape == (None, 28, 28, 1)  # Every export still takes whole images.
    assert (preset("fast", "fashion_mnist").crop, preset("fast", "mnist").crop) == (0, 2)
    assert preset("fast", "fashion_mnist").augment == "flip"
    assert preset("fast", "mnist").augment == "none"
    assert preset("fast", "fashion_mnist").test_time_flip and not preset("fast", "mnist").test_time_flip
    preset("fast", "mnist").validate()


def test_muon_and_its_state_come_back_from_the_backup_and_the_checkpoint(tmp_path, small_real_datasets):
    """The fast Fashion-MNIST preset trains with Keras's Muon: a resume must
    get its momentum and step count back, and the checkpoint must load."""
    import keras

    from lenet_tf.callbacks import Backup
    from lenet_tf.optimization import build_compiled_model

    config = preset("fast", "fashion_mnist")
    assert (config.optimizer, config.epochs) == ("muon", 7)
    model = build_compiled_model(config, steps_per_epoch=8)
    assert isinstance(model.optimizer, keras.optimizers.Muon)
    assert model.optimizer.momentum == 0.95 and model.optimizer.weight_decay == 0.004
    images, labels = small_real_datasets.train_images[:512], small_real_datasets.train_labels[:512]
    model.fit(images, labels, batch_size=64, epochs=1, verbose=0)
    Backup(tmp_path / "backup").save(model, 1)
    restored = build_compiled_model(config, steps_per_epoch=8)
    assert Backup(tmp_path / "backup").restore(restored) == 1
    assert int(restored.optimizer.iterations) == 8
    for saved, loaded in zip(model.optimizer.variables, restored.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(saved), keras.ops.convert_to_numpy(loaded))
    model.save(tmp_path / "last.keras")
    assert isinstance(keras.models.load_model(tmp_path / "last.keras").optimizer, keras.optimizers.Muon)
    # SGD stays the default, and the flag picks either.
    assert isinstance(build_compiled_model(TrainConfig()).optimizer, keras.optimizers.SGD)
    parsed = config_from_args(build_parser().parse_args(["train", "--optimizer", "muon", "--learning-rate", "0.01"]))
    assert isinstance(build_compiled_model(parsed).optimizer, keras.optimizers.Muon)
    # Newton-Schulz iterations: Keras's 5, but 3 for fast MNIST, and the flag sets them.
    assert (model.optimizer.ns_steps, build_compiled_model(parsed).optimizer.ns_steps) == (5, 5)
    assert build_compiled_model(preset("fast", "mnist")).optimizer.ns_steps == 3
    parsed = config_from_args(build_parser().parse_args(["train", "--preset", "fast", "--muon-ns-steps", "4"]))
    assert build_compiled_model(parsed).optimizer.ns_steps == 4
    with pytest.raises(UsageError, match="--muon-ns-steps must be a positive integer"):
        config_from_args(build_parser().parse_args(["train", "--muon-ns-steps", "0"]))


def test_whitening_kernels_make_the_first_layer_outputs_uncorrelated_with_unit_variance(small_real_datasets):
    from lenet_tf.whitening import whitening_weights

    images = small_real_datasets.train_images
    kernel, bias = whitening_weights(images, 5, 16, use_bias=True)
    assert kernel.shape == (5, 5, 1, 16) and bias.shape == (16,)
    patches = np.lib.stride_tricks.sliding_window_view(images[..., 0] / 255.0, (5, 5), axis=(1, 2)).reshape(-1, 25)
    outputs = patches @ kernel.reshape(25, 16) + bias
    covariance = np.cov(outputs, rowvar=False)
    assert np.abs(outputs.mean(axis=0)).max() < 0.05  # Centred by the bias.
    assert np.abs(covariance - np.diag(np.diag(covariance))).max() < 0.05  # Uncorrelated.
    # Unit variance, less what the epsilon takes from the faintest components.
    variances = np.diag(covariance)
    assert variances[0] == pytest.approx(1.0, abs=0.02) and (variances > 0.4).all() and (variances < 1.02).all()

    # More filters than a patch has pixels: the extra ones are negated copies.
    wide, = whitening_weights(images, 3, 12, use_bias=False)
    assert wide.shape == (3, 3, 1, 12)
    np.testing.assert_allclose(wide[..., 9:], -wide[..., :3])
    # With a crop, the patches come from the part of the images the model keeps.
    for cropped, whole in zip(whitening_weights(images, 5, 16, use_bias=True, crop=2),
                              whitening_weights(np.ascontiguousarray(images[:, 2:-2, 2:-2]), 5, 16, use_bias=True)):
        np.testing.assert_allclose(cropped, whole, rtol=1e-5, atol=1e-6)
    # Blank images have no principal components to speak of: finite weights, no error.
    blank = whitening_weights(np.zeros((8, 28, 28, 1), np.uint8), 5, 6, use_bias=True)
    assert all(np.isfinite(weights).all() for weights in blank)


def test_whitened_first_layer_keeps_its_kernels_through_training_and_export(tmp_path, small_real_datasets):
    from lenet_tf.whitening import whitening_weights

    config = preset("fast", "fashion_mnist")
    config.epochs, config.run_dir, config.export_dir = 2, str(tmp_path / "run"), str(tmp_path / "exports")
    config.validation_split = 0.25
    config.crop = 2  # Whitened from what the model sees, and the crop exported with the model.
    config.export_formats = ("saved_model", "tflite", "tflite-int8")
    metrics = train_and_evaluate(config, datasets=small_real_datasets)
    # It learns around its frozen first layer: the training loss falls, and ends
    # below an untrained model's ln 10 (over seeds 0-4 on AMD EPYC, by 0.58 or more).
    losses = metrics["history"]["loss"]
    assert len(losses) == 2 and losses[1] < losses[0] and losses[1] < math.log(10)
    import keras

    trained = keras.models.load_model(tmp_path / "run" / "checkpoints" / "last.keras", compile=False)
    assert not trained.get_layer("conv1").trainable
    # Whitened from the 1,500 training images, not the held-out 500.
    order = np.random.default_rng(config.seed).permutation(2000)[500:]
    expected = whitening_weights(small_real_datasets.train_images[order], 5, 16, use_bias=True, crop=2)
    for weights, wanted in zip(trained.get_layer("conv1").get_weights(), expected):
        np.testing.assert_allclose(weights, wanted, rtol=1e-5, atol=1e-6)
    assert {"float32", "int8"} <= set(metrics["exports"])  # Exported, and the parity check passed.


def test_augmented_pipeline_is_the_same_for_the_same_seed_and_new_every_epoch():
    """The random draws must not depend on the order in which tf.data's
    parallel map happens to run the batches (they did, with a stateful op)."""
    images = np.random.default_rng(0).integers(0, 256, (4096, 28, 28, 1), dtype=np.uint8)
    labels = np.arange(4096) % 10

    def two_epochs(seed):
        dataset = make_dataset(images, labels, 64, True, seed, augment="shift_flip")
        return [np.concatenate([batch_images.numpy() for batch_images, _ in dataset]) for _ in range(2)]

    first, again, other = two_epochs(3), two_epochs(3), two_epochs(4)
    assert all((epoch == repeat).all() for epoch, repeat in zip(first, again))
    assert not (first[0] == first[1]).all()  # Reshuffled and re-augmented every epoch.
    assert not (first[0] == other[0]).all()


def test_best_preset_is_three_conv_blocks_under_100k_parameters_and_trains_and_exports(tmp_path, small_real_datasets):
    config = preset("best", "fashion_mnist")
    model = build_model(config)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Conv2D") == 3 and kinds.count("Dense") == 2
    assert model.count_params() == 93_898 < 100_000
    assert (config.optimizer, config.test_time_flip, config.epochs) == ("muon", True, 30)
    # Digits are never mirrored, in training or in inference.
    mnist = preset("best", "mnist").validate()
    assert (mnist.test_time_flip, mnist.augment) == (False, "shift")
    config.epochs, config.run_dir, config.export_dir = 2, str(tmp_path / "run"), str(tmp_path / "exports")
    # 32 steps: batch norm's statistics need a shorter memory than 30 epochs' to follow the weights.
    config.batch_norm_momentum = 0.9
    metrics = train_and_evaluate(config, datasets=small_real_datasets)
    # It learns: the training loss falls, and ends below an untrained model's ln 10
    # (over seeds 0-4 on AMD EPYC, by 1.1 or more).
    losses = metrics["history"]["loss"]
    assert len(losses) == 2 and losses[1] < losses[0] and losses[1] < math.log(10)
    assert "float32" in metrics["exports"]  # Exported, and the parity check passed.
