"""Loading any model this package writes and running it on uint8 images.

One entry point, `load_predictor(path)`, for a Keras checkpoint (`.keras`), a
SavedModel folder (a version folder, or a model folder whose newest version is
taken), a `.tflite` file (a micro one runs in TFLM's interpreter) or an
`.onnx` file. Evaluate, predict and the export parity check all go through
it, so they exercise exactly what a user deploys.

An exported version carries a model card (metadata.json) with every file's
SHA-256; files loaded from such a version are checked against it first, so a
file damaged or swapped after the export is refused instead of giving
silently different answers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lenet_tf.errors import UsageError
from lenet_tf.quiet import native_stderr_silenced

SIGNATURE_KEY = "serving_default"
INPUT_KEY = "image"
METADATA_FILE = "metadata.json"
# Before a micro file's path (parity worker arguments): run it on LiteRT rather than TFLM.
LITERT_PREFIX = "litert:"


@dataclass
class Predictor:
    """`predict(images)` maps uint8 (N, 28, 28, 1) images to (N, 10) probabilities."""

    kind: str  # "keras", "saved_model", "tflite", "tflite-micro" or "onnx"
    path: Path
    predict: Callable[[np.ndarray], np.ndarray]


def version_dirs(model_dir: Path) -> list[Path]:
    """A model folder's export versions, oldest first: its integer-named
    subfolders, the rule TF Serving reads them by (and the export numbers them by)."""
    if not model_dir.is_dir():
        return []
    versions = [child for child in model_dir.iterdir() if child.name.isdigit() and child.is_dir()]
    return sorted(versions, key=lambda child: int(child.name))


def latest_version_dir(model_dir: Path) -> Path | None:
    """The newest export version, as TF Serving picks it; None when there is none."""
    versions = version_dirs(model_dir)
    return versions[-1] if versions else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_model_card(path: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The model card of the export version `path` belongs to, and that version's
    folder; None for a model outside an export version (a .keras checkpoint)."""
    path = Path(path)
    if path.is_dir() and not (path / METADATA_FILE).is_file():
        path = latest_version_dir(path) or path
    # A version folder, a file in it, or a file of its web/ page.
    candidates = [path] if path.is_dir() else [path.parent, path.parent.parent]
    for version_dir in candidates:
        try:
            card = json.loads((version_dir / METADATA_FILE).read_text())
        except (OSError, ValueError):
            continue
        return (card, version_dir) if isinstance(card, dict) else None
    return None


def verify_model_files(path: str | Path) -> None:
    """Checks the files that loading `path` reads against its model card's SHA-256s.

    A SavedModel folder is checked as a whole (every file of the card that
    is not one of the other formats); a single file, on its own. Raises
    UsageError naming the first file that differs or is missing.
    """
    found = find_model_card(path)
    if found is None:
        return
    card, version_dir = found
    path = Path(path)
    files = card.get("files", {})
    if path.is_file():
        names = [str(path.resolve().relative_to(version_dir.resolve()))]
        names = [name for name in names if name in files]
    else:
        names = [name for name in files if not name.endswith((".tflite", ".onnx")) and not name.startswith("web/")]
    for name in names:
        file_path = version_dir / name
        expected = files[name]["sha256"]
        if not file_path.is_file():
            raise UsageError(f"{file_path} is listed in the model card {version_dir / METADATA_FILE} but missing; "
                             "re-export the model, or pass --no-verify to load it anyway")
        actual = sha256_of(file_path)
        if actual != expected:
            raise UsageError(
                f"{file_path} does not match its model card {version_dir / METADATA_FILE} (SHA-256 expected "
                f"{expected[:12]}..., actual {actual[:12]}...); the file was changed after export: re-export "
                "the model, or pass --no-verify to load it anyway")


