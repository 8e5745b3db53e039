import dataclasses
import json
import math
import os
from pathlib import Path

import pytest

from lenet_tf.config import TrainConfig
from lenet_tf.errors import UsageError
from lenet_tf.run_dir import RunDir
from lenet_tf.train import train_and_evaluate

from conftest import read_scalars

# One worker runs this module (pyproject.toml's -n): its tests share the models it trains once.
pytestmark = pytest.mark.xdist_group("train")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, small_real_datasets):
    """Three epochs of the classic model (at a ReLU-friendly rate, so it learns in
    three epochs) on 2,000 real Fashion-MNIST images; shared by the tests below."""
    root = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        dataset="fashion_mnist", epochs=3, batch_size=32, activation="relu", learning_rate=0.1,
        run_dir=str(root / "run"), export_dir=str(root / "exports"),
    )
    metrics = train_and_evaluate(config, datasets=small_real_datasets)
    return config, metrics, root


def test_short_run_lowers_the_loss_and_learns(short_run):
    """Learning shown by the loss, not by a test accuracy: after three epochs on
    2,000 images, the last batches' steps move test accuracy by many points
    from one seed (or one CPU kind's kernels) to the next, the epoch's mean
    training loss hardly at all."""
    _, metrics, _ = short_run
    losses = metrics["history"]["loss"]
    assert len(losses) == 3
    assert losses[2] < losses[1] < losses[0]
    # An untrained model's expected loss is ln 10. Over seeds 0-4 (AMD EPYC) the
    # test loss ended 1.0 to 1.7 below it, the last epoch's training loss at
    # 0.41 to 0.51 of the first's.
    assert metrics["test_loss"] < math.log(10)
    assert losses[2] < losses[0] * 0.7


def test_run_directory_holds_config_metrics_checkpoint(short_run):
    config, metrics, _ = short_run
    run_dir = RunDir(config.run_dir)
    written = json.loads(run_dir.metrics.read_text())
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "examples_per_sec",
                "wall_seconds", "seconds_to_tested_model", "peak_rss_mib", "epochs", "strategy", "exports"):
        assert key in written
    # The wait for a tested model ends before the export; the wall time includes it.
    assert 0 < written["seconds_to_tested_model"] < written["wall_seconds"]
    assert written["epochs"] == 3 and written["strategy"] == "default"
    assert written["examples_per_sec"] > 0
    assert 100 < written["peak_rss_mib"] < 20_000  # MiB: TensorFlow alone is a few hundred.
    assert Path(written["exports"]["saved_model"]).is_dir()
    assert Path(written["exports"]["float32"]).is_file()
    assert TrainConfig.read(run_dir.config) == config
    import keras

    restored = keras.models.load_model(run_dir.checkpoint)
    assert restored.count_params() == 61_706
    assert not run_dir.backup.exists()  # The run is complete: nothing left to resume.


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
        config = TrainConfig(dataset="fashion_mnist", epochs=1, batch_size=128, limit_train=512, limit_test=128,
                             run_dir=str(tmp_path / name), export_formats=())
        results.append(train_and_evaluate(config, datasets=small_real_datasets)["history"]["loss"])
    assert results[0] == pytest.approx(results[1], rel=1e-6)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path, small_real_datasets):
    import keras
    import numpy as np

    run_dir = RunDir(tmp_path / "run")
    base = dict(dataset="fashion_mnist", batch_size=64, activation="relu", run_dir=str(run_dir.root),
                export_formats=(), image_every_epochs=0)
    train_and_evaluate(TrainConfig(epochs=1, learning_rate=0.1, **base), datasets=small_real_datasets)
    good = keras.models.load_model(run_dir.checkpoint).get_weights()
    run_dir.metrics.unlink()
    with pytest.raises(UsageError, match=r"diverged.*lower --learning-rate.*last good checkpoint"):
        train_and_evaluate(TrainConfig(epochs=3, learning_rate=1e6, **base), datasets=small_real_datasets)
    assert not run_dir.metrics.exists()
    kept = keras.models.load_model(run_dir.checkpoint).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(good, kept))
    assert all(np.isfinite(weight).all() for weight in kept)


def test_batch_larger_than_the_data_is_refused_before_training(tmp_path, small_real_datasets):
    config = TrainConfig(dataset="fashion_mnist", batch_size=4096, run_dir=str(tmp_path / "run"))
    with pytest.raises(UsageError, match="larger than the 2000 training examples"):
        train_and_evaluate(config, datasets=small_real_datasets)


def test_unwritable_run_dir_is_refused_before_training(tmp_path, small_real_datasets):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = TrainConfig(dataset="fashion_mnist", run_dir=str(blocker / "run"))
    with pytest.raises(UsageError, match="cannot write the run directory"):
        train_and_evaluate(config, datasets=small_real_datasets)


