"""``imgclf score``: a resumable, streaming batch job over many images with the serving runtime.

Rows are appended chunk by chunk (CSV: one write and fsync per chunk; Parquet: one atomically
written part file per chunk in a dataset directory), so a killed job leaves every finished
row readable and a rerun with the same output skips what is already there.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from monitoring.drift import image_signals
from monitoring.offline import SignalCollector
from serving.batch import Scored, list_inputs, score_paths
from serving.errors import ConfigError
from serving.files import fsync_dir, write_json
from serving.runtime import ClassifierRuntime

log = logging.getLogger(__name__)

#: An engine: the paths still to score in, output rows out, a chunk at a time.
Engine = Callable[[list[str]], Iterator[list[dict]]]

COLUMNS = (
    "path",
    "label",
    "score",
    "top_k_labels",
    "top_k_scores",
    "entropy",
    "brightness",
    "contrast",
    "model_name",
    "model_version",
    "error",
)


@dataclass
class Summary:
    total: int = 0
    scored: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    drift_report: Path | None = None
    drift_status: str | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        state = "interrupted" if self.interrupted else "done"
        return (
            f"{state}: {self.scored} scored, {self.failed} failed, {self.skipped} skipped "
            f"(already in the output) of {self.total}; {self.images_per_second:.0f} images/s"
        )


def score(
    inputs: str | Path,
    runtime: ClassifierRuntime,
    output: Path,
    *,
    output_format: str | None = None,
    top_k: int = 5,
    chunk_size: int = 256,
    workers: int | None = None,
    progress: bool = True,
    engine: Engine | None = None,
) -> Summary:
    """Score every image of ``inputs`` into ``output``; then write the drift report next to it.

    ``engine`` turns the paths still to score into output rows, chunk by chunk; the default
    is this machine (``local_engine``), ``serving.ray_engine`` spreads it over a Ray cluster.
    Whichever runs, this function writes the rows, so both write one schema and resume alike.
    """
    engine = engine or local_engine(runtime, top_k, chunk_size=chunk_size, workers=workers)
    writer = open_output(Path(output), output_format)
    writer.check_model(runtime.name, runtime.version)
    paths = list_inputs(inputs)
    done = writer.scored_paths()
    todo = [path for path in paths if path not in done]
    summary = Summary(total=len(paths), skipped=len(paths) - len(todo))
    started = time.perf_counter()
    bar = progress_bar(len(todo), progress)
    try:
        for rows in engine(todo):
            writer.append(rows)
            failures = [row["path"] for row in rows if row["error"]]
            summary.failed += len(failures)
            summary.failures += failures[: max(0, 20 - len(summary.failures))]
            summary.scored += len(rows) - len(failures)
            bar.update(len(rows))
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - started
    if not summary.interrupted:
        summary.drift_report, summary.drift_status = write_drift_report(runtime, writer)
    return summary


def local_engine(
    runtime: ClassifierRuntime, top_k: int, *, chunk_size: int = 256, workers: int | None = None
) -> Engine:
    """Decode on a thread pool while ONNX Runtime runs the previous chunk, on this machine."""

    def run(paths: list[str]) -> Iterator[list[dict]]:
        for chunk in score_paths(runtime, paths, chunk_size=chunk_size, workers=workers):
            yield rows_for(runtime, chunk, top_k)

    return run


def write_drift_report(runtime: ClassifierRuntime, writer) -> tuple[Path | None, str | None]:
    """Drift of every successfully scored row in the output against the reference profile."""
    profile = runtime.reference_profile()
    if profile is None:
        log.warning("%s has no reference_profile.json: no drift report", runtime.model_dir)
        return None, None
    collector = SignalCollector()
    index = {label: i for i, label in enumerate(runtime.classes)}
    for rows in writer.read_rows():
        good = [row for row in rows if not row["error"]]
        if good:
            collector.parts["class"].append(np.array([index[row["label"]] for row in good]))
            for name, column in (
                ("confidence", "score"),
                ("entropy", "entropy"),
                ("brightness", "brightness"),
                ("contrast", "contrast"),
            ):
                collector.parts[name].append(np.array([float(row[column]) for row in good]))
    report = collector.report(
        profile,
        model={"name": runtime.name, "version": runtime.version},
        input=str(writer.path),
    )
    path = writer.path.with_name(writer.path.name + ".drift.json")
    write_json(path, report)
    return path, report["status"]


def rows_for(runtime: ClassifierRuntime, chunk: list[Scored], top_k: int) -> list[dict]:
    """Output rows for a chunk, in input order; top-k and signals computed for the chunk."""
    good = [item for item in chunk if item.error is None]
    computed = {}
    if good:
        probabilities = np.stack([item.probabilities for item in good])
        signals = image_signals(np.stack([item.image for item in good]), probabilities)
        for position, (item, ranked) in enumerate(
            zip(good, runtime.top_k(probabilities, top_k), strict=True)
        ):
            computed[id(item)] = {
                "label": ranked[0]["label"],
                "score": ranked[0]["score"],
                "top_k_labels": [entry["label"] for entry in ranked],
                "top_k_scores": [entry["score"] for entry in ranked],
                "entropy": float(signals["entropy"][position]),
                "brightness": float(signals["brightness"][position]),
                "contrast": float(signals["contrast"][position]),
                "error": "",
            }
    failed = {
        "label": "",
        "score": None,
        "top_k_labels": [],
        "top_k_scores": [],
        "entropy": None,
        "brightness": None,
        "contrast": None,
    }
    return [
        {
            "path": item.path,
            **(computed[id(item)] if item.error is None else {**failed, "error": item.error}),
            "model_name": runtime.name,
            "model_version": runtime.version,
        }
        for item in chunk
    ]


def parquet_schema():
    """The Parquet columns every engine writes (COLUMNS, typed)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.string()),
            ("score", pa.float64()),
            ("top_k_labels", pa.list_(pa.string())),
            ("top_k_scores", pa.list_(pa.float64())),
            ("entropy", pa.float64()),
            ("brightness", pa.float64()),
            ("contrast", pa.float64()),
            ("model_name", pa.string()),
            ("model_version", pa.int64()),
            ("error", pa.string()),
        ]
    )


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="img",
        desc="scoring",
        disable=not enabled or None,
        dynamic_ncols=True,
        smoothing=0.1,
    )


