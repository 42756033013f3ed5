"""Batch scoring on a Ray cluster (Ray Data): ``imgclf score INPUT --engine ray``.

The driver lists the inputs, resolves and hash-checks the model directory once, and puts the
model's files in Ray's object store. A pool of actors (``map_batches`` with
``ActorPoolStrategy``) each build one ``ClassifierRuntime`` from them and score batches of
paths: reading and decoding catch per file, so an unreadable image becomes an error row and
never fails the job (Ray's ``read_images`` would fail it, and ``max_errored_blocks`` would
drop good images silently). The driver streams the rows back (Ray Data's backpressure) and
writes them with the same writer as the local engine: one schema, one resume logic. A crashed
actor is restarted and its batch retried (Ray Data's default for actor pools); rows reach the
output only once a batch is done, so nothing is lost or written twice.

An actor's copy of the model on disk lives only while it builds its runtime (ONNX Runtime then
holds the model in memory). On a cluster on this machine the copies go in a folder of the job's
that the driver removes at the end, so even an actor killed while building leaves nothing.
Ray's notices that ask nothing of the user are kept off the terminal; its errors are not.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from serving.batch.engine import Engine, decode_path, infer_decoded, rows_for
from serving.batch.writers import parquet_schema
from serving.core.errors import ConfigError
from serving.core.model_dir import INT8_MODEL, METADATA, ONNX_MODEL, REFERENCE_PROFILE
from serving.core.runtime import ClassifierRuntime

log = logging.getLogger(__name__)

#: The line Ray's core worker writes to the driver's stderr, at level ``E``, for every actor
#: whose constructor arguments are in the object store: Ray Data creates every actor of a pool
#: so (ray-project/ray#57733), and no setting of Ray's silences it short of every error of the
#: core worker (``RAY_BACKEND_LOG_LEVEL=fatal``). It stays in Ray's python-core-driver log.
ACTOR_ARGUMENTS_NOTICE = re.compile(
    rb".*core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in "
    rb"the object store and max_restarts > 0\."
)


def import_ray():
    """Ray, or one readable line saying how to get it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError(
            "--engine ray needs Ray Data: pip install -c constraints.txt -e '.[ray]'"
        ) from None
    return ray


def connect(address: str | None, *, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address`` (``auto``, ``host:port`` or ``ray://…``), or start a
    local one-node cluster of our own when none is given (never one found on the machine).
    Returns True if we started it (and so must shut it down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise ConfigError(f"cannot connect to the Ray cluster at {address}: {first}") from None
        return False
    # "local": a cluster of our own even where `ray start` left one on this machine, which a
    # bare ray.init() would join (and then refuse num_cpus, with a traceback).
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **options)
    return True


def model_files(runtime: ClassifierRuntime) -> dict[str, bytes]:
    """The files an actor needs to rebuild the runtime, read (and hash-checked) once."""
    from serving.core.model_dir import read_verified

    names = [METADATA, INT8_MODEL if runtime.precision == "int8" else ONNX_MODEL]
    if REFERENCE_PROFILE in runtime.metadata["files"]:
        names.append(REFERENCE_PROFILE)
    return {
        name: (runtime.model_dir / name).read_bytes()
        if name == METADATA
        else read_verified(runtime.model_dir, runtime.metadata, name)
        for name in names
    }


class ScoreBatch:
    """A Ray Data actor: one runtime, built once; a batch of paths in, output rows out."""

    def __init__(
        self,
        files_ref: list,
        provider: str,
        precision: str,
        top_k: int,
        threads: int,
        job_folder: str,
    ):
        import ray

        files = ray.get(files_ref[0])  # wrapped in a list, so Ray does not resolve it for us
        # The job's folder exists only where the driver runs; elsewhere, this node's TMPDIR.
        on_drivers_machine = os.path.isdir(job_folder) and os.access(job_folder, os.W_OK)
        directory = Path(
            tempfile.mkdtemp(prefix="imgclf-model-", dir=job_folder if on_drivers_machine else None)
        )
        try:
            for name, data in files.items():
                (directory / name).write_bytes(data)
            # The model directory is verified against metadata.json's hashes again here.
            self.runtime = ClassifierRuntime(
                directory, provider=provider, precision=precision, intra_op_threads=threads
            )
        finally:
            # The sessions hold the model in memory, and scoring reads no file of it again.
            shutil.rmtree(directory, ignore_errors=True)
        self.top_k = top_k

    def __call__(self, batch):
        import pyarrow as pa

        paths = batch.column("path").to_pylist()
        scored = infer_decoded(self.runtime, [decode_path(self.runtime, path) for path in paths])
        return pa.Table.from_pylist(rows_for(self.runtime, scored, self.top_k), parquet_schema())


def ray_engine(
    runtime: ClassifierRuntime,
    top_k: int,
    *,
    actors: int | None = None,
    gpus_per_actor: float = 0,
    batch_size: int = 64,
) -> Engine:
    """An engine for ``serving.batch.job.score`` that runs on the connected Ray cluster."""
    ray = import_ray()
    from ray.data import ActorPoolStrategy

    # Our own progress bar counts rows; Ray Data's would print over it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Its only warnings are that notice ("Progress bars disabled. To enable, set ...").
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    resources = ray.cluster_resources()
    cpus = int(resources.get("CPU", 1))
    if gpus_per_actor > resources.get("GPU", 0):
        # Ray would wait for a GPU that never comes, with a warning after a minute.
        raise ConfigError(
            f"--gpus-per-actor {gpus_per_actor:g} but the Ray cluster has "
            f"{resources.get('GPU', 0):g} GPU(s); drop --gpus-per-actor to score on CPUs"
        )
    # On a small node an actor pool that takes every CPU starves Ray Data's own tasks.
    pool_size = actors or max(1, cpus - 1)
    provider = "cuda" if gpus_per_actor > 0 else "cpu"
    files_ref = ray.put(model_files(runtime))

    def run(paths: list[str]) -> Iterator[list[dict]]:
        if not paths:
            return
        blocks = max(1, min(len(paths) // batch_size + 1, 10_000))
        dataset = ray.data.from_items(
            [{"path": path} for path in paths], override_num_blocks=blocks
        )
        job_folder = tempfile.mkdtemp(prefix="imgclf-ray-job-")
        try:
            scored = dataset.map_batches(
                ScoreBatch,
                fn_constructor_kwargs={
                    "files_ref": [files_ref],
                    "provider": provider,
                    "precision": runtime.precision,
                    "top_k": top_k,
                    "threads": 1,
                    "job_folder": job_folder,
                },
                batch_size=batch_size,
                batch_format="pyarrow",
                # An actor beyond one per block would have nothing to score (and Ray Data
                # warns so).
                compute=ActorPoolStrategy(size=min(pool_size, blocks)),
                num_cpus=1,
                num_gpus=gpus_per_actor,
                # Ray Data restarts a dead actor and retries its batch (max_restarts and
                # max_task_retries default to -1 for actor pools).
            )
            batches = iter(scored.iter_batches(batch_size=None, batch_format="pyarrow"))
            # Ray Data creates the pool's actors, and Ray notices each, before the first batch.
            from imgclf.quiet import native_log_filter

            with native_log_filter(ACTOR_ARGUMENTS_NOTICE):
                first = next(batches, None)
            if first is None:
                return
            yield first.to_pylist()
            for table in batches:
                yield table.to_pylist()
        finally:
            # Whatever an actor killed while building its runtime left, on this machine.
            shutil.rmtree(job_folder, ignore_errors=True)

    return run
