"""Restores: a verified archive swapped in for the live world, with a journal that lets the
next agent complete or undo a restore that an agent stop cut off.

Files, under the config's state_dir:

    backups/restore-journal.json   the restore under way: its step and the exact paths it
                                   moves; written atomically and fsynced before each step
    backups/last-restore.json      how the last restore ended (GET /v1/backups shows it)

and under the server root `.zlh-restore-ID` (the staged world, later what a rollback takes
out) and `.zlh-keep-ID` (each backup path's previous copy).

The steps, and what an agent that starts and finds the journal at one of them does:

    staging        verify and extract into .zlh-restore-ID      roll back
    stopping       stop the game                                roll back
    swapping       per path: live -> keep, staged -> live       roll back
    starting       every path swapped; start, wait for ready    complete
    ready          ready on the restored world; drop the keep   complete
    rolling-back   not ready: the previous copies go back       roll back
    rolled-back    the previous world is whole again            roll back

Until every path of the restored world is in place, the previous world is whole in known
places and the operator was never told the restore worked: it is put back. From
`starting` on, the restored world is whole and verified, and the restore is completed as
an uninterrupted one is, with its rollback when the server does not come up. A rollback
leaves the game as it was before the restore (started again if it ran); a completed
restore leaves it running. Paths move only while the game is stopped, and an agent puts
the previous world back before it starts any process. The previous world is deleted only
once the restored one was ready.

For fault tests, ZLH_RESTORE_PAUSE=POINT holds a restore at POINT after logging
`restore_paused`, so that a test can kill the agent exactly there. The points, in order:
staged, stopping, stopped, moved-aside, half-swapped, swapped, starting, ready and
rolling-back; moved-aside, half-swapped and rolling-back hold after the first path, and
starting also holds when a new agent completes a restore.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, Field

from agentd.archive import BadArchive, Extracted, verify_and_extract
from agentd.backup_models import BackupRecord, RestoreOutcome, RestoreReport, RestoreResult
from agentd.durable import fsync_dir, holds_only_folders, remove_tree, write_atomic
from agentd.errors import AgentError, Corrupt, OperationFailed, describe
from agentd.logs import fields
from agentd.supervisor import Supervisor

log = logging.getLogger(__name__)

Step = Literal["staging", "stopping", "swapping", "starting", "ready", "rolling-back",
               "rolled-back"]
COMPLETES = ("starting", "ready")
JOURNAL = "restore-journal.json"
LAST = "last-restore.json"
PAUSE_ENV = "ZLH_RESTORE_PAUSE"
TRASH = ".zlh-rolled-back"  # inside the staging folder: what a rollback takes out
RUNS = ("starting", "running", "backoff")  # states in which the operator wants it up
SETTLED = ("backoff", "fatal", "stopped")
STOP_WAIT = 600.0  # how long a stop that a previous agent began may still take


class Move(BaseModel):
    """One backup path: its live place, its restored copy, where its previous copy goes."""

    path: str
    live: str
    staged: str
    kept: str
    previous: bool | None = None  # a live copy existed when swapping began (None: not yet)


class Journal(BaseModel):
    id: str
    step: Step
    began: float
    root: str
    staging: str
    keep: str
    process: str | None = None
    was_running: bool = False
    timeout: float | None = None
    moves: list[Move] = Field(default_factory=list)
    interrupted_at: Step | None = None
    rollback_reason: str | None = None  # set with step rolling-back


class Restorer:
    def __init__(self, folder: Path, root: Path, clock: Callable[[], float]) -> None:
        self.folder = folder
        self.root = root
        self.clock = clock

    # -- journal and report -------------------------------------------------------------

    def pending(self) -> Journal | None:
        """The journal of a restore that has not ended, or None.

        Raises ValueError when it is unreadable or names a place outside the server root.
        """
        try:
            raw = (self.folder / JOURNAL).read_bytes()
        except FileNotFoundError:
            return None
        journal = Journal.model_validate_json(raw)  # pydantic's ValidationError: ValueError
        root = os.path.normpath(self.root)
        places = [journal.staging, journal.keep,
                  *(place for m in journal.moves for place in (m.live, m.staged, m.kept))]
        if os.path.normpath(journal.root) != root or not all(
                os.path.normpath(p).startswith(root + os.sep) for p in places):
            raise ValueError("the restore journal names places outside the server root")
        return journal

    def last(self) -> RestoreReport | None:
        try:
            return RestoreReport.model_validate_json((self.folder / LAST).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            log.error("restore_report_unreadable", extra=fields(error=str(exc)))
            return None

    def _write(self, journal: Journal, step: Step) -> None:
        """The step is durable before it is taken; in memory only once it is on disk."""
        data = journal.model_copy(update={"step": step}).model_dump_json(indent=1)
        write_atomic(self.folder / JOURNAL, data.encode())
        journal.step = step
        log.info("restore_step", extra=fields(id=journal.id, step=step))

    def _end(self, journal: Journal, outcome: RestoreOutcome, ready: bool,
             message: str) -> RestoreReport:
        report = RestoreReport(id=journal.id, began=journal.began, ended=self.clock(),
                               outcome=outcome, interrupted_at=journal.interrupted_at,
                               ready=ready, message=message)
        try:
            write_atomic(self.folder / LAST, report.model_dump_json().encode())
        except OSError as exc:
            log.error("restore_report_unsaved", extra=fields(id=journal.id, error=describe(exc)))
        (self.folder / JOURNAL).unlink(missing_ok=True)
        fsync_dir(self.folder)
        log.info("restore_ended", extra=fields(**report.model_dump()))
        return report

    # -- a restore ----------------------------------------------------------------------

    async def run(self, archive: Path, record: BackupRecord, sup: Supervisor | None,
                  timeout: float | None) -> RestoreResult:
        began = time.monotonic()
        journal = Journal(
            id=record.id, step="staging", began=self.clock(), root=str(self.root),
            staging=str(self.root / f".zlh-restore-{record.id}"),
            keep=str(self.root / f".zlh-keep-{record.id}"),
            process=sup.spec.name if sup is not None else None,
            was_running=sup is not None and sup.state in RUNS, timeout=timeout)
        extracted = await self._stage(archive, record, journal, sup)
        try:
            await self._swap(journal, sup)
            ready = await _start_ready(sup, timeout, pause="starting")
            report = await self._after_start(journal, sup, ready)
        except (OSError, AgentError) as exc:
            cause = f"the restore failed at step {journal.step} ({describe(exc)})"
            log.error("restore_cut_off", extra=fields(id=record.id, step=journal.step,
                                                      error=describe(exc)))
            report = await self.settle(journal, sup, cause)
        if report.outcome != "restored":
            raise OperationFailed(report.message)
        return RestoreResult(id=record.id, paths=extracted.paths, files=extracted.files,
                             ready=True, seconds=round(time.monotonic() - began, 3))

    async def _stage(self, archive: Path, record: BackupRecord, journal: Journal,
                     sup: Supervisor | None) -> Extracted:
        """Step staging: extract and check everything; the world is not touched."""
        staging = Path(journal.staging)
        try:
            await asyncio.to_thread(remove_tree, staging)
            self._write(journal, "staging")
            extracted = await asyncio.to_thread(
                verify_and_extract, archive, record.sha256 or "", record.manifest_sha256,
                staging)
            journal.moves = _moves(journal, extracted.paths)
        except BadArchive as exc:
            await asyncio.to_thread(remove_tree, staging)
            report = self._end(journal, "refused", _ready(sup),
                               f"backup {record.id} refused: {exc}; nothing was changed")
            raise Corrupt(report.message) from None
        except OSError as exc:
            await asyncio.to_thread(remove_tree, staging)
            report = self._end(journal, "failed", _ready(sup), f"backup {record.id} could "
                               f"not be staged ({describe(exc)}); nothing was changed")
            raise OperationFailed(report.message) from None
        log.info("restore_verified", extra=fields(id=record.id, files=extracted.files))
        await _pause("staged")
        return extracted

    async def _swap(self, journal: Journal, sup: Supervisor | None) -> None:
        """Steps stopping and swapping: the game stops, every path is swapped in."""
        self._write(journal, "stopping")
        await _pause("stopping")
        if sup is not None:
            await sup.stop()
            if sup.pid is not None:
                raise OperationFailed(f"process {sup.spec.name!r} did not stop")
        await _pause("stopped")
        for move in journal.moves:
            move.previous = os.path.lexists(move.live)
        self._write(journal, "swapping")
        await asyncio.to_thread(swap_in, journal)
        self._write(journal, "starting")
        await _pause("swapped")

    async def _after_start(self, journal: Journal, sup: Supervisor | None, ready: bool,
                           cause: str | None = None) -> RestoreReport:
        """From step starting: ready completes the restore, anything else rolls it back."""
        if ready:
            self._write(journal, "ready")
            await _pause("ready")
            return await self._drop_previous(journal, cause)
        state = sup.state if sup is not None else "-"
        log.error("restore_not_ready", extra=fields(id=journal.id, state=state))
        why = f"the world of backup {journal.id} did not come up (state {state})"
        if cause is not None:
            why = f"{cause}; every path of the restored world was in place, but {why}"
        if sup is not None:
            await sup.stop()
        journal.rollback_reason = why
        self._write(journal, "rolling-back")
        await asyncio.to_thread(self.put_back, journal)
        return await self._after_rollback(journal, sup, why)

    async def _drop_previous(self, journal: Journal, cause: str | None) -> RestoreReport:
        """Step ready: the restored world ran ready, so the previous one may go."""
        await asyncio.to_thread(remove_tree, Path(journal.keep))
        await asyncio.to_thread(remove_tree, Path(journal.staging))
        message = "the server is ready on the restored world"
        if cause is not None:
            message = (f"{cause}; every path of the restored world was in place, so the "
                       f"restore was completed: {message}")
        return self._end(journal, "restored", True, message)

    def put_back(self, journal: Journal) -> None:
        """Up to swapping, or rolling back: each path's previous copy goes back, the
        restore's folders go, and the journal says rolled-back. The game is stopped."""
        if journal.step in ("swapping", "rolling-back"):
            put_back_moves(journal)
        remove_tree(Path(journal.staging))
        keep = Path(journal.keep)
        if not holds_only_folders(keep):
            raise OperationFailed(f"{keep} still holds files after the previous world was "
                                  "put back; it is left for the operator")
        remove_tree(keep)
        self._write(journal, "rolled-back")

    async def _after_rollback(self, journal: Journal, sup: Supervisor | None,
                              why: str) -> RestoreReport:
        """Step rolled-back: the game is left as it was before the restore."""
        await _settle(sup)
        if not journal.was_running:
            return self._end(journal, "rolled-back", False, f"{why}; the previous world is "
                             "back and the server stays stopped, as it was before")
        ready = await _start_ready(sup, journal.timeout)
        state = sup.state if sup is not None else "gone"
        again = "it is ready again" if ready else f"but it is not ready either ({state})"
        return self._end(journal, "rolled-back", ready,
                         f"{why}; the previous world is back and {again}")

    # -- after an agent stop ------------------------------------------------------------

    def recover_world(self) -> None:
        """At agent start, before any process starts: a restore cut off before every path
        was in place gets its previous world back now, whatever the game's saved state."""
        try:
            journal = self.pending()
        except ValueError as exc:
            log.error("restore_journal_unreadable", extra=fields(
                path=str(self.folder / JOURNAL), error=str(exc)))
            return
        if journal is None:
            self._sweep()
            return
        complete = journal.step in COMPLETES
        log.warning("restore_interrupted", extra=fields(
            id=journal.id, step=journal.interrupted_at or journal.step,
            action="complete" if complete else "roll back"))
        try:
            if journal.interrupted_at is None:
                journal.interrupted_at = journal.step
                self._write(journal, journal.step)
            if not complete and journal.step != "rolled-back":
                self.put_back(journal)
        except (OSError, AgentError) as exc:
            # settle() tries again, with the game stopped first.
            log.error("restore_put_back_failed", extra=fields(id=journal.id,
                                                              error=describe(exc)))

    async def settle(self, journal: Journal, sup: Supervisor | None,
                     cause: str) -> RestoreReport:
        """Complete or roll back a restore cut off at `journal.step`, as the table says."""
        if journal.interrupted_at is None:
            journal.interrupted_at = journal.step
        if journal.step == "ready":
            return await self._drop_previous(journal, cause)
        if journal.step == "starting":
            await _settle(sup)
            ready = await _start_ready(sup, journal.timeout, pause="starting")
            return await self._after_start(journal, sup, ready, cause)
        why = f"{cause}, before every path of the restored world was in place"
        if journal.rollback_reason is not None:
            why = f"{journal.rollback_reason}; {cause}, while the previous world went back"
        if journal.step != "rolled-back":
            if sup is not None and journal.step in ("swapping", "rolling-back"):
                await sup.stop()  # paths move only while the game is stopped
            await asyncio.to_thread(self.put_back, journal)
        return await self._after_rollback(journal, sup, why)

    def _sweep(self) -> None:
        """Restore folders no journal names (left by an older agent)."""
        for staging in self.root.glob(".zlh-restore-*"):
            remove_tree(staging)
        for kept in self.root.glob(".zlh-keep-*"):
            log.warning("restore_leftover", extra=fields(path=str(kept)))


