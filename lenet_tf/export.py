"""Exports: a SavedModel in TF Serving layout, TFLite variants, a model card, a parity proof.

Layout, one folder per version, never overwritten:

    <export_dir>/<model_name>/<version>/
        saved_model.pb, variables/, fingerprint.pb   the SavedModel (TF Serving loads this)
        lenet.float32.tflite, lenet.int8.tflite ...  TFLite variants converted from it
        lenet.micro.tflite, lenet_micro_model.{h,cc} the TFLM model and its C source (lenet_tf.micro)
        labels.txt                                   the class names, one a line, in output order
        metadata.json                                the model card

A version is assembled in a hidden temporary folder beside the versions and
renamed into place only when complete and proven, so a crash leaves the
previous versions untouched and no partial version that TF Serving would load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from lenet_tf import micro, webpage
from lenet_tf.config import TrainConfig
from lenet_tf.data import Datasets, load_datasets
from lenet_tf.errors import ParityError, StoppedError, UsageError
from lenet_tf.folders import FOLDER_DATASET, FolderDataset, default_name
from lenet_tf.inference import (
    INPUT_KEY, LITERT_PREFIX, METADATA_FILE, SIGNATURE_KEY, latest_version_dir, sha256_of,
)
from lenet_tf.io_utils import (
    child_environment, ensure_writable_dir, is_full_disk_error, run_module_in_child, write_json_atomic,
)
from lenet_tf.model import INPUT_DTYPE, INPUT_SHAPE, conv_block_outputs, predict_probabilities
from lenet_tf.quiet import native_stderr_silenced
from lenet_tf.registry import PIXEL_SCALE, DatasetInfo, resolve_dataset
from lenet_tf.run_dir import RunDir, holding, process_alive

# Export format -> TFLite variant name used in the file name.
TFLITE_VARIANTS = {
    "tflite": "float32",
    "tflite-fp16": "float16",
    "tflite-dynamic": "dynamic",
    "tflite-int8": "int8",
}
FLOAT_VARIANTS = ("saved_model", "float32", "onnx", "web")
ONNX_FILE = "lenet.onnx"
ONNX_OPSET = 17
# Parity bounds against the Keras model on the same images.
FLOAT_MAX_ABS_DIFF = 1e-4
QUANTISED_MAX_ACCURACY_DROP = 0.01  # 1.0 accuracy point.
# The micro model in TFLM: its accuracy within 0.5 points of Keras's, and its
# top class that of LiteRT running the same file with TFLite's own int8
# kernels (lenet_tf.inference) on nearly every picture.
MICRO_MAX_ACCURACY_DROP = 0.005
MICRO_MIN_LITERT_AGREEMENT = 0.999
# The parity entry of the micro file run by LiteRT, against which TFLM's answers are checked.
MICRO_ON_LITERT = "micro_litert"
LABELS_FILE = "labels.txt"
CALIBRATION_EXAMPLES = 500
STAGING_PREFIX = ".staging-"


@dataclass
class ExportResult:
    version_dir: Path
    artifacts: dict[str, Path] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)


def model_name(config: TrainConfig, dataset: DatasetInfo | None = None) -> str:
    """--model-name, else lenet_<dataset>: lenet_<folder name> for a folder of pictures (`dataset`, its value)."""
    return config.model_name or f"lenet_{default_name(config.dataset if dataset is None else dataset)}"


def tflite_file_name(variant: str) -> str:
    return f"lenet.{variant}.tflite"


def next_version(model_dir: Path) -> int:
    """The number after the newest version (lenet_tf.inference.version_dirs), 1 for the first."""
    latest = latest_version_dir(model_dir)
    return int(latest.name) + 1 if latest else 1


def write_saved_model(model: keras.Model, directory: Path) -> None:
    """Writes a SavedModel whose `serving_default` signature takes `image` uint8
    [batch, 28, 28, 1] and returns `probabilities`, `class_id` and `logits`.

    A second signature, `serving_hw`, takes [batch, 28, 28] for clients that
    send images without a channel axis.
    """

    def outputs(image):
        logits = model(image, training=False)
        return {
            "probabilities": tf.nn.softmax(logits),
            "class_id": tf.argmax(logits, axis=-1),
            "logits": logits,
        }

    _write_uint8_saved_model(directory, [model], outputs, without_channel_axis=True)


def _write_uint8_saved_model(directory: Path, tracked: list[keras.Model], outputs,
                             without_channel_axis: bool = False) -> None:
    """A SavedModel whose serving signature maps `image` uint8 [batch, 28, 28, 1]
    to `outputs(image)` (a dict of tensors computed by the `tracked` models);
    with `without_channel_axis`, also `serving_hw` over [batch, 28, 28]."""
    archive = keras.export.ExportArchive()
    for model in tracked:
        archive.track(model)

    def serve(image):
        return outputs(image)

    def serve_hw(image):
        return outputs(image[..., tf.newaxis])

    archive.add_endpoint(
        SIGNATURE_KEY, serve, input_signature=[tf.TensorSpec([None, *INPUT_SHAPE], tf.uint8, name=INPUT_KEY)]
    )
    if without_channel_axis:
        archive.add_endpoint(
            "serving_hw", serve_hw,
            input_signature=[tf.TensorSpec([None, *INPUT_SHAPE[:2]], tf.uint8, name=INPUT_KEY)],
        )
    archive.write_out(str(directory), verbose=False)


def write_web_export(model: keras.Model, dataset: str | DatasetInfo, version_dir: Path) -> Path:
    """Writes `<version_dir>/web/` (lenet_tf.webpage) and returns the path of its model file: an ONNX
    model whose outputs are the probabilities, computed as the serving signature computes them, and
    the activation maps of the first two conv blocks, which the page shows."""
    runtime = webpage.runtime_dir()
    web_dir = version_dir / webpage.WEB_DIR
    web_dir.mkdir()
    activations = keras.Model(model.inputs, [layer.output for layer in conv_block_outputs(model)])

    def outputs(image):
        maps = activations(image, training=False)
        probabilities = {"probabilities": tf.nn.softmax(model(image, training=False))}
        # With flip test-time augmentation the mirrored images' maps follow; the page shows the images' own.
        count = tf.shape(image)[0]
        return {**probabilities, **{f"conv{index}": block_map[:count] for index, block_map in enumerate(maps, start=1)}}

    with tempfile.TemporaryDirectory(prefix="lenet-web-") as scratch:
        _write_uint8_saved_model(Path(scratch), [model, activations], outputs)
        convert_onnx(Path(scratch), web_dir / webpage.WEB_MODEL_FILE)
    webpage.write_page(web_dir, dataset, runtime)
    return web_dir / webpage.WEB_MODEL_FILE


def convert_tflite(saved_model_dir: Path, variant: str, calibration_images: np.ndarray) -> bytes:
    """Converts the SavedModel's serving signature to one TFLite variant.

    float32: exact; float16: weights stored as half floats; dynamic: int8
    weights, float activations; int8: everything int8, with uint8 input and
    output, calibrated on `calibration_images` from the training split.
    """
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[SIGNATURE_KEY])
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if variant == "int8":

        def representative_dataset():
            for image in calibration_images:
                yield {INPUT_KEY: image[np.newaxis]}

        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    with warnings.catch_warnings(), native_stderr_silenced():
        # Calibration uses tf.lite.Interpreter internally, which warns about
        # its own deprecation (our runtime uses LiteRT), and the converter
        # prints its quantisation settings from C++.
        warnings.simplefilter("ignore", UserWarning)
        return converter.convert()


def check_can_export(config: TrainConfig) -> None:
    """Fails in the first second, before training or loading a checkpoint,
    when the config's export could not be written: a format's packages are
    missing or the export folder is not writable."""
    # onnxruntime is needed too: the parity check runs the converted model.
    for export_format in ("onnx", "web"):
        if export_format in config.export_formats and not all(
            importlib.util.find_spec(name) for name in ("tf2onnx", "onnxruntime")
        ):
            raise UsageError(f"--format {export_format} needs tf2onnx and onnxruntime: pip install tf2onnx onnxruntime (or, in a clone, pip install -e '.[onnx]')")
    if "web" in config.export_formats:
        webpage.runtime_dir()
    if "micro" in config.export_formats and not importlib.util.find_spec("tflite_micro"):
        raise UsageError("--format micro needs tflite-micro, whose interpreter proves and measures the model: "
                         "pip install tflite-micro (or, in a clone, pip install -e '.[micro]')")
    ensure_writable_dir(Path(config.export_dir), "export directory")


def convert_onnx(saved_model_dir: Path, output: Path) -> Path:
    """Converts the serving signature to ONNX with tf2onnx (same input and output names).

    tf2onnx's command line is its documented, stable entry point; it runs in a
    child process, which also keeps its graph rewrites out of this one.
    """
    completed = run_module_in_child(
        "tf2onnx.convert",
        ["--saved-model", str(saved_model_dir), "--signature_def", SIGNATURE_KEY, "--opset", str(ONNX_OPSET),
         "--output", str(output)],
        env=child_environment(TF_CPP_MIN_LOG_LEVEL="3"),
    )
    if completed.returncode != 0 or not output.is_file():
        raise RuntimeError(f"tf2onnx failed:\n{completed.stderr[-3000:]}")
    return output


class ParityWorker:
    """Reloads every exported model in a fresh Python process and runs it on images.

    A separate process proves the artifacts stand alone: nothing from the
    exporting process (Keras objects, traced functions) can leak into them.
    export_model takes any object with this `run` (tests pass their own).
    """

    def run(self, model_paths: dict[str, Path], images: np.ndarray) -> dict[str, np.ndarray]:
        """Every model's probabilities on `images`, computed in the fresh process."""
        with tempfile.TemporaryDirectory(prefix="lenet-parity-") as scratch:
            images_path = Path(scratch) / "images.npy"
            output_path = Path(scratch) / "probabilities.npz"
            np.save(images_path, images)
            arguments = [str(images_path), str(output_path), *[f"{name}={path}" for name, path in model_paths.items()]]
            completed = run_module_in_child("lenet_tf.parity_worker", arguments,
                                            env=child_environment(TF_CPP_MIN_LOG_LEVEL="3"))
            if completed.returncode != 0:
                raise ParityError(f"reloading the exports in a fresh process failed:\n{completed.stderr[-4000:]}")
            with np.load(output_path) as outputs:
                return {name: outputs[name] for name in outputs.files}


