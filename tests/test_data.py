import gzip
import hashlib
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from lenet_tf.data import (
    BackgroundLoad, check_host_answers, evaluation_batch_size, examples_per_epoch, load_datasets, load_idx_dir,
    make_dataset, read_idx,
)
from lenet_tf.registry import IDX_STEMS, dataset_info
from lenet_tf.errors import UsageError

from conftest import write_idx, write_idx_dir


def test_reads_real_mnist_with_the_canonical_sizes(mnist_datasets):
    data = mnist_datasets
    assert data.train_images.shape == (60_000, 28, 28, 1) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (10_000, 28, 28, 1)
    assert data.train_labels.shape == (60_000,) and data.train_labels.dtype == np.int32
    assert set(np.unique(data.test_labels)) == set(range(10))
    # The first MNIST training label is famously a 5.
    assert data.train_labels[0] == 5


def test_reads_real_fashion_mnist_from_the_debian_package(fashion_mnist_dir):
    data = load_datasets("fashion_mnist")
    assert data.source == str(fashion_mnist_dir)
    assert data.train_images.shape == (60_000, 28, 28, 1)
    # Fashion-MNIST's first training image is an ankle boot (label 9).
    assert dataset_info("fashion_mnist").class_names[data.train_labels[0]] == "ankle boot"


def test_reads_uncompressed_and_gzip_idx_alike(tmp_path):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    raw = write_idx(tmp_path / "raw-idx3-ubyte", array, gz=False)
    packed = write_idx(tmp_path / "packed-idx3-ubyte", array, gz=True)
    np.testing.assert_array_equal(read_idx(raw), array)
    np.testing.assert_array_equal(read_idx(packed), array)


def test_reads_gzip_files_of_several_members_and_zero_padding_as_gzip_does(tmp_path):
    array = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    payload = write_idx(tmp_path / "one-idx3-ubyte", array, gz=False).read_bytes()
    # Split inside the header and inside the data: every read crosses a member.
    members = gzip.compress(payload[:6]) + b"\0" * 5 + gzip.compress(payload[6:1000]) + gzip.compress(payload[1000:])
    path = tmp_path / "members-idx3-ubyte.gz"
    path.write_bytes(members)
    assert gzip.decompress(members.replace(b"\0" * 5, b"")) == payload
    np.testing.assert_array_equal(read_idx(path), array)


def test_rejects_a_gzip_file_with_a_bad_checksum(tmp_path):
    path = write_idx(tmp_path / "labels-idx1-ubyte", np.arange(10, dtype=np.uint8))
    compressed = bytearray(path.read_bytes())
    compressed[-8] ^= 0xFF  # The CRC-32 of the data, in gzip's trailer.
    path.write_bytes(bytes(compressed))
    with pytest.raises(UsageError, match="cannot read .*re-download it"):
        read_idx(path)


def test_rejects_wrong_magic(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + b"\x00" * 100))
    with pytest.raises(UsageError, match="magic"):
        read_idx(path)


