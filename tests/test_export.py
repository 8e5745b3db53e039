"""Exports: signature, versions, atomicity, parity in a fresh process, TFLite variants."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_tf.config import TrainConfig
from lenet_tf.export import STAGING_PREFIX, ParityWorker, check_parity, export_model, parity_report
from lenet_tf.inference import METADATA_FILE, sha256_of
from lenet_tf.registry import dataset_info
from lenet_tf.run_dir import RunDir
from lenet_tf.train import train_and_evaluate

from conftest import REPO_ROOT, run_cli, run_main, wait_for

# One worker runs this module (pyproject.toml's -n): its tests share the models it trains once.
pytestmark = pytest.mark.xdist_group("export")

ALL_FORMATS = ("saved_model", "tflite", "tflite-fp16", "tflite-dynamic", "tflite-int8", "onnx")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fashion_mnist_dir):
    """A ReLU LeNet trained for 2 epochs on 6,000 real Fashion-MNIST images, exported in every format."""
    from lenet_tf.data import load_idx_dir

    root = tmp_path_factory.mktemp("export")
    datasets = load_idx_dir(fashion_mnist_dir).limited(6000, 500)
    config = TrainConfig(
        dataset="fashion_mnist", epochs=2, batch_size=32, activation="relu", learning_rate=0.1,
        data_dir=str(fashion_mnist_dir),
        limit_train=6000, limit_test=500,
        run_dir=str(root / "run"), export_dir=str(root / "exports"), export_formats=ALL_FORMATS,
    )
    metrics = train_and_evaluate(config, datasets=datasets)
    return config, metrics, datasets


def test_every_format_lands_in_a_numbered_version_with_a_model_card(trained):
    config, metrics, _ = trained
    version_dir = Path(metrics["export_version_dir"])
    assert version_dir == Path(config.export_dir) / "lenet_fashion_mnist" / "1"
    names = sorted(path.name for path in version_dir.glob("*.tflite"))
    assert names == ["lenet.dynamic.tflite", "lenet.float16.tflite", "lenet.float32.tflite", "lenet.int8.tflite"]
    assert (version_dir / "lenet.onnx").is_file()
    card = json.loads((version_dir / METADATA_FILE).read_text())
    assert card["class_names"] == list(dataset_info("fashion_mnist").class_names)
    assert card["input"]["dtype"] == "uint8" and card["input"]["shape"] == [None, 28, 28, 1]
    assert card["training_config"]["epochs"] == 2
    assert card["metrics"]["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert card["versions"]["tensorflow"] and card["versions"]["keras"]
    for relative, entry in card["files"].items():
        assert sha256_of(version_dir / relative) == entry["sha256"], relative
    # Directory permissions must let a model server running as another user read it.
    assert version_dir.stat().st_mode & 0o005 == 0o005


def test_the_parity_proof_covers_every_model_written_on_the_runs_whole_test_split(trained):
    """The bounds themselves are enforced by the export (a version that breaks
    one is never published: see the test below that feeds it disagreeing
    answers); here, that the proof measured what it claims: every model in the
    version, on the same 500 test images the run was scored on."""
    _, metrics, _ = trained
    parity = json.loads((Path(metrics["export_version_dir"]) / METADATA_FILE).read_text())["parity"]
    assert set(parity) == {"keras", "saved_model", "float32", "float16", "dynamic", "int8", "onnx"}
    assert {name: entry["examples"] for name, entry in parity.items()} == dict.fromkeys(parity, 500)
    assert parity["keras"]["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)


def test_int8_model_pools_by_depthwise_convolution_and_equals_the_model_in_float(trained):
    from ai_edge_litert.interpreter import Interpreter

    from lenet_tf.export import pooling_as_depthwise_convolution
    from lenet_tf.model import build_model

    config, metrics, _ = trained
    version_dir = Path(metrics["export_version_dir"])
    assert sorted(path.name for path in version_dir.iterdir() if path.name.startswith(".")) == []
    int8_ops = {op["op_name"] for op in Interpreter(str(version_dir / "lenet.int8.tflite"))._get_ops_details()}
    assert "AVERAGE_POOL_2D" not in int8_ops and "DEPTHWISE_CONV_2D" in int8_ops
    float_ops = {op["op_name"] for op in Interpreter(str(version_dir / "lenet.float32.tflite"))._get_ops_details()}
    assert "AVERAGE_POOL_2D" in float_ops  # Only the int8 variant is converted from the twin.

    model = build_model(config)
    twin = pooling_as_depthwise_convolution(model)
    images = np.random.default_rng(7).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_allclose(twin.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    assert twin.layers[1] is model.layers[1]  # Shared, weights included.
    assert [layer.name for layer in twin.layers if "pool" in layer.name] == ["pool1_as_conv", "pool2_as_conv"]


def test_signature_names_dtypes_and_shapes_in_a_fresh_process(trained):
    _, metrics, datasets = trained
    script = f"""
