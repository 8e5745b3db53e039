"""Decoding a folder's pictures (lenet_tf.decoding): every path gives the array
read_picture (Pillow) gives, and the worker processes give what one process gives."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lenet_tf import decoding
from lenet_tf.errors import UsageError
from lenet_tf.images import border_level, read_picture

from conftest import REPO_ROOT, shape_picture


def _expected(path: Path) -> np.ndarray:
    return read_picture(path, decoding.FOLDER_FRAMING)[..., 0]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _paeth(left: int, upper: int, corner: int) -> int:
    estimate = left + upper - corner
    to_left, to_upper, to_corner = abs(estimate - left), abs(estimate - upper), abs(estimate - corner)
    return left if to_left <= to_upper and to_left <= to_corner else upper if to_upper <= to_corner else corner


def _png(pixels: np.ndarray, filters: list[int], idat_pieces: int = 1, extra: list[bytes] = ()) -> bytes:
    """A PNG of uint8 (height, width, 1 or 3) pixels whose rows use the given filters,
    written out here from the PNG specification (Pillow's writer picks its own)."""
    height, width, channels = pixels.shape
    levels = pixels.reshape(height, width * channels).astype(int)
    rows = bytearray()
    for row, kind in enumerate(filters):
        rows.append(kind)
        for column in range(width * channels):
            left = levels[row, column - channels] if column >= channels else 0
            upper = levels[row - 1, column] if row else 0
            corner = levels[row - 1, column - channels] if row and column >= channels else 0
            prediction = [0, left, upper, (left + upper) // 2, _paeth(left, upper, corner)][kind]
            rows.append((levels[row, column] - prediction) % 256)
    compressed = zlib.compress(bytes(rows))
    step = -(-len(compressed) // idat_pieces)
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + b"".join(extra)
            + b"".join(_chunk(b"IDAT", compressed[start:start + step]) for start in range(0, len(compressed), step))
            + _chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3], ids=["grey", "rgb"])
def test_every_png_filter_is_undone_as_pillow_undoes_it(tmp_path, channels):
    """Rows written with each of PNG's five filters, decoded here (libspng):
    Pillow's pixels, through the recipe as read_picture applies it."""
    rng = np.random.default_rng(7)
    names = []
    for height, width, count in ((28, 28, 30), (5, 7, 10), (1, 1, 3), (9, 3, 1)):
        pixels = rng.integers(0, 256, (count, height, width, channels), dtype=np.uint8)
        for index, picture in enumerate(pixels):
            data = _png(picture, [int(kind) for kind in rng.integers(0, 5, height)])
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))).reshape(picture.shape), picture)
            levels = decoding._plain_png_levels(data)
            assert levels is not None and levels.shape == (height, width)
            if channels == 1:
                np.testing.assert_array_equal(levels, picture[..., 0])
            names.append(f"{height}x{width}_{index}.png")
            (tmp_path / names[-1]).write_bytes(data)
    decoded = decoding.decode_batch(str(tmp_path), names)
    assert decoded.failures == []
    np.testing.assert_array_equal(decoded.images, np.stack([_expected(tmp_path / name) for name in names]))