def test_rejects_truncated_payload(tmp_path, fashion_mnist_dir):
    payload = gzip.decompress((fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(payload[:-10])
    with pytest.raises(UsageError, match="truncated"):
        read_idx(path)


def test_rejects_truncated_gzip_stream(tmp_path, fashion_mnist_dir):
    compressed = (fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(UsageError, match="re-download"):
        read_idx(path)


def test_rejects_trailing_garbage(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x01\x02\x03\x04")
    with pytest.raises(UsageError, match="longer than its header"):
        read_idx(path)


def test_rejects_image_and_label_counts_that_disagree(tmp_path):
    directory = write_idx_dir(tmp_path / "data", train=10, test=5)
    write_idx(directory / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8))
    with pytest.raises(UsageError, match="5 test images but 7 labels"):
        load_idx_dir(directory)


def test_rejects_wrong_image_size(tmp_path):
    directory = write_idx_dir(tmp_path / "data", train=10, test=5)
    write_idx(directory / "train-images-idx3-ubyte", np.zeros((10, 32, 32), np.uint8))
    with pytest.raises(UsageError, match=r"expected \(N, 28, 28\)"):
        load_idx_dir(directory)


def test_explicit_folder_must_exist_and_have_the_files(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_datasets("mnist", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="train-images-idx3-ubyte"):
        load_datasets("mnist", str(tmp_path / "empty"))


def test_environment_variable_is_searched_before_system_locations(tmp_path, monkeypatch):
    directory = write_idx_dir(tmp_path / "mine", train=12, test=6)
    monkeypatch.setenv("LENET_TF_DATA_DIR", str(directory))
    data = load_datasets("fashion_mnist")
    assert data.source == str(directory) and len(data.train_images) == 12


def test_environment_variable_as_a_data_root_holds_one_folder_per_dataset(tmp_path, monkeypatch, fashion_mnist_dir):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    directory = write_idx_dir(tmp_path / "root" / "mnist", train=9, test=3)
    monkeypatch.setenv("LENET_TF_DATA_DIR", str(tmp_path / "root"))
    assert load_datasets("mnist").source == str(directory)
    # A dataset the root has no folder for is searched for further on.
    assert load_datasets("fashion_mnist").source == str(fashion_mnist_dir)


def test_keras_cache_folder_is_found(tmp_path, monkeypatch):
    monkeypatch.delenv("LENET_TF_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    directory = write_idx_dir(tmp_path / "keras" / "datasets" / "mnist", train=9, test=3)
    data = load_datasets("mnist")
    assert data.source == str(directory)


def test_keras_cache_npz_is_read_as_keras_writes_it(tmp_path, monkeypatch):
    """keras.datasets.mnist.load_data() keeps MNIST as one .npz in the Keras cache."""
    monkeypatch.delenv("LENET_TF_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    rng = np.random.default_rng(0)
    npz = tmp_path / "keras" / "datasets" / "mnist.npz"
    npz.parent.mkdir(parents=True)
    np.savez(npz, x_train=rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), y_train=np.arange(7, dtype=np.uint8),
             x_test=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), y_test=np.arange(3, dtype=np.uint8))
    data = load_datasets("mnist")
    assert data.source == str(npz)
    assert data.train_images.shape == (7, 28, 28, 1) and data.train_labels.tolist() == list(range(7))
    npz.write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="cannot read .*mnist.npz"):
        load_datasets("mnist")


def test_offline_with_nothing_found_names_every_option(tmp_path, monkeypatch):
    monkeypatch.delenv("LENET_TF_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    # tensorflow_datasets is really tried; this machine has no internet, and
    # an empty data_dir stops it from finding a prepared copy.
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(UsageError) as error:
        load_datasets("mnist")
    message = str(error.value)
    for hint in ("--data-dir", "LENET_TF_DATA_DIR", "Keras cache", "tensorflow_datasets"):
        assert hint in message
    # Its download host was asked first (refused or unknown on an offline
    # machine), not tried for minutes file by file.
    assert "cannot reach storage.googleapis.com:443" in message or "did not answer within" in message
    assert "\n" not in message


@pytest.mark.slow
def test_tensorflow_datasets_downloads_and_prepares_real_mnist(tmp_path, monkeypatch, mnist_datasets):
    # The download path for real, from a web server on this machine: the
    # builder's download URL points at it, tensorflow_datasets fetches the
    # four files over HTTP and prepares the dataset as it would online.
    import tensorflow_datasets as tfds

    from lenet_tf.webpage import make_server

    idx_folder = Path(mnist_datasets.source)
    if not all((idx_folder / f"{stem}.gz").is_file() for stem in IDX_STEMS.values()):
        pytest.skip(f"real MNIST was not read from the four .gz files ({mnist_datasets.source})")
    # The package's own quiet file server (the one `lenet-tf serve-web` runs).
    with make_server(idx_folder, port=0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setattr(tfds.image_classification.MNIST, "URL", f"http://127.0.0.1:{server.server_port}/")
        monkeypatch.delenv("LENET_TF_DATA_DIR", raising=False)
        monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
        monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
        data = load_datasets("mnist")
        server.shutdown()
    assert data.source == "tensorflow_datasets"
    assert data.train_images.shape == (60_000, 28, 28, 1) and data.train_images.dtype == np.uint8
    assert data.train_labels.dtype == np.int32
    # tensorflow_datasets stores the examples in its own order: the same
    # (image, label) pairs as the IDX files, each exactly once.
    for split in ("train", "test"):
        assert _pairs(getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")) == _pairs(
            getattr(mnist_datasets, f"{split}_images"), getattr(mnist_datasets, f"{split}_labels"))


def test_host_check_fails_fast_for_a_closed_port_and_passes_for_a_listening_one():
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        check_host_answers(f"http://127.0.0.1:{port}/files/")
    # The port is closed now: refused at once, well within the timeout.
    with pytest.raises(ConnectionError, match=f"cannot reach 127.0.0.1:{port}"):
        check_host_answers(f"http://127.0.0.1:{port}/files/", timeout=30)


def _pairs(images: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
    return sorted((hashlib.sha1(image.tobytes()).digest(), int(label)) for image, label in zip(images, labels))


def test_background_load_reads_the_same_splits_and_steps_aside_when_it_cannot(tmp_path, monkeypatch):
    folder = write_idx_dir(tmp_path / "idx", train=20, test=10, seed=3)
    loading = BackgroundLoad("mnist", str(folder))
    loaded, expected = loading.result("mnist", str(folder)), load_datasets("mnist", str(folder))
    assert loaded.source == expected.source == str(folder)
    for split in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(loaded, split), getattr(expected, split))
    # Read for another dataset or folder than the run's: not used.
    assert loading.result("fashion_mnist", str(folder)) is None
    assert loading.result("mnist", None) is None
    # A failed local search leaves the foreground load to search (and to say
    # why it failed): the background never downloads.
    missing = BackgroundLoad("mnist", str(tmp_path / "nowhere"))
    assert missing.result("mnist", str(tmp_path / "nowhere")) is None


def test_pipeline_batches_shuffles_with_seed_and_keeps_dtypes():
    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1) * np.ones((1, 28, 28, 1), np.uint8)
    labels = np.arange(100, dtype=np.int32) % 10
    dataset = make_dataset(images, labels, global_batch_size=32, shuffle=True, seed=7)
    batches = list(dataset.as_numpy_iterator())
    assert [len(batch[0]) for batch in batches] == [32, 32, 32, 4]
    first_images, first_labels = batches[0]
    assert first_images.dtype == np.uint8 and first_images.shape == (32, 28, 28, 1)
    assert first_labels.dtype == np.int32
    order = np.concatenate([batch[0][:, 0, 0, 0] for batch in batches])
    assert sorted(order.tolist()) == list(range(100))  # Every example exactly once.
    assert order.tolist() != list(range(100))  # Shuffled across batches, not within.
    # Pairs stay intact through the shuffle.
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), order % 10)
    # The same seed gives the same first epoch; the next epoch is reshuffled.
    again = make_dataset(images, labels, 32, True, seed=7)
    assert np.array_equal(next(again.as_numpy_iterator())[0], first_images)
    second_epoch = np.concatenate([b[0][:, 0, 0, 0] for b in dataset.as_numpy_iterator()])
    assert second_epoch.tolist() != order.tolist()


def test_evaluation_pipeline_keeps_order():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * np.ones((1, 28, 28, 1), np.uint8)
    dataset = make_dataset(images, np.zeros(10, np.int32), 4, shuffle=False, seed=0)
    order = np.concatenate([b[0][:, 0, 0, 0] for b in dataset.as_numpy_iterator()])
    assert order.tolist() == list(range(10))


def test_pipelines_run_without_tf_data_autotuning():
    """Autotuning's thread held up the end of each pass over the data by up to
    seconds (lenet_tf.data.make_dataset); every pipeline turns it off."""
    images = np.zeros((8, 28, 28, 1), np.uint8)
    labels = np.zeros(8, np.int32)
    for shuffle, augment in ((True, "shift_flip"), (True, "none"), (False, "none")):
        dataset = make_dataset(images, labels, 4, shuffle=shuffle, seed=0, augment=augment)
        assert dataset.options().autotune.enabled is False
        assert sum(len(batch[1]) for batch in dataset.as_numpy_iterator()) == 8


def test_unreadable_data_folder_is_refused(tmp_path):
    """Runs as an unprivileged user (seteuid), since root reads through permission bits."""
    import os
    import subprocess
    import sys

    directory = write_idx_dir(tmp_path / "locked")
    directory.chmod(0o000)
    script = (
        "import os, sys\n"
        "from lenet_tf.data import load_datasets\n"
        "from lenet_tf.errors import UsageError\n"
        "if os.geteuid() == 0: os.seteuid(65534)\n"
        "try:\n"
        f"    load_datasets('mnist', {str(directory)!r})\n"
        "except UsageError as error:\n"
        "    print(error); sys.exit(2)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=str(__import__("conftest").REPO_ROOT)))
    directory.chmod(0o755)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert str(directory) in completed.stdout and "fix its permissions" in completed.stdout


@pytest.mark.parametrize("count, global_batch, replicas, expected", [
    (512, 512, 2, 512), (513, 512, 2, 512), (515, 512, 2, 515), (60_000, 768, 3, 60_000), (60_001, 768, 8, 60_001), (59_905, 768, 8, 59_904),
    (7, 6, 3, 6), (513, 512, 1, 513),
])
def test_an_epoch_leaves_out_only_a_last_batch_too_small_to_share(count, global_batch, replicas, expected):
    assert examples_per_epoch(count, global_batch, replicas) == expected


def test_evaluation_batches_give_every_replica_a_share_of_every_batch():
    assert evaluation_batch_size(513, 512, 1) == 512
    assert evaluation_batch_size(513, 512, 2) == 510  # 510 + 3: no empty replica, an even first batch.
    assert evaluation_batch_size(10_000, 768, 3) == 768
    assert evaluation_batch_size(9, 8, 2) == 6
    assert evaluation_batch_size(9, 2, 2) == 6  # Nothing up to the global batch shares 9: the smallest above it.
    assert evaluation_batch_size(5, 6, 3) is None and evaluation_batch_size(1, 1024, 2) is None
    rng = np.random.default_rng(7)
    for _ in range(2000):
        count, replicas = int(rng.integers(1, 300)), int(rng.integers(2, 9))
        global_batch = replicas * int(rng.integers(1, 40))
        size = evaluation_batch_size(count, global_batch, replicas)
        valid = [candidate for candidate in range(replicas, count + 1, replicas)
                 if count % candidate == 0 or count % candidate >= replicas]
        within = [candidate for candidate in valid if candidate <= global_batch]
        if size is None:
            assert not valid, (count, global_batch, replicas)
        else:
            assert size == (max(within) if within else min(valid)), (count, global_batch, replicas)
