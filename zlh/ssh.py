"""SSH to containers with paramiko, through the bastion when one is configured.

Host keys are checked against zlh's own known_hosts file (OpenSSH format, so plain `ssh`
can use it too) with paramiko's RejectPolicy: an unknown host is refused until the
operator runs `zlh ssh trust HOST[:PORT]`, and a changed key is refused, loudly. A new
Proxmox container's key is recorded when it matches a fingerprint its create task logged
(`trust_verified`), and dropped when the container is deleted (`forget`). Provisions
running at once change the file one at a time (`edit_known_hosts`), and a reader sees it
whole, never half written.

Every connection, `trust`'s included, goes the one way `through_bastion` says: through
the configured bastion, except to the bastion itself and to a host reached `direct` (a
local container; `zlh ssh trust --direct`). Through a bastion, zlh opens a `direct-tcpip`
channel on the bastion's connection and hands it to a second client as its socket, which
is what `ssh -J` does.
"""

from __future__ import annotations

import base64
import fcntl
import getpass
import hashlib
import logging
import os
import secrets
import select
import socket
import stat
import sys
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self

import paramiko  # type: ignore[import-untyped]  # no stubs installed

from zlh.errors import ConflictError, NotFoundError, ZlhError
from zlh.hop import Hop, parse_hop
from zlh.opconfig import SshConfig

log = logging.getLogger(__name__)

CHUNK = 32768
POLL_S = 0.2
TAIL_S = 5.0


class SshError(ZlhError):
    """The connection failed: refused, auth, or a host key that is unknown or changed."""


class SshUnreachable(SshError):
    """Nothing answered at the address (yet): a container's sshd may still be starting."""


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


def is_bastion(hop: Hop, config: SshConfig) -> bool:
    if not config.bastion:
        return False
    bastion = parse_hop(config.bastion, user=config.user)
    return (bastion.host, bastion.port) == (hop.host, hop.port)


def through_bastion(hop: Hop, config: SshConfig, direct: bool = False) -> bool:
    """The rule for every connection zlh opens: through the bastion when one is
    configured, except to the bastion itself and when `direct` (a container on this
    machine, or `zlh ssh trust --direct`)."""
    return bool(config.bastion) and not direct and not is_bastion(hop, config)


def trust_command(hop: Hop, config: SshConfig, direct: bool = False) -> str:
    """The `zlh ssh trust` that reaches `hop` the way this connection did."""
    bypass = config.bastion and direct and not is_bastion(hop, config)
    return f"zlh ssh trust {hop.address}" + (" --direct" if bypass else "")


def _what(hop: Hop, config: SshConfig) -> str:
    return "bastion" if is_bastion(hop, config) else "host"


def _open(hop: Hop, config: SshConfig, direct: bool) -> tuple[Any, Connection | None]:
    """A byte stream to `hop`'s sshd: a TCP connection, or a channel from the bastion
    (whose connection comes along, for the caller to close)."""
    if not through_bastion(hop, config, direct):
        try:
            return socket.create_connection((hop.host, hop.port),
                                            timeout=config.connect_timeout), None
        except OSError as exc:
            raise SshUnreachable(f"cannot reach the {_what(hop, config)} {hop.address}: "
                                 f"{exc.strerror or exc}") from None
    bastion = _bastion(config)
    try:
        return _channel(bastion.client, hop, config), bastion
    except BaseException:
        bastion.close()
        raise


def _login(client: paramiko.SSHClient, hop: Hop, config: SshConfig, sock: Any,
           direct: bool) -> None:
    what = _what(hop, config)
    _check_identity(config)
    identity = str(config.identity) if config.identity else None
    trust = trust_command(hop, config, direct)
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
            f"expected, run `{trust} --replace`"
        ) from None
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise SshError(
                f"the {what} {hop.known_hosts_name} has an unknown host key; check it and "
                f"run `{trust}`"
            ) from None
        raise SshError(f"ssh to the {what} {hop}: {exc}") from None
    except OSError as exc:
        raise SshError(f"ssh to the {what} {hop}: {exc.strerror or exc}") from None


def connect(target: Hop, config: SshConfig, direct: bool = False) -> Connection:
    """A connection to `target`, through `config.bastion` when set (see
    `through_bastion`)."""
    sock, bastion = _open(target, config, direct)
    try:
        client = _client(config)
        _login(client, target, config, sock, direct)
    except BaseException:
        sock.close()
        if bastion is not None:
            bastion.close()
        raise
    return Connection(client, bastion.client if bastion is not None else None)


def _bastion(config: SshConfig) -> Connection:
    assert config.bastion
    return connect(parse_hop(config.bastion, user=config.user), config)


def check(config: SshConfig) -> None:
    """What every connection needs, checked before anything is made that would need it:
    the identity file, and the bastion (it answers, its host key is the recorded one and
    it lets zlh log in). SshError otherwise."""
    _check_identity(config)
    if config.bastion:
        _bastion(config).close()


