"""`zlh backup` and `zlh files` through the CLI against a real agent with a world and no game.

Where a download (`backup pull`, `files get`) lands on this machine: whole or not at all,
never over something that is not a regular file (a device node such as /dev/null was
replaced by the archive), and a place that cannot be written is one line naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agentfix import AgentProcess, poll
from zlh.cli import run
from zlh.inventory import Inventory, Server, write_secret

WORLD_BYTES = 512 * 1024  # random, so the archive is about as big


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path / "box").start()
    world = proc.root / "srv" / "world"
    world.mkdir(parents=True)
    (world / "level.dat").write_bytes(os.urandom(WORLD_BYTES))
    spec = {"playbook": "x", "processes": [], "backup": {"paths": ["world/"]}}
    assert proc.client.put("/v1/spec", json=spec).status_code == 200
    yield proc
    proc.stop()


@pytest.fixture
def zlh(agent: AgentProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    monkeypatch.setenv("ZLH_HOME", str(tmp_path / "zlh"))
    token = tmp_path / "zlh/box.token"
    write_secret(token, agent.token)
    with Inventory(tmp_path / "zlh/inventory.db") as inventory:
        inventory.add(Server(name="box", playbook="x", provider="local", address="127.0.0.1",
                             agent_port=agent.port, token_path=str(token), step="ready"))

    def invoke(*args: str) -> tuple[int, str, str]:
        code = run(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def take_backup(agent: AgentProcess) -> str:
    answer = agent.client.post("/v1/backups", json={}, timeout=60)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["backup"]["id"])


def command(kind: str, backup_id: str, dest: Path) -> list[str]:
    if kind == "pull":
        return ["backup", "pull", "box", backup_id, str(dest)]
    return ["files", "get", "box", "world/level.dat", str(dest)]


def make_device(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a null device, like /dev/null


DESTS: dict[str, Callable[[Path], Any]] = {
    "device": make_device,
    "fifo": os.mkfifo,
    "link": lambda p: p.symlink_to(p.parent / "elsewhere"),
}


@pytest.mark.parametrize("kind", ["pull", "get"])
@pytest.mark.parametrize("dest", list(DESTS), ids=list(DESTS))
def test_a_destination_that_is_not_a_regular_file_is_left_alone(agent, zlh, tmp_path, kind,
                                                                dest) -> None:
    backup_id = take_backup(agent)
    out = tmp_path / "out"
    out.mkdir()
    (out / "elsewhere").write_text("kept\n")
    DESTS[dest](out / "target")
    before = os.lstat(out / "target")

    code, stdout, stderr = zlh(*command(kind, backup_id, out / "target"))

    assert (code, stdout) == (2, "")
    assert stderr == (f"zlh: error: {out / 'target'} exists and is not a regular file; "
                      "nothing was written\n")
    after = os.lstat(out / "target")
    assert (after.st_mode, after.st_ino, after.st_rdev) == \
        (before.st_mode, before.st_ino, before.st_rdev)
    assert sorted(p.name for p in out.iterdir()) == ["elsewhere", "target"]
    assert (out / "elsewhere").read_text() == "kept\n"


@pytest.mark.parametrize("kind", ["pull", "get"])
def test_a_missing_folder_is_named(agent, zlh, tmp_path, kind) -> None:
    backup_id = take_backup(agent)
    dest = tmp_path / "nowhere" / "x"

    code, stdout, stderr = zlh(*command(kind, backup_id, dest))

    assert (code, stdout) == (2, "")
    assert stderr == f"zlh: error: {dest}: the folder {dest.parent} does not exist\n"


@pytest.mark.parametrize("kind", ["pull", "get"])
def test_a_stale_part_file_does_not_stop_a_download(agent, zlh, tmp_path, kind) -> None:
    backup_id = take_backup(agent)
    name = f"{backup_id}.tar.zst" if kind == "pull" else "level.dat"
    (tmp_path / f".{name}.part").write_text("left by a download that was cut off\n")

    code, _, stderr = zlh(*command(kind, backup_id, tmp_path))

    assert code == 0, stderr
    assert (tmp_path / name).stat().st_size > WORLD_BYTES // 2


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a tmpfs with the given options; unmounted at the end."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs: run it as root (as .ci/run does)")
    folders: list[Path] = []

    def mount(options: str) -> Path:
        folder = tmp_path / f"mnt{len(folders)}"
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
        folders.append(folder)
        return folder

    yield mount
    for folder in folders:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.parametrize("kind", ["pull", "get"])
@pytest.mark.parametrize(("options", "why"), [("ro,size=1m", "Read-only file system"),
                                              ("size=64k", "No space left on device")],
                         ids=["read-only", "full"])
def test_a_place_that_cannot_be_written_is_one_line(agent, zlh, mounted, kind, options,
                                                     why) -> None:
    backup_id = take_backup(agent)
    folder = mounted(options)
    name = f"{backup_id}.tar.zst" if kind == "pull" else "level.dat"

    code, stdout, stderr = zlh(*command(kind, backup_id, folder))

    assert (code, stdout) == (1, "")
    assert stderr.startswith(f"zlh: error: {folder / name}: cannot write there ({why})")
    assert stderr.count("\n") == 1 and "internal error" not in stderr
    assert list(folder.iterdir()) == []


def test_entries_a_backup_leaves_out_are_shown(agent, zlh, tmp_path) -> None:
    world = agent.root / "srv" / "world"
    os.mkfifo(world / "pipe")
    (world / "shared").symlink_to(tmp_path)  # out of the server root

    code, stdout, stderr = zlh("backup", "run", "box")

    assert code == 0, stderr
    assert stdout.splitlines()[1:] == [
        "  not archived (a restore of this backup drops them): world/pipe, world/shared"]
    code, stdout, stderr = zlh("backup", "list", "box")
    assert code == 0, stderr
    assert stdout.splitlines()[1].rstrip().endswith("2 not archived")


def test_files_ls_of_a_file_asks_the_agent_for_its_details(agent, zlh) -> None:
    world = agent.root / "srv" / "world"
    os.mkfifo(world / "pipe")  # reading it would wait for a writer forever
    level = (world / "level.dat").stat()

    code, stdout, stderr = zlh("files", "ls", "box", "world/level.dat", "--json")

    assert code == 0, stderr
    info = json.loads(stdout)
    assert (info["size"], info["mtime"], info["mode"]) == \
        (WORLD_BYTES, level.st_mtime, 0o644)
    assert info["sha256"] == hashlib.sha256((world / "level.dat").read_bytes()).hexdigest()
    assert zlh("files", "ls", "box", "world/pipe") == (0, "world/pipe: other, 0 bytes\n", "")
    assert zlh("files", "get", "box", "world/pipe") == (
        5, "", "zlh: error: agent: 'world/pipe' is not a regular file (other) (HTTP 409)\n")


@pytest.mark.parametrize("quiet", [[], ["--quiet"]], ids=["plain", "quiet"])
def test_a_failed_backup_of_one_server_is_one_line(agent, zlh, quiet) -> None:
    agent.stop()

    code, stdout, stderr = zlh("backup", "run", "box", *quiet)

    assert (code, stdout) == (6, "")  # the agent did not answer
    assert stderr == (f"zlh: error: 1 of 1 backups failed: box: agent at "
                      f"http://127.0.0.1:{agent.port} does not answer (connection refused)\n")


def test_a_backup_refused_while_a_restore_runs_exits_5(tmp_path, monkeypatch,
                                                         capsys) -> None:
    monkeypatch.setenv("ZLH_RESTORE_PAUSE", "staged")  # the restore holds once staged
    box = AgentProcess(tmp_path / "box").start()
    monkeypatch.delenv("ZLH_RESTORE_PAUSE")
    restoring: threading.Thread | None = None
    try:
        world = box.root / "srv" / "world"
        world.mkdir(parents=True)
        (world / "level.dat").write_bytes(os.urandom(1024))
        spec = {"playbook": "x", "processes": [], "backup": {"paths": ["world/"]}}
        assert box.client.put("/v1/spec", json=spec).status_code == 200
        backup_id = take_backup(box)

        def restore() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the agent stops under it
                box.client.post(f"/v1/backups/{backup_id}/restore", json={}, timeout=120)

        restoring = threading.Thread(target=restore, daemon=True)
        restoring.start()
        poll(lambda: box.events("restore_paused"), 60, "the restore to hold")
        monkeypatch.setenv("ZLH_HOME", str(tmp_path / "zlh"))
        token = tmp_path / "zlh/box.token"
        write_secret(token, box.token)
        with Inventory(tmp_path / "zlh/inventory.db") as inventory:
            inventory.add(Server(name="box", playbook="x", provider="local",
                                 address="127.0.0.1", agent_port=box.port,
                                 token_path=str(token), step="ready"))

        code = run(["backup", "run", "box", "--quiet"])

        err = capsys.readouterr().err
        assert code == 5, err
        assert "under way" in err and err.count("\n") == 1
    finally:
        box.stop()
        if restoring is not None:
            restoring.join(30)


def test_a_tampered_archive_is_refused_with_exit_10_and_the_world_is_untouched(agent,
                                                                              zlh) -> None:
    backup_id = take_backup(agent)
    level = agent.root / "srv/world/level.dat"
    before = level.read_bytes()
    archive = agent.root / "state/backups" / f"{backup_id}.tar.zst"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))

    code, _, err = zlh("backup", "restore", "box", backup_id)

    assert code == 10, err
    assert err.startswith("zlh: error: agent: ") and err.count("\n") == 1
    assert level.read_bytes() == before
