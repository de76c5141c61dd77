"""Reference images: any PIL-readable file to uint8 RGB, whatever its mode, with a clear error for the rest.

* 16-bit (``I;16*``) and 32-bit integer (``I``) grey images are scaled from their bit depth to 8 bit (not clipped),
  float (``F``) images from [0, 1]; 16-bit RGB PNGs are read by PIL at 8 bit already.
* Palette (``P``/``PA``), ``LA``, ``RGBA``, ``CMYK``, ``YCbCr``, ``1`` convert through PIL (alpha is dropped, as the
  official ``Image.convert("RGB")``); the EXIF orientation is applied.
* A file that is not an image, is truncated, or exceeds PIL's decompression-bomb limit is an :class:`ImageError`
  naming the file; a reference much smaller than the output size is upscaled with a warning.
"""
from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger("svi_jax.images")

SMALL_FACTOR = 4  # warn when the reference is this many times smaller than the output on a side


class ImageError(ValueError):
    """An image file cannot be used; the message names it."""


def _to_rgb(img) -> "Image.Image":
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        if mode == "I":
            top = a.max() if a.size else 0
            depth = 8 if top <= 255 else 16 if top <= 65535 else 32
            scale = 255.0 / (2 ** depth - 1)
        else:
            scale = 255.0 / 65535.0
        a = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, np.float64)
        a = np.clip(np.rint(np.nan_to_num(a) * (255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0)), 0, 255)
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_rgb(path: str) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of any image file (see the module doc)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return np.asarray(_to_rgb(img), np.uint8)
    except Image.DecompressionBombError as e:
        import re

        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(m.group(1)) / 1e6:.1f} MP" if m else "too large"
        raise ImageError(f"image {path} is {size}, above PIL's safety limit of "
                         f"{2 * Image.MAX_IMAGE_PIXELS / 1e6:.1f} MP (a decompression-bomb guard): downscale it "
                         f"first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image file PIL can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image {path} is damaged or truncated ({str(e).splitlines()[0][:120]})") from None


def reference_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of an image as displayed (EXIF orientation 5-8 swaps the sides), without decoding it."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image file PIL can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"image {path} is damaged or truncated ({str(e).splitlines()[0][:120]})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_image(path: str, height: int, width: int) -> np.ndarray:
    """An RGB image resized to ``width x height`` (PIL bicubic, as the official ``Image.resize``): uint8 [H, W, 3]."""
    from PIL import Image

    a = load_rgb(path)
    h, w = a.shape[:2]
    if (h, w) == (height, width):
        return a
    if h * SMALL_FACTOR <= height or w * SMALL_FACTOR <= width:
        log.warning("reference %s is %dx%d, much smaller than the output %dx%d: it is upscaled %.1fx and will look "
                    "blurred", path, w, h, width, height, max(height / h, width / w))
    return np.asarray(Image.fromarray(a).resize((width, height), Image.BICUBIC), np.uint8)
