"""World backups from the operator's side: run, list, restore, prune, pull, schedule.

The agent does the work (agentd/backups.py); this module asks it, keeps the run log
(`$ZLH_HOME/logs/backups.log`, one JSON line per run, for cron) and manages the cron
entries: `/etc/cron.d/zlh-backups` when root (`$ZLH_CRON_DIR` overrides the folder),
else the user's crontab. Each entry runs `zlh backup run NAME --quiet` under `flock -n`
(a run still going makes the next one skip), with ZLH_HOME set, absolute paths only and
its output appended to `$ZLH_HOME/logs/backup-cron.log`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from zlh import records
from zlh.errors import ConfigError, IntegrityError, NotFoundError, UsageError, ZlhError
from zlh.paths import zlh_home

if TYPE_CHECKING:
    from agentd.backup_models import (
        BackupList,
        BackupOutcome,
        KeepPolicy,
        PruneResult,
        RestoreResult,
    )

log = logging.getLogger(__name__)

CRON_FILE = "zlh-backups"
# Each field's name, range and names (cron(5)); 7 is Sunday too.
CRON_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
                      "nov", "dec")),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
CRON_ITEM = re.compile(r"^(?:\*|(?P<low>[0-9a-z]+)(?P<range>-(?P<high>[0-9a-z]+))?)"
                       r"(?:/(?P<step>[0-9]+))?$", re.IGNORECASE)
CRON_MACROS = ("@hourly", "@daily", "@weekly", "@monthly", "@yearly", "@annually")
MARK = "# zlh backup "
CHUNK = 1 << 20


def _client(name: str) -> Any:
    from zlh.servers import agent_client

    return agent_client(records.get(name))


# -- run -------------------------------------------------------------------------------


@dataclass
class RunResult:
    server: str
    ok: bool
    id: str | None = None
    result: str | None = None
    size: int | None = None
    seconds: float = 0.0
    quiesced_seconds: float | None = None
    changed_files: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    error: str | None = None
    skipped: list[str] = field(default_factory=list)  # not archived: fifos, links out, ...
    exit_code: int = 0  # of the error: 5 when another operation was under way, ...


def run_backup(name: str, keep: KeepPolicy | None = None) -> RunResult:
    """Back up one server (and prune after a good backup when `keep` is given)."""
    records.get(name)  # an unknown name is a usage problem, not a failed run
    began = time.monotonic()
    try:
        with _client(name) as client:
            outcome: BackupOutcome = client.backup(keep)
    except ZlhError as exc:
        result = RunResult(name, False, seconds=_since(began), error=exc.message,
                           exit_code=int(exc.exit_code))
    else:
        record = outcome.backup
        result = RunResult(
            name, True, record.id, record.result, record.size, _since(began),
            record.quiesced_seconds if record.quiesced else None, record.changed_files,
            [e.id for e in outcome.prune.remove] if outcome.prune else [],
            skipped=record.skipped,
        )
    _log_run(result)
    return result


def run_all(keep: KeepPolicy | None = None) -> list[RunResult]:
    """Back up every server in the inventory, one after the other; failures do not stop it."""
    return [run_backup(server.name, keep) for server in records.list_all()]


def log_path() -> Path:
    folder = zlh_home() / "logs"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / "backups.log"


def _log_run(result: RunResult) -> None:
    entry = {"ts": round(time.time(), 3), **result.__dict__}
    with open(log_path(), "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    records.note(result.server, "backup", result.id or f"failed: {result.error}")


def _since(began: float) -> float:
    return round(time.monotonic() - began, 3)


# -- list, restore, prune --------------------------------------------------------------


def list_backups(name: str) -> BackupList:
    with _client(name) as client:
        return client.backups()  # type: ignore[no-any-return]  # a BackupList


def restore(name: str, backup_id: str, timeout: float | None = None) -> RestoreResult:
    with _client(name) as client:
        result: RestoreResult = client.restore(backup_id, timeout)
    records.note(name, "restore", backup_id)
    return result


def prune(name: str, keep: KeepPolicy, dry_run: bool) -> PruneResult:
    from agentd.backup_models import PruneRequest

    if keep.empty():
        raise UsageError("give at least one --keep-* option")
    with _client(name) as client:
        return client.prune(  # type: ignore[no-any-return]  # a PruneResult
            PruneRequest(**keep.model_dump(), dry_run=dry_run))


# -- pull ------------------------------------------------------------------------------


@dataclass
class Pulled:
    id: str
    path: Path
    size: int
    sha256: str


def pull(name: str, backup_id: str, dest: Path) -> Pulled:
    """Download an archive to `dest` (a file or a folder); hash-checked, renamed when whole."""
    from zlh.download import Landing, target_of

    target = target_of(dest, f"{backup_id}.tar.zst")
    with _client(name) as client:
        listed = {r.id: r for r in client.backups().backups}
        if backup_id not in listed:
            raise NotFoundError(f"server {name} has no backup {backup_id!r}")
        expected = listed[backup_id].sha256 or ""
        landing = Landing(target)
        with landing as out:
            size, digest = _download(client, backup_id, out, expected)
            landing.keep()
    return Pulled(backup_id, target, size, digest)


def _download(client: Any, backup_id: str, out: BinaryIO, expected: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with client.stream("GET", f"/v1/backups/{backup_id}") as answer:
        header = answer.headers.get("x-sha256", "")
        for chunk in answer.iter_bytes(CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    actual = digest.hexdigest()
    if actual != expected or actual != header:
        raise IntegrityError(f"backup {backup_id}: downloaded sha256 {actual} does not match "
                             f"the agent's {expected}; nothing was kept")
    return size, actual


# -- schedule --------------------------------------------------------------------------


@dataclass
class Schedule:
    server: str
    cron: str
    line: str
    where: str


def _cron_file() -> Path | None:
    """The cron.d file when root (or ZLH_CRON_DIR is set); None: the user's crontab."""
    override = os.environ.get("ZLH_CRON_DIR", "")
    if override:
        return Path(override) / CRON_FILE
    return Path("/etc/cron.d") / CRON_FILE if os.geteuid() == 0 else None


