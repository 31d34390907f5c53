"""The proxmox provider's normal path: containers that zlh reaches only over SSH.

The Proxmox double's containers are chroots with their own sshd (tests/ctfix.py) on
127.77.X.Y, behind a bastion (a real sshd, as everything here). zlh is told the Proxmox
API, the bastion, the sshd port and the operator's key; it learns each container's
address from `/interfaces` and its host key from the create task's log. Provisioning,
status, console, ssh, snapshots and delete all run through the `zlh` program.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
import pytest
import yaml
from components import cache_root, free_port, minetest_server, wait_until
from ctfix import ChrootCluster, ChrootContainer, address_of, install_program
from pve import PveDouble
from pve.double import DEFAULT_TEMPLATE
from sshfix import Sshd, keygen

from zlh import devssh
from zlh import ssh as zssh
from zlh.inventory import Inventory, write_secret
from zlh.opconfig import SshConfig
from zlh.providers import remote
from zlh.providers.remote import AgentCommand, RemoteContainer, agent_wheel, unit_text

pytestmark = pytest.mark.slow

ZLH = [sys.executable, "-c", "from zlh.cli import main; main()"]
PYTHON = os.path.abspath(sys.executable)  # the venv's, as the containers see it mounted
PROVISION_TIMEOUT = 240


@dataclass
class SshCluster:
    tmp: Path
    pve: PveDouble
    cts: ChrootCluster
    bastion: Sshd
    env: dict[str, str]
    names: set[str] = field(default_factory=set)

    def zlh(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ZLH, *args], env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, check=False)

    def provision(self, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        self.names.add(name)
        return self.zlh("provision", "--provider", "proxmox", "minetest", name, "--json",
                        *extra, timeout=PROVISION_TIMEOUT)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*ZLH, *args], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)

    def game(self, name: str) -> dict[str, Any]:
        done = self.zlh("status", name, "--json")
        assert done.returncode == 0, done.stderr
        [game] = [p for p in json.loads(done.stdout)["processes"] if p["kind"] == "game"]
        return game

    def folder(self, vmid: int) -> Path:
        return self.cts.root / str(vmid)

    def forwarded_to(self, address: str) -> int:
        """How many channels the bastion opened to `address`'s sshd."""
        text = (self.bastion.folder / "sshd.log").read_text(errors="replace")
        return text.count(f"target {address} port {self.cts.port}")


@pytest.fixture
def ssh_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SshCluster]:
    minetest_server()
    key = keygen(tmp_path / "id_ed25519", "operator")
    # DEBUG1: the bastion logs each direct-tcpip channel it opens, and where to.
    bastion = Sshd(tmp_path / "bastion", key, bastion=True, extra=("LogLevel DEBUG1",))
    bastion.start()
    cts = ChrootCluster(tmp_path / "cts", free_port())
    env = {**os.environ, "ZLH_HOME": str(tmp_path / "home"),
           "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    env.pop("ZLH_DEBUG", None)
    monkeypatch.setenv("ZLH_HOME", env["ZLH_HOME"])
    monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
    try:
        with PveDouble(tmp_path / "pve", ssh_backing=cts) as double:
            _write_config(tmp_path, double, bastion, cts, key)
            cluster = SshCluster(tmp_path, double, cts, bastion, env)
            trusted = cluster.zlh("ssh", "trust", f"127.0.0.1:{bastion.port}")
            assert trusted.returncode == 0, trusted.stderr
            try:
                yield cluster
            finally:
                for name in sorted(cluster.names):
                    cluster.zlh("delete", name, "--yes", timeout=180)
                cts.stop_all()  # a backstop when a delete failed
    finally:
        for vmid in list(cts.containers):
            cts.destroy(vmid)
        bastion.stop()


def _write_config(tmp: Path, double: PveDouble, bastion: Sshd, cts: ChrootCluster,
                  key: Path) -> None:
    secret = tmp / "pve-token"
    write_secret(secret, double.add_token("root@pam", "zlh"))
    config = {
        "proxmox": {
            "host": "127.0.0.1", "port": double.port, "user": "root@pam", "token_id": "zlh",
            "token_secret_file": str(secret), "verify": str(double.ca_path),
            "template": DEFAULT_TEMPLATE, "ssh_public_key_file": f"{key}.pub",
            "address_timeout": 30, "agent_python": PYTHON,
        },
        "ssh": {"bastion": f"root@127.0.0.1:{bastion.port}", "identity": str(key),
                "known_hosts": str(tmp / "known_hosts"), "user": "root", "port": cts.port},
    }
    (tmp / "xdg/zlh").mkdir(parents=True)
    (tmp / "xdg/zlh/config.yaml").write_text(yaml.safe_dump(config))


def _everything_under(folder: Path) -> str:
    texts = []
    for path in folder.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode(errors="replace"))
    return "\n".join(texts)


