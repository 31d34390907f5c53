"""Backups and server files end to end through the `zlh` program, with a real minetest.

Minetest reads no console input, so its playbook has no quiesce steps: the world is
backed up while the server is stopped (SIGINT saved it). The cron entry that
`zlh backup schedule` installs is run exactly as written, through /bin/sh with cron's
minimal environment.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.components import minetest_server
from tests.test_e2e_local import Operator

pytestmark = pytest.mark.slow


@pytest.fixture
def zlh(tmp_path: Path) -> Iterator[Operator]:
    operator = Operator(tmp_path / "zlh")
    operator.home.mkdir(mode=0o700)
    operator.env["ZLH_CRON_DIR"] = str(tmp_path / "cron.d")
    yield operator
    operator.cleanup()


def ok(run: object) -> object:
    assert run.code == 0, (run.out, run.err)  # type: ignore[attr-defined]
    return run


def test_minetest_backup_files_restore_and_cron(zlh: Operator, tmp_path: Path) -> None:
    minetest_server()
    ok(zlh.provision("minetest", "mtb"))
    world = zlh.folder("mtb") / "srv/zlh/world"

    # Server files: put, list, get.
    local = tmp_path / "marker.txt"
    local.write_text("before the backup\n")
    put = ok(zlh("files", "put", "mtb", str(local), "world/marker.txt", "--json")).json()
    assert put["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
    listing = ok(zlh("files", "ls", "mtb", "world", "--json")).json()
    assert "marker.txt" in [e["name"] for e in listing["entries"]]
    ok(zlh("files", "get", "mtb", "world/marker.txt", str(tmp_path / "got.txt")))
    assert (tmp_path / "got.txt").read_text() == "before the backup\n"
    refused = zlh("files", "get", "mtb", "../etc/agentd.yaml", str(tmp_path / "no"))
    assert refused.code == 7 and "relative to the server root" in refused.err

    # Back up the stopped (SIGINT-saved) world.
    ok(zlh("stop", "mtb"))
    run = ok(zlh("backup", "run", "mtb", "--json")).json()
    assert run["ok"] is True and run["result"] == "ok" and run["quiesced_seconds"] is None
    listed = ok(zlh("backup", "list", "mtb", "--json")).json()
    assert [b["id"] for b in listed["backups"]] == [run["id"]]
    pulled = ok(zlh("backup", "pull", "mtb", run["id"], str(tmp_path), "--json")).json()
    archive = Path(pulled["path"])
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == listed["backups"][0]["sha256"]

    # Change the world, restore, and find the backup's world running.
    ok(zlh("start", "mtb"))
    (tmp_path / "later.txt").write_text("after\n")
    ok(zlh("files", "put", "mtb", str(tmp_path / "later.txt"), "world/later.txt"))
    ok(zlh("files", "rm", "mtb", "world/marker.txt"))
    restored = ok(zlh("backup", "restore", "mtb", run["id"], "--json")).json()
    assert restored["ready"] is True
    assert (world / "marker.txt").read_text() == "before the backup\n"
    assert not (world / "later.txt").exists()
    detail = ok(zlh("status", "mtb", "--json")).json()
    assert [p["ready"] for p in detail["processes"] if p["kind"] == "game"] == [True]

    # Cron: install, run the exact line in cron's environment, list, remove.
    ok(zlh("backup", "schedule", "mtb", "--cron", "17 3 * * *"))
    cron_file = tmp_path / "cron.d" / "zlh-backups"
    [line] = [x for x in cron_file.read_text().splitlines() if x.startswith("17 3 ")]
    command = line.split(" ", 6)[6]  # after five time fields and the user
    assert line.split(" ")[5] == "root"
    cron_env = ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={tmp_path}", "SHELL=/bin/sh"]
    done = subprocess.run([*cron_env, "/bin/sh", "-c", command], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""
    after = ok(zlh("backup", "list", "mtb", "--json")).json()["backups"]
    assert len(after) == 2 and after[1]["result"] == "ok"
    log_lines = (zlh.home / "logs" / "backups.log").read_text().splitlines()
    assert json.loads(log_lines[-1])["id"] == after[1]["id"]
    assert (zlh.home / "logs" / "backup-cron.log").read_text() == ""
    schedules = ok(zlh("backup", "schedule", "--list", "--json")).json()
    assert [(s["server"], s["cron"]) for s in schedules] == [("mtb", "17 3 * * *")]
    ok(zlh("backup", "schedule", "mtb", "--remove"))
    assert "mtb" not in cron_file.read_text()

    # Quiet on success, one JSON line per run, non-zero on failure; prune dry-run.
    quiet = ok(zlh("backup", "run", "mtb", "--quiet"))
    assert quiet.out == "" and quiet.err == ""  # type: ignore[attr-defined]
    unknown = zlh("backup", "run", "nosuch", "--quiet")
    assert unknown.code == 4 and "no server named 'nosuch'" in unknown.err
    token = zlh.folder("mtb") / "etc/zlh/agent.token"
    saved = token.read_text()
    token.write_text("wrong-token-wrong-token")  # the agent answers 401: a failed run
    try:
        failed = zlh("backup", "run", "mtb", "--quiet")
    finally:
        token.write_text(saved)
    assert failed.code == 7 and "1 of 1 backups failed: mtb:" in failed.err  # the 401
    log_lines = (zlh.home / "logs" / "backups.log").read_text().splitlines()
    assert len(log_lines) == 4 and json.loads(log_lines[-1])["ok"] is False
    plan = ok(zlh("backup", "prune", "mtb", "--keep-last", "1", "--dry-run", "--json")).json()
    assert len(plan["keep"]) == 1 and len(plan["remove"]) == 2
    assert len(ok(zlh("backup", "list", "mtb", "--json")).json()["backups"]) == 3
