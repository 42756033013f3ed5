"""One worker's versions, in-process on the small test model: a request keeps the version it
leased across a switch, the old version is closed and its memory freed once that request is
done, a version that fails its checks is refused while the live one keeps serving, and the
shadow drops copies it cannot keep up with (counting them) instead of delaying anyone."""

from __future__ import annotations

import asyncio
import gc
import shutil
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from monitoring.shadow import ShadowObserver
from serving.core.model_dir import METADATA
from serving.core.roles import pin, promote, set_shadow
from serving.core.runtime import ClassifierRuntime
from serving.web.batcher import AdaptiveBatcher
from serving.web.versions import ModelSet, ServedVersion
from tests.serving.variants import publish_variant, tamper


@pytest.fixture
def folder(published_model, tmp_path) -> Path:
    root = tmp_path / "repository" / "tiny"
    shutil.copytree(published_model, root / "1")
    return root


def model_set(root: Path, max_pending_shadow_images: int = 256) -> ModelSet:
    def load(path: Path) -> ClassifierRuntime:
        return ClassifierRuntime(path, provider="cpu", max_batch_size=8)

    def serve(runtime: ClassifierRuntime) -> ServedVersion:
        return ServedVersion(runtime, AdaptiveBatcher(runtime.predict, max_batch_size=8))

    return ModelSet(
        root,
        load=load,
        serve=serve,
        shadow_observer=lambda runtime: ShadowObserver(
            runtime.version, None, window=100, min_samples=10, mode="calibrated"
        ),
        poll_s=0,  # no watcher thread: the test calls refresh()
        max_pending_shadow_images=max_pending_shadow_images,
        drift_interval_s=60,
        retire_after_s=30,
    )


def images(served: ServedVersion, count: int = 2) -> np.ndarray:
    return np.full((count, *served.card.spec.input_shape), 128, dtype=np.float32)


def test_a_request_keeps_its_version_across_a_switch_and_the_old_one_is_freed(folder):
    versions = model_set(folder)
    assert versions.live.version == 1 and versions.following == "newest"
    publish_variant(folder / "1", 2, noise=0.3)
    lease = versions.lease()  # a request that started on version 1
    old = lease.served
    old_runtime = weakref.ref(old.runtime)
    versions.refresh()
    assert versions.live.version == 2
    with lease as served:  # ... answers from version 1, on version 1's batcher
        answer = asyncio.run(served.classify(images(served)))
        assert served.version == 1 and answer.shape == (2, 5)
        assert old.in_flight == 1
        time.sleep(0.3)
        assert not old.batcher._executor._shutdown  # not closed under a request
    with versions.lease() as served:
        assert served.version == 2
    deadline = time.monotonic() + 5
    while not old.batcher._executor._shutdown:
        assert time.monotonic() < deadline, "the old version was never closed"
        time.sleep(0.05)
    del old, lease, served
    deadline = time.monotonic() + 5
    while old_runtime() is not None:
        gc.collect()
        assert time.monotonic() < deadline, gc.get_referrers(old_runtime())
        time.sleep(0.05)
    versions.close()


def test_a_version_that_fails_a_check_is_refused_and_the_live_one_keeps_serving(folder):
    versions = model_set(folder)
    tamper(publish_variant(folder / "1", 2))
    versions.refresh()
    assert versions.live.version == 1
    assert "does not match its hash" in versions.describe()["refused"]["2"]
    other = publish_variant(folder / "1", 3)  # loads, but answers with other classes
    metadata = (other / METADATA).read_text().replace('"4"', '"four"')
    (other / METADATA).write_text(metadata)
    versions.refresh()
    assert versions.live.version == 1
    assert "classes differ" in versions.describe()["refused"]["3"]
    # Version 3 withdrawn, version 2 published again, fixed: tried afresh and taken.
    shutil.rmtree(folder / "3")
    shutil.rmtree(folder / "2")
    publish_variant(folder / "1", 2)
    versions.refresh()
    assert versions.live.version == 2 and "2" not in versions.describe()["refused"]
    versions.close()


def test_the_shadow_drops_what_it_cannot_keep_up_with_and_a_promotion_reuses_it(folder):
    publish_variant(folder / "1", 2, noise=0.3)
    pin(folder, 1)
    set_shadow(folder, 2, 1.0)
    versions = model_set(folder, max_pending_shadow_images=4)
    versions.refresh(force=True)
    shadow = versions.shadow
    assert (versions.live.version, shadow.version, shadow.same_input) == (1, 2, True)
    shadow._executor.submit(time.sleep, 0.5)  # the shadow's thread is busy for a while
    live = versions.live
    for _ in range(5):
        batch = images(live, 2)
        versions.offer_shadow(live, batch, None, live.runtime.predict(batch))
    deadline = time.monotonic() + 5
    while shadow.observer.totals["compared"] < 4:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert shadow.observer.totals == {
        "compared": 4,  # two requests fit in the queue of four images
        "dropped": 6,  # three did not: dropped at once, not waited for
        "failed": 0,
        "skipped": 0,
        "agreed": shadow.observer.totals["agreed"],
    }
    runtime = shadow.served.runtime
    promote(folder, 2)
    versions.refresh()
    assert versions.live.version == 2 and versions.shadow is None
    assert versions.live.runtime is runtime  # loaded and warmed once, as the shadow
    versions.close()