def test_provision_over_ssh_reaches_a_ready_server_and_delete_removes_it(
    ssh_cluster: SshCluster,
) -> None:
    cluster = ssh_cluster
    address = address_of(100)

    done = cluster.provision("mt1", "--set", "server_name=over-ssh")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["name"], result["address"]) == ("mt1", address)

    # The game runs inside the container, started by an agent that runs there too.
    game = cluster.game("mt1")
    assert game["ready"] is True and game["state"] == "running"
    inside = cluster.cts.containers[100].processes()
    assert game["pid"] in inside
    console = cluster.zlh("console", "mt1", "--lines", "50")
    assert console.returncode == 0, console.stderr
    assert 'Server for gameid="minetest" listening on' in console.stdout

    # A new agent over SSH: the old one leaves, the game keeps running under the new one.
    restarted = cluster.zlh("agent", "restart", "mt1", "--json")
    assert restarted.returncode == 0, restarted.stderr
    change = json.loads(restarted.stdout)
    assert change["kept"] == {"game": game["pid"]}
    assert change["agent_pid"] != change["previous_agent_pid"]
    assert change["agent_pid"] in cluster.cts.containers[100].processes()

    # What zlh wrote is in the container's own file system, and it got there over SSH.
    root = cluster.folder(100)
    config = yaml.safe_load((root / "etc/zlh/agentd.yaml").read_text())
    assert (config["server_root"], config["bind"]) == ("/srv/zlh", "127.0.0.1")
    assert (root / "etc/zlh/agent.token").stat().st_mode & 0o777 == 0o600
    assert "server_name = over-ssh" in (root / "srv/zlh/minetest.conf").read_text()
    assert not Path("/srv/zlh/minetest.conf").exists()
    assert str(cluster.cts.root) not in _everything_under(cluster.tmp / "home")
    assert str(cluster.cts.root) not in (cluster.tmp / "xdg/zlh/config.yaml").read_text()
    assert cluster.forwarded_to(address) >= 5  # trust, layout, files, agent, its API

    # The host key came from the create task's log, and no other.
    logged = cluster.pve.params_of("GET", "/log")
    assert logged, "the create task's log was never read"
    known = paramiko.HostKeys(str(cluster.tmp / "known_hosts"))
    assert known.lookup(f"[{address}]:{cluster.cts.port}") is not None

    gone = cluster.zlh("delete", "mt1", "--yes", timeout=180)
    assert gone.returncode == 0, gone.stderr
    cluster.names.discard("mt1")
    assert cluster.pve.containers == {} and not root.exists()
    assert not any(pid for pid in inside if Path(f"/proc/{pid}").exists() and
                   Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z")
    known = paramiko.HostKeys(str(cluster.tmp / "known_hosts"))
    assert known.lookup(f"[{address}]:{cluster.cts.port}") is None


# Minetest's low-level protocol: every datagram starts with its protocol id, then the
# sender's peer id, the channel and the packet type.
MINETEST_PROTOCOL = bytes.fromhex("4f457403")


def minetest_ping(address: str, port: int) -> bytes:
    """Minetest's connect, as its server list pings servers: an original packet from peer 0
    makes the server hand out a peer id in a reliable SET_PEER_ID control packet; a
    disconnect from that peer ends it. Returns the server's answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.connect((address, port))
        sock.send(MINETEST_PROTOCOL + b"\x00\x00\x00\x01")
        answer = sock.recv(1024)
        sock.send(MINETEST_PROTOCOL + answer[12:14] + b"\x00\x00\x03")
    return answer


def test_players_reach_the_game_at_the_address_zlh_reports(ssh_cluster: SshCluster) -> None:
    cluster = ssh_cluster
    done = cluster.provision("mt4")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    address, port = result["address"], result["game_port"]
    assert address == address_of(100)

    # The game binds the container's address; the agent stays on its loopback.
    conf = (cluster.folder(100) / "srv/zlh/minetest.conf").read_text()
    assert f"bind_address = {address}\n" in conf
    agent = yaml.safe_load((cluster.folder(100) / "etc/zlh/agentd.yaml").read_text())
    assert agent["bind"] == "127.0.0.1"

    # A player's client, from this side, at the address zlh reports: the server answers
    # with a reliable (3) control packet (0) SET_PEER_ID (1).
    answer = minetest_ping(address, port)
    assert (answer[:4], answer[7], answer[10:12]) == (MINETEST_PROTOCOL, 3, b"\x00\x01")
    with pytest.raises(ConnectionRefusedError):
        minetest_ping("127.0.0.1", port)  # not this machine's port

    backends = cluster.zlh("backends", "--json")
    assert backends.returncode == 0, backends.stderr
    assert json.loads(backends.stdout) == [{"name": "mt4", "address": address, "port": port}]
    check = cluster.zlh("check", "mt4")
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"✓ udp port: {address}:{port}/udp open (no port unreachable in 1 s)\n" \
        in check.stdout

    # The check looks there too: a stopped game fails it.
    assert cluster.zlh("stop", "mt4").returncode == 0
    stopped = cluster.zlh("check", "mt4")
    assert stopped.returncode == 9, stopped.stdout + stopped.stderr
    assert (f"✗ udp port: {address}:{port}/udp: port unreachable (nothing bound there), "
            "not ready\n") in stopped.stdout
    assert json.loads(cluster.zlh("backends", "--json").stdout) == []


def test_a_provision_cut_off_after_a_step_resumes_over_ssh(ssh_cluster: SshCluster) -> None:
    cluster = ssh_cluster
    cluster.names.add("mt2")
    first = cluster.popen("provision", "--provider", "proxmox", "minetest", "mt2")

    def step() -> str | None:
        with Inventory() as inventory:
            found = inventory.find("mt2")
        return found.step if found else None

    try:
        wait_until(lambda: step() not in (None, "registered"), 120,
                   "the container to be created")
    finally:
        first.kill()  # as a machine that loses power
        first.wait(timeout=30)
    cut_at = step()
    assert cut_at != "ready"

    again = cluster.provision("mt2")
    assert again.returncode == 0, f"cut after {cut_at}: {again.stderr}"
    assert json.loads(again.stdout)["resumed"] is True
    assert list(cluster.pve.containers) == [100]
    assert cluster.game("mt2")["ready"] is True

    # Every step again, from the container on: each one is idempotent over SSH too.
    with Inventory() as inventory:
        inventory.update("mt2", step="container-created", status="provisioning")
    third = cluster.provision("mt2")
    assert third.returncode == 0, third.stderr
    assert list(cluster.pve.containers) == [100]
    assert cluster.game("mt2")["ready"] is True


def host_fingerprints(folder: Path) -> list[str]:
    """The SHA256 fingerprints of a container's host keys, as ssh-keygen prints them."""
    found = []
    for public in sorted((folder / "etc/ssh").glob("ssh_host_*_key.pub")):
        listed = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(public)],
                                capture_output=True, text=True, check=True)
        found.append(listed.stdout.split()[1])
    return found