def parity_report(
    keras_probabilities: np.ndarray, exported: dict[str, np.ndarray], labels: np.ndarray
) -> dict[str, dict[str, float]]:
    keras_top1 = keras_probabilities.argmax(axis=1)
    report = {"keras": {"test_accuracy": float((keras_top1 == labels).mean()), "examples": int(len(labels))}}
    for name, probabilities in exported.items():
        top1 = probabilities.argmax(axis=1)
        report[name] = {
            "max_abs_probability_diff": float(np.abs(probabilities - keras_probabilities).max()),
            "top1_agreement": float((top1 == keras_top1).mean()),
            "test_accuracy": float((top1 == labels).mean()),
            "examples": int(len(labels)),
        }
    return report


def add_micro_agreement(report: dict[str, dict[str, float]], exported: dict[str, np.ndarray]) -> None:
    """Adds to the micro entry how often TFLM's top class is LiteRT's on the same
    file (bounded), and the int8 file's, when there is one (for information:
    the two files quantise the input differently)."""
    if "micro" not in exported:
        return
    for other, key in ((MICRO_ON_LITERT, "litert_top1_agreement"), ("int8", "int8_file_top1_agreement")):
        if other in exported:
            same = exported["micro"].argmax(axis=1) == exported[other].argmax(axis=1)
            report["micro"][key] = float(same.mean())