# -- moving paths ----------------------------------------------------------------------


def _moves(journal: Journal, paths: list[str]) -> list[Move]:
    """The manifest's paths, checked: inside the root, none inside another."""
    clean: list[str] = []
    for path in paths:
        pure = PurePosixPath(path)
        if (pure.is_absolute() or not pure.parts or ".." in pure.parts or str(pure) == "."
                or pure.parts[0].startswith(".zlh-")):
            raise BadArchive(f"backup path {path!r} is not a place inside the server root")
        clean.append(str(pure))
    for path in clean:
        if any(other != path and path.startswith(other + "/") for other in clean) or \
                clean.count(path) > 1:
            raise BadArchive(f"backup path {path!r} is named twice or inside another one")
    return [Move(path=p, live=os.path.join(journal.root, p),
                 staged=os.path.join(journal.staging, p), kept=os.path.join(journal.keep, p))
            for p in clean]


def swap_in(journal: Journal) -> None:
    """Each path's live copy aside into the keep folder, then the restored one in."""
    for index, move in enumerate(journal.moves):
        live, staged, kept = Path(move.live), Path(move.staged), Path(move.kept)
        if move.previous:
            kept.parent.mkdir(parents=True, exist_ok=True)
            os.rename(live, kept)
            _hold("moved-aside", index)
        if os.path.lexists(staged):
            live.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staged, live)
        _hold("half-swapped", index)
    _fsync_places(journal)


