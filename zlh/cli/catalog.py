"""`zlh catalog validate|promote`: check runtime catalogs and move versions between channels."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

catalog_app = typer.Typer(help="Runtime catalogs: validate, promote.", no_args_is_help=True)


@catalog_app.command("validate")
def validate(
    paths: Annotated[list[Path] | None, typer.Argument(
        help="Catalog files or folders (default catalogs/).")] = None,
    verify: bool = typer.Option(False, "--verify", help="Download every artifact, check hashes."),
    artifacts_url: str = typer.Option(None, "--artifacts-url", help="Artifact server base URL."),
    workers: int = typer.Option(4, "--workers", min=1, max=64, help="Downloads at once."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds without data."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check schema and semantics; with --verify, download and check every artifact."""
    from zlh import catalog, render
    from zlh.cli import want_json

    loaded = catalog.load_catalogs(paths or [])
    report: dict[str, Any] = {"files": [str(item.path) for item in loaded],
                              "entries": catalog.summary(loaded)}
    results: list[catalog.Checked] = []
    if verify:
        base = catalog.artifacts_url(artifacts_url)
        items = list(catalog.artifacts(loaded))
        progress = sys.stderr.isatty() and not want_json(json_output)
        results = catalog.verify_artifacts(items, base, workers, timeout, progress)
        report["verified"] = results
    render.emit(report, want_json(json_output), _human)
    catalog.raise_on_mismatch(results)


@catalog_app.command("promote")
def promote(
    name: str = typer.Argument(..., help="Runtime or server package name."),
    version: str = typer.Argument(..., help="Version to move."),
    channel: str = typer.Option("stable", "--channel", help="stable or beta."),
    paths: Annotated[list[Path] | None, typer.Option(
        "--catalog", help="Catalog files or folders.")] = None,
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Put VERSION of NAME on a channel (rewrites its catalog file in place)."""
    from zlh import catalog, render
    from zlh.cli import want_json

    result = catalog.promote(name, version, channel, paths or [])
    render.emit(result, want_json(json_output), _promoted)


def _human(report: dict[str, Any]) -> Any:
    from rich.console import Group

    from zlh import render

    rows = [(e["name"], e["version"], e["channel"] + (" (default)" if e["default"] else ""),
             "yes" if e["deprecated"] else "", _arches(e), e["file"])
            for e in report["entries"]]
    parts = [render.table(("NAME", "VERSION", "CHANNEL", "DEPRECATED", "ARCH", "FILE"), rows)]
    if "verified" in report:
        checked = [(r.label, "ok" if r.ok else "FAILED", render.size(r.size),
                    f"{r.seconds:.2f} s", r.problem) for r in report["verified"]]
        parts.append(render.table(("ARTIFACT", "RESULT", "SIZE", "TIME", "PROBLEM"), checked))
    return Group(*parts)


def _arches(entry: dict[str, Any]) -> str:
    if entry["unavailable"]:
        return "none: not installable here"  # the reason is in --json and in the refusal
    return ",".join(entry["arches"])


def _promoted(result: Any) -> str:
    if result.previous == result.channel:
        return f"{result.name} {result.version} is already {result.channel} ({result.file})"
    return (f"{result.name} {result.version}: {result.previous} -> {result.channel} "
            f"({result.file})")


def register(app: typer.Typer) -> None:
    app.add_typer(catalog_app, name="catalog")
