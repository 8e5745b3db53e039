"""TensorBoard dashboards: event files read back, and a real TensorBoard server serving them."""

from pathlib import Path

import pytest
import tensorflow as tf

from lenet_tf.config import TrainConfig
from lenet_tf.run_dir import RunDir
from lenet_tf.train import train_and_evaluate

from conftest import http_get, read_event_tags, read_scalars, run_cli, tensorboard_server

# One worker runs this module (pyproject.toml's -n): its tests share the models it trains once.
pytestmark = pytest.mark.xdist_group("dashboards")

IMAGE_TAGS = ("confusion_matrix", "test_predictions", "activations/conv1", "activations/conv2", "out_of_distribution")


@pytest.fixture(scope="module")
def dashboard_run(tmp_path_factory, small_real_datasets):
    root = tmp_path_factory.mktemp("dashboards")
    # Exporting, as runs do by default: the final figures are then drawn
    # in a thread of their own while the export runs.
    config = TrainConfig(dataset="fashion_mnist", epochs=3, batch_size=64, activation="relu", learning_rate=0.1,
                         image_every_epochs=2, activation_indices=(0, 1, 2), run_dir=str(root / "runs" / "lenet"),
                         export_formats=("saved_model",), export_dir=str(root / "exports"))
    metrics = train_and_evaluate(config, datasets=small_real_datasets)
    return config, metrics, root


def _images(log_dir: Path) -> dict[str, list]:
    accumulator = read_event_tags(log_dir)
    images = {}
    for tag in accumulator.Tags()["tensors"]:
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "images":
            images[tag] = accumulator.Tensors(tag)
    return images


def test_image_dashboards_every_n_epochs_and_at_the_end(dashboard_run):
    config, _, _ = dashboard_run
    images = _images(Path(config.run_dir) / "logs" / "images")
    assert set(images) == set(IMAGE_TAGS)
    for tag, events in images.items():
        # Every 2 epochs (epoch index 1) and at the end (epoch index 2).
        assert [event.step for event in events] == [1, 2], tag
        width, height, png = tf.make_ndarray(events[-1].tensor_proto)[:3]
        decoded = tf.io.decode_png(png).numpy()
        assert decoded.shape == (int(height), int(width), 4), tag
        assert int(width) >= 200 and int(height) >= 150
        assert decoded[..., :3].std() > 10, f"{tag} is a blank picture"


def test_confusion_matrix_picture_changes_with_training(dashboard_run):
    config, _, _ = dashboard_run
    events = _images(Path(config.run_dir) / "logs" / "images")["confusion_matrix"]
    first, last = (tf.make_ndarray(event.tensor_proto)[2] for event in events)
    assert first != last


def test_confusion_matrix_figure_labels_both_axes_with_the_class_names():
    import numpy as np

    from lenet_tf.dashboards import confusion_matrix_figure
    from lenet_tf.registry import dataset_info

    names = dataset_info("fashion_mnist").class_names
    figure = confusion_matrix_figure(np.eye(10, dtype=np.int64) * 7, names, "test split")
    axes = figure.axes[0]
    assert [label.get_text() for label in axes.get_xticklabels()] == list(names)
    assert [label.get_text() for label in axes.get_yticklabels()] == list(names)
    assert {text.get_text() for text in axes.texts} == {"0", "7"}  # Counts written in the cells.


def test_curves_name_the_validation_curve_after_what_it_was_measured_on():
    from lenet_tf.dashboards import curves_figure

    history = {"loss": [1.0, 0.5], "accuracy": [0.6, 0.8], "val_accuracy": [0.55, 0.75]}
    for label in ("test acc", "validation acc"):
        legend = curves_figure(history, validation_label=label).axes[0].get_legend()
        assert [text.get_text() for text in legend.get_texts()] == ["train loss", "train acc", label]


def test_out_of_distribution_confidence_is_logged(dashboard_run):
    config, _, _ = dashboard_run
    scalars = read_scalars(Path(config.run_dir) / "logs" / "images")
    values = [value for _, value in scalars["out_of_distribution/mean_max_probability"]]
    assert len(values) == 2 and all(0.1 <= value <= 1.0 for value in values)


