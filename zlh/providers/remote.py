"""A container that zlh reaches only over SSH (paramiko, through the bastion when one is
configured, host keys checked): its files, its agent's install, start, identity and stop.

Inside the container, as on every real one:

    /etc/zlh/agentd.yaml       the agent's config: loopback bind, its port, the paths below
    /etc/zlh/agent.token       its bearer token, mode 0600 (zlh keeps a copy, also 0600)
    /opt/zlh/wheels/           the wheel of this project that zlh pushed
    /opt/zlh/agent/site/       that wheel unpacked, run by `proxmox.agent_python`, or
    /opt/zlh/agent/venv/       a venv with the wheel and its dependencies (the default)
    /var/lib/zlh/              agent state
    /var/log/zlh/agentd.log    the output of an agent started directly
    /run/zlh/agentd.pid        an agent started directly: its pid and start time
    /srv/zlh/                  the server root

The agent is started by a systemd unit (zlh-agentd.service) when systemd is the
container's init (`/run/systemd/system` exists, the check of sd_booted(3)); otherwise it is
started detached (setsid) and its pid and start time (clock ticks after boot, field 22 of
/proc/PID/stat) are recorded: its identity, checked before any signal is sent to it.

The agent listens on the container's loopback only; zlh reaches it through SSH too
(zlh/tunnel.py). Files go by SFTP (each through a temporary name), folders as a tar stream.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import posixpath
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko  # type: ignore[import-untyped]  # no stubs installed
import yaml

from zlh import ssh as zssh
from zlh.errors import NotFoundError, ProvisionError, ZlhError
from zlh.opconfig import SshConfig
from zlh.providers.base import AgentProcess

log = logging.getLogger(__name__)

CONFIG = "/etc/zlh/agentd.yaml"
TOKEN = "/etc/zlh/agent.token"
SERVER_ROOT = "/srv/zlh"
WHEELS = "/opt/zlh/wheels"
AGENT_HOME = "/opt/zlh/agent"
SITE = f"{AGENT_HOME}/site"
VENV = f"{AGENT_HOME}/venv"
PID_FILE = "/run/zlh/agentd.pid"
AGENT_LOG = "/var/log/zlh/agentd.log"
UNIT = "zlh-agentd.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT}"
LAYOUT = ("/etc/zlh", "/var/lib/zlh", "/var/log/zlh", "/opt/zlh/runtimes", WHEELS,
          AGENT_HOME, SERVER_ROOT)
CONSOLE_RING = 5000
COPY_CHUNK = 32768  # SFTP's usual write size
COMMAND_TIMEOUT = 120.0
# Creating the venv and installing the wheel's dependencies from the package index.
INSTALL_TIMEOUT = 900.0
HEALTH_POLL_S = 0.1
ALIVE_CHECK_S = 1.0

# Prints "PID TICKS MODE" for the running agent, nothing when there is none. A pid file
# means a direct start (its start time must still match); else systemd's MainPID.
FIND_AGENT = f"""
pid=; ticks=; mode=direct
if [ -r {PID_FILE} ]; then read pid ticks < {PID_FILE}
elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  mode=systemd; pid=$(systemctl show -p MainPID --value {UNIT} 2>/dev/null)
fi
[ -n "$pid" ] && [ "$pid" != 0 ] && [ -r /proc/$pid/stat ] || exit 0
set -- $(sed 's/^.*) //' /proc/$pid/stat)
[ "$1" != Z ] || exit 0
[ -z "$ticks" ] || [ "${{20}}" = "$ticks" ] || exit 0
echo "$pid ${{20}} $mode"
"""


@dataclass(frozen=True)
class AgentCommand:
    """How the container runs the agent: an interpreter and, for an unpacked wheel, the
    folder to import it from."""

    python: str
    pythonpath: str | None = None

    @property
    def argv(self) -> str:
        return f"{shlex.quote(self.python)} -m agentd --config {CONFIG}"


def agent_config(port: int) -> str:
    """The agent's config in a container: it listens on the container's loopback only."""
    config = {
        "bind": "127.0.0.1", "port": port, "token_file": TOKEN, "state_dir": "/var/lib/zlh",
        "server_root": SERVER_ROOT, "root": "/", "in_container": True,
        "console_ring": CONSOLE_RING,
    }
    return yaml.safe_dump(config, sort_keys=False)


def unit_text(command: AgentCommand) -> str:
    """The systemd unit that runs the agent in a container whose init is systemd."""
    environment = f"Environment=PYTHONPATH={command.pythonpath}\n" if command.pythonpath \
        else ""
    return (
        "[Unit]\n"
        "Description=zlh agent (agentd): supervises this container's servers\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={command.argv}\n"
        f"{environment}"
        "WorkingDirectory=/\n"
        "Restart=on-failure\n"
        "RestartSec=2\n"
        # The processes it supervises outlive the agent (their holders keep them): a
        # restart or upgrade of the agent must not take them down. A stop still stops
        # them: the agent stops every process on SIGTERM, within its shutdown deadline.
        "KillMode=process\n"
        "TimeoutStopSec=90\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


class RemoteContainer:
    """One container behind SSH. Each operation opens its own connection (or takes one)."""

    def __init__(self, hop: zssh.Hop, config: SshConfig, agent_python: str | None = None,
                 ) -> None:
        self.hop = hop
        self.config = config
        self.agent_python = agent_python

    @contextmanager
    def session(self) -> Iterator[zssh.Connection]:
        with zssh.session(self.hop, self.config) as conn:
            yield conn

    # -- files ------------------------------------------------------------------------

    def lay_out(self, agent_port: int, token: str) -> None:
        """The folders, the agent's config and its token (0600 before a byte lands)."""
        with self.session() as conn, _sftp(conn) as sftp:
            for folder in LAYOUT:
                _mkdirs(sftp, folder)
            _write(sftp, CONFIG, agent_config(agent_port).encode(), 0o644)
            _write(sftp, TOKEN, token.encode(), 0o600)

    @contextmanager
    def server_files(self, root: str = SERVER_ROOT) -> Iterator[SshServerFiles]:
        """The server root, or with `root="/"` the container's whole file system."""
        with self.session() as conn, _sftp(conn) as sftp:
            yield SshServerFiles(conn, sftp, root)

    # -- the agent --------------------------------------------------------------------

    def find_agent(self, conn: zssh.Connection) -> tuple[AgentProcess, str] | None:
        """The running agent and how it was started (`direct` or `systemd`), if any."""
        words = _sh(conn, FIND_AGENT).split()
        if len(words) != 3:
            return None
        return AgentProcess(int(words[0]), float(words[1])), words[2]

    def launch(self, conn: zssh.Connection, wheel: Path) -> str:
        """Push and install the agent, then start it; returns `systemd` or `direct`."""
        command = self.install(conn, wheel)
        if _status(conn, "test -d /run/systemd/system") == 0:
            self._start_systemd(conn, command)
            return "systemd"
        self._start_direct(conn, command)
        return "direct"

    def install(self, conn: zssh.Connection, wheel: Path) -> AgentCommand:
        remote = f"{WHEELS}/{wheel.name}"
        with _sftp(conn) as sftp:
            _mkdirs(sftp, WHEELS)
            _put(sftp, wheel, remote)
        if self.agent_python:
            python = shlex.quote(self.agent_python)
            _sh(conn, f"set -e; rm -rf {SITE}.new; {python} -m zipfile -e "
                      f"{shlex.quote(remote)} {SITE}.new; rm -rf {SITE}.old; "
                      f"if [ -e {SITE} ]; then mv {SITE} {SITE}.old; fi; "
                      f"mv {SITE}.new {SITE}; rm -rf {SITE}.old")
            return AgentCommand(self.agent_python, SITE)
        pip = f"{VENV}/bin/python -m pip install -q --disable-pip-version-check"
        _sh(conn, f"set -e; [ -x {VENV}/bin/python ] || python3 -m venv {VENV}; "
                  f"{pip} {shlex.quote(remote)}; "
                  # The version does not change between builds: this build's code.
                  f"{pip} --force-reinstall --no-deps {shlex.quote(remote)}",
            timeout=INSTALL_TIMEOUT)
        return AgentCommand(f"{VENV}/bin/python")

    def _start_systemd(self, conn: zssh.Connection, command: AgentCommand) -> None:
        with _sftp(conn) as sftp:
            _mkdirs(sftp, posixpath.dirname(UNIT_PATH))
            _write(sftp, UNIT_PATH, unit_text(command).encode(), 0o644)
        _sh(conn, f"rm -f {PID_FILE}; systemctl daemon-reload && "
                  f"systemctl enable --now {UNIT}")
        log.info("agent of %s started by systemd (%s)", self.hop.host, UNIT)

    def _start_direct(self, conn: zssh.Connection, command: AgentCommand) -> None:
        env = f"PYTHONPATH={shlex.quote(command.pythonpath)} " if command.pythonpath else ""
        out = _sh(conn, f"""set -e
mkdir -p {posixpath.dirname(PID_FILE)} {posixpath.dirname(AGENT_LOG)}
cd /
{env}setsid {command.argv} </dev/null >>{AGENT_LOG} 2>&1 &
pid=$!
set -- $(sed 's/^.*) //' /proc/$pid/stat)
echo "$pid ${{20}}" > {PID_FILE}
echo "$pid"
""")
        log.info("agent of %s started, pid %s", self.hop.host, out.strip())

    def wait_healthy(self, conn: zssh.Connection, port: int, timeout: float) -> None:
        """Until the agent answers /healthz through the tunnel; fails early when it died."""
        from zlh.agent_client import AgentClient
        from zlh.errors import AgentUnreachableError
        from zlh.tunnel import AGENT_HOST, SshTransport

        deadline = time.monotonic() + timeout
        next_check = time.monotonic() + ALIVE_CHECK_S
        transport = SshTransport(self.hop, self.config, conn)
        with AgentClient(f"http://{AGENT_HOST}:{port}", "", timeout=2.0,
                         transport=transport) as client:
            while True:
                try:
                    if client.health():
                        return
                except AgentUnreachableError:
                    pass
                now = time.monotonic()
                if now > next_check:
                    next_check = now + ALIVE_CHECK_S
                    if self.find_agent(conn) is None:
                        raise ProvisionError(f"the agent in {self.hop.host} exited at start; "
                                             f"{self._log_tail(conn)}")
                if now > deadline:
                    raise ProvisionError(f"the agent in {self.hop.host} did not answer on "
                                         f"port {port} within {timeout:.0f} s; "
                                         f"{self._log_tail(conn)}")
                time.sleep(HEALTH_POLL_S)

    def _log_tail(self, conn: zssh.Connection) -> str:
        out = _sh(conn, f"tail -n 3 {AGENT_LOG} 2>/dev/null; "
                        f"journalctl -u {UNIT} -n 3 --no-pager -q 2>/dev/null; true")
        last = [line for line in out.splitlines() if line.strip()]
        return f"its log ends: {last[-1]}" if last else f"no output in {AGENT_LOG}"

    def stop_agent(self, conn: zssh.Connection, timeout: float, detach: bool) -> None:
        """SIGTERM (or SIGUSR2 with `detach`: the agent leaves, its processes keep running)
        to the running agent, SIGKILL after `timeout`."""
        found = self.find_agent(conn)
        if found is None:
            return
        process, mode = found
        signal = "USR2" if detach else "TERM"
        if mode == "systemd" and not detach:
            _sh(conn, f"systemctl stop {UNIT}", timeout=timeout + 30)
            return
        if mode == "systemd":
            # Only the agent: `systemctl kill` would signal the whole group by default.
            _sh(conn, f"systemctl kill --kill-whom=main --signal=SIG{signal} {UNIT}")
        _sh(conn, _stop_script(process, signal, timeout), timeout=timeout + 30)


