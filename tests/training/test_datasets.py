"""Image folder discovery, the built-in digits, corrupt-file handling and the split manifest."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from serving.core.errors import DataError
from serving.core.preprocessing import PreprocessSpec
from tests.data import make_image_folder
from training import datasets


def test_discover_lists_classes_in_order_and_every_format(image_folder):
    folder = datasets.discover(image_folder)
    assert folder.classes == ["0", "1", "2"]
    assert len(folder.samples) == 36
    suffixes = {s.path.suffix for s in folder.samples}
    assert suffixes == {".png", ".jpg", ".bmp", ".gif", ".webp"}


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("no_classes", "no class sub-folders"),
        ("one_class", "one class"),
        ("empty_class", "holds no images"),
    ],
)
def test_discover_refuses_unusable_folders(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "one_class":
        make_image_folder(root, 3, classes=(1,))
    if layout == "empty_class":
        make_image_folder(root, 3, classes=(1, 2))
        (root / "7").mkdir()
        (root / "7" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=message):
        datasets.discover(root)


def test_corrupt_files_are_skipped_and_named(image_folder):
    bad_jpeg = image_folder / "1" / "broken.jpg"
    bad_jpeg.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    not_image = image_folder / "2" / "text.png"
    not_image.write_text("hello, I am not a PNG")
    folder = datasets.discover(image_folder)
    good, skipped = datasets.check_readable(folder.samples, PreprocessSpec(16, 16))
    assert len(good) == 36
    assert {item["path"] for item in skipped} == {str(bad_jpeg), str(not_image)}
    assert all(item["error"] for item in skipped)


def test_split_is_stratified_disjoint_and_seeded(tmp_path):
    folder = datasets.discover(make_image_folder(tmp_path, 20))
    kwargs = dict(validation_fraction=0.2, test_fraction=0.2, seed=7)
    splits = datasets.split_samples(folder.samples, folder.classes, **kwargs)
    paths = [set(s.path for s in splits[name]) for name in datasets.SPLITS]
    assert sum(len(p) for p in paths) == 60
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2]) and not (paths[1] & paths[2])
    for name in ("validation", "test"):
        assert Counter(s.label for s in splits[name]) == {"0": 4, "1": 4, "2": 4}
    again = datasets.split_samples(folder.samples, folder.classes, **kwargs)
    assert [s.path for s in again["test"]] == [s.path for s in splits["test"]]
    other = datasets.split_samples(folder.samples, folder.classes, **{**kwargs, "seed": 8})
    assert [s.path for s in other["test"]] != [s.path for s in splits["test"]]


def test_split_refuses_classes_too_small_to_split(tmp_path):
    folder = datasets.discover(make_image_folder(tmp_path, 2))
    with pytest.raises(DataError, match="at least 3"):
        datasets.split_samples(
            folder.samples, folder.classes, validation_fraction=0.2, test_fraction=0.2, seed=0
        )


def test_manifest_round_trips(tmp_path, image_folder):
    folder = datasets.discover(image_folder)
    splits = datasets.split_samples(
        folder.samples, folder.classes, validation_fraction=0.25, test_fraction=0.25, seed=1
    )
    datasets.write_manifest(tmp_path, splits)
    loaded = datasets.read_manifest(tmp_path)
    for name in datasets.SPLITS:
        assert sorted((s.path, s.label) for s in loaded[name]) == sorted(
            (Path(s.path).resolve(), s.label) for s in splits[name]
        )
    assert not list(tmp_path.glob(".manifest.csv.*")), "temporary file left behind"


def test_digits_are_written_once_as_real_png_files(digits_home):
    root = datasets.write_digits(digits_home)
    folder = datasets.discover(root)
    assert folder.classes == [str(d) for d in range(10)]
    assert len(folder.samples) == 1797
    stamp = (root / ".complete").stat().st_mtime_ns
    assert datasets.write_digits(digits_home) == root
    assert (root / ".complete").stat().st_mtime_ns == stamp
    from PIL import Image

    with Image.open(folder.samples[0].path) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "L", (8, 8))