def _check_identity(config: SshConfig) -> None:
    if config.identity and not config.identity.exists():
        from zlh.opconfig import origin

        raise SshError(f"{origin('ssh', 'identity')}: {config.identity}: no such file "
                       "(the private key zlh logs in with)")


def _channel(bastion: paramiko.SSHClient, target: Hop, config: SshConfig) -> paramiko.Channel:
    """A `direct-tcpip` channel from the bastion to `target`, as `ssh -J` opens."""
    transport = bastion.get_transport()
    assert transport is not None
    try:
        return transport.open_channel("direct-tcpip", (target.host, target.port),
                                      ("127.0.0.1", 0), timeout=config.connect_timeout)
    except paramiko.ChannelException as exc:
        raise SshUnreachable(f"the bastion {config.bastion} cannot reach {target.address}: "
                             f"{exc.text}") from None


# -- trusting a host ---------------------------------------------------------------------


def host_key(hop: Hop, config: SshConfig, direct: bool = False) -> paramiko.PKey:
    """The key a server offers, fetched without logging in (see `through_bastion`)."""
    sock, bastion = _open(hop, config, direct)
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=config.connect_timeout)
        return transport.get_remote_server_key()
    except (paramiko.SSHException, EOFError) as exc:
        raise SshError(f"{hop.address} did not speak SSH: {exc}") from None
    finally:
        transport.close()
        if bastion is not None:
            bastion.close()


@dataclass(frozen=True)
class Trusted:
    host: str
    key_type: str
    fingerprint: str
    known_hosts: str
    already: bool


def trust(hop: Hop, config: SshConfig, expect: str | None = None,
          replace: bool = False, direct: bool = False) -> Trusted:
    """Record the host key `hop` offers in zlh's known_hosts file, fetched as every
    connection to it goes (`through_bastion`)."""
    key = host_key(hop, config, direct)
    seen = fingerprint(key)
    if expect and expect != seen:
        raise SshError(f"{hop.known_hosts_name} offers {seen}, not the expected {expect}; "
                       "nothing recorded")
    return _record(hop, key, config, replace)


def trust_verified(hop: Hop, config: SshConfig, fingerprints: Collection[str]) -> Trusted:
    """Record the key a new container offers (through the bastion) when it is one of
    `fingerprints`, learnt from a trusted source (Proxmox's task log, over TLS); it
    replaces what an earlier container at the same address left in known_hosts."""
    key = host_key(hop, config)
    seen = fingerprint(key)
    if seen not in fingerprints:
        raise SshError(f"{hop.known_hosts_name} offers {seen}, which is none of the keys "
                       f"Proxmox made for it ({', '.join(fingerprints) or 'none logged'}); "
                       "refusing to connect")
    return _record(hop, key, config, replace=True)


def _record(hop: Hop, key: paramiko.PKey, config: SshConfig, replace: bool) -> Trusted:
    seen = fingerprint(key)
    path = config.known_hosts_file()
    with edit_known_hosts(config) as keys:
        known = keys.lookup(hop.known_hosts_name) or {}
        old = known.get(key.get_name())
        if old is not None and old == key:
            return Trusted(hop.known_hosts_name, key.get_name(), seen, str(path), True)
        if old is not None and not replace:
            raise ConflictError(f"{hop.known_hosts_name} already has another "
                                f"{key.get_name()} key ({fingerprint(old)}) in {path}; "
                                "pass --replace to swap it")
        if replace and hop.known_hosts_name in keys:
            del keys[hop.known_hosts_name]  # every key type of the host that was there before
        keys.add(hop.known_hosts_name, key.get_name(), key)
    return Trusted(hop.known_hosts_name, key.get_name(), seen, str(path), False)


@contextmanager
def edit_known_hosts(config: SshConfig) -> Iterator[paramiko.HostKeys]:
    """zlh's known_hosts to change: one process at a time (an flock on a lock file beside
    it), written to a new file that replaces it when the block ends without an error."""
    path = Path(os.path.realpath(config.known_hosts_file()))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = os.open(path.with_name(f"{path.name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                   0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        keys = paramiko.HostKeys()
        if path.is_file():
            keys.load(str(path))
        yield keys
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            keys.save(str(temp))
            if path.is_file():
                os.chmod(temp, stat.S_IMODE(path.stat().st_mode))
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
    finally:
        os.close(lock)  # closing releases the lock


def is_known(hop: Hop, config: SshConfig) -> bool:
    """True when zlh's known_hosts has a key for `hop`."""
    path = config.known_hosts_file()
    return path.is_file() and hop.known_hosts_name in paramiko.HostKeys(str(path))


def forget(hop: Hop, config: SshConfig) -> bool:
    """Drop `hop`'s keys from zlh's known_hosts (its container is gone); True if any."""
    if not is_known(hop, config):
        return False
    with edit_known_hosts(config) as keys:
        if hop.known_hosts_name in keys:
            del keys[hop.known_hosts_name]
    return True


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


@contextmanager
def session(target: Hop, config: SshConfig, direct: bool = False) -> Iterator[Connection]:
    conn = connect(target, config, direct)
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
