"""Free loopback ports for game servers and agents.

A port is free when it can be bound on 127.0.0.1 for its protocol right now. Between the
check and the server's own bind another program can take it; provisioning checks again
right before each use and names the port when it is gone.
"""

from __future__ import annotations

import socket

from zlh.errors import ConflictError

LOOPBACK = "127.0.0.1"
_KIND = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}


def port_free(port: int, protocol: str = "tcp") -> bool:
    with socket.socket(socket.AF_INET, _KIND[protocol]) as sock:
        if protocol == "tcp":
            # As the servers bind: a port in TIME-WAIT after a crash is free for them.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port(protocol: str = "tcp", avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """A port the kernel hands out that is free for tcp and udp and not in `avoid`."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, _KIND[protocol]) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port not in avoid and port_free(port, "tcp") and port_free(port, "udp"):
            return port
    raise ConflictError("found no free loopback port in 100 attempts")


def require_free(port: int, protocol: str, what: str) -> None:
    if not port_free(port, protocol):
        raise ConflictError(f"port {port}/{protocol} ({what}) on {LOOPBACK} is already in use")