def test_pngs_decoded_here_give_read_picture_s_arrays(tmp_path):
    """Grey and RGB, 28x28 and other sizes, light on dark and dark on light,
    several IDAT chunks, ancillary chunks: the array read_picture makes;
    palette, alpha, 16-bit and transparent PNGs are left to Pillow, and so is
    a file whose header chunk is broken, which fails as Pillow fails it."""
    rng = np.random.default_rng(1)
    pictures = {
        "small.png": Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)),
        "small_light.png": Image.fromarray(rng.integers(100, 256, (28, 28), dtype=np.uint8)),
        "small_dark_on_light.png": Image.fromarray(shape_picture(light_on_dark=False, size=(28, 28), offset=(4, 8))),
        "large.png": Image.fromarray(shape_picture(size=(61, 47))),
        "dark_on_light.png": Image.fromarray(shape_picture(light_on_dark=False)),
        "compressed.png": Image.fromarray(shape_picture(size=(90, 33))),
        "colour.png": Image.fromarray(np.stack([shape_picture(), shape_picture() // 2, 255 - shape_picture()], -1)),
        "colour_28.png": Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)),
    }
    left_to_pillow = {
        "palette.png": Image.fromarray(shape_picture()).convert("P"),
        "alpha.png": Image.fromarray(shape_picture()).convert("RGBA"),
        "16bit.png": Image.fromarray(shape_picture().astype(np.uint16) * 257),
        "transparent.png": Image.fromarray(shape_picture()),
    }
    for name, image in {**pictures, **left_to_pillow}.items():
        options = {"compress_level": 9} if name == "compressed.png" else {}
        if name == "transparent.png":
            options["transparency"] = 0
        image.save(tmp_path / name, **options)
    # Written here: several IDAT chunks, text and gamma chunks before them, every filter.
    written = _png(shape_picture(size=(28, 28))[..., np.newaxis], [row % 5 for row in range(28)], idat_pieces=3,
                   extra=[_chunk(b"tEXt", b"Comment\x00hello"), _chunk(b"gAMA", struct.pack(">I", 45455))])
    (tmp_path / "chunks.png").write_bytes(written)
    pictures["chunks.png"] = None
    # The IHDR chunk's checksum broken, in that file and in one of the usual layout (IHDR, IDAT, IEND).
    for name, whole in (("broken_header.png", written), ("broken_usual_header.png",
                                                         (tmp_path / "small.png").read_bytes())):
        broken = bytearray(whole)
        broken[29] ^= 0xFF
        (tmp_path / name).write_bytes(bytes(broken))
    # A header that says interlaced over rows that are not (with its checksum), a chunk Pillow might refuse (a compressed profile), IDAT chunks apart, and pixels that
    # inflate to more than the header's rows need: whoever reads them, read_picture's arrays or its error.
    pixels = shape_picture(size=(28, 28))[..., np.newaxis]
    split = _png(pixels, [0] * 28, idat_pieces=2)
    too_much = _png(shape_picture(size=(29, 28))[..., np.newaxis], [0] * 29)
    header = too_much[12:16] + struct.pack(">IIBBBBB", 28, 28, 8, 0, 0, 0, 0)
    interlaced_header = written[12:28] + b"\x01"
    unusual = {
        "interlaced.png": written[:12] + interlaced_header + struct.pack(">I", zlib.crc32(interlaced_header))
        + written[33:],
        "profile.png": _png(pixels, [0] * 28, extra=[_chunk(b"iCCP", b"name\x00\x00" + zlib.compress(b"x"))]),
        "apart.png": split[:split.rindex(b"IDAT") - 4] + _chunk(b"tEXt", b"a\x00b") + split[split.rindex(b"IDAT") - 4:],
        "too_much.png": too_much[:12] + header + struct.pack(">I", zlib.crc32(header)) + too_much[33:],
    }
    for name, data in unusual.items():
        (tmp_path / name).write_bytes(data)
    for name in pictures:
        assert decoding._plain_png_levels((tmp_path / name).read_bytes()) is not None, name
    for name in [*left_to_pillow, "broken_header.png", "broken_usual_header.png"]:
        assert decoding._plain_png_levels((tmp_path / name).read_bytes()) is None, name
    for name in unusual:
        try:
            expected = _expected(tmp_path / name)
        except UsageError as pillow_says:
            assert decoding.decode_batch(str(tmp_path), [name]).failures == [(name, str(pillow_says))]
        else:
            np.testing.assert_array_equal(decoding.decode_batch(str(tmp_path), [name]).images[0], expected,
                                          err_msg=name)
    names = [*pictures, *left_to_pillow]
    decoded = decoding.decode_batch(str(tmp_path), names)
    assert decoded.failures == []
    for index, name in enumerate(names):
        np.testing.assert_array_equal(decoded.images[index], _expected(tmp_path / name), err_msg=name)
        assert decoded.sizes[index] == (tmp_path / name).stat().st_size
        assert decoded.mtimes[index] == (tmp_path / name).stat().st_mtime_ns
    for name in ("broken_header.png", "broken_usual_header.png"):
        with pytest.raises(UsageError) as pillow_says:
            _expected(tmp_path / name)
        assert decoding.decode_batch(str(tmp_path), [name]).failures == [(name, str(pillow_says.value))]
    damaged = (tmp_path / "small.png").read_bytes()
    (tmp_path / "damaged.png").write_bytes(damaged[:60] + bytes(20) + damaged[80:])
    assert decoding.decode_batch(str(tmp_path), ["damaged.png"]).failures[0][0] == "damaged.png"


