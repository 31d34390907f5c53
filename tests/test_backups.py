"""World backups through a real agent: quiesce, archive, restore, retention and faults.

The game is tests/programs/save_server.py: it saves like Minecraft (save-off, save-all
flush -> "Saved the game", save-on) and rewrites region-like files in two halves while
saving is on, so an unquiesced copy can hold a torn file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard

from agentd.archive import Excluder, write_archive
from agentd.backup_models import BackupRecord, KeepPolicy
from agentd.retention import plan
from tests.agentfix import PROGRAMS, AgentProcess, poll
from tests.programs.save_server import torn

SAVE = str(PROGRAMS / "save_server.py")
QUIESCE = [{"send": "save-off"}, {"send": "save-all flush"},
           {"wait_for": "Saved the game", "timeout": 20}]


def game(*args: str, **extra: Any) -> dict[str, Any]:
    return {"name": "game", "argv": [sys.executable, "-u", SAVE, *args],
            "stop": {"command": "stop", "grace": 5},
            "readiness": {"type": "log", "pattern": "Done"},
            "restart": {"policy": "on-failure", "backoff_initial": 0.2}, **extra}


def put_server(agent: AgentProcess, process: dict[str, Any], **backup: Any) -> None:
    policy = {"paths": ["world/"], "quiesce": QUIESCE, "resume": ["save-on"], **backup}
    spec = {"playbook": "save-test", "processes": [process], "backup": policy}
    answer = agent.client.put("/v1/spec", json=spec)
    assert answer.status_code == 200, answer.text
    agent.wait_state("game", "running")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path / "box").start()
    yield proc
    proc.stop()


def world(agent: AgentProcess) -> Path:
    return agent.root / "srv" / "world"


def backups_dir(agent: AgentProcess) -> Path:
    return agent.state / "backups"


def run_backup(agent: AgentProcess, **body: Any) -> dict[str, Any]:
    answer = agent.client.post("/v1/backups", json=body, timeout=120)
    assert answer.status_code == 201, answer.text
    return answer.json()["backup"]


def archive_members(path: Path) -> dict[str, bytes]:
    with open(path, "rb") as handle:
        raw = zstandard.ZstdDecompressor().stream_reader(handle).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        # extractfile() gives a file for every regular member (isfile() is checked).
        files = [m for m in tar if m.isfile()]
        return {m.name: tar.extractfile(m).read() for m in files}  # type: ignore[union-attr]


def tree_hashes(folder: Path) -> dict[str, str]:
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            found[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[rel] = "dir"
    return found


def console_after(agent: AgentProcess, text: str, after: int = -1) -> bool:
    return any(text in r.get("text", "") for r in agent.console("game", after))


def last_seq(agent: AgentProcess) -> int:
    records = agent.console("game")
    return records[-1]["seq"] if records else -1


# -- quiesce and consistency -----------------------------------------------------------


def test_quiesced_backup_never_holds_a_half_written_file(agent: AgentProcess) -> None:
    put_server(agent, game("--files", "12", "--size", "262144", "--gap", "0.003"))
    for _ in range(3):
        before = last_seq(agent)
        record = run_backup(agent)
        assert record["result"] == "ok" and record["quiesced"] is True, record
        assert 0 < record["quiesced_seconds"] < record["duration"] + 0.001
        members = archive_members(backups_dir(agent) / f"{record['id']}.tar.zst")
        regions = {k: v for k, v in members.items() if "/region/" in k}
        assert len(regions) == 12
        assert [name for name, data in regions.items() if torn(data)] == []
        manifest = json.loads(members[".zlh-manifest.json"])
        assert {k: v["sha256"] for k, v in manifest["files"].items()} == {
            k: hashlib.sha256(v).hexdigest() for k, v in regions.items()}
        texts = [r["text"] for r in agent.console("game", before) if "text" in r]
        order = [t for t in texts if t in ("Automatic saving is now disabled", "Saved the game",
                                           "Automatic saving is now enabled")]
        assert order == ["Automatic saving is now disabled", "Saved the game",
                         "Automatic saving is now enabled"]
    region = world(agent) / "region" / "r.0.mca"
    stamp = region.stat().st_mtime_ns
    poll(lambda: region.stat().st_mtime_ns != stamp, 10, "writing to resume after save-on")


def test_stopped_server_is_archived_without_quiescing(agent: AgentProcess) -> None:
    put_server(agent, game("--files", "2"))
    agent.action("game", "stop")
    agent.wait_state("game", "stopped")
    before = last_seq(agent)
    record = run_backup(agent)
    assert record["result"] == "ok" and record["quiesced"] is False
    assert not console_after(agent, "Automatic saving", before)


# -- restore ---------------------------------------------------------------------------


def fill_world(root: Path) -> None:
    (root / "region").mkdir(parents=True, exist_ok=True)
    (root / "data" / "deep" / "er").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "cache").mkdir()
    (root / "region" / "r.0.0.mca").write_bytes(os.urandom(300_000))
    (root / "data" / "deep" / "er" / "level.dat").write_bytes(b"level" * 1000)
    (root / "data" / "zero.bin").write_bytes(b"")
    (root / "data" / "private.txt").write_text("secret")
    os.chmod(root / "data" / "private.txt", 0o600)
    (root / "data" / "link").symlink_to("deep/er/level.dat")
    (root / "session.lock").write_text("locked")
    (root / "cache" / "big.tmp").write_bytes(b"c" * 1000)
    (root / "scratch.tmp").write_text("tmp")


def test_restore_round_trip_compares_every_file(agent: AgentProcess) -> None:
    fill_world(world(agent))
    put_server(agent, game("--files", "0"), exclude=["cache/", "*.tmp"])
    original = tree_hashes(world(agent))
    record = run_backup(agent)
    assert record["result"] == "ok" and record["files"] == 4, record

    (world(agent) / "region" / "r.0.0.mca").write_bytes(b"changed")
    (world(agent) / "data" / "zero.bin").unlink()
    (world(agent) / "new.txt").write_text("new")
    answer = agent.client.post(f"/v1/backups/{record['id']}/restore", json={}, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["ready"] is True

    excluded = {"session.lock", "cache", "cache/big.tmp", "scratch.tmp"}
    expected = {k: v for k, v in original.items() if k not in excluded}
    assert tree_hashes(world(agent)) == expected
    assert oct((world(agent) / "data" / "private.txt").stat().st_mode & 0o777) == "0o600"
    assert agent.process("game")["ready"] is True
    leftovers = [p.name for p in (agent.root / "srv").iterdir() if p.name.startswith(".zlh")]
    assert leftovers == []


def test_names_that_are_not_utf8_are_listed_shown_and_restored_exactly(agent) -> None:
    folder = os.fsencode(world(agent))
    os.makedirs(folder)
    with open(folder + b"/bad\xfe.dat", "wb") as handle:
        handle.write(b"kept")
    os.mkfifo(folder + b"/fifo\xff")  # skipped, so its name goes into the record
    put_server(agent, game("--files", "0"))

    record = run_backup(agent)
    assert record["result"] == "ok" and record["skipped"] == ["world/fifo\\xff"], record
    listed = agent.client.get("/v1/backups")
    assert listed.status_code == 200, listed.text
    assert listed.json()["backups"][-1]["skipped"] == ["world/fifo\\xff"]
    files = agent.client.get("/v1/files", params={"path": "world"})
    assert files.status_code == 200, files.text
    assert sorted(e["name"] for e in files.json()["entries"]) == \
        ["bad\\xfe.dat", "fifo\\xff", "region"]

    os.unlink(folder + b"/bad\xfe.dat")
    answer = agent.client.post(f"/v1/backups/{record['id']}/restore", json={}, timeout=120)
    assert answer.status_code == 200, answer.text
    with open(folder + b"/bad\xfe.dat", "rb") as handle:
        assert handle.read() == b"kept"


def test_restore_puts_the_previous_world_back_when_the_restored_one_does_not_boot(
        agent: AgentProcess) -> None:
    (world(agent)).mkdir(parents=True)
    put_server(agent, game("--files", "0", "--fail-if", "BROKEN"))
    agent.action("game", "stop")
    (world(agent) / "BROKEN").write_text("this world does not boot")
    record = run_backup(agent)
    (world(agent) / "BROKEN").unlink()
    agent.action("game", "start")
    agent.wait_state("game", "running")
    (world(agent) / "current.txt").write_text("the world before the restore")

    answer = agent.client.post(f"/v1/backups/{record['id']}/restore", json={"timeout": 20},
                               timeout=120)
    assert answer.status_code == 500, answer.text
    message = answer.json()["error"]["message"]
    assert "did not come up" in message and "the previous world is back" in message
    assert "it is ready again" in message
    assert (world(agent) / "current.txt").read_text() == "the world before the restore"
    assert not (world(agent) / "BROKEN").exists()
    assert agent.wait_state("game", "running")["ready"] is True


def corrupt_flip(archive: Path, record: dict[str, Any], index: Path) -> None:
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))


def corrupt_rehashed(archive: Path, record: dict[str, Any], index: Path) -> None:
    # A well-formed archive whose file does not match its manifest, with the record's
    # sha256 updated to match it: only the manifest check can catch this one.
    with open(archive, "rb") as handle:
        raw = zstandard.ZstdDecompressor().stream_reader(handle).read()
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src:
            # A regular member always has a file to read.
            handle = src.extractfile(member) if member.isfile() else None
            data = handle.read() if handle is not None else None
            if data is not None and member.name.endswith("level.dat"):
                data = b"X" * len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
    archive.write_bytes(zstandard.ZstdCompressor().compress(out.getvalue()))
    set_record_sha(index, record["id"], hashlib.sha256(archive.read_bytes()).hexdigest())


def corrupt_truncated(archive: Path, record: dict[str, Any], index: Path) -> None:
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    set_record_sha(index, record["id"], hashlib.sha256(archive.read_bytes()).hexdigest())


def set_record_sha(index: Path, backup_id: str, sha: str) -> None:
    body = json.loads(index.read_text())
    for item in body["backups"]:
        if item["id"] == backup_id:
            item["sha256"] = sha
    index.write_text(json.dumps(body))


@pytest.mark.parametrize("corrupt", [corrupt_flip, corrupt_rehashed, corrupt_truncated],
                         ids=["flipped-byte", "file-differs-from-manifest", "truncated"])
def test_corrupted_archive_is_refused_and_the_world_is_untouched(agent, corrupt) -> None:
    fill_world(world(agent))
    put_server(agent, game("--files", "0"))
    record = run_backup(agent)
    (world(agent) / "after.txt").write_text("written after the backup")
    before, pid = tree_hashes(world(agent)), agent.process("game")["pid"]
    corrupt(backups_dir(agent) / f"{record['id']}.tar.zst", record, backups_dir(agent) /
            "index.json")

    answer = agent.client.post(f"/v1/backups/{record['id']}/restore", json={}, timeout=60)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "corrupt"
    assert "nothing was changed" in answer.json()["error"]["message"]
    assert tree_hashes(world(agent)) == before
    assert agent.process("game")["pid"] == pid
    assert not any(p.name.startswith(".zlh") for p in (agent.root / "srv").iterdir())


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x",
            link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (data if kind == tarfile.REGTYPE else None)


UNSAFE = {
    "dotdot": [_member("world/../../x")],
    "absolute": [_member("/tmp/zlh-evil-x")],
    "symlink-out": [_member("world/link", tarfile.SYMTYPE, link="../../../..")],
    "symlink-then-write": [_member("world/up", tarfile.SYMTYPE, link=".."),
                           _member("world/up/up/x")],
    "absolute-link": [_member("world/etc", tarfile.SYMTYPE, link="/etc")],
    "hardlink": [_member("world/h", tarfile.LNKTYPE, link="/etc/passwd")],
    "device": [_member("world/dev", tarfile.CHRTYPE)],
}


def install_archive(agent: AgentProcess, backup_id: str,
                    members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    archive = backups_dir(agent) / f"{backup_id}.tar.zst"
    archive.write_bytes(zstandard.ZstdCompressor().compress(out.getvalue()))
    record = BackupRecord(id=backup_id, seq=99, time=time.time(), result="ok",
                          size=archive.stat().st_size,
                          sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    index = backups_dir(agent) / "index.json"
    body = (json.loads(index.read_text()) if index.exists()
            else {"next_seq": 100, "backups": []})
    body["backups"].append(record.model_dump())
    index.write_text(json.dumps(body))


@pytest.mark.parametrize("case", list(UNSAFE), ids=list(UNSAFE))
def test_archive_with_a_path_out_of_the_world_is_refused(agent, case) -> None:
    fill_world(world(agent))
    put_server(agent, game("--files", "0"))
    before = tree_hashes(agent.root)
    install_archive(agent, "20240101T000000Z-99", UNSAFE[case])

    answer = agent.client.post("/v1/backups/20240101T000000Z-99/restore", json={}, timeout=60)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "corrupt"
    after = tree_hashes(agent.root)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert {k for k in changed if not k.startswith(("state/", "agentd.log"))} == set()
    assert not Path("/tmp/zlh-evil-x").exists() and not (agent.root / "x").exists()
    assert agent.process("game")["state"] == "running"


# -- one operation at a time -----------------------------------------------------------


def test_restore_and_power_actions_are_refused_while_a_backup_runs(agent) -> None:
    fill_world(world(agent))
    put_server(agent, game("--files", "2", "--save-delay", "3"))
    first = run_backup(agent)
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(
        agent.client.post("/v1/backups", json={}, timeout=60)))
    thread.start()
    try:
        poll(lambda: agent.client.get("/v1/backups").json()["running"], 10, "the backup")
        restore = agent.client.post(f"/v1/backups/{first['id']}/restore", json={})
        assert restore.status_code == 409, restore.text
        assert "a backup is under way" in restore.json()["error"]["message"]
        for verb in ("stop", "restart", "start"):
            refused = agent.action("game", verb)
            assert refused.status_code == 409, (verb, refused.text)
            assert f"{verb} is refused until it ends" in refused.json()["error"]["message"]
        second = agent.client.post("/v1/backups", json={})
        assert second.status_code == 409
    finally:
        thread.join(60)
    assert results[0].status_code == 201, results[0].text
    assert agent.process("game")["state"] == "running"


# -- faults ----------------------------------------------------------------------------


def test_agent_killed_mid_backup_counts_no_partial_and_unquiesces_on_start(agent) -> None:
    (world(agent)).mkdir(parents=True)
    with open(world(agent) / "big.bin", "wb") as handle:
        handle.writelines(os.urandom(4 * 2**20) for _ in range(48))
    put_server(agent, game("--files", "4"))
    sender = threading.Thread(target=lambda: _quietly(
        lambda: agent.client.post("/v1/backups", json={}, timeout=60)))
    sender.start()
    poll(lambda: list(backups_dir(agent).glob(".partial-*")), 30, "a partial archive")
    assert (backups_dir(agent) / "quiesce.json").exists()
    agent.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    agent.proc.wait(10)  # type: ignore[union-attr]
    sender.join(30)
    region = world(agent) / "region" / "r.0.mca"
    quiet_since = region.stat().st_mtime_ns

    seq = last_seq_from_log(agent)
    agent.start()
    poll(lambda: console_after(agent, "Automatic saving is now enabled", seq), 30,
         "save-on after the agent restarted")
    poll(lambda: region.stat().st_mtime_ns != quiet_since, 10, "the world to be written again")
    assert list(backups_dir(agent).glob(".partial-*")) == []
    assert not (backups_dir(agent) / "quiesce.json").exists()
    listed = agent.client.get("/v1/backups").json()["backups"]
    assert [b["result"] for b in listed] == ["failed"]
    assert "interrupted" in listed[0]["error"]
    record = run_backup(agent)
    assert record["result"] == "ok"
    kept = agent.client.post("/v1/backups/prune", json={"keep_last": 5, "dry_run": True}).json()
    assert [e["id"] for e in kept["keep"]] == [record["id"]]


def last_seq_from_log(agent: AgentProcess) -> int:
    lines = (agent.state / "console" / "game.log").read_text().splitlines()
    return int(lines[-1].split("\t")[0]) if lines else -1


def _quietly(call: Any) -> None:
    # The agent is killed under this request on purpose: no answer is the expected end.
    with contextlib.suppress(httpx.HTTPError):
        call()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("the full-disk test mounts a tmpfs: run it as root (as .ci/run does)")
    folder = tmp_path / "box" / "state" / "backups"
    folder.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], check=True)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_full_disk_fails_cleanly_keeps_older_backups_and_resumes(small_disk, tmp_path) -> None:
    agent = AgentProcess(tmp_path / "box").start()
    try:
        (agent.root / "srv" / "world").mkdir(parents=True)
        put_server(agent, game("--files", "2", "--size", "65536"))
        older = run_backup(agent)
        older_path = small_disk / f"{older['id']}.tar.zst"
        with open(world(agent) / "big.bin", "wb") as handle:
            handle.write(os.urandom(3 * 2**20))
        before = last_seq(agent)

        answer = agent.client.post("/v1/backups", json={"prune": {"keep_last": 1}}, timeout=60)
        assert answer.status_code == 500, answer.text
        message = answer.json()["error"]["message"]
        assert "no space left on device" in message and "no prune ran" in message
        assert "the server was resumed" in message
        assert hashlib.sha256(older_path.read_bytes()).hexdigest() == older["sha256"]
        assert sorted(p.name for p in small_disk.iterdir() if not p.name.startswith("index")) \
            == sorted([older_path.name, f"{older['id']}.manifest.json"])
        assert console_after(agent, "Automatic saving is now enabled", before)
        listed = agent.client.get("/v1/backups").json()["backups"]
        assert [b["result"] for b in listed] == ["ok", "failed"]
    finally:
        agent.stop()


# -- retention -------------------------------------------------------------------------

HOUR = 3600.0
DAY = 24 * HOUR
T0 = 1_700_000_000.0 - (1_700_000_000.0 % DAY)  # a UTC midnight


def rec(seq: int, when: float, result: str = "ok") -> BackupRecord:
    return BackupRecord(id=f"b{seq}", seq=seq, time=when, result=result)  # type: ignore[arg-type]


def kept(records: list[BackupRecord], **policy: int) -> list[str]:
    return [e.id for e in plan(records, KeepPolicy(**policy), True).keep]


def test_keep_daily_keeps_the_newest_of_each_day_like_restic() -> None:
    records = [rec(i + 1, T0 + i * 6 * HOUR) for i in range(12)]  # 4 a day, 3 days
    assert kept(records, keep_daily=2) == ["b8", "b12"]
    assert kept(records, keep_last=2, keep_daily=3) == ["b4", "b8", "b11", "b12"]
    assert kept(records, keep_hourly=3) == ["b10", "b11", "b12"]


def test_failed_and_partial_never_count_and_go() -> None:
    records = [rec(1, T0), rec(2, T0 + HOUR, "failed"), rec(3, T0 + 2 * HOUR, "partial"),
               rec(4, T0 + 3 * HOUR), rec(5, T0 + 4 * HOUR, "failed")]
    result = plan(records, KeepPolicy(keep_last=2), True)
    assert [e.id for e in result.keep] == ["b1", "b4"]
    assert {e.id: e.reasons for e in result.remove} == {
        "b2": ["failed"], "b3": ["partial"], "b5": ["failed"]}


def test_a_partial_newer_than_the_newest_good_backup_is_kept() -> None:
    records = [rec(1, T0), rec(2, T0 + HOUR, "partial")]
    assert kept(records, keep_last=1) == ["b1", "b2"]


@pytest.mark.parametrize("jump", [-30 * DAY, -HOUR, 400 * DAY],
                         ids=["back-a-month", "back-an-hour", "forward-a-year"])
def test_clock_that_jumps_never_loses_the_newest_backup(jump: float) -> None:
    records = [rec(i + 1, T0 + i * DAY) for i in range(5)]
    records.append(rec(6, T0 + 4 * DAY + jump))  # taken last, stamped by a wrong clock
    result = plan(records, KeepPolicy(keep_last=2), True)
    keep = {e.id: e.reasons for e in result.keep}
    assert "b6" in keep and "newest" in keep["b6"]
    assert len(result.keep) in (2, 3)


def test_prune_through_the_agent_dry_run_then_real(agent: AgentProcess) -> None:
    fill_world(world(agent))
    put_server(agent, game("--files", "0"))
    ids = [run_backup(agent)["id"] for _ in range(3)]
    dry = agent.client.post("/v1/backups/prune", json={"keep_last": 1, "dry_run": True}).json()
    assert [e["id"] for e in dry["remove"]] == ids[:2]
    assert all((backups_dir(agent) / f"{i}.tar.zst").exists() for i in ids)

    done = agent.client.post("/v1/backups/prune", json={"keep_last": 1}).json()
    assert [e["id"] for e in done["remove"]] == ids[:2]
    assert sorted(p.name for p in backups_dir(agent).glob("*.tar.zst")) == [f"{ids[2]}.tar.zst"]
    empty = agent.client.post("/v1/backups/prune", json={})
    assert empty.status_code == 422


def test_no_prune_after_a_failed_backup(agent: AgentProcess) -> None:
    fill_world(world(agent))
    put_server(agent, game("--files", "0"))
    good = [run_backup(agent)["id"] for _ in range(2)]
    put_server(agent, game("--files", "0", "--save-delay", "5"),
               quiesce=[{"send": "save-all flush"},
                        {"wait_for": "Saved the game", "timeout": 0.5}])
    failed = agent.client.post("/v1/backups", json={"prune": {"keep_last": 1}}, timeout=60)
    assert failed.status_code == 500 and "quiesce: no console line matched" in failed.text
    refused = agent.client.post("/v1/backups/prune", json={"keep_last": 1})
    assert refused.status_code == 409 and "failed" in refused.json()["error"]["message"]
    assert all((backups_dir(agent) / f"{i}.tar.zst").exists() for i in good)


def test_download_streams_the_archive_with_its_sha256(agent: AgentProcess) -> None:
    fill_world(world(agent))
    put_server(agent, game("--files", "0"))
    record = run_backup(agent)
    answer = agent.client.get(f"/v1/backups/{record['id']}")
    assert answer.status_code == 200
    assert answer.headers["x-sha256"] == record["sha256"]
    assert hashlib.sha256(answer.content).hexdigest() == record["sha256"]
    assert agent.client.get("/v1/backups/20990101T000000Z-1").status_code == 404
    assert agent.client.get("/v1/backups/..%2Fetc").status_code == 404


# -- the archive on its own ------------------------------------------------------------


@pytest.mark.parametrize("pattern,path,is_dir,expected", [
    ("session.lock", "world/session.lock", False, True),
    ("session.lock", "world/session.lock.bak", False, False),
    ("*.tmp", "world/a/b.tmp", False, True),
    ("cache/", "world/cache", True, True),
    ("cache/", "world/cache", False, False),
    ("world/logs", "world/logs", True, True),
    ("world/logs", "other/world/logs", True, False),
    ("**/region/*.bak", "world/DIM1/region/r.bak", False, True),
], ids=["name", "name-prefix", "glob-any-depth", "dir-only", "dir-only-file", "anchored",
        "anchored-elsewhere", "double-star"])
def test_exclude_patterns_are_gitignore_style(pattern, path, is_dir, expected) -> None:
    assert Excluder([pattern]).excluded(path, is_dir) is expected


def test_negated_pattern_brings_a_file_back() -> None:
    rules = Excluder(["*.log", "!keep.log"])
    assert rules.excluded("w/a.log", False) and not rules.excluded("w/keep.log", False)


@pytest.mark.parametrize("change", ["grow", "shrink"], ids=["grows", "shrinks"])
def test_a_file_that_changes_while_read_is_reported(tmp_path, monkeypatch, change) -> None:
    from agentd import archive

    (tmp_path / "world").mkdir()
    target = tmp_path / "world" / "busy.dat"
    target.write_bytes(b"a" * 3_000_000)
    original = archive._FileSource.fill

    def read_and_change(self: Any, view: memoryview) -> int:
        data = original(self, view)
        if not getattr(self, "_changed_once", False):
            self._changed_once = True
            with open(target, "r+b") as handle:
                if change == "grow":
                    handle.seek(0, 2)
                    handle.write(b"more")
                else:
                    handle.truncate(1000)
        return data

    monkeypatch.setattr(archive._FileSource, "fill", read_and_change)
    with open(tmp_path / "out.tar.zst", "wb") as out:
        written = write_archive(tmp_path, ["world"], Excluder([]), out, {"time": 0})
    assert written.changed == ["world/busy.dat"]


def test_archive_reads_back_with_gnu_tar_across_buffer_boundaries(tmp_path: Path) -> None:
    # Headers and small files are packed into the buffers the compressing thread takes;
    # sizes around the buffer's (1 MiB) and tar's block (512) land members across them.
    world = tmp_path / "world"
    (world / "a" / "b").mkdir(parents=True)
    sizes = [0, 1, 511, 512, 513, 2**20 - 700, 2**20, 2**20 + 1, 3 * 2**20 + 17]
    for index, size in enumerate(sizes * 3):
        (world / "a" / f"f{index}.bin").write_bytes(os.urandom(size))
    (world / "a" / "b" / "link").symlink_to("../f1.bin")
    with open(tmp_path / "out.tar.zst", "wb") as out:
        written = write_archive(tmp_path, ["world"], Excluder([]), out, {"time": 0})
    assert written.files == len(sizes) * 3 and written.changed == []
    data = (tmp_path / "out.tar.zst").read_bytes()
    assert written.size == len(data) and written.sha256 == hashlib.sha256(data).hexdigest()

    (tmp_path / "x").mkdir()
    subprocess.run(["tar", "-I", "zstd", "-xf", str(tmp_path / "out.tar.zst"), "-C",
                    str(tmp_path / "x")], check=True)
    extracted = tree_hashes(tmp_path / "x")
    assert extracted.pop(".zlh-manifest.json") == hashlib.sha256(written.manifest).hexdigest()
    assert extracted == {f"world/{k}" if k else "world": v
                         for k, v in {"": "dir", **tree_hashes(world)}.items()}
    manifest = json.loads(written.manifest)
    assert {k: v["sha256"] for k, v in manifest["files"].items()} == {
        k: v for k, v in extracted.items() if v != "dir" and not v.startswith("link:")}


def test_a_read_error_ends_the_archive_and_its_threads(tmp_path, monkeypatch) -> None:
    from agentd import archive

    (tmp_path / "world").mkdir()
    for index in range(3):
        (tmp_path / "world" / f"r.{index}.mca").write_bytes(os.urandom(3 * 2**20))
    calls = []

    def failing_read(self: Any, view: memoryview) -> int:
        calls.append(1)
        if len(calls) == 5:  # mid-way through the second file, a few buffers in flight
            raise OSError(5, "Input/output error")
        return original(self, view)

    original = archive._FileSource.fill
    monkeypatch.setattr(archive._FileSource, "fill", failing_read)
    threads = threading.active_count()
    with open(tmp_path / "out.tar.zst", "wb") as out, pytest.raises(OSError, match="Input"):
        write_archive(tmp_path, ["world"], Excluder([]), out, {"time": 0})
    assert threading.active_count() == threads


def test_a_write_error_reaches_the_caller_and_ends_the_threads(tmp_path: Path) -> None:
    (tmp_path / "world").mkdir()
    for index in range(4):
        (tmp_path / "world" / f"r.{index}.mca").write_bytes(os.urandom(3 * 2**20))

    class FullDisk(io.RawIOBase):
        def __init__(self) -> None:
            self.taken = 0

        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            if self.taken > 2**20:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.taken += len(data)
            return len(data)

    threads = threading.active_count()
    with pytest.raises(OSError, match="No space left"):
        write_archive(tmp_path, ["world"], Excluder([]), FullDisk(), {"time": 0})
    assert threading.active_count() == threads


def test_backup_folder_inside_the_world_is_excluded(tmp_path: Path) -> None:
    (tmp_path / "world" / "backups").mkdir(parents=True)
    (tmp_path / "world" / "level.dat").write_text("x")
    (tmp_path / "world" / "backups" / "old.tar.zst").write_text("y")
    excluder = Excluder([], absolute=[tmp_path / "world" / "backups"])
    with open(tmp_path / "out.tar.zst", "wb") as out:
        written = write_archive(tmp_path, ["world"], excluder, out, {"time": 0})
    assert written.files == 1
    assert "world/backups/old.tar.zst" not in json.loads(written.manifest)["files"]


def teardown_module() -> None:
    shutil.rmtree("/tmp/zlh-evil-x", ignore_errors=True)
