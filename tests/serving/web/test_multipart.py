"""The direct split of a multipart body (``serving.web.multipart``) answers exactly as
Starlette's parser does: the same uploads and text fields, or the same error. The common
shapes must take the split (or it would be tested against itself), every other shape the
parser."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from serving.core.errors import ImgclfError
from serving.web import requests
from serving.web.multipart import split_form

LIMITS = requests.Limits(
    max_request_bytes=1 << 20, max_images_per_request=4, default_top_k=1, max_top_k=5
)
JPEG = b"\xff\xd8\xff\xe0fake jpeg \r\n with a line break\xff\xd9"
PNG = b"\x89PNG\r\n\x1a\n--not-a-boundary\r\n"


def part(name: str, data: bytes, filename: str | None = None, media: str | None = None):
    disposition = f'Content-Disposition: form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    head = disposition + (f"\r\nContent-Type: {media}" if media else "")
    return head.encode() + b"\r\n\r\n" + data


def form(*parts: bytes, boundary: str = "b0und4ry", end: bytes = b"--\r\n") -> bytes:
    delimiter = b"--" + boundary.encode()
    return b"".join(delimiter + b"\r\n" + p + b"\r\n" for p in parts) + delimiter + end


def content_type(boundary: str = "b0und4ry") -> str:
    return f"multipart/form-data; boundary={boundary}"


#: The shapes clients send: each must take the direct split.
COMMON = {
    "one file": (form(part("image", JPEG, "a.jpg", "image/jpeg")), content_type()),
    "no part content type": (form(part("image", JPEG, "a.jpg")), content_type()),
    "empty file name": (form(part("image", JPEG, "")), content_type()),
    "file and top_k": (
        form(part("image", PNG, "b.png", "image/png"), part("top_k", b"3")),
        content_type(),
    ),
    "top_k first": (form(part("top_k", b"2"), part("image", JPEG, "a.jpg")), content_type()),
    "several files": (
        form(*(part("images", JPEG, f"{i}.jpg", "image/jpeg") for i in range(4))),
        content_type(),
    ),
    "quoted boundary": (
        form(part("image", JPEG, "a.jpg"), boundary="with space"),
        'multipart/form-data; boundary="with space"',
    ),
    "no final CRLF": (form(part("image", JPEG, "a.jpg"), end=b"--"), content_type()),
    "text where a file is wanted": (form(part("image", b"http://x/y.jpg")), content_type()),
    "no file at all": (form(part("top_k", b"1")), content_type()),
    "wrong field": (form(part("picture", JPEG, "a.jpg")), content_type()),
    "text field twice": (
        form(part("image", JPEG, "a.jpg"), part("top_k", b"1"), part("top_k", b"9")),
        content_type(),
    ),
    "an empty text field": (form(part("image", JPEG, "a.jpg"), part("top_k", b"")), content_type()),
}
#: Everything else: Starlette's parser reads it.
UNUSUAL = {
    "preamble": (b"hello\r\n" + form(part("image", JPEG, "a.jpg")), content_type()),
    "epilogue": (form(part("image", JPEG, "a.jpg"), end=b"--\r\ntrailing"), content_type()),
    "no close delimiter": (form(part("image", JPEG, "a.jpg"))[:-4], content_type()),
    "LF line ends": (form(part("image", JPEG, "a.jpg")).replace(b"\r\n", b"\n"), content_type()),
    "transfer encoding": (
        form(part("image", JPEG, "a.jpg", "image/jpeg\r\nContent-Transfer-Encoding: binary")),
        content_type(),
    ),
    "filename*": (
        form(b"Content-Disposition: form-data; name=\"image\"; filename*=UTF-8''a.jpg\r\n\r\nx"),
        content_type(),
    ),
    "escaped quote in name": (
        form(b'Content-Disposition: form-data; name="image"; filename="a\\".jpg"\r\n\r\nx'),
        content_type(),
    ),
    "non-ASCII file name": (form(part("image", JPEG, "é.jpg")), content_type()),
    "non-UTF-8 field name": (
        form(b'Content-Disposition: form-data; name="\xff"\r\n\r\n1'),
        content_type(),
    ),
    "non-UTF-8 text": (form(part("image", JPEG, "a.jpg"), part("top_k", b"\xff")), content_type()),
    "unquoted name": (
        form(b"Content-Disposition: form-data; name=image; filename=a.jpg\r\n\r\nx"),
        content_type(),
    ),
    "no disposition": (form(b"Content-Type: image/jpeg\r\n\r\nx"), content_type()),
    "two dispositions": (
        form(
            b'Content-Disposition: form-data; name="a"\r\n'
            b'Content-Disposition: form-data; name="image"; filename="b"\r\n\r\nx'
        ),
        content_type(),
    ),
    "no blank line": (form(b'Content-Disposition: form-data; name="image"'), content_type()),
    "too many files": (
        form(*(part("images", JPEG, f"{i}.jpg") for i in range(6))),
        content_type(),
    ),
    "too many fields": (
        form(part("image", JPEG, "a.jpg"), *(part(f"f{i}", b"1") for i in range(17))),
        content_type(),
    ),
    "a text field over 64 KiB": (
        form(part("image", JPEG, "a.jpg"), part("note", b"x" * (64 * 1024 + 1))),
        content_type(),
    ),
    "boundary inside the data": (
        form(part("image", b"a\r\n--b0und4ryX\r\nb", "a.jpg")),
        content_type(),
    ),
    "no boundary parameter": (form(part("image", JPEG, "a.jpg")), "multipart/form-data"),
    "boundary then another parameter": (
        form(part("image", JPEG, "a.jpg")),
        content_type() + "; charset=utf-8",
    ),
    "empty body": (b"", content_type()),
}


def request(media: str) -> Request:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "query_string": b"",
        "headers": [(b"content-type", media.encode())],
    }
    return Request(scope)


def outcome(read, body: bytes, media: str, field: str):
    """What ``read`` makes of the body: (uploads, text fields), or the error's message."""
    try:
        uploads, texts = asyncio.run(read(request(media), body, field=field, limits=LIMITS))
    except ImgclfError as error:
        return "error", error.message
    return [(upload.data, upload.filename) for upload in uploads], texts


def split(body: bytes, media: str):
    return split_form(
        body,
        media,
        max_files=LIMITS.max_images_per_request + 1,
        max_fields=requests.MAX_FORM_FIELDS,
        max_part_size=requests.MAX_FIELD_BYTES,
    )


@pytest.mark.parametrize("case", sorted(COMMON))
def test_common_bodies_are_split_directly_as_the_parser_reads_them(case):
    body, media = COMMON[case]
    assert split(body, media) is not None
    for field in ("image", "images"):
        direct = outcome(requests._multipart, body, media, field)
        assert direct == outcome(requests._parsed_multipart, body, media, field)


@pytest.mark.parametrize("case", sorted(UNUSUAL))
def test_other_bodies_go_to_the_parser(case):
    body, media = UNUSUAL[case]
    assert split(body, media) is None
    assert outcome(requests._multipart, body, media, "image") == outcome(
        requests._parsed_multipart, body, media, "image"
    )


def test_the_split_keeps_every_byte_of_each_file():
    body, media = COMMON["several files"]
    uploads, texts = asyncio.run(
        requests._multipart(request(media), body, field="images", limits=LIMITS)
    )
    assert [upload.data for upload in uploads] == [JPEG] * 4
    assert [upload.filename for upload in uploads] == [f"{i}.jpg" for i in range(4)]
    assert texts == {}
