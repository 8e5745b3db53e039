"""The snippets of docs/loading-exports.md, run as a user runs them.

Each Python snippet runs as it is written, in a fresh process, in a folder
holding a freshly exported model where the page says it is
(exports/lenet_fashion_mnist/1) and the two pictures it reads; what it prints
must be the package's own answers for the same images. TF Serving itself
cannot run here (no Docker image offline), so its commands are checked for
what they rely on: the folder layout TF Serving loads, and the request body
fed to the SavedModel's signature the way TF Serving's REST API feeds it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT

# One worker runs this module (pyproject.toml's -n): its tests share the models it trains once.
pytestmark = pytest.mark.xdist_group("docs")

PAGE = REPO_ROOT / "docs" / "loading-exports.md"
MODEL_NAME = "lenet_fashion_mnist"
# The two pictures the snippets read: the first test image of each class.
PICTURES = {"ankle_boot.png": 9, "shirt.png": 6}
PRINTED_LINE = re.compile(r"^(\S+): (.+) \((\d\.\d{4})\)$")


def snippets() -> dict[str, tuple[str, str]]:
    """The page's tested blocks: name -> (language, code), from `<!-- tested: NAME -->` markers."""
    found = re.findall(r"<!-- tested: (\w+) -->\n```(\w+)\n(.*?)\n```", PAGE.read_text(), flags=re.DOTALL)
    return {name: (language, code) for name, language, code in found}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_real_datasets, fashion_mnist_dir):
    """A user's folder: an export version where the page puts it, and the two pictures."""
    from PIL import Image

    from lenet_tf.config import TrainConfig
    from lenet_tf.train import train_and_evaluate

    folder = tmp_path_factory.mktemp("user")
    config = TrainConfig(
        dataset="fashion_mnist", epochs=1, batch_size=64, activation="relu", learning_rate=0.1,
        data_dir=str(fashion_mnist_dir), limit_train=2000, limit_test=500,
        run_dir=str(folder / "run"), export_dir=str(folder / "exports"),
        export_formats=("saved_model", "tflite", "tflite-int8", "onnx"),
    )
    metrics = train_and_evaluate(config, datasets=small_real_datasets)
    assert Path(metrics["export_version_dir"]) == folder / "exports" / MODEL_NAME / "1"
    images = []
    for name, label in PICTURES.items():
        image = small_real_datasets.test_images[np.flatnonzero(small_real_datasets.test_labels == label)[0]]
        Image.fromarray(image.reshape(28, 28)).save(folder / name)
        images.append(image.reshape(28, 28, 1))
    return folder, np.stack(images)


def expected_answers(model_path: Path, images: np.ndarray) -> list[tuple[str, float]]:
    """(class name, its probability) for each image, through the package's own loader."""
    from lenet_tf.inference import load_predictor
    from lenet_tf.registry import dataset_info

    probabilities = load_predictor(model_path, verify=False).predict(images)
    class_names = dataset_info("fashion_mnist").class_names
    return [(class_names[int(np.argmax(row))], float(np.max(row))) for row in probabilities]


def run_snippet(code: str, folder: Path) -> str:
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", code], cwd=folder, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def printed_answers(stdout: str) -> list[tuple[str, str, float]]:
    matches = [PRINTED_LINE.match(line) for line in stdout.splitlines()]
    assert all(matches) and matches, f"unexpected output:\n{stdout}"
    return [(match[1], match[2], float(match[3])) for match in matches]


def test_the_page_marks_every_snippet_this_file_checks():
    languages = {name: language for name, (language, _) in snippets().items()}
    assert languages == {"saved_model": "python", "tflite": "python", "onnx": "python",
                         "serving_docker": "bash", "serving_request": "python", "serving_curl": "bash"}


