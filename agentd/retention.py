"""Which backups a prune keeps, with restic's meaning of the keep rules.

Good backups (result ok) are taken newest first by their time. `keep_last N` keeps the N
newest; `keep_hourly N` keeps, for the last N hours that have a backup, the newest one of
each hour; daily, weekly (ISO weeks) and monthly likewise. Periods are counted in UTC.

Our additions: failed and partial backups never count and are removed, except partial
ones newer than the newest good backup (they may be the best copy there is); the newest
good backup by creation order (`seq`) is always kept, so a clock that jumped back cannot
make the backup just taken look old and lose it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from agentd.backup_models import BackupRecord, KeepPolicy, PruneEntry, PruneResult

Bucket = Callable[[BackupRecord], object]


def _utc(record: BackupRecord) -> time.struct_time:
    return time.gmtime(record.time)


RULES: dict[str, Bucket] = {
    "last": lambda r: r.seq,
    "hourly": lambda r: _utc(r)[:4],
    "daily": lambda r: _utc(r)[:3],
    "weekly": lambda r: tuple(time.strftime("%G-%V", _utc(r)).split("-")),
    "monthly": lambda r: _utc(r)[:2],
}


def plan(records: list[BackupRecord], policy: KeepPolicy, dry_run: bool) -> PruneResult:
    """Split `records` into those to keep and those to remove, with the reasons."""
    reasons: dict[str, list[str]] = {r.id: [] for r in records}
    good = sorted((r for r in records if r.result == "ok"),
                  key=lambda r: (r.time, r.seq), reverse=True)
    for rule, bucket in RULES.items():
        count = getattr(policy, f"keep_{rule}") or 0
        last: object = None
        for record in good:
            if count <= 0:
                break
            value = bucket(record)
            if value != last:
                reasons[record.id].append(rule)
                last, count = value, count - 1
    newest_seq = max((r.seq for r in good), default=-1)
    for record in records:
        if record.seq == newest_seq:
            reasons[record.id].append("newest")
        elif record.result == "partial" and record.seq > newest_seq:
            reasons[record.id].append("partial, newer than the newest good backup")
    result = PruneResult(dry_run=dry_run)
    for record in sorted(records, key=lambda r: r.seq):
        entry = PruneEntry(id=record.id, time=record.time, result=record.result,
                           reasons=reasons[record.id] or [_why_not(record)])
        (result.keep if reasons[record.id] else result.remove).append(entry)
    return result


def _why_not(record: BackupRecord) -> str:
    return "failed" if record.result == "failed" else (
        "partial" if record.result == "partial" else "no rule keeps it")
