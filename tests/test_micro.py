"""The micro export (TensorFlow Lite for Microcontrollers): proof in TFLM's interpreter, the
arena it records, its C source, refused operators; labels.txt beside every export."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_tf import micro
from lenet_tf.config import TrainConfig, preset
from lenet_tf.export import LABELS_FILE, MICRO_MAX_ACCURACY_DROP, MICRO_MIN_LITERT_AGREEMENT, export_model
from lenet_tf.inference import METADATA_FILE
from lenet_tf.registry import dataset_info

from conftest import run_cli, run_main, write_class_folders

# One worker runs this module (pyproject.toml's -n): its tests share the models it trains once.
pytestmark = pytest.mark.xdist_group("micro")

pytest.importorskip("tflite_micro", reason="tflite-micro is not installed (pip install -e '.[test]')")

# A program that writes the generated array's bytes (argument `model`) or the
# class names, one a line (argument `labels`), and fails unless the array is
# aligned to 16 bytes.
PRINTER = r"""
#include <cstdint>
#include <cstdio>
#include <cstring>
#include "lenet_micro_model.h"

int main(int argc, char** argv) {
  if (reinterpret_cast<std::uintptr_t>(g_lenet_micro_model) % 16 != 0) return 3;
  if (argc > 1 && std::strcmp(argv[1], "model") == 0) {
    std::fwrite(g_lenet_micro_model, 1, g_lenet_micro_model_len, stdout);
  } else {
    for (int i = 0; i < g_lenet_class_count; ++i) std::printf("%s\n", g_lenet_class_names[i]);
  }
  std::printf("%s", kLenetArenaBytes > 0 && kLenetInputZeroPoint == -128 ? "" : "bad constants");
  return 0;
}
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, fashion_mnist_dir):
    """A ReLU LeNet trained for 2 epochs on 6,000 real Fashion-MNIST pictures, tested and
    exported (int8 and micro) on the whole test split of 10,000."""
    from lenet_tf.data import load_idx_dir
    from lenet_tf.train import train_and_evaluate

    root = tmp_path_factory.mktemp("micro")
    datasets = load_idx_dir(fashion_mnist_dir).limited(6000, None)
    config = TrainConfig(
        dataset="fashion_mnist", epochs=2, batch_size=32, activation="relu", learning_rate=0.1,
        data_dir=str(fashion_mnist_dir), limit_train=6000, image_every_epochs=0,
        run_dir=str(root / "run"), export_dir=str(root / "exports"),
        export_formats=("saved_model", "tflite-int8", "micro"),
    )
    metrics = train_and_evaluate(config, datasets=datasets)
    version = Path(metrics["export_version_dir"])
    return version, json.loads((version / METADATA_FILE).read_text())


def test_the_micro_file_is_int8_with_a_batch_of_1_and_only_tflm_operators(exported):
    from ai_edge_litert.interpreter import Interpreter

    version, card = exported
    model_bytes = (version / micro.MICRO_FILE).read_bytes()
    interpreter = Interpreter(model_content=model_bytes)
    [image] = interpreter.get_input_details()
    [scores] = interpreter.get_output_details()
    assert image["dtype"] == np.int8 and image["shape_signature"].tolist() == [1, 28, 28, 1]
    assert image["quantization"] == (1.0, -128)  # int8 = pixel - 128.
    assert scores["dtype"] == np.int8 and scores["shape_signature"].tolist() == [1, 10]
    assert set(micro.operators(model_bytes)) <= micro.TFLM_BUILTINS
    entry = card["micro"]
    assert entry["model_bytes"] == len(model_bytes) == card["files"][micro.MICRO_FILE]["bytes"]
    # conv1 6@5x5 over 28x28, conv2 16@5x5x6 over 10x10, then 400x120, 120x84 and 84x10.
    assert entry["multiply_adds"] == 28 * 28 * 6 * 25 + 10 * 10 * 16 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    assert (entry["output"]["scale"], entry["output"]["zero_point"]) == pytest.approx(scores["quantization"])


def test_the_proof_ran_tflm_on_the_whole_test_split_within_its_bounds(exported):
    version, card = exported
    parity = card["parity"]
    assert {"micro", "micro_litert", "int8"} <= set(parity)
    assert parity["micro"]["examples"] == parity["micro_litert"]["examples"] == 10_000
    assert parity["micro"]["litert_top1_agreement"] >= MICRO_MIN_LITERT_AGREEMENT
    assert parity["keras"]["test_accuracy"] - parity["micro"]["test_accuracy"] <= MICRO_MAX_ACCURACY_DROP
    assert 0 < parity["micro"]["int8_file_top1_agreement"] <= 1


def test_evaluate_runs_the_micro_file_in_tflm_in_a_fresh_process(exported, fashion_mnist_dir):
    version, card = exported
    completed = run_cli("evaluate", "--model", str(version / micro.MICRO_FILE), "--data-dir", str(fashion_mnist_dir),
                        "--limit-test", "1000", "--json")
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    assert result["format"] == "tflite-micro" and result["examples"] == 1000
    assert 0.5 < result["accuracy"] <= 1.0


