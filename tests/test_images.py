"""Images decoded as a viewer shows them (vit_core.data.images) on every decode path:
open_image, the reader's decode_crop, and make_shards with and without re-encoding.
Inputs are generated here: 16-bit and float ramps, EXIF-rotated JPEGs, transparent images."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vit_core.data import make_shards
from vit_core.data.images import BACKGROUND, draft_upright, open_image, viewable
from vit_core.data.index import open_stream
from vit_core.data.shards import iter_samples
from vit_core.data.transforms import TransformSpec, decode_crop

RAMP_8 = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # 256 x 256, 0..255 left to right


def whole_image(size: int) -> TransformSpec:
    """Eval transform that keeps the whole (square) image: crop 1.0, no resampling at S."""
    return TransformSpec(size, train=False, num_classes=1, eval_crop_pct=1.0)


def crop(data: bytes, size: int) -> np.ndarray:
    """The reader's decode of one stored image, as [S, S, 3] uint8."""
    return decode_crop(data, whole_image(size), np.random.default_rng(0)).transpose(1, 2, 0)


def encoded(img: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **params)
    return out.getvalue()


def shard_images(tmp_path: Path, files: dict[str, bytes], max_side: int | None) -> dict:
    """{file name: stored bytes} after make_shards (local executor) on a one-class folder."""
    folder = tmp_path / "src" / "only"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    out = tmp_path / f"shards-{max_side}"
    index = make_shards(
        str(tmp_path / "src"), str(out), max_side=max_side, val_fraction=0.0,
        executor="local", progress=False,
    )  # fmt: skip
    assert index.skipped == 0
    stored = {}
    for shard in index.shards("train"):
        with open_stream(index.shard_location(shard)) as stream:
            stored.update({s.key: s.image for s in iter_samples(stream.read)})
    # Image folder samples are keyed by their position in sorted file order.
    return {name: stored[f"{i:08d}"] for i, name in enumerate(sorted(files))}


# --- 1. high bit depth is scaled to 8 bits, not clipped --------------------------------


def ramp_16(mode: str, fmt: str) -> bytes:
    values = RAMP_8.astype(np.uint16) * 257  # 0..65535: v * 255 / 65535 is exactly 0..255
    if mode == "I":
        img = Image.fromarray(values.astype(np.int32))
    else:
        dtype = ">u2" if mode == "I;16B" else "<u2"
        img = Image.frombytes(mode, (256, 256), values.astype(dtype).tobytes())
    data = encoded(img, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode  # the input is what it claims to be
    return data


SIXTEEN_BIT = [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("I", "TIFF")]


@pytest.mark.parametrize(("mode", "fmt"), SIXTEEN_BIT)
def test_16_bit_ramp_keeps_every_grey_level(mode, fmt):
    data = ramp_16(mode, fmt)
    expected = np.repeat(RAMP_8[..., None], 3, axis=2)
    img = open_image(data)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), expected)
    np.testing.assert_array_equal(crop(data, 256), expected)


