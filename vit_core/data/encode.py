"""How a source image is stored in a shard: its original bytes when they are JPEG, PNG or
WebP and no re-encoding was asked for; otherwise decoded and written again (resized so the
longer side is at most max_side, as JPEG at jpeg_quality). Pixel sources become PNG.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from vit_core import storage
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
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        img.save(out, "JPEG", quality=quality or DEFAULT_JPEG_QUALITY, optimize=False)
    else:
        img.save(out, "PNG", compress_level=6)
    return out.getvalue()


def encode_pixels(pixels: np.ndarray, options: EncodeOptions) -> tuple[bytes, str]:
    img = Image.fromarray(np.ascontiguousarray(pixels))
    if options.reencode:
        return _save(_shrink(img, options.max_side), "jpg", options.jpeg_quality), "jpg"
    return _save(img, "png", None), "png"


def encode_bytes(data: bytes, options: EncodeOptions) -> tuple[bytes, str]:
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if options.reencode and fmt == "JPEG" and options.max_side:
            # Decode at a reduced scale when the file is far larger than needed.
            img.draft("RGB", (options.max_side, options.max_side))
        img.load()  # a full decode: truncated files fail here, not at training time
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
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        return _save(_shrink(img, options.max_side), "jpg", options.jpeg_quality), "jpg"
    if img.mode not in ("L", "RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    return _save(img, "png", None), "png"  # BMP, GIF, TIFF...: stored losslessly


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
