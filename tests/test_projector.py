"""The Embedding Projector's files and the per-class PR curves: computed for every preset's
model, written by a real run, served by a real TensorBoard server and shown in a real browser."""

import dataclasses
import urllib.parse
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from lenet_tf.config import PRESETS, preset
from lenet_tf.model import build_model, predict_probabilities
from lenet_tf.projector import (
    PROJECTOR_DIR, SAMPLE_SIZE, TENSOR_NAME, balanced_sample, metadata_table, penultimate_features, sprite_sheet,
    write_projector,
)
from lenet_tf.registry import dataset_info

from conftest import CHROMIUM, CHROMIUM_ARGS, http_get, missing_chromium, read_event_tags, tensorboard_server

# One worker runs this module (pyproject.toml's -n): its tests share the models it trains once.
pytestmark = pytest.mark.xdist_group("projector")

FASHION_NAMES = dataset_info("fashion_mnist").class_names
METADATA_HEADER = "index\ttrue class\tpredicted class\tcorrect\tconfidence"

def test_the_sample_is_seeded_sorted_and_balanced_over_the_real_test_split(fashion_mnist_dir):
    from lenet_tf.data import load_idx_dir

    labels = load_idx_dir(fashion_mnist_dir).test_labels
    sample = balanced_sample(labels)
    assert len(sample) == SAMPLE_SIZE == 2000
    assert np.array_equal(sample, np.unique(sample))  # Sorted, no image twice.
    assert np.bincount(labels[sample], minlength=10).tolist() == [200] * 10
    assert np.array_equal(sample, balanced_sample(labels))  # The same images for every run.
    assert not np.array_equal(sample, balanced_sample(labels, seed=1))  # Drawn, not the first of each class.


def test_a_small_class_gives_all_it_has_and_a_small_split_is_taken_whole():
    labels = np.concatenate([np.full(50, 3), np.repeat([0, 1, 2, 4, 5, 6, 7, 8, 9], 400)])
    counts = np.bincount(labels[balanced_sample(labels)]).tolist()
    assert counts[3] == 50 and sum(counts) == 2000 and max(counts) - min(counts[:3] + counts[4:]) <= 1
    assert np.array_equal(balanced_sample(labels[:1500]), np.arange(1500))


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
@pytest.mark.parametrize("preset_name", PRESETS)
def test_features_are_what_the_logits_layer_reads_for_every_preset(preset_name, dataset):
    """Whitening, crop, batch norm, dropout and flip wrappers included: the logits
    layer maps the features to the model's own answer."""
    keras.utils.set_random_seed(0)
    model = build_model(preset(preset_name, dataset))
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    features, probabilities = penultimate_features(model, images, batch_size=16)
    width = model.get_layer("logits").kernel.shape[0]
    assert features.shape == (40, width) and features.dtype == np.float32
    np.testing.assert_allclose(probabilities, predict_probabilities(model, images), atol=1e-6)
    from_features = keras.ops.softmax(model.get_layer("logits")(features), axis=-1)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(from_features), probabilities, atol=1e-6)
    mirrored, _ = penultimate_features(model, images[:, :, ::-1], batch_size=16)
    # With test-time flips an image and its mirror are the same two views, so
    # the same features; without, a mirror is another picture.
    flips = any(layer.name == "flip_views" for layer in model.layers)
    assert flips == (preset_name in ("fast", "best") and dataset == "fashion_mnist")
    assert np.allclose(mirrored, features, atol=1e-5) == flips


def test_sprite_sheet_puts_image_i_at_row_i_over_columns_and_column_i_mod_columns():
    images = np.arange(11 * 28 * 28, dtype=np.int64).reshape(11, 28, 28, 1) % 251
    sheet = sprite_sheet(images.astype(np.uint8))
    assert sheet.shape == (3 * 28, 4 * 28)  # ceil(sqrt(11)) = 4 columns, 3 rows.
    for index in range(11):
        row, column = divmod(index, 4)
        assert np.array_equal(sheet[row * 28:(row + 1) * 28, column * 28:(column + 1) * 28], images[index, ..., 0])
    assert not sheet[2 * 28:, 3 * 28:].any()  # The unused cell is black.


