"""The proxmox provider against the API double, through proxmoxer over TLS.

The double answers as Proxmox does and checks every request against the published
schema, so a parameter the provider gets wrong fails here as it would on a cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from components import minetest_server
from pve import PveDouble
from pve.double import DEFAULT_TEMPLATE, Node

from zlh import opconfig
from zlh.errors import NotFoundError, ProvisionError, UsageError, ZlhError
from zlh.inventory import write_secret
from zlh.playbooks import load_playbook
from zlh.providers.proxmox import ProxmoxProvider, pick_address
from zlh.pve import ProxmoxError, PveClient

ZLH = [sys.executable, "-c", "from zlh.cli import main; main()"]
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP+/k3y=example operator@laptop"


class Cluster:
    """The double, an operator config pointing at it, and providers built from that."""

    def __init__(self, tmp: Path, double: PveDouble) -> None:
        self.tmp = tmp
        self.pve = double
        self.secret_file = tmp / "pve-token"
        write_secret(self.secret_file, double.add_token("root@pam", "zlh"))
        key_file = tmp / "id.pub"
        key_file.write_text(SSH_KEY + "\n")
        self.settings: dict[str, Any] = {
            "host": "127.0.0.1", "port": double.port, "user": "root@pam",
            "token_id": "zlh", "token_secret_file": str(self.secret_file),
            "verify": str(double.ca_path), "storage": "local-lvm", "bridge": "vmbr0",
            "template": DEFAULT_TEMPLATE, "ssh_public_key_file": str(key_file),
            "address_timeout": 10,
        }
        if double.backing_root is not None:
            self.settings["backing_root"] = str(double.backing_root)

    def config(self, **changes: Any) -> opconfig.ProxmoxConfig:
        return opconfig.ProxmoxConfig.model_validate(self.settings | changes)

    def provider(self, playbook: str = "minetest", **changes: Any) -> ProxmoxProvider:
        return ProxmoxProvider(self.tmp / "home", self.config(**changes),
                               load_playbook(playbook))

    def write_config_file(self) -> Path:
        folder = self.tmp / "xdg-config" / "zlh"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({"proxmox": self.settings}))
        return folder.parent


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setenv("ZLH_HOME", str(tmp_path / "home"))
    nodes = (Node("pve1", mem=40 * 2**30), Node("pve2", mem=8 * 2**30),
             Node("pve3", mem=1 * 2**30, status="offline"))
    with PveDouble(tmp_path / "pve", nodes=nodes) as double:
        yield Cluster(tmp_path, double)


def test_placement_takes_the_allowed_online_node_with_most_free_memory(
    cluster: Cluster,
) -> None:
    assert cluster.provider().place(256).node == "pve2"  # pve3 has more, but is offline
    assert cluster.provider(nodes=["pve1"]).place(256).node == "pve1"
    with pytest.raises(ProvisionError, match=r"no online Proxmox node in pve3"):
        cluster.provider(nodes=["pve3"]).place(256)


def test_create_sends_the_tier_and_config_as_proxmox_wants_them(cluster: Cluster) -> None:
    provider = cluster.provider()
    container = provider.create_container("mt1")
    [sent] = cluster.pve.params_of("POST", "/nodes/pve2/lxc")
    assert container.vmid == 100 and container.node == "pve2"
    expected = {
        "hostname": "mt1", "vmid": "100", "ostemplate": DEFAULT_TEMPLATE,
        "rootfs": "local-lvm:2", "cores": "1", "memory": "256", "swap": "128",
        "net0": "name=eth0,bridge=vmbr0,ip=dhcp", "unprivileged": "1",
        "features": "nesting=1", "onboot": "1", "start": "0",
        "tags": "zlh;game;minetest", "ssh-public-keys": SSH_KEY + "\n",
    }
    assert {k: sent[k] for k in expected} == expected
    assert "zlh:name=mt1\nzlh:playbook=minetest\nzlh:tier=small\n" in sent["description"]
    # A second create of the same name finds the first container instead.
    assert provider.create_container("mt1") == provider.find("mt1")
    assert len(cluster.pve.params_of("POST", "/lxc")) == 1


def test_a_static_address_goes_into_net0(cluster: Cluster) -> None:
    provider = cluster.provider(ip="127.0.9.5/24", gateway="127.0.9.1")
    provider.create_container("mt1")
    provider.start("mt1")
    [sent] = cluster.pve.params_of("POST", "/lxc")
    assert sent["net0"] == "name=eth0,bridge=vmbr0,ip=127.0.9.5/24,gw=127.0.9.1"
    assert provider.wait_address("mt1") == "127.0.9.5"


def test_eight_provisions_racing_for_vmids_get_eight_containers(cluster: Cluster) -> None:
    cluster.pve.nextid_lag = 0.5  # every racer sees the same "next" id for a while
    names = [f"race{n}" for n in range(8)]
    barrier = threading.Barrier(len(names))
    made: dict[str, int] = {}
    errors: list[ZlhError] = []

    def provision(name: str) -> None:
        provider = cluster.provider()  # one per racer, as separate zlh processes have
        barrier.wait(timeout=10)
        try:
            made[name] = provider.create_container(name).vmid
        except ZlhError as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=provision, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert sorted(made.values()) == list(range(100, 108))
    attempts = cluster.pve.params_of("POST", "/lxc")
    assert len(attempts) > len(names), "the racers never collided: the test proves nothing"
    resources = cluster.pve.containers.values()
    assert sorted(ct.config["hostname"] for ct in resources) == names


def test_a_failed_task_reaches_the_operator_as_one_line(cluster: Cluster) -> None:
    provider = cluster.provider()
    provider.create_container("mt1")
    cluster.pve.fail_next("vzstart", "startup for container '100' failed\nsee journal")
    with pytest.raises(ProxmoxError) as caught:
        provider.start("mt1")
    assert caught.value.message == ("Proxmox task vzstart 100 on pve2 failed: "
                                    "startup for container '100' failed see journal")


def test_a_failed_create_leaves_no_container_and_a_rerun_makes_one(cluster: Cluster) -> None:
    provider = cluster.provider()
    cluster.pve.fail_next("vzcreate", "unable to create CT 100 - disk quota exceeded")
    with pytest.raises(ProxmoxError) as caught:
        provider.create_container("mt1")
    assert caught.value.message == ("Proxmox task vzcreate 100 on pve2 failed: "
                                    "unable to create CT 100 - disk quota exceeded")
    assert cluster.pve.containers == {}  # Proxmox removes what a failed create made
    assert provider.create_container("mt1").vmid == 100
    assert [ct.config["hostname"] for ct in cluster.pve.containers.values()] == ["mt1"]


def test_warnings_count_as_success(cluster: Cluster) -> None:
    provider = cluster.provider()
    provider.create_container("mt1")
    cluster.pve.warn_next("vzstart", 3)
    provider.start("mt1")
    assert provider.find("mt1").status == "running"  # type: ignore[union-attr]


def test_a_missing_template_is_named_with_the_ones_there(cluster: Cluster) -> None:
    provider = cluster.provider(template="local:vztmpl/alpine-3.19.tar.xz")
    with pytest.raises(NotFoundError) as caught:
        provider.create_container("mt1")
    assert caught.value.message == (
        "template local:vztmpl/alpine-3.19.tar.xz is not on storage local of node pve2 "
        f"(there: {DEFAULT_TEMPLATE})")
    assert cluster.pve.containers == {}
    assert provider.templates("pve1") == [DEFAULT_TEMPLATE]


def test_an_unknown_storage_is_proxmoxs_message(cluster: Cluster) -> None:
    with pytest.raises(ProxmoxError) as caught:
        cluster.provider(storage="fast-nvme").create_container("mt1")
    assert caught.value.message == \
        "Proxmox: POST nodes/pve2/lxc: storage 'fast-nvme' does not exist"
    assert caught.value.exit_code == 8


def test_a_locked_container_is_proxmoxs_message(cluster: Cluster) -> None:
    provider = cluster.provider()
    provider.create_container("mt1")
    cluster.pve.lock(100, "backup")
    with pytest.raises(ProxmoxError, match=r"^Proxmox: POST nodes/pve2/lxc/100/status/start: "
                                           r"CT is locked \(backup\)$"):
        provider.start("mt1")


@pytest.mark.parametrize("style", ["both", "inet", "ip-addresses"],
                         ids=["both-forms", "inet-only", "ip-addresses-only"])
def test_the_address_comes_after_empty_and_link_local_answers(
    cluster: Cluster, style: str
) -> None:
    cluster.pve.interface_plan = ["empty", "link-local", "link-local", "address"]
    cluster.pve.interfaces_style = style
    provider = cluster.provider()
    provider.create_container("mt1")
    assert cluster.pve.params_of("GET", "/interfaces") == []
    provider.start("mt1")
    assert provider.wait_address("mt1") == "127.77.0.101"
    assert len(cluster.pve.params_of("GET", "/interfaces")) == 4


def test_no_address_before_the_deadline_says_what_was_seen(cluster: Cluster) -> None:
    cluster.pve.interface_plan = ["link-local"]
    provider = cluster.provider()
    provider.create_container("mt1")
    provider.start("mt1")
    with pytest.raises(ProvisionError, match=r"has no address after 0.5 s; last seen: "
                                             r"lo=127.0.0.1/8, eth0=fe80::"):
        provider.wait_address("mt1", timeout=0.5)


def test_pick_address_prefers_ipv4_and_skips_link_local() -> None:
    assert pick_address(None) is None
    assert pick_address([{"name": "eth0", "inet6": "fe80::1/64"}]) is None
    assert pick_address([{"name": "eth0", "inet6": "2001:db8::5/64",
                          "ip-addresses": [{"ip-address": "192.0.2.7"}]}]) == "192.0.2.7"


def test_power_snapshot_rollback_and_delete(cluster: Cluster) -> None:
    provider = cluster.provider()
    provider.create_container("mt1")
    provider.start("mt1")
    with pytest.raises(UsageError, match="no '-'"):
        provider.snapshot("mt1", "before-update")
    provider.snapshot("mt1", "before_update", "zlh test")
    assert [s.name for s in provider.snapshots("mt1")] == ["before_update"]
    provider.shutdown("mt1")
    assert provider.find("mt1").status == "stopped"  # type: ignore[union-attr]
    provider.start("mt1")
    provider.stop("mt1")
    provider.rollback("mt1", "before_update")
    provider.start("mt1")
    provider.delete("mt1")  # stops it first: Proxmox refuses to destroy a running CT
    assert provider.find("mt1") is None and cluster.pve.containers == {}
    [destroy] = cluster.pve.params_of("DELETE", "/lxc/100")
    assert destroy["purge"] == "1" and destroy["destroy-unreferenced-disks"] == "1"


def test_a_ticket_that_expires_mid_run_is_renewed(cluster: Cluster) -> None:
    password = cluster.tmp / "pve-password"
    write_secret(password, "operator-pw")
    cluster.pve.add_user("zlh@pve", "operator-pw")
    settings = {"token_id": None, "user": "zlh@pve", "password_file": str(password)}

    client = PveClient(cluster.config(**settings, ticket_renew_s=0.3))
    cluster.pve.ticket_lifetime = 0.5
    provider = ProxmoxProvider(cluster.tmp / "home", client.config, load_playbook("minetest"),
                               client)
    provider.create_container("mt1")
    renewals = client.logins
    for _ in range(3):
        provider.start("mt1")
        provider.stop("mt1")
    # The run outlived several tickets and never saw a 401.
    assert client.logins > renewals and cluster.pve.logins == client.logins

    # A ticket revoked behind zlh's back (a cluster restart): 401, one login, retried.
    client = PveClient(cluster.config(**settings))
    assert client.get("nodes")
    cluster.pve.revoke_tickets()
    assert len(client.get("nodes")) == 3 and client.logins == 2


def test_the_token_secret_file_must_be_private(cluster: Cluster) -> None:
    cluster.secret_file.chmod(0o644)
    with pytest.raises(Exception, match=r"is open to others \(mode 0644\)"):
        PveClient(cluster.config())


def test_config_file_and_environment_overrides(cluster: Cluster,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(cluster.write_config_file()))
    assert opconfig.proxmox().port == cluster.pve.port
    monkeypatch.setenv("ZLH_PROXMOX_PORT", "9")
    monkeypatch.setenv("ZLH_PROXMOX_NODES", "pve1,pve2")
    config = opconfig.proxmox()
    assert (config.port, config.nodes) == (9, ["pve1", "pve2"])


def test_tls_to_a_server_with_another_ca_is_refused(cluster: Cluster) -> None:
    client = PveClient(cluster.config(verify="true"))  # the system CAs do not know it
    with pytest.raises(ProxmoxError, match=r"^TLS check of https://127.0.0.1:\d+ failed"):
        client.get("nodes")


# -- the whole way, through the zlh program ---------------------------------------------


@pytest.fixture
def backed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setenv("ZLH_HOME", str(tmp_path / "home"))
    with PveDouble(tmp_path / "pve", backing_root=tmp_path / "rootfs") as double:
        yield Cluster(tmp_path, double)


def test_zlh_provision_with_the_proxmox_provider_reaches_a_ready_server(
    backed: Cluster,
) -> None:
    minetest_server()
    env = {**os.environ, "ZLH_HOME": str(backed.tmp / "home"),
           "XDG_CONFIG_HOME": str(backed.write_config_file())}

    def zlh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ZLH, *args], env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=180, check=False)

    done = zlh("provision", "--provider", "proxmox", "minetest", "mt1", "--json")
    try:
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert (result["name"], result["address"]) == ("mt1", "127.0.0.1")
        listed = json.loads(zlh("servers", "list", "--json").stdout)
        [server] = [s for s in listed if s["name"] == "mt1"]
        assert server["provider"] == "proxmox"
        ct = backed.pve.containers[100]
        assert ct.status == "running" and ct.config["hostname"] == "mt1"
        keys = backed.tmp / "rootfs/100/root/.ssh/authorized_keys"
        assert keys.read_text() == SSH_KEY + "\n"
        again = zlh("provision", "--provider", "proxmox", "minetest", "mt1")
        assert again.returncode == 5 and "already exists" in again.stderr
    finally:
        gone = zlh("delete", "mt1", "--yes")
    assert gone.returncode == 0, gone.stderr
    assert backed.pve.containers == {}
    assert not (backed.tmp / "rootfs/100").exists()


# -- templates and snapshots through the CLI ----------------------------------------------


def _cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ZLH_HOME": str(cluster.tmp / "home"),
           "XDG_CONFIG_HOME": str(cluster.write_config_file())}
    return subprocess.run([*ZLH, *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, check=False)


def test_zlh_templates_lists_each_online_node_or_the_one_asked(cluster: Cluster) -> None:
    cluster.pve.add_template("local:vztmpl/alpine-3.19-default_20240207_amd64.tar.xz")
    every = _cli(cluster, "templates", "--json")
    assert every.returncode == 0, every.stderr
    found = [(t["node"], t["volid"]) for t in json.loads(every.stdout)]
    assert found == [(node, volid) for node in ("pve1", "pve2") for volid in
                     ("local:vztmpl/alpine-3.19-default_20240207_amd64.tar.xz",
                      DEFAULT_TEMPLATE)]  # pve3 is offline

    one = _cli(cluster, "templates", "--node", "pve1", "--storage", "local")
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines()[0].split() == ["NODE", "TEMPLATE", "SIZE", "FORMAT"]
    assert [line.split() for line in one.stdout.splitlines()[1:]] == [
        ["pve1", "local:vztmpl/alpine-3.19-default_20240207_amd64.tar.xz", "120.2", "MiB",
         "tzst"],
        ["pve1", DEFAULT_TEMPLATE, "120.2", "MiB", "tzst"]]

    missing = _cli(cluster, "templates", "--storage", "nfs-templates")
    assert (missing.returncode, missing.stderr) == (8, (
        "zlh: error: Proxmox: GET nodes/pve1/storage/nfs-templates/content: storage "
        "'nfs-templates' does not exist\n"))


def test_snapshots_of_a_local_server_are_refused_clearly(cluster: Cluster) -> None:
    from zlh.inventory import Inventory, Server

    with Inventory() as inventory:
        inventory.add(Server(name="here", playbook="minetest", provider="local",
                             address="127.0.0.1", step="ready", status="ready"))
    for args in (("snapshot", "here"), ("snapshot", "list", "here"),
                 ("rollback", "here", "before")):
        done = _cli(cluster, *args)
        assert (done.returncode, done.stderr) == (2, (
            "zlh: error: server here is on the local provider, which keeps no snapshots; "
            "`zlh backup run here` keeps its world\n")), args


def test_snapshot_names_and_listing_through_the_cli(cluster: Cluster) -> None:
    from zlh.inventory import Inventory, Server

    cluster.provider().create_container("mt1")
    with Inventory() as inventory:
        inventory.add(Server(name="mt1", playbook="minetest", provider="proxmox",
                             address="", step="ready", status="ready"))
    bad = _cli(cluster, "snapshot", "mt1", "before-update")
    assert (bad.returncode, bad.stderr) == (2, (
        "zlh: error: invalid snapshot name 'before-update': Proxmox wants a letter, then "
        "letters, digits or '_' (no '-')\n"))
    named = _cli(cluster, "snapshot", "mt1", "first", "-d", "before the update")
    dated = _cli(cluster, "snapshot", "mt1", "--json")
    assert named.returncode == 0 and dated.returncode == 0, named.stderr + dated.stderr
    taken = json.loads(dated.stdout)["snapshot"]
    assert re.fullmatch(r"zlh_\d{8}_\d{6}", taken)

    listed = json.loads(_cli(cluster, "snapshot", "list", "mt1", "--json").stdout)
    assert [(s["name"], s["description"]) for s in listed] == [
        ("first", "before the update"), (taken, "taken by zlh of server mt1")]
    table = _cli(cluster, "snapshot", "list", "mt1").stdout
    assert table.splitlines()[0].split() == ["SNAPSHOT", "TAKEN", "DESCRIPTION"]
    assert "first" in table and "before the update" in table

    # A stopped container is rolled back and stays stopped.
    back = _cli(cluster, "rollback", "mt1", "first")
    assert back.stdout == "mt1: rolled back to first; the container stays stopped\n", \
        back.stderr
    [rollback] = cluster.pve.params_of("POST", "/snapshot/first/rollback")
    assert rollback.get("start", "0") == "0"


def test_snapshot_names_proxmox_refuses_or_does_not_have(cluster: Cluster) -> None:
    from zlh.inventory import Inventory, Server

    cluster.provider().create_container("mt1")
    with Inventory() as inventory:
        inventory.add(Server(name="mt1", playbook="minetest", provider="proxmox",
                             address="", step="ready", status="ready"))
    # Proxmox takes upper case too; `current` and `vzdump` are its own.
    assert _cli(cluster, "snapshot", "mt1", "BeforeUpdate").returncode == 0
    for reserved in ("current", "vzdump"):
        done = _cli(cluster, "snapshot", "mt1", reserved)
        assert (done.returncode, done.stderr) == (2, (
            f"zlh: error: snapshot name '{reserved}' is reserved by Proxmox; "
            "choose another\n"))
    bad = _cli(cluster, "rollback", "mt1", "before-update")
    assert (bad.returncode, bad.stderr) == (2, (
        "zlh: error: invalid snapshot name 'before-update': Proxmox wants a letter, then "
        "letters, digits or '_' (no '-')\n"))
    unknown = _cli(cluster, "rollback", "mt1", "yesterday")
    assert (unknown.returncode, unknown.stderr) == (4, (
        "zlh: error: mt1 has no snapshot 'yesterday' (there: BeforeUpdate); "
        "see `zlh snapshot list mt1`\n"))
    assert cluster.pve.params_of("POST", "/rollback") == []
    assert [s.name for s in cluster.provider().snapshots("mt1")] == ["BeforeUpdate"]


# -- the operator's config, as zlh reads it ------------------------------------------------


def _line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def _secret_dir(cluster: Cluster) -> Path:
    folder = cluster.tmp / "secret-folder"
    folder.mkdir(mode=0o700)
    return folder


@pytest.mark.parametrize(
    ("make", "problem"),
    [(lambda c: c.tmp / "no-such-file", "secret file {path} does not exist"),
     (lambda c: c.secret_file.chmod(0o640) or c.secret_file,
      "secret file {path} is open to others (mode 0640); run: chmod 600 {path}"),
     (_secret_dir, "secret file {path} is not a regular file")],
    ids=["missing", "group-readable", "a-folder"],
)
def test_a_token_secret_file_problem_names_the_file_line_and_key(
    cluster: Cluster, make: Any, problem: str,
) -> None:
    secret = cluster.secret_file.read_text().strip()
    cluster.settings["token_secret_file"] = str(make(cluster))
    done = _cli(cluster, "templates")
    config = cluster.tmp / "xdg-config/zlh/config.yaml"
    line = _line_of(config, "token_secret_file:")
    problem = problem.format(path=cluster.settings["token_secret_file"])
    assert (done.returncode, done.stderr) == (3, (
        f"zlh: error: {config}:{line}: proxmox.token_secret_file: {problem}\n"))
    assert secret not in done.stdout + done.stderr


def test_a_refused_token_is_named_and_its_secret_is_not_printed(cluster: Cluster) -> None:
    write_secret(cluster.secret_file, "0b8cf3e0-5c55-4a61-9b52-8f5b0ad0c0de")
    done = _cli(cluster, "templates")
    config = cluster.tmp / "xdg-config/zlh/config.yaml"
    line = _line_of(config, "token_secret_file:")
    assert (done.returncode, done.stderr) == (3, (
        "zlh: error: Proxmox: GET cluster/resources: invalid token value! (API token "
        f"root@pam!zlh, its secret from {config}:{line}: proxmox.token_secret_file)\n"))
    assert "0b8cf3e0" not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [("proxmox:\n  - host: pve1\n", 1,
      "proxmox: should be a mapping (key: value lines), not a list"),
     ("ssh: 22\n", 1, "ssh: should be a mapping (key: value lines), not a number"),
     ("- proxmox\n", 1, "should be a mapping (key: value lines), not a list")],
    ids=["a-list", "a-number", "no-mapping"],
)
def test_a_config_section_that_is_no_mapping_is_named(cluster: Cluster, text: str, line: int,
                                                      problem: str) -> None:
    folder = cluster.tmp / "xdg-config/zlh"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(text)
    env = {**os.environ, "ZLH_HOME": str(cluster.tmp / "home"),
           "XDG_CONFIG_HOME": str(folder.parent)}
    done = subprocess.run([*ZLH, "templates"], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (
        3, f"zlh: error: {folder / 'config.yaml'}:{line}: {problem}\n")