@pytest.mark.parametrize("log_kept", [True, False], ids=["log-read-again", "log-gone"])
def test_a_provision_killed_before_it_kept_the_host_keys(
    ssh_cluster: SshCluster, log_kept: bool,
) -> None:
    cluster = ssh_cluster
    cluster.names.add("mt5")
    # Killed where it reads the create task's log, which ended OK: the container is made,
    # the fingerprints are not kept.
    cluster.pve.hold_task_logs()
    first = cluster.popen("provision", "--provider", "proxmox", "minetest", "mt5")
    try:
        assert cluster.pve.task_log_asked.wait(120), "the create task's log was never read"
    finally:
        first.kill()
        first.wait(timeout=30)
        cluster.pve.release_task_logs()
    kept = cluster.tmp / "home/proxmox/mt5/host-keys"
    assert not kept.exists() and list(cluster.pve.containers) == [100]
    if not log_kept:
        cluster.pve.tasks.clear()  # Proxmox rotated its task logs away

    again = cluster.provision("mt5")
    listed = cluster.pve.params_of("GET", "/nodes/pve1/tasks")
    assert [(p["vmid"], p["typefilter"]) for p in listed] == [("100", "vzcreate")]
    if not log_kept:
        assert again.returncode == 8
        assert again.stderr.splitlines()[-1] == (
            "zlh: error: provisioning mt5: step container-created failed: no record of the "
            "host keys Proxmox made for mt5, and Proxmox no longer has its create task's "
            "log; check the container in the Proxmox console, or `zlh delete mt5` and "
            "provision it again")
        return
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["resumed"] is True
    assert sorted(kept.read_text().split()) == sorted(host_fingerprints(cluster.folder(100)))
    assert cluster.game("mt5")["ready"] is True


