"""Start a supervised process through its holder, or find it again after a restart.

The one place the agent starts supervised programs. Each program runs under a small
holder (agentd/holder.py) that owns its PTY, drains it into a spool and records its
exit status, so the program outlives the agent. The child gets a clean environment
with a marker that its descendants inherit, and, when the agent is root, the spec's
user. Files per process, in the holders folder:

    NAME.json            who: holder and program identities (pid + start time), marker
    NAME.sock            the holder's socket: input lines in, tick bytes out
    NAME.spool.OFFSET    raw output segments; NAME.offset: how far the console has read
    NAME.exit            the program's wait status, written by the holder
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import secrets
import select
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from agentd.logs import fields
from agentd.proctree import MARKER_VAR, Identity

log = logging.getLogger(__name__)

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOLDER = Path(__file__).with_name("holder.py")
HOLDER_START_TIMEOUT = 15.0


class SpawnError(Exception):
    """The program could not be started (missing binary, bad cwd, unknown user)."""


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    user: str | None
    env_files: tuple[tuple[str, Path], ...] = ()  # (VAR, absolute path)
    cgroup_procs: Path | None = None  # the child joins this cgroup before exec


def read_env_files(files: tuple[tuple[str, Path], ...]) -> dict[str, str]:
    """Variables whose values live in files (secrets): read by the agent at each spawn,
    before dropping privileges, and never logged."""
    values = {}
    for var, path in files:
        try:
            values[var] = path.read_text().strip()
        except OSError as exc:
            raise SpawnError(f"cannot read {var} from {path}: {exc.strerror}") from None
    return values


_runtime_path: tuple[str, ...] = ()


def set_runtime_path(entries: list[str]) -> None:
    """The active runtimes' PATH folders (agentd/runtimes.py): first in every child's PATH."""
    global _runtime_path
    _runtime_path = tuple(entries)


def canonical_path(runtime: tuple[str, ...] | list[str] | None = None) -> str:
    """The one PATH of supervised processes and of the dev user's shells: the active
    runtimes' folders first, then the system's, each once; nothing from the agent's own."""
    entries = _runtime_path if runtime is None else runtime
    return ":".join(dict.fromkeys([*entries, *SYSTEM_PATH.split(":")]))


def build_env(extra: dict[str, str], user: pwd.struct_passwd | None) -> dict[str, str]:
    """A clean environment: nothing from the agent's own leaks into the child. The
    identity variables describe the user it runs as (the agent's own when none is set)."""
    who = user or pwd.getpwuid(os.geteuid())
    env = {"PATH": canonical_path(), "LANG": "C.UTF-8",
           "TERM": "xterm-256color",
           "HOME": who.pw_dir, "USER": who.pw_name, "LOGNAME": who.pw_name,
           "SHELL": who.pw_shell or "/bin/sh"}
    env.update(extra)
    return env


class Spool:
    """Reads a holder's output segments from a saved offset; deletes what is consumed."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.offset_path = base.with_name(base.name + ".offset")
        try:
            self.offset = int(self.offset_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            self.offset = 0
        self.skipped = 0  # bytes the holder could not write (disk full), not yet reported
        self.hole_ahead = False  # a read stopped at such a hole: read again
        self._fd = os.open(self.offset_path, os.O_RDWR | os.O_CREAT, 0o600)

    def _segments(self) -> list[tuple[int, Path]]:
        prefix = self.base.name + ".spool."
        found = []
        for path in self.base.parent.glob(prefix + "*"):
            suffix = path.name[len(prefix):]
            if suffix.isdigit():
                found.append((int(suffix), path))
        return sorted(found)

    def read(self, limit: int = 4 * 2**20) -> bytes:
        """New output since the offset, at most `limit` bytes."""
        chunks: list[bytes] = []
        size = 0
        self.hole_ahead = False
        segments = self._segments()
        for index, (start, path) in enumerate(segments):
            end = segments[index + 1][0] if index + 1 < len(segments) else None
            if end is not None and end <= self.offset:
                path.unlink(missing_ok=True)  # consumed and closed by the holder
                continue
            # A segment may start past the offset when the holder skipped bytes it
            # could not write (disk full): stop before the hole, so the caller can say
            # where output went missing, and step over it on the next read.
            if start > self.offset:
                if size:
                    self.hole_ahead = True
                    break
                self.skipped += start - self.offset
                self.offset = start
            with open(path, "rb") as handle:
                handle.seek(self.offset - start)
                data = handle.read(limit - size)
            chunks.append(data)
            size += len(data)
            self.offset += len(data)
            if size >= limit:
                break
        return b"".join(chunks)

    def save(self, consumed: int) -> None:
        """Remember how far output is safely in the console (a restart resumes here)."""
        os.pwrite(self._fd, f"{consumed:020d}".encode(), 0)

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class Child:
    name: str
    identity: Identity
    holder: Identity
    marker: str
    folder: Path
    sock: socket.socket
    holder_pidfd: int
    spool: Spool
    closed: bool = False

    @property
    def pid(self) -> int:
        return self.identity.pid

    def send(self, data: bytes) -> bool:
        try:
            return self.sock.send(data) == len(data)
        except OSError:
            return False

    def wait_status(self) -> int | None:
        """The program's exit as a Popen-style code (negative: signal), None if unknown."""
        try:
            status = json.loads((self.folder / f"{self.name}.exit").read_text())["status"]
        except (OSError, ValueError, KeyError):
            return None
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()
            os.close(self.holder_pidfd)
            self.spool.close()

    def forget(self) -> None:
        """The program is over: remove its holder files."""
        self.close()
        forget(self.folder, self.name)


