"""``POST /explain``: where the served model looked, for one uploaded image
(``serving.core.explain``), on the live version a request leases, as ``/predict`` reads,
decodes and answers.

Occlusion's 50 forward passes go through a batcher of their own per served version (made by
the same factory as the others, without the prediction observer: covered copies are no
traffic, and must not move the drift window or the prediction counters), in chunks, one
explanation at a time per worker: ``/predict``'s batcher never waits behind them, and the
CPU they take is bounded to one chunk at a time.
"""

from __future__ import annotations

import numpy as np
from starlette.requests import Request

from serving.core.errors import ImgclfError
from serving.core.explain import METHODS, explained, occlusion_images
from serving.web.context import WorkerContext
from serving.web.requests import Upload

#: Covered copies per batch: a /predict request between two chunks waits for one at most.
CHUNK = 10
#: Answer formats: the JSON map, or the picture.
FORMATS = ("json", "png")


def explain_options(request: Request, form: dict) -> tuple[str | None, str]:
    """``class`` and ``format`` from the query or the form fields, once ``method`` is one
    this server computes (occlusion, the only one yet)."""

    def option(name: str) -> str | None:
        value = request.query_params.get(name, form.get(name))
        return None if value is None else str(value).strip()

    method = option("method") or "occlusion"
    if method == "cam":
        error = ImgclfError(
            "method=cam needs an explanation graph, which no published version has yet; use "
            "method=occlusion"
        )
        error.status_code = 422
        raise error
    if method not in METHODS:
        raise ImgclfError(f"method must be one of {', '.join(METHODS)}, got {method[:40]!r}")
    answer_format = option("format") or "json"
    if answer_format not in FORMATS:
        raise ImgclfError(f"format must be json or png, got {answer_format[:40]!r}")
    return option("class"), answer_format


async def explain_upload(
    worker: WorkerContext, upload: Upload, wanted: str | None, rid: str
) -> tuple[dict, np.ndarray]:
    """The explanation of one uploaded image on the live version (``serving.core.explain.
    explained``, with the version and the request id), and the image as the model saw it
    (for the overlay)."""
    async with worker.explaining:
        with worker.versions.lease() as served:
            runtime = served.runtime
            (image,) = await worker.decode_all([upload], runtime)
            copies = occlusion_images(image)
            batcher = served.explain_batcher()
            answers = np.concatenate(
                [
                    np.asarray(await batcher.submit(copies[start : start + CHUNK]))
                    for start in range(0, len(copies), CHUNK)
                ]
            )
            found = explained(runtime.classes, answers, wanted)
            return found | {"model_version": served.version, "request_id": rid}, image
