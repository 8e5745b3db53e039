"""`lenet-tf predict` on real image files the tests write: PNG, JPEG, colour, odd sizes, broken files."""

import json

import numpy as np
import pytest
from PIL import Image

from lenet_tf.errors import UsageError
from lenet_tf.images import frame, load_image
from lenet_tf.registry import dataset_info

from conftest import run_main

# One worker runs this module (pyproject.toml's -n): its tests share the models it trains once.
pytestmark = pytest.mark.xdist_group("predict")


@pytest.fixture(scope="module")
def fashion_model(tmp_path_factory, fashion_mnist_dir):
    """A quick Fashion-MNIST model: 2 epochs of a ReLU LeNet on 10,000 real images."""
    from lenet_tf.config import TrainConfig
    from lenet_tf.data import load_datasets
    from lenet_tf.train import train_and_evaluate

    root = tmp_path_factory.mktemp("predict")
    datasets = load_datasets("fashion_mnist").limited(10_000, 1000)
    config = TrainConfig(epochs=2, batch_size=32, activation="relu", learning_rate=0.1,
                         run_dir=str(root / "run"), export_dir=str(root / "exports"))
    metrics = train_and_evaluate(config, datasets=datasets)
    return metrics, datasets


def _write_test_images(directory, datasets):
    """Real test images, written the ways users' files come: big, colour, dark-on-light, JPEG."""
    files = {}
    for index in range(6):
        image, label = datasets.test_images[index, ..., 0], int(datasets.test_labels[index])
        big = Image.fromarray(image).resize((113, 113), Image.Resampling.BICUBIC)
        if index % 3 == 0:
            path = directory / f"grey_{index}.png"
            big.save(path)
        elif index % 3 == 1:
            # A colour photo of a dark object on a white background, odd size.
            inverted = Image.fromarray(255 - np.asarray(big)).resize((97, 131))
            path = directory / f"colour_{index}.jpg"
            Image.merge("RGB", [inverted, inverted, inverted]).save(path, quality=95)
        else:
            rgba = big.convert("RGBA")
            path = directory / f"alpha_{index}.png"
            rgba.save(path)
        files[path] = label
    return files


def test_predict_json_lines_on_png_and_jpeg(fashion_model, tmp_path):
    metrics, datasets = fashion_model
    files = _write_test_images(tmp_path, datasets)
    completed = run_main("predict", "--model", metrics["exports"]["float32"], "--json", *map(str, files))
    assert completed.returncode == 0, completed.stderr[-3000:]
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(path) for path in files]
    for line in lines:
        assert set(line) == {"file", "class_id", "class_name", "probability", "top"}
        assert len(line["top"]) == 3 and line["top"][0]["class_id"] == line["class_id"]
        assert line["class_name"] == dataset_info("fashion_mnist").class_names[line["class_id"]]
    # Each line is the model's answer for its own file: what the package's
    # loader and predictor give for that file. (How well re-framed pictures are
    # recognised: test_dataset_images_saved_as_files_get_the_arrays_answers.)
    from lenet_tf.images import load_image
    from lenet_tf.inference import load_predictor

    expected = load_predictor(metrics["exports"]["float32"]).predict(np.stack([load_image(path) for path in files]))
    assert [line["class_id"] for line in lines] == expected.argmax(axis=1).tolist()
    assert [line["probability"] for line in lines] == pytest.approx(expected.max(axis=1).tolist(), abs=1e-6)


def test_broken_files_get_one_line_each_and_the_others_still_run(fashion_model, tmp_path):
    metrics, datasets = fashion_model
    good = tmp_path / "good.png"
    Image.fromarray(datasets.test_images[0, ..., 0]).save(good)
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a picture")
    truncated = tmp_path / "truncated.jpg"
    Image.fromarray(datasets.test_images[1, ..., 0]).resize((300, 300)).save(tmp_path / "full.jpg")
    truncated.write_bytes((tmp_path / "full.jpg").read_bytes()[:400])
    missing = tmp_path / "missing.png"
    folder = tmp_path / "pictures"
    folder.mkdir()
    completed = run_main("predict", "--model", metrics["exports"]["saved_model"], "--json",
                         str(not_image), str(good), str(truncated), str(missing), str(folder))
    assert completed.returncode == 2
    assert [json.loads(line)["file"] for line in completed.stdout.splitlines()] == [str(good)]
    errors = [line for line in completed.stderr.splitlines() if line.startswith("lenet-tf predict: error:")]
    assert len(errors) == 4
    assert "notes.png: not an image" in errors[0]
    assert "truncated.jpg" in errors[1]
    assert "missing.png" in errors[2]
    assert "pictures: is a folder" in errors[3]
    assert "Traceback" not in completed.stderr


def test_a_dataset_other_than_the_models_is_one_line(fashion_model, tmp_path):
    metrics, datasets = fashion_model
    good = tmp_path / "good.png"
    Image.fromarray(datasets.test_images[0, ..., 0]).save(good)
    completed = run_main("predict", "--model", metrics["exports"]["float32"], "--dataset", "mnist", str(good))
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert "--dataset mnist does not match the model, which was trained on fashion_mnist" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_absurdly_large_image_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (8000, 8000)).save(path)  # 64 megapixels, above the 50 MP limit.
    with pytest.raises(UsageError, match="pixel limit"):
        load_image(path)


def test_framing_matches_the_dataset_look():
    # A dark-on-light, off-centre, non-square object.
    canvas = np.full((200, 300), 255, np.float32)
    canvas[20:120, 40:90] = 0
    image = Image.fromarray(canvas.astype(np.uint8))
    grey = 255 - np.asarray(image, np.float32)
    framed = frame(grey, dataset_info("fashion_mnist").framing)
    rows, columns = np.nonzero(framed > 25)
    assert rows.min() == 0 and rows.max() == 27  # The longer side fills the frame.
    assert abs((columns.min() + columns.max()) / 2 - 13.5) <= 1  # Centred horizontally.
    assert framed[0, 0] == 0  # Background is black.