def test_metadata_names_true_and_predicted_class_correctness_and_confidence():
    probabilities = np.full((2, 10), 0.05)
    probabilities[0, 4], probabilities[1, 6] = 0.55, 0.55
    table = metadata_table(np.array([17, 42]), np.array([4, 4]), probabilities, FASHION_NAMES).splitlines()
    assert table == [METADATA_HEADER, "17\tcoat\tcoat\tyes\t0.5500", "42\tcoat\tshirt\tno\t0.5500"]


@pytest.fixture(scope="module")
def projector_run(tmp_path_factory, fashion_mnist_dir):
    """The fast Fashion-MNIST preset (whitened first layer, batch norm, test-time
    flips), trained briefly on 2,000 real images and tested on all 10,000; the
    image dashboards after each of its 2 epochs."""
    from lenet_tf.data import load_idx_dir
    from lenet_tf.train import train_and_evaluate

    root = tmp_path_factory.mktemp("projector")
    datasets = load_idx_dir(fashion_mnist_dir).limited(2000, None)
    config = dataclasses.replace(preset("fast"), epochs=2, image_every_epochs=1, export_formats=(),
                                 run_dir=str(root / "runs" / "fast"))
    metrics = train_and_evaluate(config, datasets=datasets)
    return config, metrics, datasets, root


def test_the_run_writes_the_projector_files_of_its_final_model(projector_run):
    config, _, datasets, _ = projector_run
    folder = Path(config.run_dir) / "logs" / PROJECTOR_DIR
    assert sorted(path.name for path in folder.parent.iterdir()) == [PROJECTOR_DIR.name]  # Nothing left staged.
    sample = balanced_sample(datasets.test_labels)
    features = np.loadtxt(folder / "features.tsv", delimiter="\t")
    assert features.shape == (2000, 96)  # The fast preset's one dense layer of 96.
    rows = [line.split("\t") for line in (folder / "metadata.tsv").read_text().splitlines()]
    assert "\t".join(rows[0]) == METADATA_HEADER and len(rows) == 2001
    assert [int(row[0]) for row in rows[1:]] == sample.tolist()
    assert [row[1] for row in rows[1:]] == [FASHION_NAMES[label] for label in datasets.test_labels[sample]]
    # The final model's answers: the checkpoint of the last epoch predicts them.
    model = keras.saving.load_model(Path(config.run_dir) / "checkpoints" / "last.keras")
    probabilities = predict_probabilities(model, datasets.test_images[sample])
    assert [row[2] for row in rows[1:]] == [FASHION_NAMES[label] for label in probabilities.argmax(axis=1)]
    assert [row[3] for row in rows[1:]] == ["yes" if row[1] == row[2] else "no" for row in rows[1:]]
    np.testing.assert_allclose([float(row[4]) for row in rows[1:]], probabilities.max(axis=1), atol=1e-4)
    sprite = tf.io.decode_png((folder / "sprite.png").read_bytes()).numpy()[..., 0]
    assert np.array_equal(sprite_sheet(datasets.test_images[sample]), sprite)


def test_pr_curves_one_tag_per_class_every_image_dashboard_epoch(projector_run):
    config, _, datasets, _ = projector_run
    accumulator = read_event_tags(Path(config.run_dir) / "logs" / "images")
    tags = [tag for tag in accumulator.Tags()["tensors"]
            if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "pr_curves"]
    assert sorted(tags) == sorted(f"pr_curves/{name}" for name in FASHION_NAMES)
    for label, name in enumerate(FASHION_NAMES):
        events = accumulator.Tensors(f"pr_curves/{name}")
        assert [event.step for event in events] == [0, 1]  # Each epoch; the end wrote no second copy.
        true_positives, false_positives, _, false_negatives, precision, recall = tf.make_ndarray(events[-1].tensor_proto)
        # At threshold 0 every test image counts as this class.
        assert true_positives[0] == np.sum(datasets.test_labels == label) and false_negatives[0] == 0
        assert true_positives[0] + false_positives[0] == len(datasets.test_labels) and recall[0] == 1


