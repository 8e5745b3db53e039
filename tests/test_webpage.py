"""The exported web page in a real browser (Debian's Chromium, driven by Playwright): the
page's answers against Python's, its preprocessing against `lenet-tf predict`'s, drawing,
bad files; and the export and server around it."""

import json
import os
import shutil
import socket
import struct
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lenet_tf.images import load_image
from lenet_tf.registry import dataset_info

from conftest import CHROMIUM, CHROMIUM_ARGS, missing_chromium, run_main


def _missing_browser() -> str | None:
    missing = missing_chromium()
    if missing is not None:
        return missing
    from lenet_tf.errors import UsageError
    from lenet_tf.webpage import runtime_dir

    try:
        runtime_dir()
    except UsageError as error:
        return str(error)
    return None


pytestmark = [
    pytest.mark.skipif(_missing_browser() is not None, reason=str(_missing_browser())),
    # One worker runs this module (pyproject.toml's -n): its tests share the model it trains once.
    pytest.mark.xdist_group("webpage"),
]


@pytest.fixture(scope="module")
def web_export(tmp_path_factory, fashion_mnist_dir):
    """A classic LeNet trained briefly on real Fashion-MNIST, exported with its web page.

    With flip test-time augmentation, as the fast Fashion-MNIST model has
    it: the page must then give the mirror-averaged answers and one image's
    maps; and with a crop inside the model, as the fast MNIST model has it."""
    from lenet_tf.config import TrainConfig
    from lenet_tf.data import load_datasets
    from lenet_tf.train import train_and_evaluate

    root = tmp_path_factory.mktemp("web")
    datasets = load_datasets("fashion_mnist").limited(10_000, 1000)
    config = TrainConfig(epochs=2, batch_size=64, activation="relu", learning_rate=0.1, image_every_epochs=0,
                         run_dir=str(root / "run"), export_dir=str(root / "exports"),
                         export_formats=("saved_model", "web"), test_time_flip=True, crop=1)
    metrics = train_and_evaluate(config, datasets=datasets)
    return Path(metrics["export_version_dir"]), datasets


@pytest.fixture(scope="module")
def server(web_export):
    from lenet_tf.webpage import make_server, web_dir_of

    version, _ = web_export
    httpd = make_server(web_dir_of(version), port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):
    """The page, loaded; every console error or uncaught exception fails the test."""
    page = browser.new_page()
    problems = []
    page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
            if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.goto(server)
    assert page.evaluate("window.lenet.ready") is True
    yield page
    page.close()
    assert not problems, problems


def test_the_page_gives_pythons_answers_on_real_test_images(page, web_export):
    import onnxruntime

    version, datasets = web_export
    images = datasets.test_images[:200]
    in_browser = np.array(page.evaluate(
        """async (batch) => {
            const out = [];
            for (const pixels of batch) out.push((await window.lenet.classify(pixels)).probabilities);
            return out;
        }""", images.reshape(200, -1).tolist()), np.float32)
    session = onnxruntime.InferenceSession(str(version / "web" / "lenet.web.onnx"), providers=["CPUExecutionProvider"])
    in_python = session.run(["probabilities"], {"image": images})[0]
    import keras

    from lenet_tf.model import predict_probabilities
    from lenet_tf.run_dir import RunDir

    in_keras = predict_probabilities(keras.models.load_model(RunDir(version.parent.parent.parent / "run").checkpoint),
                                     images)
    for reference in (in_python, in_keras):
        assert np.abs(in_browser - reference).max() <= 1e-4
        assert (in_browser.argmax(axis=1) == reference.argmax(axis=1)).all()


def _picture_files(directory: Path, datasets) -> list[Path]:
    """Real test images saved the ways users' files come: as they are, bigger, padded,
    shifted, dark-on-light, grey and colour, PNG and JPEG."""
    files = []
    for index in range(12):
        image = datasets.test_images[index, ..., 0]
        kind = index % 6
        if kind == 0:
            picture, name = Image.fromarray(image), f"as_is_{index}.png"
        elif kind == 1:
            picture, name = Image.fromarray(image).resize((97, 97), Image.Resampling.BICUBIC), f"bigger_{index}.png"
        elif kind == 2:
            canvas = np.zeros((64, 80), np.uint8)
            canvas[20:48, 9:37] = image
            picture, name = Image.fromarray(canvas), f"padded_{index}.png"
        elif kind == 3:
            picture = Image.fromarray(255 - image).resize((56, 56), Image.Resampling.BILINEAR)
            name = f"dark_on_light_{index}.png"
        elif kind == 4:
            grey = Image.fromarray(image).resize((84, 84), Image.Resampling.BICUBIC)
            picture, name = Image.merge("RGB", [grey, grey, grey]), f"colour_{index}.png"
        else:
            picture, name = Image.fromarray(255 - image).resize((70, 70)), f"grey_{index}.jpg"
        picture.save(directory / name, **({"quality": 95} if name.endswith(".jpg") else {}))
        files.append(directory / name)
    return files


