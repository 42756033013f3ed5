"""What ``imgclf versions`` reports: each published version's role as the servers serve it,
whether it verifies, and, with ``--server``, what a running server says of each version.
Reading only; the commands that change the roles are ``serving.core.releases``."""

from __future__ import annotations

import json
from pathlib import Path

from serving.core.errors import ConfigError, ModelError
from serving.core.model_dir import load_metadata, version_numbers
from serving.core.releases import check_version
from serving.core.roles import Desired, RoleState, model_root_of, read_state, resolve_roles


def version_rows(model_root: Path, *, verify: bool = True) -> list[dict]:
    """One row per published version, for ``imgclf versions``: role, test accuracy, created
    time, and whether it verifies (``status`` "ok", "does not verify" with the ``reason``, or
    "not checked"). Following the newest, the live version is the newest that verifies, as
    the servers serve it; each newer one that does not has role "refused" and ``served``,
    the version servers serve instead."""
    root = model_root_of(model_root)
    state = read_state(root)
    rows = []
    for version in version_numbers(root):
        row: dict = {"version": version, "reason": None}
        try:
            metadata = (
                check_version(root, version) if verify else load_metadata(root / str(version))
            )
            row.update(
                accuracy=(metadata.get("metrics") or {}).get("accuracy"),
                created_at=metadata.get("created_at"),
                status="ok" if verify else "not checked",
            )
        except ModelError as error:
            row.update(
                accuracy=None, created_at=None, status="does not verify", reason=error.message
            )
        rows.append(row)
    failing = {row["version"] for row in rows if row["reason"]}
    desired = resolve_roles(root, state, refused=failing)
    for row in rows:
        row["role"] = _role(row["version"], desired, state, failing)
        refused = desired.following == "newest" and row["version"] > desired.live
        row["served"] = desired.live if refused else None
    return rows


def _role(version: int, desired: Desired, state: RoleState, failing: set[int]) -> str:
    if version == desired.live:
        if desired.following == "pinned":
            return "live (pinned)"
        newer_refused = any(v > version for v in failing)
        return "live (newest that verifies)" if newer_refused else "live (newest)"
    if desired.following == "newest" and version > desired.live:
        return "refused"
    if desired.shadow and version == desired.shadow.version:
        return f"shadow ({desired.shadow.fraction:g})"
    if state.history and version == state.history[-1]:
        return "previous"
    return ""


def server_figures(url: str, timeout_s: float = 5.0) -> dict:
    """What a running server says about its versions: ``/metadata``'s ``versions`` (this
    worker's view: live, shadow evidence, refusals) and, from ``/metrics`` (every worker),
    the images each version answered, shadow comparisons and refusals by version."""
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    base = url.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/metadata", timeout=timeout_s) as answer:
            metadata = json.loads(answer.read())
        with urllib.request.urlopen(base + "/metrics", timeout=timeout_s) as answer:
            text = answer.read().decode()
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read {base}/metadata and /metrics: {error}") from None
    per_version: dict[int, dict] = {}
    wanted = {
        "imgclf_version_predictions": ("answered", None),
        "imgclf_version_refusals": ("refusals", None),
        "imgclf_shadow_images": ("shadow_", "outcome"),
        "imgclf_shadow_agreements": ("shadow_agreed", None),
    }
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        key, by = wanted[family.name]
        for sample in family.samples:
            if not sample.name.endswith("_total") or "version" not in sample.labels:
                continue
            figures = per_version.setdefault(int(sample.labels["version"]), {})
            name = key + sample.labels[by] if by else key
            figures[name] = figures.get(name, 0) + int(sample.value)
    return {"metadata": metadata.get("versions") or {}, "by_version": per_version}
