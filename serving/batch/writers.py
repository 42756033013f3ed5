"""Output writers for batch scoring: a CSV file or a Parquet dataset directory, appended a
chunk at a time so that a killed job leaves every finished row readable and resumable."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from serving.batch.inputs import input_key
from serving.core.errors import ConfigError
from serving.core.files import fsync_dir

log = logging.getLogger(__name__)

#: The output columns, in order, with their Parquet types: the one list every engine writes.
COLUMN_TYPES = (
    ("path", "string"),
    ("label", "string"),
    ("score", "float64"),
    ("top_k_labels", "list<string>"),
    ("top_k_scores", "list<float64>"),
    ("entropy", "float64"),
    ("brightness", "float64"),
    ("contrast", "float64"),
    ("model_name", "string"),
    ("model_version", "int64"),
    ("error", "string"),
)
COLUMNS = tuple(name for name, _ in COLUMN_TYPES)


def parquet_schema():
    """``COLUMN_TYPES`` as a pyarrow schema."""
    import pyarrow as pa

    def arrow(kind: str):
        if kind.startswith("list<"):
            return pa.list_(arrow(kind[5:-1]))
        return getattr(pa, kind)()

    return pa.schema([(name, arrow(kind)) for name, kind in COLUMN_TYPES])


def output_format_of(path: Path, output_format: str | None) -> str:
    """csv or parquet: ``output_format`` when given, else from the name (``.csv``,
    ``.parquet``); any other ending is refused rather than silently written as CSV."""
    if output_format is None:
        suffix = Path(path).suffix.lower()
        if suffix not in (".csv", ".parquet"):
            raise ConfigError(
                f"--output {path} must end in .csv or .parquet (or give --format csv|parquet)"
            )
        output_format = suffix[1:]
    if output_format not in ("csv", "parquet"):
        raise ConfigError(f"--format must be csv or parquet, got {output_format!r}")
    return output_format


def open_output(path: Path, output_format: str | None):
    output_format = output_format_of(path, output_format)
    if output_format == "csv":
        return CsvOutput(path)
    return ParquetOutput(path)


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
        """Inputs already scored without error (local paths absolute), so that a rerun skips
        them and tries the failed ones again."""
        return {
            input_key(row["path"]) for rows in self.read_rows() for row in rows if not row["error"]
        }

    def drop_failed(self) -> int:
        """Remove the rows that failed, before a rerun scores those inputs again: each input
        keeps one row. Returns how many were removed (the output is read once, and
        rewritten only where a row failed)."""
        raise NotImplementedError


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

    def drop_failed(self) -> int:
        import csv

        rows = [row for chunk in self.read_rows() for row in chunk]
        kept = [row for row in rows if not row["error"]]
        if len(kept) == len(rows):
            return 0
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)  # read back as text: already in the file's own form
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        fsync_dir(self.path.parent)
        return len(rows) - len(kept)

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

    def drop_failed(self) -> int:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        removed = 0
        for part in self._parts():
            table = pq.read_table(part)
            kept = table.filter(pc.equal(table.column("error"), ""))
            if kept.num_rows == table.num_rows:
                continue
            removed += table.num_rows - kept.num_rows
            if kept.num_rows == 0:
                part.unlink()
                continue
            temporary = part.with_name(f".{part.name}.tmp")
            pq.write_table(kept, temporary)
            os.replace(temporary, part)
        if removed:
            fsync_dir(self.path)
        return removed

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