def test_hparams_session_and_final_metrics(dashboard_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    config, metrics, _ = dashboard_run
    accumulator = read_event_tags(Path(config.run_dir) / "logs")
    metadata = accumulator.SummaryMetadata("_hparams_/session_start_info")
    assert metadata.plugin_data.plugin_name == "hparams"
    session = plugin_data_pb2.HParamsPluginData.FromString(metadata.plugin_data.content).session_start_info
    hparams = {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
               for key, value in session.hparams.items()}
    assert hparams["learning_rate"] == pytest.approx(0.1)
    assert hparams["batch_size"] == 64 and hparams["epochs"] == 3
    assert hparams["activation"] == "relu" and hparams["dataset"] == "fashion_mnist"
    assert hparams["conv_filters"] == "6,16"
    # The settings by which the presets differ are there too.
    assert hparams["optimizer"] == "sgd" and hparams["kernel_size"] == "5" and hparams["crop"] == 0
    assert hparams["whiten_first_conv"] is False and hparams["lr_schedule"] == "constant"
    scalars = read_scalars(Path(config.run_dir) / "logs")
    assert scalars["final/test_accuracy"] == [(2, pytest.approx(metrics["test_accuracy"], rel=1e-6))]
    assert "lenet_forward" in accumulator.Tags()["tensors"]  # The traced op graph.


def test_curves_png_is_written(dashboard_run):
    config, _, _ = dashboard_run
    png = RunDir(config.run_dir).curves.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert tf.io.decode_png(png).shape[1] >= 300


@pytest.fixture(scope="module")
def served(dashboard_run, small_real_datasets):
    """One real TensorBoard server (`lenet-tf tensorboard`) over the dashboard
    run and, beside it, a run trained with --profile-batch (which needs the
    Profile dashboard, the `profile` extra): both served tests ask it."""
    config, metrics, root = dashboard_run
    profiled = TrainConfig(dataset="fashion_mnist", epochs=1, batch_size=64, profile_batch="2,4", steps_per_execution=1,
                           run_dir=str(root / "runs" / "profiled"), export_formats=(), image_every_epochs=0)
    train_and_evaluate(profiled, datasets=small_real_datasets)

    def ready(base: str) -> bool:
        # The Profile dashboard finds its runs in a thread of its own: ask until it lists one.
        return ("lenet/logs/images" in http_get(f"{base}/data/runs")
                and http_get(f"{base}/data/plugins_listing")["profile"]["enabled"]
                and bool(http_get(f"{base}/data/plugin/profile/runs")))

    with tensorboard_server(root / "runs", ready) as base:
        yield base, metrics


@pytest.mark.slow
def test_real_tensorboard_server_serves_the_run(served):
    base, metrics = served
    runs = http_get(f"{base}/data/runs")
    assert {"lenet/logs/train", "lenet/logs/validation", "lenet/logs/images", "lenet/logs"} <= set(runs), runs
    tags = http_get(f"{base}/data/plugin/scalars/tags")
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate", "epoch_examples_per_sec"} <= set(tags["lenet/logs/train"])
    served_loss = http_get(f"{base}/data/plugin/scalars/scalars?run=lenet/logs/train&tag=epoch_loss")
    assert [step for _, step, _ in served_loss] == [0, 1, 2]
    assert served_loss[-1][2] == pytest.approx(metrics["history"]["loss"][-1], rel=1e-5)
    validation = http_get(f"{base}/data/plugin/scalars/scalars?run=lenet/logs/validation&tag=epoch_accuracy")
    assert validation[-1][2] == pytest.approx(metrics["history"]["val_accuracy"][-1], rel=1e-5)
    image_tags = http_get(f"{base}/data/plugin/images/tags")
    assert set(IMAGE_TAGS) <= set(image_tags["lenet/logs/images"])
    listing = http_get(f"{base}/data/plugin/images/images?run=lenet/logs/images&tag=confusion_matrix")
    assert [entry["step"] for entry in listing] == [1, 2]
    png = http_get(f"{base}/data/plugin/images/individualImage?{listing[-1]['query']}", raw=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_on_a_port_in_use_is_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A process of its own: TensorBoard starts its data server before it finds the port taken.
        completed = run_cli("tensorboard", "--run-dir", str(tmp_path), "--port", str(port), timeout=120)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    line = completed.stderr.strip().splitlines()[-1]
    assert line == (f"lenet-tf tensorboard: error: port {port} on 127.0.0.1 is already in use; pass --port 0 "
                    "to pick a free port, or choose another --port")


@pytest.mark.slow
def test_profile_dashboard_lists_a_run_trained_with_profile_batch(served):
    """--profile-batch writes a trace; TensorBoard's Profile dashboard (the `profile` extra) lists it."""
    base, _ = served
    assert http_get(f"{base}/data/plugins_listing")["profile"]["enabled"]
    runs = http_get(f"{base}/data/plugin/profile/runs")
    assert len(runs) == 1 and runs[0].startswith("profiled/logs/train/"), runs
    assert "trace_viewer@" in http_get(f"{base}/data/plugin/profile/run_tools?run={runs[0]}")
