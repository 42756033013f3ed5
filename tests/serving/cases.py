"""Real image files and the bad requests every server must answer with its 4xx."""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from tests.data import digit_images
from tests.serving.core.test_preprocessing import png_bomb

#: Limits the test servers run with, small enough to test without huge bodies.
TEST_ENV = {
    "IMGCLF_MAX_IMAGE_BYTES": str(6 * 1024 * 1024),
    "IMGCLF_MAX_REQUEST_BYTES": str(8 * 1024 * 1024),
    "IMGCLF_MAX_IMAGE_PIXELS": "30000000",
    "IMGCLF_MAX_IMAGES_PER_REQUEST": "8",
    "IMGCLF_MAX_TOP_K": "10",
    "IMGCLF_DEFAULT_TOP_K": "3",
    # Stopped at once: the drain window (5 s by default) is tested where it is the subject
    # (tests/serving/web/test_drain.py, tests/container/).
    "IMGCLF_DRAIN_WINDOW_S": "0",
}


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def digit(label: int, index: int = 0) -> Image.Image:
    return list(digit_images(index + 1, classes=(label,)))[index][2]


@functools.cache
def large_photo() -> bytes:
    """A 12-megapixel JPEG (a digit on a noisy, graded background), a few MB; made once per
    process (about a second)."""
    rng = np.random.default_rng(0)
    base = np.asarray(
        digit(2).convert("RGB").resize((4000, 3000), Image.BILINEAR), dtype=np.float32
    )
    gradient = np.linspace(0, 60, 4000, dtype=np.float32)[None, :, None]
    noisy = base * 0.8 + gradient + rng.normal(0, 12, base.shape).astype(np.float32)
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return encode(image, "JPEG", quality=85)


