"""A full disk under the agent's state: the console log, the holders' spools and the saved
state live on a 1 MiB tmpfs. The server must keep running, the agent must keep answering
and say what failed, and everything must work again once there is room."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.agentfix import AgentProcess, fake, poll

FILLER = "filler"
FLOOD_LINE = re.compile(r"flood line (\d+) lorem ipsum dolor sit amet consectetur")

# Floods COUNT numbered lines, notes on a file outside the small disk that it is done,
# then echoes its input; `stop` ends it with exit code 0.
FLOODER = """
import sys
count, done = int(sys.argv[1]), sys.argv[2]
out = sys.stdout
for i in range(count):
    out.write(f"flood line {i} lorem ipsum dolor sit amet consectetur\\n")
print("flood done", flush=True)
open(done, "w").close()
for raw in sys.stdin:
    line = raw.strip()
    print("echo " + line, flush=True)
    if line == "stop":
        sys.exit(0)
"""


class Disk:
    """A small tmpfs we mounted; `fill` takes its free space with a file we own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / FILLER

    def available(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Write the filler until `leave` bytes are free, or the disk refuses a byte."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (65536, 4096, 1):
                while self.available() - chunk >= leave:
                    try:
                        os.write(fd, b"\0" * chunk)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        break
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


def end_leftovers(folder: Path) -> None:
    """SIGKILL, by pid, the holders that name `folder` and the programs under them."""
    doomed: list[psutil.Process] = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and str(folder) in " ".join(proc.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                doomed += [proc, *proc.children(recursive=True)]
    for proc in doomed:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(doomed, timeout=10)


@contextlib.contextmanager
def mounted(path: Path, owner: Path, size: str = "1m") -> Iterator[Disk]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs on {path} (these tests run as root): "
                    f"{done.stderr.strip()}", pytrace=False)
    disk = Disk(path)
    try:
        yield disk
    finally:
        disk.free()
        end_leftovers(owner)
        umount = subprocess.run(["umount", str(path)], capture_output=True, text=True,
                                check=False)
        assert umount.returncode == 0, f"umount {path}: {umount.stderr.strip()}"


def flooder(count: int, done: Path, **overrides) -> dict:
    spec = {"name": "game", "argv": [sys.executable, "-c", FLOODER, str(count), str(done)],
            "stop": {"command": "stop", "grace": 10}, "restart": {"policy": "never"}}
    spec.update(overrides)
    return spec


def detail(box: AgentProcess) -> dict:
    response = box.client.get("/v1/processes/game")
    assert response.status_code == 200, response.text
    return response.json()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def flood_numbers(texts: list[str]) -> set[int]:
    """The numbers of the whole flood lines among `texts`."""
    return {int(m[1]) for t in texts if (m := FLOOD_LINE.fullmatch(t))}


def settled(box: AgentProcess, state: str, timeout: float = 20) -> dict:
    """wait_state, with what the agent last said in the failure message."""
    last: dict = {}

    def reached() -> bool:
        last.update(box.process("game"))
        return last["state"] == state

    try:
        poll(reached, timeout, f"game to be {state}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {last}") from None
    return last


@pytest.fixture
def state_disk(tmp_path: Path) -> Iterator[tuple[AgentProcess, Disk]]:
    """An agent whose whole state folder (console logs, holders, saved state) is small."""
    with mounted(tmp_path / "disk", tmp_path) as disk:
        box = AgentProcess(tmp_path / "box", state_dir=str(disk.path), console_ring=200_000)
        box.state = disk.path  # where the fixture looks for the agent's port file
        box.start()
        try:
            yield box, disk
        finally:
            disk.free()  # room for the agent to save its state while it stops
            box.stop()


# -- the console log alone on a full disk ----------------------------------------------


def test_full_disk_under_the_console_log_is_reported_and_logging_resumes(tmp_path):
    root = tmp_path / "box"
    done = tmp_path / "flood-done"
    total = 20_000
    with mounted(root / "state" / "console", tmp_path) as disk:
        box = AgentProcess(root, console_ring=100_000).start()
        try:
            disk.fill()  # before the first line: the log has no page left to write into
            box.put_spec(flooder(total, done))
            poll(done.exists, 60, "the end of the flood")
            poll(lambda: "flood done" in box.console_text("game"), 30, "the last line")

            proc = detail(box)
            assert proc["state"] == "running" and alive(proc["pid"])
            assert "No space left on device" in (proc["console_log_error"] or ""), proc
            assert box.events("console_log_write_failed")
            assert box.client.get("/healthz").status_code == 200
            # The ring keeps every line while the log cannot.
            assert flood_numbers(box.console_text("game")) == set(range(total))

            disk.free()
            box.send("game", "say after")
            log = disk.path / "game.log"
            poll(lambda: log.exists() and "echo say after" in log.read_text(), 20,
                 "the next line in the log file")
            assert detail(box)["console_log_error"] is None
            assert box.events("console_log_recovered")
        finally:
            disk.free()
            box.stop()


# -- console log, spools and saved state on one full disk --------------------------------


def flood_on_a_full_disk(box: AgentProcess, disk: Disk, done: Path, total: int) -> int:
    """Flood until the disk is full, checking the agent answers all along; the pid."""
    disk.fill(leave=256 * 1024)
    box.put_spec(flooder(total, done))
    pid = box.wait_state("game", "running")["pid"]

    def answers_until_done() -> bool:
        assert box.client.get("/v1/status").status_code == 200
        return done.exists()

    poll(answers_until_done, 60, "the end of the flood", every=0.1)
    return pid


def caught_up(box: AgentProcess, disk: Disk) -> None:
    """Make room, then wait for an echo: the agent has read all the flood before it."""
    disk.free()
    box.send("game", "say sync")
    # Matched inside a line: a cut-off flood line may precede it (see the test below).
    poll(lambda: any(t.endswith("echo say sync") for t in box.console_text("game")), 20,
         "the echo after the flood")


def test_flood_on_a_full_state_disk_keeps_server_and_agent_up(state_disk, tmp_path):
    box, disk = state_disk
    pid = flood_on_a_full_disk(box, disk, tmp_path / "flood-done", 60_000)

    proc = detail(box)
    assert proc["state"] == "running" and proc["pid"] == pid and alive(pid)
    assert box.proc.poll() is None and box.client.get("/healthz").status_code == 200
    assert box.events("console_log_write_failed"), "the agent did not say the log failed"

    caught_up(box, disk)
    assert "echo say sync" in (disk.path / "console" / "game.log").read_text()
    assert detail(box)["console_log_error"] is None


def test_output_dropped_on_a_full_disk_is_reported_not_silent(state_disk, tmp_path):
    box, disk = state_disk
    total = 60_000
    flood_on_a_full_disk(box, disk, tmp_path / "flood-done", total)
    caught_up(box, disk)

    records = box.console("game")
    missing = total - len(flood_numbers([r["text"] for r in records if "text" in r]))
    notices = [i for i, r in enumerate(records) if is_notice(r)]
    # A line cut by the hole may stay, if a notice next to it says why; a line made of
    # pieces from both sides of a hole may not.
    others = re.compile(r"flood done|echo say sync|\[zlh\] .*")
    cut = [r["text"] for i, r in enumerate(records)
           if "text" in r and not (FLOOD_LINE.fullmatch(r["text"]) or others.fullmatch(r["text"]))
           and not {i - 1, i + 1} & set(notices)]
    assert (missing == 0 or notices) and not cut, (
        f"{missing} of {total} lines never reached the console, and neither a gap record "
        f"nor a [zlh] line says so; pieces of lines joined across the hole: {cut[:5]}")


def is_notice(record: dict) -> bool:
    """A gap record, or the agent's own line about lost output."""
    text = record.get("text", "")
    return "lost" in record or (text.startswith("[zlh]") and "lost" in text)


@pytest.mark.parametrize("how", ["operator-stop", "in-game-stop"])
def test_stop_while_the_state_disk_is_full_keeps_the_exit_code(state_disk, how):
    box, disk = state_disk
    box.put_spec({"name": "game", "argv": fake(), "stop": {"command": "stop", "grace": 10},
                  "readiness": {"type": "log", "pattern": r"Done \(", "interval": 0.1}})
    pid = box.wait_state("game", "running", ready=True)["pid"]
    disk.fill()

    if how == "operator-stop":
        response = box.action("game", "stop")
        assert response.status_code == 200, response.text
    else:
        assert box.send("game", "stop").status_code == 200
    poll(lambda: not alive(pid), 20, "the game to exit")
    proc = settled(box, "stopped")
    assert proc["last_exit_code"] == 0 and proc["last_crash"] is None, proc
    assert proc["restarts"] == 0

    disk.free()
    assert box.action("game", "start").status_code == 200
    assert box.wait_state("game", "running", ready=True)["pid"] != pid
