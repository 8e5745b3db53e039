"""Turning arbitrary image files into 28x28 inputs that look like the training data.

The datasets show one light object on a black background, cropped to the
object and centred. For a file a user gives us:

  1. decode (PNG, JPEG, anything Pillow reads), apply its EXIF rotation;
  2. flatten transparency onto the background and convert to grey;
  3. invert when the picture is dark-on-light (`invert="auto"` decides from
     the border, which is background in nearly every photo of one object);
  4. crop to the bounding box of the object (pixels above 10% of the peak);
  5. resize, keeping the aspect ratio, so the longer side is 28 pixels
     (Fashion-MNIST's framing) or 20 (MNIST's, which pads digits by 4);
  6. paste into the centre of a black 28x28 canvas.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lenet_tf.data import IMAGE_SIZE
from lenet_tf.errors import UsageError

# Bigger than any sensible photo; a decompression bomb is refused before decoding.
MAX_PIXELS = 50_000_000
MAX_FILE_BYTES = 100 * 2**20
INVERT_CHOICES = ("auto", "yes", "no")
OBJECT_THRESHOLD = 0.1
FRAME_SIZE = {"fashion_mnist": 28, "mnist": 20}


def load_image(path: str | Path, dataset: str = "fashion_mnist", invert: str = "auto") -> np.ndarray:
    """Returns a uint8 (28, 28, 1) array ready for the model, or raises UsageError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if invert not in INVERT_CHOICES:
        raise UsageError(f"--invert must be one of {', '.join(INVERT_CHOICES)} (got {invert!r})")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise UsageError(f"{path}: cannot read ({error.strerror})") from None
    if size > MAX_FILE_BYTES:
        raise UsageError(f"{path}: file is {size // 2**20} MiB, more than the {MAX_FILE_BYTES // 2**20} MiB limit")
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise UsageError(
                    f"{path}: {image.width}x{image.height} pixels is more than the {MAX_PIXELS:,} pixel limit"
                )
            image = ImageOps.exif_transpose(image)
            image.load()
            grey = _to_grey(image, invert)
    except UsageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        # OSError covers truncated files ("image file is truncated").
        reason = ("not an image Pillow can read" if isinstance(error, UnidentifiedImageError)
                  else f"cannot decode the image ({error}); the file is truncated or corrupt")
        raise UsageError(f"{path}: {reason}") from None
    return frame(grey, FRAME_SIZE.get(dataset, IMAGE_SIZE))[..., np.newaxis]


def _to_grey(image, invert: str) -> np.ndarray:
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        # Transparent areas are background: black for light-on-dark input,
        # white when the user says the picture is dark-on-light.
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if invert == "yes" else (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    if invert == "yes" or (invert == "auto" and _border_mean(grey) > 127):
        grey = 255.0 - grey
    return grey


def _border_mean(grey: np.ndarray) -> float:
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    return float(border.mean())


def frame(grey: np.ndarray, longest_side: int) -> np.ndarray:
    """Crops to the object, scales its longer side to `longest_side`, centres it on 28x28."""
    from PIL import Image

    peak = float(grey.max())
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    if peak <= 0:
        return canvas  # A blank picture stays blank.
    is_object = grey > OBJECT_THRESHOLD * peak
    rows = np.flatnonzero(is_object.any(axis=1))
    columns = np.flatnonzero(is_object.any(axis=0))
    cropped = grey[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
    height, width = cropped.shape
    scale = longest_side / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    resized = Image.fromarray(np.clip(cropped, 0, 255).astype(np.uint8)).resize(
        (new_width, new_height), Image.Resampling.LANCZOS
    )
    top, left = (IMAGE_SIZE - new_height) // 2, (IMAGE_SIZE - new_width) // 2
    canvas[top:top + new_height, left:left + new_width] = np.asarray(resized)
    return canvas
