"""The exported model as a static web page: draw or drop an image, see the prediction and the activations.

`--format web` writes `<version>/web/`:

    index.html, app.js, style.css    the page (from lenet_tf/web/)
    lenet.web.onnx                   the model: probabilities (as the serving signature's)
                                     plus the conv1 and conv2 activation maps
    model.json                       class names and the preprocessing constants
    ort.wasm.min.mjs, ort-wasm-*     onnxruntime-web's WebAssembly runtime

The page runs the model in the browser (no server-side inference) with
onnxruntime-web, single-threaded so that any static file server will do, and
frames pictures exactly as `lenet-tf predict` does (lenet_tf.images), reading
the constants from model.json. Its parity with Python is proven at export
time for the model file (in the fresh-process parity check, like every
format) and in the test suite for the page itself, in a real browser.

This module is the page and its server, without TensorFlow, so that
`lenet-tf serve-web` starts at once; lenet_tf.export writes the page's model
and then calls `write_page`.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import sys
from pathlib import Path

from lenet_tf.errors import UsageError
from lenet_tf.images import MAX_FILE_BYTES, MAX_PIXELS, framing_constants
from lenet_tf.inference import INPUT_KEY, latest_version_dir, verify_model_files
from lenet_tf.io_utils import write_json_atomic
from lenet_tf.registry import DatasetInfo, dataset_info

WEB_DIR = "web"
WEB_MODEL_FILE = "lenet.web.onnx"
PAGE_FILES = ("index.html", "app.js", "preprocess.js", "style.css")
# onnxruntime-web's WebAssembly build: the ES module, its loader and the binary.
RUNTIME_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
RUNTIME_ENV = "LENET_TF_WEB_RUNTIME"
# Where `npm ci --prefix web` puts the runtime in a checkout of this project.
CHECKOUT_RUNTIME = Path(__file__).resolve().parent.parent / "web" / "node_modules" / "onnxruntime-web" / "dist"


def runtime_dir() -> Path:
    """The folder holding onnxruntime-web's files, or a UsageError saying how to install them."""
    # A folder the user names is the only one looked at: a stale copy elsewhere must not stand in for it.
    candidates = [Path(os.environ[RUNTIME_ENV])] if os.environ.get(RUNTIME_ENV) else [CHECKOUT_RUNTIME]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in RUNTIME_FILES):
            return candidate
    raise UsageError(
        f"--format web needs onnxruntime-web's files ({', '.join(RUNTIME_FILES)}): run `npm ci --prefix web` in "
        f"the lenet_tf checkout, or set {RUNTIME_ENV} to a folder holding them"
    )


def write_page(web_dir: Path, dataset: str | DatasetInfo, runtime: Path) -> None:
    """Writes the page's files, the runtime's and model.json (the class names and framing of `dataset`,
    a built-in's name or a DatasetInfo) into `web_dir`, which holds the page's model."""
    pages = Path(__file__).resolve().parent / "web"
    for name in PAGE_FILES:
        shutil.copyfile(pages / name, web_dir / name)
    for name in RUNTIME_FILES:
        shutil.copyfile(runtime / name, web_dir / name)
    info = dataset_info(dataset)
    write_json_atomic(web_dir / "model.json", {
        "dataset": info.name,
        "class_names": list(info.class_names),
        "model_file": WEB_MODEL_FILE,
        "input_name": INPUT_KEY,
        "preprocessing": {**framing_constants(info), "max_file_bytes": MAX_FILE_BYTES, "max_pixels": MAX_PIXELS},
    })


class _Handler(http.server.SimpleHTTPRequestHandler):
    # The WebAssembly runtime must arrive as application/wasm to be compiled while it streams in.
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
                      ".onnx": "application/octet-stream", ".json": "application/json"}

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature.
        pass  # One line per request would drown the URL the user needs.


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A browser that leaves mid-response (a closed tab, a cancelled
        # fetch) breaks the connection: nothing went wrong here, so no
        # traceback in the terminal. Anything else is printed as before.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def web_dir_of(model_dir: str | Path, verify: bool = True) -> Path:
    """The web/ folder of an export version (or of a model folder's newest version), verified against its card."""
    model_dir = Path(model_dir)
    version = model_dir if (model_dir / WEB_DIR).is_dir() else latest_version_dir(model_dir)
    if version is None or not (version / WEB_DIR / "index.html").is_file():
        raise UsageError(f"{model_dir} has no web page; export one with `lenet-tf export --run-dir RUN --format "
                         "saved_model,web` and pass its version folder")
    if verify:
        for path in sorted((version / WEB_DIR).iterdir()):
            verify_model_files(path)
    return version / WEB_DIR


def make_server(web_dir: Path, host: str = "127.0.0.1", port: int = 8000) -> http.server.ThreadingHTTPServer:
    """An HTTP server for the page (port 0 picks a free one)."""
    handler = functools.partial(_Handler, directory=str(web_dir))
    try:
        return _Server((host, port), handler)
    except OSError as error:
        raise UsageError(f"cannot serve on {host}:{port}: {error.strerror}; pass --port 0 to pick a free port, "
                         "or choose another --port") from None
