"""A dev container's own sshd, end to end through the `zlh` program: `dev-python` on the
local provider, real OpenSSH on loopback, the host key zlh generated recorded first hand,
commands whose exit codes pass through, one PATH for login and non-login shells, and the
`zlh ssh-config` snippet used by plain `ssh -F`. The catalog's python (Debian's, repacked)
is first on that PATH and makes a venv with pip, over SSH and as the dev user.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from agentd.spawn import SYSTEM_PATH
from tests.codeserverfix import code_server_cache, login
from tests.components import cache_root, free_port
from tests.sshfix import keygen
from tests.test_devenv import in_namespace
from zlh import codeserver, devssh
from zlh.providers.local import LocalServerFiles

pytestmark = pytest.mark.slow

ZLH = [sys.executable, "-c", "from zlh.cli import main; main()"]
NAME = "devpy"


class Operator:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.home = tmp / "zlh"
        self.key = keygen(tmp / "id_ed25519", "operator")
        self.known_hosts = tmp / "known_hosts"
        # A bastion nobody listens on: a local container must be reached without it.
        config = {"ssh": {"identity": str(self.key), "known_hosts": str(self.known_hosts),
                          "bastion": f"root@127.0.0.1:{free_port()}"}}
        (tmp / "config/zlh").mkdir(parents=True)
        (tmp / "config/zlh/config.yaml").write_text(yaml.safe_dump(config))
        # The sshd's keys come from the override of ssh.authorized_keys: ours and another.
        self.authorized = tmp / "authorized"
        other = keygen(tmp / "other", "other")
        self.authorized.write_text(Path(f"{self.key}.pub").read_text()
                                   + Path(f"{other}.pub").read_text())
        self.home.mkdir(mode=0o700)
        (self.home / "cache").symlink_to(cache_root(), target_is_directory=True)
        self.env = {**os.environ, "ZLH_HOME": str(self.home),
                    "XDG_CONFIG_HOME": str(tmp / "config"),
                    "ZLH_SSH_AUTHORIZED_KEYS": str(self.authorized)}
        self.env.pop("ZLH_DEBUG", None)

    def zlh(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ZLH, *args], env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, check=False)

    @property
    def container(self) -> Path:
        return self.home / "containers" / NAME

    @property
    def path(self) -> str:
        """The container's one PATH: the catalog python's folder, then the system's."""
        return f"{self.container}/opt/zlh/runtimes/python/current/bin:{SYSTEM_PATH}"


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    code_server_cache()
    op = Operator(tmp_path_factory.mktemp("devssh"))
    try:
        done = op.zlh("provision", "dev-python", NAME, "--json")
        assert done.returncode == 0, done.stderr
        op.ports = json.loads(done.stdout)["ports"]  # type: ignore[attr-defined]
        yield op
    finally:
        op.zlh("delete", NAME, "--yes")


def fingerprint(public: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True, text=True,
                         check=True).stdout
    return out.split()[1]


def test_the_host_key_is_generated_and_recorded_at_provisioning(operator: Operator) -> None:
    port = operator.ports["ssh"]  # type: ignore[attr-defined]
    key = operator.container / devssh.HOST_KEY
    assert key.stat().st_mode & 0o777 == 0o600
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{port}", "-l",
                            "-f", str(operator.known_hosts)],
                           capture_output=True, text=True, check=False)
    assert found.returncode == 0, found.stderr
    assert fingerprint(Path(f"{key}.pub")) in found.stdout
    keys = operator.container / devssh.AUTHORIZED_KEYS
    assert keys.read_text() == operator.authorized.read_text()
    config = (operator.container / devssh.CONFIG).read_text().splitlines()
    for line in ("ListenAddress 127.0.0.1", f"Port {port}", "PasswordAuthentication no",
                 "KbdInteractiveAuthentication no", "UsePAM no",
                 "PermitRootLogin prohibit-password"):
        assert line in config

    status = json.loads(operator.zlh("status", NAME, "--json").stdout)
    ssh = next(p for p in status["processes"] if p["name"] == "ssh")
    assert (ssh["kind"], ssh["state"], ssh["ready"]) == ("service", "running", True)


