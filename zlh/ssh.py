"""SSH to containers with paramiko, through the bastion when one is configured.

Host keys are checked against zlh's own known_hosts file (OpenSSH format, so plain `ssh`
can use it too) with paramiko's RejectPolicy: an unknown host is refused until the
operator runs `zlh ssh trust HOST[:PORT]`, and a changed key is refused, loudly.

Through a bastion, zlh opens a `direct-tcpip` channel on the bastion's connection and
hands it to a second client as its socket, which is what `ssh -J` does.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import io
import logging
import os
import select
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

import paramiko  # type: ignore[import-untyped]  # no stubs installed

from zlh.errors import ConflictError, NotFoundError, UsageError, ZlhError
from zlh.opconfig import SshConfig

log = logging.getLogger(__name__)

CHUNK = 32768
POLL_S = 0.2
TAIL_S = 5.0
AGENT_WHEEL_DIR = "opt/zlh/wheels"


class SshError(ZlhError):
    """The connection failed: refused, auth, or a host key that is unknown or changed."""


@dataclass(frozen=True)
class Hop:
    user: str
    host: str
    port: int

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def parse_hop(text: str, user: str = "root", port: int = 22) -> Hop:
    """`[user@]host[:port]` (IPv6 as `[addr]:port`)."""
    if "@" in text:
        user, text = text.rsplit("@", 1)
    host = text
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else port
    elif text.count(":") == 1:
        host, number = text.split(":")
        port = int(number)
    if not host:
        raise UsageError(f"no host in {text!r}; write [user@]host[:port]")
    return Hop(user, host, port)


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's form: SHA256 and unpadded base64."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# -- connecting ---------------------------------------------------------------------------


class Connection:
    """A client to the target, and the bastion's client it tunnels through (if any)."""

    def __init__(self, client: paramiko.SSHClient, bastion: paramiko.SSHClient | None) -> None:
        self.client = client
        self.bastion = bastion

    def close(self) -> None:
        self.client.close()
        if self.bastion is not None:
            self.bastion.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _client(config: SshConfig) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    known = config.known_hosts_file()
    if known.is_file():
        client.load_host_keys(str(known))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return client


def _login(client: paramiko.SSHClient, hop: Hop, config: SshConfig, what: str,
           sock: Any = None) -> None:
    identity = str(config.identity) if config.identity else None
    try:
        client.connect(
            hop.host, hop.port, username=hop.user, key_filename=identity, sock=sock,
            timeout=config.connect_timeout, banner_timeout=config.connect_timeout,
            auth_timeout=config.connect_timeout, look_for_keys=identity is None,
            allow_agent=identity is None,
        )
    except paramiko.BadHostKeyException as exc:
        raise SshError(
            f"HOST KEY CHANGED for the {what} {hop.known_hosts_name}: "
            f"{config.known_hosts_file()} has {fingerprint(exc.expected_key)}, the server "
            f"offers {fingerprint(exc.key)}; refusing to connect. If the change is "
            f"expected, remove its line and run `zlh ssh trust {hop.host}:{hop.port}`"
        ) from None
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise SshError(
                f"the {what} {hop.known_hosts_name} has an unknown host key; check it and "
                f"run `zlh ssh trust {hop.host}:{hop.port}`"
            ) from None
        raise SshError(f"ssh to the {what} {hop}: {exc}") from None
    except OSError as exc:
        raise SshError(f"ssh to the {what} {hop}: {exc.strerror or exc}") from None


def connect(target: Hop, config: SshConfig) -> Connection:
    """A connection to `target`, through `config.bastion` when set."""
    if not config.bastion:
        client = _client(config)
        _login(client, target, config, "host")
        return Connection(client, None)

    bastion_hop = parse_hop(config.bastion, user=config.user)
    bastion = _client(config)
    _login(bastion, bastion_hop, config, "bastion")
    try:
        transport = bastion.get_transport()
        assert transport is not None
        channel = transport.open_channel("direct-tcpip", (target.host, target.port),
                                         ("127.0.0.1", 0), timeout=config.connect_timeout)
        client = _client(config)
        _login(client, target, config, "host", sock=channel)
    except paramiko.ChannelException as exc:
        bastion.close()
        raise SshError(f"the bastion {bastion_hop} cannot reach {target.host}:{target.port}: "
                       f"{exc.text}") from None
    except BaseException:
        bastion.close()
        raise
    return Connection(client, bastion)


