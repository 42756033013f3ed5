"""Which images a batch job reads: a folder, a glob, a list file or an object-store prefix,
and reading one of them within the model's byte limit."""

from __future__ import annotations

import csv
import glob
import os
from pathlib import Path

from serving.core.errors import ConfigError, InvalidImageError
from serving.core.preprocessing import IMAGE_SUFFIXES, PreprocessSpec, read_image_file, sniff_format

LIST_SUFFIXES = (".txt", ".csv", ".lst")
#: Object-store prefixes read through pyarrow.fs (S3 and GCS support ship in pyarrow's wheels;
#: file:// is the same code path on a local disk).
URI_SCHEMES = ("s3://", "gs://", "gcs://", "file://")


def list_inputs(spec: str | Path) -> list[str]:
    """A folder (recursive; image files by extension or by content), a glob, a text/CSV file
    listing paths (first column, or a column named ``path``), or one image file."""
    text = str(spec)
    if text.startswith(URI_SCHEMES):
        return _list_uri(text)
    path = Path(text)
    if path.is_dir():
        found = sorted(
            str(p)
            for p in path.rglob("*")
            # A broken link is listed too: it becomes an error row, not a silent omission.
            if (p.is_file() or p.is_symlink()) and not p.is_dir() and _looks_like_image(p)
        )
    elif path.is_file():
        found = _read_list(path) if path.suffix.lower() in LIST_SUFFIXES else [str(path)]
    elif glob.has_magic(text):
        found = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p))
    else:
        raise ConfigError(f"input {text} is not a folder, a file or a glob")
    if not found:
        raise ConfigError(f"input {text} holds no images")
    return [input_key(p) for p in found]


def input_key(path: str) -> str:
    """An input as jobs list and resume it: object-store URIs as they are, local paths
    absolute, so that a rerun naming the same folder another way resumes, not rescores."""
    return path if path.startswith(URI_SCHEMES) else os.path.abspath(path)


def _list_uri(uri: str) -> list[str]:
    """Image objects under an object-store prefix (or one object), by extension."""
    import pyarrow.fs as pafs

    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.File:
            return [uri]
        if info.type != pafs.FileType.Directory:
            raise ConfigError(f"input {uri} does not exist")
        found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"cannot list {uri}: {error}") from None
    scheme = uri.split("://", 1)[0]
    prefix = "file://" if scheme == "file" else f"{scheme}://"
    listed = sorted(
        prefix + item.path
        for item in found
        if item.type == pafs.FileType.File
        and Path(item.path).suffix.lower() in IMAGE_SUFFIXES
        and not Path(item.path).name.startswith(".")
    )
    if not listed:
        raise ConfigError(f"input {uri} holds no images")
    return listed


def read_input(path: str, spec: PreprocessSpec) -> bytes:
    """The bytes of one input (a local file or an object-store URI), within ``spec``'s limit."""
    if path.startswith(URI_SCHEMES):
        return _read_uri(path, spec)
    return read_image_file(path, spec)


def _read_uri(uri: str, spec: PreprocessSpec) -> bytes:
    import pyarrow.fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        with filesystem.open_input_file(path) as handle:
            if handle.size() > spec.max_bytes:
                raise InvalidImageError(
                    f"{uri} is {handle.size()} bytes; the limit is {spec.max_bytes}",
                    reason="too_large",
                    status_code=413,
                )
            return handle.read()
    except (OSError, ValueError) as error:
        raise InvalidImageError(f"cannot read {uri}: {error}", reason="corrupt") from error


def _looks_like_image(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            return sniff_format(handle.read(16)) is not None
    except OSError:
        return False


def _read_list(path: Path) -> list[str]:
    base = path.parent
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row and row[0].strip()]
    if not rows:
        return []
    column = 0
    header = [cell.strip().lower() for cell in rows[0]]
    if "path" in header:
        column = header.index("path")
        rows = rows[1:]
    entries = []
    for row in rows:
        entry = row[column].strip()
        if entry.startswith("#"):
            continue
        entries.append(entry if os.path.isabs(entry) else str(base / entry))
    return entries
