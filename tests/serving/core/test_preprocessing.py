"""The preprocessing contract on real files of every format and colour mode, and its limits."""

from __future__ import annotations

import io
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from serving.core.errors import InvalidImageError
from serving.core.preprocessing import (
    ALPHA_BACKGROUND,
    PreprocessSpec,
    decode,
    preprocess_bytes,
    preprocess_file,
)
from tests.data import SAVE_FORMATS, digit_images, write_image

SPEC = PreprocessSpec(height=20, width=24)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def a_digit() -> Image.Image:
    return next(digit_images(1, classes=(3,)))[2]


@pytest.mark.parametrize(("suffix", "fmt", "mode"), SAVE_FORMATS)
def test_every_format_gives_float32_rgb_at_model_size(tmp_path, suffix, fmt, mode):
    path = write_image(a_digit(), tmp_path / f"x{suffix}", fmt, mode)
    array = preprocess_file(path, SPEC)
    assert array.shape == (20, 24, 3)
    assert array.dtype == np.float32
    assert array.min() >= 0.0 and array.max() <= 255.0
    assert array.max() > 100  # the ink survived decoding


def test_grayscale_is_replicated_into_rgb_and_lossless_formats_agree(tmp_path):
    image = a_digit()
    png = preprocess_bytes(encode(image, "PNG"), SPEC)
    bmp = preprocess_bytes(encode(image.convert("RGB"), "BMP"), SPEC)
    np.testing.assert_array_equal(png[..., 0], png[..., 1])
    np.testing.assert_array_equal(png, bmp)


def test_alpha_is_composited_onto_the_background():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent, dark colour underneath
    array = preprocess_bytes(encode(rgba, "PNG"), PreprocessSpec(4, 4))
    np.testing.assert_array_equal(array[0, 0], np.array(ALPHA_BACKGROUND, dtype=np.float32))


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    upright = decode(encode(image, "JPEG", exif=exif.tobytes(), quality=95), SPEC)
    assert upright.size == (20, 40)
    top_band = np.asarray(upright)[:8].mean()
    bottom_band = np.asarray(upright)[-8:].mean()
    assert top_band > 200 > 50 > bottom_band


def test_sixteen_bit_png_scales_to_eight_bits():
    values = np.full((4, 4), 65535, dtype=np.uint16)
    values[0, 0] = 0
    values[1, 1] = 32896  # 128 * 257
    array = preprocess_bytes(encode(Image.fromarray(values), "PNG"), PreprocessSpec(4, 4))
    assert array[0, 0, 0] == 0 and array[1, 1, 0] == 128 and array[3, 3, 0] == 255


def test_cmyk_jpeg_converts_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in print inks
    array = preprocess_bytes(encode(cmyk, "JPEG", quality=100), PreprocessSpec(8, 8))
    red, green, blue = array[4, 4]
    assert red > 200 and green < 60 and blue < 60


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("L", (8, 8), value) for value in (250, 5)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    array = preprocess_bytes(data, PreprocessSpec(8, 8))
    assert array.mean() > 240


def test_grayscale_model_gets_one_channel():
    array = preprocess_bytes(encode(a_digit(), "PNG"), PreprocessSpec(16, 16, channels=1))
    assert array.shape == (16, 16, 1)


def test_resize_filter_is_the_named_one():
    image = a_digit().convert("RGB")
    expected = np.asarray(image.resize((24, 20), Image.Resampling.BICUBIC), dtype=np.float32)
    actual = preprocess_bytes(encode(image, "PNG"), PreprocessSpec(20, 24, resize_filter="bicubic"))
    np.testing.assert_array_equal(actual, expected)
    with pytest.raises(ValueError, match="unknown resize filter"):
        PreprocessSpec(8, 8, resize_filter="area")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"x", "not_an_image"),
        (b"%PDF-1.4 not an image at all", "not_an_image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "corrupt"),
        (b"\xff\xd8\xff\xe0" + b"\x13" * 500, "corrupt"),  # OSError while reading headers
        (b"GIF89a" + b"\xff" * 20, "corrupt"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 8, "corrupt"),
    ],
)
def test_bad_bytes_raise_invalid_image(data, reason):
    with pytest.raises(InvalidImageError) as caught:
        decode(data, SPEC)
    assert caught.value.reason == reason
    assert 400 <= caught.value.status_code < 500


