"""Batch scoring throughput and memory: ``imgclf score`` vs the in-process ceiling.

Generates 10,000 JPEG images from the digits set, then, each in its own process so peak
memory (maximum RSS, from /usr/bin/time) is measured separately:
- the ceiling: decode + ONNX Runtime in one loop (batches of 64, no output);
- ``imgclf score`` on all 10,000 images (CSV output, drift report included);
- ``imgclf score`` on 1,000 of them, for peak memory at 1,000 vs 10,000;
- ``imgclf score --engine ray`` (a local one-node cluster started by the job) on both, so its
  fixed start-up (cluster, actors) is told apart from its steady rate:
  steady = 9,000 images / (wall at 10,000 - wall at 1,000); start-up = the rest;
- ``imgclf score`` over a folder of phone photos (12-megapixel class JPEGs from real photos),
  twice on the same graph: with the preprocessing contract of models exported before the
  JPEG draft step (full-size decoding) and with today's.

    .venv/bin/python benchmarks/bench_scoring.py [--model model_repository/digits]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402

from benchmarks.common import contract_copy, machine, phone_photos, table  # noqa: E402
from serving.core.roles import resolve_model_dir  # noqa: E402
from training.datasets import discover, write_digits  # noqa: E402

BIN = Path(sys.executable).parent
CEILING = """
import sys, time, numpy as np
from pathlib import Path
from serving.core.runtime import ClassifierRuntime
runtime = ClassifierRuntime(sys.argv[1], provider="cpu", max_batch_size=64)
paths = Path(sys.argv[2]).read_text().split()
start = time.perf_counter()
for i in range(0, len(paths), 64):
    batch = np.stack([runtime.preprocess(Path(p).read_bytes()) for p in paths[i:i + 64]])
    runtime.predict(batch)
print(f"IMAGES_PER_SECOND {len(paths) / (time.perf_counter() - start):.1f}")
"""


def generate(folder: Path, count: int) -> list[str]:
    """``count`` JPEGs from the digits: upscaled, with a little brightness jitter."""
    samples = discover(write_digits()).samples
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        sample = samples[index % len(samples)]
        target = folder / sample.label / f"img_{index:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(sample.path) as image:
            resized = image.convert("RGB").resize((64, 64), Image.BILINEAR)
            ImageEnhance.Brightness(resized).enhance(float(rng.uniform(0.85, 1.15))).save(
                target, "JPEG", quality=90
            )
        paths.append(str(target))
    return paths


def timed(args: list[str]) -> tuple[str, float, float]:
    """Run a command; return its stdout, wall seconds and peak RSS in MiB."""
    start = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "PEAK_KB %M", *args], capture_output=True, text=True, cwd=ROOT
    )
    seconds = time.perf_counter() - start
    if result.returncode not in (0, 4):
        raise RuntimeError(result.stderr[-2000:])
    peak = int(re.search(r"PEAK_KB (\d+)", result.stderr).group(1)) / 1024
    return result.stdout, seconds, peak


def photo_comparison(model_dir: Path, scratch: Path, count: int) -> list[list]:
    """``imgclf score`` over ``count`` phone photos, before and after the JPEG draft step."""
    folder = scratch / "photos"
    folder.mkdir()
    for index, jpeg in enumerate(phone_photos(count)):
        (folder / f"photo_{index:04d}.jpg").write_bytes(jpeg)
    rows, before = [], None
    for margin in (None, 2.0):
        copy = contract_copy(model_dir, scratch / f"contract-{margin}", margin)
        out, wall, peak = timed(
            [
                *(str(BIN / "imgclf"), "score", str(folder), "--model", str(copy)),
                *("--output", str(scratch / f"photos-{margin}.csv"), "--no-progress"),
                *("--provider", "cpu"),
            ]
        )
        rate = float(re.search(r"([\d.]+) images/s", out).group(1))
        before = before or rate
        label = "full-size decoding (before)" if margin is None else "JPEG draft, margin 2"
        rows.append([label, count, rate, f"{rate / before:.1f}x", wall, peak])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model_repository" / "digits")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--photos", type=int, default=60, help="phone photos; 0: skip them")
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model).resolve()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        paths = generate(scratch / "images", args.images)
        all_list = scratch / "all.txt"
        all_list.write_text("\n".join(paths) + "\n")
        small_list = scratch / "small.txt"
        small_list.write_text("\n".join(paths[: args.images // 10]) + "\n")

        out, ceiling_wall, ceiling_peak = timed(
            [str(BIN / "python"), "-c", CEILING, str(model_dir), str(all_list)]
        )
        ceiling = float(re.search(r"IMAGES_PER_SECOND ([\d.]+)", out).group(1))
        rows = [
            [
                "ceiling: decode + ONNX Runtime, one loop",
                args.images,
                ceiling,
                "1.00",
                ceiling_wall,
                ceiling_peak,
            ]
        ]
        walls = {}
        for engine in ("local", "ray"):
            for listing, count in ((all_list, args.images), (small_list, args.images // 10)):
                output = scratch / f"{engine}-{count}.parquet"
                out, wall, peak = timed(
                    [
                        *(str(BIN / "imgclf"), "score", str(listing), "--model", str(model_dir)),
                        *("--output", str(output), "--no-progress", "--provider", "cpu"),
                        *("--engine", engine),
                    ]
                )
                rate = float(re.search(r"([\d.]+) images/s", out).group(1))
                walls[engine, count] = wall
                label = "imgclf score" + (" --engine ray" if engine == "ray" else "")
                rows.append([label, count, rate, f"{rate / ceiling:.2f}", wall, peak])
        photo_rows = photo_comparison(model_dir, scratch, args.photos) if args.photos else []
    print(f"machine: {machine()}")
    print(f"model: {model_dir}; {args.images} JPEGs (64x64) generated from the digits\n")
    headers = ["job", "images", "images/s (scoring loop)", "vs ceiling", "wall s", "peak RSS MiB"]
    print(table(headers, rows))
    print(
        f"\npeak memory at {args.images} vs {args.images // 10} images: "
        f"{rows[1][5] / rows[2][5]:.2f}x (local engine)"
    )
    extra = args.images - args.images // 10
    for engine in ("local", "ray"):
        steady = extra / (walls[engine, args.images] - walls[engine, args.images // 10])
        startup = walls[engine, args.images // 10] - (args.images // 10) / steady
        print(
            f"{engine} engine: steady {steady:,.0f} images/s ({steady / ceiling:.2f}x the "
            f"ceiling), fixed start-up {startup:.1f} s (process, model, "
            f"{'Ray cluster and actors' if engine == 'ray' else 'no cluster'})"
        )
    if photo_rows:
        print(f"\nimgclf score over {args.photos} phone photos (12-megapixel class JPEGs):\n")
        headers = ["decoding", "images", "images/s", "vs before", "wall s", "peak RSS MiB"]
        print(table(headers, photo_rows))


if __name__ == "__main__":
    main()