import json, numpy as np, tensorflow as tf, sys
# Plain tf.saved_model.load, as TF Serving would: no Keras objects are rebuilt.
loaded = tf.saved_model.load({metrics['export_version_dir']!r})
serve = loaded.signatures["serving_default"]
inputs = serve.structured_input_signature[1]
outputs = serve.structured_outputs
images = np.load(sys.argv[1])
result = serve(image=tf.constant(images))
hw = loaded.signatures["serving_hw"](image=tf.constant(images[..., 0]))
print(json.dumps({{
    "inputs": {{k: [v.dtype.name, v.shape.as_list()] for k, v in inputs.items()}},
    "outputs": {{k: [v.dtype.name, v.shape.as_list()] for k, v in outputs.items()}},
    "probabilities": result["probabilities"].numpy().tolist(),
    "class_id": result["class_id"].numpy().tolist(),
    "hw_equal": bool(np.array_equal(hw["probabilities"].numpy(), result["probabilities"].numpy())),
}}))
"""
    images_path = Path(metrics["export_version_dir"]).parent.parent / "sample.npy"
    np.save(images_path, datasets.test_images[:64])
    completed = subprocess.run([sys.executable, "-c", script, str(images_path)], capture_output=True, text=True,
                               env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["inputs"] == {"image": ["uint8", [None, 28, 28, 1]]}
    assert report["outputs"] == {
        "probabilities": ["float32", [None, 10]], "class_id": ["int64", [None]], "logits": ["float32", [None, 10]],
    }
    assert report["hw_equal"]
    import keras

    model = keras.models.load_model(RunDir(trained[0].run_dir).checkpoint)
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(model(datasets.test_images[:64])))
    np.testing.assert_allclose(np.array(report["probabilities"]), expected, atol=1e-4)
    assert report["class_id"] == expected.argmax(axis=1).tolist()


def test_tflite_float32_matches_keras_in_a_fresh_process(trained):
    _, metrics, datasets = trained
    completed = run_cli("evaluate", "--model", metrics["exports"]["float32"], "--data-dir", trained[0].data_dir,
                        "--limit-test", "500", "--json")
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    assert result["format"] == "tflite" and result["dataset"] == "fashion_mnist"
    assert result["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert np.array(result["confusion_matrix"]).sum() == 500


def test_versions_increase_and_never_overwrite(trained, tmp_path):
    config, metrics, datasets = trained
    import keras

    model = keras.models.load_model(RunDir(config.run_dir).checkpoint)
    small = TrainConfig(**{**config.to_json_dict(), "export_dir": str(tmp_path), "export_formats": ("saved_model",)})
    first = export_model(model, small, datasets.limited(100, 100))
    first_hash = sha256_of(first.version_dir / "saved_model.pb")
    second = export_model(model, small, datasets.limited(100, 100))
    assert [first.version_dir.name, second.version_dir.name] == ["1", "2"]
    assert sha256_of(first.version_dir / "saved_model.pb") == first_hash
    assert sorted(p.name for p in (tmp_path / "lenet_fashion_mnist").iterdir()) == ["1", "2"]


def test_broken_parity_bound_fails_loudly():
    keras_probabilities = np.eye(10, dtype=np.float32)[np.arange(100) % 10]
    labels = np.arange(100) % 10
    shifted = keras_probabilities.copy()
    shifted[0] = np.roll(shifted[0], 1)
    report = parity_report(keras_probabilities, {"float32": shifted, "int8": shifted}, labels)
    failures = check_parity(report)
    assert len(failures) == 1 and failures[0].startswith("float32: max |Δp| 1.00e+00")
    worse = keras_probabilities.copy()
    worse[:5] = np.roll(worse[:5], 1, axis=1)
    failures = check_parity(parity_report(keras_probabilities, {"int8": worse}, labels))
    assert failures and "more than 1.0 points below" in failures[0]


def test_a_version_whose_models_disagree_with_keras_is_never_published(tmp_path):
    """The parity worker's answers are the proof: answers that break a bound
    (each probability moved to the next class, as a wrongly converted model
    would give) stop the export, and nothing is left under the model's folder."""
    from lenet_tf.data import Datasets
    from lenet_tf.errors import ParityError
    from lenet_tf.model import build_model, predict_probabilities

    config = TrainConfig(dataset="fashion_mnist", export_dir=str(tmp_path), export_formats=("saved_model",))
    model = build_model(config)
    images = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    datasets = Datasets(images, np.arange(16) % 10, images, np.arange(16) % 10)

    class DisagreeingWorker:
        def run(self, model_paths, images):
            return {name: np.roll(predict_probabilities(model, images), 1, axis=1) for name in model_paths}

    with pytest.raises(ParityError, match=r"disagree with the Keras model: saved_model: max \|Δp\|"):
        export_model(model, config, datasets, parity_worker=DisagreeingWorker())
    assert list((tmp_path / "lenet_fashion_mnist").iterdir()) == []