def test_the_pages_preprocessing_matches_predicts(page, web_export, tmp_path):
    _, datasets = web_export
    for path in _picture_files(tmp_path, datasets):
        before = page.evaluate("window.lenet.updates")
        page.set_input_files("#file", str(path))
        page.wait_for_function(f"window.lenet.updates > {before}")
        in_browser = np.array(page.evaluate("window.lenet.lastInput"), np.int32).reshape(28, 28)
        in_python = load_image(path, "fashion_mnist")[..., 0].astype(np.int32)
        assert np.abs(in_browser - in_python).max() <= 1, path.name
    # A dataset image saved as a file reaches the model pixel for pixel.
    assert np.array_equal(in_browser.shape, (28, 28))


def test_drawing_shows_a_prediction_and_the_activation_maps(page, tmp_path):
    pad = page.locator("#pad").bounding_box()
    page.mouse.move(pad["x"] + 90, pad["y"] + 50)
    page.mouse.down()
    for step in range(25):
        page.mouse.move(pad["x"] + 90 + 4 * step, pad["y"] + 50 + 8 * step)
    page.mouse.up()
    page.wait_for_function("window.lenet.updates > 0")
    rows = page.locator("#predictions li").all_inner_texts()
    names = dataset_info("fashion_mnist").class_names
    assert len(rows) == 5
    shown = [(row.split("\n")[0], float(row.split("\n")[-1].rstrip("%"))) for row in rows]
    assert all(name in names for name, _ in shown)
    assert [percent for _, percent in shown] == sorted((percent for _, percent in shown), reverse=True)
    assert page.locator("#conv1 canvas").count() == 6 and page.locator("#conv2 canvas").count() == 16
    # One image's maps: not the mirrored view's that the model computes beside them.
    sizes = page.evaluate("""async () => {
        const result = await window.lenet.classify(new Array(784).fill(0));
        return ["conv1", "conv2"].map((name) => [result[name].data.length, result[name].dims]);
    }""")
    # The model crops a pixel from each side of the 28x28 image it is given.
    assert sizes == [[26 * 26 * 6, [26, 26, 6]], [9 * 9 * 16, [9, 9, 16]]]
    # No class name appears on the page before the predictions.
    before_predictions = page.evaluate(
        "document.body.innerText.slice(0, document.body.innerText.indexOf(document.querySelector('#predictions').innerText))")
    assert not [name for name in names if name in before_predictions.lower()]
    screenshot = tmp_path / "web-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    if os.environ.get("LENET_TF_SCREENSHOT_DIR"):
        shutil.copyfile(screenshot, Path(os.environ["LENET_TF_SCREENSHOT_DIR"]) / screenshot.name)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_files_get_a_visible_message_and_no_errors(page, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    huge = tmp_path / "huge.png"
    Image.new("L", (8000, 8000)).save(huge)  # 64 megapixels, above the 50 MP limit.
    for path, expected in ((notes, "notes.png: not an image this browser can read"),
                           (huge, "huge.png: 8000x8000 pixels is more than the 50,000,000 pixel limit")):
        page.set_input_files("#file", str(path))
        message = page.locator("#message")
        message.wait_for(state="visible")
        assert message.inner_text().startswith(expected)


def test_the_server_sends_wasm_as_application_wasm(server):
    with urllib.request.urlopen(server + "ort-wasm-simd-threaded.wasm", timeout=10) as response:
        assert response.headers["Content-Type"] == "application/wasm"
    with urllib.request.urlopen(server + "model.json", timeout=10) as response:
        constants = json.loads(response.read())
    assert constants["class_names"] == list(dataset_info("fashion_mnist").class_names)
    assert constants["preprocessing"]["longest_side"] == 28


def test_serve_web_refuses_a_page_changed_after_export(web_export, tmp_path):
    version, _ = web_export
    copy = tmp_path / "1"
    shutil.copytree(version, copy)
    with open(copy / "web" / "app.js", "a") as script:
        script.write("\n// changed\n")
    completed = run_main("serve-web", "--model-dir", str(copy), "--port", "0")
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "app.js does not match its model card" in completed.stderr.strip().splitlines()[-1]


def test_export_without_the_runtime_files_is_one_line(web_export, tmp_path):
    version, _ = web_export
    completed = run_main("export", "--run-dir", str(version.parent.parent.parent / "run"),
                         "--format", "saved_model,web", "--export-dir", str(tmp_path),
                         env={"LENET_TF_WEB_RUNTIME": str(tmp_path / "empty")})
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    line = completed.stderr.strip().splitlines()[-1]
    assert line.startswith("lenet-tf export: error: --format web needs onnxruntime-web's files")
    assert "npm ci --prefix web" in line
    assert not list(tmp_path.glob("lenet_*"))  # Nothing written.


def test_the_server_says_nothing_when_a_browser_leaves_mid_response(tmp_path, capfd):
    # A closed tab or a cancelled fetch breaks the connection while a file is
    # being sent; `lenet-tf serve-web` printed a traceback for each.
    from lenet_tf.webpage import make_server

    (tmp_path / "large.bin").write_bytes(os.urandom(16 << 20))  # More than the sockets buffer.
    httpd = make_server(tmp_path, port=0)
    httpd.daemon_threads = False  # So that server_close waits for every request's thread.
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", httpd.server_port)) as client:
                client.sendall(b"GET /large.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
                client.recv(1024)  # The response has begun.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # Close with a reset.
        with urllib.request.urlopen(f"http://127.0.0.1:{httpd.server_port}/large.bin", timeout=30) as response:
            assert len(response.read()) == 16 << 20  # It still serves.
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert "Traceback" not in capfd.readouterr().err