class SshServerFiles:
    """The server root (or another folder) of a container behind SSH."""

    def __init__(self, conn: zssh.Connection, sftp: paramiko.SFTPClient, root: str) -> None:
        self.conn = conn
        self.sftp = sftp
        self.root = root

    def _path(self, rel: str) -> str:
        path = posixpath.normpath(posixpath.join(self.root, rel))
        inside = self.root.rstrip("/") + "/"
        if path != self.root and not path.startswith(inside):
            raise ValueError(f"{rel!r} is outside the server root")
        return path

    def write_text(self, rel: str, text: str, mode: int = 0o644) -> None:
        path = self._path(rel)
        _mkdirs(self.sftp, posixpath.dirname(path))
        _write(self.sftp, path, text.encode("utf-8"), mode)

    def read_text(self, rel: str) -> str:
        with self.sftp.open(self._path(rel), "r") as handle:
            return bytes(handle.read()).decode("utf-8")

    def mkdir(self, rel: str) -> None:
        _mkdirs(self.sftp, self._path(rel))

    def put(self, local: Path, rel: str) -> None:
        path = self._path(rel)
        if not local.is_dir():
            _mkdirs(self.sftp, posixpath.dirname(path))
            _put(self.sftp, local, path)
            return
        _send_tree(self.conn, local, path)

    def has(self, path: str) -> bool:
        try:
            self.sftp.stat(path)
        except FileNotFoundError:
            return False
        return True


