"""`zlh backup`: run, list, restore, prune, pull and schedule world backups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

JSON_HELP = "Print the result as JSON."

backup_app = typer.Typer(help="World backups: run, list, restore, prune, pull, schedule.",
                         no_args_is_help=True)

KEEP_HELP = {
    "last": "Keep the N newest backups.",
    "hourly": "Keep the newest backup of each of the last N hours that have one.",
    "daily": "Keep the newest backup of each of the last N days that have one.",
    "weekly": "Keep the newest backup of each of the last N weeks that have one.",
    "monthly": "Keep the newest backup of each of the last N months that have one.",
}


def _keep(last: int | None, hourly: int | None, daily: int | None, weekly: int | None,
          monthly: int | None) -> Any:
    from agentd.backup_models import KeepPolicy

    return KeepPolicy(keep_last=last, keep_hourly=hourly, keep_daily=daily,
                      keep_weekly=weekly, keep_monthly=monthly)


def _opt(rule: str) -> Any:
    return typer.Option(None, f"--keep-{rule}", min=0, metavar="N", help=KEEP_HELP[rule])


@backup_app.command("run")
def run(
    name: str | None = typer.Argument(None, help="Server name."),
    every: bool = typer.Option(False, "--all", help="Back up every server."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing on success."),
    keep_last: int | None = _opt("last"), keep_hourly: int | None = _opt("hourly"),
    keep_daily: int | None = _opt("daily"), keep_weekly: int | None = _opt("weekly"),
    keep_monthly: int | None = _opt("monthly"),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Back up a server's world (quiesced when it runs); prune after a good one if --keep-*."""
    from zlh import backups, render
    from zlh.cli import want_json
    from zlh.errors import ExitCode, UsageError, ZlhError

    if every == (name is not None):
        raise UsageError("give a server NAME or --all")
    keep = _keep(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly)
    keep = None if keep.empty() else keep
    results = backups.run_all(keep) if every else [backups.run_backup(str(name), keep)]
    failed = [r for r in results if not r.ok]
    as_json = want_json(json_output)
    alone_failed = not every and failed and not as_json  # the error line says it all
    if (not quiet or failed) and not alone_failed:
        render.emit(results if every else results[0], as_json, _run_lines)
    if failed:
        error = ZlhError(f"{len(failed)} of {len(results)} backups failed: "
                         + "; ".join(f"{r.server}: {r.error}" for r in failed))
        if not every:  # one server: its error's own code (5 when one was under way, ...)
            error.exit_code = ExitCode(failed[0].exit_code)
        raise error


