"""Build the service's container image: ``bentoml build``, then ``bentoml containerize``.

    .venv/bin/python container/build_image.py                      # CPU, python:3.11-slim
    .venv/bin/python container/build_image.py --base-image localhost/debian-py311:bookworm
    .venv/bin/python container/build_image.py --gpu --tag imgclf-gpu:1

It is the two BentoML commands the docs give, plus what they cannot say on the command
line: a base image other than BentoML's default (its bentofile field ``docker.base_image``:
the bentofile is copied with that field set, never edited), the model to package, and the
container engine (podman, where there is no Docker daemon). It prints the Bento's tag, the
image's tag, its size and how long each step took.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def bentofile_variant(bentofile: Path, base_image: str | None, model: str | None) -> Path:
    """A copy of ``bentofile`` with the base image and the packaged model set."""
    config = yaml.safe_load(bentofile.read_text())
    if base_image:
        # With a base image of its own BentoML installs no Python: python_version only warns.
        config["docker"] = {**config.get("docker", {}), "base_image": base_image}
        config["docker"].pop("python_version", None)
    if model:
        config["models"] = [model]
        config["envs"] = [
            {**env, "value": model} if env["name"] == "IMGCLF_BENTO_MODEL" else env
            for env in config.get("envs", [])
        ]
    variant = Path(tempfile.mkdtemp(prefix="imgclf-bentofile-")) / bentofile.name
    variant.write_text(yaml.safe_dump(config, sort_keys=False))
    return variant


def run(command: list[str], what: str) -> str:
    """Run ``command``; its standard output, or exit with one line and its last output."""
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        sys.exit(f"error: {what} failed (exit {result.returncode}): {' '.join(command[:3])} ...")
    return result.stdout


def image_size_bytes(engine: str, tag: str) -> int:
    inspected = json.loads(run([engine, "image", "inspect", tag], "image inspect"))
    return int(inspected[0]["Size"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="bentofile.gpu.yaml (onnxruntime-gpu)")
    parser.add_argument(
        "--base-image",
        help="the image to build FROM instead of BentoML's default python:3.11-slim "
        "(made by container/make-base-image.sh where nothing can be pulled)",
    )
    parser.add_argument(
        "--model", help="the BentoML model store tag to package (default: the bentofile's)"
    )
    parser.add_argument("--tag", help="the image's tag (default: the Bento's tag)")
    parser.add_argument(
        "--backend",
        choices=["docker", "podman", "buildah", "buildctl", "nerdctl"],
        help="bentoml containerize's backend (default: docker if found, else podman)",
    )
    parser.add_argument(
        "--network-host",
        action="store_true",
        help="build with the host's network (podman on machines without a bridge network)",
    )
    args = parser.parse_args(argv)
    backend = args.backend or ("docker" if shutil.which("docker") else "podman")
    if not shutil.which(backend):
        sys.exit(f"error: {backend} is not installed (choose another with --backend)")
    bentofile = REPO / ("bentofile.gpu.yaml" if args.gpu else "bentofile.yaml")
    variant = bentofile_variant(bentofile, args.base_image, args.model)
    try:
        started = time.monotonic()
        output = run(
            [str(BIN / "bentoml"), "build", "-f", str(variant), "--output", "tag", str(REPO)],
            "bentoml build",
        )
        bento = output.strip().splitlines()[-1].removeprefix("__tag__:")
        built = time.monotonic()
        tag = args.tag or bento
        network = ["--opt", "network=host"] if args.network_host else []
        run(
            [
                str(BIN / "bentoml"),
                "containerize",
                "--backend",
                backend,
                bento,
                "-t",
                tag,
                *network,
            ],
            "bentoml containerize",
        )
        finished = time.monotonic()
    finally:
        shutil.rmtree(variant.parent, ignore_errors=True)
    size = image_size_bytes(backend if backend != "buildah" else "podman", tag)
    print(
        f"bento {bento} built in {built - started:.0f} s\n"
        f"image {tag}: {size / 1e9:.2f} GB, containerized in {finished - built:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
