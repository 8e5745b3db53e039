"""Loading any model this package writes and running it on uint8 images.

One entry point, `load_predictor(path)`, for a Keras checkpoint (`.keras`), a
SavedModel folder (a version folder, or a model folder whose newest version is
taken), a `.tflite` file or an `.onnx` file. Evaluate, predict and the export parity check
all go through it, so they exercise exactly what a user deploys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lenet_tf.errors import UsageError
from lenet_tf.quiet import native_stderr_silenced

SIGNATURE_KEY = "serving_default"
INPUT_KEY = "image"
OUTPUT_KEYS = ("probabilities", "class_id", "logits")


@dataclass
class Predictor:
    """`predict(images)` maps uint8 (N, 28, 28, 1) images to (N, 10) probabilities."""

    kind: str  # "keras", "saved_model", "tflite" or "onnx"
    path: Path
    predict: Callable[[np.ndarray], np.ndarray]
    # Logits are only available from float models; TFLite int8 outputs are requantised.
    logits: Callable[[np.ndarray], np.ndarray] | None = None


def latest_version_dir(model_dir: Path) -> Path | None:
    """The highest integer-named subfolder holding a SavedModel, as TF Serving picks it."""
    versions = [
        child for child in model_dir.iterdir()
        if child.is_dir() and child.name.isdigit() and (child / "saved_model.pb").is_file()
    ] if model_dir.is_dir() else []
    return max(versions, key=lambda child: int(child.name), default=None)


def tflite_interpreter_class():
    """LiteRT's interpreter, the supported successor of tf.lite.Interpreter."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # LiteRT missing: fall back to TensorFlow's own copy.
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    return Interpreter


def load_predictor(path: str | Path, batch_size: int = 1024) -> Predictor:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"model path {path} does not exist; pass a .keras file, a SavedModel folder or a .tflite file")
    if path.is_file() and path.suffix == ".tflite":
        return _tflite_predictor(path)
    if path.is_file() and path.suffix == ".onnx":
        return _onnx_predictor(path, batch_size)
    if path.is_file() and path.suffix == ".keras":
        return _keras_predictor(path, batch_size)
    if path.is_dir():
        saved_model_dir = path if (path / "saved_model.pb").is_file() else latest_version_dir(path)
        if saved_model_dir is not None:
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

    def logits(images):
        return model.predict(images, batch_size=batch_size, verbose=0)

    return Predictor("keras", path, lambda images: predict_probabilities(model, images, batch_size), logits)


def _saved_model_predictor(path: Path, batch_size: int) -> Predictor:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
        serve = loaded.signatures[SIGNATURE_KEY]
    except Exception as error:  # TensorFlow raises many types for a bad SavedModel.
        raise UsageError(f"cannot load SavedModel {path}: {str(error).splitlines()[0]}") from None

    def run(images, key):
        outputs = [serve(**{INPUT_KEY: tf.constant(batch)})[key].numpy() for batch in _batches(images, batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, 10), np.float32)

    return Predictor(
        "saved_model", path, lambda images: run(images, "probabilities"), lambda images: run(images, "logits")
    )


def _onnx_predictor(path: Path, batch_size: int) -> Predictor:
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(f"{path} is an ONNX model; running it needs onnxruntime: pip install 'lenet-tf[onnx]'") from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for bad files.
        raise UsageError(f"cannot load ONNX model {path}: {str(error).splitlines()[0]}") from None
    input_name = session.get_inputs()[0].name
    output_names = [output.name for output in session.get_outputs()]

    def run(images, key):
        outputs = [session.run([key], {input_name: np.asarray(batch, np.uint8)})[0]
                   for batch in _batches(np.asarray(images), batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, 10), np.float32)

    if "probabilities" not in output_names:
        raise UsageError(f"{path} has no 'probabilities' output; export it with `lenet-tf export --format onnx`")
    return Predictor("onnx", path, lambda images: run(images, "probabilities"), lambda images: run(images, "logits"))


def _tflite_predictor(path: Path) -> Predictor:
    Interpreter = tflite_interpreter_class()
    try:
        with native_stderr_silenced():
            interpreter = Interpreter(model_path=str(path))
            interpreter.allocate_tensors()
        runner = interpreter.get_signature_runner(SIGNATURE_KEY)
    except Exception as error:  # The interpreter raises ValueError/RuntimeError for bad files.
        raise UsageError(f"cannot load TFLite model {path}: {str(error).splitlines()[0]}") from None
    input_details = runner.get_input_details()[INPUT_KEY]
    output_details = runner.get_output_details()

    def run(images, key):
        images = np.asarray(images)
        feed = _quantize(images, input_details)
        result = runner(**{INPUT_KEY: feed})[key]
        return _dequantize(result, output_details[key])

    def logits(images):
        return run(images, "logits")

    return Predictor("tflite", path, lambda images: run(images, "probabilities"), logits)


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