def check_cron(expr: str) -> str:
    text = " ".join(expr.split())
    if text in CRON_MACROS:
        return text
    parts = text.split(" ")
    if len(parts) != 5:
        raise UsageError(f"--cron {expr!r}: expected five fields such as '17 3 * * *' or "
                         f"one of {', '.join(CRON_MACROS)}")
    for part, (field_name, low, high, names) in zip(parts, CRON_FIELDS):
        problem = _cron_field_problem(part, low, high, names)
        if problem:
            raise UsageError(f"--cron {expr!r}: {field_name} field {part!r}: {problem}")
    return text


def _cron_field_problem(part: str, low: int, high: int, names: tuple[str, ...]) -> str | None:
    """What cron would reject in one field (a list of *, N, N-M, each with /STEP), or None."""
    for item in part.split(","):
        found = CRON_ITEM.match(item)
        if found is None:
            return f"{item!r} is not *, N, N-M, */STEP or N-M/STEP"
        if found["step"] is not None and found["low"] is not None and not found["range"]:
            return f"{item!r}: cron takes a /STEP after * or a range only"
        values = []
        for text in filter(None, (found["low"], found["high"])):
            value = _cron_value(text, low, names)
            if value is None or not low <= value <= high:
                named = f" or {names[0]}..{names[-1]}" if names else ""
                return f"{text!r} is not a value from {low} to {high}{named}"
            values.append(value)
        if len(values) == 2 and values[0] > values[1]:
            return f"the range {item!r} runs backwards"
        step = found["step"]
        if step is not None and not 1 <= int(step) <= high:
            return f"the step {step!r} is not a number from 1 to {high}"
    return None