def _stop_at_a_call_after_the_staging_folder_appears(model_dir: Path, calls: int):
    """A profile hook that raises KeyboardInterrupt, as the CLI's handler of
    SIGTERM and Ctrl-C does, when the `calls`-th built-in function returns
    after the export's staging folder first exists: a stop that lands at that
    exact point of the export, every time."""
    seen = 0

    def hook(frame, event, argument):
        nonlocal seen
        if event != "c_return":
            return
        if seen == 0 and not (model_dir.is_dir() and any(path.name.startswith(STAGING_PREFIX)
                                                         for path in model_dir.iterdir())):
            return
        seen += 1
        if seen == calls:
            sys.setprofile(None)
            raise KeyboardInterrupt()

    return hook


@pytest.mark.parametrize("calls", range(1, 9))
def test_a_stop_landing_right_after_the_staging_folder_is_made_leaves_nothing(tmp_path, calls):
    """A stop at each of the first built-in calls after the folder is made,
    one per case: where a SIGTERM sent on seeing the folder lands."""
    from lenet_tf.data import Datasets
    from lenet_tf.model import build_model

    config = TrainConfig(dataset="fashion_mnist", export_dir=str(tmp_path), export_formats=("saved_model",))
    images = np.zeros((8, 28, 28, 1), np.uint8)
    datasets = Datasets(images, np.zeros(8, np.int32), images, np.zeros(8, np.int32))
    model_dir = tmp_path / "lenet_fashion_mnist"
    # The stop lands long before the parity check: a worker that is never used.
    unused_worker = object()
    sys.setprofile(_stop_at_a_call_after_the_staging_folder_appears(model_dir, calls))
    try:
        with pytest.raises(KeyboardInterrupt):
            export_model(build_model(config), config, datasets, parity_worker=unused_worker)
    finally:
        sys.setprofile(None)
    assert list(model_dir.iterdir()) == []


