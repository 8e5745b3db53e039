"""Shared fixtures: real data where the tests need it, tiny synthetic data elsewhere.

Real data: Fashion-MNIST from Debian's dataset-fashion-mnist (the README's
test command installs it) wherever the dataset does not matter; MNIST only
where it does, found through the package's own search and skipped, with
the way to provide it, where it cannot be found.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Each TensorFlow process of the suite computes on one thread (its processes
# inherit this): the three pytest workers of pyproject.toml's -n and the
# processes they start share the cores, which pools sized to every core would
# oversubscribe. Thread counts are no behaviour under test; benchmarks/ times speed.
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Debian's Chromium, driven by Playwright (its own browser download is never used).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def missing_chromium() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (pip install -e '.[test]')"
    if not CHROMIUM.is_file():
        return "Chromium is not installed (apt-get install chromium)"
    return None


def pytest_collection_modifyitems(config, items):
    """Slow tests first, so that the workers of `-n` (pyproject.toml) end
    together instead of one starting a minute-long test as the others finish.
    Stable, and by xdist_group: the tests that share a module's trained model
    stay together, in their order, and it is trained once."""
    def group(item) -> str:
        marker = item.get_closest_marker("xdist_group")
        return f"{item.module.__name__}:{marker.args[0]}" if marker else item.nodeid

    slow_groups = {group(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: group(item) not in slow_groups)


# How a user (or CI) provides MNIST without internet: the package's own search.
MNIST_HINT = ("set LENET_TF_DATA_DIR to a folder holding mnist/ with the four IDX files, put them in "
              "~/.keras/datasets/mnist/, or go online so tensorflow_datasets can download MNIST")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
    """Runs `python -m lenet_tf ARGS` in a fresh process and returns the CompletedProcess."""
    import subprocess

    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "lenet_tf", *args],
        cwd=cwd or REPO_ROOT, env=environment, capture_output=True, text=True, timeout=timeout,
    )


def run_main(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Runs `lenet-tf ARGS` in this process (lenet_tf.cli.main) and returns what
    run_cli returns: the exit code and what it printed, in a CompletedProcess.

    For tests of what a command does, where no process boundary is under test:
    each call saves the seconds a fresh process takes to import TensorFlow. `cwd`
    and `env` hold for the call's duration; a folder of pictures is a value the
    command builds and drops, so nothing of it outlives the call. A bug raises here,
    traceback and all, where run_cli would return it in stderr. Not for what
    must happen before TensorFlow initialises (--logical-cpus) or what only a
    fresh process shows (a parity proof, what a command imports).
    """
    import contextlib
    import io
    import subprocess

    from lenet_tf.cli import main

    saved, folder = dict(os.environ), os.getcwd()
    os.environ.update(env or {})
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        os.chdir(cwd or folder)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main(list(args))
            except SystemExit as exit_info:  # argparse's own checks exit.
                code = exit_info.code
    finally:
        # The environment as it was: `env`, and what the command set (the
        # strategy writes TF_CONFIG), end with the call as with a process.
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        for name, value in saved.items():
            if os.environ.get(name) != value:
                os.environ[name] = value
        os.chdir(folder)
    return subprocess.CompletedProcess(["lenet-tf", *args], code, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST_DIR


def _online(timeout: float = 3.0) -> bool:
    """Whether tensorflow_datasets' download host answers (a bounded check, so an offline run never hangs)."""
    import socket

    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def mnist_datasets():
    """Real MNIST, found the way the package finds it (tensorflow_datasets included, when online)."""
    from lenet_tf.data import find_local_data, load_datasets
    from lenet_tf.errors import UsageError

    if find_local_data("mnist") is None and not _online():
        pytest.skip(f"real MNIST not found and offline: {MNIST_HINT}")
    try:
        return load_datasets("mnist")
    except UsageError:
        pytest.skip(f"real MNIST not found: {MNIST_HINT}")


@pytest.fixture(scope="session")
def small_real_datasets(fashion_mnist_dir):
    """2,000 real Fashion-MNIST training images and 500 test images, enough to learn something fast."""
    from lenet_tf.data import load_idx_dir

    return load_idx_dir(fashion_mnist_dir).limited(2000, 500)


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Writes a uint8 array as an IDX file, the format the real datasets use."""
    import gzip
    import struct

    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_idx_files(directory: Path, train_images: np.ndarray, train_labels: np.ndarray,
                    test_images: np.ndarray, test_labels: np.ndarray) -> Path:
    """A folder of the four gzipped IDX files of a dataset, from (count, 28, 28) images and their labels."""
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, images, labels in (("train", train_images, train_labels), ("t10k", test_images, test_labels)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)
    return directory


def write_idx_dir(directory: Path, train: int = 64, test: int = 32, seed: int = 0) -> Path:
    """A folder of the four IDX files with random images and labels."""
    rng = np.random.default_rng(seed)
    splits = []
    for count in (train, test):
        splits += [rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), rng.integers(0, 10, (count,), dtype=np.uint8)]
    return write_idx_files(directory, *splits)


def shape_picture(light_on_dark: bool = True, size=(40, 30), offset=(6, 9)) -> np.ndarray:
    """A grey picture of a filled rectangle with a notch: light on black, or its negative."""
    grey = np.zeros(size, np.uint8)
    grey[offset[0]:offset[0] + 20, offset[1]:offset[1] + 12] = 230
    grey[offset[0] + 5:offset[0] + 9, offset[1] + 3:offset[1] + 6] = 90
    return grey if light_on_dark else 255 - grey


def write_class_folders(root: Path, pictures_per_class: dict[str, int], size=(28, 28)) -> Path:
    """A folder of pictures, one subfolder per class: random grey PNGs, the same for the same arguments."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in pictures_per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / name / f"{index:03d}.png")
    return root


def read_event_tags(log_dir: Path):
    """Loads an event folder the way TensorBoard does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar summary in an event folder: tag -> [(step, value)].

    tf.summary stores scalars as tensors tagged with the "scalars" plugin;
    other tensors (the Keras model config, images) are skipped.
    """
    import tensorflow as tf

    accumulator = read_event_tags(log_dir)
    scalars = {}
    for tag in accumulator.Tags()["tensors"]:
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue
        scalars[tag] = [(event.step, float(tf.make_ndarray(event.tensor_proto))) for event in accumulator.Tensors(tag)]
    return scalars


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 right now (all held at once, so they differ)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for(state, processes, what: str, timeout: float = 300, details=lambda: "", interval: float = 0.05):
    """Polls until `state()` is true and returns its value, for a test that
    means to act at that point of a run (stop the `processes`, say). Fails,
    naming `what`, when one of the processes ends first or when the state does
    not come within `timeout` seconds (generous: it bounds a hang on a busy
    machine, and a state that comes sooner ends the wait sooner), with
    `details()` in the message. `interval`: seconds between polls; longer for a
    state that asks another program (SLURM's scontrol)."""
    import time

    deadline = time.monotonic() + timeout
    while not (value := state()):
        ended = [process.args for process in processes if process.poll() is not None]
        if ended:
            pytest.fail(f"the run ended before {what}: {ended[0]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s\n{details()}".rstrip())
        time.sleep(interval)
    return value


def backed_up_epochs(metadata: Path) -> int:
    """How many epochs a run's backup record says are backed up (0 before the first)."""
    import json

    try:
        return json.loads(metadata.read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def wait_for_backed_up_epoch(metadata: Path, processes, timeout: float = 300) -> int:
    """Waits until a run's backup record names an epoch, every process still
    running (the caller means to stop them mid-run); returns how many are backed up."""
    wait_for(lambda: backed_up_epochs(metadata) >= 1, processes, "a backed-up epoch", timeout)
    return backed_up_epochs(metadata)


def http_get(url: str, raw: bool = False, timeout: float = 30):
    """GETs a URL: its body (gunzipped where the server zipped it), parsed as JSON unless `raw`."""
    import gzip
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = response.read()
    body = gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body
    return body if raw else json.loads(body)


@contextlib.contextmanager
def tensorboard_server(run_root: Path, ready, timeout: float = 120):
    """A real TensorBoard server (`lenet-tf tensorboard`, a process of its own)
    over `run_root`, yielded as its base URL once `ready(base)` is true (asked
    every half second; a server that does not answer yet counts as not ready).
    Fails, with the server's output, when it ends first or is not ready within
    `timeout` seconds; stopped on the way out."""
    import subprocess
    import time

    port, = free_ports(1)
    process = subprocess.Popen(
        [sys.executable, "-m", "lenet_tf", "tensorboard", "--run-dir", str(run_root), "--port", str(port)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if ready(base):
                    break
            except OSError:
                pass  # Not serving yet.
            if time.monotonic() > deadline:
                pytest.fail(f"TensorBoard over {run_root} not ready within {timeout:.0f} s")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
