"""Turning arbitrary image files into 28x28 inputs framed the way the training data is.

The datasets show one light object on a black background, framed by a fixed
recipe that lenet_tf.registry records per dataset (Fashion-MNIST: longer
side 28 pixels, centred; MNIST: longer side 20, centred by its centre of
mass). For a file a user gives us:

  1. decode (PNG, JPEG, anything Pillow reads), apply its EXIF rotation;
  2. flatten transparency onto the background and convert to grey;
  3. invert when the picture is dark-on-light (`invert="auto"` decides from
     the border, which is background in nearly every picture of one object),
     and take the border's level as black;
  4. a 28x28 picture already framed as the dataset frames it is used as it
     is, pixel for pixel (a dataset image saved as a file gets the same
     answer as the array it came from);
  5. anything else is framed by the dataset's recipe: crop to the object
     (pixels above 10 % of the peak), scale its longer side to the recipe's
     size keeping the aspect ratio, and centre it on a black 28x28 canvas.

The web page does the same steps in JavaScript with the constants that
`framing_constants()` writes beside it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from lenet_tf.errors import UsageError
from lenet_tf.registry import IMAGE_SIZE, DatasetInfo, Framing, dataset_info

# Bigger than any sensible photo; a decompression bomb is refused before decoding.
MAX_PIXELS = 50_000_000
# Pillow warns about pictures between its limit and twice it; the package
# refuses them itself in one line (its own limit is lower), so the warning
# would only be a second, noisier message. One filter, added once at import:
# changing the filters around each read would race with other threads.
warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit", module=r"PIL\.Image")
MAX_FILE_BYTES = 100 * 2**20
INVERT_CHOICES = ("auto", "yes", "no")
# The formats whose files may carry an EXIF orientation.
_EXIF_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP")
# A pixel belongs to the object above this fraction of the brightest pixel.
OBJECT_THRESHOLD = 0.1
# A picture whose border is brighter than this (0..255) is dark-on-light.
LIGHT_BORDER = 127
# How far a 28x28 picture's object may sit from where the recipe puts it, and
# how much shorter its longer side may be, and still count as already framed.
FRAMED_CENTRE_TOLERANCE = 3.0
FRAMED_SIZE_TOLERANCE = 3


def load_image(path: str | Path, dataset: str | DatasetInfo = "fashion_mnist", invert: str = "auto") -> np.ndarray:
    """Returns a uint8 (28, 28, 1) array ready for the model, framed as `dataset`
    (a built-in's name, or a DatasetInfo) frames its images, or raises UsageError."""
    return read_picture(path, dataset_info(dataset).framing, invert)


def read_picture(path: str | Path, framing: Framing, invert: str = "auto") -> np.ndarray:
    """`load_image` for a framing rather than a dataset (a folder of pictures
    is read in worker processes that are handed only its framing)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if invert not in INVERT_CHOICES:
        raise UsageError(f"--invert must be one of {', '.join(INVERT_CHOICES)} (got {invert!r})")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise UsageError(f"{path}: cannot read ({error.strerror})") from None
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; pass image files (a shell glob such as {path}/*.png)")
    if size == 0:
        raise UsageError(f"{path}: the file is empty (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise UsageError(f"{path}: file is {size // 2**20} MiB, more than the {MAX_FILE_BYTES // 2**20} MiB limit")
    try:
        image = Image.open(path)  # Reads the header only: the size is known before any pixel is decoded.
        with image:
            # Checked here rather than by turning Pillow's warning into an error: warnings.catch_warnings
            # changes process-wide state, and this runs in threads (while TensorFlow imports).
            limit = min(MAX_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_PIXELS)
            if image.width * image.height > limit:
                raise UsageError(f"{path}: {image.width}x{image.height} pixels is more than the {limit:,} pixel "
                                 "limit; refused as a possible decompression bomb")
            if image.format in _EXIF_FORMATS or "exif" in image.info:  # Reading EXIF is costly for a small picture.
                image = ImageOps.exif_transpose(image)
            image.load()
            grey = to_grey(image, invert)
    except UsageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UsageError(f"{path}: refused as a possible decompression bomb ({error})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        # OSError covers truncated files ("image file is truncated").
        reason = ("not an image Pillow can read" if isinstance(error, UnidentifiedImageError)
                  else f"cannot decode the image ({error}); the file is truncated or corrupt")
        raise UsageError(f"{path}: {reason}") from None
    return prepare(grey, framing)[..., np.newaxis]


def to_grey(image, invert: str = "auto") -> np.ndarray:
    """A Pillow image as float grey levels 0..255, light object on dark."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        # Transparent areas are background: black for light-on-dark input,
        # white when the user says the picture is dark-on-light.
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if invert == "yes" else (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit (and 32-bit) grey: Pillow's conversion to 8 bits would clip
        # everything above 255 to white; scale 0..65535 down to 0..255 instead.
        grey = np.asarray(image, dtype=np.float32) / 257.0
    else:
        grey = np.asarray(image if image.mode == "L" else image.convert("L"), dtype=np.float32)
    if invert == "yes" or (invert == "auto" and border_level(grey) > LIGHT_BORDER):
        grey = 255.0 - grey
    return grey


def border_level(grey: np.ndarray) -> float:
    """The median grey level of the outermost pixels: the background's."""
    border = np.sort(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]]))
    middle = len(border) // 2  # np.median's answer, without its overhead, which is large for a small picture.
    return float(border[middle]) if len(border) % 2 else (float(border[middle - 1]) + float(border[middle])) / 2


