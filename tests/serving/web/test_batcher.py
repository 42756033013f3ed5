"""The in-process adaptive batcher, on the real runtime: batching (the runtime pads to its
warmed shapes), per-request answers, overload and deadlines as 503, failures confined to
their batch."""

from __future__ import annotations

import asyncio
import os
import threading

import numpy as np
import pytest

from serving.core.buckets import pad_to_bucket, power_of_two_buckets
from serving.core.errors import ConfigError
from serving.core.runtime import ClassifierRuntime
from serving.web.batcher import AdaptiveBatcher, OverloadedError
from serving.web.settings import ServingSettings
from tests.serving.cases import good_images


@pytest.fixture(scope="module")
def runtime(published_model):
    return ClassifierRuntime(published_model, provider="cpu", max_batch_size=8)


@pytest.fixture(scope="module")
def images(runtime):
    arrays = [runtime.preprocess(data) for data, _, _ in good_images().values()]
    return np.stack([arrays[i % len(arrays)] for i in range(12)])


class Recorder:
    """The real runtime, noting the batch shapes it is called with."""

    def __init__(self, runtime, gate: threading.Event | None = None) -> None:
        self.runtime, self.gate, self.shapes = runtime, gate, []
        self.started = threading.Event()  # set when the first batch reaches the runtime

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.shapes.append(len(batch))
        return self.runtime.predict(batch)


def test_power_of_two_buckets_end_at_the_maximum():
    assert power_of_two_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert power_of_two_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert power_of_two_buckets(1) == (1,)
    assert ServingSettings(max_batch_size=8).buckets == (1, 2, 4, 8)


def test_settings_refuse_requests_larger_than_a_batch_and_bad_buckets():
    with pytest.raises(ValueError, match="max_images_per_request"):
        ServingSettings(max_batch_size=4, max_images_per_request=8)
    with pytest.raises(ValueError, match="end at max_batch_size"):
        ServingSettings.model_validate({"max_batch_size": 8, "batch_buckets": "1,4"})
    with pytest.raises(ConfigError, match="end at max_batch_size") as caught:
        ServingSettings.from_env({"IMGCLF_MAX_BATCH_SIZE": "8", "IMGCLF_BATCH_BUCKETS": "1,4"})
    assert "Value error" not in caught.value.message  # our words, not pydantic's
    custom = ServingSettings.from_env(
        {"IMGCLF_MAX_BATCH_SIZE": "12", "IMGCLF_BATCH_BUCKETS": "12,1,6"}
    )
    assert custom.buckets == (1, 6, 12)
    assert ServingSettings.from_env(custom.to_env()).buckets == (1, 6, 12)


def test_the_runtime_refuses_buckets_that_do_not_end_at_its_largest_batch(published_model):
    with pytest.raises(ConfigError, match="end at max_batch_size"):
        ClassifierRuntime(published_model, provider="cpu", max_batch_size=8, buckets=(1, 4))
    runtime = ClassifierRuntime(published_model, provider="cpu", max_batch_size=8, buckets=(8, 3))
    assert runtime.buckets == (3, 8)


def test_pad_to_bucket_appends_zero_rows_only():
    images = np.ones((5, 2, 2, 3), np.float32)
    padded = pad_to_bucket(images, (1, 2, 4, 8))
    assert padded.shape == (8, 2, 2, 3)
    assert (padded[:5] == 1).all() and (padded[5:] == 0).all()
    assert pad_to_bucket(images[:4], (1, 2, 4, 8)).shape[0] == 4
    with pytest.raises(ValueError):
        pad_to_bucket(np.ones((9, 2, 2, 3), np.float32), (1, 2, 4, 8))


def test_concurrent_requests_share_padded_batches_and_get_their_own_rows(runtime, images):
    gate = threading.Event()
    recorder = Recorder(runtime, gate)
    batcher = AdaptiveBatcher(recorder, max_batch_size=8)
    runs_before = runtime.runs_by_bucket.copy()
    requests = [images[i : i + 1] for i in range(7)] + [images[7:10]]

    async def scenario():
        tasks = [asyncio.create_task(batcher.submit(requests[0]))]
        await asyncio.to_thread(recorder.started.wait, 10)  # running alone, held by the gate
        tasks += [asyncio.create_task(batcher.submit(r)) for r in requests[1:]]
        await asyncio.sleep(0)  # one turn of the loop: the rest queue behind it
        gate.set()
        return await asyncio.gather(*tasks)

    answers = asyncio.run(scenario())
    batcher.close()
    # 1 alone; then 6 singles, and the 3-image request that no longer fit.
    assert recorder.shapes == [1, 6, 3]
    # The runtime padded them to its buckets: 1, 8 and 4.
    assert runtime.runs_by_bucket - runs_before == {1: 1, 8: 1, 4: 1}
    for request, answer in zip(requests, answers, strict=True):
        assert answer.shape == (len(request), len(runtime.classes))
        np.testing.assert_allclose(answer, runtime.predict(request), rtol=1e-5, atol=1e-6)


