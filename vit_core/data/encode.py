"""How a source image is stored in a shard: its original bytes when they are JPEG, PNG or
WebP and no re-encoding was asked for (the reader decodes them as vit_core.data.images
shows them); otherwise decoded as a viewer shows it (upright, 8-bit, transparency over
white: vit_core.data.images.viewable) and written again, without EXIF: resized so the
longer side is at most max_side, as JPEG at jpeg_quality, or, with no re-encoding asked
for, as PNG. Pixel sources become PNG.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from vit_core import storage
from vit_core.data.images import draft_upright, viewable
from vit_core.data.sources import SourceSample

KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
DEFAULT_JPEG_QUALITY = 90


class UnreadableImage(Exception):
    """A source image that cannot be read or decoded; make_shards skips and counts it."""


@dataclass(frozen=True)
class EncodeOptions:
    max_side: int | None = None
    jpeg_quality: int | None = None

    @property
    def reencode(self) -> bool:
        return self.max_side is not None or self.jpeg_quality is not None


def _shrink(img: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is None or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.LANCZOS, reducing_gap=3.0)


def _save(img: Image.Image, fmt: str, quality: int | None) -> bytes:
    out = io.BytesIO()
    if fmt == "jpg":
        img.save(out, "JPEG", quality=quality or DEFAULT_JPEG_QUALITY, optimize=False)
    else:
        img.save(out, "PNG", compress_level=6)
    return out.getvalue()


def encode_pixels(pixels: np.ndarray, options: EncodeOptions) -> tuple[bytes, str]:
    img = viewable(Image.fromarray(np.ascontiguousarray(pixels)))
    if options.reencode:
        return _save(_shrink(img, options.max_side), "jpg", options.jpeg_quality), "jpg"
    return _save(img, "png", None), "png"


def encode_bytes(data: bytes, options: EncodeOptions) -> tuple[bytes, str]:
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if options.reencode and options.max_side:
            # Decode at a reduced scale when the file is far larger than needed.
            draft_upright(img, (options.max_side, options.max_side))
        # A full decode, as the reader will do it: truncated files fail here, not at
        # training time.
        shown = viewable(img)
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as err:
        raise UnreadableImage(f"not a readable image ({type(err).__name__}: {err})") from None
    if not options.reencode and fmt in KEPT_FORMATS:
        return data, KEPT_FORMATS[fmt]
    if options.reencode:
        return _save(_shrink(shown, options.max_side), "jpg", options.jpeg_quality), "jpg"
    return _save(shown, "png", None), "png"  # BMP, GIF, TIFF...: stored losslessly


def encode_sample(sample: SourceSample, options: EncodeOptions) -> tuple[bytes, str]:
    """(encoded image, extension) for one source sample; raises UnreadableImage."""
    if sample.pixels is not None:
        return encode_pixels(sample.pixels, options)
    assert sample.path is not None
    try:
        data = storage.read_bytes(sample.path)
    except storage.StorageError as err:
        raise UnreadableImage(str(err)) from None
    return encode_bytes(data, options)