def prepare(grey: np.ndarray, framing: Framing) -> np.ndarray:
    """Grey levels (light on dark) -> the model's uint8 28x28 input."""
    if grey.shape == (IMAGE_SIZE, IMAGE_SIZE) and (framing.keep_model_size or is_framed(grey, framing)):
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    # Whatever the border shows (paper, a wall, JPEG noise) is black in the datasets.
    return frame(np.clip(grey - border_level(grey), 0, 255), framing)


def _object_box(grey: np.ndarray) -> tuple[int, int, int, int] | None:
    """Top, bottom, left, right (inclusive) of the pixels above the threshold; None if blank."""
    peak = float(grey.max())
    if peak <= 0:
        return None
    is_object = grey > OBJECT_THRESHOLD * peak
    rows = np.flatnonzero(is_object.any(axis=1))
    columns = np.flatnonzero(is_object.any(axis=0))
    return rows[0], rows[-1], columns[0], columns[-1]


def _centre(grey: np.ndarray, framing: Framing, box: tuple[int, int, int, int]) -> tuple[float, float]:
    """The point the recipe puts at the canvas centre: centre of mass, or of the box (row, column)."""
    if framing.centre == "mass":
        total = float(grey.sum())
        rows, columns = np.indices(grey.shape)
        return float((rows * grey).sum() / total), float((columns * grey).sum() / total)
    top, bottom, left, right = box
    return (top + bottom) / 2, (left + right) / 2


def is_framed(grey: np.ndarray, framing: Framing) -> bool:
    """Whether a 28x28 picture already looks as the recipe would frame it: its
    object's longer side about the recipe's size, its centre near the canvas centre."""
    box = _object_box(grey)
    if box is None:
        return True  # Blank stays blank.
    top, bottom, left, right = box
    longest = max(bottom - top, right - left) + 1
    if not framing.longest_side - FRAMED_SIZE_TOLERANCE <= longest <= framing.longest_side + 1:
        return False
    row, column = _centre(grey, framing, box)
    middle = (IMAGE_SIZE - 1) / 2
    return abs(row - middle) <= FRAMED_CENTRE_TOLERANCE and abs(column - middle) <= FRAMED_CENTRE_TOLERANCE