# -- trusting a host ---------------------------------------------------------------------


def host_key(hop: Hop, config: SshConfig) -> paramiko.PKey:
    """The key a server offers, fetched without logging in."""
    try:
        sock = socket.create_connection((hop.host, hop.port), timeout=config.connect_timeout)
    except OSError as exc:
        raise SshError(f"cannot reach {hop.host}:{hop.port}: {exc.strerror or exc}") from None
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=config.connect_timeout)
        return transport.get_remote_server_key()
    except paramiko.SSHException as exc:
        raise SshError(f"{hop.host}:{hop.port} did not speak SSH: {exc}") from None
    finally:
        transport.close()


@dataclass(frozen=True)
class Trusted:
    host: str
    key_type: str
    fingerprint: str
    known_hosts: str
    already: bool


def trust(hop: Hop, config: SshConfig, expect: str | None = None,
          replace: bool = False) -> Trusted:
    """Record the host key `hop` offers in zlh's known_hosts file."""
    key = host_key(hop, config)
    seen = fingerprint(key)
    if expect and expect != seen:
        raise SshError(f"{hop.known_hosts_name} offers {seen}, not the expected {expect}; "
                       "nothing recorded")
    path = config.known_hosts_file()
    keys = paramiko.HostKeys()
    if path.is_file():
        keys.load(str(path))
    known = keys.lookup(hop.known_hosts_name) or {}
    old = known.get(key.get_name())
    if old is not None and old == key:
        return Trusted(hop.known_hosts_name, key.get_name(), seen, str(path), True)
    if old is not None and not replace:
        raise ConflictError(f"{hop.known_hosts_name} already has another {key.get_name()} key "
                            f"({fingerprint(old)}) in {path}; pass --replace to swap it")
    keys.add(hop.known_hosts_name, key.get_name(), key)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys.save(str(path))
    return Trusted(hop.known_hosts_name, key.get_name(), seen, str(path), False)


# -- running -----------------------------------------------------------------------------


def run(conn: Connection, command: str, stdout: IO[bytes], stderr: IO[bytes],
        timeout: float | None = None) -> int:
    """Run `command` in the target; copy its output; return its exit status."""
    transport = conn.client.get_transport()
    assert transport is not None
    channel = transport.open_session(timeout=timeout)
    channel.exec_command(command)
    channel.shutdown_write()
    deadline = None if timeout is None else time.monotonic() + timeout
    # The exit status can arrive without waking select (it is no data), so wait in slices.
    while not channel.exit_status_ready():
        select.select([channel], [], [], POLL_S)
        _drain(channel, stdout, stderr)
        if deadline is not None and time.monotonic() > deadline:
            channel.close()
            raise SshError(f"`{command}` did not finish within {timeout:g} s")
    # Output still in flight comes before the end-of-file, which follows the status.
    tail_deadline = time.monotonic() + TAIL_S
    while not channel.eof_received and time.monotonic() < tail_deadline:
        select.select([channel], [], [], POLL_S)
        _drain(channel, stdout, stderr)
    _drain(channel, stdout, stderr)
    return channel.recv_exit_status()


def _drain(channel: paramiko.Channel, stdout: IO[bytes], stderr: IO[bytes]) -> None:
    while channel.recv_ready():
        stdout.write(channel.recv(CHUNK))
    while channel.recv_stderr_ready():
        stderr.write(channel.recv_stderr(CHUNK))
    stdout.flush()
    stderr.flush()


