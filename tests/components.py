"""Helpers for tests that run real components: locate them, pick ports, wait on them.

A component that is missing fails the test with the step that installs it; nothing here
skips. `bash .ci/setup` installs all of them. Run as a script, this module warms the
flying-squid npm cache (`.ci/setup` does so).

Imported by the tests as `from tests.components import ...`: the test command
`python -m pytest`, run from the repository root, puts the root on sys.path.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from zlh.errors import ZlhError
from zlh.npmcache import ensure_cached

T = TypeVar("T")

FLYING_SQUID = "flying-squid"
FLYING_SQUID_VERSION = "1.12.0"
# sha256 of the tarball `npm pack flying-squid@1.12.0` fetched (its sha1 matched the
# registry's published shasum e7f65b3792de1848af730f09ef20dbac903a35b5).
FLYING_SQUID_SHA256 = "aa107ab4c5239a7acf4f70c927d2c3582d29dede55efdce784b01e2644212475"
SQUID_LAUNCHER = Path(__file__).resolve().parents[1] / "zlh" / "data" / "squid-launcher.js"

MINETEST_SERVER = Path("/usr/lib/minetest/minetestserver")
SETUP_HINT = "bash .ci/setup installs it"
POLL_INTERVAL_S = 0.05
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def cache_root() -> Path:
    """Where installed components are kept between runs: $ZLH_TEST_CACHE or ~/.cache."""
    configured = os.environ.get("ZLH_TEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "zlh-test"


@functools.cache
def flying_squid_cache() -> Path:
    """The `node_modules` folder of the cached flying-squid install (read-only: use it
    as NODE_PATH). The cache entry is built on first use, which needs npm and the registry.
    """
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail(
            f"Node.js and npm are not installed: apt-get install -y nodejs npm ({SETUP_HINT})",
            pytrace=False,
        )
    try:
        entry = _cache_flying_squid()
    except ZlhError as exc:
        pytest.fail(
            f"cannot install {FLYING_SQUID}@{FLYING_SQUID_VERSION} into the test cache "
            f"{cache_root()}: {exc} (run bash .ci/setup with the npm registry reachable)",
            pytrace=False,
        )
    return entry / "node_modules"


def _cache_flying_squid() -> Path:
    return ensure_cached(FLYING_SQUID, FLYING_SQUID_VERSION, FLYING_SQUID_SHA256, cache_root())


def squid_settings(folder: Path, port: int, **overrides: object) -> Path:
    """Write a launcher settings file for a loopback, offline-mode server; return it."""
    settings: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "online-mode": False,
        "max-players": 10,
        "logging": False,
        "worldFolder": str(folder / "world"),
        **overrides,
    }
    path = folder / "squid-settings.json"
    path.write_text(json.dumps(settings, indent=2) + "\n")
    return path


def squid_command(settings: Path) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start the launcher on `settings`."""
    env = dict(os.environ, NODE_PATH=str(flying_squid_cache()))
    return ["node", str(SQUID_LAUNCHER), str(settings)], env


def minetest_server() -> Path:
    if not os.access(MINETEST_SERVER, os.X_OK):
        pytest.fail(
            f"{MINETEST_SERVER} is missing: apt-get install -y minetest-server, as .ci/run does",
            pytrace=False,
        )
    return MINETEST_SERVER


def minetest_config(folder: Path, port: int) -> Path:
    """Write a minetest.conf for a loopback server on UDP `port`; return it."""
    path = folder / "minetest.conf"
    path.write_text(
        "bind_address = 127.0.0.1\n"
        "ipv6_server = false\n"
        f"port = {port}\n"
        "server_announce = false\n"
        "default_game = minetest\n"
        "name = admin\n"
    )
    return path


def minetest_command(config: Path, world: Path, logfile: Path) -> list[str]:
    return [
        str(minetest_server()),
        "--config",
        str(config),
        "--world",
        str(world),
        "--gameid",
        "minetest",
        "--logfile",
        str(logfile),
        "--color",
        "never",
    ]


def free_port(kind: str = "tcp") -> int:
    """A port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    if kind not in ("tcp", "udp"):
        raise ValueError(f"kind must be 'tcp' or 'udp', not {kind!r}")
    sock_type = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, sock_type) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll `predicate` until it returns something truthy and return that.

    Raises AssertionError naming `what` once `timeout` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)


def wait_for_line(
    source: Path | str | Callable[[], str], regex: str, timeout: float
) -> re.Match[str]:
    """Wait until a line of `source` (a file, or a callable returning text) matches.

    Terminal escape sequences are removed before matching. The match is returned; the
    AssertionError on timeout quotes the end of the text seen.
    """
    pattern = re.compile(regex, re.MULTILINE)
    read = source if callable(source) else functools.partial(_read_text, Path(source))
    seen = ""

    def matched() -> re.Match[str] | None:
        nonlocal seen
        seen = strip_ansi(read())
        return pattern.search(seen)

    try:
        return wait_until(matched, timeout, f"a line matching {regex!r}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the text ends with:\n{seen[-2000:]}") from None


def strip_ansi(text: str) -> str:
    return ANSI_ESCAPE.sub("", text)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _warm() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        print(_cache_flying_squid() / "node_modules")
    except ZlhError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_warm())