def test_check_looks_at_the_ide_and_the_sshd_of_a_dev_container(operator: Operator) -> None:
    done = operator.zlh("check", NAME, "--json")

    assert done.returncode == 0, done.stdout + done.stderr
    checks = json.loads(done.stdout)["checks"]
    ready = [c["detail"] for c in checks if c["name"] == "process ready"]
    assert any(d.startswith("ide: running") for d in ready), ready
    assert any(d.startswith(f"{devssh.PROCESS}: running") for d in ready), ready
    assert all(c["ok"] for c in checks), checks


def test_a_command_over_ssh_passes_its_exit_code_and_sees_the_one_path(
        operator: Operator) -> None:
    done = operator.zlh("ssh", NAME, "--", "sh -c 'echo $PATH; exit 3'", timeout=60)
    assert done.returncode == 3, done.stderr
    path = done.stdout.strip()
    entries = path.split(":")
    assert path == operator.path
    assert len(entries) == len(set(entries))

    login = operator.zlh("ssh", NAME, "--", "bash -lc 'echo $PATH'", timeout=60)
    non_login = operator.zlh("ssh", NAME, "--", "bash -c 'echo $PATH'", timeout=60)
    assert login.returncode == 0 and non_login.returncode == 0, login.stderr + non_login.stderr
    assert login.stdout.strip() == non_login.stdout.strip() == path


def test_the_ide_runs_on_the_catalog_node_which_is_not_on_the_users_path(
        operator: Operator) -> None:
    # code-server had started `node` from the PATH: in dev-python, whatever node the
    # machine has (/usr/bin/node), and none at all in a container without one.
    status = json.loads(operator.zlh("status", NAME, "--json").stdout)
    ide = psutil.Process(next(p["pid"] for p in status["processes"] if p["name"] == "ide"))
    node = operator.container / f"opt/zlh/runtimes/node/{codeserver.NODE_VERSION}/bin/node"
    listed = json.loads(operator.zlh("runtime", "list", NAME, "--json").stdout)

    # The entry process and its server process (forked with the same node).
    assert [p.exe() for p in (ide, *ide.children())] == [str(node), str(node)]
    assert ide.environ()["PATH"] == operator.path  # the IDE's terminals: python first
    assert sorted((r["name"], r["version"], r["active"]) for r in listed) == [
        ("node", codeserver.NODE_VERSION, False), ("python", "3.11.2", True)]


def test_code_server_writes_no_password_of_its_own(operator: Operator) -> None:
    # code-server had written ~dev/.config/code-server/config.yaml (0644) with a random
    # password that the login refuses.
    home = operator.container / "home/dev"
    written = [path for path in home.rglob("*.yaml") if "password" in path.read_text()]
    config = operator.container / codeserver.CONFIG_FILE
    url = f"http://127.0.0.1:{operator.ports['ide']}"  # type: ignore[attr-defined]
    password = codeserver.read_password(LocalServerFiles(operator.container))

    assert written == []
    assert not (home / ".config/code-server").exists()
    assert "password:" not in config.read_text()
    assert login(url, password).status_code == 302
    assert login(url, password + "x").status_code == 200  # refused: the form again


def test_plain_ssh_uses_the_config_snippet(operator: Operator) -> None:
    port = operator.ports["ssh"]  # type: ignore[attr-defined]
    snippet = operator.zlh("ssh-config", NAME)
    assert snippet.returncode == 0, snippet.stderr
    assert f"Port {port}" in snippet.stdout
    assert "ProxyJump" not in snippet.stdout and "zlh-bastion" not in snippet.stdout
    config = operator.tmp / "ssh_config"
    config.write_text(snippet.stdout)
    done = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", f"zlh-{NAME}",
                           "echo $PATH; exit 4"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 4, done.stderr
    assert done.stdout.strip() == operator.path