def png_48_bit(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand: PIL cannot write one."""
    height, width, _ = rgb.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, truecolour
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )  # fmt: skip


def test_48_bit_png_keeps_every_level():
    # PIL reads it as 8-bit RGB itself (high bytes); this pins that.
    ramp = RAMP_8.astype(np.uint16) * 257
    data = png_48_bit(np.dstack([ramp, 65535 - ramp, ramp]))
    expected = np.dstack([RAMP_8, 255 - RAMP_8, RAMP_8])
    np.testing.assert_array_equal(np.asarray(open_image(data)), expected)
    np.testing.assert_array_equal(crop(data, 256), expected)


def test_float_image_is_taken_as_0_to_1_and_clipped():
    values = np.linspace(-0.5, 1.5, 256, dtype=np.float32)  # a quarter below 0, above 1
    data = encoded(Image.fromarray(np.tile(values, (4, 1))), "TIFF")
    row = np.asarray(open_image(data))[0, :, 0].astype(int)
    expected = np.rint(np.clip(values, 0, 1) * 255).astype(int)
    np.testing.assert_array_equal(row, expected)


@pytest.mark.parametrize("max_side", [None, 128])
def test_16_bit_ramp_survives_make_shards(tmp_path, max_side):
    files = {
        f"ramp_{mode.replace(';', '')}.{fmt.lower()}": ramp_16(mode, fmt)
        for mode, fmt in SIXTEEN_BIT
    }
    stored = shard_images(tmp_path, files, max_side)
    for name, data in stored.items():
        if max_side is None:  # kept or stored as 8-bit PNG: exact
            np.testing.assert_array_equal(crop(data, 256)[..., 0], RAMP_8, err_msg=name)
        else:  # a 128-pixel JPEG: the ramp at half resolution, give or take JPEG noise
            grey = crop(data, 128)[..., 0].astype(int)
            np.testing.assert_allclose(grey.mean(axis=0), np.arange(128) * 2 + 0.5, atol=4)


# --- 2. EXIF orientation is applied once ------------------------------------------------

QUADRANTS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 255, 255)]  # TL, TR, BL, BR

# The stored pixels that an EXIF orientation turns into the upright picture (the inverse
# of the transpose it asks for; PIL.ImageOps.exif_transpose lists the forward ones).
STORED_AS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def upright_picture(width: int = 640, height: int = 480) -> Image.Image:
    """Four coloured quadrants (QUADRANTS), width x height as the viewer shows it."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    h, w = height // 2, width // 2
    for i, colour in enumerate(QUADRANTS):
        pixels[(i // 2) * h : (i // 2 + 1) * h, (i % 2) * w : (i % 2 + 1) * w] = colour
    return Image.fromarray(pixels)


def oriented_jpeg(orientation: int, upright: Image.Image) -> bytes:
    method = STORED_AS[orientation]
    stored = upright if method is None else upright.transpose(method)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(stored, "JPEG", quality=95, exif=exif)


def assert_quadrants(pixels: np.ndarray) -> None:
    """pixels [H, W, 3] show QUADRANTS in place (JPEG tolerance, away from the seams)."""
    h, w = pixels.shape[0] // 4, pixels.shape[1] // 4
    for i, colour in enumerate(QUADRANTS):
        centre = pixels[(1 + 2 * (i // 2)) * h, (1 + 2 * (i % 2)) * w].astype(int)
        assert np.abs(centre - colour).max() < 40, f"quadrant {i}: {centre} != {colour}"


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", [32, 224])  # 32: a 1/8 draft decode; 224: a full one
def test_exif_orientation_is_applied_by_the_reader(orientation, size):
    data = oriented_jpeg(orientation, upright_picture())
    assert_quadrants(crop(data, size))
    img = open_image(data)
    assert img.size == (640, 480)
    assert_quadrants(np.asarray(img))


def test_draft_decode_is_sized_on_the_upright_image():
    # Stored 800 x 100, shown 100 x 800. At least 20 x 10 upright pixels are wanted: 1/4
    # scale (25 x 200) is the smallest that has them; the stored sides would allow 1/8
    # (13 x 100 upright), too narrow.
    img = Image.open(io.BytesIO(oriented_jpeg(6, upright_picture(100, 800))))
    draft_upright(img, (20, 10))
    assert viewable(img).size == (25, 200)


def test_train_crops_are_drawn_on_the_upright_image():
    # A tall stored image shown wide: a crop box computed on the stored size would cover
    # only part of the upright width and never see the right-hand quadrants' full width.
    data = oriented_jpeg(6, upright_picture(400, 100))
    spec = TransformSpec(32, train=True, num_classes=1, scale=(1.0, 1.0), ratio=(4.0, 4.0))
    out = decode_crop(data, spec, np.random.default_rng(0)).transpose(1, 2, 0)
    assert_quadrants(out)


@pytest.mark.parametrize("max_side", [None, 64])
def test_exif_rotated_jpeg_is_stored_upright_when_re_encoded(tmp_path, max_side):
    stored = shard_images(tmp_path, {"turned.jpg": oriented_jpeg(6, upright_picture())}, max_side)
    data = stored["turned.jpg"]
    assert_quadrants(crop(data, 48))
    if max_side is not None:  # re-encoded: upright pixels, no tag left to turn them again
        img = Image.open(io.BytesIO(data))
        assert img.size == (64, 48)
        assert img.getexif().get(0x0112, 1) == 1
        assert_quadrants(np.asarray(img.convert("RGB")))


# --- 3. transparency is composited over BACKGROUND --------------------------------------


def black_square_on_transparent(kind: str) -> bytes:
    """32 x 32, an opaque black square at 8..24, the rest fully transparent."""
    inside = np.zeros((32, 32), dtype=bool)
    inside[8:24, 8:24] = True
    alpha = np.where(inside, 255, 0).astype(np.uint8)
    black = np.zeros((32, 32), dtype=np.uint8)
    if kind == "RGBA":
        return encoded(Image.fromarray(np.dstack([black, black, black, alpha])), "PNG")
    if kind == "LA":
        return encoded(Image.fromarray(np.dstack([black, alpha])), "PNG")
    if kind in ("P", "GIF"):  # palette index 1 is the transparent colour
        img = Image.frombytes("P", (32, 32), np.where(inside, 0, 1).astype(np.uint8).tobytes())
        img.putpalette([0, 0, 0, 0, 0, 0])
        return encoded(img, kind if kind == "GIF" else "PNG", transparency=1)
    if kind == "RGB tRNS":  # one colour marked transparent
        rgb = np.where(inside[..., None], 0, np.array([10, 20, 30], dtype=np.uint8))
        return encoded(Image.fromarray(rgb.astype(np.uint8)), "PNG", transparency=(10, 20, 30))
    if kind == "L tRNS":
        grey = np.where(inside, 0, 77).astype(np.uint8)
        return encoded(Image.fromarray(grey), "PNG", transparency=77)
    raise AssertionError(kind)


TRANSPARENT = ["RGBA", "LA", "P", "GIF", "RGB tRNS", "L tRNS"]


def assert_black_square_on_background(pixels: np.ndarray, tolerance: int = 0, what="") -> None:
    n = pixels.shape[0]
    for y, x in [(0, 0), (0, n - 1), (n - 1, 0), (n - 1, n - 1)]:
        corner = pixels[y, x].astype(int)
        assert np.abs(corner - BACKGROUND).max() <= tolerance, f"{what} corner {corner}"
    assert pixels[n // 2, n // 2].max() <= tolerance, f"{what} centre {pixels[n // 2, n // 2]}"


@pytest.mark.parametrize("kind", TRANSPARENT)
def test_transparency_is_composited_over_the_background(kind):
    data = black_square_on_transparent(kind)
    assert_black_square_on_background(np.asarray(open_image(data)))
    assert_black_square_on_background(crop(data, 32))


@pytest.mark.parametrize("max_side", [None, 32])
def test_transparency_survives_make_shards(tmp_path, max_side):
    files = {f"{i}.{'gif' if k == 'GIF' else 'png'}": black_square_on_transparent(k)
             for i, k in enumerate(TRANSPARENT)}  # fmt: skip
    for name, data in shard_images(tmp_path, files, max_side).items():
        pixels = crop(data, 32)
        tolerance = 0 if max_side is None else 12  # a JPEG's corners near a black edge
        assert_black_square_on_background(pixels, tolerance, name)


def test_open_image_takes_a_file_and_needs_no_torch_or_ray(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "square.png"
    path.write_bytes(black_square_on_transparent("RGBA"))
    script = (
        "import sys; from vit_core.data.images import open_image; "
        f"img = open_image(open({str(path)!r}, 'rb')); "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray'}); "
        "print(img.mode, img.size, heavy)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == "RGB (32, 32) []", done.stderr