def load_predictor(path: str | Path, batch_size: int = 1024, verify: bool = True,
                   micro_runtime: str = "tflm") -> Predictor:
    """Loads any model this package writes; `verify` checks it against its model card first.

    `micro_runtime`: what runs a micro file (int8 input, batch of 1): "tflm",
    TensorFlow Lite for Microcontrollers' interpreter, the runtime it is made
    for, or "litert", LiteRT's, one picture a call.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"model path {path} does not exist; pass a .keras file, a SavedModel folder or a .tflite file")
    if verify:
        verify_model_files(path)
    if path.is_file() and path.suffix == ".tflite":
        return _tflite_predictor(path, micro_runtime)
    if path.is_file() and path.suffix == ".onnx":
        return _onnx_predictor(path, batch_size)
    if path.is_file() and path.suffix == ".keras":
        return _keras_predictor(path, batch_size)
    if path.is_dir():
        saved_model_dir = path if (path / "saved_model.pb").is_file() else latest_version_dir(path)
        if saved_model_dir is not None and (saved_model_dir / "saved_model.pb").is_file():
            return _saved_model_predictor(saved_model_dir, batch_size)
    raise UsageError(
        f"{path} is not a model this package can load; pass a .keras checkpoint, "
        "a SavedModel folder (or its parent with numbered versions), a .tflite or an .onnx file"
    )


def _batches(images: np.ndarray, batch_size: int):
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def _keras_predictor(path: Path, batch_size: int) -> Predictor:
    import keras

    from lenet_tf.model import predict_probabilities

    try:
        # Inference needs no optimizer or loss (and so no custom loss class).
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a bad archive.
        raise UsageError(f"cannot load Keras model {path}: {str(error).splitlines()[0]}") from None

    return Predictor("keras", path, lambda images: predict_probabilities(model, images, batch_size))


def _saved_model_predictor(path: Path, batch_size: int) -> Predictor:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
        serve = loaded.signatures[SIGNATURE_KEY]
    except Exception as error:  # TensorFlow raises many types for a bad SavedModel.
        raise UsageError(f"cannot load SavedModel {path}: {str(error).splitlines()[0]}") from None

    def probabilities(images):
        outputs = [serve(**{INPUT_KEY: tf.constant(batch)})["probabilities"].numpy()
                   for batch in _batches(images, batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, 10), np.float32)

    return Predictor("saved_model", path, probabilities)


def _onnx_predictor(path: Path, batch_size: int) -> Predictor:
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(f"{path} is an ONNX model; running it needs onnxruntime: pip install onnxruntime (or, in a clone, pip install -e '.[onnx]')") from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for bad files.
        raise UsageError(f"cannot load ONNX model {path}: {str(error).splitlines()[0]}") from None
    input_name = session.get_inputs()[0].name
    output_names = [output.name for output in session.get_outputs()]

    def probabilities(images):
        outputs = [session.run(["probabilities"], {input_name: np.asarray(batch, np.uint8)})[0]
                   for batch in _batches(np.asarray(images), batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, 10), np.float32)

    if "probabilities" not in output_names:
        raise UsageError(f"{path} has no 'probabilities' output; export it with `lenet-tf export --format onnx`")
    return Predictor("onnx", path, probabilities)


def _tflite_predictor(path: Path, micro_runtime: str = "tflm") -> Predictor:
    # LiteRT's interpreter, the supported successor of tf.lite.Interpreter.
    from ai_edge_litert.interpreter import Interpreter

    try:
        with native_stderr_silenced():
            interpreter = Interpreter(model_path=str(path))
            interpreter.allocate_tensors()
        runner = interpreter.get_signature_runner(SIGNATURE_KEY)
    except Exception as error:  # The interpreter raises ValueError/RuntimeError for bad files.
        raise UsageError(f"cannot load TFLite model {path}: {str(error).splitlines()[0]}") from None
    input_details = runner.get_input_details()[INPUT_KEY]
    output_details = runner.get_output_details()
    if "probabilities" not in output_details and _is_micro(interpreter):
        return _micro_predictor(path, micro_runtime)

    def probabilities(images):
        result = runner(**{INPUT_KEY: _quantize(np.asarray(images), input_details)})["probabilities"]
        return _dequantize(result, output_details["probabilities"])

    return Predictor("tflite", path, probabilities)


def _is_micro(interpreter) -> bool:
    """Whether a LiteRT interpreter holds a micro export: one int8 input with a batch of 1."""
    inputs = interpreter.get_input_details()
    return len(inputs) == 1 and inputs[0]["dtype"] == np.int8 and int(inputs[0]["shape_signature"][0]) == 1


def _micro_predictor(path: Path, micro_runtime: str) -> Predictor:
    """A micro file run one picture a call, on TFLM's interpreter or on LiteRT's:
    the int8 class scores dequantised and put through a softmax."""
    from lenet_tf.micro import RUN_ARENA, softmax

    if micro_runtime == "litert":
        # TFLite's own int8 kernels, whose arithmetic TFLM's were ported from (XNNPACK,
        # the default, rounds some requantisations differently: 0.1 % of top classes).
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        with native_stderr_silenced():
            interpreter = Interpreter(model_path=str(path),
                                      experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            interpreter.allocate_tensors()
        input_details, output_details = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

        def invoke(picture: np.ndarray) -> np.ndarray:
            interpreter.set_tensor(input_details["index"], picture)
            interpreter.invoke()
            return interpreter.get_tensor(output_details["index"])

        kind = "tflite-micro on litert"
    else:
        try:
            from tflite_micro import runtime
        except ImportError:
            raise UsageError(f"{path} is a micro model; running it in TFLM's interpreter needs tflite-micro: "
                             "pip install tflite-micro (or, in a clone, pip install -e '.[micro]')") from None
        micro_interpreter = runtime.Interpreter.from_file(str(path), arena_size=RUN_ARENA)
        # TFLM's details name the quantisation as LiteRT's per-channel form does.
        input_details, output_details = [
            {"dtype": details["dtype"], "quantization": (float(details["quantization_parameters"]["scales"][0]),
                                                         int(details["quantization_parameters"]["zero_points"][0]))}
            for details in (micro_interpreter.get_input_details(0), micro_interpreter.get_output_details(0))]

        def invoke(picture: np.ndarray) -> np.ndarray:
            micro_interpreter.set_input(picture, 0)
            micro_interpreter.invoke()
            return micro_interpreter.get_output(0)

        kind = "tflite-micro"

    def probabilities(images):
        scores = [_dequantize(invoke(_quantize(picture[np.newaxis], input_details)), output_details)[0]
                  for picture in np.asarray(images)]
        return softmax(np.array(scores, np.float32).reshape(len(scores), -1))

    return Predictor(kind, path, probabilities)


def _quantize(images: np.ndarray, details: dict) -> np.ndarray:
    """Converts uint8 pixels to whatever the TFLite input wants (uint8 or int8)."""
    dtype = details["dtype"]
    if dtype == np.uint8:
        return images.astype(np.uint8)
    scale, zero_point = details["quantization"]
    if dtype == np.int8 and scale:
        # The model was given a uint8 pixel p as real value p; map it through
        # the int8 input quantisation.
        return np.clip(np.round(images / scale + zero_point), -128, 127).astype(np.int8)
    return images.astype(dtype)


def _dequantize(values: np.ndarray, details: dict) -> np.ndarray:
    scale, zero_point = details["quantization"]
    if values.dtype in (np.int8, np.uint8) and scale:
        return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return values