def test_a_full_queue_and_a_missed_deadline_are_503(runtime, images):
    gate = threading.Event()
    recorder = Recorder(runtime, gate)
    now = [0.0]
    batcher = AdaptiveBatcher(
        recorder, max_batch_size=8, max_queue_size=3, max_latency_s=0.1, clock=lambda: now[0]
    )

    async def scenario():
        first = asyncio.create_task(batcher.submit(images[:1]))
        await asyncio.to_thread(recorder.started.wait, 10)  # running, held by the gate
        queued = asyncio.create_task(batcher.submit(images[:3]))
        await asyncio.sleep(0)  # queued
        with pytest.raises(OverloadedError, match="queue is full") as full:
            await batcher.submit(images[:1])
        assert full.value.status_code == 503
        now[0] += 0.15  # the queued request is now past its deadline
        gate.set()
        assert (await first).shape[0] == 1
        with pytest.raises(OverloadedError, match="waited"):
            await queued
        return await batcher.submit(images[:2])  # the batcher still serves

    assert asyncio.run(scenario()).shape[0] == 2
    batcher.close()


def test_a_failing_batch_fails_only_its_requests_and_cancelled_callers_are_skipped(runtime, images):
    calls = []
    first_call, release = threading.Event(), threading.Event()

    def flaky(batch):
        calls.append(len(batch))
        first_call.set()
        if len(calls) == 1:
            assert release.wait(10)  # held until the others queued and one was cancelled
            raise RuntimeError("device lost")
        return runtime.predict(batch)

    batcher = AdaptiveBatcher(flaky, max_batch_size=8)

    async def scenario():
        doomed = asyncio.create_task(batcher.submit(images[:1]))
        await asyncio.to_thread(first_call.wait, 10)  # the doomed batch is running
        gone = asyncio.create_task(batcher.submit(images[1:2]))
        kept = asyncio.create_task(batcher.submit(images[2:4]))
        await asyncio.sleep(0)  # both queued behind it
        gone.cancel()
        release.set()
        with pytest.raises(RuntimeError, match="device lost"):
            await doomed
        return await kept

    assert asyncio.run(scenario()).shape[0] == 2
    assert calls == [1, 2], "the cancelled request was still run"
    batcher.close()


def test_batch_wait_gathers_requests_that_arrive_close_together(runtime, images):
    recorder = Recorder(runtime)
    batcher = AdaptiveBatcher(recorder, max_batch_size=8, max_wait_s=0.2)

    async def scenario():
        first = asyncio.create_task(batcher.submit(images[:1]))
        await asyncio.sleep(0)  # queued; the batch waits up to 0.2 s for more
        second = asyncio.create_task(batcher.submit(images[1:3]))
        return await asyncio.gather(first, second)

    asyncio.run(scenario())
    batcher.close()
    assert recorder.shapes == [3], "two requests, 3 images, in one batch"


def test_encoded_images_are_decoded_by_their_batch_and_a_bad_one_fails_alone(runtime, images):
    """Small uploads reach the batcher still encoded (``WorkerContext.prepare``): the batch's
    thread decodes them with the version's preprocessing, the answers are those of the
    decoded images, each request gets its image back for its shadow copy and its decode
    time is recorded, and an image that cannot be decoded fails its own request only, with
    the decoding's error."""
    from serving.core.errors import InvalidImageError
    from serving.web.batcher import Encoded

    gate = threading.Event()
    recorder = Recorder(runtime, gate)
    batcher = AdaptiveBatcher(recorder, max_batch_size=8)
    decode_times: list[float] = []
    blobs = [data for data, _, _ in good_images().values()][:3]
    encoded = [Encoded(blob, runtime.preprocess, decode_times.append) for blob in blobs]
    broken = Encoded(b"\xff\xd8\xff not a jpeg", runtime.preprocess, decode_times.append)

    async def scenario():
        first = asyncio.create_task(batcher.submit(images[:1]))
        await asyncio.to_thread(recorder.started.wait, 10)
        tasks = [asyncio.create_task(batcher.submit(item)) for item in (*encoded, broken)]
        tasks.append(asyncio.create_task(batcher.submit(images[1:3])))
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(first, *tasks, return_exceptions=True)

    first, *answers, failed, last = asyncio.run(scenario())
    batcher.close()
    assert recorder.shapes == [1, 5]  # the three decoded images and the 2-image request
    assert isinstance(failed, InvalidImageError) and failed.reason == "corrupt"
    for item, blob, answer in zip(encoded, blobs, answers, strict=True):
        decoded = runtime.preprocess(blob)[np.newaxis]
        np.testing.assert_array_equal(item.images, decoded)
        np.testing.assert_allclose(answer, runtime.predict(decoded), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(last, runtime.predict(images[1:3]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first, runtime.predict(images[:1]), rtol=1e-5, atol=1e-6)
    assert len(decode_times) == 3 and broken.images is None


def test_a_servers_sizing_is_its_settings_else_its_providers_defaults():
    from serving.web.sizing import Sizing, sizing_for

    assert sizing_for(ServingSettings(), "cpu") == Sizing(
        workers=os.cpu_count() or 1,
        decode_threads=2,
        batch_decode_bytes=64 * 1024,
        ort_threads=1,  # the cores shared out among one worker per core
    )
    assert sizing_for(ServingSettings(), "cuda").batch_decode_bytes == 0
    chosen = ServingSettings(workers=3, decode_threads=5, batch_decode_bytes=0, intra_op_threads=2)
    assert sizing_for(chosen, "cpu") == Sizing(
        workers=3, decode_threads=5, batch_decode_bytes=0, ort_threads=2
    )