def test_a_key_zlh_did_not_record_is_refused(operator: Operator) -> None:
    saved = operator.known_hosts.read_text()
    operator.known_hosts.write_text("")
    try:
        done = operator.zlh("ssh", NAME, "--", "true", timeout=60)
    finally:
        operator.known_hosts.write_text(saved)
    assert done.returncode != 0
    assert "unknown host key" in done.stderr


def test_an_interactive_shell_has_the_one_path(operator: Operator) -> None:
    import pexpect

    shell = pexpect.spawn(ZLH[0], [*ZLH[1:], "ssh", NAME], env=operator.env,
                          encoding="utf-8", timeout=30, dimensions=(24, 200))
    try:
        shell.sendline('echo "P""ATH=$PATH."')
        shell.expect(r"PATH=(\S+)\.\r\n")
        path = shell.match.group(1)
        shell.sendline("exit 5")
        shell.expect(pexpect.EOF)
    finally:
        shell.close()
    assert path == operator.path
    assert shell.exitstatus == 5


def test_the_catalog_python_makes_a_venv_over_ssh(operator: Operator) -> None:
    # The venv's base is the runtime's `current`: an upgrade of the runtime carries it along.
    runtime = operator.container / "opt/zlh/runtimes/python/current"
    venv = operator.tmp / "ssh-venv"
    script = (f"command -v python3; python3 -m venv {venv} && "
              f"{venv}/bin/python -c 'import sys; print(sys.base_prefix)' && "
              f"{venv}/bin/pip --version")
    done = operator.zlh("ssh", NAME, "--", script, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{runtime}/bin/python3",
        str(runtime),
        f"pip 23.0.1 from {venv}/lib/python3.11/site-packages/pip (python 3.11)",
    ]


# As the dev user of a container laid out as on Proxmox: in a user and mount namespace,
# /etc is a copy where dev is created, and the container's /opt and /home are mounted
# over the machine's. The runtime was installed by root; dev can only read it.
AS_DEV = """
set -e
cp -a /etc/. "$1/etc"
mount --bind "$1/etc" /etc
mount --bind {container}/opt /opt
mount --bind {container}/home /home
{python} -c 'from agentd import devuser; devuser.ensure("dev")'
exec setpriv --reuid=dev --regid=dev --init-groups env -i HOME=/home/dev PATH={path} sh -c '
cd /home/dev/workspace
id -un
command -v python3
python3 -c "import ensurepip, sys; print(sys.prefix, ensurepip._WHEEL_PKG_DIR)"
python3 -m venv .venv
.venv/bin/pip --version
printf "import sqlite3, ssl\\nprint(sum(range(10)), sqlite3.sqlite_version)\\n" > hello.py
.venv/bin/python hello.py
python3 -m pip --version 2>&1 || echo "exit $?"
'
"""


def test_the_dev_user_runs_the_catalog_python_and_makes_a_venv(
        operator: Operator, tmp_path: Path) -> None:
    import sqlite3

    (tmp_path / "etc").mkdir()
    runtime = "/opt/zlh/runtimes/python/current"
    script = AS_DEV.format(container=operator.container, python=sys.executable,
                           path=f"{runtime}/bin:{SYSTEM_PATH}")
    done = in_namespace(tmp_path, script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "dev",
        f"{runtime}/bin/python3",
        f"{runtime} {runtime}/share/python-wheels",  # not the machine's /usr/share
        ("pip 23.0.1 from /home/dev/workspace/.venv/lib/python3.11/site-packages/pip "
         "(python 3.11)"),
        f"45 {sqlite3.sqlite_version}",
        f"{runtime}/bin/python3: No module named pip",  # pip comes with a venv
        "exit 1",
    ]
    workspace = operator.container / "home/dev/workspace"
    assert (workspace / ".venv/pyvenv.cfg").read_text().startswith(
        f"home = {runtime}/bin\n")
