"""World backups of one server: quiesce, archive, resume, record; restore (restore.py); prune.

State (under the config's state_dir):

    backups/index.json            the records, oldest first (written atomically)
    backups/ID.tar.zst            an archive (archive.py), renamed into place when complete
    backups/ID.manifest.json      its manifest, also the archive's last member
    backups/.partial-ID.tar.zst   an archive being written; removed on failure and at start
    backups/quiesce.json          present while the game is quiesced; at start it means the
                                  agent died mid-backup, and the resume lines are sent

One operation (backup, restore, or the recovery of a restore an agent stop cut off) runs
at a time; power actions (start, stop, restart) are refused while one runs
(`check_power`), `kill` is not. The work runs in a task of
its own, so a client that goes away does not cut it short and the resume step always
runs; archiving runs in a thread, so the consoles keep being drained meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Callable, Coroutine
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TypeVar

from agentd.archive import ALWAYS_EXCLUDED, Excluder, Written, write_archive
from agentd.backup_models import (
    BackupList,
    BackupOutcome,
    BackupRecord,
    BackupRequest,
    PruneRequest,
    PruneResult,
    RestoreRequest,
    RestoreResult,
)
from agentd.durable import fsync_dir, write_atomic
from agentd.errors import AgentError, Conflict, Invalid, NotFound, OperationFailed, describe
from agentd.logs import fields
from agentd.models import BackupSpec, ServerSpec
from agentd.probes import strip_ansi
from agentd.restore import Journal, Restorer
from agentd.retention import plan
from agentd.supervisor import Supervisor

log = logging.getLogger(__name__)

T = TypeVar("T")
SUFFIX = ".tar.zst"
PARTIAL = ".partial-"
MARKER = "quiesce.json"
INDEX = "index.json"
POWER = ("start", "stop", "restart")
ID_PATTERN = re.compile(r"^\d{8}T\d{6}Z-\d{1,9}$")
RESUME_WAIT = 600.0  # after an agent restart: how long to wait for the game to run again


class Host(Protocol):
    """What the manager needs of the agent."""

    spec: ServerSpec
    supervisors: dict[str, Supervisor]


class QuiesceError(Exception):
    """The game did not quiesce as its playbook says."""


class BackupManager:
    def __init__(self, state_dir: Path, server_root: Path, host: Host,
                 clock: Callable[[], float] = time.time) -> None:
        self.folder = state_dir / "backups"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.root = server_root
        self.host = host
        self.clock = clock
        self.running: str | None = None
        self.restorer = Restorer(self.folder, server_root, clock)
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- guards -------------------------------------------------------------------------

    def check_power(self, verb: str) -> None:
        """Refuse start/stop/restart while a backup or restore runs."""
        if self.running is not None and verb in POWER:
            raise Conflict(f"{self.running} is under way; {verb} is refused until it ends "
                           "(kill still works)")

    def _claim(self, what: str) -> None:
        # No await between the check and the set: the event loop makes this atomic.
        if self.running is not None:
            raise Conflict(f"{self.running} is under way; try again when it has ended")
        self.running = what

    async def _own_task(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` in a task a disconnecting client cannot cancel."""
        return await asyncio.shield(self._task(coro))

    def _task(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _released(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro`, then let the next operation in, however it ended."""
        try:
            return await coro
        finally:
            self.running = None

    # -- index --------------------------------------------------------------------------

    def _load(self) -> tuple[int, list[BackupRecord]]:
        try:
            data = json.loads((self.folder / INDEX).read_text())
        except FileNotFoundError:
            return 1, []
        records = [BackupRecord.model_validate(item) for item in data["backups"]]
        return int(data["next_seq"]), records

    def _save(self, next_seq: int, records: list[BackupRecord]) -> None:
        body = {"next_seq": next_seq, "backups": [r.model_dump() for r in records]}
        write_atomic(self.folder / INDEX, json.dumps(body, indent=1).encode())

    def _append(self, record: BackupRecord) -> None:
        next_seq, records = self._load()
        self._save(max(next_seq, record.seq + 1), [*records, record])

    def listing(self) -> BackupList:
        return BackupList(running=self.running, backups=self._load()[1],
                          last_restore=self.restorer.last())

    def find(self, backup_id: str) -> BackupRecord:
        if ID_PATTERN.match(backup_id):
            for record in self._load()[1]:
                if record.id == backup_id:
                    return record
        raise NotFound(f"no backup {backup_id!r}")

    def archive_of(self, backup_id: str) -> tuple[Path, BackupRecord]:
        record = self.find(backup_id)
        path = self.folder / f"{record.id}{SUFFIX}"
        if record.result == "failed" or not path.is_file():
            raise Conflict(f"backup {backup_id} has no archive (result {record.result})")
        return path, record

    # -- backup -------------------------------------------------------------------------

    async def backup(self, request: BackupRequest) -> BackupOutcome:
        policy = self._policy()
        sup = self._game(policy)
        if sup is not None and sup.state in ("starting", "stopping"):
            raise Conflict(f"process {sup.spec.name!r} is {sup.state}; back up when it has "
                           "settled")
        self._claim("a backup")
        record = await self._own_task(self._run(policy, sup))
        if record.result == "failed":
            raise OperationFailed(f"backup {record.id} failed: {record.error}; "
                                  f"{'the server was resumed; ' if record.quiesced else ''}"
                                  "no prune ran")
        outcome = BackupOutcome(backup=record)
        if request.prune is not None and not request.prune.empty():
            outcome.prune = await self.prune(
                PruneRequest(**request.prune.model_dump(), dry_run=False))
        return outcome

    def _policy(self) -> BackupSpec:
        policy = self.host.spec.backup
        if policy is None:
            raise Conflict("the spec has no backup section (the playbook names no paths)")
        for path in policy.paths:
            pure = PurePosixPath(path)
            if pure.is_absolute() or ".." in pure.parts or str(pure) == ".":
                raise Invalid(f"backup path {path!r} must be inside the server root",
                              path="backup.paths")
        return policy

    def _game(self, policy: BackupSpec | None) -> Supervisor | None:
        """The process to quiesce and restart: the policy's, else the first game."""
        name = policy.process if policy is not None else None
        if name is not None:
            return self.host.supervisors.get(name)
        games = [s for s in self.host.supervisors.values() if s.spec.kind == "game"]
        return games[0] if games else None

    async def _run(self, policy: BackupSpec, sup: Supervisor | None) -> BackupRecord:
        try:
            next_seq, _ = self._load()
            started, began = self.clock(), time.monotonic()
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
            record = BackupRecord(id=f"{stamp}-{next_seq}", seq=next_seq, time=started,
                                  playbook=self.host.spec.playbook, result="failed")
            log.info("backup_started", extra=fields(id=record.id, process=sup and sup.spec.name))
            await self._quiesced_archive(record, policy, sup)
            record.duration = round(time.monotonic() - began, 3)
            self._append(record)
            log.info("backup_done", extra=fields(**record.model_dump(
                exclude={"changed_files", "skipped"})))
            return record
        finally:
            self.running = None

    async def _quiesced_archive(self, record: BackupRecord, policy: BackupSpec,
                                sup: Supervisor | None) -> None:
        quiesced_at: float | None = None
        try:
            if sup is not None and sup.state == "running" and (policy.quiesce or policy.resume):
                self._write_marker(record.id, sup.spec.name, policy.resume)
                quiesced_at, record.quiesced = time.monotonic(), True
                await _quiesce(sup, policy)
            written = await asyncio.to_thread(self._write, record, policy)
            _fill(record, written)
        except QuiesceError as exc:
            record.error = f"quiesce: {exc}"
        except (OSError, AgentError) as exc:
            record.error = describe(exc)
        finally:
            if quiesced_at is not None and sup is not None:
                self._resume(sup, policy.resume)
                record.quiesced_seconds = round(time.monotonic() - quiesced_at, 3)

    def _write(self, record: BackupRecord, policy: BackupSpec) -> Written:
        """Archive under a temporary name, fsync, rename into place (runs in a thread)."""
        tmp = self.folder / f"{PARTIAL}{record.id}{SUFFIX}"
        final = self.folder / f"{record.id}{SUFFIX}"
        excluder = Excluder([*ALWAYS_EXCLUDED, *policy.exclude],
                            absolute=[self.folder, self.state_dir])
        meta: dict[str, object] = {"id": record.id, "time": record.time,
                                   "playbook": record.playbook}
        try:
            with open(tmp, "xb") as out:
                written = write_archive(self.root, policy.paths, excluder, out, meta)
                out.flush()
                os.fsync(out.fileno())
            write_atomic(self.folder / f"{record.id}.manifest.json", written.manifest)
            os.rename(tmp, final)
            fsync_dir(self.folder)
        except BaseException:
            tmp.unlink(missing_ok=True)
            (self.folder / f"{record.id}.manifest.json").unlink(missing_ok=True)
            raise
        return written

    def _write_marker(self, backup_id: str, process: str, resume: list[str]) -> None:
        body = {"id": backup_id, "process": process, "resume": resume, "time": self.clock()}
        write_atomic(self.folder / MARKER, json.dumps(body).encode())

    def _resume(self, sup: Supervisor, lines: list[str]) -> None:
        for line in lines:
            try:
                sup.send(line)
            except AgentError as exc:
                # Not running any more: its next run starts with saving on anyway.
                log.warning("backup_resume_failed", extra=fields(
                    process=sup.spec.name, line=line, error=exc.message))
        (self.folder / MARKER).unlink(missing_ok=True)
        log.info("backup_resumed", extra=fields(process=sup.spec.name, lines=len(lines)))

    # -- restore ------------------------------------------------------------------------

    async def restore(self, backup_id: str, request: RestoreRequest) -> RestoreResult:
        path, record = self.archive_of(backup_id)
        try:
            unsettled = self.restorer.pending()
        except ValueError as exc:
            raise Conflict(f"the restore journal is unreadable ({exc}); no restore runs "
                           "until it is looked at") from None
        if unsettled is not None and self.running is None:
            raise Conflict(f"the restore of {unsettled.id} is not settled (step "
                           f"{unsettled.step}); restart the agent to settle it")
        self._claim(f"a restore of {backup_id}")
        sup = self._game(self.host.spec.backup)
        return await self._own_task(self._released(
            self.restorer.run(path, record, sup, request.timeout)))

    # -- prune --------------------------------------------------------------------------

    async def prune(self, request: PruneRequest) -> PruneResult:
        if request.empty():
            raise Invalid("give at least one keep rule (keep_last, keep_daily, ...)")
        if not request.dry_run and self.running not in (None, "a backup"):
            raise Conflict(f"{self.running} is under way; prune when it has ended")
        next_seq, records = self._load()
        newest = max(records, key=lambda r: r.seq, default=None)
        if not request.dry_run and newest is not None and newest.result == "failed":
            raise Conflict(f"the newest backup {newest.id} failed: no prune runs after a "
                           "failed backup (take a good one first; --dry-run shows the plan)")
        result = plan(records, request, request.dry_run)
        if not request.dry_run and result.remove:
            gone = {entry.id for entry in result.remove}
            self._save(next_seq, [r for r in records if r.id not in gone])
            await asyncio.to_thread(self._delete_files, gone)
            log.info("backup_pruned", extra=fields(removed=sorted(gone)))
        return result

    def _delete_files(self, ids: set[str]) -> None:
        for backup_id in ids:
            (self.folder / f"{backup_id}{SUFFIX}").unlink(missing_ok=True)
            (self.folder / f"{backup_id}.manifest.json").unlink(missing_ok=True)

    # -- start-up -----------------------------------------------------------------------

    def recover_world(self) -> None:
        """At agent start, before any process starts: no game starts on a world that a
        cut-off restore left half swapped (restore.py)."""
        self.restorer.recover_world()

    def recover(self) -> None:
        """After an agent restart, with the processes taken up: complete or roll back a
        cut-off restore, drop partial archives, un-quiesce an interrupted game."""
        self._settle_restore()
        for tmp in self.folder.glob(f"{PARTIAL}*"):
            tmp.unlink(missing_ok=True)
            log.warning("backup_partial_removed", extra=fields(path=str(tmp)))
        try:
            marker = json.loads((self.folder / MARKER).read_text())
        except FileNotFoundError:
            return
        except ValueError:
            marker = {}
        self._record_interrupted(str(marker.get("id", "")))
        self._task(self._resume_after_restart(marker))

    def _settle_restore(self) -> None:
        try:
            journal = self.restorer.pending()
        except ValueError:
            return  # recover_world logged it; restores are refused until it is looked at
        if journal is None:
            return
        step = journal.interrupted_at or journal.step
        self._claim(f"the recovery of the restore of {journal.id} (the agent stopped at "
                    f"step {step})")
        sup = self.host.supervisors.get(journal.process) if journal.process else None
        self._task(self._settle_logged(journal, sup, f"the agent stopped during the "
                                                     f"restore (step {step})"))

    async def _settle_logged(self, journal: Journal, sup: Supervisor | None,
                             cause: str) -> None:
        try:
            await self.restorer.settle(journal, sup, cause)
        except (OSError, AgentError) as exc:
            # The journal stays: the next agent start tries again; restores wait for it.
            log.error("restore_recovery_failed", extra=fields(id=journal.id,
                                                              error=describe(exc)))
        finally:
            self.running = None

    def _record_interrupted(self, backup_id: str) -> None:
        next_seq, records = self._load()
        if not ID_PATTERN.match(backup_id) or any(r.id == backup_id for r in records):
            return
        record = BackupRecord(id=backup_id, seq=next_seq, time=self.clock(), result="failed",
                              playbook=self.host.spec.playbook, quiesced=True,
                              error="interrupted: the agent stopped during this backup")
        self._append(record)

    async def _resume_after_restart(self, marker: dict[str, Any]) -> None:
        name, lines = str(marker.get("process", "")), list(marker.get("resume", []))
        deadline = time.monotonic() + RESUME_WAIT
        while time.monotonic() < deadline:
            sup = self.host.supervisors.get(name)
            if sup is not None and sup.state == "running":
                log.info("backup_interrupted_resume", extra=fields(process=name))
                self._resume(sup, lines)
                return
            await asyncio.sleep(0.2)  # a poll interval while the game starts
        log.error("backup_resume_gave_up", extra=fields(process=name, waited=RESUME_WAIT))


# -- helpers ---------------------------------------------------------------------------


class _Watch:
    """Console lines (ANSI stripped) seen since quiescing began, to wait for patterns."""

    def __init__(self, sup: Supervisor) -> None:
        self._sup = sup
        self._lines: list[str] = []
        self._pos = 0
        self._event = asyncio.Event()
        self.close = sup.console.subscribe(self._feed)

    def _feed(self, batch: list[tuple[int, float, str]]) -> None:
        self._lines.extend(strip_ansi(text) for _, _, text in batch)
        self._event.set()

    async def wait(self, pattern: str, timeout: float) -> None:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for index in range(self._pos, len(self._lines)):
                if regex.search(self._lines[index]):
                    self._pos = index + 1
                    return
            self._pos = len(self._lines)
            if self._sup.state != "running":
                raise QuiesceError(f"{self._sup.spec.name} is {self._sup.state} while "
                                   f"waiting for {pattern!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise QuiesceError(f"no console line matched {pattern!r} in {timeout:g}s")
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), min(left, 1.0))
            except TimeoutError:
                pass  # look at the process state again


async def _quiesce(sup: Supervisor, policy: BackupSpec) -> None:
    watch = _Watch(sup)
    try:
        for step in policy.quiesce:
            if step.send is not None:
                sup.send(step.send)
            elif step.wait_for is not None:
                await watch.wait(step.wait_for, step.timeout)
    finally:
        watch.close()


def _fill(record: BackupRecord, written: Written) -> None:
    record.size, record.sha256 = written.size, written.sha256
    record.manifest_sha256, record.files = written.manifest_sha256, written.files
    record.bytes_in = written.bytes_in
    record.changed_files, record.skipped = written.changed, written.skipped
    record.result = "partial" if written.changed else "ok"