def test_snapshot_rollback_and_ssh_through_the_cli(ssh_cluster: SshCluster) -> None:
    cluster = ssh_cluster
    assert cluster.provision("mt3").returncode == 0

    made = cluster.zlh("snapshot", "mt3", "before_change")
    assert made.returncode == 0, made.stderr
    assert made.stdout == "mt3: snapshot before_change taken\n"
    listed = cluster.zlh("snapshot", "list", "mt3", "--json")
    assert [s["name"] for s in json.loads(listed.stdout)] == ["before_change"]

    changed = cluster.zlh("ssh", "mt3", "--", "touch", "/srv/zlh/marker")
    assert changed.returncode == 0, changed.stderr
    assert (cluster.folder(100) / "srv/zlh/marker").exists()
    old_pid = cluster.game("mt3")["pid"]

    back = cluster.zlh("rollback", "mt3", "before_change", timeout=180)
    assert back.returncode == 0, back.stderr
    assert back.stdout.startswith("mt3: rolled back to before_change; container started, "
                                  "agent pid ")
    # The container stopped and started again: the agent brought the game back up.
    wait_until(lambda: cluster.game("mt3")["ready"], 60, "the game after the rollback")
    assert cluster.game("mt3")["pid"] != old_pid
    gone = cluster.zlh("ssh", "mt3", "--", "test", "-e", "/srv/zlh/marker")
    assert gone.returncode == 1, gone.stderr

    # A snapshot Proxmox does not have: refused before anything stops.
    unknown = cluster.zlh("rollback", "mt3", "no_such")
    assert (unknown.returncode, unknown.stderr) == (4, (
        "zlh: error: mt3 has no snapshot 'no_such' (there: before_change); "
        "see `zlh snapshot list mt3`\n"))
    assert cluster.pve.params_of("POST", "/snapshot/no_such/rollback") == []
    assert cluster.game("mt3")["ready"] is True


def test_a_rollback_that_brings_a_new_lease_moves_the_server_there(
    ssh_cluster: SshCluster,
) -> None:
    cluster = ssh_cluster
    done = cluster.provision("mt6")
    assert done.returncode == 0, done.stderr
    old, port = json.loads(done.stdout)["address"], json.loads(done.stdout)["game_port"]
    assert cluster.zlh("snapshot", "mt6", "leased").returncode == 0

    new = "127.77.201.9"
    cluster.pve.next_lease[100] = new  # the container comes back with another address
    back = cluster.zlh("rollback", "mt6", "leased", timeout=180)
    assert back.returncode == 0, back.stderr
    assert back.stdout.endswith(f"; its address is now {new} (was {old})\n")

    status = json.loads(cluster.zlh("status", "mt6", "--json").stdout)
    assert status["address"] == new
    assert cluster.game("mt6")["ready"] is True
    assert f"bind_address = {new}\n" in (cluster.folder(100) / "srv/zlh/minetest.conf") \
        .read_text()
    answer = minetest_ping(new, port)
    assert (answer[:4], answer[10:12]) == (MINETEST_PROTOCOL, b"\x00\x01")
    with pytest.raises(ConnectionRefusedError):
        minetest_ping(old, port)
    backends = json.loads(cluster.zlh("backends", "--json").stdout)
    assert backends == [{"name": "mt6", "address": new, "port": port}]
    check = cluster.zlh("check", "mt6")
    assert check.returncode == 0, check.stdout + check.stderr

    # The container's key is recorded at the new address, checked against the logged ones;
    # the old address is forgotten.
    known = paramiko.HostKeys(str(cluster.tmp / "known_hosts"))
    assert known.lookup(f"[{new}]:{cluster.cts.port}") is not None
    assert known.lookup(f"[{old}]:{cluster.cts.port}") is None
    assert cluster.zlh("ssh", "mt6", "--", "true").returncode == 0


