"""SSH through a bastion with real OpenSSH servers on loopback: host key checks, commands
and their exit codes, a PTY shell and the OpenSSH config snippet. The agent's bootstrap
over SSH is tested with the containers of tests/test_proxmox_ssh.py.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pexpect
import pytest
import yaml
from sshfix import BastionInto, Sshd, keygen

from zlh import devssh, opconfig
from zlh import ssh as zssh
from zlh.inventory import Inventory, Server

ZLH = [sys.executable, "-c", "from zlh.cli import main; main()"]


@dataclass
class Net:
    tmp: Path
    key: Path
    bastion: Sshd
    target: Sshd
    env: dict[str, str]

    @property
    def config(self) -> opconfig.SshConfig:
        return opconfig.load(self.tmp / "xdg/zlh/config.yaml").ssh

    def zlh(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ZLH, *args], env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, check=False)

    def trust_both(self) -> None:
        for sshd in (self.bastion, self.target):
            done = self.zlh("ssh", "trust", f"127.0.0.1:{sshd.port}")
            assert done.returncode == 0, done.stderr


@pytest.fixture
def net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Net]:
    key = keygen(tmp_path / "id_ed25519", "operator")
    bastion = Sshd(tmp_path / "bastion", key, bastion=True).start()
    target = Sshd(tmp_path / "target", key)
    try:
        target.start()
        config = {"ssh": {"bastion": f"root@127.0.0.1:{bastion.port}", "identity": str(key),
                          "known_hosts": str(tmp_path / "known_hosts"), "user": "root",
                          "port": target.port}}
        (tmp_path / "xdg/zlh").mkdir(parents=True)
        (tmp_path / "xdg/zlh/config.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "ZLH_HOME": str(tmp_path / "home"),
               "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
        monkeypatch.setenv("ZLH_HOME", env["ZLH_HOME"])
        monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
        with Inventory() as inventory:
            inventory.add(Server(name="mt1", playbook="minetest", provider="proxmox",
                                 address="127.0.0.1", step="ready", status="ready"))
        yield Net(tmp_path, key, bastion, target, env)
    finally:
        target.stop()
        bastion.stop()


def _write_config(tmp: Path, ssh: dict[str, object]) -> Path:
    path = tmp / "xdg/zlh/config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"ssh": ssh}))
    return path


@pytest.fixture
def behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Net]:
    """A container's sshd that only the bastion reaches: it runs in a network namespace
    of its own, where the bastion's sshd forwards to it."""
    key = keygen(tmp_path / "id_ed25519", "operator")
    target = Sshd(tmp_path / "target", key, netns=True).start()
    bastion_sshd = Sshd(tmp_path / "bastion", key, bastion=True, extra=("LogLevel DEBUG1",))
    bastion = BastionInto(bastion_sshd, target)
    try:
        bastion.start()
        _write_config(tmp_path, {
            "bastion": f"root@127.0.0.1:{bastion_sshd.port}", "identity": str(key),
            "known_hosts": str(tmp_path / "known_hosts"), "user": "root",
            "port": target.port})
        env = {**os.environ, "ZLH_HOME": str(tmp_path / "home"),
               "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
        monkeypatch.setenv("ZLH_HOME", env["ZLH_HOME"])
        monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
        with Inventory() as inventory:
            inventory.add(Server(name="ct1", playbook="minetest", provider="proxmox",
                                 address="127.0.0.1", step="ready", status="ready"))
        yield Net(tmp_path, key, bastion_sshd, target, env)
    finally:
        bastion.stop()
        target.stop()


def advice_in(stderr: str) -> list[str]:
    """The `zlh ...` command an error message tells the operator to run, as arguments."""
    return stderr.rstrip("\n").rsplit("run `", 1)[1].removesuffix("`").split()[1:]


def test_trust_reaches_a_host_behind_the_bastion_through_it(behind: Net) -> None:
    net = behind
    bastion, target = f"127.0.0.1:{net.bastion.port}", f"127.0.0.1:{net.target.port}"
    # The bastion itself is trusted directly; the host behind it is trusted through it,
    # with the command the refusal printed, as printed.
    assert net.zlh("ssh", "trust", bastion).returncode == 0
    refused = net.zlh("ssh", "ct1", "--", "true")
    assert refused.stderr == (
        f"zlh: error: the host [127.0.0.1]:{net.target.port} has an unknown host key; "
        f"check it and run `zlh ssh trust {target}`\n")
    done = net.zlh(*advice_in(refused.stderr))
    assert (done.returncode, done.stdout) == (0, (
        f"[127.0.0.1]:{net.target.port} ssh-ed25519 {fingerprint_of(net.target)}\n"
        f"trusted; recorded in {net.tmp / 'known_hosts'}\n")), done.stderr
    assert f"target 127.0.0.1 port {net.target.port}" in net.bastion.log.read_text()

    ran = net.zlh("ssh", "ct1", "--", "sh", "-c", "'echo inside; exit 3'")
    assert (ran.returncode, ran.stdout, ran.stderr) == (3, "inside\n", "")
    # --direct bypasses the bastion: from here nothing listens there.
    direct = net.zlh("ssh", "trust", target, "--direct", "--replace")
    assert (direct.returncode, direct.stderr) == (1, (
        f"zlh: error: cannot reach the host {target}: Connection refused\n"))


def test_a_local_container_is_trusted_directly_as_its_advice_says(net: Net) -> None:
    # A local container is reached without the bastion, so the advice says --direct.
    with Inventory() as inventory:
        inventory.add(Server(name="local1", playbook="minetest", provider="local",
                             address="127.0.0.1", ports={"ssh": net.target.port},
                             step="ready", status="ready"))
    refused = net.zlh("ssh", "local1", "--", "true")
    assert refused.returncode == 1
    assert advice_in(refused.stderr) == ["ssh", "trust", f"127.0.0.1:{net.target.port}",
                                         "--direct"]
    assert net.zlh(*advice_in(refused.stderr)).returncode == 0
    done = net.zlh("ssh", "local1", "--", "true")
    assert done.returncode == 0, done.stderr


def test_a_missing_identity_file_is_named_with_its_config_line(net: Net) -> None:
    net.trust_both()
    config = net.tmp / "xdg/zlh/config.yaml"
    missing = net.tmp / "no-such-key"
    config.write_text(config.read_text().replace(str(net.key), str(missing)))
    line = config.read_text().splitlines().index(f"  identity: {missing}") + 1
    done = net.zlh("ssh", "mt1", "--", "true")
    assert (done.returncode, done.stderr) == (1, (
        f"zlh: error: {config}:{line}: ssh.identity: {missing}: no such file "
        "(the private key zlh logs in with)\n"))


@pytest.mark.parametrize("bastion", ["127.0.0.1:22:x", "root@127.0.0.1:ssh", "[::1:22"])
def test_a_malformed_bastion_is_refused_at_config_load(net: Net, bastion: str) -> None:
    config = _write_config(net.tmp, {"user": "root", "bastion": bastion})
    done = net.zlh("ssh", "mt1", "--", "true")
    assert (done.returncode, done.stderr) == (3, (
        f"zlh: error: {config}:2: ssh.bastion: {bastion!r} is not [user@]host[:port], "
        "an IPv6 address as [addr]:port\n"))


def fingerprint_of(sshd: Sshd) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", f"{sshd.host_key}.pub"], capture_output=True,
                         text=True, check=True).stdout
    return out.split()[1]