def _stop_script(process: AgentProcess, signal: str, timeout: float) -> str:
    pid, ticks = process.pid, int(process.create_time)
    return f"""
alive() {{
  [ -r /proc/{pid}/stat ] || return 1
  set -- $(sed 's/^.*) //' /proc/{pid}/stat)
  [ "$1" != Z ] && [ "${{20}}" = {ticks} ]
}}
alive || exit 0
kill -{signal} {pid}
i=0
while alive; do
  if [ $i -ge {int(timeout * 10)} ]; then kill -KILL {pid}; echo killed; break; fi
  sleep 0.1; i=$((i + 1))
done
rm -f {PID_FILE}
"""


# -- the wheel ----------------------------------------------------------------------------


def agent_wheel(cache: Path) -> Path:
    """A wheel of this project (zlh and agentd) from the source checkout, rebuilt when a
    source file is newer than the last one built."""
    source = Path(__file__).resolve().parents[2]
    if not (source / "pyproject.toml").is_file():
        raise NotFoundError(f"no source checkout at {source} to build the agent wheel from")
    folder = cache / "agent-wheel"
    folder.mkdir(parents=True, exist_ok=True)
    # Provisions running side by side build it once.
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_wheel(source, folder)


def _build_wheel(source: Path, folder: Path) -> Path:
    built = sorted(folder.glob("zlh-*.whl"))
    newest = max(_mtimes(source), default=0.0)
    if built and built[-1].stat().st_mtime >= newest:
        return built[-1]
    for old in built:
        old.unlink()
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
         "-w", str(folder), str(source)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise ZlhError(f"building the agent wheel failed: {done.stderr.strip()[-400:]}")
    return max(folder.glob("zlh-*.whl"), key=lambda p: p.stat().st_mtime)