@pytest.mark.slow  # Three exports in processes of their own, one killed.
def test_export_killed_midway_leaves_previous_versions_and_no_partial_version(trained, tmp_path):
    config, _, _ = trained
    export_dir = tmp_path / "exports"
    first = run_main("export", "--run-dir", config.run_dir, "--export-dir", str(export_dir), "--format", "saved_model")
    assert first.returncode == 0, first.stderr[-3000:]
    model_dir = export_dir / "lenet_fashion_mnist"
    before = {p.name: sha256_of(p / "saved_model.pb") for p in model_dir.iterdir() if p.name.isdigit()}
    assert list(before) == ["1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "lenet_tf", "export", "--run-dir", config.run_dir, "--export-dir", str(export_dir),
         "--format", ",".join(ALL_FORMATS)],
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: any(model_dir.glob(".staging-*/saved_model.pb")), [process],
                 "a SavedModel in the export's staging folder")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()

    def helpers_left() -> list[str]:
        leftovers = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().decode(errors="replace")
                # A helper names its parent's pid (lenet_tf.child PID ...), a waiting
                # parity worker names nothing else.
                if str(model_dir) in text or f"lenet_tf.child\0{process.pid}\0" in text:
                    leftovers.append(cmdline.parent.name)
            except OSError:
                continue  # The process ended while we looked.
        return leftovers

    # Nothing the export started (converter, parity worker) outlives it: the
    # kernel kills each helper as its parent dies, which takes a moment to land.
    wait_for(lambda: not helpers_left(), [], f"end of the helper processes working on {model_dir}", timeout=120)
    after = {p.name: sha256_of(p / "saved_model.pb") for p in model_dir.iterdir() if p.name.isdigit()}
    assert after == before
    # The next export sweeps away the dead export's hidden staging folder.
    again = run_main("export", "--run-dir", config.run_dir, "--export-dir", str(export_dir), "--format", "saved_model")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2"]


def test_onnx_model_evaluates_like_keras_in_a_fresh_process(trained):
    config, metrics, _ = trained
    onnx_path = Path(metrics["export_version_dir"]) / "lenet.onnx"
    completed = run_cli("evaluate", "--model", str(onnx_path), "--data-dir", config.data_dir, "--limit-test", "500", "--json")
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    assert result["format"] == "onnx"
    assert result["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)


def test_a_model_file_changed_after_export_is_refused_unless_told_not_to_verify(trained, tmp_path):
    import shutil

    _, metrics, _ = trained
    version = tmp_path / "1"
    shutil.copytree(metrics["export_version_dir"], version)
    # Another valid model in place of the float32 one: it loads, but it is not what was exported.
    shutil.copyfile(version / "lenet.dynamic.tflite", version / "lenet.float32.tflite")
    card = json.loads((version / METADATA_FILE).read_text())
    expected = card["files"]["lenet.float32.tflite"]["sha256"]
    actual = sha256_of(version / "lenet.float32.tflite")
    refused = run_main("evaluate", "--model", str(version / "lenet.float32.tflite"), "--limit-test", "100")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("lenet-tf evaluate: error: ") and "lenet.float32.tflite does not match its model card" in line
    assert f"expected {expected[:12]}" in line and f"actual {actual[:12]}" in line and "--no-verify" in line
    allowed = run_main("evaluate", "--model", str(version / "lenet.float32.tflite"), "--limit-test", "100",
                       "--no-verify", "--json")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    # A SavedModel is checked as a whole: one changed variables file is enough.
    variables = next((version / "variables").glob("variables.data-*"))
    changed = bytearray(variables.read_bytes())
    changed[-1] ^= 0xFF
    variables.write_bytes(bytes(changed))
    refused = run_main("predict", "--model", str(version), str(tmp_path / "nothing.png"))
    assert refused.returncode == 2 and "does not match its model card" in refused.stderr
    assert "variables.data-" in refused.stderr.strip().splitlines()[-1]
    # Files with no model card (a run's own checkpoint) load as they are.
    checkpoint = RunDir(trained[0].run_dir).checkpoint
    assert run_main("evaluate", "--model", str(checkpoint), "--limit-test", "50").returncode == 0


def test_export_refuses_a_run_dir_that_a_training_holds(trained):
    from lenet_tf.run_dir import holding

    config, _, _ = trained
    with holding(RunDir(config.run_dir), "training"):
        completed = run_main("export", "--run-dir", config.run_dir, "--format", "saved_model")
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    line = completed.stderr.strip().splitlines()[-1]
    assert f"the run directory {config.run_dir} is in use by training process {os.getpid()} on host" in line


def test_parity_worker_reports_a_model_it_cannot_load(tmp_path):
    from lenet_tf.errors import ParityError

    with pytest.raises(ParityError, match="fresh process"):
        ParityWorker().run({"float32": tmp_path / "missing.tflite"}, np.zeros((2, 28, 28, 1), np.uint8))
