"""Batch inference over many image files with the serving runtime: which files, and a
streaming decode -> ONNX Runtime loop whose memory stays flat however many images there are.

Used by ``imgclf score`` and ``imgclf drift``; the HTTP service uses the same runtime.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitoring.offline import SignalCollector
from serving.errors import ConfigError, InvalidImageError, ModelError
from serving.preprocessing import IMAGE_SUFFIXES, read_image_file, sniff_format
from serving.runtime import ClassifierRuntime

LIST_SUFFIXES = (".txt", ".csv", ".lst")
#: Object-store prefixes read through pyarrow.fs (S3 and GCS support ship in pyarrow's wheels;
#: file:// is the same code path on a local disk).
URI_SCHEMES = ("s3://", "gs://", "gcs://", "file://")


@dataclass
class Scored:
    """One input's outcome: probabilities and the model input, or the error that stopped it."""

    path: str
    probabilities: np.ndarray | None = None
    image: np.ndarray | None = None
    error: str | None = None


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
    return found


def split_cores(decode_workers: int | None = None) -> tuple[int, int]:
    """Decoding threads and ONNX Runtime threads for a batch job: the two run side by side,
    so they share the cores instead of both claiming all of them (on 2 cores that took
    scoring from 2,600 to 3,500 images/s)."""
    cores = os.cpu_count() or 2
    decode = decode_workers or max(1, cores // 2)
    return decode, max(1, cores - decode)


def score_paths(
    runtime: ClassifierRuntime,
    paths: Iterable[str],
    *,
    chunk_size: int = 256,
    workers: int | None = None,
) -> Iterator[list[Scored]]:
    """Yield results chunk by chunk, in input order. The next chunk is decoded by a thread
    pool while ONNX Runtime (which releases the GIL) runs this one, so at most two chunks of
    images are in memory."""
    workers = workers or split_cores()[0]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[Future] | None = None
        for chunk in _chunks(paths, chunk_size):
            submitted = [pool.submit(decode_path, runtime, path) for path in chunk]
            if pending is not None:
                yield infer_decoded(runtime, [future.result() for future in pending])
            pending = submitted
        if pending is not None:
            yield infer_decoded(runtime, [future.result() for future in pending])


def drift_report(runtime: ClassifierRuntime, inputs: str | Path, *, chunk_size: int = 256) -> dict:
    """``imgclf drift``: the service's drift computation over a folder or list of images,
    for batch jobs and for investigating an alert."""
    profile = runtime.reference_profile()
    if profile is None:
        raise ModelError(f"{runtime.model_dir} has no reference_profile.json; re-export it")
    paths = list_inputs(inputs)
    collector = SignalCollector()
    failed = []
    for chunk in score_paths(runtime, paths, chunk_size=chunk_size):
        good = [item for item in chunk if item.error is None]
        failed += [{"path": item.path, "error": item.error} for item in chunk if item.error]
        if good:
            collector.add(
                np.stack([item.image for item in good]),
                np.stack([item.probabilities for item in good]),
            )
    return collector.report(
        profile,
        model={"name": runtime.name, "version": runtime.version},
        input=str(inputs),
        images=len(paths),
        failed=failed,
    )


def decode_path(runtime: ClassifierRuntime, path: str) -> Scored:
    """One input decoded for the model, or the error that stopped it: never raises for a
    bad file, so one file cannot fail a job."""
    try:
        if path.startswith(URI_SCHEMES):
            data = _read_uri(path, runtime)
        else:
            data = read_image_file(path, runtime.spec)
        return Scored(path, image=runtime.preprocess(data))
    except InvalidImageError as error:
        return Scored(path, error=error.message)


def infer_decoded(runtime: ClassifierRuntime, decoded: list[Scored]) -> list[Scored]:
    """Run the decoded inputs of a chunk through the model in one batch; errors stay errors."""
    good = [item for item in decoded if item.error is None]
    if good:
        probabilities = runtime.predict(np.stack([item.image for item in good]))
        for item, row in zip(good, probabilities, strict=True):
            item.probabilities = row
    return decoded


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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


def _read_uri(uri: str, runtime: ClassifierRuntime) -> bytes:
    import pyarrow.fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
        with filesystem.open_input_file(path) as handle:
            if handle.size() > runtime.spec.max_bytes:
                raise InvalidImageError(
                    f"{uri} is {handle.size()} bytes; the limit is {runtime.spec.max_bytes}",
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
