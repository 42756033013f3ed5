"""The cost of a shadow version to live traffic: service throughput with no shadow, with a
shadow taking a copy of every request (fraction 1.0), and serving a single version folder
(no roles watcher at all), side by side.

Same model, same requests (real JPEG uploads through wrk at one concurrency), alternating
rounds of the configurations in one run (every other round in reverse order) so machine
noise hits them all. The shadow is a copy of the live version published as version 2: the
same work per image as the live one, the case that costs most.

    .venv/bin/python benchmarks/bench_shadow.py [--model model_repository/digits]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_service import (
    BIN,
    ROOT,
    Process,
    digit_jpegs,
    free_port,
    ratio_rows,
    side_by_side,
    side_by_side_header,
    wrk_script,
)
from benchmarks.common import table
from serving.core.model_dir import METADATA
from serving.core.releases import pin, set_shadow
from serving.core.roles import resolve_model_dir

BASELINE = "model folder, no shadow"


def model_folder(version_dir: Path, scratch: Path, shadow: float | None) -> Path:
    """A model folder with the live version as 1 and a copy of it as 2 (metadata.json is
    not hashed: changing its version keeps every hash), 1 pinned, 2 shadowing it or not."""
    folder = Path(tempfile.mkdtemp(dir=scratch)) / version_dir.parent.name
    shutil.copytree(version_dir, folder / "1")
    shutil.copytree(version_dir, folder / "2")
    metadata = json.loads((folder / "2" / METADATA).read_text())
    (folder / "2" / METADATA).write_text(json.dumps({**metadata, "version": 2}))
    pin(folder, 1)
    if shadow is not None:
        set_shadow(folder, 2, shadow)
    return folder


def shadow_counts(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "imgclf_shadow_images_total":
                outcome = sample.labels["outcome"]
                counts[outcome] = counts.get(outcome, 0) + sample.value
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model_repository" / "digits")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    version_dir = resolve_model_dir(args.model).resolve()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        models = {
            "one version folder (no watcher)": version_dir,
            "shadow, fraction 1.0": model_folder(version_dir, scratch, 1.0),
            # The same configuration twice: how far two identical servers differ here.
            "model folder, no shadow (a second identical server)": model_folder(
                version_dir, scratch, None
            ),
            BASELINE: model_folder(version_dir, scratch, None),
        }
        script = wrk_script(scratch, digit_jpegs())
        servers = {}
        for mode, model in models.items():
            port = free_port()
            env = {
                "IMGCLF_PROVIDER": "cpu",
                "IMGCLF_DRIFT_INTERVAL_S": "5",
                "BENTOML_HOME": tempfile.mkdtemp(dir=scratch),
            }
            servers[mode] = Process(
                [str(BIN / "imgclf"), "serve", "--model", str(model), "--port", str(port)],
                env,
                port,
            )
        try:
            results = side_by_side(servers, script, args.concurrency, args.seconds, args.rounds)
            shadowed = shadow_counts(servers["shadow, fraction 1.0"].url)
        finally:
            for server in servers.values():
                server.stop()
    print(side_by_side_header(version_dir, args))
    rows = ratio_rows(results, BASELINE)
    print(
        table(
            ["serving", "requests/s (median)", "rounds", "vs no shadow", "paired"],
            rows,
        )
    )
    offered = sum(shadowed.values())
    print(
        f"\nshadow copies: {shadowed.get('compared', 0):.0f} compared, "
        f"{shadowed.get('dropped', 0):.0f} dropped (the shadow behind), "
        f"{shadowed.get('failed', 0):.0f} failed, of {offered:.0f} offered"
    )


if __name__ == "__main__":
    main()