def _cron_value(text: str, low: int, names: tuple[str, ...]) -> int | None:
    if text.lower() in names:
        return low + names.index(text.lower())
    return int(text) if text.isdigit() else None


def cron_command(name: str) -> str:
    """The command a cron entry runs: absolute paths, ZLH_HOME set, no TTY needed."""
    home = zlh_home()
    logs = home / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    (home / "locks").mkdir(mode=0o700, exist_ok=True)
    flock = shutil.which("flock", path="/usr/bin:/bin") or "/usr/bin/flock"
    zlh = f"{shlex.quote(sys.executable)} -m zlh.cli backup run {shlex.quote(name)} --quiet"
    return (f"cd / && ZLH_HOME={shlex.quote(str(home))} {flock} -n "
            f"{shlex.quote(str(home / 'locks' / f'backup-{name}.lock'))} {zlh} "
            f">> {shlex.quote(str(logs / 'backup-cron.log'))} 2>&1")


def schedule_add(name: str, expr: str) -> Schedule:
    records.get(name)
    cron = check_cron(expr)
    path = _cron_file()
    user = "root " if path is not None else ""
    line = f"{cron} {user}{cron_command(name)}"
    if "%" in line:
        raise ConfigError(f"the cron line would hold a '%' (cron turns it into a newline): {line}")
    entries = {k: v for k, v in _read_entries(path).items() if k != name}
    entries[name] = line
    _write_entries(path, entries)
    return Schedule(name, cron, line, str(path or "crontab"))


def schedule_remove(name: str) -> list[Schedule]:
    path = _cron_file()
    entries = _read_entries(path)
    if name not in entries:
        raise NotFoundError(f"no backup schedule for {name}")
    line = entries.pop(name)
    _write_entries(path, entries)
    return [Schedule(name, _cron_of(line), line, str(path or "crontab"))]


def schedule_list() -> list[Schedule]:
    path = _cron_file()
    return [Schedule(name, _cron_of(line), line, str(path or "crontab"))
            for name, line in _read_entries(path).items()]


def _cron_of(line: str) -> str:
    parts = line.split(" ")
    return parts[0] if parts[0].startswith("@") else " ".join(parts[:5])


def _read_entries(path: Path | None) -> dict[str, str]:
    text = _read_crontab() if path is None else (path.read_text() if path.exists() else "")
    entries, pending = {}, None
    for line in text.splitlines():
        if line.startswith(MARK):
            pending = line[len(MARK):].strip()
        elif pending is not None:
            entries[pending], pending = line, None
    return entries


def _write_entries(path: Path | None, entries: dict[str, str]) -> None:
    body = "".join(f"{MARK}{name}\n{line}\n" for name, line in sorted(entries.items()))
    if path is None:
        _write_crontab(body)
        return
    header = ("# Managed by `zlh backup schedule`; edits here are overwritten.\n"
              "SHELL=/bin/sh\nPATH=/usr/bin:/bin\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(header + body)
    os.chmod(tmp, 0o644)  # cron ignores cron.d files others can write
    os.replace(tmp, path)


def _crontab() -> str:
    found = shutil.which("crontab")
    if found is None:
        raise NotFoundError("crontab is not installed: apt-get install -y cron")
    return found


def _read_crontab() -> str:
    done = subprocess.run([_crontab(), "-l"], capture_output=True, text=True, check=False)
    return done.stdout if done.returncode == 0 else ""


def _write_crontab(body: str) -> None:
    current = _read_crontab()
    kept, skip = [], False
    for line in current.splitlines():
        if line.startswith(MARK):
            skip = True
            continue
        if not skip:
            kept.append(line)
        skip = False
    text = "\n".join(kept + [body.rstrip("\n")]).strip("\n") + "\n"
    subprocess.run([_crontab(), "-"], input=text, text=True, check=True)