def forget(folder: Path, name: str) -> None:
    for path in folder.glob(f"{name}.*"):
        if path.name.split(".")[1] in ("json", "sock", "spool", "exit", "offset", "launch"):
            path.unlink(missing_ok=True)


def _resolve_user(name: str | None) -> pwd.struct_passwd | None:
    if name is None:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SpawnError(f"unknown user {name!r}") from None
    if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
        raise SpawnError(f"cannot run as {name!r}: the agent is not root")
    return entry


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _start_holder(launch_file: Path) -> dict[str, int | str]:
    info_r, info_w = os.pipe()
    try:
        starter = subprocess.Popen(
            [sys.executable, "-S", "-I", str(HOLDER), str(launch_file), str(info_w)],
            pass_fds=(info_w,), env={"PATH": SYSTEM_PATH}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
    finally:
        os.close(info_w)
    try:
        # The holder detaches with its first instruction; a blocking wait reaps that
        # at once (a wait with a timeout polls in growing sleeps).
        starter.wait()
        ready, _, _ = select.select([info_r], [], [], HOLDER_START_TIMEOUT)
        line = os.read(info_r, 65536) if ready else b""
    finally:
        os.close(info_r)
    try:
        return json.loads(line)  # type: ignore[no-any-return]  # the holder's own JSON
    except ValueError:
        raise SpawnError("the process holder did not report back") from None


def spawn(launch: Launch, folder: Path, name: str) -> Child:
    user = _resolve_user(launch.user)
    if not launch.cwd.is_dir():
        raise SpawnError(f"working directory {launch.cwd} does not exist")
    forget(folder, name)
    marker = secrets.token_hex(8)
    env = build_env({**launch.env, **read_env_files(launch.env_files)}, user)
    env[MARKER_VAR] = marker
    launch_file = folder / f"{name}.launch"
    payload = {"dir": str(folder), "name": name, "argv": launch.argv,
               "cwd": str(launch.cwd), "env": env, "user": launch.user,
               "cgroup_procs": str(launch.cgroup_procs) if launch.cgroup_procs else None}
    _write_private(launch_file, json.dumps(payload).encode())

    info = _start_holder(launch_file)
    launch_file.unlink(missing_ok=True)
    if "error" in info:
        raise SpawnError(f"cannot start {launch.argv[0]}: {info['error']}")
    program = Identity.of(int(info["pid"])) or Identity(int(info["pid"]), 0.0)
    holder = Identity.of(int(info["holder"])) or Identity(int(info["holder"]), 0.0)
    record = {"pid": [program.pid, program.started], "holder": [holder.pid, holder.started],
              "marker": marker}
    _write_private(folder / f"{name}.json", json.dumps(record).encode())
    log.info("spawn", extra=fields(pid=program.pid, holder=holder.pid, argv=launch.argv,
                                   cwd=str(launch.cwd)))
    return _connect(folder, name, program, holder, marker)


def _connect(folder: Path, name: str, program: Identity, holder: Identity,
             marker: str) -> Child:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A socket path is limited to 107 bytes; through a folder descriptor it stays short.
    folder_fd = os.open(folder, os.O_PATH | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{folder_fd}/{name}.sock")
    except OSError as exc:
        sock.close()
        # The holder is there but not listening: it is finishing (program exited).
        if holder.alive():
            os.kill(holder.pid, signal.SIGKILL)
        raise SpawnError(f"cannot reach the holder of {name}: {exc}") from None
    finally:
        os.close(folder_fd)
    sock.setblocking(False)
    return Child(name, program, holder, marker, folder, sock, os.pidfd_open(holder.pid),
                 Spool(folder / name))


@dataclass(frozen=True)
class Found:
    """What an agent finds of a process after a restart."""

    child: Child | None  # the holder is alive: reattached
    status: int | None  # the holder is gone: the program's exit (None: unknown)
    program: Identity | None
    marker: str | None
    spool: Spool | None


def find(folder: Path, name: str) -> Found | None:
    """Reattach to `name`'s holder, or report how its program ended; None if never run."""
    try:
        record = json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    program = Identity(*record["pid"])
    holder = Identity(*record["holder"])
    if holder.alive():
        try:
            child = _connect(folder, name, program, holder, record["marker"])
            return Found(child, None, program, record["marker"], None)
        except SpawnError:
            pass  # finishing as we looked: read its exit record below
    exit_file = folder / f"{name}.exit"
    status = None
    if exit_file.exists():
        status = os.waitstatus_to_exitcode(json.loads(exit_file.read_text())["status"])
    return Found(None, status, program, record["marker"], Spool(folder / name))