def test_a_split_that_replicas_cannot_share_is_refused_in_one_line(small_real_datasets):
    from lenet_tf.train import _make_pipelines

    datasets = small_real_datasets.limited(1000, 101)
    config = TrainConfig(batch_size=32)
    _make_pipelines(config, datasets, replicas=2)  # 101 test examples: batches of 64, then 37.
    with pytest.raises(UsageError, match=r"the test split's 3 example\(s\) cannot be shared among the 4 replicas .* "
                                         r"change --limit-test so that it holds a multiple of 4 examples"):
        _make_pipelines(config, datasets.limited(1000, 3), replicas=4)
    with pytest.raises(UsageError, match=r"the validation split's 5 example\(s\) cannot be shared among the 2 "):
        _make_pipelines(dataclasses.replace(config, validation_split=0.005), datasets, replicas=2)


def test_a_second_training_on_the_same_run_dir_is_refused_and_writes_nothing(tmp_path, small_real_datasets):
    from lenet_tf.run_dir import holding

    run_dir = RunDir(tmp_path / "run")
    config = TrainConfig(dataset="fashion_mnist", epochs=1, run_dir=str(run_dir.root), export_formats=())
    with holding(run_dir, "training"):  # Another training holds the folder.
        before = sorted(path.name for path in run_dir.root.iterdir())
        with pytest.raises(UsageError, match=rf"the run directory {run_dir} is in use by training process "
                                             rf"{os.getpid()} on host .* wait for it to finish"):
            train_and_evaluate(config, datasets=small_real_datasets)
        assert sorted(path.name for path in run_dir.root.iterdir()) == before
    train_and_evaluate(config, datasets=small_real_datasets)  # Released: the next one runs.
    assert run_dir.metrics.is_file()


@pytest.mark.parametrize("validation_split", [0.0, 0.25])
def test_reported_test_metrics_are_a_fresh_evaluation_of_the_final_model(tmp_path, small_real_datasets,
                                                                         validation_split):
    """The test numbers may come from fit's last validation pass (when that ran
    on the test split); either way they are what the saved model scores."""
    import keras
    import numpy as np

    config = TrainConfig(dataset="fashion_mnist", epochs=2, batch_size=64, activation="relu", learning_rate=0.1,
                         validation_split=validation_split, run_dir=str(tmp_path / "run"), export_formats=(),
                         image_every_epochs=0)
    metrics = train_and_evaluate(config, datasets=small_real_datasets)
    model = keras.models.load_model(RunDir(config.run_dir).checkpoint)
    logits = model.predict(small_real_datasets.test_images, verbose=0)
    accuracy = float(np.mean(logits.argmax(axis=1) == small_real_datasets.test_labels))
    loss = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(small_real_datasets.test_labels, logits))
    assert metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["test_loss"] == pytest.approx(loss, rel=1e-4)


def test_best_epoch_keeps_the_best_weights_and_stops_after_the_patience(tmp_path):
    """Validation accuracies 0.5, 0.7, 0.6, 0.7, 0.65, 0.6 with a patience of 2:
    the later of the two 0.7 epochs (index 3) is kept, training stops at the
    end of index 5, and a resumed run knows it has nothing left to train."""
    import keras
    import numpy as np

    from lenet_tf.callbacks import BestEpoch, EpochHistory

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    history = EpochHistory(tmp_path / "history.json")
    best = BestEpoch(tmp_path / "best.weights.h5", history, patience=2)
    for callback in (history, best):
        callback.set_model(model)
    stopped_at = []
    for epoch, accuracy in enumerate((0.5, 0.7, 0.6, 0.7, 0.65, 0.6)):
        model.set_weights([np.full((2, 1), float(epoch), np.float32), np.zeros(1, np.float32)])
        model.stop_training = False
        history.on_epoch_begin(epoch)
        history.on_epoch_end(epoch, {"loss": 1.0, "val_accuracy": accuracy})
        best.on_epoch_end(epoch, {"loss": 1.0, "val_accuracy": accuracy})
        if model.stop_training:
            stopped_at.append(epoch)
    assert stopped_at == [5] and best.stopped()
    assert best.restore_best(model) == 3
    np.testing.assert_array_equal(model.get_weights()[0], np.full((2, 1), 3.0))
    # The same run read back from its files, as a resume reads it.
    resumed = BestEpoch(tmp_path / "best.weights.h5", EpochHistory(tmp_path / "history.json"), patience=2)
    assert resumed.stopped() and resumed.best_epoch() == 3
    assert not BestEpoch(tmp_path / "best.weights.h5", EpochHistory(tmp_path / "history.json"), patience=3).stopped()