def interactive(conn: Connection) -> int:
    """A login shell on a PTY, our terminal in raw mode while it lasts."""
    import termios
    import tty

    size = os.get_terminal_size(sys.stdout.fileno()) if sys.stdout.isatty() else None
    transport = conn.client.get_transport()
    assert transport is not None
    channel = transport.open_session()
    channel.get_pty(term=os.environ.get("TERM", "xterm"),
                    width=size.columns if size else 80, height=size.lines if size else 24)
    channel.invoke_shell()
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    try:
        if saved is not None:
            # TCSANOW: input typed before the shell came up stays queued, not flushed.
            tty.setraw(stdin, termios.TCSANOW)
        _pump(channel, stdin, sys.stdout.fileno())
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
    return channel.recv_exit_status()


def _pump(channel: paramiko.Channel, stdin: int, stdout: int) -> None:
    while not channel.exit_status_ready() or channel.recv_ready():
        ready, _, _ = select.select([channel, stdin], [], [], 0.5)
        if channel in ready:
            data = channel.recv(CHUNK)
            if not data:
                break
            os.write(stdout, data)
        if stdin in ready:
            data = os.read(stdin, CHUNK)
            if not data:
                channel.shutdown_write()
            else:
                channel.sendall(data)


# -- pushing the agent -------------------------------------------------------------------


def build_wheel(out_dir: Path) -> Path:
    """A wheel of this project (zlh and agentd), built from the source checkout."""
    source = Path(__file__).resolve().parents[1]
    if not (source / "pyproject.toml").is_file():
        raise NotFoundError(f"no source checkout at {source} to build the agent wheel from")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(out_dir), str(source)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise ZlhError(f"building the agent wheel failed: {done.stderr.strip()[-400:]}")
    return max(out_dir.glob("zlh-*.whl"), key=lambda p: p.stat().st_mtime)


@dataclass(frozen=True)
class Bootstrap:
    wheel: str
    config: str
    token: str
    pid: int | None


def bootstrap_agent(conn: Connection, wheel: Path, config_yaml: str, token: str,
                    root: str = "/", python: str = "python3", start: str = "systemd") -> Bootstrap:
    """Push the wheel, the agent's config and its token (0600), then start the agent.

    `start="systemd"` installs the wheel in a venv and enables a unit (real containers);
    `start="direct"` runs it from the wheel with `python` (tests, no systemd).
    """
    base = root.rstrip("/")
    sftp = conn.client.open_sftp()
    try:
        for folder in (AGENT_WHEEL_DIR, "etc/zlh", "var/lib/zlh", "var/log"):
            _mkdirs(sftp, f"{base}/{folder}")
        remote_wheel = f"{base}/{AGENT_WHEEL_DIR}/{wheel.name}"
        sftp.put(str(wheel), remote_wheel)
        config_path = f"{base}/etc/zlh/agentd.yaml"
        _write(sftp, config_path, config_yaml, 0o644)
        token_path = f"{base}/etc/zlh/agent.token"
        _write(sftp, token_path, token, 0o600)
    finally:
        sftp.close()
    pid = _start_agent(conn, remote_wheel, config_path, base, python, start)
    return Bootstrap(remote_wheel, config_path, token_path, pid)


def _mkdirs(sftp: paramiko.SFTPClient, path: str) -> None:
    parts = [p for p in path.split("/") if p]
    current = ""
    for part in parts:
        current += "/" + part
        with suppress(OSError):  # exists already; a real failure shows at the put
            sftp.mkdir(current, 0o755)


def _write(sftp: paramiko.SFTPClient, path: str, text: str, mode: int) -> None:
    """Write via a temporary name whose mode is set before any byte of the secret lands."""
    temp = f"{path}.zlh-tmp"
    with sftp.open(temp, "w") as handle:
        sftp.chmod(temp, mode)
        handle.write(text.encode())
    sftp.posix_rename(temp, path)


def _start_agent(conn: Connection, wheel: str, config: str, base: str, python: str,
                 start: str) -> int | None:
    if start == "direct":
        command = (
            f"cd {shlex.quote(base or '/')} && PYTHONPATH={shlex.quote(wheel)} setsid "
            f"{shlex.quote(python)} -m agentd --config {shlex.quote(config)} "
            f"</dev/null >>{shlex.quote(base + '/var/log/agentd.log')} 2>&1 & echo $!"
        )
    elif start == "systemd":
        command = _systemd_script(wheel, config, python)
    else:
        raise UsageError(f"start must be systemd or direct, not {start!r}")
    out, err = io.BytesIO(), io.BytesIO()
    status = run(conn, command, out, err, timeout=600)
    if status != 0:
        raise SshError(f"starting the agent failed ({status}): {_text(err)[-400:]}")
    return int(_text(out).split()[-1]) if start == "direct" else None