def check_parity(report: dict[str, dict[str, float]]) -> list[str]:
    """Returns one message per broken bound (empty when every variant passes)."""
    failures = []
    float_accuracy = report["keras"]["test_accuracy"]
    for name, numbers in report.items():
        if name == "keras":
            continue
        if name == "micro":
            agreement = numbers.get("litert_top1_agreement", 0.0)
            if agreement < MICRO_MIN_LITERT_AGREEMENT:
                failures.append(f"micro: TFLM's top class agrees with LiteRT's on the same file for "
                                f"{agreement:.4f} of the pictures (bound {MICRO_MIN_LITERT_AGREEMENT})")
            if float_accuracy - numbers["test_accuracy"] > MICRO_MAX_ACCURACY_DROP + 1e-9:
                failures.append(
                    f"micro: test accuracy {numbers['test_accuracy']:.4f} in TFLM is more than "
                    f"{MICRO_MAX_ACCURACY_DROP * 100:.1f} points below the float model's {float_accuracy:.4f}")
        elif name in FLOAT_VARIANTS:
            if numbers["max_abs_probability_diff"] > FLOAT_MAX_ABS_DIFF or numbers["top1_agreement"] < 1.0:
                failures.append(
                    f"{name}: max |Δp| {numbers['max_abs_probability_diff']:.2e} (bound {FLOAT_MAX_ABS_DIFF:.0e}), "
                    f"top-1 agreement {numbers['top1_agreement']:.4f} (bound 1.0)"
                )
        # The small slack keeps "exactly 1.0 point" (0.99 vs 1.0 in floats) inside the bound.
        elif float_accuracy - numbers["test_accuracy"] > QUANTISED_MAX_ACCURACY_DROP + 1e-9:
            failures.append(
                f"{name}: test accuracy {numbers['test_accuracy']:.4f} is more than "
                f"{QUANTISED_MAX_ACCURACY_DROP * 100:.1f} points below the float model's {float_accuracy:.4f}"
            )
    return failures


