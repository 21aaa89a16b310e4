"""Opening images that users upload: size and pixel limits, clear messages, any mode to RGB.

Anything that is not a readable image of a sane size raises :class:`ImageError`, whose message is
meant for the user. Accepted images are returned as RGB: the first frame of an animation, EXIF
rotation applied, transparency composited on white, 16-bit and float images scaled to 8 bits.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_BYTES = 25 * 2**20
DEFAULT_MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """An upload that cannot be analysed; the message says why, for the user."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_upload(path: str | os.PathLike | None, max_bytes: int = DEFAULT_MAX_BYTES,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an uploaded file as an RGB image, or raise :class:`ImageError` saying what is wrong."""
    if not path:
        raise ImageError("No image: upload an image (or pick an example) first.")
    path = Path(path)
    if not path.is_file():
        raise ImageError("The upload did not arrive; please upload the image again.")
    size = path.stat().st_size
    if size == 0:
        raise ImageError("The file is empty (0 bytes).")
    if size > max_bytes:
        raise ImageError(f"The file is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(f"The image is too large: {width} x {height} = {width * height / 1e6:.0f} "
                                     f"million pixels; the limit is {max_pixels / 1e6:.0f} million.")
                image.seek(0)  # the first frame of an animation
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"The image is too large to decode safely ({error}).") from error
    except UnidentifiedImageError as error:
        raise ImageError(f"'{path.name}' is not an image in a format this app can read.") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"The image file is truncated or corrupt ({error}).") from error