def _mtimes(source: Path) -> Iterator[float]:
    yield (source / "pyproject.toml").stat().st_mtime
    for package in ("zlh", "agentd"):
        for path in (source / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                yield path.stat().st_mtime


# -- SSH helpers ----------------------------------------------------------------------------


def _status(conn: zssh.Connection, command: str, timeout: float = COMMAND_TIMEOUT) -> int:
    return zssh.run(conn, command, io.BytesIO(), io.BytesIO(), timeout=timeout)


def _sh(conn: zssh.Connection, script: str, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run `script` with sh in the container; its output, or SshError with its stderr."""
    out, err = io.BytesIO(), io.BytesIO()
    status = zssh.run(conn, f"sh -c {shlex.quote(script)}", out, err, timeout=timeout)
    if status != 0:
        text = err.getvalue().decode(errors="replace").strip()
        first = script.strip().splitlines()[0][:80]
        raise zssh.SshError(f"in {conn_host(conn)}: `{first}` failed ({status}): "
                            f"{text[-400:] or 'no output'}")
    return out.getvalue().decode(errors="replace")


def conn_host(conn: zssh.Connection) -> str:
    transport = conn.client.get_transport()
    peer = transport.getpeername() if transport is not None and transport.sock else None
    return str(peer[0]) if isinstance(peer, tuple) else "the container"


@contextmanager
def _sftp(conn: zssh.Connection) -> Iterator[paramiko.SFTPClient]:
    sftp = conn.client.open_sftp()
    try:
        yield sftp
    finally:
        sftp.close()


def _mkdirs(sftp: paramiko.SFTPClient, path: str) -> None:
    current = ""
    for part in [p for p in path.split("/") if p]:
        current += "/" + part
        try:
            if stat.S_ISDIR(sftp.stat(current).st_mode or 0):
                continue
        except FileNotFoundError:
            pass
        with suppress(OSError):  # made meanwhile by someone else; a real failure shows next
            sftp.mkdir(current, 0o755)


def _write(sftp: paramiko.SFTPClient, path: str, data: bytes, mode: int) -> None:
    """Write via a temporary name whose mode is set before any byte lands."""
    temp = f"{path}.zlh-tmp"
    with sftp.open(temp, "w") as handle:
        sftp.chmod(temp, mode)
        handle.write(data)
    sftp.posix_rename(temp, path)


def _put(sftp: paramiko.SFTPClient, local: Path, path: str) -> None:
    """Copy a file with its mode, set before any byte lands (as `_write`)."""
    temp = f"{path}.zlh-tmp"
    with open(local, "rb") as source, sftp.open(temp, "w") as handle:
        sftp.chmod(temp, stat.S_IMODE(os.fstat(source.fileno()).st_mode))
        handle.set_pipelined(True)
        shutil.copyfileobj(source, handle, COPY_CHUNK)
    sftp.posix_rename(temp, path)


def _send_tree(conn: zssh.Connection, local: Path, path: str) -> None:
    """Copy the tree `local` to `path` in the container as one tar stream."""
    transport = conn.client.get_transport()
    assert transport is not None
    channel = transport.open_session(timeout=COMMAND_TIMEOUT)
    quoted = shlex.quote(path)
    channel.exec_command(f"mkdir -p {quoted} && tar -x -f - -C {quoted} --no-same-owner")
    stream: Any = channel.makefile("wb")
    with tarfile.open(fileobj=stream, mode="w|") as archive:
        for entry in sorted(os.listdir(local)):
            archive.add(local / entry, arcname=entry)
    stream.close()
    channel.shutdown_write()
    status = channel.recv_exit_status()
    errors = channel.makefile_stderr("rb").read().decode(errors="replace").strip()
    channel.close()
    if status != 0:
        raise zssh.SshError(f"copying {local} to {path} in {conn_host(conn)} failed "
                            f"({status}): {errors[-400:]}")