def test_an_unknown_host_is_refused_until_trusted(net: Net) -> None:
    refused = net.zlh("ssh", "mt1", "--", "true")
    assert refused.returncode == 1
    assert refused.stderr == (
        f"zlh: error: the bastion [127.0.0.1]:{net.bastion.port} has an unknown host key; "
        f"check it and run `zlh ssh trust 127.0.0.1:{net.bastion.port}`\n")

    done = net.zlh("ssh", "trust", f"127.0.0.1:{net.bastion.port}")
    assert done.stdout == (
        f"[127.0.0.1]:{net.bastion.port} ssh-ed25519 {fingerprint_of(net.bastion)}\n"
        f"trusted; recorded in {net.tmp / 'known_hosts'}\n")
    # The bastion is known now; the target behind it is not yet.
    assert "the host [127.0.0.1]:" in net.zlh("ssh", "mt1", "--", "true").stderr


def test_trust_checks_an_expected_fingerprint(net: Net) -> None:
    assert net.zlh("ssh", "trust", f"127.0.0.1:{net.bastion.port}").returncode == 0
    wrong = net.zlh("ssh", "trust", f"127.0.0.1:{net.target.port}", "--expect", "SHA256:x")
    assert wrong.returncode == 1 and "nothing recorded" in wrong.stderr
    recorded = paramiko.HostKeys(str(net.tmp / "known_hosts"))
    assert recorded.lookup(f"[127.0.0.1]:{net.target.port}") is None


