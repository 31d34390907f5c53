"""Tiers, quotas and the agent's disk watch."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.agentfix import AgentProcess, poll
from zlh import codeserver, inventory, tiers
from zlh.errors import ConflictError, UsageError
from zlh.playbooks import Resources, load_playbook

ZLH = [sys.executable, "-c", "from zlh.cli import main; main()"]
TINY = {"memory_mb": 256, "cores": 1, "disk_gb": 1, "swap_mb": 0}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ZLH, *args], env=env, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL, timeout=240)


@pytest.fixture
def operator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """ZLH_HOME and XDG_CONFIG_HOME in tmp_path, for this process and for `zlh` runs."""
    home, config = tmp_path / "zlh", tmp_path / "config"
    home.mkdir(mode=0o700)
    (config / "zlh").mkdir(parents=True)
    monkeypatch.setenv("ZLH_HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    env = {**os.environ}
    env.pop("ZLH_DEBUG", None)
    yield env


def _configure(env: dict[str, str], **sections: object) -> None:
    path = Path(env["XDG_CONFIG_HOME"]) / "zlh/config.yaml"
    # Keys of other parts of zlh sit in the same file; they must not disturb the tiers.
    path.write_text(yaml.safe_dump({"artifacts_url": "http://127.0.0.1:1/", **sections}))


# -- resolving a tier ------------------------------------------------------------------


@pytest.mark.parametrize(("configured", "asked", "source", "memory"), [
    ({}, None, "playbook", 1280),
    ({}, "large", "playbook", 4096),
    ({"small": TINY}, None, "operator config", 256),
    ({"huge": {**TINY, "memory_mb": 8192}}, "huge", "operator config", 8192),
], ids=["playbook-default", "playbook-named", "config-overrides", "config-only"])
def test_a_tier_comes_from_config_then_playbook(
    operator: dict[str, str], configured: dict, asked: str | None, source: str, memory: int
) -> None:
    _configure(operator, tiers=configured)

    tier = tiers.for_request(load_playbook("dev-node"), asked)

    assert (tier.source, tier.resources.memory_mb) == (source, memory)


def test_a_built_in_tier_fills_in_what_the_playbook_lacks(operator: dict[str, str]) -> None:
    tier = tiers.for_request(load_playbook("minetest"), "large")

    assert (tier.source, tier.resources) == ("built-in", tiers.DEFAULT_TIERS["large"])
    assert tier.disk_limit_bytes == 40 * 2**30


def test_an_unknown_tier_is_a_usage_error(operator: dict[str, str]) -> None:
    _configure(operator, tiers={"gpu": TINY})

    with pytest.raises(UsageError) as info:
        tiers.for_request(load_playbook("dev-node"), "xl")

    assert str(info.value) == "--tier xl: no such tier; known: gpu, large, medium, small"


def test_a_bad_tier_in_the_config_names_the_line(operator: dict[str, str]) -> None:
    _configure(operator, tiers={"small": {**TINY, "cores": 0}})

    with pytest.raises(Exception) as info:
        tiers.load_config()

    assert "config.yaml:" in str(info.value) and "tiers.small.cores" in str(info.value)


# -- quotas ----------------------------------------------------------------------------


def _server(name: str, owner: str, memory_mb: int) -> inventory.Server:
    return inventory.Server(name=name, playbook="dev-node", provider="local", owner=owner,
                            tier="small", resources={**TINY, "memory_mb": memory_mb})


def _tier(memory_mb: int) -> tiers.Tier:
    return tiers.Tier("small", Resources(**{**TINY, "memory_mb": memory_mb}), "playbook")


@pytest.mark.parametrize(("limits", "message"), [
    ({"servers_per_owner": 2},
     ("quota: owner ann already has 2 server(s) and the limit is 2 (servers_per_owner, "
     "limits in the operator config)")),
    ({"total_memory_mb": 4000},
     ("quota: tier small needs 1024 MiB; with the 3072 MiB already given out that is "
     "4096 MiB, over the limit of 4000 MiB (total_memory_mb, limits in the operator config)")),
], ids=["servers-per-owner", "total-memory"])
def test_a_server_over_a_limit_is_refused(
    operator: dict[str, str], limits: dict, message: str
) -> None:
    _configure(operator, limits=limits)
    with inventory.Inventory() as db:
        db.add(_server("a1", "ann", 1024))
        db.add(_server("a2", "ann", 1024))
        db.add(_server("b1", "team2", 1024))

    with pytest.raises(ConflictError) as info:
        tiers.admit("ann", _tier(1024))

    assert str(info.value) == message


@pytest.mark.parametrize(("limits", "owner"), [
    ({}, "ann"),
    ({"servers_per_owner": 2}, "team2"),
    ({"total_memory_mb": 4096}, "ann"),
], ids=["no-limits", "other-owner-has-room", "exactly-at-the-memory-limit"])
def test_a_server_within_the_limits_is_admitted(
    operator: dict[str, str], limits: dict, owner: str
) -> None:
    _configure(operator, limits=limits)
    with inventory.Inventory() as db:
        db.add(_server("a1", "ann", 1024))
        db.add(_server("a2", "ann", 2048))

    tiers.admit(owner, _tier(1024))


# A game that is ready at once: six provisions cost seconds, not minutes.
QUICK_GAME = {
    "name": "quick", "kind": "game", "tier": "small",
    "resources": {"small": {"cores": 1, "memory_mb": 64, "disk_gb": 1}},
    "processes": {"game": {"argv": ["sh", "-c", "echo up; exec sleep 600"],
                           "stop": {"grace": 5},
                           "readiness": {"type": "log", "pattern": "^up$"}}},
}
# Each process imports zlh, says so, and waits for a shared lock the test holds until all
# six are there; released together, they register at the same moment.
AT_ONCE = ("import fcntl, sys, zlh.cli, zlh.provision\n"
           "gate = open(sys.argv.pop(1))\n"
           "print('waiting', flush=True)\n"
           "fcntl.flock(gate, fcntl.LOCK_SH)\n"
           "zlh.cli.main()\n")
QUOTA_REFUSAL = ("zlh: error: provisioning {name}: step registered failed: quota: owner ann "
                 "already has 2 server(s) and the limit is 2 (servers_per_owner, limits in "
                 "the operator config)\n")


def test_provisions_at_once_never_pass_the_quota_together(
    operator: dict[str, str], tmp_path: Path
) -> None:
    import fcntl

    _configure(operator, limits={"servers_per_owner": 2})
    (tmp_path / "playbooks").mkdir()
    (tmp_path / "playbooks/quick.yaml").write_text(yaml.safe_dump(QUICK_GAME))
    env = {**operator, "ZLH_PLAYBOOKS": str(tmp_path / "playbooks")}
    gate = tmp_path / "gate"
    gate.touch()
    names = [f"q{index}" for index in range(6)]

    with open(gate) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        runs = [subprocess.Popen([sys.executable, "-c", AT_ONCE, str(gate), "provision",
                                  "quick", name, "--owner", "ann", "--json"],
                                 env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
                for name in names]
        for run in runs:
            assert run.stdout is not None and run.stdout.readline() == "waiting\n"
    try:
        results = {name: (run.wait(timeout=240), run.stderr.read())  # type: ignore[union-attr]
                   for name, run in zip(names, runs)}
        servers = json.loads(_run(operator, "servers", "list", "--json").stdout)
        containers = sorted(p.name for p in (Path(operator["ZLH_HOME"]) / "containers").iterdir())
    finally:
        for name in names:
            _run(operator, "delete", name, "--yes")

    admitted = sorted(name for name, (code, _) in results.items() if code == 0)
    refused = {name: result for name, result in results.items() if name not in admitted}
    assert len(admitted) == 2, results
    assert refused == {name: (5, QUOTA_REFUSAL.format(name=name)) for name in refused}
    assert sorted((s["name"], s["step"], s["owner"]) for s in servers) == [
        (name, "ready", "ann") for name in admitted]
    assert containers == admitted


@pytest.mark.parametrize(("args", "config", "code", "error"), [
    (["--tier", "xl"], {}, 2,
     "zlh: error: --tier xl: no such tier; known: large, medium, small\n"),
    (["--owner", "ann"], {"limits": {"servers_per_owner": 0}}, 5,
     ("zlh: error: provisioning dev1: step registered failed: quota: owner ann already has "
     "0 server(s) and the limit is 0 (servers_per_owner, limits in the operator config)\n")),
    (["--tier", "large"], {"limits": {"total_memory_mb": 2048}}, 5,
     ("zlh: error: provisioning dev1: step registered failed: quota: tier large needs 4096 "
     "MiB; with the 0 MiB already given out that is 4096 MiB, over the limit of 2048 MiB "
     "(total_memory_mb, limits in the operator config)\n")),
], ids=["unknown-tier", "owner-quota", "memory-quota"])
def test_provision_refuses_and_registers_nothing(
    operator: dict[str, str], args: list[str], config: dict, code: int, error: str
) -> None:
    _configure(operator, **config)

    done = _run(operator, "provision", "dev-node", "dev1", *args)

    assert (done.returncode, done.stdout, done.stderr) == (code, "", error)
    assert json.loads(_run(operator, "servers", "list", "--json").stdout) == []
    assert not (Path(operator["ZLH_HOME"]) / "containers/dev1").exists()


@pytest.mark.parametrize(("text", "error"), [
    ("- tiers\n- limits\n",
     "config/zlh/config.yaml:1: should be a mapping (key: value lines), not a list"),
    ("tiers:\n  tiny: &t {memory_mb: 256, cores: 1, disk_gb: 1}\n  Tiny: *t\n",
     "config/zlh/config.yaml:3: tiers.Tiny: not a tier name (lowercase letters, digits, '_')"),
    ("limits: {servers_per_owner: 0}\nssh: {bogus: 1}\n",
     "config/zlh/config.yaml:2: ssh.bogus: unknown key"),
], ids=["list", "tier-name", "other-section"])
def test_a_malformed_operator_config_registers_nothing(
    operator: dict[str, str], tmp_path: Path, text: str, error: str
) -> None:
    # A list had been read as "no tiers, no limits": the server was registered past
    # the quota, then failed at container-created (exit 8), and a re-run finished it.
    (Path(operator["XDG_CONFIG_HOME"]) / "zlh/config.yaml").write_text(text)

    done = subprocess.run([*ZLH, "provision", "dev-node", "dev1", "--owner", "ann"],
                          env=operator, cwd=tmp_path, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=240, check=False)

    assert (done.returncode, done.stdout, done.stderr) == (3, "", f"zlh: error: {error}\n")
    assert json.loads(_run(operator, "servers", "list", "--json").stdout) == []
    assert not (Path(operator["ZLH_HOME"]) / "containers/dev1").exists()


@pytest.mark.parametrize("text", ["", "# nothing yet\n"], ids=["empty", "comments"])
def test_an_empty_operator_config_is_no_config(operator: dict[str, str], text: str) -> None:
    from zlh import opconfig

    (Path(operator["XDG_CONFIG_HOME"]) / "zlh/config.yaml").write_text(text)

    assert opconfig.load().ssh == opconfig.SshConfig()
    assert tiers.load_config() == tiers.TierConfig()


def test_dev_dotnet_is_refused_before_anything_is_registered(operator: dict[str, str]) -> None:
    # The catalog's dotnet 8.0 is unavailable: no container without its runtime.
    done = _run(operator, "provision", "dev-dotnet", "dn1")

    assert (done.returncode, done.stdout) == (4, "")
    assert done.stderr == (
        "zlh: error: playbook dev-dotnet: dotnet@8.0: not installable here: no registry zlh "
        "builds artifacts from (PyPI, npm, Debian) carries the .NET 8 SDK; put an SDK archive "
        "on the artifact server and list it under artifacts instead (catalogs/runtimes.yaml)\n")
    assert json.loads(_run(operator, "servers", "list", "--json").stdout) == []
    assert not (Path(operator["ZLH_HOME"]) / "containers/dn1").exists()


def test_provision_stores_tier_and_owner_and_gives_the_agent_the_disk_limit(
    operator: dict[str, str]
) -> None:
    from tests.codeserverfix import code_server_cache
    from tests.components import cache_root

    code_server_cache()
    home = Path(operator["ZLH_HOME"])
    (home / "cache").symlink_to(cache_root(), target_is_directory=True)
    try:
        done = _run(operator, "provision", "dev-python", "dev2", "--tier", "medium",
                    "--owner", "ann", "--json")
        assert done.returncode == 0, done.stderr
        with inventory.Inventory() as db:
            row = db.get("dev2")
        token = (home / "containers/dev2/etc/zlh/agent.token").read_text().strip()
        import httpx

        spec = httpx.get(f"http://127.0.0.1:{row.agent_port}/v1/spec",
                         headers={"Authorization": f"Bearer {token}"}).json()
    finally:
        _run(operator, "delete", "dev2", "--yes")

    assert (row.owner, row.tier, row.resources) == (
        "ann", "medium", {"cores": 2, "memory_mb": 2048, "swap_mb": 1024, "disk_gb": 20})
    assert spec["disk_limit_bytes"] == 20 * 2**30
    assert [p["kind"] for p in spec["processes"]] == ["ide", "service"]


# -- the inventory's migration -----------------------------------------------------------


def test_an_inventory_of_schema_1_gains_owner_tier_and_resources(tmp_path: Path) -> None:
    path = tmp_path / "inventory.db"
    db = sqlite3.connect(path)
    old = inventory.SCHEMA.replace(
        "    owner TEXT,\n    tier TEXT,\n    resources TEXT NOT NULL DEFAULT '{}',\n", "")
    db.executescript(old + "PRAGMA user_version = 1;")
    db.execute("INSERT INTO servers (name, playbook, provider, status, created_at, "
               "updated_at) VALUES ('old', 'minetest', 'local', 'ready', 1, 1)")
    db.commit()
    db.close()

    with inventory.Inventory(path) as migrated:
        kept = migrated.get("old")
        migrated.update("old", owner="ann")
        version = migrated._db.execute("PRAGMA user_version").fetchone()[0]

    assert (kept.owner, kept.tier, kept.resources, kept.status) == (None, None, {}, "ready")
    assert version == inventory.SCHEMA_VERSION == 2


# -- the agent's disk watch --------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    running = AgentProcess(tmp_path / "agent", sample_interval=0.1, disk_check_interval=0.1)
    try:
        yield running.start()
    finally:
        running.stop()


def _disk(agent: AgentProcess) -> dict:
    assert agent.client is not None
    return dict(agent.client.get("/v1/status").json()["disk"] or {})


def test_disk_use_near_the_limit_is_a_warning_in_status_and_log(agent: AgentProcess) -> None:
    assert agent.client is not None
    srv = agent.root / "srv"
    answer = agent.client.put("/v1/spec", json={"processes": [],
                                                "disk_limit_bytes": 1_000_000})
    assert answer.status_code == 200
    (srv / "small").write_bytes(os.urandom(400_000))
    calm = poll(lambda: (d := _disk(agent)).get("tree_bytes") and d, 10, "a disk figure")

    (srv / "world").mkdir()
    (srv / "world/region").write_bytes(os.urandom(520_000))
    warned = poll(lambda: (d := _disk(agent)).get("warning") and d, 10, "a disk warning")

    assert calm["warning"] is None and calm["limit_bytes"] == 1_000_000
    assert warned["tree_bytes"] >= 900_000
    assert warned["warning"].startswith(f"disk near the limit: {srv} holds")
    [record] = agent.events("disk_near_limit")
    assert record["level"] == "warning" and record["limit_bytes"] == 1_000_000


def test_a_dev_workspace_counts_against_the_tier_and_zlh_status_warns(
    operator: dict[str, str], tmp_path: Path
) -> None:
    # The watch had added up the server root only: a dev container's workspace filled
    # past its tier's disk and neither the agent nor zlh status said a word.
    from zlh import records

    box = AgentProcess(tmp_path / "box", sample_interval=0.1, disk_check_interval=0.1)
    # root "..": the folder is laid out as a container, as on the local provider.
    box.config_path.write_text(box.config_path.read_text() + "root: ..\n")
    box.start()
    try:
        assert box.client is not None
        box.client.put("/v1/spec", json={"processes": [], "disk_limit_bytes": 2_000_000})
        workspace = box.root / "home/dev/workspace"
        workspace.mkdir(parents=True)
        (workspace / "data.bin").write_bytes(os.urandom(1_900_000))
        warned = poll(lambda: (d := _disk(box)).get("warning") and d, 10, "a disk warning")
        records.add(inventory.Server(
            name="box", playbook="dev-node", provider="local", address="127.0.0.1",
            agent_port=box.port, token_path=str(box.root / "etc/agent.token"),
            step="ready", status="ready"))
        shown = _run(operator, "status", "box")
        as_json = json.loads(_run(operator, "status", "box", "--json").stdout)
        checked = json.loads(_run(operator, "check", "box", "--json").stdout)
    finally:
        box.stop()

    assert warned["tree_bytes"] >= 1_900_000
    message = f"disk near the limit: {box.root} holds 2 MiB of 2 MiB (9"
    assert warned["warning"].startswith(message)
    assert shown.returncode == 0, shown.stderr
    lines = [" ".join(line.split()) for line in shown.stdout.splitlines()]
    assert any(line.startswith("disk used ") and line.endswith(" MiB of the tier's 1.9 MiB")
               for line in lines), shown.stdout
    assert any(line.startswith(f"warning {message}") for line in lines), shown.stdout
    assert (as_json["disk_limit_bytes"], as_json["disk_warning"]) == (2_000_000,
                                                                     warned["warning"])
    [tier_check] = [c for c in checked["checks"] if c["name"] == "disk within tier"]
    assert not tier_check["ok"] and tier_check["detail"].startswith(message)


def test_without_a_limit_there_is_no_warning(agent: AgentProcess) -> None:
    (agent.root / "srv/big").write_bytes(os.urandom(2_000_000))

    disk = poll(lambda: (d := _disk(agent)).get("tree_bytes") and d, 10, "a disk figure")

    assert disk["limit_bytes"] is None and disk["warning"] is None
    assert agent.events("disk_near_limit") == []


# -- the dev playbooks -------------------------------------------------------------------

DEV_PLAYBOOKS = ["dev-dotnet", "dev-java", "dev-node", "dev-python"]
RUNTIME_OF = {"dev-java": "jdk"}  # the others are named after their runtime


@pytest.mark.parametrize("name", DEV_PLAYBOOKS, ids=DEV_PLAYBOOKS)
def test_a_dev_playbook_names_its_runtime_tier_and_ide(name: str) -> None:
    playbook = load_playbook(name)

    assert (playbook.kind, playbook.tier, playbook.problems()) == ("dev", "small", [])
    assert playbook.dev is not None and playbook.dev.code_server and playbook.dev.ssh
    assert playbook.ports["ide"].protocol == "tcp" and playbook.processes == {}
    assert [r.name for r in playbook.runtimes] == [
        RUNTIME_OF.get(name, name.removeprefix("dev-"))]
    assert playbook.resources["small"].memory_mb == 1280


@pytest.mark.parametrize("ports", [
    {},
    {"ide": {"protocol": "udp"}},
], ids=["no-ide-port", "udp-ide-port"])
def test_code_server_needs_a_tcp_port_named_ide(tmp_path: Path, ports: dict) -> None:
    from zlh.errors import ConfigError

    path = tmp_path / "dev-x.yaml"
    path.write_text(yaml.safe_dump({
        "name": "dev-x", "kind": "dev", "tier": "small", "ports": ports,
        "resources": {"small": TINY}, "dev": {"code_server": True},
    }))

    with pytest.raises(ConfigError) as info:
        load_playbook(path)

    assert str(info.value).endswith(
        "dev.code_server: needs a tcp port named ide and no process named ide")


class _Provider:
    def __init__(self, root: Path, in_container: bool | None) -> None:
        self.name = "test"
        self.root = root
        if in_container is not None:
            self.agent_in_container = in_container

    def folder(self, name: str) -> Path:
        return self.root / name


@pytest.mark.parametrize(("in_container", "user"), [
    (None, None), (False, None), (True, "dev"),
], ids=["local-like", "backing-folder", "agent-in-container"])
def test_the_ide_process_spec(tmp_path: Path, in_container: bool | None,
                              user: str | None) -> None:
    from agentd.models import ServerSpec
    from zlh import devcontainer

    record = inventory.Server(name="dev3", playbook="dev-node", provider="test",
                              ports={"ide": 41000, "ssh": 41001},
                              resources={**TINY, "disk_gb": 3})
    spec = devcontainer.complete_spec(ServerSpec(playbook="dev-node"),
                                      load_playbook("dev-node"), record,
                                      _Provider(tmp_path, in_container))

    ide, ssh = spec.processes
    root = tmp_path / "dev3"
    assert (ssh.name, ssh.kind, ssh.user) == ("ssh", "service", None)
    sshd = ["/usr/sbin/sshd", "-D", "-e", "-f", str(root / "etc/zlh/sshd/sshd_config")]
    if in_container:
        # A container's start empties /run, where sshd's privilege separation folder is.
        assert ssh.argv == ["/bin/sh", "-c", "mkdir -p -m 0755 /run/sshd && exec "
                            + " ".join(sshd)]
    else:
        assert ssh.argv == sshd
    assert (ide.name, ide.kind, ide.user, ide.port) == ("ide", "ide", user, 41000)
    assert ide.env_files == {"PASSWORD": "etc/zlh/ide.password"} and "PASSWORD" not in ide.env
    assert ide.cwd == str(root / "home/dev/workspace") and ide.argv[-1] == ide.cwd
    assert ide.argv[ide.argv.index("--bind-addr") + 1] == "127.0.0.1:41000"
    # The catalog's node by its path (not PATH's), zlh's config (not one code-server writes).
    assert ide.argv[:2] == [str(root / "opt/zlh/runtimes/node/20.18.0/bin/node"),
                            str(root / "opt/zlh/code-server" / codeserver.ENTRY)]
    assert ide.argv[ide.argv.index("--config") + 1] == str(root / codeserver.CONFIG_FILE)
    assert ide.restart.policy == "on-failure" and ide.stop.signal == "SIGTERM"
    assert spec.disk_limit_bytes == 3 * 2**30
