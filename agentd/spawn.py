"""Start a supervised process on a pseudo-terminal.

The child gets a PTY as stdin, stdout and stderr (line-buffered output, as on a
terminal), its own session and process group, a clean environment with a marker that
its descendants inherit, and, when the agent is root, the spec's user.

This is the one place the agent starts supervised programs. A later holder process
that keeps the PTY across agent restarts would return the same `Child` shape.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pwd
import secrets
import struct
import subprocess
import termios
from dataclasses import dataclass, field
from pathlib import Path

from agentd.logs import fields
from agentd.proctree import MARKER_VAR, Identity

log = logging.getLogger(__name__)

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WINDOW = struct.pack("HHHH", 50, 200, 0, 0)


class SpawnError(Exception):
    """The program could not be started (missing binary, bad cwd, unknown user)."""


@dataclass
class Child:
    popen: subprocess.Popen[bytes]
    identity: Identity
    marker: str
    master_fd: int
    pidfd: int
    closed: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.master_fd)
            os.close(self.pidfd)


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    user: str | None
    env_files: tuple[tuple[str, Path], ...] = ()  # (VAR, absolute path)


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


def build_env(extra: dict[str, str], user: pwd.struct_passwd | None) -> dict[str, str]:
    """A clean environment: nothing from the agent's own leaks into the child."""
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "TERM": "xterm-256color"}
    if user is not None:
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name,
                   SHELL=user.pw_shell or "/bin/sh")
    env.update(extra)
    return env


def _configure_pty(slave_fd: int) -> None:
    attrs = termios.tcgetattr(slave_fd)
    # No echo of input lines, and no "\n" -> "\r\n" translation on output.
    attrs[1] &= ~termios.OPOST
    attrs[3] &= ~(termios.ECHO | termios.ECHONL)
    termios.tcsetattr(slave_fd, termios.TCSANOW, attrs)
    fcntl.ioctl(slave_fd, termios.TIOCSWINSZ, WINDOW)


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


def _child_setup() -> None:
    # Runs in the child between fork and exec: become a session leader and take
    # the PTY (already on fd 0) as the controlling terminal.
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def spawn(launch: Launch) -> Child:
    user = _resolve_user(launch.user)
    marker = secrets.token_hex(8)
    env = build_env({**launch.env, **read_env_files(launch.env_files)}, user)
    env[MARKER_VAR] = marker
    if not launch.cwd.is_dir():
        raise SpawnError(f"working directory {launch.cwd} does not exist")

    master_fd, slave_fd = os.openpty()
    try:
        _configure_pty(slave_fd)
        drop = {} if user is None or os.geteuid() != 0 else {
            "user": user.pw_uid, "group": user.pw_gid, "extra_groups": [],
        }
        popen = subprocess.Popen(
            launch.argv, cwd=launch.cwd, env=env, stdin=slave_fd, stdout=slave_fd,
            stderr=slave_fd, close_fds=True, preexec_fn=_child_setup, **drop,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        os.close(master_fd)
        raise SpawnError(f"cannot start {launch.argv[0]}: {exc}") from None
    finally:
        os.close(slave_fd)

    os.set_blocking(master_fd, False)
    identity = Identity.of(popen.pid) or Identity(popen.pid, 0.0)
    log.info("spawn", extra=fields(pid=popen.pid, argv=launch.argv, cwd=str(launch.cwd)))
    return Child(popen, identity, marker, master_fd, os.pidfd_open(popen.pid))
