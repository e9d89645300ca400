"""Reading images and label masks from disk, whatever their mode.

Photos in the wild are grayscale, CMYK, palette, 16-bit or carry alpha; every one of them
becomes 8-bit RGB the way torchvision's ImageFolder loader does (``convert("RGB")``), except
16-bit images, which are scaled down rather than clipped. An unreadable or truncated file is
reported as a ``BadSample`` value instead of an exception, so a DataLoader worker can hand it
back to the main process, which applies the fail/skip policy with the file named.

Huge images: past PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 M pixels)
an image is still read, with one line of ours naming the file on the ``encoder_probe`` logger
(stderr unless logging is configured) instead of PIL's DecompressionBombWarning; past twice the
limit PIL refuses it and it is a bad image like any unreadable one (the fail/skip policy).
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger("encoder_probe.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class BadSample:
    """A sample that could not be read; ``fatal`` ones fail whatever the skip policy says."""

    index: int
    path: str
    reason: str
    fatal: bool = False


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale -> 8-bit by scaling the full range, not clipping."""
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(array * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_MODES:
        image = _to_8bit(image)
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


@contextmanager
def open_image(path: str | Path):
    """``Image.open`` + ``load()``, with PIL's DecompressionBombWarning replaced by our one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()
            _warn_if_huge(path, image.size)
            yield image


def _warn_if_huge(path, size) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    pixels = max(1, size[0]) * max(1, size[1])
    if limit and pixels > limit:  # PIL's own rule; past 2 x limit it has already refused the file
        log.warning(f"warning: {path}: {size[0]}x{size[1]} image ({pixels:,} pixels) is over PIL's "
                    f"decompression-bomb limit ({limit:,}); read anyway")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully (so truncation surfaces here, not later) and convert to RGB."""
    with open_image(path) as image:
        return to_rgb(image)


def load_mask(path: str | Path) -> np.ndarray:
    """A label map as (H, W) uint8 raw labels; palette PNGs keep their indices."""
    with open_image(path) as mask:
        if mask.mode not in ("L", "P", "I;16", "I", "1"):
            raise ValueError(f"mask mode {mask.mode} is not a single-channel label map")
        array = np.asarray(mask)
    if array.max(initial=0) > 255:
        raise ValueError(f"mask label {int(array.max())} does not fit the 8-bit label range")
    return array.astype(np.uint8)


def read_errors():
    """The exceptions that mean 'this file is not a readable image' (not a bug of ours)."""
    return (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
