"""``POST /explain``: where the served model looked, for one uploaded image
(``serving.core.explain``), on the live version a request leases, as ``/predict`` reads,
decodes and answers.

Occlusion's 50 forward passes go through a batcher of their own per served version (made by
the same factory as the others, without the prediction observer: covered copies are no
traffic, and must not move the drift window or the prediction counters), in chunks, one
explanation at a time per worker: ``/predict``'s batcher never waits behind them, and the
CPU they take is bounded to one chunk at a time. cam's one forward pass and its gradient run
on the decode pool, as ``imgclf explain`` runs them (``serving.core.explain.cam_explained``):
not on the batcher, whose answers hold no feature maps, and never on the event loop.
"""

from __future__ import annotations

import asyncio

import numpy as np
from starlette.requests import Request

from serving.core.errors import ImgclfError
from serving.core.explain import cam_explained, method_for, occlusion_explained, occlusion_images
from serving.web.context import WorkerContext
from serving.web.requests import Upload

#: Covered copies per batch: a /predict request between two chunks waits for one at most.
#: Eight fill a power-of-two bucket (ten were padded to sixteen: 6.3 against 7.7 ms an
#: explanation, and /predict kept 1.0 of its throughput beside them against 0.88).
CHUNK = 8
#: Answer formats: the JSON map, or the picture.
FORMATS = ("json", "png")


def explain_options(request: Request, form: dict) -> tuple[str | None, str | None, str]:
    """``method``, ``class`` and ``format`` from the query or the form fields (a method is
    checked against the version that answers: ``serving.core.explain.method_for``)."""

    def option(name: str) -> str | None:
        value = request.query_params.get(name, form.get(name))
        return None if value is None else str(value).strip()

    answer_format = option("format") or "json"
    if answer_format not in FORMATS:
        raise ImgclfError(f"format must be json or png, got {answer_format[:40]!r}")
    return option("method") or None, option("class"), answer_format


async def explain_upload(
    worker: WorkerContext, upload: Upload, asked: str | None, wanted: str | None, rid: str
) -> tuple[dict, np.ndarray]:
    """The explanation of one uploaded image on the live version, by the ``asked`` method
    (default: cam where the version has it), with the version and the request id; and the
    image as the model saw it (for the overlay)."""
    async with worker.explaining:
        with worker.versions.lease() as served:
            runtime = served.runtime
            method = method_for(runtime, asked)
            (image,) = await worker.decode_all([upload], runtime)
            if method == "cam":
                loop = asyncio.get_running_loop()
                found = await loop.run_in_executor(
                    worker.decoder, cam_explained, runtime, image, wanted
                )
            else:
                copies = occlusion_images(image)
                batcher = served.explain_batcher()
                answers = np.concatenate(
                    [
                        np.asarray(await batcher.submit(copies[start : start + CHUNK]))
                        for start in range(0, len(copies), CHUNK)
                    ]
                )
                found = occlusion_explained(runtime.classes, answers, wanted)
            return found | {"model_version": served.version, "request_id": rid}, image
