"""The backup and files part of the agent's API contract (docs/agent-api.md).

Like models.py, this module is imported by `zlh` and needs nothing of the agent's runtime.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PlainSerializer

from agentd.models import Model, Out


def _shown(text: str) -> str:
    """A file name as JSON can carry it: bytes that are not UTF-8 shown as \\xNN."""
    try:
        raw = text.encode("utf-8", "surrogateescape")  # how os.fsdecode kept such bytes
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return raw.decode("utf-8", "backslashreplace")


# Names read from the disk, and messages that may hold one: a file named with bytes that
# are not UTF-8 (a world can hold one) would otherwise make the whole answer fail. In
# JSON only; index.json keeps the exact name.
Shown = Annotated[str, PlainSerializer(_shown, when_used="json")]

BackupResultKind = Literal["ok", "failed", "partial"]
RestoreOutcome = Literal["restored", "rolled-back", "refused", "failed"]


class BackupRecord(Out):
    """One backup as `STATE/backups/index.json` keeps it.

    `result`: ok (consistent), partial (some file changed while it was read; listed in
    `changed_files`), failed (no archive; `error` says why). Only ok backups count for
    retention. `seq` orders backups by creation, whatever the clock said.
    """

    id: str
    seq: int
    time: float
    playbook: str | None = None
    result: BackupResultKind
    size: int = 0
    sha256: str | None = None
    manifest_sha256: str | None = None
    files: int = 0
    bytes_in: int = 0
    duration: float = 0.0
    quiesced: bool = False
    quiesced_seconds: float = 0.0
    changed_files: list[Shown] = Field(default_factory=list)
    skipped: list[Shown] = Field(default_factory=list, description="sockets, fifos, links out")
    error: Shown | None = None


class RestoreReport(Out):
    """How the last restore ended, also one an agent stop cut off.

    `outcome`: restored (the server ran ready on the restored world), rolled-back (the
    previous world is back), refused (the archive failed its checks; nothing changed),
    failed (it could not be staged; nothing changed). `interrupted_at` is the journal
    step the agent stopped at; the next agent completed the restore from there or rolled
    it back, and `message` says which and why.
    """

    id: str
    began: float
    ended: float
    outcome: RestoreOutcome
    interrupted_at: str | None = None
    ready: bool = False
    message: Shown


class BackupList(Out):
    running: str | None = Field(None, description="the operation under way, if any")
    backups: list[BackupRecord] = Field(default_factory=list, description="oldest first")
    last_restore: RestoreReport | None = None


class KeepPolicy(Model):
    """Retention with restic's meaning; None (or 0) for a rule that is not used."""

    keep_last: int | None = Field(None, ge=0, le=100_000)
    keep_hourly: int | None = Field(None, ge=0, le=100_000)
    keep_daily: int | None = Field(None, ge=0, le=100_000)
    keep_weekly: int | None = Field(None, ge=0, le=100_000)
    keep_monthly: int | None = Field(None, ge=0, le=100_000)

    def empty(self) -> bool:
        return not any(getattr(self, name) for name in KeepPolicy.model_fields)


class PruneRequest(KeepPolicy):
    dry_run: bool = False


class PruneEntry(Out):
    id: str
    time: float
    result: BackupResultKind
    reasons: list[str] = Field(default_factory=list)


class PruneResult(Out):
    dry_run: bool
    keep: list[PruneEntry] = Field(default_factory=list)
    remove: list[PruneEntry] = Field(default_factory=list)


class BackupRequest(Model):
    prune: KeepPolicy | None = Field(None, description="prune after an ok backup only")


class BackupOutcome(Out):
    backup: BackupRecord
    prune: PruneResult | None = None


class RestoreRequest(Model):
    timeout: float | None = Field(None, gt=0, le=3600, description="ready within; seconds")


class RestoreResult(Out):
    id: str
    paths: list[Shown]
    files: int
    ready: bool
    seconds: float


class FileInfo(Out):
    name: Shown
    path: Shown = Field(description="relative to the server root")
    type: Literal["file", "dir", "link", "other"]
    size: int
    mtime: float
    mode: int
    sha256: str | None = None


class FileListing(Out):
    path: Shown
    entries: list[FileInfo]
