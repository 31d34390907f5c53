"""An SSH destination written `[user@]host[:port]`, as `ssh.bastion` and `zlh ssh trust` take
it; read without paramiko, so the operator config can check its bastion when it loads."""

from __future__ import annotations

import re
from dataclasses import dataclass

from zlh.errors import UsageError

FORM = "[user@]host[:port], an IPv6 address as [addr]:port"
# A host name or an IPv4 address, or (in brackets only) an IPv6 address.
HOST = re.compile(r"[A-Za-z0-9_.-]+")
IPV6 = re.compile(r"[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?")


@dataclass(frozen=True)
class Hop:
    user: str
    host: str
    port: int

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    @property
    def address(self) -> str:
        """`host:port` as `parse_hop` reads it back (an IPv6 address in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def parse_hop(text: str, user: str = "root", port: int = 22) -> Hop:
    """`[user@]host[:port]` (IPv6 as `[addr]:port`); anything else is a UsageError."""
    written = text
    if "@" in text:
        user, text = text.rsplit("@", 1)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        number = rest[1:] if rest.startswith(":") else None
        ok = bool(bracket) and IPV6.fullmatch(host) is not None and rest in ("", f":{number}")
    else:
        host, colon, number_text = text.partition(":")
        number = number_text if colon else None
        ok = HOST.fullmatch(host) is not None
    if number is not None:
        ok = ok and number.isdigit() and 1 <= int(number) <= 65535
        port = int(number) if ok else port
    if not ok or not user:
        raise UsageError(f"{written!r} is not {FORM}")
    return Hop(user, host, port)
