"""The `micro` export: a model for TensorFlow Lite for Microcontrollers (TFLM).

What it writes beside the other formats of a version:

    lenet.micro.tflite     full-integer int8, batch fixed at 1, int8 input and output,
                           only built-in operators that TFLM implements
    lenet_micro_model.h    the C declarations: the model array, its length, the class
    lenet_micro_model.cc   names, the arena size and the input's quantisation

The input is the uint8 picture (28x28 grey, the package's recipe) as int8:
`int8 = pixel - 128`, the quantisation scale 1 and zero point -128, so the
real value the network sees is the pixel itself (its own Rescaling layer
divides by 255 inside). The output is the class scores, the Keras model's
logits quantised to int8 (scale and zero point in the file and the model
card); the top class is the largest int8 score.

It is converted from the Keras model itself, not from the SavedModel's
serving signature (which carries a dynamic batch, CAST, SHAPE/STRIDED_SLICE/
PACK and ARG_MAX, and which TFLM cannot run). The arena, the memory TFLM
needs beside the model, is measured by TFLM's own Python interpreter in a
process of its own: the smallest size, in steps of 16 bytes, at which the
model allocates and runs.

Usage (what the export runs in that process):
    python -m lenet_tf.micro arena MODEL.tflite   prints {"arena_bytes": N}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

MICRO_FILE = "lenet.micro.tflite"
MICRO_HEADER = "lenet_micro_model.h"
MICRO_SOURCE = "lenet_micro_model.cc"
# int8 = pixel - 128: the real value of the input tensor is the pixel, 0..255.
INPUT_SCALE = 1.0
INPUT_ZERO_POINT = -128
# TFLM aligns what it places in the arena to 16 bytes; the arena is measured in these steps.
ARENA_STEP = 16
# Where the search for the arena starts and gives up (a LeNet needs tens of KiB).
ARENA_START = 64 * 1024
ARENA_LIMIT = 64 * 1024 * 1024
# The arena the package's own TFLM runs (evaluate, the parity proof) give a
# model: more than any LeNet needs; the model card's figure is the real need.
RUN_ARENA = 8 * 1024 * 1024
# The built-in operators TFLM implements: its Python interpreter's op resolver
# (tflite-micro python/tflite_micro/python_ops_resolver.cc, which registers
# every kernel TFLM has), as TFLite's BuiltinOperator names. A model using
# anything else is refused before it is published.
TFLM_BUILTINS = frozenset({
    "ABS", "ADD", "ADD_N", "ARG_MAX", "ARG_MIN", "ASSIGN_VARIABLE", "AVERAGE_POOL_2D", "BATCH_TO_SPACE_ND",
    "BROADCAST_ARGS", "BROADCAST_TO", "CALL_ONCE", "CAST", "CEIL", "CONCATENATION", "CONV_2D", "COS", "CUMSUM",
    "DEPTH_TO_SPACE", "DEPTHWISE_CONV_2D", "DEQUANTIZE", "DIV", "ELU", "EQUAL", "EXP", "EXPAND_DIMS", "FILL",
    "FLOOR", "FLOOR_DIV", "FLOOR_MOD", "FULLY_CONNECTED", "GATHER", "GATHER_ND", "GREATER", "GREATER_EQUAL",
    "HARD_SWISH", "IF", "L2_NORMALIZATION", "L2_POOL_2D", "LEAKY_RELU", "LESS", "LESS_EQUAL", "LOG", "LOGICAL_AND",
    "LOGICAL_NOT", "LOGICAL_OR", "LOGISTIC", "LOG_SOFTMAX", "MAX_POOL_2D", "MAXIMUM", "MEAN", "MINIMUM",
    "MIRROR_PAD", "MUL", "NEG", "NOT_EQUAL", "PACK", "PAD", "PADV2", "PRELU", "QUANTIZE", "READ_VARIABLE",
    "REDUCE_MAX", "RELU", "RELU6", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "ROUND", "RSQRT",
    "SELECT_V2", "SHAPE", "SIN", "SLICE", "SOFTMAX", "SPACE_TO_BATCH_ND", "SPACE_TO_DEPTH", "SPLIT", "SPLIT_V",
    "SQRT", "SQUARE", "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM", "SVDF", "TANH", "TRANSPOSE",
    "TRANSPOSE_CONV", "UNIDIRECTIONAL_SEQUENCE_LSTM", "UNPACK", "VAR_HANDLE", "WHILE", "ZEROS_LIKE",
})


def micro_keras_model(model):
    """The function of `model` on one picture: float32 [1, 28, 28, 1] holding
    the pixels 0..255 in, logits out, through the model's own layers (its
    Rescaling divides by 255). Test-time flip (FlipViews) mirrors the picture
    with GATHER, which TFLM implements, instead of REVERSE_V2, which it does not."""
    import keras
    import tensorflow as tf

    from lenet_tf.model import FlipViews

    class GatherFlipViews(keras.layers.Layer):
        """FlipViews in inference: the pictures, then their left-right mirrors."""

        def call(self, inputs):
            mirrored = tf.gather(inputs, tf.range(inputs.shape[2] - 1, -1, -1), axis=2)
            return tf.concat([inputs, mirrored], axis=0)

    inputs = keras.Input(batch_shape=(1, *model.input_shape[1:]), dtype="float32", name="image")
    outputs = inputs
    for layer in model.layers:
        outputs = (GatherFlipViews(name=layer.name) if isinstance(layer, FlipViews) else layer)(outputs)
    return keras.Model(inputs, outputs, name=f"{model.name}_micro")


def convert_micro(model, calibration_images: np.ndarray) -> bytes:
    """Converts `model` to the micro file's bytes, calibrated on `calibration_images`
    (uint8 training pictures). Raises RuntimeError if the input did not come
    out as pixel - 128 (scale 1, zero point -128)."""
    import contextlib
    import io
    import warnings

    import tensorflow as tf

    from lenet_tf.quiet import native_stderr_silenced

    pictures = calibration_images.astype(np.float32)
    if pictures.max() < 255:
        # The input's quantisation follows the range calibration sees; one
        # white pixel makes it 0..255, hence scale 1 and zero point -128,
        # for pictures that never reach white (a dim folder).
        pictures[0].flat[0] = 255.0

    def representative_dataset():
        for picture in pictures:
            yield [picture[np.newaxis]]

    converter = tf.lite.TFLiteConverter.from_keras_model(micro_keras_model(model))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    # The converter saves the model first and prints its endpoints (Python), and prints its
    # quantisation settings (C++).
    with warnings.catch_warnings(), native_stderr_silenced(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", UserWarning)
        model_bytes = converter.convert()
    scale, zero_point = input_quantisation(model_bytes)
    if (scale, zero_point) != (INPUT_SCALE, INPUT_ZERO_POINT):
        raise RuntimeError(f"the micro model's input came out with scale {scale} and zero point {zero_point}, "
                           f"not {INPUT_SCALE} and {INPUT_ZERO_POINT} (pixel - 128)")
    return model_bytes


def _flatbuffer_model(model_bytes: bytes):
    from tensorflow.lite.python import schema_py_generated as schema

    return schema, schema.Model.GetRootAs(model_bytes, 0)


def operators(model_bytes: bytes) -> list[str]:
    """The built-in operator names a .tflite file uses, in the order of its op codes
    (a custom operator as CUSTOM:name)."""
    schema, model = _flatbuffer_model(model_bytes)
    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    used = []
    for index in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(index)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = names.get(builtin, f"BUILTIN_{builtin}")
        if name == "CUSTOM":
            name = f"CUSTOM:{(code.CustomCode() or b'').decode(errors='replace')}"
        used.append(name)
    return used


def unsupported_operators(model_bytes: bytes) -> list[str]:
    """The operators of the file that TFLM does not implement (empty when it runs there)."""
    return [name for name in operators(model_bytes) if name not in TFLM_BUILTINS]


def input_quantisation(model_bytes: bytes) -> tuple[float, int]:
    """The (scale, zero point) of the file's first input."""
    tensor = _tensor(model_bytes, "input")
    quantization = tensor.Quantization()
    return float(quantization.ScaleAsNumpy()[0]), int(quantization.ZeroPointAsNumpy()[0])


