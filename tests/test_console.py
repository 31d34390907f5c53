"""Tests of agentd.console: line splitting, the ring, the log files, gaps and followers."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import tracemalloc
from pathlib import Path

import pytest

from agentd import console as console_mod
from agentd.console import TRUNCATED_MARKER, Console
from agentd.models import ConsoleGap, ConsoleLine

MIXED = "héllo wörld €\r\nsecond 🎉 line\n\nprogress 10%\rprogress 100%\r\nlast\n".encode()
MIXED_LINES = ["héllo wörld €", "second 🎉 line", "", "progress 10%\rprogress 100%", "last"]


Records = list[ConsoleLine | ConsoleGap]


def lines_of(records: Records) -> list[ConsoleLine]:
    """The records, which must all be lines (no gap)."""
    lines = [rec for rec in records if isinstance(rec, ConsoleLine)]
    assert len(lines) == len(records), records
    return lines


def texts(console: Console, after: int = -1, limit: int = 100_000) -> list[str]:
    return [line.text for line in lines_of(console.read(after, limit))]


def numbered(start: int, stop: int) -> bytes:
    return b"".join(b"line %d\n" % i for i in range(start, stop))


def log_lines(path: Path) -> list[list[str]]:
    return [line.split("\t", 2) for line in path.read_text().splitlines()]


# -- splitting -----------------------------------------------------------------------------


def test_sequence_numbers_are_consecutive_from_zero(tmp_path: Path) -> None:
    console = Console("game", tmp_path)
    assert console.last_seq == -1
    assert console.read() == []

    console.feed(b"a\nb\n")
    console.feed(b"c\n")

    records = lines_of(console.read())
    assert [(r.seq, r.text) for r in records] == [(0, "a"), (1, "b"), (2, "c")]
    assert console.last_seq == 2
    assert records[0].ts == records[1].ts <= records[2].ts


def test_chunk_boundary_anywhere_gives_the_same_lines(tmp_path: Path) -> None:
    # Every split point: inside multibyte characters, between \r and \n, at line ends.
    for cut in range(len(MIXED) + 1):
        console = Console("game", tmp_path / str(cut))
        console.feed(MIXED[:cut])
        console.feed(MIXED[cut:])
        assert texts(console) == MIXED_LINES, f"split at byte {cut}"


def test_byte_by_byte_feeding_gives_the_same_lines(tmp_path: Path) -> None:
    console = Console("game", tmp_path)
    for i in range(len(MIXED)):
        console.feed(MIXED[i : i + 1])
    assert texts(console) == MIXED_LINES


def test_invalid_utf8_is_replaced_not_dropped(tmp_path: Path) -> None:
    console = Console("game", tmp_path)
    console.feed(b"ok \xff\xfe end\n\xe2\x82\nafter\n")
    assert texts(console) == ["ok \ufffd\ufffd end", "\ufffd", "after"]


def test_blank_lines_are_kept(tmp_path: Path) -> None:
    console = Console("game", tmp_path)
    console.feed(b"\n\r\n\n")
    assert texts(console) == ["", "", ""]


def test_only_one_trailing_cr_is_stripped(tmp_path: Path) -> None:
    console = Console("game", tmp_path)
    console.feed(b"10%\r50%\r100%\r\r\n")
    assert texts(console) == ["10%\r50%\r100%\r"]


def test_flush_partial_emits_the_unterminated_line_once(tmp_path: Path) -> None:
    console = Console("game", tmp_path)
    console.feed(b"done\nprompt> ")
    assert texts(console) == ["done"]

    console.flush_partial()
    console.flush_partial()
    assert texts(console) == ["done", "prompt> "]
    assert console.last_seq == 1


def test_note_adds_numbered_lines(tmp_path: Path) -> None:
    console = Console("game", tmp_path)
    console.feed(b"out\n")
    console.note("[zlh] process exited with code 1")
    console.note("two\nlines \ud800")
    assert texts(console) == [
        "out", "[zlh] process exited with code 1", "two", "lines ?"
    ]


# -- long lines ----------------------------------------------------------------------------


def test_streamed_one_mib_line_is_capped_in_bounded_memory(tmp_path: Path) -> None:
    console = Console("game", tmp_path)
    big = b"x" * 2**20
    tracemalloc.start()
    for i in range(0, len(big), 4096):
        console.feed(big[i : i + 4096])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    console.feed(b"\r\nnext\n")

    first, second = console.read()
    assert isinstance(first, ConsoleLine) and isinstance(second, ConsoleLine)
    assert first.text == "x" * 65_536 + TRUNCATED_MARKER.format(2**20 - 65_536)
    assert (second.seq, second.text) == (1, "next")
    assert peak < 2**19, f"feeding a long line held {peak} bytes"


def test_long_line_inside_one_chunk_is_capped(tmp_path: Path) -> None:
    console = Console("game", tmp_path, max_line=100)
    console.feed(b"before\n" + b"y" * 1000 + b"\r\nafter\n")
    assert texts(console) == [
        "before", "y" * 100 + TRUNCATED_MARKER.format(900), "after"
    ]


def test_line_of_exactly_max_line_bytes_is_whole(tmp_path: Path) -> None:
    console = Console("game", tmp_path, max_line=10)
    console.feed(b"0123456789\r")  # the CR is the line end, not an 11th byte
    console.feed(b"\n0123456789\n")
    assert texts(console) == ["0123456789", "0123456789"]


def test_cap_does_not_cut_a_character_in_half(tmp_path: Path) -> None:
    console = Console("game", tmp_path, max_line=10)
    console.feed("aaaaaaaaa€b\n".encode())  # the euro sign spans bytes 9..11
    assert texts(console) == ["aaaaaaaaa" + TRUNCATED_MARKER.format(4)]


# -- ring and log files ----------------------------------------------------------------


def test_log_file_holds_one_record_per_line(tmp_path: Path) -> None:
    console = Console("game", tmp_path)
    console.feed(b"a\tb\nc\n")
    ts = lines_of(console.read())[0].ts
    assert log_lines(tmp_path / "game.log") == [
        ["0", f"{ts:.6f}", "a\tb"], ["1", f"{ts:.6f}", "c"]
    ]


def test_reader_behind_a_small_ring_is_served_from_the_file(tmp_path: Path) -> None:
    console = Console("game", tmp_path, ring_size=10)
    console.feed(numbered(0, 100))

    records = lines_of(console.read(after=4, limit=20))
    assert [(r.seq, r.text) for r in records] == [(i, f"line {i}") for i in range(5, 25)]
    assert texts(console, after=85) == [f"line {i}" for i in range(86, 100)]


def test_lines_read_back_from_the_file_equal_the_lines_in_the_ring(tmp_path: Path) -> None:
    data = MIXED + b"ok \xff\xfe end\n\xe2\x82\nt\tab\n" + numbered(0, 3000)
    in_ring = Console("ring", tmp_path)
    in_file = Console("file", tmp_path, ring_size=1)
    for console in (in_ring, in_file):
        console.feed(data[:5000])  # two reads: lines of one read share their timestamp
        console.feed(data[5000:])

    from_ring, from_file = in_ring.read(limit=10_000), in_file.read(limit=10_000)
    assert [r.text for r in lines_of(from_file)] == [r.text for r in lines_of(from_ring)]
    # The last line comes from the ring, the one before it from the file: same read,
    # same timestamp; the file's lines carry the timestamps of the two reads.
    assert from_file[-2].ts == from_file[-1].ts
    assert len({r.ts for r in lines_of(from_file)}) == 2


def test_unparsable_records_in_the_file_are_skipped(tmp_path: Path) -> None:
    first = Console("game", tmp_path, ring_size=1)
    first.feed(numbered(0, 2))
    first.close()
    with open(tmp_path / "game.log", "ab") as log:
        log.write(b"x\t1.0\tbad seq\n2\tnot-a-time\tbad ts\nno tabs\n2\t1.5\tline 2\n")

    second = Console("game", tmp_path, ring_size=1)
    assert [(r.seq, r.text) for r in lines_of(second.read())] == [
        (0, "line 0"), (1, "line 1"), (2, "line 2")
    ]


def test_rotation_keeps_reading_across_files(tmp_path: Path) -> None:
    console = Console("game", tmp_path, ring_size=5, log_max_bytes=800, log_backups=3)
    for i in range(100):
        console.feed(b"line %d\n" % i)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "game.log", "game.log.1", "game.log.2", "game.log.3"
    ]
    assert all(p.stat().st_size <= 800 for p in tmp_path.iterdir())
    assert texts(console) == [f"line {i}" for i in range(100)]
    assert texts(console, after=40, limit=30) == [f"line {i}" for i in range(41, 71)]


def test_reader_behind_ring_and_files_gets_one_gap(tmp_path: Path) -> None:
    console = Console("game", tmp_path, ring_size=5, log_max_bytes=200, log_backups=1)
    for i in range(100):
        console.feed(b"line %d\n" % i)

    kept = texts(console)  # after=-1: from the oldest kept line, no gap
    oldest = 100 - len(kept)
    assert 5 < len(kept) < 100
    assert kept == [f"line {i}" for i in range(oldest, 100)]

    gap, line, *_ = console.read(after=2)
    assert gap == ConsoleGap(seq=3, lost=oldest - 3)
    assert isinstance(line, ConsoleLine) and line.seq == oldest


def test_seq_continues_after_reopening_the_log_dir(tmp_path: Path) -> None:
    first = Console("game", tmp_path, log_max_bytes=100)
    first.feed(numbered(0, 30))
    before = first.read()
    first.close()

    second = Console("game", tmp_path, log_max_bytes=100)
    assert second.last_seq == 29
    assert second.read() == before  # same seq, ts and text, served from the files

    second.feed(b"again\n")
    again = lines_of(second.read(after=29))
    assert [(r.seq, r.text) for r in again] == [(30, "again")]
    assert second.read(after=28) == [before[-1], *again]


def test_torn_last_record_is_cut_on_reopen(tmp_path: Path) -> None:
    first = Console("game", tmp_path)
    first.feed(numbered(0, 3))
    first.close()
    with open(tmp_path / "game.log", "ab") as log:
        log.write(b"3\t1.0\thalf a rec")  # a crash in the middle of a write

    second = Console("game", tmp_path)
    assert second.last_seq == 2
    second.feed(b"next\n")
    assert [(f[0], f[2]) for f in log_lines(tmp_path / "game.log")] == [
        ("0", "line 0"), ("1", "line 1"), ("2", "line 2"), ("3", "next")
    ]
    assert texts(second) == ["line 0", "line 1", "line 2", "next"]


def test_read_respects_limit(tmp_path: Path) -> None:
    console = Console("game", tmp_path, ring_size=4)
    console.feed(numbered(0, 10))
    assert [r.seq for r in console.read(limit=3)] == [0, 1, 2]
    assert [r.seq for r in console.read(after=5, limit=3)] == [6, 7, 8]
    assert console.read(limit=0) == []
    assert console.read(after=9) == []


def test_ring_reads_from_either_end_are_exact(tmp_path: Path) -> None:
    console = Console("game", tmp_path, ring_size=100)
    console.feed(numbered(0, 150))  # the ring holds 50..149
    for after, limit in [(59, 5), (120, 5), (120, 100), (148, 5), (49, 3), (98, 1)]:
        want = list(range(after + 1, min(after + 1 + limit, 150)))
        assert [r.seq for r in console.read(after, limit)] == want, (after, limit)


def test_tail_gives_the_last_texts(tmp_path: Path) -> None:
    console = Console("game", tmp_path, ring_size=5)
    console.feed(numbered(0, 8))
    assert console.tail(3) == ["line 5", "line 6", "line 7"]
    assert console.tail(50) == [f"line {i}" for i in range(3, 8)]
    assert console.tail(0) == []


def test_subscribers_get_each_batch_until_unsubscribed(tmp_path: Path) -> None:
    console = Console("game", tmp_path)
    batches: list[list[tuple[int, float, str]]] = []

    def broken(batch: list[tuple[int, float, str]]) -> None:
        raise RuntimeError("probe bug")

    console.subscribe(broken)
    unsubscribe = console.subscribe(batches.append)
    console.feed(b"a\nb\npart")
    console.flush_partial()
    unsubscribe()
    console.feed(b"c\n")

    assert [[(seq, text) for seq, _, text in batch] for batch in batches] == [
        [(0, "a"), (1, "b")], [(2, "part")]
    ]
    assert texts(console) == ["a", "b", "part", "c"]


# -- followers -----------------------------------------------------------------------------


async def _follow_until(
    console: Console, end: int, produce: asyncio.Task[None], slow: bool
) -> Records:
    """Every record a follower from the start gets until it has covered seq `end - 1`."""
    records: Records = []
    covered = 0
    stream = console.follow()
    async for rec in stream:
        records.append(rec)
        covered = rec.seq + 1 if isinstance(rec, ConsoleLine) else rec.seq + rec.lost
        if covered >= end:
            break
        if slow:
            await asyncio.sleep(0)  # the producer gets a turn after every record
    await stream.aclose()
    await produce
    return records


async def _produce(console: Console, total: int, per_chunk: int) -> None:
    for start in range(0, total, per_chunk):
        console.feed(numbered(start, start + per_chunk))
        await asyncio.sleep(0)  # let followers run, as the PTY reader would between reads


def _check_no_silent_loss(records: Records, total: int) -> int:
    """Records cover 0..total-1 in order, lines carry their own text; returns the gaps."""
    expected, gaps = 0, 0
    for rec in records:
        assert rec.seq == expected, f"expected seq {expected}, got {rec}"
        if isinstance(rec, ConsoleGap):
            assert rec.lost > 0
            expected += rec.lost
            gaps += 1
        else:
            assert rec.text == f"line {rec.seq}"
            expected += 1
    assert expected == total
    return gaps


def _follow_run(console: Console, total: int, per_chunk: int, slow: bool = False) -> Records:
    async def main() -> Records:
        produce = asyncio.create_task(_produce(console, total, per_chunk))
        return await asyncio.wait_for(_follow_until(console, total, produce, slow), 60)

    return asyncio.run(main())


def test_follow_receives_every_line(tmp_path: Path) -> None:
    console = Console("game", tmp_path)
    records = _follow_run(console, 200_000, 1000)
    assert _check_no_silent_loss(records, 200_000) == 0
    assert len(records) == 200_000


def test_follower_that_falls_behind_gets_gaps_that_add_up(tmp_path: Path) -> None:
    console = Console("game", tmp_path, ring_size=100, log_max_bytes=4096, log_backups=1)
    records = _follow_run(console, 200_000, 100, slow=True)
    gaps = _check_no_silent_loss(records, 200_000)
    assert gaps > 0
    assert 0 < len(records) - gaps < 200_000


@pytest.mark.parametrize("ring_size", [100_000, 1], ids=["from-ring", "from-files"])
def test_follow_batches_of_long_lines_are_bounded_in_characters(
    tmp_path: Path, ring_size: int
) -> None:
    long = 60_000
    console = Console("game", tmp_path, ring_size=ring_size, log_max_bytes=2**30)
    for i in range(100):
        console.feed(b"%05d" % i + b"x" * (long - 5) + b"\n")

    async def main() -> list[list[console_mod.Record]]:
        batches = []
        stream = console.follow_batches()
        async for batch in stream:
            batches.append(batch)
            if batch[-1][0] == 99:
                break
        await stream.aclose()
        return batches

    batches = asyncio.run(main())
    seqs = [rec[0] for batch in batches for rec in batch]
    assert seqs == list(range(100))  # every line, in order, no gap
    assert len(batches) > 1
    most = console_mod._FOLLOW_CHARS + long
    assert all(sum(len(rec[2]) for rec in batch) <= most for batch in batches)


def test_follow_waits_for_new_lines_and_resumes_after_a_seq(tmp_path: Path) -> None:
    console = Console("game", tmp_path)
    console.feed(b"old 0\nold 1\n")

    async def main() -> list[str]:
        stream = console.follow(after=0)
        got = [await anext(stream)]
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        assert not pending.done()  # nothing new yet: the follower waits
        console.feed(b"new 2\n")
        got.append(await asyncio.wait_for(pending, 5))
        await stream.aclose()
        return [rec.text for rec in got if isinstance(rec, ConsoleLine)]

    assert asyncio.run(main()) == ["old 1", "new 2"]


# -- log write failures --------------------------------------------------------------------


def test_disk_full_keeps_the_ring_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert os.path.exists("/dev/full"), "needs the kernel's /dev/full device (every Linux has it)"
    log = tmp_path / "game.log"
    log.symlink_to("/dev/full")  # every write fails with ENOSPC
    console = Console("game", tmp_path)

    with caplog.at_level(logging.WARNING, logger="agentd.console"):
        for i in range(5):
            console.feed(b"full %d\n" % i)
    assert console.log_error is not None and "No space left" in console.log_error
    assert texts(console) == [f"full {i}" for i in range(5)]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

    log.unlink()
    console.feed(b"space again\n")
    assert console.log_error is None
    assert log_lines(log) == [["5", log_lines(log)[0][1], "space again"]]


class _FailingLog(io.FileIO):
    """A log file whose writes store half the data, then fail as on a full disk."""

    failing = True

    def write(self, data: object) -> int:
        if not _FailingLog.failing:
            return super().write(data)  # type: ignore[arg-type]  # bytes-like by contract
        super().write(bytes(data)[: len(bytes(data)) // 2])  # type: ignore[call-overload]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_failed_writes_leave_whole_records_and_an_explicit_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console_mod, "_open_log", lambda path: _FailingLog(path, "a+b"))
    monkeypatch.setattr(_FailingLog, "failing", False)
    console = Console("game", tmp_path, ring_size=3)
    console.feed(numbered(0, 3))

    _FailingLog.failing = True
    for i in range(3, 9):
        console.feed(numbered(i, i + 1))
    assert console.log_error is not None and "No space left" in console.log_error
    # 0..2 come from the file, 6..8 from the ring; 3..5 are nowhere any more.
    assert [(r.seq, r.text) if isinstance(r, ConsoleLine) else r for r in console.read()] == [
        (0, "line 0"), (1, "line 1"), (2, "line 2"), ConsoleGap(seq=3, lost=3),
        (6, "line 6"), (7, "line 7"), (8, "line 8"),
    ]

    _FailingLog.failing = False
    console.feed(numbered(9, 21))
    assert console.log_error is None
    assert [int(f[0]) for f in log_lines(tmp_path / "game.log")] == [*range(3), *range(9, 21)]
    records = console.read()
    assert records[3] == ConsoleGap(seq=3, lost=6)
    assert [r.seq for r in records if isinstance(r, ConsoleLine)] == [*range(3), *range(9, 21)]
