"""The inventory database, secret files and the state folder."""

from __future__ import annotations

import multiprocessing
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from zlh.errors import ConfigError, ConflictError, NotFoundError, UsageError
from zlh.inventory import Inventory, Server, read_secret, write_secret
from zlh.paths import config_path, zlh_home

RACERS = 6
JOIN_SECONDS = 60


@pytest.fixture()
def inventory(tmp_path: Path) -> Iterator[Inventory]:
    with Inventory(tmp_path / "inventory.db") as inv:
        yield inv


def server(name: str = "alpha", **fields: Any) -> Server:
    return Server(**({"name": name, "playbook": "minetest", "provider": "local"} | fields))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- servers ---------------------------------------------------------------------------


def test_add_then_get_returns_the_stored_server(inventory: Inventory) -> None:
    added = inventory.add(server(ports={"game": 30000}, values={"motd": "hi"}))

    got = inventory.get("alpha")

    assert got == added
    assert (got.ports, got.values, got.status) == ({"game": 30000}, {"motd": "hi"},
                                                   "provisioning")
    assert got.created_at == got.updated_at > 0


def test_add_twice_is_a_conflict(inventory: Inventory) -> None:
    inventory.add(server())

    with pytest.raises(ConflictError, match="a server named alpha already exists"):
        inventory.add(server(provider="proxmox"))

    assert inventory.get("alpha").provider == "local"


@pytest.mark.parametrize(
    "name",
    ["", "Alpha", "1st", "-a", "a_b", "a.b", "a" * 32, "ä"],
    ids=["empty", "upper", "digit-first", "dash-first", "underscore", "dot", "too-long",
         "non-ascii"],
)
def test_invalid_names_are_usage_errors(inventory: Inventory, name: str) -> None:
    with pytest.raises(UsageError, match="invalid server name"):
        inventory.add(server(name))


def test_longest_valid_name(inventory: Inventory) -> None:
    name = "a" + "b-9" * 10

    assert inventory.add(server(name)).name == name


def test_update_changes_fields_and_time(inventory: Inventory) -> None:
    before = inventory.add(server())

    after = inventory.update("alpha", status="ready", step="done", address="127.0.0.1",
                             agent_port=41000, ports={"game": 30001})

    assert (after.status, after.step, after.address, after.agent_port, after.ports) == (
        "ready", "done", "127.0.0.1", 41000, {"game": 30001}
    )
    assert after.created_at == before.created_at
    assert after.updated_at >= before.updated_at
    assert inventory.get("alpha") == after


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"name": "beta"}, TypeError),
        ({"colour": "red"}, TypeError),
        ({"status": "happy"}, ValueError),
    ],
    ids=["name", "unknown-field", "bad-status"],
)
def test_update_refuses_bad_changes(
    inventory: Inventory, changes: dict[str, object], error: type[Exception]
) -> None:
    inventory.add(server())

    with pytest.raises(error):
        inventory.update("alpha", **changes)


@pytest.mark.parametrize(
    "action",
    ["get", "update", "remove", "record", "history"],
    ids=["get", "update", "remove", "record", "history"],
)
def test_unknown_server_is_not_found(inventory: Inventory, action: str) -> None:
    calls: dict[str, Callable[[], object]] = {
        "get": lambda: inventory.get("ghost"),
        "update": lambda: inventory.update("ghost", step="x"),
        "remove": lambda: inventory.remove("ghost"),
        "record": lambda: inventory.record("ghost", "created"),
        "history": lambda: inventory.history("ghost"),
    }

    with pytest.raises(NotFoundError, match="no server named 'ghost'"):
        calls[action]()


def test_find_list_and_remove(inventory: Inventory) -> None:
    for name in ("charlie", "alpha", "bravo"):
        inventory.add(server(name))

    inventory.remove("bravo")

    assert [s.name for s in inventory.list()] == ["alpha", "charlie"]
    assert inventory.find("bravo") is None


def test_history_in_order_and_removed_with_the_server(inventory: Inventory) -> None:
    inventory.add(server())
    inventory.record("alpha", "created", "local")
    inventory.record("alpha", "step", "agent started")

    events = [(e.event, e.detail) for e in inventory.history("alpha")]
    inventory.remove("alpha")
    inventory.add(server())

    assert events == [("created", "local"), ("step", "agent started")]
    assert inventory.history("alpha") == []


def test_database_is_in_wal_mode_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "inv.db"
    with Inventory(path) as first:
        first.add(server())
        journal = first._db.execute("PRAGMA journal_mode").fetchone()[0]

    with Inventory(path) as second:
        assert (journal, second.get("alpha").name) == ("wal", "alpha")


def _race_to_add(path: str, name: str, barrier: Any, results: Any) -> None:
    barrier.wait(JOIN_SECONDS)
    try:
        with Inventory(Path(path)) as inv:
            inv.add(Server(name=name, playbook="minetest", provider=f"p{os.getpid()}"))
        outcome = "won"
    except ConflictError:
        outcome = "conflict"
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        outcome = f"{type(exc).__name__}: {exc}"
    results.put(outcome)


def test_concurrent_add_of_one_name_has_one_winner(tmp_path: Path) -> None:
    # The processes also race to create the database: it does not exist yet.
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(RACERS)
    results = context.Queue()
    path = tmp_path / "race.db"
    racers = [
        context.Process(target=_race_to_add, args=(str(path), "contested", barrier, results))
        for _ in range(RACERS)
    ]
    for racer in racers:
        racer.start()

    outcomes = sorted(results.get(timeout=JOIN_SECONDS) for _ in racers)
    for racer in racers:
        racer.join(JOIN_SECONDS)

    assert outcomes == ["conflict"] * (RACERS - 1) + ["won"]
    assert [r.exitcode for r in racers] == [0] * RACERS
    with Inventory(path) as inv:
        assert [s.name for s in inv.list()] == ["contested"]


# -- secrets ---------------------------------------------------------------------------


@pytest.fixture()
def open_umask() -> Iterator[None]:
    """A umask of 0: a file created the plain way would be readable by everyone."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_secret_file_is_private_even_with_an_open_umask(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "etc" / "agent.token"

    write_secret(path, "s3cret\n")

    assert (mode_of(path), read_secret(path)) == (0o600, "s3cret")


def test_secret_rewrite_replaces_it_and_stays_private(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "agent.token"
    write_secret(path, "old")

    write_secret(path, "new")

    assert (mode_of(path), read_secret(path)) == (0o600, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.token"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660], ids=["group-read", "other-read",
                                                             "group-write"])
def test_secret_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "agent.token"
    path.write_text("token")
    path.chmod(mode)

    with pytest.raises(ConfigError, match=f"mode {mode:04o}"):
        read_secret(path)


def test_missing_secret_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        read_secret(tmp_path / "nothing")


# -- paths -----------------------------------------------------------------------------


def test_zlh_home_from_env_is_created_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_umask: None
) -> None:
    monkeypatch.setenv("ZLH_HOME", str(tmp_path / "state"))

    home = zlh_home()

    assert (home, mode_of(home)) == (tmp_path / "state", 0o700)


def test_zlh_home_defaults_to_xdg_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZLH_HOME", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))

    assert zlh_home() == tmp_path / "xdg" / "zlh"


def test_relative_xdg_paths_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZLH_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/config")

    assert (zlh_home(), config_path()) == (
        tmp_path / ".local/state/zlh", tmp_path / ".config/zlh/config.yaml"
    )


def test_config_path_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))

    assert config_path() == tmp_path / "cfg" / "zlh" / "config.yaml"