def output_quantisation(model_bytes: bytes) -> tuple[float, int]:
    """The (scale, zero point) of the file's first output (the class scores)."""
    quantization = _tensor(model_bytes, "output").Quantization()
    return float(quantization.ScaleAsNumpy()[0]), int(quantization.ZeroPointAsNumpy()[0])


def _tensor(model_bytes: bytes, which: str):
    _, model = _flatbuffer_model(model_bytes)
    graph = model.Subgraphs(0)
    index = graph.Inputs(0) if which == "input" else graph.Outputs(0)
    return graph.Tensors(index)


def multiply_adds(model_bytes: bytes) -> int:
    """Multiply-adds of one invoke: every output value of a convolution or
    dense layer costs one per weight it reads (pooling, activations and the
    rest are not counted)."""
    schema, model = _flatbuffer_model(model_bytes)
    graph = model.Subgraphs(0)
    codes = operators(model_bytes)
    total = 0
    for index in range(graph.OperatorsLength()):
        operator = graph.Operators(index)
        name = codes[operator.OpcodeIndex()]
        if name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        weights = graph.Tensors(operator.Inputs(1)).ShapeAsNumpy()
        outputs = int(np.prod(graph.Tensors(operator.Outputs(0)).ShapeAsNumpy()))
        if name == "CONV_2D":  # Weights [out channels, height, width, in channels].
            total += outputs * int(np.prod(weights[1:]))
        elif name == "DEPTHWISE_CONV_2D":  # Weights [1, height, width, channels]: one kernel per channel.
            total += outputs * int(weights[1] * weights[2])
        else:  # Weights [units, inputs].
            total += outputs * int(weights[1])
    return total