def test_the_recorded_arena_runs_and_1_kib_less_does_not(exported):
    version, card = exported
    arena = card["micro"]["arena_bytes"]
    assert arena % micro.ARENA_STEP == 0
    script = ("import sys; from pathlib import Path; from lenet_tf import micro; "
              "data = Path(sys.argv[1]).read_bytes(); "
              "print(micro.runs_in_arena(data, int(sys.argv[2])), micro.runs_in_arena(data, int(sys.argv[2]) - 1024))")
    completed = subprocess.run([sys.executable, "-c", script, str(version / micro.MICRO_FILE), str(arena)],
                               capture_output=True, text=True, timeout=120, env=_environment())
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip().splitlines()[-1] == "True False"


def _environment():
    import os

    from conftest import REPO_ROOT

    return dict(os.environ, PYTHONPATH=str(REPO_ROOT))


def _compile_printer(directory: Path, tmp_path: Path) -> Path:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler (apt-get install g++)")
    (tmp_path / "printer.cc").write_text(PRINTER)
    program = tmp_path / "printer"
    completed = subprocess.run(
        [compiler, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", str(directory),
         str(tmp_path / "printer.cc"), str(directory / micro.MICRO_SOURCE), "-o", str(program)],
        capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return program


def test_the_c_source_compiles_and_its_array_is_the_tflite_file(exported, tmp_path):
    version, card = exported
    program = _compile_printer(version, tmp_path)
    array = subprocess.run([str(program), "model"], capture_output=True, timeout=60, check=True).stdout
    assert array == (version / micro.MICRO_FILE).read_bytes()
    names = subprocess.run([str(program), "labels"], capture_output=True, timeout=60, check=True).stdout
    assert names.decode().splitlines() == card["class_names"]
    header = (version / micro.MICRO_HEADER).read_text()
    assert f"kLenetArenaBytes = {card['micro']['arena_bytes']};" in header


def test_labels_txt_lists_the_class_names_in_output_order(exported):
    version, card = exported
    assert card["labels"] == LABELS_FILE
    lines = (version / LABELS_FILE).read_text(encoding="utf-8").splitlines()
    assert lines == card["class_names"] == list(dataset_info("fashion_mnist").class_names)


def test_c_class_names_with_spaces_quotes_and_non_ascii_letters_compile_to_their_utf8(exported, tmp_path):
    version, _ = exported
    names = ["ankle boot", "crème brûlée", 'say "cheese"', "back\\slash", "Ørsted", "日本", "a?b"]
    directory = tmp_path / "source"
    directory.mkdir()
    micro.write_c_source((version / micro.MICRO_FILE).read_bytes(), names, 20_000, directory)
    program = _compile_printer(directory, tmp_path)
    printed = subprocess.run([str(program), "labels"], capture_output=True, timeout=60, check=True).stdout
    assert printed.decode("utf-8").splitlines() == names


def test_labels_txt_of_a_folders_model_has_its_class_names(tmp_path):
    """A folder whose classes have spaces and non-ASCII letters: labels.txt beside the export, in output order."""
    names = ["ankle boot", "crème brûlée", "Ørsted"]
    root = write_class_folders(tmp_path / "pictures", {name: 8 for name in names})
    completed = run_main("train", "--data-dir", str(root), "--epochs", "1", "--batch-size", "8", "--test-split", "0.25",
                         "--run-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "exports"),
                         "--format", "saved_model", "--image-every-epochs", "0",
                         env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert completed.returncode == 0, completed.stderr[-3000:]
    version = Path(json.loads((tmp_path / "run" / "metrics.json").read_text())["export_version_dir"])
    card = json.loads((version / METADATA_FILE).read_text())
    assert sorted(card["class_names"]) == sorted(names)
    assert (version / LABELS_FILE).read_text(encoding="utf-8").splitlines() == card["class_names"]


def test_a_model_with_an_operator_tflm_lacks_is_refused_before_anything_is_published(tmp_path):
    """REVERSE_V2 (a mirror image) has no TFLM kernel: one line naming it, no version."""
    import keras
    import tensorflow as tf

    from lenet_tf.data import Datasets
    from lenet_tf.errors import UsageError

    class Mirror(keras.layers.Layer):
        def call(self, inputs):
            return tf.reverse(inputs, axis=[2])

    model = keras.Sequential([keras.Input((28, 28, 1), dtype="uint8"), keras.layers.Rescaling(1 / 255),
                              Mirror(), keras.layers.Flatten(), keras.layers.Dense(10)])
    images = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    datasets = Datasets(images, np.arange(16) % 10, images, np.arange(16) % 10)
    config = TrainConfig(dataset="fashion_mnist", export_dir=str(tmp_path), export_formats=("saved_model", "micro"))
    with pytest.raises(UsageError) as refused:
        export_model(model, config, datasets, parity_worker=object())  # Refused before any model runs.
    message = str(refused.value)
    assert "\n" not in message and "REVERSE_V2" in message and "Microcontrollers" in message
    assert list((tmp_path / "lenet_fashion_mnist").iterdir()) == []


def test_the_books_lenet_fits_its_bounds(fashion_mnist_dir, tmp_path):
    """The default preset's micro model: arena at most 16 KiB, file at most 80 KiB (neither depends on training)."""
    from lenet_tf.data import load_idx_dir
    from lenet_tf.model import build_model

    calibration = load_idx_dir(fashion_mnist_dir).limited(200, 10).train_images
    model_bytes = micro.convert_micro(build_model(preset("classic")), calibration)
    assert len(model_bytes) <= 80 * 1024
    (tmp_path / micro.MICRO_FILE).write_bytes(model_bytes)
    assert micro.measure_arena_in_child(tmp_path / micro.MICRO_FILE) <= 16 * 1024