def open_output(path: Path, output_format: str | None):
    output_format = output_format or ("parquet" if path.suffix.lower() == ".parquet" else "csv")
    if output_format == "csv":
        return CsvOutput(path)
    if output_format == "parquet":
        return ParquetOutput(path)
    raise ConfigError(f"--format must be csv or parquet, got {output_format!r}")


class _Output:
    def __init__(self, path: Path) -> None:
        self.path = path

    def check_model(self, name: str, version: int) -> None:
        for rows in self.read_rows():
            if rows:
                first = rows[0]
                if (first["model_name"], int(first["model_version"])) != (name, int(version)):
                    raise ConfigError(
                        f"{self.path} holds scores of {first['model_name']} "
                        f"v{first['model_version']}, not {name} v{version}; choose another "
                        "--output"
                    )
                return

    def scored_paths(self) -> set[str]:
        return {row["path"] for rows in self.read_rows() for row in rows}


class CsvOutput(_Output):
    """One CSV file; each chunk is one write followed by fsync. A torn last line (a kill
    mid-write) is cut off before anything is appended."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; --output names a CSV file")
        self._repair()

    def read_rows(self):
        import csv

        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise ConfigError(f"{self.path} is not an imgclf score file (its columns differ)")
            batch = []
            for row in reader:
                batch.append(row)
                if len(batch) == 4096:
                    yield batch
                    batch = []
            yield batch

    def append(self, rows: list[dict]) -> None:
        import csv
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        new = not self.path.exists() or self.path.stat().st_size == 0
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    **row,
                    "top_k_labels": json.dumps(row["top_k_labels"]),
                    "top_k_scores": json.dumps(row["top_k_scores"]),
                }
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())
        if new:
            fsync_dir(self.path.parent)

    def _repair(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 1))
            if handle.read(1) == b"\n":
                return
            handle.seek(0)
            data = handle.read()
            keep = data.rfind(b"\n") + 1
            log.warning("%s ends with a torn row (interrupted write); dropping it", self.path)
            handle.truncate(keep)


class ParquetOutput(_Output):
    """A Parquet dataset directory: one part file per chunk, each written to a hidden temporary
    name and renamed, because a Parquet file cannot be appended to (and a killed writer leaves
    no footer). ``pandas.read_parquet(dir)`` and ``pyarrow.parquet.read_table(dir)`` read it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{path} exists and is not a Parquet dataset directory")
        for leftover in path.glob(".part-*.tmp") if path.is_dir() else ():
            leftover.unlink()  # a part a killed job never finished

    def _parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet")) if self.path.is_dir() else []

    def read_rows(self):
        import pyarrow.parquet as pq

        for part in self._parts():
            yield pq.read_table(part).to_pylist()

    def append(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows, schema=parquet_schema())
        self.path.mkdir(parents=True, exist_ok=True)
        parts = self._parts()
        number = int(parts[-1].stem.split("-")[1]) + 1 if parts else 1
        final = self.path / f"part-{number:06d}.parquet"
        temporary = self.path / f".part-{number:06d}.parquet.tmp"
        pq.write_table(table, temporary)
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        fsync_dir(self.path)