def good_images() -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, content type, the digit it shows)."""
    rgba = digit(1).convert("RGBA")
    rgba.putalpha(Image.eval(digit(1).convert("L"), lambda v: 255 if v > 40 else 90))
    return {
        "jpeg": (encode(digit(0).convert("RGB"), "JPEG", quality=95), "image/jpeg", "0"),
        "png": (encode(digit(3).convert("RGB"), "PNG"), "image/png", "3"),
        "grayscale": (encode(digit(4), "PNG"), "image/png", "4"),
        "rgba": (encode(rgba, "PNG"), "image/png", "1"),
        "large_photo": (large_photo(), "image/jpeg", "2"),
    }


@dataclass
class BadRequest:
    name: str
    status: int
    says: str
    path: str = "/predict"
    body: bytes | None = None
    content_type: str | None = None
    files: list | None = None
    data: dict | None = None
    params: dict = field(default_factory=dict)


def bad_requests() -> list[BadRequest]:
    png = encode(digit(5), "PNG")
    jpeg = encode(digit(6).convert("RGB").resize((256, 256)), "JPEG", quality=90)
    oversized_image = encode(
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (1500, 1500, 3), np.uint8)),
        "PNG",
    )
    assert 6 * 1024 * 1024 < len(oversized_image) < 8 * 1024 * 1024
    return [
        BadRequest(
            "corrupt_jpeg",
            400,
            "corrupt",
            body=b"\xff\xd8\xff\xe0" + b"\x13" * 500,
            content_type="image/jpeg",
        ),
        BadRequest(
            "truncated_jpeg", 400, "corrupt", body=jpeg[: len(jpeg) // 2], content_type="image/jpeg"
        ),
        BadRequest("truncated_png", 400, "corrupt", body=png[:60], content_type="image/png"),
        BadRequest(
            "not_an_image", 400, "not an image", body=b"hello, world" * 10, content_type="image/png"
        ),
        BadRequest("empty_body", 400, "empty", body=b"", content_type="image/png"),
        BadRequest("one_byte", 400, "not an image", body=b"\x00", content_type="image/png"),
        BadRequest(
            "text_plain", 415, "unsupported Content-Type", body=png, content_type="text/plain"
        ),
        BadRequest(
            "json_url",
            415,
            "unsupported Content-Type",
            body=b'{"image": "http://127.0.0.1:9/x.png"}',
            content_type="application/json",
        ),
        BadRequest("no_content_type", 415, "unsupported Content-Type", body=png),
        BadRequest(
            "image_over_byte_limit", 413, "limit", body=oversized_image, content_type="image/png"
        ),
        BadRequest(
            "body_over_byte_limit",
            413,
            "limit",
            body=b"\0" * (9 * 1024 * 1024),
            content_type="image/png",
        ),
        BadRequest(
            "decompression_bomb",
            413,
            "too many pixels",
            body=png_bomb(60_000, 60_000),
            content_type="image/png",
        ),
        BadRequest(
            "url_in_file_field",
            400,
            "never fetched",
            files=[("other", ("x.txt", b"x", "text/plain"))],
            data={"image": "http://127.0.0.1:9/digit.png"},
        ),
        BadRequest(
            "no_image_field", 400, "no file", files=[("picture", ("a.png", png, "image/png"))]
        ),
        BadRequest(
            "two_images_to_predict",
            400,
            "predict_batch",
            files=[("image", ("a.png", png, "image/png"))] * 2,
        ),
        BadRequest(
            "malformed_multipart",
            400,
            "multipart",
            body=b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\nabc',
            content_type="multipart/form-data; boundary=abc",
        ),
        BadRequest(
            "top_k_zero", 400, "top_k", body=png, content_type="image/png", params={"top_k": "0"}
        ),
        BadRequest(
            "top_k_negative",
            400,
            "top_k",
            body=png,
            content_type="image/png",
            params={"top_k": "-3"},
        ),
        BadRequest(
            "top_k_huge",
            400,
            "top_k",
            body=png,
            content_type="image/png",
            params={"top_k": "1000000000000"},
        ),
        BadRequest(
            "top_k_text", 400, "top_k", body=png, content_type="image/png", params={"top_k": "ten"}
        ),
        BadRequest(
            "batch_over_limit",
            400,
            "limit is 8",
            path="/predict_batch",
            files=[("images", (f"{i}.png", png, "image/png")) for i in range(9)],
        ),
        BadRequest(
            "batch_bad_item",
            400,
            "image 1 (bad.png)",
            path="/predict_batch",
            files=[
                ("images", ("ok.png", png, "image/png")),
                ("images", ("bad.png", b"garbage", "image/png")),
            ],
        ),
        BadRequest(
            "batch_raw_body",
            415,
            "multipart",
            path="/predict_batch",
            body=png,
            content_type="image/png",
        ),
        *malformed_json(),
    ]


#: The test model's inference route (the published test model is named "tiny").
INFER = "/v2/models/tiny/infer"


def malformed_json() -> list[BadRequest]:
    """JSON that once got a 500: nesting deep enough to exhaust the standard parser's
    recursion, and lone UTF-16 surrogates, which parse into text that cannot be encoded again
    (for the feedback store, the log, or the echoed id). Plus a body of many tiny BYTES
    elements, which once blocked a worker while it was parsed."""
    pixels = {"name": "image", "datatype": "FP32", "shape": [1, 16, 16, 3], "data": [0.0] * 768}
    pixels_json = json.dumps(pixels).encode()
    many = b",".join([b'"a"'] * (7 * 1024 * 1024 // 4))
    return [
        BadRequest("oip_nested_200k", 400, "not JSON", INFER, b"[" * 200_000 + b"]" * 200_000),
        BadRequest(
            "oip_objects_nested_200k",
            400,
            "not JSON",
            INFER,
            b'{"a":' * 200_000 + b"1" + b"}" * 200_000,
        ),
        BadRequest(
            "feedback_nested_100k",
            400,
            "not JSON",
            "/feedback",
            b"[" * 100_000 + b"]" * 100_000,
            "application/json",
        ),
        BadRequest(
            "oip_bytes_lone_surrogate",
            400,
            "surrogate",
            INFER,
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1], '
            b'"data": ["\\ud800"]}]}',
        ),
        BadRequest(
            "oip_id_lone_surrogate",
            400,
            "surrogate",
            INFER,
            b'{"id": "\\udc00", "inputs": [' + pixels_json + b"]}",
        ),
        BadRequest(
            "feedback_id_lone_surrogate",
            400,
            "surrogate",
            "/feedback",
            b'{"request_id": "a\\ud800b", "label": "0"}',
            "application/json",
        ),
        BadRequest(
            "oip_seven_mib_of_tiny_bytes_elements",
            413,
            "more values than 8 images",
            INFER,
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ['
            + many
            + b"]}]}",
        ),
    ]


def send(client, case: BadRequest):
    """Send a case with an httpx-style client (TestClient or httpx.Client)."""
    headers = {"Content-Type": case.content_type} if case.content_type else {}
    if case.files is not None or case.data is not None:
        return client.post(case.path, files=case.files, data=case.data, params=case.params)
    return client.post(case.path, content=case.body, headers=headers, params=case.params)