def c_string(text: str) -> str:
    """`text` as a C string literal of its UTF-8 bytes: printable ASCII as it
    is, the rest as three-digit octal escapes (which, unlike \\x, never run
    into the next character)."""
    out = []
    for byte in text.encode("utf-8"):
        character = chr(byte)
        if character in '"\\?':
            out.append("\\" + character)
        elif 0x20 <= byte < 0x7F:
            out.append(character)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def write_c_source(model_bytes: bytes, class_names: list[str], arena_bytes: int, directory: Path) -> list[Path]:
    """Writes MICRO_HEADER and MICRO_SOURCE into `directory`: the model's bytes as
    an aligned `const unsigned char` array with its length, the class names in
    output order, the arena size and the input quantisation."""
    output_scale, output_zero_point = output_quantisation(model_bytes)
    header = f"""// The LeNet micro model for TensorFlow Lite for Microcontrollers, written by
// `lenet-tf export --format ...,micro` beside {MICRO_FILE}, whose bytes the array holds.
#ifndef LENET_MICRO_MODEL_H_
#define LENET_MICRO_MODEL_H_

// The .tflite file's bytes, aligned to 16 bytes as TFLM's flatbuffer reading wants.
extern const unsigned char g_lenet_micro_model[];
extern const unsigned int g_lenet_micro_model_len;

// The class names, UTF-8, in the order of the model's outputs.
extern const char* const g_lenet_class_names[];
extern const int g_lenet_class_count;

// The tensor arena TFLM needed for this model, measured with TFLM's interpreter
// (the smallest that ran, in steps of 16 bytes).
constexpr int kLenetArenaBytes = {arena_bytes};

// Input: int8 [1, 28, 28, 1], a uint8 picture (28x28 grey, light object on
// black) as int8 = pixel - 128 (scale {INPUT_SCALE:g}, zero point {INPUT_ZERO_POINT}).
constexpr int kLenetInputZeroPoint = {INPUT_ZERO_POINT};
// Output: int8 [1, {len(class_names)}], the class scores (logits = (score - zero point) * scale);
// the top class is the largest score.
constexpr float kLenetOutputScale = {output_scale!r}f;
constexpr int kLenetOutputZeroPoint = {output_zero_point};

#endif  // LENET_MICRO_MODEL_H_
"""
    rows = [", ".join(f"0x{byte:02x}" for byte in model_bytes[start:start + 12])
            for start in range(0, len(model_bytes), 12)]
    array = ",\n    ".join(rows)
    names = ",\n".join(f"    {c_string(name)}" for name in class_names)
    source = f"""// Written by `lenet-tf export --format ...,micro`: the bytes of {MICRO_FILE}.
#include "{MICRO_HEADER}"

alignas(16) const unsigned char g_lenet_micro_model[] = {{
    {array}
}};
const unsigned int g_lenet_micro_model_len = {len(model_bytes)};

const char* const g_lenet_class_names[] = {{
{names}
}};
const int g_lenet_class_count = {len(class_names)};
"""
    paths = [directory / MICRO_HEADER, directory / MICRO_SOURCE]
    paths[0].write_text(header)
    paths[1].write_text(source)
    return paths