def test_a_dev_container_over_ssh_gets_its_ide_and_sshd_through_sftp(
    ssh_cluster: SshCluster,
) -> None:
    from tests.codeserverfix import code_server_cache, login
    from zlh import runtimes
    from zlh.artifacts import ArtifactServer, ensure
    from zlh.playbooks import load_playbook

    cluster = ssh_cluster
    code_server_cache()
    home = cluster.tmp / "home"
    home.mkdir(mode=0o700, exist_ok=True)
    (home / "cache").symlink_to(cache_root(), target_is_directory=True)
    config_file = cluster.tmp / "xdg/zlh/config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config.update({"ide_url": "https://dev-{vmid}.{domain}/", "domain": "zlh.test"})
    config_file.write_text(yaml.safe_dump(config))
    artifacts = cache_root() / "artifacts"
    for item in runtimes.playbook_items(load_playbook("dev-node")):
        ensure(item, artifacts)  # node, from the catalog: the agent fetches it

    cluster.names.add("devn")
    with ArtifactServer(artifacts) as server:
        cluster.env["ZLH_ARTIFACTS_URL"] = server.url
        done = cluster.zlh("provision", "--provider", "proxmox", "dev-node", "devn", "--json",
                           timeout=PROVISION_TIMEOUT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    address, ssh_port, ide_port = result["address"], result["ports"]["ssh"], \
        result["ports"]["ide"]
    assert address == address_of(100)

    # What zlh wrote went into the container's file system over SSH; the container's own
    # sshd (how zlh reaches it) keeps its config and keys.
    root = cluster.folder(100)
    assert (root / "etc/zlh/ide.password").stat().st_mode & 0o777 == 0o600
    sshd = (root / devssh.CONFIG).read_text().splitlines()
    assert f"ListenAddress {address}" in sshd and f"Port {ssh_port}" in sshd
    assert (root / devssh.HOST_KEY).stat().st_mode & 0o777 == 0o600
    system = (root / "etc/ssh/sshd_config").read_text()
    assert f"ListenAddress {address}\nPort {cluster.cts.port}\n" in system
    assert (root / "opt/zlh/code-server/node_modules/code-server/out/node/entry.js").is_file()
    assert not (home / "containers").exists()

    # The dev user's sshd, through the bastion; the command's exit code passes through.
    as_dev = cluster.zlh("ssh", "devn", "--user", "dev", "--", "id -un; exit 3")
    assert (as_dev.returncode, as_dev.stdout) == (3, "dev\n"), as_dev.stderr
    assert cluster.forwarded_to(address) >= 1
    text = (cluster.bastion.folder / "sshd.log").read_text(errors="replace")
    assert f"target {address} port {ssh_port}" in text

    # The IDE: its hosted URL, code-server running as dev, the password over SSH.
    ide = cluster.zlh("ide", "devn")
    assert ide.returncode == 0, ide.stderr
    assert ide.stdout.splitlines()[:2] == [
        "devn: code-server is ready, running as dev", "  open:      https://dev-100.zlh.test/"]
    assert "in devn:/etc/zlh/ide.password (mode 0600)" in ide.stdout
    shown = cluster.zlh("ide", "devn", "--show-password", "--json")
    password = json.loads(shown.stdout)["password"]
    assert password == (root / "etc/zlh/ide.password").read_text().strip()
    # The test's containers share this machine's network: its loopback is the container's.
    assert login(f"http://127.0.0.1:{ide_port}", password).status_code == 302
    rotated = cluster.zlh("ide", "rotate", "devn")
    assert rotated.returncode == 0, rotated.stderr
    new = (root / "etc/zlh/ide.password").read_text().strip()
    assert new != password and password not in rotated.stdout + rotated.stderr
    assert login(f"http://127.0.0.1:{ide_port}", new).status_code == 302

    # Delete forgets both host keys zlh recorded at the address: the container's and its
    # dev sshd's.
    gone = cluster.zlh("delete", "devn", "--yes", timeout=180)
    assert gone.returncode == 0, gone.stderr
    cluster.names.discard("devn")
    known = paramiko.HostKeys(str(cluster.tmp / "known_hosts"))
    assert known.lookup(f"[{address}]:{cluster.cts.port}") is None
    assert known.lookup(f"[{address}]:{ssh_port}") is None


def test_server_files_go_into_the_container_over_ssh_only_under_its_root(
    tmp_path: Path,
) -> None:
    key = keygen(tmp_path / "id_ed25519", "operator")
    ct = ChrootContainer(tmp_path / "ct", address_of(151), free_port())
    fingerprints = ct.create("ct151", Path(f"{key}.pub").read_text())
    ct.start()
    tree = tmp_path / "tree"
    (tree / "pkg/bin").mkdir(parents=True)
    (tree / ".bin").mkdir()
    (tree / "pkg/bin/run").write_text("#!/bin/sh\necho ran\n")
    (tree / "pkg/bin/run").chmod(0o755)
    (tree / ".bin/run").symlink_to("../pkg/bin/run")
    (tmp_path / "launcher.js").write_text("// launcher\n")
    try:
        config = SshConfig(identity=key, known_hosts=tmp_path / "known_hosts", port=ct.port)
        hop = zssh.Hop("root", ct.address, ct.port)
        zssh.trust_verified(hop, config, fingerprints)
        with RemoteContainer(hop, config).server_files() as files:
            assert files.root == "/srv/zlh"
            files.put(tree, "node_modules")
            files.put(tmp_path / "launcher.js", "launcher.js")
            files.write_text("conf/game.conf", "port = 1\n")
            assert files.has("/usr/sbin/sshd") and not files.has("/usr/sbin/no-such")
            with pytest.raises(ValueError, match="outside the server root"):
                files.write_text("../../etc/passwd", "root::0:0::/:/bin/sh\n")
        srv = ct.folder / "srv/zlh"
        assert (srv / "node_modules/pkg/bin/run").stat().st_mode & 0o777 == 0o755
        assert os.readlink(srv / "node_modules/.bin/run") == "../pkg/bin/run"
        assert (srv / "launcher.js").read_text() == "// launcher\n"
        assert (srv / "conf/game.conf").read_text() == "port = 1\n"
        assert "root::0" not in (ct.folder / "etc/passwd").read_text()
        with zssh.session(hop, config) as conn:
            out, err = io.BytesIO(), io.BytesIO()
            assert zssh.run(conn, "/srv/zlh/node_modules/.bin/run", out, err) == 0
        assert out.getvalue() == b"ran\n"
    finally:
        ct.destroy()


def test_a_container_key_is_trusted_only_when_its_create_task_logged_it(
    tmp_path: Path,
) -> None:
    key = keygen(tmp_path / "id_ed25519", "operator")
    ct = ChrootContainer(tmp_path / "ct", address_of(152), free_port())
    fingerprints = ct.create("ct152", Path(f"{key}.pub").read_text())
    ct.start()
    try:
        known = tmp_path / "known_hosts"
        config = SshConfig(identity=key, known_hosts=known, port=ct.port)
        hop = zssh.Hop("root", ct.address, ct.port)
        other = "SHA256:" + "A" * 43
        with pytest.raises(zssh.SshError, match=r"which is none of the keys Proxmox made for "
                                                 rf"it \({other}\); refusing to connect"):
            zssh.trust_verified(hop, config, [other])
        assert not known.exists()

        # A key an earlier container at this address left behind is replaced.
        stale = paramiko.HostKeys()
        stale.add(hop.known_hosts_name, "ssh-ed25519", paramiko.Ed25519Key.from_private_key_file(
            str(key)))
        stale.save(str(known))
        trusted = zssh.trust_verified(hop, config, fingerprints)
        assert trusted.fingerprint in fingerprints and not trusted.already
        entries = paramiko.HostKeys(str(known)).lookup(hop.known_hosts_name)
        assert [zssh.fingerprint(k) for k in entries.values()] == [trusted.fingerprint]
        with zssh.session(hop, config) as conn:
            assert zssh.run(conn, "true", io.BytesIO(), io.BytesIO()) == 0
    finally:
        ct.destroy()


# -- the agent's start: systemd or direct -----------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agent_wheel(tmp_path_factory.mktemp("cache"))


RECORDING_SYSTEMCTL = """#!/bin/sh
# Records its arguments, one call a line; starts nothing.
echo "$*" >> /var/log/systemctl.calls
"""


@pytest.mark.parametrize("systemd", [True, False], ids=["systemd-init", "no-systemd"])
def test_the_agent_is_started_by_systemd_only_where_systemd_is_init(
    tmp_path: Path, wheel: Path, systemd: bool,
) -> None:
    key = keygen(tmp_path / "id_ed25519", "operator")
    ct = ChrootContainer(tmp_path / "ct", address_of(150), free_port(), systemd=systemd)
    fingerprints = ct.create("ct150", Path(f"{key}.pub").read_text())
    # The same systemctl in both: only systemd as init makes zlh call it.
    install_program(ct, "systemctl", RECORDING_SYSTEMCTL)
    ct.start()
    try:
        config = SshConfig(identity=key, known_hosts=tmp_path / "known_hosts", port=ct.port)
        hop = zssh.Hop("root", ct.address, ct.port)
        zssh.trust_verified(hop, config, fingerprints)
        container = RemoteContainer(hop, config, agent_python=PYTHON)
        port = free_port()
        container.lay_out(port, "t0ken-" + "x" * 30)
        with container.session() as conn:
            how = container.launch(conn, wheel)
            calls = ct.folder / "var/log/systemctl.calls"
            if systemd:
                assert how == "systemd"
                assert calls.read_text().splitlines() == [
                    "daemon-reload", f"enable --now {remote.UNIT}"]
                unit = (ct.folder / remote.UNIT_PATH.lstrip("/")).read_text()
                assert unit == unit_text(AgentCommand(PYTHON, remote.SITE))
                assert not (ct.folder / remote.PID_FILE.lstrip("/")).exists()
                return
            assert how == "direct" and not calls.exists()
            container.wait_healthy(conn, port, 30)
            found = container.find_agent(conn)
            assert found is not None and found[1] == "direct"
            assert found[0].pid in ct.processes()
            container.stop_agent(conn, timeout=30, detach=False)
            assert container.find_agent(conn) is None
    finally:
        ct.destroy()


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install -y systemd "
                    "(bash .ci/setup installs it)", pytrace=False)
    unit = tmp_path / remote.UNIT
    unit.write_text(unit_text(AgentCommand(PYTHON, remote.SITE)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, check=False)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")

    # The check bites: a misspelt setting is reported.
    unit.write_text(unit.read_text().replace("KillMode=process", "KillMode=proces"))
    bad = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, check=False)
    assert "Failed to parse kill mode specification" in bad.stderr