def frame(grey: np.ndarray, framing: Framing) -> np.ndarray:
    """Crops to the object, scales its longer side to the recipe's size keeping
    the aspect ratio, and centres it on a black 28x28 canvas as the recipe says."""
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    box = _object_box(grey)
    if box is None:
        return canvas  # A blank picture stays blank.
    top, bottom, left, right = box
    cropped = grey[top:bottom + 1, left:right + 1]
    height, width = cropped.shape
    scale = framing.longest_side / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    resized = resize_lanczos(np.clip(cropped, 0, 255).astype(np.uint8), new_height, new_width)
    row, column = _centre(resized.astype(np.float64), framing, (0, new_height - 1, 0, new_width - 1))
    middle = (IMAGE_SIZE - 1) / 2
    # Where the resized object's top-left corner lands; what falls outside the canvas is cut.
    offset_row, offset_column = int(round(middle - row)), int(round(middle - column))
    source_top, source_left = max(0, -offset_row), max(0, -offset_column)
    target_top, target_left = max(0, offset_row), max(0, offset_column)
    rows = min(new_height - source_top, IMAGE_SIZE - target_top)
    columns = min(new_width - source_left, IMAGE_SIZE - target_left)
    canvas[target_top:target_top + rows, target_left:target_left + columns] = \
        resized[source_top:source_top + rows, source_left:source_left + columns]
    return canvas


# Lanczos resampling (a = 3) of 8-bit grey, written out here rather than taken
# from Pillow so that the web page's JavaScript (lenet_tf/web/preprocess.js)
# can do exactly the same arithmetic: per axis, Pillow's own coefficients in
# 22-bit fixed point (its single-axis passes give identical bytes), the
# horizontal pass first, rounded to 8 bits in between.
_PRECISION_BITS = 32 - 8 - 2


def _lanczos_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) fixed-point weights of one resampling pass."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 3.0 * filter_scale
    weights = np.zeros((out_size, in_size))
    for out in range(out_size):
        middle = (out + 0.5) * scale
        first = max(0, int(middle - support + 0.5))
        last = min(in_size, int(middle + support + 0.5))
        x = (np.arange(first, last) - middle + 0.5) / filter_scale
        kernel = np.where((x >= -3.0) & (x < 3.0), np.sinc(x) * np.sinc(x / 3.0), 0.0)
        total = kernel.sum()
        if total != 0.0:
            kernel = kernel / total
        fixed = kernel * (1 << _PRECISION_BITS)
        weights[out, first:last] = np.trunc(np.where(fixed < 0, fixed - 0.5, fixed + 0.5))
    return weights


def _resample_rows(pixels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    # Integer arithmetic done in float64, exactly: every product and sum stays below 2**53.
    accumulated = pixels.astype(np.float64) @ weights.T + (1 << (_PRECISION_BITS - 1))
    return np.clip(np.floor(accumulated / (1 << _PRECISION_BITS)), 0, 255).astype(np.uint8)


def resize_lanczos(pixels: np.ndarray, new_height: int, new_width: int) -> np.ndarray:
    """uint8 (height, width) -> uint8 (new_height, new_width); an axis whose size stays is left alone."""
    height, width = pixels.shape
    if new_width != width:
        pixels = _resample_rows(pixels, _lanczos_weights(width, new_width))
    if new_height != height:
        pixels = _resample_rows(pixels.T, _lanczos_weights(height, new_height)).T
    return np.ascontiguousarray(pixels)


def framing_constants(dataset: str | DatasetInfo) -> dict:
    """Everything the web page needs to frame a picture exactly as `prepare` does."""
    framing = dataset_info(dataset).framing
    # Tolerances as wide as the canvas make every 28x28 picture count as framed: keep_model_size.
    return {
        "image_size": IMAGE_SIZE,
        "longest_side": framing.longest_side,
        "centre": framing.centre,
        "object_threshold": OBJECT_THRESHOLD,
        "light_border": LIGHT_BORDER,
        "framed_centre_tolerance": float(IMAGE_SIZE) if framing.keep_model_size else FRAMED_CENTRE_TOLERANCE,
        "framed_size_tolerance": IMAGE_SIZE if framing.keep_model_size else FRAMED_SIZE_TOLERANCE,
    }