@backup_app.command("list")
def list_(
    name: str = typer.Argument(..., help="Server name."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """The server's backups, oldest first."""
    from zlh import backups, render
    from zlh.cli import want_json

    render.emit(backups.list_backups(name), want_json(json_output), _list_table)


@backup_app.command("restore")
def restore(
    name: str = typer.Argument(..., help="Server name."),
    backup_id: str = typer.Argument(..., metavar="ID", help="Backup id (see `backup list`)."),
    timeout: float | None = typer.Option(None, "--timeout", min=1, help="Ready within S."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Verify a backup, swap it in, and wait for the server to be ready on it."""
    from zlh import backups, render
    from zlh.cli import want_json

    result = backups.restore(name, backup_id, timeout)
    render.emit(result, want_json(json_output),
                lambda r: f"{name}: restored {r.id} ({r.files} files, {', '.join(r.paths)}); "
                          f"ready after {r.seconds:.1f}s")


@backup_app.command("prune")
def prune(
    name: str = typer.Argument(..., help="Server name."),
    keep_last: int | None = _opt("last"), keep_hourly: int | None = _opt("hourly"),
    keep_daily: int | None = _opt("daily"), keep_weekly: int | None = _opt("weekly"),
    keep_monthly: int | None = _opt("monthly"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would go."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Remove backups the keep rules do not keep (restic's meaning)."""
    from zlh import backups, render
    from zlh.cli import want_json

    keep = _keep(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly)
    render.emit(backups.prune(name, keep, dry_run), want_json(json_output), _prune_table)


@backup_app.command("pull")
def pull(
    name: str = typer.Argument(..., help="Server name."),
    backup_id: str = typer.Argument(..., metavar="ID", help="Backup id."),
    dest: Path = typer.Argument(..., help="A file or a folder to download into."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Download a backup archive; its sha256 is checked before it is renamed into place."""
    from zlh import backups, render
    from zlh.cli import want_json

    pulled = backups.pull(name, backup_id, dest)
    render.emit(pulled, want_json(json_output),
                lambda p: f"{p.path}: {render.size(p.size)}, sha256 {p.sha256}")


@backup_app.command("schedule")
def schedule(
    name: str | None = typer.Argument(None, help="Server name."),
    cron: str | None = typer.Option(None, "--cron", help="When, e.g. '17 3 * * *'."),
    list_all: bool = typer.Option(False, "--list", help="Show the schedules."),
    remove: bool = typer.Option(False, "--remove", help="Remove the server's schedule."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Run `zlh backup run NAME --quiet` from cron (cron.d as root, else your crontab)."""
    from zlh import backups, render
    from zlh.cli import want_json
    from zlh.errors import UsageError

    if sum((cron is not None, list_all, remove)) != 1:
        raise UsageError("give one of --cron EXPR, --list or --remove")
    if list_all:
        result = backups.schedule_list()
    elif name is None:
        raise UsageError("give the server NAME")
    elif remove:
        result = backups.schedule_remove(name)
    else:
        result = [backups.schedule_add(name, str(cron))]
    render.emit(result, want_json(json_output), _schedule_table)


def register(app: typer.Typer) -> None:
    app.add_typer(backup_app, name="backup")


# -- rendering -------------------------------------------------------------------------


def _run_lines(results: Any) -> str:
    from zlh import render

    lines = []
    for r in results if isinstance(results, list) else [results]:
        if not r.ok:
            lines.append(f"{r.server}: backup failed: {r.error}")
            continue
        quiet = f", quiesced {r.quiesced_seconds:.1f}s" if r.quiesced_seconds else ""
        lines.append(f"{r.server}: backup {r.id} {r.result}, {render.size(r.size)} in "
                     f"{r.seconds:.1f}s{quiet}")
        if r.changed_files:
            lines.append(f"  changed while read: {', '.join(r.changed_files[:10])}")
        if r.skipped:
            lines.append(f"  not archived (a restore of this backup drops them): "
                         f"{', '.join(r.skipped[:10])}")
        if r.pruned:
            lines.append(f"  pruned: {', '.join(r.pruned)}")
    return "\n".join(lines)


def _list_table(listing: Any) -> Any:
    from zlh import render

    last = listing.last_restore
    restored = (f"last restore: {last.id} {last.outcome} {render.when(last.ended)}: "
                f"{last.message}") if last is not None else None
    if not listing.backups:
        return "\n".join(filter(None, [
            "no backups yet; take one with `zlh backup run NAME`", restored]))
    rows = [(b.id, render.when(b.time), b.result, render.size(b.size) if b.size else None,
             b.files, f"{b.duration:.1f}s", f"{b.quiesced_seconds:.1f}s" if b.quiesced else "-",
             b.error or _note(b))
            for b in listing.backups]
    columns = ("ID", "TIME", "RESULT", "SIZE", "FILES", "TOOK", "QUIESCED", "NOTE")
    title = "\n".join(filter(None, [f"running: {listing.running}" if listing.running else None,
                                    restored])) or None
    return render.table(columns, rows, title=title)


def _note(record: Any) -> str:
    notes = [f"{len(record.changed_files)} changed" if record.changed_files else "",
             f"{len(record.skipped)} not archived" if record.skipped else ""]
    return ", ".join(filter(None, notes))


def _prune_table(result: Any) -> Any:
    from zlh import render

    rows = [(e.id, render.when(e.time), e.result, "keep", ", ".join(e.reasons))
            for e in result.keep]
    rows += [(e.id, render.when(e.time), e.result, "would remove" if result.dry_run
              else "removed", ", ".join(e.reasons)) for e in result.remove]
    rows.sort(key=lambda row: row[0])
    return render.table(("ID", "TIME", "RESULT", "ACTION", "WHY"), rows)


def _schedule_table(items: Any) -> Any:
    from zlh import render

    if not items:
        return "no backup schedules"
    return render.table(("SERVER", "CRON", "WHERE"), [(s.server, s.cron, s.where) for s in items])
