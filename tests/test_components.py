"""The real components the other tests build on: flying-squid through its launcher,
the npm cache that installs it, and the Debian minetest server."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcstatus import JavaServer

from tests.components import (
    flying_squid_cache,
    free_port,
    minetest_command,
    minetest_config,
    squid_command,
    squid_settings,
    strip_ansi,
    wait_for_line,
)
from zlh.errors import ConfigError, IntegrityError
from zlh.npmcache import ensure_cached, install_npm_package

START_TIMEOUT_S = 60
EXIT_TIMEOUT_S = 30
# A tiny package without dependencies; its sha256 was measured on `npm pack is-number@7.0.0`.
SMALL_PACKAGE = "is-number"
SMALL_VERSION = "7.0.0"
SMALL_SHA256 = "7b75c1057198cf97696909a9bee176c9c5e9bcb5b03bf3ecef2f484defadd51e"
WRONG_SHA256 = "0" * 64


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; any still running at the end is killed by its pid."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=EXIT_TIMEOUT_S)


def start_launcher(
    tmp_path: Path, port: int, started: list[subprocess.Popen[bytes]]
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    argv, env = squid_command(squid_settings(tmp_path, port))
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(out, "wb") as out_file, open(err, "wb") as err_file:
        process = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=out_file, stderr=err_file
        )
    started.append(process)
    return process, out, err


def run_launcher(
    argv: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )


def send(process: subprocess.Popen[bytes], line: str) -> None:
    assert process.stdin is not None
    process.stdin.write(line.encode() + b"\n")
    process.stdin.flush()


# --- flying-squid through the launcher ------------------------------------------------


@pytest.mark.slow
def test_flying_squid_answers_status_and_console_commands(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port("tcp")
    process, out, err = start_launcher(tmp_path, port, started)

    wait_for_line(out, rf"^\[zlh\] ready on 127\.0\.0\.1:{port}$", START_TIMEOUT_S)
    assert f"Server listening on port {port}, version 1.21.4" in strip_ansi(out.read_text())

    status = JavaServer("127.0.0.1", port).status()
    assert status.version.protocol == 769
    assert status.latency > 0

    send(process, "say hello")
    wait_for_line(out, r"\[CHAT\]: \[Server\] hello$", EXIT_TIMEOUT_S)

    send(process, "stop")
    assert process.wait(timeout=EXIT_TIMEOUT_S) == 0
    assert err.read_text() == ""


@pytest.mark.slow
def test_launcher_exits_with_a_clear_message_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        argv, env = squid_command(squid_settings(tmp_path, port))
        done = run_launcher(argv, env, tmp_path)

    assert done.returncode == 1
    assert done.stderr.startswith(f"[zlh] error: cannot listen on 127.0.0.1:{port}: EADDRINUSE ")
    assert "[zlh] ready" not in done.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"port": "25565"}', "port must be an integer 0-65535"),
        (None, "cannot read settings file"),
    ],
    ids=["malformed", "not-an-object", "port-not-a-number", "missing"],
)
def test_launcher_rejects_a_bad_settings_file(
    tmp_path: Path, content: str | None, message: str
) -> None:
    settings = tmp_path / "settings.json"
    if content is not None:
        settings.write_text(content)
    argv, env = squid_command(settings)

    done = run_launcher(argv, env, tmp_path)

    assert done.returncode == 2
    first_line = done.stderr.splitlines()[0]
    assert first_line.startswith("[zlh] error: ")
    assert str(settings) in first_line and message in first_line
    assert done.stdout == ""


def test_launcher_says_where_it_looked_when_flying_squid_is_missing(tmp_path: Path) -> None:
    argv, env = squid_command(squid_settings(tmp_path, 0))
    env["NODE_PATH"] = str(tmp_path / "empty")

    done = run_launcher(argv, env, tmp_path)

    assert done.returncode == 1
    assert done.stderr.startswith("[zlh] error: flying-squid is not installed (looked from ")
    assert str(tmp_path / "empty") in done.stderr


# --- the npm cache ----------------------------------------------------------------------


def cache_leftovers(cache_root: Path) -> list[str]:
    """What the cache holds besides lock files."""
    npm_dir = cache_root / "npm"
    if not npm_dir.is_dir():
        return []
    return sorted(p.name for p in npm_dir.iterdir() if not p.name.endswith(".lock"))


def test_npmcache_refuses_a_tarball_whose_sha256_differs(tmp_path: Path) -> None:
    cache_root = tmp_path / "cache"

    with pytest.raises(IntegrityError) as raised:
        install_npm_package(
            SMALL_PACKAGE, SMALL_VERSION, WRONG_SHA256, tmp_path / "dest", cache_root
        )

    assert str(raised.value) == (
        f"{SMALL_PACKAGE}@{SMALL_VERSION}: npm tarball sha256 is {SMALL_SHA256}, "
        f"expected {WRONG_SHA256}"
    )
    assert cache_leftovers(cache_root) == []
    assert not (tmp_path / "dest").exists()


def test_npmcache_installs_a_pinned_package_once_and_links_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_root = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="zlh.npmcache")

    first = install_npm_package(
        SMALL_PACKAGE, SMALL_VERSION, SMALL_SHA256, tmp_path / "a", cache_root
    )
    second = install_npm_package(
        SMALL_PACKAGE, SMALL_VERSION, SMALL_SHA256.upper(), tmp_path / "b", cache_root
    )

    assert first == tmp_path / "a" / "node_modules" / SMALL_PACKAGE
    assert second == tmp_path / "b" / "node_modules" / SMALL_PACKAGE
    assert json.loads((first / "package.json").read_text())["version"] == SMALL_VERSION
    assert cache_leftovers(cache_root) == [f"{SMALL_PACKAGE}@{SMALL_VERSION}"]
    cached = cache_root / "npm" / f"{SMALL_PACKAGE}@{SMALL_VERSION}" / "node_modules"
    assert os.path.samefile(first / "index.js", cached / SMALL_PACKAGE / "index.js")
    assert os.path.samefile(second / "index.js", cached / SMALL_PACKAGE / "index.js")
    npm_runs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("running")]
    assert len(npm_runs) == 2, npm_runs  # one pack and one install, for both destinations


def test_npmcache_refuses_a_changed_pin_for_an_existing_entry(tmp_path: Path) -> None:
    cache_root = tmp_path / "cache"
    ensure_cached(SMALL_PACKAGE, SMALL_VERSION, SMALL_SHA256, cache_root)

    with pytest.raises(IntegrityError, match=f"has sha256 {SMALL_SHA256}, expected 0000"):
        ensure_cached(SMALL_PACKAGE, SMALL_VERSION, WRONG_SHA256, cache_root)


def test_npmcache_builds_an_entry_once_for_concurrent_callers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_root = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="zlh.npmcache")
    results: list[Path] = []

    def provision() -> None:
        results.append(ensure_cached(SMALL_PACKAGE, SMALL_VERSION, SMALL_SHA256, cache_root))

    threads = [threading.Thread(target=provision) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    assert len(results) == 3 and len(set(results)) == 1
    packs = [
        r
        for r in caplog.records
        if r.getMessage().startswith("running /") and " pack " in r.getMessage()
    ]
    assert len(packs) == 1


def test_npmcache_clears_what_an_interrupted_build_left(tmp_path: Path) -> None:
    cache_root = tmp_path / "cache"
    stale = cache_root / "npm" / f".tmp-{SMALL_PACKAGE}@{SMALL_VERSION}-crashed"
    (stale / "entry").mkdir(parents=True)

    ensure_cached(SMALL_PACKAGE, SMALL_VERSION, SMALL_SHA256, cache_root)

    assert cache_leftovers(cache_root) == [f"{SMALL_PACKAGE}@{SMALL_VERSION}"]


@pytest.mark.parametrize(
    ("version", "sha256", "allow_unpinned", "message"),
    [
        (SMALL_VERSION, None, False, "is unpinned"),
        ("^7.0.0", SMALL_SHA256, False, "is not an exact version"),
        (SMALL_VERSION, "abc", False, "is not a sha256 hex digest"),
    ],
    ids=["unpinned", "range", "bad-digest"],
)
def test_npmcache_rejects_a_request_it_cannot_reproduce(
    tmp_path: Path, version: str, sha256: str | None, allow_unpinned: bool, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        install_npm_package(
            SMALL_PACKAGE, version, sha256, tmp_path / "dest", tmp_path / "cache", allow_unpinned
        )

    assert cache_leftovers(tmp_path / "cache") == []


def test_npmcache_installs_unpinned_only_when_allowed(tmp_path: Path) -> None:
    installed = install_npm_package(
        SMALL_PACKAGE,
        SMALL_VERSION,
        None,
        tmp_path / "dest",
        tmp_path / "cache",
        allow_unpinned=True,
    )

    assert (installed / "package.json").is_file()


def test_flying_squid_cache_holds_the_pinned_release() -> None:
    modules = flying_squid_cache()

    manifest = json.loads((modules / "flying-squid" / "package.json").read_text())
    assert manifest["version"] == "1.12.0"
    assert (modules / "flying-squid" / "config" / "default-settings.json").is_file()


# --- minetest ---------------------------------------------------------------------------


@pytest.mark.slow
def test_minetest_starts_on_loopback_and_saves_on_sigint(
    tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port("udp")
    world = tmp_path / "world"
    out = tmp_path / "stdout.log"
    argv = minetest_command(minetest_config(tmp_path, port), world, tmp_path / "debug.txt")
    with open(out, "wb") as out_file:
        process = subprocess.Popen(
            argv,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out_file,
            stderr=subprocess.STDOUT,
        )
    started.append(process)

    wait_for_line(
        out,
        rf'Server for gameid="minetest" listening on 127\.0\.0\.1:{port}\.$',
        START_TIMEOUT_S,
    )
    process.send_signal(signal.SIGINT)

    assert process.wait(timeout=EXIT_TIMEOUT_S) == 0
    assert "Server: Shutting down" in out.read_text()
    assert (world / "env_meta.txt").is_file()  # written by the shutdown save