def _text(buffer: io.BytesIO) -> str:
    return buffer.getvalue().decode(errors="replace")


def _systemd_script(wheel: str, config: str, python: str) -> str:
    unit = (
        "[Unit]\nDescription=zlh agent\nAfter=network-online.target\n\n"
        f"[Service]\nExecStart=/opt/zlh/agent/bin/python -m agentd --config {config}\n"
        "Restart=on-failure\nKillMode=process\n\n[Install]\nWantedBy=multi-user.target\n"
    )
    return " && ".join([
        f"{shlex.quote(python)} -m venv /opt/zlh/agent",
        f"/opt/zlh/agent/bin/pip install -q --upgrade {shlex.quote(wheel)}",
        f"printf %s {shlex.quote(unit)} > /etc/systemd/system/zlh-agentd.service",
        "systemctl daemon-reload",
        "systemctl enable --now zlh-agentd",
    ])


@contextmanager
def session(target: Hop, config: SshConfig) -> Iterator[Connection]:
    conn = connect(target, config)
    try:
        yield conn
    finally:
        conn.close()


# -- OpenSSH config ------------------------------------------------------------------------


def ssh_config_text(targets: list[tuple[str, Hop]], config: SshConfig,
                    direct: frozenset[str] = frozenset()) -> str:
    """Host blocks that plain `ssh -F FILE zlh-NAME` can use, with zlh's known_hosts;
    the servers named in `direct` are reached without the bastion."""
    common = [f"    UserKnownHostsFile {config.known_hosts_file()}",
              "    StrictHostKeyChecking yes"]
    if config.identity:
        common.insert(0, f"    IdentityFile {config.identity}")
        common.append("    IdentitiesOnly yes")
    blocks = []
    if config.bastion and any(name not in direct for name, _ in targets):
        hop = parse_hop(config.bastion, user=config.user)
        blocks.append(_block("zlh-bastion", hop, common))
    for name, hop in targets:
        extra = ["    ProxyJump zlh-bastion"] if config.bastion and name not in direct else []
        blocks.append(_block(f"zlh-{name}", hop, extra + common))
    return "\n".join(blocks)


def _block(alias: str, hop: Hop, lines: list[str]) -> str:
    head = [f"Host {alias}", f"    HostName {hop.host}", f"    Port {hop.port}",
            f"    User {hop.user}"]
    return "\n".join(head + lines) + "\n"


# -- servers from the inventory ----------------------------------------------------------


def server_hop(name: str, config: SshConfig, user: str | None = None) -> Hop:
    """Where a provisioned server's sshd is: its address and its `ssh` port (a dev
    container's own sshd), else the configured port."""
    from zlh import records

    record = records.get(name)
    if not record.address:
        raise NotFoundError(f"server {name} has no address yet (not provisioned)")
    return _hop(record, config, user)


def all_server_hops(config: SshConfig, user: str | None = None) -> list[tuple[str, Hop]]:
    from zlh import records

    return [(s.name, _hop(s, config, user)) for s in records.list_all() if s.address]


def _hop(record: Any, config: SshConfig, user: str | None) -> Hop:
    port = int(record.ports.get("ssh", config.port))
    if user is None and record.provider == "local":
        # A local container's sshd runs as the invoking user: the only one it logs in.
        user = getpass.getuser()
    return Hop(user or config.user, record.address, port)


def is_direct(name: str) -> bool:
    """A local container is on this machine's loopback: no bastion in between."""
    from zlh import records

    return bool(records.get(name).provider == "local")


def route(name: str, config: SshConfig) -> SshConfig:
    """The config to reach `name` with: without the bastion for a local container."""
    return config.model_copy(update={"bastion": None}) if is_direct(name) else config
