"""HTTP to an agent through SSH: each connection is a `direct-tcpip` channel.

A container's agent listens on the container's loopback only; zlh reaches it through the
container's sshd (and through the bastion when one is configured), as `ssh -L` would,
without a local listening port. The channels ride on one SSH connection, opened at the
first request and closed with the client.

httpx takes no network backend, so `SshTransport` builds its own httpcore pool with one;
everything else (request and response mapping, errors) is httpx's HTTPTransport.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import httpcore
import httpx
import paramiko  # type: ignore[import-untyped]  # no stubs installed

from zlh import ssh as zssh
from zlh.opconfig import SshConfig

log = logging.getLogger(__name__)

# Where the agent listens, as the container's sshd sees it.
AGENT_HOST = "127.0.0.1"


class _ChannelStream(httpcore.NetworkStream):
    def __init__(self, channel: paramiko.Channel) -> None:
        self.channel = channel

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self.channel.settimeout(timeout)
        try:
            return bytes(self.channel.recv(max_bytes))
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.channel.settimeout(timeout)
        try:
            self.channel.sendall(buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self.channel.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # httpcore asks this of an idle kept-alive connection: readable means the
            # other end closed it (or sent something unasked), so it is not reused.
            return self.channel.recv_ready() or self.channel.closed or \
                self.channel.eof_received
        return None


class _SshBackend(httpcore.NetworkBackend):
    """Opens channels to the agent's port on one SSH connection: `conn` when given (its
    owner closes it), else one made on first use."""

    def __init__(self, hop: zssh.Hop, config: SshConfig,
                 conn: zssh.Connection | None = None) -> None:
        self.hop = hop
        self.config = config
        self.conn = conn
        self._owned = conn is None
        self._lock = threading.Lock()

    def _transport(self) -> paramiko.Transport:
        with self._lock:
            if self.conn is None or (self._owned and not _active(self.conn)):
                if self.conn is not None:
                    self.conn.close()
                self.conn = zssh.connect(self.hop, self.config)
            transport = self.conn.client.get_transport()
        assert transport is not None
        return transport

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        transport = self._transport()
        started = time.monotonic()
        try:
            channel = transport.open_channel("direct-tcpip", (AGENT_HOST, port),
                                             ("127.0.0.1", 0), timeout=timeout)
        except paramiko.ChannelException as exc:
            # The sshd could not connect: nothing listens on the agent's port.
            raise httpcore.ConnectError(f"{self.hop.host}: {exc.text}") from exc
        except (paramiko.SSHException, OSError) as exc:
            raise httpcore.ConnectError(f"{self.hop.host}: {exc}") from exc
        log.debug("channel to %s:%d in %s open after %.3f s", AGENT_HOST, port, self.hop.host,
                  time.monotonic() - started)
        return _ChannelStream(channel)

    def close(self) -> None:
        with self._lock:
            if self.conn is not None and self._owned:
                self.conn.close()
            self.conn = None


def _active(conn: zssh.Connection) -> bool:
    transport = conn.client.get_transport()
    return transport is not None and transport.is_active()


class SshTransport(httpx.HTTPTransport):
    """An httpx transport whose connections are channels to `hop`'s loopback port."""

    def __init__(self, hop: zssh.Hop, config: SshConfig,
                 conn: zssh.Connection | None = None) -> None:
        super().__init__()
        self._backend = _SshBackend(hop, config, conn)
        # Replaces the pool HTTPTransport built: the same pool, with the SSH backend.
        self._pool = httpcore.ConnectionPool(network_backend=self._backend)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._backend.close()
