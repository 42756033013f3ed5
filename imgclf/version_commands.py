"""``imgclf versions``, ``shadow``, ``promote``, ``rollback`` and ``pin``: a model's published
versions and which one answers (``serving.core.releases``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from imgclf.app import app, user_errors

ModelFolder = Annotated[
    Path, typer.Argument(help="The model's folder, <repository>/<name>, holding its versions.")
]
VersionNumber = Annotated[int, typer.Argument(help="A published version number.")]


@app.command()
@user_errors
def versions(
    model: ModelFolder,
    server: Annotated[
        Optional[str],
        typer.Option(help="A running server's URL: add what it reports for each version."),
    ] = None,
    check: Annotated[
        bool, typer.Option(help="Load each version as a server would (hashes, graph).")
    ] = True,
) -> None:
    """List a model's versions: role, test accuracy, created, whether it verifies, and with
    --server the images each answered, its shadow agreement and its refusals. Following the
    newest, the live version is the newest that verifies, as servers serve it; why a version
    does not verify is below the table."""
    from serving.core.version_report import server_figures, version_rows

    rows = version_rows(model, verify=check)
    figures = server_figures(server) if server else None
    header = f"{'version':>7}  {'role':<27} {'accuracy':>8}  {'created':<25} status"
    if figures:
        header += "  | server: answered, agreement, refused"
    typer.echo(header)
    notes: list[str] = []
    for row in rows:
        accuracy = f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "-"
        status = row["status"]
        if row["reason"]:
            served = row["served"]
            following = (
                f"; servers following the newest refuse it and serve version {served}"
                if served is not None
                else ""
            )
            status += _note(notes, row["reason"] + following)
        line = (
            f"{row['version']:>7}  {row['role'] or '-':<27} {accuracy:>8}  "
            f"{row['created_at'] or '-':<25} {status}"
        )
        if figures:
            line += "  | " + _server_line(row["version"], figures, notes)
        typer.echo(line)
    if notes:
        typer.echo("")
    for note in notes:
        typer.echo(note)
    if figures and figures["metadata"].get("state_error"):
        typer.echo(f"server: {figures['metadata']['state_error']}")


def _note(notes: list[str], text: str) -> str:
    """Add ``text`` below the table, numbered; the mark that points to it, for a row."""
    notes.append(f"[{len(notes) + 1}] {text}")
    return f" [{len(notes)}]"


def _server_line(version: int, figures: dict, notes: list[str]) -> str:
    found = figures["by_version"].get(version, {})
    compared = found.get("shadow_compared", 0)
    agreement = f"{found.get('shadow_agreed', 0) / compared:.4f} of {compared}" if compared else "-"
    refusal = figures["metadata"].get("refused", {}).get(str(version))
    refused = f"refused {found['refusals']}x" if found.get("refusals") else "-"
    if refusal:
        refused = ("refused" if refused == "-" else refused) + _note(
            notes, f"server refused version {version}: {refusal}"
        )
    return f"{found.get('answered', 0)}, {agreement}, {refused}"


@app.command()
@user_errors
def shadow(
    model: ModelFolder,
    version: Annotated[
        Optional[int], typer.Argument(help="The version to shadow the live one (omit with --off).")
    ] = None,
    fraction: Annotated[
        float, typer.Option(help="Share of live requests copied to the shadow, in (0, 1].")
    ] = 1.0,
    off: Annotated[bool, typer.Option("--off", help="Stop shadowing.")] = False,
) -> None:
    """Send a copy of a fraction of live requests to another version; its answers are
    compared with the live ones (metrics, /metadata) and never returned."""
    from serving.core.errors import ConfigError
    from serving.core.releases import set_shadow

    if off == (version is not None):
        raise ConfigError("give a VERSION to shadow, or --off to stop shadowing")
    state = set_shadow(model, None if off else version, fraction)
    if state.shadow is None:
        typer.echo(f"no shadow for {model}")
    else:
        typer.echo(
            f"version {state.shadow.version} shadows {fraction:g} of the live requests of "
            f"{model}; servers follow within their poll interval"
        )


@app.command()
@user_errors
def promote(model: ModelFolder, version: VersionNumber) -> None:
    """Make a version live (checked first); the live one it replaces stays on disk, for
    imgclf rollback."""
    from serving.core.releases import promote as promote_version

    state = promote_version(model, version)
    earlier = f" (was {state.history[-1]})" if state.history else ""
    typer.echo(f"version {version} is live for {model}{earlier}; pinned")


@app.command()
@user_errors
def rollback(model: ModelFolder) -> None:
    """Back to the version that was live before the last promote, pin or rollback."""
    from serving.core.releases import rollback as roll_back

    before, after = roll_back(model)
    typer.echo(f"version {after} is live again for {model} (was {before}); pinned")


@app.command()
@user_errors
def pin(
    model: ModelFolder,
    version: Annotated[Optional[int], typer.Argument(help="The version to hold.")] = None,
    latest: Annotated[
        bool,
        typer.Option("--latest", help="Follow the newest version again (it must verify)."),
    ] = False,
) -> None:
    """Hold a version live (stop following the newest), or --latest to follow it again. The
    version is checked first: one that does not verify is refused."""
    from serving.core.errors import ConfigError
    from serving.core.releases import current_live
    from serving.core.releases import pin as pin_version

    if latest == (version is not None):
        raise ConfigError("give a VERSION to pin, or --latest to follow the newest")
    pin_version(model, version)
    if latest:
        typer.echo(f"{model} follows its newest version (now {current_live(model)})")
    else:
        typer.echo(f"version {version} is pinned live for {model}")