def test_a_bastion_whose_key_changed_is_refused_before_anything_is_created(
    ssh_cluster: SshCluster,
) -> None:
    cluster = ssh_cluster
    cluster.bastion.stop()
    cluster.bastion.new_host_key()
    cluster.bastion.start()
    done = cluster.provision("mt7")
    assert done.returncode == 1
    assert done.stderr.startswith(
        f"zlh: error: HOST KEY CHANGED for the bastion [127.0.0.1]:{cluster.bastion.port}: ")
    assert done.stderr.endswith(
        f"run `zlh ssh trust 127.0.0.1:{cluster.bastion.port} --replace`\n")
    assert cluster.pve.containers == {}
    assert cluster.pve.params_of("POST", "/lxc") == []
    with Inventory() as inventory:
        assert inventory.find("mt7") is None


def test_a_provision_that_fails_in_ssh_says_why_once(ssh_cluster: SshCluster) -> None:
    cluster = ssh_cluster
    # The bastion lets zlh log in but forwards nowhere: the container's trust step fails.
    config = cluster.bastion.config
    plain = config.read_text()
    cluster.bastion.stop()
    config.write_text(plain + "PermitOpen none\n")
    cluster.bastion.start()
    settings = cluster.tmp / "xdg/zlh/config.yaml"
    data = yaml.safe_load(settings.read_text())
    data["proxmox"]["address_timeout"] = 2
    settings.write_text(yaml.safe_dump(data))
    try:
        done = cluster.provision("mt8")
    finally:
        cluster.bastion.stop()
        config.write_text(plain)
        cluster.bastion.start()
    assert done.returncode == 8
    reason = f"the bastion root@127.0.0.1:{cluster.bastion.port} cannot reach "
    assert done.stderr.count(reason) == 1, done.stderr
    assert done.stderr.splitlines() == [
        (f"zlh: error: provisioning mt8: step container-created failed: {reason}"
         f"{address_of(100)}:{cluster.cts.port}: Administratively prohibited")]
