"""``imgclf score``: a resumable, streaming batch job over many images with the serving runtime.

Rows are appended chunk by chunk (CSV: one write and fsync per chunk; Parquet: one atomically
written part file per chunk in a dataset directory), so a killed job leaves every finished
row readable and a rerun with the same output skips what is already there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from monitoring.embedding import MAX_WINDOW
from monitoring.estimate import monitoring_references
from monitoring.offline import SignalCollector
from serving.batch import ray_engine
from serving.batch.engine import Engine, embeddings_of, local_engine, score_paths, split_cores
from serving.batch.inputs import list_inputs
from serving.batch.writers import open_output, output_format_of
from serving.core.errors import ConfigError
from serving.core.files import write_json
from serving.core.runtime import ClassifierRuntime

log = logging.getLogger(__name__)


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
        digits = 1 if self.images_per_second < 100 else 0  # slow jobs (big photos) need it
        return (
            f"{state}: {self.scored} scored, {self.failed} failed, {self.skipped} skipped "
            f"(already in the output) of {self.total}; {self.images_per_second:.{digits}f} "
            "images/s"
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
    paths: list[str] | None = None,
) -> Summary:
    """Score every image of ``inputs`` into ``output``; then write the drift report next to it.
    ``paths``: ``inputs`` already listed (``run_job`` lists them before the model loads).

    ``engine`` turns the paths still to score into output rows, chunk by chunk; the default
    is this machine (``local_engine``), ``serving.batch.ray_engine`` spreads it over a Ray cluster.
    Whichever runs, this function writes the rows, so both write one schema and resume alike.
    """
    engine = engine or local_engine(runtime, top_k, chunk_size=chunk_size, workers=workers)
    writer = open_output(Path(output), output_format)
    writer.check_model(runtime.name, runtime.version)
    paths = list_inputs(inputs) if paths is None else paths
    writer.drop_failed()  # a rerun tries the inputs that failed again
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


def write_drift_report(runtime: ClassifierRuntime, writer) -> tuple[Path | None, str | None]:
    """Drift of every successfully scored row in the output against the reference profile."""
    profile = runtime.reference_profile()
    if profile is None:
        log.warning("%s has no reference_profile.json: no drift report", runtime.model_dir)
        return None, None
    collector = SignalCollector(monitoring_references(runtime.monitoring_files())[1])
    index = {label: i for i, label in enumerate(runtime.classes)}
    scored_paths: list[str] = []
    for rows in writer.read_rows():
        good = [row for row in rows if not row["error"]]
        scored_paths += [row["path"] for row in good]
        if good:
            collector.parts["class"].append(np.array([index[row["label"]] for row in good]))
            for name, column in (
                ("confidence", "score"),
                ("entropy", "entropy"),
                ("brightness", "brightness"),
                ("contrast", "contrast"),
            ):
                collector.parts[name].append(np.array([float(row[column]) for row in good]))
    if collector.embedding is not None:
        # The output has no embeddings (rows stay small, and the Ray engine's schema fixed):
        # a uniform sample of the scored inputs is run again here for them.
        sample = sorted(
            np.random.default_rng(0).choice(
                len(scored_paths), min(len(scored_paths), MAX_WINDOW), replace=False
            )
        )
        for chunk in score_paths(runtime, [scored_paths[i] for i in sample]):
            good = [item for item in chunk if item.error is None]
            found = embeddings_of(good)
            if found is not None:
                collector.add_embeddings(found)
    report = collector.report(
        profile,
        model={"name": runtime.name, "version": runtime.version},
        input=str(writer.path),
    )
    path = writer.path.with_name(writer.path.name + ".drift.json")
    write_json(path, report)
    return path, report["status"]


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


def run_job(
    inputs: str | Path,
    model: Path,
    output: Path,
    *,
    output_format: str | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    top_k: int = 5,
    provider: str = "auto",
    precision: str = "fp32",
    progress: bool = True,
    engine: str = "local",
    address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float = 0.0,
) -> Summary:
    """``imgclf score``: check the options, build the runtime and the engine (local, or Ray
    with the cluster this job may start and always stops), and ``score``."""
    if batch_size < 1 or top_k < 1 or (workers is not None and workers < 1):
        raise ConfigError("--batch-size, --top-k and --workers must be positive")
    if engine not in ("local", "ray"):
        raise ConfigError(f"--engine must be local or ray, got {engine!r}")
    if engine == "local" and (address or actors or gpus_per_actor):
        raise ConfigError("--address, --actors and --gpus-per-actor need --engine ray")
    if (actors is not None and actors < 1) or gpus_per_actor < 0:
        raise ConfigError("--actors must be positive and --gpus-per-actor not negative")
    output_format_of(output, output_format)  # before the model loads: a wrong name is one line
    paths = list_inputs(inputs)  # and a mistyped input
    decode_workers, ort_threads = split_cores(workers)
    runtime = ClassifierRuntime(
        model,
        provider=provider,
        precision=precision,
        max_batch_size=batch_size,
        intra_op_threads=ort_threads,
    )
    started_cluster = False
    scoring_engine = None
    try:
        if engine == "ray":
            ray_engine.import_ray()  # one line if the extra is missing, before any work
            started_cluster = ray_engine.connect(address)
            scoring_engine = ray_engine.ray_engine(
                runtime, top_k, actors=actors, gpus_per_actor=gpus_per_actor, batch_size=batch_size
            )
        return score(
            inputs,
            runtime,
            output,
            output_format=output_format,
            top_k=top_k,
            chunk_size=max(256, batch_size * 4),
            workers=decode_workers,
            progress=progress,
            engine=scoring_engine,
            paths=paths,
        )
    finally:
        if started_cluster:
            # The local cluster this job started, on success, error or Ctrl-C.
            ray_engine.import_ray().shutdown()
