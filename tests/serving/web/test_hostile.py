"""Hostile input: the committed corpus, fuzzing from the OpenAPI document, and a server that
is unchanged afterwards (same answers, same memory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO
from tests.serving.cases import bad_requests, good_images, send

CORPUS = REPO / "tests" / "hostile"
REFUSED = {  # file -> (status, what the error says)
    "truncated.jpg": (400, "corrupt"),
    "truncated.png": (400, "corrupt"),
    "corrupt_after_header.jpg": (400, "corrupt"),
    "corrupt_crc.png": (400, "corrupt"),
    "zero_bytes.png": (400, "empty"),
    "one_byte.jpg": (400, "not an image"),
    "bomb_60000x60000.png": (413, "too many pixels"),
    "huge_7000x5000.png": (413, "too many pixels"),  # 35 MP; the test servers allow 30 MP
    "text.txt": (400, "not an image"),
    "html.html": (400, "not an image"),
    "svg.svg": (400, "not an image"),
    "tiff.tiff": (400, "not an image"),
    "pdf.pdf": (400, "not an image"),
}
ACCEPTED = [
    "sixteen_bit.png",
    "cmyk.jpg",
    "animated.gif",
    "exif_rotated.jpg",
    "palette_transparency.png",
    "grayscale_alpha.png",
    "tiny_1x1.png",
    "wide_4000x8.png",
]


@pytest.fixture(params=["in_process", "real_server"])
def api(request):
    return request.getfixturevalue("client" if request.param == "in_process" else "http")


def test_the_corpus_is_complete():
    on_disk = {p.name for p in CORPUS.iterdir() if p.suffix != ".py" and p.is_file()}
    assert on_disk == set(REFUSED) | set(ACCEPTED)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_hostile_file_gets_its_4xx(api, name):
    status, says = REFUSED[name]
    data = (CORPUS / name).read_bytes()
    for response in (
        api.post("/predict", content=data, headers={"Content-Type": "application/octet-stream"}),
        api.post("/predict", files={"image": (name, data, "application/octet-stream")}),
    ):
        assert response.status_code == status, (name, response.text)
        assert says in response.json()["error"]


@pytest.mark.parametrize("name", ACCEPTED)
def test_odd_but_valid_image_is_classified(api, name):
    response = api.post(
        "/predict",
        content=(CORPUS / name).read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, (name, response.text)
    assert response.json()["label"] in {"0", "1", "2", "3", "4"}


def test_non_utf8_field_names_and_filenames(api):
    png = (CORPUS / "tiny_1x1.png").read_bytes()
    boundary = b"b0undary"
    body = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="\xff\xfeimage"; '
        b'filename="\xc3\x28.png"\r\nContent-Type: image/png\r\n\r\n'
        + png
        + b"\r\n--"
        + boundary
        + b"--\r\n"
    )
    response = api.post(
        "/predict", content=body, headers={"Content-Type": "multipart/form-data; boundary=b0undary"}
    )
    assert 400 <= response.status_code < 500
    assert "error" in response.json()


def server_rss(server) -> int:
    root = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_schemathesis_finds_no_server_error_or_contract_breach(server):
    """Every check schemathesis has, except 'schema-valid data is accepted': a binary body
    that the schema allows need not be a decodable image."""
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{server.url}/docs.json",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "40",
            "--generation-deterministic",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout


def test_server_is_unchanged_after_the_hostile_run(server, http):
    data, content_type, _ = good_images()["png"]

    def answer():
        response = http.post("/predict", content=data, headers={"Content-Type": content_type})
        assert response.status_code == 200
        return {k: v for k, v in response.json().items() if k != "request_id"}  # new each time

    for _ in range(20):  # settle allocations before measuring
        answer()
    before, memory_before = answer(), server_rss(server)
    for _ in range(3):
        for case in bad_requests():
            assert send(http, case).status_code < 500, case.name
        for name in REFUSED:
            response = http.post(
                "/predict",
                content=(CORPUS / name).read_bytes(),
                headers={"Content-Type": "application/octet-stream"},
            )
            assert response.status_code < 500, name
    assert answer() == before
    growth = server_rss(server) / memory_before
    assert growth < 1.10, f"resident memory grew {growth:.2f}x"