def export_model(
    model: keras.Model,
    config: TrainConfig,
    datasets: Datasets,
    metrics: dict[str, Any] | None = None,
    parity_worker: ParityWorker | None = None,
    dataset: DatasetInfo | None = None,
) -> ExportResult:
    """Exports `model` as a new version under the config's export folder and proves it.

    Raises ParityError, leaving no new version behind, when an exported model
    breaks a parity bound. `parity_worker`: what runs the exported models in a
    fresh process for that proof (a ParityWorker unless given). `dataset`:
    what `config.dataset` names, as a value (a folder of pictures:
    FolderDataset.info, whose classes, name and record the export carries);
    None: the built-in dataset `config.dataset`.
    """
    dataset = resolve_dataset(config.dataset, dataset)
    model_dir = Path(config.export_dir) / model_name(config, dataset)
    model_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(model_dir)
    # Named before it exists and made inside the `try`, so that a stop (SIGTERM,
    # Ctrl-C) landing right after it is made removes it like any other. The
    # mode the umask allows: a model server running as another user must be
    # able to read the published version.
    staging = model_dir / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    try:
        staging.mkdir()
        artifacts, micro_entry = _write_artifacts(model, config, dataset, datasets, staging)
        images, labels = datasets.test_images, datasets.test_labels
        keras_probabilities = predict_probabilities(model, images)
        checked = dict(artifacts)
        if "micro" in artifacts:
            checked[MICRO_ON_LITERT] = f"{LITERT_PREFIX}{artifacts['micro']}"
        exported = (parity_worker or ParityWorker()).run(checked, images)
        report = parity_report(keras_probabilities, exported, labels)
        add_micro_agreement(report, exported)
        failures = check_parity(report)
        card = _model_card(config, dataset, metrics or {}, artifacts, report, staging, micro_entry)
        write_json_atomic(staging / METADATA_FILE, card)
        if failures:
            raise ParityError("exported models disagree with the Keras model: " + "; ".join(failures))
        version_dir = _publish(staging, model_dir)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, Exception) and is_full_disk_error(error):
            raise StoppedError(f"no space left on the device to write the export under {model_dir}; no version "
                               "was published; free some space and run the same command again") from None
        raise
    final_artifacts = {name: version_dir / path.relative_to(staging) for name, path in artifacts.items()}
    final_artifacts["metadata"] = version_dir / METADATA_FILE
    return ExportResult(version_dir, final_artifacts, report)


def write_labels(names: list[str], path: Path) -> Path:
    """labels.txt: one class name a line (UTF-8), in output order, as mobile and
    embedded runtimes read labels."""
    for name in names:
        if not name.strip() or any(character in name for character in "\r\n"):
            raise UsageError(f"the class name {name!r} cannot be one line of {LABELS_FILE}; rename its folder")
    path.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    return path


def write_micro_export(model: keras.Model, names: list[str], calibration: np.ndarray,
                       staging: Path) -> tuple[Path, dict[str, Any]]:
    """Converts `model` for TFLM and writes the micro file and its C source
    into `staging`; returns the file's path and its model card entry (arena,
    bytes, multiply-adds). Refuses a model with an operator TFLM lacks
    (UsageError), before the version is published."""
    model_bytes = micro.convert_micro(model, calibration)
    missing = micro.unsupported_operators(model_bytes)
    if missing:
        raise UsageError(f"--format micro: the converted model uses {', '.join(missing)}, which TensorFlow Lite "
                         "for Microcontrollers does not implement; export it without micro")
    path = staging / micro.MICRO_FILE
    path.write_bytes(model_bytes)
    arena = micro.measure_arena_in_child(path)
    micro.write_c_source(model_bytes, names, arena, staging)
    return path, micro.card_entry(model_bytes, arena, len(names))


