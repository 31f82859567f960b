"""Images decoded as a viewer shows them: upright, 8 bits per channel, transparency
composited. Every path that decodes an image (shard writing, the training and evaluation
reader, the served model) goes through here, so a sample looks the same everywhere.

- EXIF orientation is applied once (PIL.ImageOps.exif_transpose) and the tag dropped, so
  an image written again is stored upright and not turned twice.
- Higher bit depths are scaled to 0..255, not clipped: 16-bit samples (PIL modes I;16,
  I;16B, I;16L, I;16N, and I, which is taken as 16-bit: values outside 0..65535
  saturate) map v -> round(v * 255 / 65535). Float images (mode F) are taken as 0..1,
  the float convention of image formats, and clipped to it. PIL already reads 16-bit RGB
  and RGBA PNGs as 8-bit RGB / RGBA by their high bytes.
- Transparency (modes RGBA, LA, PA, RGBa, La, or a transparent colour: PNG tRNS, GIF) is
  composited over BACKGROUND, white, as browsers and most viewers show it.

This module imports only PIL and numpy, and importing it (with its package, vit_core.data)
loads neither torch nor ray: the served model imports it.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps

BACKGROUND = (255, 255, 255)  # RGB under transparent pixels

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees


def open_image(data: bytes | BinaryIO) -> Image.Image:
    """Encoded image (bytes or a binary file) -> PIL image, mode RGB, 8-bit, upright,
    alpha composited over BACKGROUND. Raises what PIL raises for unreadable data
    (PIL.UnidentifiedImageError, OSError, ...)."""
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    return to_rgb(viewable(img))


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of `img` once its EXIF orientation is applied, read from the header
    without decoding JPEG pixels (PNG looks for a trailing eXIf chunk by decoding)."""
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    return img.size[::-1] if orientation in _SWAPS_SIDES else img.size


def draft_upright(img: Image.Image, wanted: tuple[int, int]) -> None:
    """Let a lazily opened JPEG decode at the smallest DCT scale (1/2, 1/4, 1/8) that is
    still at least `wanted` = (width, height) in upright pixels (PIL's Image.draft, which
    works on the stored, unturned pixels). Does nothing for other formats or once loaded."""
    if img.format != "JPEG":
        return
    if img.size != upright_size(img):
        wanted = wanted[::-1]
    img.draft("RGB", wanted)


def viewable(img: Image.Image) -> Image.Image:
    """Decode `img` as a viewer shows it: upright, 8-bit, transparency over BACKGROUND.
    Returns mode L (grey sources) or RGB; `img` itself may be changed (it is loaded and
    turned in place, which saves a copy)."""
    ImageOps.exif_transpose(img, in_place=True)
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        return _to_8bit(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("L", "RGB"):
        return img
    return img.convert("L" if img.mode == "1" else "RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` in mode RGB (grey replicated to three channels)."""
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    # PIL's own convert("L") clips 16-bit and float values at 255 instead of scaling them.
    pixels = np.asarray(img)
    if img.mode == "F":
        scaled = np.clip(np.nan_to_num(pixels), 0.0, 1.0) * 255.0
    else:
        scaled = np.clip(pixels, 0, 65535) * (255.0 / 65535.0)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))