def test_invert_auto_detects_dark_on_light(tmp_path):
    light = np.zeros((40, 40), np.uint8)
    light[10:30, 10:30] = 255
    Image.fromarray(light).save(tmp_path / "light.png")
    Image.fromarray(255 - light).save(tmp_path / "dark.png")
    a = load_image(tmp_path / "light.png")
    b = load_image(tmp_path / "dark.png")
    np.testing.assert_array_equal(a, b)
    assert a.shape == (28, 28, 1) and a.dtype == np.uint8 and a.max() == 255


def _reframed_copies(image: np.ndarray, index: int) -> dict[str, Image.Image]:
    """One real 28x28 test image, re-framed the ways users' files differ from the dataset."""
    rng = np.random.default_rng(index)
    padded = np.zeros((72, 72), np.uint8)
    top, left = rng.integers(0, 44, 2)
    padded[top:top + 28, left:left + 28] = image
    shifted = np.zeros((28, 28), np.uint8)
    shifted[4:, 3:] = image[:24, :25]  # Off-centre by several pixels, on the dataset's own canvas.
    return {
        "png": Image.fromarray(image),
        "padded": Image.fromarray(padded),
        "scaled up": Image.fromarray(image).resize((112, 112), Image.Resampling.BICUBIC),
        "shifted": Image.fromarray(shifted),
        "dark on light": Image.fromarray(255 - image),
        "jpeg": Image.fromarray(image).resize((84, 84), Image.Resampling.BICUBIC),
    }


def _answers_by_kind(model_path: str, images, dataset: str, directory) -> tuple[dict, dict]:
    """Writes every copy of every image as a file, runs `lenet-tf predict` on all of them
    in one process, and returns, per kind, the files and the answers."""
    paths, kinds = [], []
    for index, image in enumerate(images):
        for kind, picture in _reframed_copies(image[..., 0], index).items():
            path = directory / f"{index}_{kind.replace(' ', '_')}.{'jpg' if kind == 'jpeg' else 'png'}"
            picture.save(path, **({"quality": 90} if kind == "jpeg" else {}))
            paths.append(str(path))
            kinds.append(kind)
    completed = run_main("predict", "--model", model_path, "--dataset", dataset, "--json", *paths)
    assert completed.returncode == 0, completed.stderr[-3000:]
    predicted = np.array([json.loads(line)["class_id"] for line in completed.stdout.splitlines()])
    kinds, paths = np.array(kinds), np.array(paths)
    return ({kind: list(paths[kinds == kind]) for kind in dict.fromkeys(kinds)},
            {kind: predicted[kinds == kind] for kind in dict.fromkeys(kinds)})


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_dataset_images_saved_as_files_get_the_arrays_answers(dataset, fashion_model, tmp_path, request):
    """200 real test images: as PNG files, and inverted, they get the arrays'
    answers; padded with black, the answers for the image framed by the recipe;
    re-framed every way (padded, scaled up, shifted, inverted, JPEG), each
    file's input is framed as the dataset frames its objects, and most answers stay."""
    from lenet_tf.images import is_framed
    from lenet_tf.inference import load_predictor

    if dataset == "fashion_mnist":
        metrics, datasets = fashion_model
        model_path = metrics["exports"]["float32"]
    else:
        from lenet_tf.config import TrainConfig
        from lenet_tf.train import train_and_evaluate

        datasets = request.getfixturevalue("mnist_datasets").limited(10_000, 1000)
        metrics = train_and_evaluate(TrainConfig(dataset="mnist", epochs=2, batch_size=32, activation="relu",
                                                 learning_rate=0.1, run_dir=str(tmp_path / "run"),
                                                 export_dir=str(tmp_path / "exports"), image_every_epochs=0),
                                     datasets=datasets)
        model_path = metrics["exports"]["float32"]
    images = datasets.test_images[:200]
    framing = dataset_info(dataset).framing
    predictor = load_predictor(model_path)
    on_arrays = predictor.predict(images).argmax(axis=1)
    files, answers = _answers_by_kind(model_path, images, dataset, tmp_path)
    agreement = {kind: float((predicted == on_arrays).mean()) for kind, predicted in answers.items()}
    print(f"{dataset}: agreement with the arrays' answers " + ", ".join(f"{k} {v:.3f}" for k, v in agreement.items()))
    # Exact, on any CPU: the dataset's images are framed already, so a PNG copy
    # and an inverted one come back as the very same input.
    np.testing.assert_array_equal(answers["png"], on_arrays)
    np.testing.assert_array_equal(answers["dark on light"], on_arrays)
    # A black margin changes nothing: the recipe crops to the object first.
    on_framed = predictor.predict(np.stack([frame(image[..., 0], framing) for image in images])[..., None])
    np.testing.assert_array_equal(answers["padded"], on_framed.argmax(axis=1))
    for kind, paths in files.items():
        assert all(is_framed(load_image(path, dataset)[..., 0], framing) for path in paths), kind
    # What resampling, JPEG and a cut-off edge change is the model's to weigh:
    # the bounds are far below the agreement measured over seeds 0-2 of each
    # dataset on AMD EPYC (scaled up and JPEG 0.91 or more, shifted 0.76 or more).
    assert min(agreement["scaled up"], agreement["jpeg"]) >= 0.8, agreement
    assert agreement["shifted"] >= 0.6, agreement