@pytest.mark.parametrize("snippet, model_file, reference", [
    # The float formats answer as Keras does; the int8 file as the package's own int8 loader does.
    ("saved_model", ".", "run/checkpoints/last.keras"),
    ("onnx", "lenet.onnx", "run/checkpoints/last.keras"),
    ("tflite", "lenet.int8.tflite", "exports/lenet_fashion_mnist/1/lenet.int8.tflite"),
    # What the page opens: the file the default formats write, whose scale is 0.
    ("tflite", "lenet.float32.tflite", "run/checkpoints/last.keras"),
])
def test_snippet_prints_the_packages_answers(exported, snippet, model_file, reference):
    folder, images = exported
    _, code = snippets()[snippet]
    if model_file.endswith(".tflite"):
        # The page opens the file the default `python train.py` writes, and says the int8 one runs the same.
        assert 'lenet.float32.tflite")  # or lenet.int8.tflite' in code
        code = code.replace("lenet.float32.tflite", model_file)
    assert model_file == "." or model_file in code
    printed = printed_answers(run_snippet(code, folder))
    expected = expected_answers(folder / reference, images)
    assert [file for file, _, _ in printed] == list(PICTURES)
    for (_, class_name, probability), (expected_name, expected_probability) in zip(printed, expected):
        assert class_name == expected_name
        # Printed to 4 decimals; the float formats agree with Keras within 1e-4 (the export's bound).
        assert probability == pytest.approx(expected_probability, abs=1.5e-4)


def test_docker_command_mounts_a_folder_in_the_layout_tf_serving_loads(exported):
    folder, _ = exported
    docker = snippets()["serving_docker"][1]
    curl = snippets()["serving_curl"][1]
    host, container = re.search(r'-v "\$PWD/([^:"]+):([^"]+)"', docker).groups()
    model_name = re.search(r"-e MODEL_NAME=(\S+)", docker)[1]
    # TF Serving's image serves /models/$MODEL_NAME (its model_base_path).
    assert container == f"/models/{model_name}" and model_name == MODEL_NAME
    assert f"/v1/models/{model_name}:predict" in curl and "-d @request.json" in curl
    versions = [child for child in (folder / host).iterdir() if child.is_dir()]
    assert [child.name for child in versions] == ["1"]
    assert (versions[0] / "saved_model.pb").is_file()
    assert (versions[0] / "variables" / "variables.index").is_file()
    assert not list((folder / host).glob(".*")), "a hidden folder there would be a version TF Serving skips"


def rest_predict(version_dir: Path, body: dict) -> dict:
    """What TF Serving's REST API answers for `body`: its row ("instances") and
    column ("inputs") forms mapped onto the signature's single input, as its
    documentation specifies."""
    import tensorflow as tf

    signature = tf.saved_model.load(str(version_dir)).signatures[body.get("signature_name", "serving_default")]
    (input_name, spec), = signature.structured_input_signature[1].items()
    rows = body["instances"] if "instances" in body else body["inputs"]
    if rows and isinstance(rows[0], dict):
        rows = [row[input_name] for row in rows]
    outputs = {name: value.numpy().tolist() for name, value in signature(**{
        input_name: tf.constant(np.asarray(rows), spec.dtype)}).items()}
    if "instances" in body:
        return {"predictions": [{name: outputs[name][index] for name in outputs} for index in range(len(rows))]}
    return {"outputs": outputs}


def test_rest_body_through_the_signature_gives_the_documented_outputs(exported):
    folder, images = exported
    run_snippet(snippets()["serving_request"][1], folder)
    body = json.loads((folder / "request.json").read_text())
    assert list(body) == ["instances"] and np.array_equal(np.asarray(body["instances"], np.uint8), images)
    version_dir = folder / "exports" / MODEL_NAME / "1"
    expected = expected_answers(folder / "run" / "checkpoints" / "last.keras", images)
    from lenet_tf.registry import dataset_info

    class_names = dataset_info("fashion_mnist").class_names
    page = " ".join(PAGE.read_text().split())
    rows = rest_predict(version_dir, body)
    assert list(rows) == ["predictions"] and len(rows["predictions"]) == len(PICTURES)
    columns = rest_predict(version_dir, {"inputs": body["instances"]})
    for index, prediction in enumerate(rows["predictions"]):
        assert sorted(prediction) == ["class_id", "logits", "probabilities"]
        assert class_names[prediction["class_id"]] == expected[index][0]
        assert prediction["probabilities"][prediction["class_id"]] == pytest.approx(expected[index][1], abs=1e-4)
    assert sorted(columns["outputs"]) == ["class_id", "logits", "probabilities"]
    assert columns["outputs"]["class_id"] == [prediction["class_id"] for prediction in rows["predictions"]]
    # The page shows both answers' shapes with these keys.
    assert '{"predictions": [{"probabilities": [...], "class_id": 9, "logits": [...]}, ...]}' in page
    assert '{"outputs": {"probabilities": [...], "class_id": [...], "logits": [...]}}' in page
