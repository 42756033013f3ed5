"""The preprocessing contract: bytes in, the model's float32 input out.

Training, export, serving and batch scoring all call these functions, so the same file gives
the same tensor everywhere. No TensorFlow here: the serving path must stay free of it.
Scaling that depends on the architecture (``/255``, the backbone's ``preprocess_input``) lives
inside the model graph, so the values produced here are always float32 in [0, 255].
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, JpegImagePlugin

from serving.core.errors import InvalidImageError

#: Formats we decode. Pillow opens many more (EPS, PSD, ...); each extra parser is attack surface.
ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")
#: File name suffixes that ``ACCEPTED_FORMATS`` use; folder scans look at these first.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp")

RESIZE_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
DEFAULT_RESIZE_FILTER = "bilinear"
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
#: Transparent pixels are composited onto this colour, as an image viewer shows them.
ALPHA_BACKGROUND = (255, 255, 255)
#: New exports decode a JPEG at 1/2, 1/4 or 1/8 scale while both sides stay at least this many
#: times the model's input: a 12-megapixel photo for a 224x224 model then decodes at 1/8 in a
#: sixth of the time, and the resize still has twice the pixels it needs to average over
#: (``benchmarks/bench_jpeg_draft.py`` measures the margins; docs/serving.md has the table).
DEFAULT_JPEG_DRAFT_MARGIN = 2.0
#: EXIF orientations that turn the image a quarter: its stored width becomes its height.
_QUARTER_TURNS = (5, 6, 7, 8)


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model expects and which limits protect the decoder."""

    height: int
    width: int
    channels: int = 3
    resize_filter: str = DEFAULT_RESIZE_FILTER
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: JPEG only: decode at the smallest scale (1/8, 1/4, 1/2, 1: libjpeg's DCT-domain
    #: reduction, Pillow's draft mode) that keeps both upright sides at least this many times
    #: the model's input. None: always decode at full size, the contract of models exported
    #: before this step existed (their metadata has no such key, and they keep it).
    jpeg_draft_margin: float | None = DEFAULT_JPEG_DRAFT_MARGIN

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.jpeg_draft_margin is not None and self.jpeg_draft_margin < 1:
            raise ValueError(f"jpeg_draft_margin must be at least 1, got {self.jpeg_draft_margin}")
        if self.resize_filter not in RESIZE_FILTERS:
            raise ValueError(
                f"unknown resize filter {self.resize_filter!r}; "
                f"choose from {sorted(RESIZE_FILTERS)}"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    def describe(self) -> dict:
        """The caller's half of the contract, as written into ``metadata.json``."""
        return {
            **asdict(self),
            "layout": "NHWC",
            "dtype": "float32",
            "value_range": [0.0, 255.0],
            "color": "RGB" if self.channels == 3 else "L",
            # 1: full-size decoding only; 2: JPEGs decoded at a reduced scale (the draft step).
            "contract_version": 1 if self.jpeg_draft_margin is None else 2,
            "steps": [
                "decode ("
                + ", ".join(ACCEPTED_FORMATS)
                + "; first frame of animations)"
                + (
                    ""
                    if self.jpeg_draft_margin is None
                    else f"; JPEG at 1/8, 1/4 or 1/2 scale while both upright sides stay at "
                    f"least {self.jpeg_draft_margin:g}x the target"
                ),
                "apply EXIF orientation",
                f"convert to {'RGB' if self.channels == 3 else 'grayscale'}; "
                f"alpha composited onto {ALPHA_BACKGROUND}; 16-bit scaled to 8-bit",
                f"resize to {self.width}x{self.height} with Pillow {self.resize_filter}",
                "float32 in [0, 255], no normalisation (the graph does it)",
            ],
        }

    @classmethod
    def from_metadata(cls, preprocessing: dict) -> PreprocessSpec:
        """The contract a model was exported with: a model from before a step keeps its
        own (no ``jpeg_draft_margin``: JPEGs decoded at full size, as it was validated)."""
        fields = (
            "height",
            "width",
            "channels",
            "resize_filter",
            "max_bytes",
            "max_pixels",
            "jpeg_draft_margin",
        )
        values = {k: preprocessing[k] for k in fields if k in preprocessing}
        values.setdefault("jpeg_draft_margin", None)
        return cls(**values)


def decode(data: bytes, spec: PreprocessSpec) -> Image.Image:
    """Decode image bytes into an upright RGB (or L) image, enforcing the byte and pixel limits."""
    if not data:
        raise InvalidImageError("the image is empty (0 bytes)", reason="empty")
    if len(data) > spec.max_bytes:
        raise InvalidImageError(
            f"the image is {len(data)} bytes; the limit is {spec.max_bytes}",
            reason="too_large",
            status_code=413,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise _too_many_pixels(spec) from error
    except Exception as error:  # UnidentifiedImageError, or OSError/SyntaxError/... in headers
        claimed = sniff_format(data)
        if claimed is not None:
            raise InvalidImageError(
                f"the {claimed} image is corrupt (its header cannot be read)", reason="corrupt"
            ) from error
        raise InvalidImageError(
            "not an image in a supported format (" + ", ".join(ACCEPTED_FORMATS) + ")",
            reason="not_an_image",
        ) from error
    width, height = image.size
    if width * height > spec.max_pixels or width < 1 or height < 1:
        raise _too_many_pixels(spec, width, height)
    try:
        image.seek(0)
        _draft(image, spec)
        image.load()
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad data
        raise InvalidImageError(
            f"the {image.format} image is corrupt or truncated ({_first_line(error)})",
            reason="corrupt",
        ) from error
    return _to_color(_upright(image), spec.channels)


def resize(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    if image.size == (spec.width, spec.height):
        return image
    return image.resize((spec.width, spec.height), resample=RESIZE_FILTERS[spec.resize_filter])


def to_array(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    array = np.asarray(image, dtype=np.float32)
    if spec.channels == 1:
        array = array[..., np.newaxis]
    return array


def preprocess_bytes(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Image bytes to one ``(height, width, channels)`` float32 array in [0, 255]."""
    return to_array(resize(decode(data, spec), spec), spec)


def read_image_file(path: str | Path, spec: PreprocessSpec) -> bytes:
    """Read a file's bytes, refusing files over the byte limit before reading them."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > spec.max_bytes:
            raise InvalidImageError(
                f"{path} is {size} bytes; the limit is {spec.max_bytes}",
                reason="too_large",
                status_code=413,
            )
        return path.read_bytes()
    except OSError as error:
        raise InvalidImageError(
            f"cannot read {path}: {error.strerror or error}", reason="corrupt"
        ) from error


def preprocess_file(path: str | Path, spec: PreprocessSpec) -> np.ndarray:
    """One image file to the model's input array; used by the training loader and by serving."""
    return preprocess_bytes(read_image_file(path, spec), spec)


_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


def sniff_format(data: bytes) -> str | None:
    """The format a file's magic bytes claim, whether or not the rest of it is valid."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _draft(image: Image.Image, spec: PreprocessSpec) -> None:
    """Ask the JPEG decoder (before it runs) for the smallest power-of-two reduction that
    keeps the upright image at least ``jpeg_draft_margin`` times the target on each side."""
    if spec.jpeg_draft_margin is None or not isinstance(image, JpegImagePlugin.JpegImageFile):
        return
    wide = math.ceil(spec.width * spec.jpeg_draft_margin)
    high = math.ceil(spec.height * spec.jpeg_draft_margin)
    if _orientation(image) in _QUARTER_TURNS:
        wide, high = high, wide  # what is stored as width becomes the upright height
    image.draft(None, (wide, high))


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a broken EXIF block: _upright leaves such an image as stored too
        return 1


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        return image


def _to_color(image: Image.Image, channels: int) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        scaled = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    elif mode == "F":
        raise InvalidImageError("floating-point images are not supported", reason="not_an_image")
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba)
    target = "RGB" if channels == 3 else "L"
    if image.mode != target:
        # Grayscale models still go through RGB so that CMYK, palette and YCbCr convert alike.
        image = image.convert("RGB")
        if target == "L":
            image = image.convert("L")
    return image


def _too_many_pixels(spec: PreprocessSpec, width: int | None = None, height: int | None = None):
    size = f"{width}x{height} " if width is not None else ""
    return InvalidImageError(
        f"the image {size}has too many pixels; the limit is {spec.max_pixels}",
        reason="too_many_pixels",
        status_code=413,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