def _write_artifacts(model, config, dataset, datasets, staging) -> tuple[dict[str, Path], dict[str, Any]]:
    """Writes every format of the config; returns the models the parity proof
    runs, and the micro model's card entry ({} without micro)."""
    artifacts, micro_entry = {}, {}
    write_saved_model(model, staging)
    artifacts["saved_model"] = staging
    names = list(dataset.class_names)
    write_labels(names, staging / LABELS_FILE)
    calibration = calibration_images(datasets, config.seed)
    if "micro" in config.export_formats:
        # First: a model TFLM cannot run is refused before the longer conversions.
        artifacts["micro"], micro_entry = write_micro_export(model, names, calibration, staging)
    if "onnx" in config.export_formats:
        artifacts["onnx"] = convert_onnx(staging, staging / ONNX_FILE)
    if "web" in config.export_formats:
        artifacts["web"] = write_web_export(model, dataset, staging)
    for export_format in config.export_formats:
        if export_format in TFLITE_VARIANTS:
            variant = TFLITE_VARIANTS[export_format]
            path = staging / tflite_file_name(variant)
            if variant == "int8" and _has_average_pooling(model):
                # Converted from a twin whose average pools are depthwise
                # convolutions (see pooling_as_depthwise_convolution); the
                # twin's SavedModel is scratch, removed before the card lists
                # the version's files.
                twin_dir = staging / ".int8-source"
                write_saved_model(pooling_as_depthwise_convolution(model), twin_dir)
                path.write_bytes(convert_tflite(twin_dir, variant, calibration))
                shutil.rmtree(twin_dir)
            else:
                path.write_bytes(convert_tflite(staging, variant, calibration))
            artifacts[variant] = path
    return artifacts, micro_entry


def calibration_images(datasets: Datasets, seed: int) -> np.ndarray:
    """The training images the int8 conversion calibrates on, drawn by `seed`."""
    rng = np.random.default_rng(seed)
    count = min(CALIBRATION_EXAMPLES, len(datasets.train_images))
    return datasets.train_images[rng.choice(len(datasets.train_images), count, replace=False)]


def _has_average_pooling(model: keras.Model) -> bool:
    return any(isinstance(layer, keras.layers.AveragePooling2D) for layer in model.layers)


def pooling_as_depthwise_convolution(model: keras.Sequential) -> keras.Sequential:
    """The same function as `model`, with each 2-D average pool (valid padding,
    channels last) computed by a depthwise convolution whose weights are all
    1 / pool area; every other layer is shared with `model`, weights included.

    Why: in a full-integer TFLite model, XNNPACK leaves int8 AVERAGE_POOL_2D
    to TFLite's own kernels, which cuts the delegated graph in more pieces (3
    XNNPACK partitions instead of float32's 2), which made the int8 classic
    model slower than float32 where XNNPACK runs it; the int8 depthwise
    convolution stays inside XNNPACK (docs/exports.md says how much that
    saves on which CPU). The weight 1/4 is exact in float and in int8
    (per-channel scale), so the twin's float outputs equal the model's.
    """
    twin_layers = [keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype, name=model.inputs[0].name)]
    for layer in model.layers:
        if (isinstance(layer, keras.layers.AveragePooling2D) and layer.padding == "valid"
                and layer.data_format == "channels_last"):
            pool_area = int(np.prod(layer.pool_size))
            twin_layers.append(keras.layers.DepthwiseConv2D(
                layer.pool_size, strides=layer.strides, padding="valid", use_bias=False,
                depthwise_initializer=keras.initializers.Constant(1.0 / pool_area), name=f"{layer.name}_as_conv"))
        else:
            twin_layers.append(layer)
    return keras.Sequential(twin_layers, name=model.name)


def remove_stale_staging(model_dir: Path) -> list[Path]:
    """Deletes staging folders left by exports that were killed (their process is gone).

    A killed export cannot clean up after itself; its hidden staging folder
    is invisible to TF Serving (not a number) and is removed here, by the next
    export, once its process is known to be dead.
    """
    removed = []
    for child in model_dir.glob(f"{STAGING_PREFIX}*"):
        pid_text = child.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and not process_alive(int(pid_text)):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def _publish(staging: Path, model_dir: Path) -> Path:
    """Renames the finished staging folder to the next free version number.

    rename() of a folder onto an existing non-empty one fails, so a version
    that appeared meanwhile (another export) is never overwritten: we take
    the next number instead.
    """
    for _ in range(100):
        version_dir = model_dir / str(next_version(model_dir))
        try:
            os.rename(staging, version_dir)
            return version_dir
        except OSError:
            if not version_dir.exists():
                raise
    raise RuntimeError(f"could not find a free version number under {model_dir}")