def test_truncated_jpeg_is_corrupt():
    data = encode(a_digit().convert("RGB").resize((256, 256)), "JPEG", quality=90)
    with pytest.raises(InvalidImageError) as caught:
        decode(data[: len(data) // 2], SPEC)
    assert caught.value.reason == "corrupt"
    assert "JPEG" in caught.value.message


def test_byte_limit_is_enforced_before_decoding(tmp_path):
    data = encode(a_digit(), "PNG")
    small = PreprocessSpec(8, 8, max_bytes=len(data) - 1)
    with pytest.raises(InvalidImageError) as caught:
        decode(data, small)
    assert (caught.value.reason, caught.value.status_code) == ("too_large", 413)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    with pytest.raises(InvalidImageError, match="limit"):
        preprocess_file(path, small)


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG header for a huge image with a tiny compressed body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    body = zlib.compress(row * 16, 9)  # far fewer rows than declared: never read that far
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [20_000, 100_000])
def test_decompression_bombs_are_refused_before_allocation(side):
    data = png_bomb(side, side)
    assert len(data) < 20_000
    with pytest.raises(InvalidImageError) as caught:
        decode(data, SPEC)
    assert caught.value.reason == "too_many_pixels"
    assert caught.value.status_code == 413


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidImageError, match="cannot read"):
        preprocess_file(tmp_path / "nope.png", SPEC)


def test_module_does_not_import_tensorflow():
    assert "serving.core.preprocessing" in sys.modules
    import subprocess

    code = "import sys, serving.core.preprocessing; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def photo(width: int, height: int, orientation: int | None = None) -> bytes:
    """A real photograph (scikit-learn's), resized to ``width`` x ``height``, as a JPEG;
    with an EXIF orientation tag when given."""
    from sklearn.datasets import load_sample_image

    image = Image.fromarray(load_sample_image("china.jpg")).resize((width, height))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    return encode(image, "JPEG", quality=92, exif=exif)


FULL_SIZE = {"jpeg_draft_margin": None}


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_close_to_full_size():
    data = photo(1600, 1200)
    spec = PreprocessSpec(32, 32)  # margin 2: at least 64 px a side, so 1/8 scale
    assert decode(data, spec).size == (200, 150)
    full = PreprocessSpec(32, 32, **FULL_SIZE)
    assert decode(data, full).size == (1600, 1200)
    difference = np.abs(preprocess_bytes(data, spec) - preprocess_bytes(data, full))
    assert 0 < difference.mean() < 1.0 and difference.max() < 16, (
        difference.mean(),
        difference.max(),
    )


def test_the_reduction_keeps_the_margin_and_accounts_for_exif_rotation():
    # Stored 1600x800 and tagged "turn a quarter": upright it is 800 wide, 1600 high. A wide
    # 200x50 target needs 400x100 upright; read unrotated, 1/4 scale would leave 200 wide.
    data = photo(1600, 800, orientation=6)
    upright = decode(data, PreprocessSpec(height=50, width=200))
    assert upright.size == (400, 800)  # 1/2 scale, then turned
    for height, width in ((50, 200), (200, 50), (30, 30), (800, 400)):
        spec = PreprocessSpec(height=height, width=width)
        got_width, got_height = decode(data, spec).size
        assert got_width >= min(800, 2 * width) and got_height >= min(1600, 2 * height)
        assert preprocess_bytes(data, spec).shape == (height, width, 3)


def test_other_formats_and_small_jpegs_are_decoded_as_before():
    spec, full = PreprocessSpec(32, 32), PreprocessSpec(32, 32, **FULL_SIZE)
    png = encode(Image.open(io.BytesIO(photo(800, 600))), "PNG")
    for data in (png, photo(100, 80)):  # no reduction keeps 2x64 px: decoded whole
        assert np.array_equal(preprocess_bytes(data, spec), preprocess_bytes(data, full))


def test_a_model_exported_before_the_draft_step_keeps_full_size_decoding():
    old = {"height": 32, "width": 32, "channels": 3, "resize_filter": "bilinear"}
    spec = PreprocessSpec.from_metadata(old)
    assert spec.jpeg_draft_margin is None and spec.describe()["contract_version"] == 1
    assert decode(photo(1600, 1200), spec).size == (1600, 1200)
    new = PreprocessSpec(32, 32).describe()
    assert new["contract_version"] == 2 and new["jpeg_draft_margin"] == 2.0
    assert PreprocessSpec.from_metadata(new) == PreprocessSpec(32, 32)
    with pytest.raises(ValueError, match="at least 1"):
        PreprocessSpec(32, 32, jpeg_draft_margin=0.5)


def test_a_truncated_large_jpeg_is_still_corrupt_with_the_reduction():
    data = photo(1600, 1200)
    with pytest.raises(InvalidImageError) as caught:
        preprocess_bytes(data[: len(data) // 3], PreprocessSpec(32, 32))
    assert caught.value.reason == "corrupt"