def test_real_pictures_as_grey_and_rgb_pngs_give_read_picture_s_arrays(tmp_path, fashion_mnist_dir):
    from lenet_tf.data import load_idx_dir

    pictures = load_idx_dir(fashion_mnist_dir).test_images[:96, ..., 0]
    rng = np.random.default_rng(0)
    names = []
    for index, picture in enumerate(pictures):
        kind = index % 6
        image = Image.fromarray(255 - picture if kind in (1, 4) else picture)  # Dark on light.
        if kind in (2, 4, 5):
            image = image.resize((int(rng.integers(20, 90)), int(rng.integers(20, 90))), Image.BILINEAR)
        if kind in (3, 4, 5):  # Colour whose channels differ, so the grey conversion's weights matter.
            levels = np.asarray(image).astype(np.int32)
            image = Image.fromarray(np.stack([levels, levels * 3 // 4 + 20, 255 - levels // 2], -1)
                                    .clip(0, 255).astype(np.uint8))
        names.append(f"{index:03d}_{kind}.png")
        image.save(tmp_path / names[-1])
    assert all(decoding._plain_png_levels((tmp_path / name).read_bytes()) is not None for name in names)
    decoded = decoding.decode_batch(str(tmp_path), names)
    assert decoded.failures == []
    expected = np.stack([_expected(tmp_path / name) for name in names])
    assert (expected[1::6] > 0).mean() > 0.2  # Dark on light, inverted by the recipe: both paths must invert.
    np.testing.assert_array_equal(decoded.images, expected)


def test_the_border_count_decides_as_border_level_does():
    """28x28 pictures whose border's median sits at the threshold, every way
    round: the counted decision (sorting only the undecided) equals border_level's."""
    rng = np.random.default_rng(3)
    pictures = rng.integers(0, 256, (4000, 28, 28), dtype=np.uint8)
    for index, picture in enumerate(pictures):
        # Border levels drawn around the threshold, with exactly k of the 112 above it for some.
        around = rng.integers(120, 136, 112).astype(np.uint8)
        if index % 2:
            above = int(rng.integers(54, 59))
            around = np.where(np.arange(112) < above, rng.integers(128, 256, 112), rng.integers(0, 128, 112))
            around = rng.permutation(around).astype(np.uint8)
        picture[0], picture[-1] = around[:28], around[28:56]
        picture[1:-1, 0], picture[1:-1, -1] = around[56:82], around[84:110]
    expected = np.stack([255 - picture if border_level(picture.astype(np.float32)) > 127 else picture
                         for picture in pictures])
    assert 0.2 < (expected != pictures).any(axis=(1, 2)).mean() < 0.8
    np.testing.assert_array_equal(decoding._recipe_for_grey(pictures.copy()), expected)


def test_files_past_the_size_limit_and_empty_ones_are_left_to_the_caller(tmp_path, monkeypatch):
    from lenet_tf import images

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "plain.png")
    (tmp_path / "empty.png").write_bytes(b"")
    limit = (tmp_path / "plain.png").stat().st_size - 1
    monkeypatch.setattr(decoding, "MAX_FILE_BYTES", limit)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", limit)
    decoded = decoding.decode_batch(str(tmp_path), ["plain.png", "empty.png"])
    assert len(decoded.failures) == 1 and "more than the 0 MiB limit" in decoded.failures[0][1]
    assert decoded.sizes.tolist() == [limit + 1, 0]  # An empty file is refused by its caller, by its size.


def test_workers_are_forked_only_where_no_other_thread_runs():
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        with decoding.DecoderPool(1) as pool:
            assert pool.workers[0].process is not None  # A fresh interpreter.
    finally:
        release.set()
        other.join()
    single = subprocess.run(
        [sys.executable, "-c", "from lenet_tf.decoding import DecoderPool\n"
                               "with DecoderPool(1) as pool:\n    print(pool.workers[0].process is None)"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert single.stdout.strip() == "True", single.stderr[-2000:]  # Forked.


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "fresh_interpreters"])
def test_worker_processes_decode_as_one_process_does(tmp_path, fork):
    """Forked workers and fresh interpreters, with another thread running
    beside them: the same arrays, sizes and failures as one process, in order."""
    rng = np.random.default_rng(0)
    names = []
    for index in range(900):
        (tmp_path / str(index % 3)).mkdir(exist_ok=True)
        names.append(f"{index % 3}/{index:04d}.{'png' if index % 7 else 'jpg'}")
        Image.fromarray(rng.integers(0, 256, (28 + index % 5, 28), dtype=np.uint8)).save(tmp_path / names[-1])
    (tmp_path / "0" / "bad.png").write_bytes(b"not a picture")
    names.insert(450, "0/bad.png")
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        batches = []
        with decoding.DecoderPool(2, fork=fork) as pool:
            assert all((worker.process is None) == fork for worker in pool.workers)
            pooled = pool.decode(str(tmp_path), names,
                                 lambda images, start, stop: batches.append((start, stop, images[start:stop].copy())))
            again = pool.decode(str(tmp_path), names[:500])  # A pool serves many reads.
    finally:
        release.set()
        other.join()
    inline = decoding.decode_batch(str(tmp_path), names)
    np.testing.assert_array_equal(pooled.images, inline.images)
    np.testing.assert_array_equal(pooled.sizes, inline.sizes)
    np.testing.assert_array_equal(pooled.mtimes, inline.mtimes)
    assert pooled.failures == inline.failures and [path for path, _ in inline.failures] == ["0/bad.png"]
    np.testing.assert_array_equal(again.images, inline.images[:500])
    # Each batch handed on as it landed, with its rows already in place; together, every row once.
    assert sorted(row for start, stop, _ in batches for row in range(start, stop)) == list(range(len(names)))
    for start, stop, rows in batches:
        np.testing.assert_array_equal(rows, inline.images[start:stop])