def test_a_command_through_the_bastion_passes_its_exit_code(net: Net) -> None:
    net.trust_both()
    done = net.zlh("ssh", "mt1", "--", "sh", "-c", "'echo out; echo err >&2; exit 3'")
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_a_bastion_whose_host_key_changed_is_refused(net: Net) -> None:
    net.trust_both()
    old = fingerprint_of(net.bastion)
    net.bastion.stop()
    net.bastion.new_host_key()
    net.bastion.start()
    done = net.zlh("ssh", "mt1", "--", "true")
    assert done.returncode == 1
    assert done.stderr.startswith(
        f"zlh: error: HOST KEY CHANGED for the bastion [127.0.0.1]:{net.bastion.port}: "
        f"{net.tmp / 'known_hosts'} has {old}, the server offers "
        f"{fingerprint_of(net.bastion)}; refusing to connect.")
    again = net.zlh("ssh", "trust", f"127.0.0.1:{net.bastion.port}")
    assert again.returncode == 5 and "pass --replace" in again.stderr
    # The command the refusal names is the one step that accepts the new key.
    advice = done.stderr.rstrip("\n").rsplit("run `", 1)[1].removesuffix("`")
    assert advice == f"zlh ssh trust 127.0.0.1:{net.bastion.port} --replace"
    replaced = net.zlh(*advice.split()[1:])
    assert replaced.returncode == 0, replaced.stderr
    assert net.zlh("ssh", "mt1", "--", "true").returncode == 0



def test_a_target_the_bastion_cannot_reach_is_one_line(net: Net) -> None:
    net.trust_both()
    net.target.stop()
    done = net.zlh("ssh", "mt1", "--", "true")
    assert done.returncode == 1
    assert done.stderr == (
        f"zlh: error: the bastion root@127.0.0.1:{net.bastion.port} cannot reach "
        f"127.0.0.1:{net.target.port}: Connect failed\n")

def test_an_interactive_shell_runs_on_a_pty(net: Net) -> None:
    net.trust_both()
    child = pexpect.spawn(ZLH[0], [*ZLH[1:], "ssh", "mt1"], env=net.env, timeout=20,
                          encoding="utf-8")
    try:
        child.sendline("tty; echo answer=$((6*7))")
        child.expect(r"/dev/pts/\d+")
        child.expect("answer=42")
        child.sendline("exit 4")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 4


def test_ssh_config_works_with_plain_openssh(net: Net) -> None:
    net.trust_both()
    done = net.zlh("ssh-config", "mt1")
    assert done.returncode == 0, done.stderr
    assert f"Host zlh-mt1\n    HostName 127.0.0.1\n    Port {net.target.port}\n" \
           "    User root\n    ProxyJump zlh-bastion\n" in done.stdout
    snippet = net.tmp / "ssh_config"
    snippet.write_text(done.stdout)
    ran = subprocess.run(["ssh", "-F", str(snippet), "-o", "BatchMode=yes", "zlh-mt1",
                          "echo via-jump"], capture_output=True, text=True, timeout=30,
                         check=False)
    assert (ran.returncode, ran.stdout) == (0, "via-jump\n"), ran.stderr
    assert net.zlh("ssh-config", "--all").stdout == done.stdout


def test_run_copies_output_and_status_in_process(net: Net) -> None:
    net.trust_both()
    out, err = io.BytesIO(), io.BytesIO()
    with zssh.session(zssh.Hop("root", "127.0.0.1", net.target.port), net.config) as conn:
        status = zssh.run(conn, "printf abc; exit 7", out, err)  # type: ignore[arg-type]
    assert (status, out.getvalue(), err.getvalue()) == (7, b"abc", b"")


@pytest.mark.parametrize(
    ("text", "hop"),
    [("h", zssh.Hop("root", "h", 22)), ("u@h:2222", zssh.Hop("u", "h", 2222)),
     ("[::1]:2200", zssh.Hop("root", "::1", 2200))],
    ids=["host", "user-host-port", "ipv6"],
)
def test_parse_hop(text: str, hop: zssh.Hop) -> None:
    assert zssh.parse_hop(text) == hop


def _record_hosts(known_hosts: str, first: int, count: int, public: str) -> None:
    config = opconfig.SshConfig(known_hosts=Path(known_hosts))
    for n in range(first, first + count):
        devssh.record_host_key(public, f"127.77.0.{n}", 2222, config)
        zssh.forget(zssh.Hop("root", f"127.78.0.{n}", 22), config)


def test_provisions_recording_host_keys_at_once_keep_every_key(tmp_path: Path) -> None:
    # Eight provisions racing each record their container's key (and forget an old one)
    # in the one known_hosts file; none may drop a line another one just wrote.
    known_hosts = tmp_path / "known_hosts"
    key = paramiko.ECDSAKey.generate()
    public = f"{key.get_name()} {key.get_base64()}"
    gone = "".join(f"127.78.0.{n} {public}\n" for n in range(1, 81))
    known_hosts.write_text(gone)
    with ProcessPoolExecutor(8, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = [pool.submit(_record_hosts, str(known_hosts), 1 + 10 * i, 10, public)
                for i in range(8)]
        for run in runs:
            run.result()
    recorded = paramiko.HostKeys(str(known_hosts))
    assert sorted(recorded.keys()) == sorted(f"[127.77.0.{n}]:2222" for n in range(1, 81))
