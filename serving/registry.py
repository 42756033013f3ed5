"""Import a published model directory into BentoML's local model store.

``bentoml build`` packages models from that store (``BentoModel("name:version")`` in the
service, ``models:`` in bentofile.yaml). The store copy is byte-for-byte the published
directory, so the service verifies the same hashes wherever it runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from serving.core.errors import ConfigError, ModelError
from serving.core.model_dir import check_model_name, load_metadata, verify_files


def register(model_dir: Path, *, replace: bool = False) -> str:
    """Copy ``model_dir`` into the BentoML model store as ``name:version``; return the tag."""
    try:
        import bentoml
        from bentoml.exceptions import NotFound
    except ImportError:
        raise ConfigError("registering needs bentoml: install the serve extra") from None

    model_dir = Path(model_dir)
    metadata = load_metadata(model_dir)
    verify_files(model_dir, metadata)
    tag = f"{check_model_name(metadata['name'])}:{metadata['version']}"
    try:
        existing = bentoml.models.get(tag)
    except NotFound:
        existing = None
    if existing is not None:
        if existing.info.metadata.get("files") == metadata["files"]:
            return tag  # the same bytes are already there
        if not replace:
            raise ModelError(
                f"BentoML model {tag} already exists with other files; pass --force to replace it"
            )
        bentoml.models.delete(tag)
    with bentoml.models.create(
        tag,
        labels={
            "framework": "onnx",
            "task": "image-classification",
            "classes": str(len(metadata["classes"])),
            "owner": "imgclf",
        },
        metadata={
            "version": metadata["version"],
            "classes": metadata["classes"],
            "input": metadata["input"],
            "files": metadata["files"],
            "opset": metadata.get("opset"),
            "test_accuracy": (metadata.get("metrics") or {}).get("accuracy"),
        },
    ) as bento_model:
        shutil.copytree(model_dir, bento_model.path, dirs_exist_ok=True)
    return tag


def store_versions(name: str) -> set[int]:
    """Numbered versions of ``name`` in BentoML's local model store (empty without BentoML)."""
    try:
        import bentoml
        from bentoml.exceptions import NotFound
    except ImportError:
        return set()
    try:
        models = bentoml.models.list(name)
    except NotFound:
        return set()
    return {
        int(model.tag.version)
        for model in models
        if model.tag.version and model.tag.version.isdigit()
    }


def stored_model_path(tag: str) -> Path:
    """Where the BentoML store keeps ``tag`` (``name:version`` or ``name:latest``)."""
    try:
        import bentoml
        from bentoml.exceptions import NotFound
    except ImportError:
        raise ConfigError(
            "serving from the model store needs bentoml: install the serve extra"
        ) from None
    try:
        return Path(bentoml.models.get(tag).path)
    except NotFound:
        raise ModelError(
            f"BentoML model {tag} is not in the local store; run imgclf export (or imgclf "
            "register DIR), or pass --model DIR"
        ) from None
