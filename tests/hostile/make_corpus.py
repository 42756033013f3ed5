"""Writes the hostile-input corpus next to this file (committed; rerun to regenerate).

.venv/bin/python tests/hostile/make_corpus.py
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming huge dimensions, with almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(row * 8, 9))
        + png_chunk(b"IEND", b"")
    )


def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def digit() -> Image.Image:
    from sklearn.datasets import load_digits

    pixels = np.rint(load_digits().images[3] * (255 / 16)).astype(np.uint8)  # a real "3"
    return Image.fromarray(pixels, mode="L").resize((64, 64), Image.NEAREST)


def main() -> None:
    three = digit()
    jpeg = save(three.convert("RGB"), "JPEG", quality=90)
    png = save(three, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    frames = [three, three.rotate(90), three.rotate(180)]
    wide16 = (np.asarray(three, dtype=np.uint16) * 257).astype(np.uint16)
    files = {
        # Refused (4xx)
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "corrupt_after_header.jpg": jpeg[:20] + bytes(range(256)) * 4,
        "corrupt_crc.png": png[:30] + b"\x00\x00\x00\x00" + png[34:],
        "zero_bytes.png": b"",
        "one_byte.jpg": b"\xff",
        "bomb_60000x60000.png": png_header_only(60_000, 60_000),
        "huge_7000x5000.png": save(Image.new("L", (7000, 5000), 40), "PNG", optimize=True),
        "text.txt": b"this is a plain text file, not an image\n",
        "html.html": b"<html><body><img src=x onerror=alert(1)></body></html>",
        "svg.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        "tiff.tiff": save(three, "TIFF"),
        "pdf.pdf": b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n",
        # Odd but valid (200)
        "sixteen_bit.png": save(Image.fromarray(wide16), "PNG"),
        "cmyk.jpg": save(three.convert("CMYK"), "JPEG", quality=90),
        "animated.gif": save(
            frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0
        ),
        "exif_rotated.jpg": save(three.convert("RGB"), "JPEG", exif=exif.tobytes()),
        "palette_transparency.png": save(three.convert("P"), "PNG", transparency=0),
        "grayscale_alpha.png": save(three.convert("LA"), "PNG"),
        "tiny_1x1.png": save(Image.new("L", (1, 1), 200), "PNG"),
        "wide_4000x8.png": save(three.resize((4000, 8)), "PNG"),
    }
    for name, data in files.items():
        (HERE / name).write_bytes(data)
    print(f"wrote {len(files)} files to {HERE}")


if __name__ == "__main__":
    main()