def test_a_rewrite_replaces_the_folder_and_a_failed_one_keeps_the_previous(tmp_path):
    keras.utils.set_random_seed(0)
    model = build_model(preset("fast"))
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (30, 28, 28, 1), dtype=np.uint8), np.arange(30) % 10
    folder = write_projector(tmp_path, model, images, labels, FASHION_NAMES)
    assert (folder / "projector_config.pbtxt").is_file()
    folder = write_projector(tmp_path, model, images[:20], labels[:20], FASHION_NAMES)
    assert len(np.loadtxt(folder / "features.tsv", delimiter="\t")) == 20
    with pytest.raises(IndexError):  # Too few class names: fails while writing the metadata.
        write_projector(tmp_path, model, images, labels, FASHION_NAMES[:5])
    assert len(np.loadtxt(folder / "features.tsv", delimiter="\t")) == 20
    assert [path.name for path in folder.parent.iterdir()] == [PROJECTOR_DIR.name]


@pytest.fixture(scope="module")
def served(projector_run):
    """A real TensorBoard server (`lenet-tf tensorboard`) over the projector run."""
    _, _, _, root = projector_run
    # The Projector decides that it is active in a thread of its own: ask until it says so.
    with tensorboard_server(root / "runs", lambda base: _get(base, "/data/plugins_listing")["projector"]["enabled"]) \
            as base:
        yield base


def _get(base: str, path: str, raw: bool = False):
    return http_get(base + path, raw=raw)


@pytest.mark.slow
def test_real_tensorboard_serves_the_projector_and_the_pr_curves(served):
    base = served
    listing = _get(base, "/data/plugins_listing")
    assert listing["projector"]["enabled"] and listing["pr_curves"]["enabled"]
    assert _get(base, "/data/plugin/projector/runs") == ["fast/logs"]
    embedding, = _get(base, "/data/plugin/projector/info?run=fast/logs")["embeddings"]
    assert embedding["tensorName"] == TENSOR_NAME
    assert embedding["tensorShape"] == [2000, 96]
    assert embedding["sprite"]["singleImageDim"] == [28, 28]
    query = urllib.parse.urlencode({"run": "fast/logs", "name": TENSOR_NAME})
    metadata = _get(base, f"/data/plugin/projector/metadata?{query}", raw=True).decode().splitlines()
    assert metadata[0] == METADATA_HEADER and len(metadata) == 2001
    assert {line.split("\t")[1] for line in metadata[1:]} == set(FASHION_NAMES)
    tensor = np.frombuffer(_get(base, f"/data/plugin/projector/tensor?{query}", raw=True), np.float32)
    assert tensor.size == 2000 * 96
    sprite = _get(base, f"/data/plugin/projector/sprite_image?{query}", raw=True)
    assert tf.io.decode_png(sprite).shape == (45 * 28, 45 * 28, 1)  # ceil(sqrt(2000)) = 45 columns.
    tags = _get(base, "/data/plugin/pr_curves/tags")
    assert sorted(tags["fast/logs/images"]) == sorted(f"pr_curves/{name}" for name in FASHION_NAMES)


@pytest.mark.slow
@pytest.mark.skipif(missing_chromium() is not None, reason=str(missing_chromium()))
def test_a_browser_shows_the_projector_with_a_search_for_coat_and_the_pr_curves(served, tmp_path):
    """Screenshots land in the test's folder; docs/images/ keeps a copy of each."""
    from playwright.sync_api import sync_playwright

    base = served
    errors = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
            page.on("console", lambda message: errors.append(f"console error: {message.text}")
                    if message.type == "error" else None)
            page.goto(f"{base}/#projector")
            # The Projector runs in an iframe inside TensorBoard's plugin iframe.
            projector = page.frame_locator("iframe").frame_locator("iframe")
            projector.get_by_text("Points: 2000").wait_for(timeout=60_000)
            projector.get_by_text("Dimension: 96").wait_for(timeout=10_000)
            projector.locator("vz-projector-inspector-panel vz-projector-input input").fill("coat")
            projector.get_by_text("200 matches").wait_for(timeout=30_000)  # 200 coats in the sample.
            page.screenshot(path=str(tmp_path / "tensorboard-projector.png"))
            page.goto(f"{base}/#pr_curves")
            page.get_by_text("tag: pr_curves/coat").first.wait_for(timeout=60_000)
            assert page.get_by_text("tag: pr_curves/").count() == 10
            page.screenshot(path=str(tmp_path / "tensorboard-pr-curves.png"))
        finally:
            browser.close()
    assert errors == []
    for name in ("tensorboard-projector.png", "tensorboard-pr-curves.png"):
        picture = tf.io.decode_png((tmp_path / name).read_bytes()).numpy()
        assert picture.shape[:2] == (800, 1280) and picture[..., :3].std() > 20, name