def put_back_moves(journal: Journal) -> None:
    """Each previous copy back in its place; what was restored goes to the trash folder.
    Safe to run again after it was cut off: it looks at what is where."""
    trash = Path(journal.staging) / TRASH
    for index, move in enumerate(journal.moves):
        live, kept = Path(move.live), Path(move.kept)
        if os.path.lexists(kept):
            _discard(live, trash / move.path)
            os.rename(kept, live)
        elif move.previous is False:
            _discard(live, trash / move.path)  # the path is new: nothing was there before
        _hold("rolling-back", index)
    _fsync_places(journal)


def _discard(path: Path, trash: Path) -> None:
    if os.path.lexists(path):
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, trash)


def _fsync_places(journal: Journal) -> None:
    folders = {journal.root, journal.staging, journal.keep}
    for move in journal.moves:
        folders.update(os.path.dirname(p) for p in (move.live, move.staged, move.kept))
    for folder in sorted(folders):
        if os.path.isdir(folder):
            fsync_dir(Path(folder))


# -- the game --------------------------------------------------------------------------


def _ready(sup: Supervisor | None) -> bool:
    return sup is None or sup.ready


async def _settle(sup: Supervisor | None) -> None:
    """Wait for a stop that is under way (one a previous agent began) to end."""
    deadline = time.monotonic() + STOP_WAIT
    while sup is not None and sup.state == "stopping" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # a poll interval while the stop escalates


async def _start_ready(sup: Supervisor | None, timeout: float | None,
                       pause: str | None = None) -> bool:
    """Start the process and wait until it is ready; False when it fails or times out."""
    if sup is None:
        return True
    await sup.start()
    if pause is not None:
        await _pause(pause)
    deadline = time.monotonic() + (timeout or sup.spec.startup_timeout)
    while time.monotonic() < deadline:
        if sup.ready:
            return True
        if sup.state in SETTLED:
            return False
        await asyncio.sleep(0.1)  # a poll interval while the probe runs
    return False


# -- pause points for fault tests ------------------------------------------------------


def _held(point: str) -> bool:
    if os.environ.get(PAUSE_ENV, "") != point:
        return False
    log.warning("restore_paused", extra=fields(point=point))
    return True


async def _pause(point: str) -> None:
    if _held(point):
        await asyncio.Event().wait()  # until the test kills the agent


def _hold(point: str, index: int) -> None:
    """A pause point in the thread that moves paths, after the first path only."""
    if index == 0 and _held(point):
        threading.Event().wait()  # until the test kills the agent