def measure_arena_in_child(model_path: Path) -> int:
    """The arena the model needs, measured by `python -m lenet_tf.micro arena`
    in a process of its own (TFLM prints each failed try from C++)."""
    from lenet_tf.io_utils import child_environment, run_module_in_child

    completed = run_module_in_child("lenet_tf.micro", ["arena", str(model_path)], env=child_environment())
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines or not lines[-1].startswith("{"):
        raise RuntimeError(f"measuring the micro model's arena failed:\n{completed.stderr[-3000:]}")
    return int(json.loads(lines[-1])["arena_bytes"])


def runs_in_arena(model_bytes: bytes, arena_bytes: int) -> bool:
    """Whether TFLM's interpreter allocates the model in `arena_bytes` and invokes it once."""
    from tflite_micro import runtime

    try:
        interpreter = runtime.Interpreter.from_bytes(model_bytes, arena_size=arena_bytes)
        interpreter.set_input(np.zeros(interpreter.get_input_details(0)["shape"], np.int8), 0)
        interpreter.invoke()
    except RuntimeError:
        return False
    return True


def smallest_arena(model_bytes: bytes) -> int:
    """The smallest arena, a multiple of ARENA_STEP, in which the model runs."""
    high = ARENA_START
    while not runs_in_arena(model_bytes, high):
        high *= 2
        if high > ARENA_LIMIT:
            raise RuntimeError(f"the micro model does not run in TFLM even with a {ARENA_LIMIT}-byte arena")
    low = 0  # Fails (or is nothing); high runs.
    while high - low > ARENA_STEP:
        middle = (low + high) // 2 // ARENA_STEP * ARENA_STEP
        if runs_in_arena(model_bytes, middle):
            high = middle
        else:
            low = middle
    return high


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "arena":
        print(__doc__.rsplit("Usage", 1)[1], file=sys.stderr)
        return 2
    print(json.dumps({"arena_bytes": smallest_arena(Path(argv[1]).read_bytes())}))
    return 0


def card_entry(model_bytes: bytes, arena_bytes: int, class_count: int) -> dict[str, Any]:
    """What the model card says about the micro file."""
    output_scale, output_zero_point = output_quantisation(model_bytes)
    return {
        "file": MICRO_FILE,
        "c_source": [MICRO_HEADER, MICRO_SOURCE],
        "runtime": "TensorFlow Lite for Microcontrollers (built-in operators only)",
        "operators": sorted(set(operators(model_bytes))),
        "arena_bytes": arena_bytes,
        "arena_measured_with": "tflite-micro's Python interpreter (x86-64 host, reference kernels): "
                               f"the smallest arena that ran, in steps of {ARENA_STEP} bytes",
        "model_bytes": len(model_bytes),
        "multiply_adds": multiply_adds(model_bytes),
        "input": {"dtype": "int8", "shape": [1, 28, 28, 1], "scale": INPUT_SCALE, "zero_point": INPUT_ZERO_POINT,
                  "preprocessing": "the uint8 picture as int8 = pixel - 128"},
        "output": {"dtype": "int8", "shape": [1, class_count], "scale": output_scale,
                   "zero_point": output_zero_point,
                   "meaning": "class scores: logits = (score - zero_point) * scale; top class = largest score"},
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
