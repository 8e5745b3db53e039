import json
from pathlib import Path

import pytest

from lenet_tf.config import TrainConfig
from lenet_tf.errors import UsageError
from lenet_tf.train import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, train_and_evaluate

from conftest import read_scalars


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, small_real_datasets):
    """Three epochs of the classic model (at a ReLU-friendly rate, so it learns in
    three epochs) on 2,000 real MNIST images; shared by the tests below."""
    root = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        dataset="mnist", epochs=3, batch_size=32, activation="relu", learning_rate=0.1,
        run_dir=str(root / "run"), export_dir=str(root / "exports"),
    )
    metrics = train_and_evaluate(config, datasets=small_real_datasets)
    return config, metrics, root


def test_short_run_lowers_the_loss_and_learns(short_run):
    _, metrics, _ = short_run
    losses = metrics["history"]["loss"]
    assert len(losses) == 3
    assert losses[-1] < losses[0] * 0.7
    assert metrics["test_accuracy"] > 0.8  # Chance is 0.1.


def test_run_directory_holds_config_metrics_checkpoint(short_run):
    config, metrics, _ = short_run
    run_dir = Path(config.run_dir)
    written = json.loads((run_dir / METRICS_FILE).read_text())
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "examples_per_sec",
                "wall_seconds", "peak_rss_mib", "epochs", "strategy", "exports"):
        assert key in written
    assert written["epochs"] == 3 and written["strategy"] == "default"
    assert written["examples_per_sec"] > 0
    assert 100 < written["peak_rss_mib"] < 20_000  # MiB: TensorFlow alone is a few hundred.
    assert Path(written["exports"]["saved_model"]).is_dir()
    assert Path(written["exports"]["float32"]).is_file()
    assert TrainConfig.read(run_dir / CONFIG_FILE) == config
    import keras

    restored = keras.models.load_model(run_dir / CHECKPOINT_FILE)
    assert restored.count_params() == 61_706


def test_tensorboard_events_hold_every_scalar_for_every_epoch(short_run):
    config, metrics, _ = short_run
    logs = Path(config.run_dir) / "logs"
    train = read_scalars(logs / "train")
    validation = read_scalars(logs / "validation")
    for tag in ("epoch_loss", "epoch_accuracy", "epoch_learning_rate", "epoch_examples_per_sec"):
        assert [step for step, _ in train[tag]] == [0, 1, 2], tag
    for tag in ("epoch_loss", "epoch_accuracy"):
        assert [step for step, _ in validation[tag]] == [0, 1, 2], tag
    assert train["epoch_loss"][-1][1] == pytest.approx(metrics["history"]["loss"][-1], rel=1e-5)
    assert train["epoch_learning_rate"][0][1] == pytest.approx(0.1)


def test_same_seed_gives_the_same_run(tmp_path, small_real_datasets):
    results = []
    for name in ("a", "b"):
        config = TrainConfig(dataset="mnist", epochs=1, batch_size=128, limit_train=512, limit_test=128,
                             run_dir=str(tmp_path / name), export_formats=())
        results.append(train_and_evaluate(config, datasets=small_real_datasets)["history"]["loss"])
    assert results[0] == pytest.approx(results[1], rel=1e-6)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, small_real_datasets):
    config = TrainConfig(dataset="mnist", epochs=3, batch_size=64, activation="relu", learning_rate=1e6,
                         run_dir=str(tmp_path / "run"), export_formats=())
    with pytest.raises(UsageError, match="diverged.*lower --learning-rate"):
        train_and_evaluate(config, datasets=small_real_datasets)
    assert not (tmp_path / "run" / METRICS_FILE).exists()


def test_batch_larger_than_the_data_is_refused_before_training(tmp_path, small_real_datasets):
    config = TrainConfig(dataset="mnist", batch_size=4096, run_dir=str(tmp_path / "run"))
    with pytest.raises(UsageError, match="larger than the 2000 training examples"):
        train_and_evaluate(config, datasets=small_real_datasets)


def test_unwritable_run_dir_is_refused_before_training(tmp_path, small_real_datasets):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = TrainConfig(dataset="mnist", run_dir=str(blocker / "run"))
    with pytest.raises(UsageError, match="cannot write the run directory"):
        train_and_evaluate(config, datasets=small_real_datasets)


def test_steps_per_execution_applies_only_outside_distribution_strategies():
    import tensorflow as tf

    from lenet_tf.train import effective_steps_per_execution

    config = TrainConfig(steps_per_execution=64)
    assert effective_steps_per_execution(config) == 64
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        assert effective_steps_per_execution(config) == 1