def _model_card(config, dataset, metrics, artifacts, report, staging, micro_entry) -> dict[str, Any]:
    files = {}
    for path in sorted(staging.rglob("*")):
        if path.is_file() and path.name != METADATA_FILE:
            files[str(path.relative_to(staging))] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
    final_metrics = {key: value for key, value in metrics.items() if key not in ("history", "exports")}
    names = list(dataset.class_names)
    folder = dataset.folder
    return {
        "model_name": model_name(config, dataset),
        "dataset": config.dataset,
        "class_names": names,
        "labels": LABELS_FILE,
        # A folder of pictures: where, its test split, and the recipe that turned its pictures into inputs.
        **({"folder": folder.card()} if folder else {}),
        "input": {
            "name": INPUT_KEY,
            "dtype": INPUT_DTYPE,
            "shape": [None, *INPUT_SHAPE],
            "also_accepts": "[batch, 28, 28] through the serving_hw signature",
            "preprocessing": f"raw pixels 0..255 (white object on black, as in the dataset); "
            f"the model multiplies by {PIXEL_SCALE:.10f} (1/255) itself",
        },
        "outputs": {
            "probabilities": f"float32 [batch, {len(names)}], softmax over class_names",
            "class_id": "int64 [batch], index into class_names",
            "logits": f"float32 [batch, {len(names)}]",
        },
        # The TFLM model: the arena it needs, its bytes and multiply-adds, its input and output.
        **({"micro": micro_entry} if micro_entry else {}),
        "signatures": [SIGNATURE_KEY, "serving_hw"],
        "artifacts": {name: str(path.relative_to(staging)) or "." for name, path in artifacts.items()},
        "files": files,
        "parity": report,
        "parity_bounds": {
            "float_max_abs_probability_diff": FLOAT_MAX_ABS_DIFF,
            "float_top1_agreement": 1.0,
            "quantised_max_accuracy_drop": QUANTISED_MAX_ACCURACY_DROP,
            "micro_max_accuracy_drop": MICRO_MAX_ACCURACY_DROP,
            "micro_min_litert_top1_agreement": MICRO_MIN_LITERT_AGREEMENT,
        },
        "training_config": config.to_json_dict(),
        "metrics": final_metrics,
        "versions": {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }


def export_from_run_dir(run_dir: str | Path, export_formats: tuple[str, ...] | None = None,
                        export_dir: str | None = None) -> ExportResult:
    """Exports the checkpoint of a finished or interrupted run, without retraining.

    Holds the run folder's lock, shared with other exports, while it reads the
    checkpoint: a training writing that folder refuses to start meanwhile,
    and an export refuses while a training runs there.
    """
    run_dir = RunDir(run_dir)
    if not run_dir.has_checkpoint():
        raise UsageError(
            f"{run_dir} is not a run directory with a checkpoint (needs {run_dir.config.name} and "
            f"{run_dir.checkpoint.relative_to(run_dir.root)}); train first or pass the --run-dir of a run "
            "that finished at least one epoch"
        )
    with holding(run_dir, "export", exclusive=False):
        config = TrainConfig.read(run_dir.config)
        # A folder of pictures comes back from the run's record of it: its classes, split and files.
        dataset = FolderDataset.from_run(run_dir.root).info if config.dataset == FOLDER_DATASET else None
        if export_formats:
            config.export_formats = tuple(export_formats)
        if export_dir:
            config.export_dir = export_dir
        config.validate(dataset)
        check_can_export(config)
        try:
            model = keras.models.load_model(run_dir.checkpoint, compile=False)
        except Exception as error:  # Keras raises many types for a damaged archive.
            raise UsageError(f"cannot load the checkpoint {run_dir.checkpoint}: {str(error).splitlines()[0]}") from None
        metrics = json.loads(run_dir.metrics.read_text()) if run_dir.metrics.is_file() else {}
    dataset = resolve_dataset(config.dataset, dataset)
    datasets = load_datasets(dataset, config.data_dir).limited(config.limit_train, config.limit_test)
    return export_model(model, config, datasets, metrics, dataset=dataset)
