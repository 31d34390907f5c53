"""The console of one supervised process: numbered lines in a ring and in rotated log files.

Bytes read from the process's PTY become lines. Each line gets the next sequence number and
a timestamp, goes to an in-memory ring (the recent past, cheap to serve) and to a log file
rotated by size (the older past, and what survives an agent restart). A reader asks for the
lines after a sequence number; whatever neither the ring nor the files still hold comes back
as one gap record, so a reader always learns what it missed.

Inside this module a line is the tuple `(seq, ts, text)` and a gap the tuple `(seq, lost)`;
they become pydantic models only on the way out (`read`, `follow`). `feed` is on the hot path
(a child may print a million lines as fast as it can), so its per-line work is done by
C-level calls (`bytes.decode`, `str.split`, `zip`) and one f-string per line for the log.

Log file format, one record per line: `SEQ<TAB>TS<TAB>TEXT<LF>`; TEXT never holds a LF.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import time
from bisect import bisect_right
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate, islice, repeat
from operator import itemgetter
from pathlib import Path
from typing import BinaryIO

from agentd.logs import fields
from agentd.models import NAME_PATTERN, ConsoleGap, ConsoleLine

logger = logging.getLogger(__name__)

Line = tuple[int, float, str]
Gap = tuple[int, int]
Record = Line | Gap
Subscriber = Callable[[list[Line]], None]

TRUNCATED_MARKER = " [zlh: line truncated, {} bytes dropped]"
_INDEX_STEP = 64 * 1024  # log bytes between two entries of a file's seek index
_FIRST_BLOCK = 4096  # small first read: most lookups need only a few lines
_MAX_BLOCK = 1024 * 1024
# A follower's batch: enough lines to keep pace with a flood (a turn of the producer adds
# up to 256 KiB of output), few enough characters to keep the batch's memory small.
_FOLLOW_BATCH = 10_000
_FOLLOW_CHARS = 2**20


@dataclass
class _Segment:
    """What is known about one log file: its seq range and a sparse seek index."""

    first: int | None = None
    last: int = -1
    seqs: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    def offset_for(self, seq: int) -> int:
        """A line start from which reading reaches `seq` (if the file has it) soon."""
        i = bisect_right(self.seqs, seq) - 1
        return self.offsets[i] if i >= 0 else 0

    def wrote(self, first: int, last: int, offset: int) -> None:
        if self.first is None:
            self.first = first
        self.last = last
        if not self.offsets or offset - self.offsets[-1] >= _INDEX_STEP:
            self.seqs.append(first)
            self.offsets.append(offset)


class Console:
    """The output of one process as numbered lines, kept in a ring and in log files.

    Runs in the agent's event loop; nothing here is thread-safe. `feed` never waits and
    never raises on log I/O trouble: the ring keeps going and `log_error` says what failed.
    """

    def __init__(
        self,
        name: str,
        log_dir: Path,
        ring_size: int = 10_000,
        max_line: int = 65_536,
        log_max_bytes: int = 16 * 2**20,
        log_backups: int = 3,
    ) -> None:
        if not re.match(NAME_PATTERN, name):
            raise ValueError(f"invalid console name {name!r}")
        if ring_size < 1 or max_line < 1 or log_max_bytes < 1 or log_backups < 0:
            raise ValueError("sizes must be positive and log_backups not negative")
        self.name = name
        self._max_line = max_line
        self._log_max = log_max_bytes
        base = Path(log_dir) / f"{name}.log"
        self._paths = [base] + [
            base.with_name(f"{base.name}.{i}") for i in range(1, log_backups + 1)
        ]

        self._ring: deque[Line] = deque(maxlen=ring_size)
        # The unterminated line so far: at most max_line bytes are held; beyond that
        # only a count is kept, so a huge line costs no memory.
        self._held = bytearray()
        self._dropped = 0
        self._dropped_cr = False

        self._file: io.FileIO | None = None
        self._log_size = 0
        self._log_error: str | None = None
        self._closed = False
        self._subscribers: list[Subscriber] = []
        self._waiters: set[asyncio.Future[None]] = set()

        # _segments[i] describes _paths[i]; seq numbers continue after the files' last.
        self._segments = self._scan_segments()
        self._next_seq = max(seg.last for seg in self._segments) + 1

    # -- producing ---------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Take raw bytes from the PTY, chunked anyhow; emit every line they complete."""
        end = data.rfind(b"\n")
        if end < 0:
            self._hold(data)
            return

        texts: list[str] = []
        start = 0
        if self._held or self._dropped:
            start = data.find(b"\n") + 1
            self._hold(data[: start - 1])
            texts.append(self._take_held(crlf=True))
        if start <= end:
            texts += self._split(data[start : end + 1])

        self._hold(data[end + 1 :])
        self._emit(texts, time.time())

    def flush_partial(self) -> None:
        """The process exited: its unterminated last line, if any, becomes a line."""
        if self._held or self._dropped:
            self._emit([self._take_held(crlf=False)], time.time())

    def note(self, text: str) -> None:
        """Add the agent's own line(s), e.g. `[zlh] process exited with code 1`."""
        # A lone surrogate would make the log's encode() fail; LF would break the format.
        clean = text.encode("utf-8", "replace").decode("utf-8")
        self._emit(clean.split("\n"), time.time())

    def _split(self, block: bytes) -> list[str]:
        """The lines of `block`, which ends with LF; CRLF becomes LF."""
        if len(block) > self._max_line and max(map(len, block.split(b"\n"))) > self._max_line:
            return self._split_long(block)
        lines = block.decode("utf-8", "replace").replace("\r\n", "\n").split("\n")
        lines.pop()  # the empty string after the final LF
        return lines

    def _split_long(self, block: bytes) -> list[str]:
        """Slow path of `_split` for a block holding at least one over-long line."""
        texts = []
        for raw in block.split(b"\n")[:-1]:
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > self._max_line:
                texts.append(_truncated(raw[: self._max_line], len(raw) - self._max_line))
            else:
                texts.append(raw.decode("utf-8", "replace"))
        return texts

    def _hold(self, piece: bytes) -> None:
        """Keep the start of an unterminated line, counting what exceeds max_line."""
        if not piece:
            return
        room = self._max_line - len(self._held)
        if len(piece) <= room:
            self._held += piece
            return
        if room > 0:
            self._held += piece[:room]
        self._dropped += len(piece) - max(room, 0)
        # A CR right before the coming LF belongs to the line end, not to the dropped text.
        self._dropped_cr = piece.endswith(b"\r")

    def _take_held(self, crlf: bool) -> str:
        """The held line as text; `crlf` when a LF ended it (so a last CR goes too)."""
        raw, dropped = bytes(self._held), self._dropped
        self._held = bytearray()
        self._dropped = 0
        if dropped and crlf and self._dropped_cr:
            dropped -= 1
        if dropped:
            return _truncated(raw, dropped)
        if crlf and raw.endswith(b"\r"):
            raw = raw[:-1]
        return raw.decode("utf-8", "replace")

    def _emit(self, texts: list[str], now: float) -> None:
        """Number the lines, keep them, log them, and tell subscribers and followers."""
        if not texts:
            return
        stamp = f"{now:.6f}"
        ts = float(stamp)  # the value the log file will give back
        first = self._next_seq
        self._next_seq = first + len(texts)
        seqs = range(first, self._next_seq)

        batch = list(zip(seqs, repeat(ts), texts))
        self._ring.extend(batch)
        if not self._closed:
            pairs = zip(seqs, texts, strict=True)
            payload = "".join([f"{seq}\t{stamp}\t{text}\n" for seq, text in pairs])
            self._write_log(payload.encode(), first, self._next_seq - 1)

        if self._subscribers:
            self._notify(batch)
        if self._waiters:
            self._wake()

    def _notify(self, batch: list[Line]) -> None:
        for callback in list(self._subscribers):
            try:
                callback(batch)
            except Exception:  # noqa: BLE001 - logged with its traceback, then skipped
                # A broken subscriber (a probe) must not stop the console from draining.
                logger.exception(
                    "console_subscriber_failed",
                    extra=fields(process=self.name, subscriber=repr(callback)),
                )

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- log files -----------------------------------------------------------------------

    def _write_log(self, data: bytes, first: int, last: int) -> None:
        """Append one batch with one write; on failure remember why and retry next time."""
        try:
            offset = self._append(data)
        except OSError as exc:
            self._write_failed(exc)
            return

        self._segments[0].wrote(first, last, offset)
        if self._log_error is not None:
            logger.info("console_log_recovered", extra=fields(process=self.name))
            self._log_error = None

    def _append(self, data: bytes) -> int:
        """Write `data` to NAME.log (rotating first when it would grow too big)."""
        if self._file is None:
            self._open_current()
        if self._log_size and self._log_size + len(data) > self._log_max:
            self._rotate()
        assert self._file is not None  # _open_current either set it or raised

        offset = self._log_size
        _write_all(self._file, data)
        self._log_size += len(data)
        return offset

    def _open_current(self) -> None:
        """Open NAME.log for appending, cutting a torn last record away."""
        self._paths[0].parent.mkdir(parents=True, exist_ok=True)
        file = _open_log(self._paths[0])
        try:
            size = file.seek(0, os.SEEK_END)
            whole = _end_of_whole_records(file, size)
            if whole != size:
                file.truncate(whole)
        except OSError:
            file.close()
            raise
        self._file, self._log_size = file, whole

    def _rotate(self) -> None:
        """NAME.log -> NAME.log.1 -> ... -> NAME.log.N; the oldest is dropped."""
        self._close_file()
        try:
            for i in range(len(self._paths) - 1, 0, -1):
                _move_if_there(self._paths[i - 1], self._paths[i])
            if len(self._paths) == 1:
                self._paths[0].unlink(missing_ok=True)
        except OSError:
            # Some files may have moved already: learn again what is where.
            self._segments = self._scan_segments()
            raise
        self._segments = [_Segment(), *self._segments[:-1]]
        self._open_current()

    def _write_failed(self, exc: OSError) -> None:
        if self._log_error is None:
            # Once per outage, not per line: lines keep coming while the disk is full.
            logger.warning(
                "console_log_write_failed",
                extra=fields(process=self.name, path=str(self._paths[0]), error=str(exc)),
            )
        self._log_error = f"{self._paths[0]}: {exc.strerror or exc}"

        # Cut a half-written record so that whole records follow it once writes work.
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.truncate(self._log_size)
        except OSError as cut_exc:
            logger.debug(
                "console_log_cut_failed", extra=fields(process=self.name, error=str(cut_exc))
            )
        try:
            file.close()
        except OSError as close_exc:
            logger.debug(
                "console_log_close_failed", extra=fields(process=self.name, error=str(close_exc))
            )

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def _scan_segments(self) -> list[_Segment]:
        segments = []
        for path in self._paths:
            try:
                segments.append(_scan_segment(path))
            except FileNotFoundError:
                segments.append(_Segment())
            except OSError as exc:
                logger.warning(
                    "console_log_scan_failed",
                    extra=fields(process=self.name, path=str(path), error=str(exc)),
                )
                segments.append(_Segment())
        return segments

    def _read_segment(self, index: int, start: int, stop: int) -> Iterator[Line]:
        """The records with start <= seq < stop of one log file, read as they are taken."""
        try:
            with open(self._paths[index], "rb") as file:
                end = os.fstat(file.fileno()).st_size
                for rec in _iter_records(file, self._segments[index].offset_for(start), end):
                    if rec[0] >= stop:
                        break
                    if rec[0] >= start:
                        start = rec[0] + 1
                        yield rec
        except OSError as exc:
            # Gone or unreadable: the caller reports what is missing as a gap.
            logger.debug(
                "console_log_read_failed",
                extra=fields(process=self.name, path=str(self._paths[index]), error=str(exc)),
            )

    def _from_files(self, start: int, stop: int) -> Iterator[Line]:
        """The records with start <= seq < stop in the log files, oldest first; the caller
        stops taking them when it has enough."""
        for index in range(len(self._segments) - 1, -1, -1):
            seg = self._segments[index]
            if seg.first is None or seg.last < start:
                continue
            if seg.first >= stop:
                break
            for rec in self._read_segment(index, start, stop):
                start = rec[0] + 1
                yield rec

    # -- reading -------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    @property
    def pending_bytes(self) -> int:
        """Bytes of an unterminated line fed but not yet emitted (to re-read after a restart)."""
        return len(self._held) + self._dropped

    @property
    def log_error(self) -> str | None:
        """The last log write error (e.g. disk full), None while writes work."""
        return self._log_error

    def read(self, after: int = -1, limit: int = 1000) -> list[ConsoleLine | ConsoleGap]:
        """Records with seq > after, oldest first; -1: from the oldest line still kept."""
        return [_model(rec) for rec in self.records(after, limit)]

    def records(self, after: int = -1, limit: int = 1000) -> list[Record]:
        """`read` as plain tuples: (seq, ts, text) lines and (seq, lost) gaps."""
        if limit <= 0:
            return []
        return self._collect(self._start(after), limit)

    async def follow(self, after: int = -1) -> AsyncGenerator[ConsoleLine | ConsoleGap, None]:
        """Like `read`, then every new record as it comes; never ends by itself."""
        async for batch in self.follow_batches(after):
            for rec in batch:
                yield _model(rec)

    async def follow_batches(self, after: int = -1) -> AsyncGenerator[list[Record], None]:
        """`follow` in batches of plain tuples, for streaming many lines cheaply."""
        start = self._start(after)
        while True:
            batch = self._collect(start, _FOLLOW_BATCH, _FOLLOW_CHARS)
            if not batch:
                await self._changed()
                continue
            start = _next_seq_after(batch[-1])
            yield batch
            # A follower with a backlog must not keep the loop to itself: the console
            # producer, probes and other requests get their turn between batches.
            await asyncio.sleep(0)

    def tail(self, n: int) -> list[str]:
        """Texts of the last n lines in the ring (for crash records)."""
        if n <= 0:
            return []
        return [rec[2] for rec in islice(self._ring, max(0, len(self._ring) - n), None)]

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(batch)` with each new batch of lines; returns the unsubscribe.

        The callback runs inside `feed`: it must be quick and must not keep or change the
        list it gets.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def close(self) -> None:
        """Close the log file; later lines still reach the ring, followers and subscribers."""
        self._closed = True
        try:
            self._close_file()
        except OSError as exc:
            logger.warning(
                "console_log_close_failed", extra=fields(process=self.name, error=str(exc))
            )

    async def _changed(self) -> None:
        """Wait until new lines arrive. A future per waiter: no loop is bound at __init__."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)

    def _start(self, after: int) -> int:
        """The first seq a reader wants: after+1, or the oldest kept line for -1."""
        if after >= 0:
            return after + 1
        ring_first = self._ring[0][0] if self._ring else self._next_seq
        for seg in reversed(self._segments):
            if seg.first is not None:
                return min(seg.first, ring_first)
        return ring_first

    def _collect(self, start: int, limit: int, max_chars: int | None = None) -> list[Record]:
        """Up to `limit` records from seq `start` on: files first, then the ring. With
        `max_chars`, fewer once the texts from each source hold that many characters."""
        out: list[Record] = []
        ring_first = self._ring[0][0] if self._ring else self._next_seq
        if start < ring_first:
            start = self._collect_old(start, ring_first, limit, out, max_chars)
            if start < ring_first:
                return out  # full: the rest of the files comes in the next batch
        if len(out) < limit and start < self._next_seq:
            lines = self._from_ring(start - ring_first, limit - len(out))
            out += lines if max_chars is None else _within(lines, max_chars)
        return out

    def _from_ring(self, skip: int, count: int) -> list[Line]:
        """`count` records after the first `skip` of the ring.

        A deque is walked from one end; live followers want its newest end, so walk from
        there when that is shorter (one new line must not cost a walk over the whole ring).
        """
        from_end = len(self._ring) - skip
        if skip <= from_end:
            return list(islice(self._ring, skip, skip + count))
        newest = list(islice(reversed(self._ring), from_end))
        newest.reverse()
        return newest[:count]

    def _collect_old(self, start: int, stop: int, limit: int, out: list[Record],
                     max_chars: int | None = None) -> int:
        """Fill `out` for seqs in [start, stop) from the files, gaps where they lack lines.

        Returns the next seq to serve: `stop` once the files have given all they hold.
        """
        chars = 0
        for rec in self._from_files(start, stop):
            if len(out) >= limit or (max_chars is not None and chars >= max_chars):
                return start
            if rec[0] > start:
                out.append((start, rec[0] - start))
                start = rec[0]
                if len(out) >= limit:
                    return start
            out.append(rec)
            chars += len(rec[2])
            start = rec[0] + 1
        # The files hold nothing more before `stop`.
        if start < stop:
            if len(out) >= limit:
                return start
            out.append((start, stop - start))
            start = stop
        return start


# -- helpers -------------------------------------------------------------------------------


def _truncated(raw: bytes, dropped: int) -> str:
    """The kept start of an over-long line plus the marker; no character is cut in half."""
    cut = _utf8_boundary(raw)
    return raw[:cut].decode("utf-8", "replace") + TRUNCATED_MARKER.format(
        dropped + len(raw) - cut
    )


def _utf8_boundary(raw: bytes) -> int:
    """len(raw) without a multibyte character that is incomplete at its end."""
    for back in range(1, min(4, len(raw)) + 1):
        byte = raw[-back]
        if byte < 0x80:
            return len(raw)
        if byte >= 0xC0:  # lead byte: is its character complete?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(raw) - back if need > back else len(raw)
    return len(raw)


def _within(lines: list[Line], max_chars: int) -> list[Line]:
    """The first of `lines` (at least one) whose texts hold up to `max_chars` characters."""
    if sum(map(len, map(itemgetter(2), lines))) <= max_chars:
        return lines
    sizes = list(accumulate(map(len, map(itemgetter(2), lines))))
    return lines[: max(1, bisect_right(sizes, max_chars))]


def _next_seq_after(rec: Record) -> int:
    return rec[0] + 1 if len(rec) == 3 else rec[0] + rec[1]


def _model(rec: Record) -> ConsoleLine | ConsoleGap:
    if len(rec) == 3:
        return ConsoleLine(seq=rec[0], ts=rec[1], text=rec[2])
    return ConsoleGap(seq=rec[0], lost=rec[1])


def _open_log(path: Path) -> io.FileIO:
    """NAME.log, unbuffered so that a write error shows in the write() that caused it;
    private (0600): a console may show what players and operators typed."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    return open(fd, "a+b", buffering=0)


def _write_all(file: io.FileIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = file.write(view)
        if not written:
            raise OSError(f"short write to {file.name!r}")
        view = view[written:]


def _move_if_there(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        return  # nothing at that position: nothing to shift


def _end_of_whole_records(file: BinaryIO | io.FileIO, size: int) -> int:
    """The offset just past the file's last LF (0 when it has none)."""
    pos = size
    while pos > 0:
        n = min(_INDEX_STEP, pos)
        file.seek(pos - n)
        i = file.read(n).rfind(b"\n")
        if i >= 0:
            return pos - n + i + 1
        pos -= n
    return 0


def _parse(text: str) -> Iterator[Line]:
    """The records of whole log lines (`text` ends with LF); unparsable lines are skipped.

    A follower that fell behind the ring is served from here, a line at a time, so each
    line costs two partitions and an int; the lines of one batch share their stamp, which
    is converted once.
    """
    stamp, ts = "", 0.0
    lines = text.split("\n")
    lines.pop()  # the empty string after the final LF
    for raw in lines:
        seq, _, rest = raw.partition("\t")
        this_stamp, tab, body = rest.partition("\t")
        if not tab:
            continue
        try:
            if this_stamp != stamp:
                ts, stamp = float(this_stamp), this_stamp
            yield int(seq), ts, body
        except ValueError:
            continue


def _iter_records(file: BinaryIO, pos: int, end: int) -> Iterator[Line]:
    """The parsable records among the whole lines in [pos, end); pos starts a line."""
    file.seek(pos)
    size = _FIRST_BLOCK
    rest = b""
    while pos < end:
        block = file.read(min(size, end - pos))
        if not block:
            return
        pos += len(block)
        size = min(size * 2, _MAX_BLOCK)
        block = rest + block
        cut = block.rfind(b"\n") + 1
        rest = block[cut:]
        # One decode per block: a LF is never part of a UTF-8 sequence, so this is what
        # decoding line by line would give.
        yield from _parse(block[:cut].decode("utf-8", "replace"))


def _next_line_start(file: BinaryIO, off: int, end: int) -> int:
    if off == 0:
        return 0
    file.seek(off - 1)
    pos = off - 1
    while pos < end:
        block = file.read(min(_INDEX_STEP, end - pos))
        if not block:
            break
        i = block.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(block)
    return end


def _scan_segment(path: Path) -> _Segment:
    """Learn a log file's seq range and seek index from samples, not from every line."""
    seg = _Segment()
    with open(path, "rb") as file:
        end = os.fstat(file.fileno()).st_size
        for off in range(0, end, _INDEX_STEP):
            start = _next_line_start(file, off, end)
            rec = next(_iter_records(file, start, end), None)
            if rec is None:
                break  # nothing parsable up to the end
            if not seg.seqs or (start > seg.offsets[-1] and rec[0] > seg.seqs[-1]):
                seg.seqs.append(rec[0])
                seg.offsets.append(start)
        if not seg.seqs:
            return seg

        seg.first = seg.seqs[0]
        for rec in _iter_records(file, seg.offsets[-1], end):
            seg.last = max(seg.last, rec[0])
    return seg
