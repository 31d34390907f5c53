"""The dev user's environment: one canonical PATH for the console, login shells and
non-login shells, and the dev user created inside a user namespace, never on this
machine's own /etc/passwd.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentd import devuser
from agentd.spawn import SYSTEM_PATH
from tests.agentfix import AgentProcess, poll

JUNK = "/agent/own/bin"


@pytest.fixture
def box(tmp_path: Path):
    # root "..": the folder is laid out as a container, as on the local provider.
    agent = AgentProcess(tmp_path / "box")
    agent.config_path.write_text(agent.config_path.read_text() + "root: ..\n")
    agent.start()
    yield agent
    agent.stop()


def shell_path(*argv: str, **env: str) -> str:
    clean = {"PATH": f"{JUNK}:/usr/bin:/bin", "HOME": "/nonexistent", **env}
    done = subprocess.run(list(argv), env=clean, capture_output=True, text=True,
                          check=True, timeout=30)
    return done.stdout.strip().splitlines()[-1]


def test_console_login_and_non_login_shells_get_one_path(box: AgentProcess) -> None:
    profile = box.root / "etc/profile.d/zlh-runtimes.sh"
    env_file = box.root / "etc/zlh/env"
    assert env_file.read_text() == profile.read_text()
    assert profile.read_text().splitlines()[1:] == [f'PATH="{SYSTEM_PATH}"', "export PATH"]

    box.put_spec({"name": "job", "argv": ["sh", "-c", "echo PATH=$PATH; exec sleep 600"]})
    poll(lambda: any(t.startswith("PATH=") for t in box.console_text("job")), 20,
         "the job's PATH in the console")
    console = next(t for t in box.console_text("job") if t.startswith("PATH="))[5:]

    non_login = shell_path("bash", "-c", "echo $PATH", BASH_ENV=str(env_file))
    posix = shell_path("sh", "-i", "-c", "echo $PATH", ENV=str(env_file))
    login = shell_path("bash", "-c", f". {profile}; echo $PATH")
    assert console == non_login == posix == login == SYSTEM_PATH
    entries = console.split(":")
    assert len(entries) == len(set(entries)) and JUNK not in entries


def test_status_says_the_agent_runs_as_the_invoking_user(box: AgentProcess) -> None:
    assert box.client is not None
    agent = box.client.get("/v1/status").json()["agent"]
    assert agent["user"] == getpass.getuser()
    assert agent["in_container"] is False


# -- the dev user, inside a user and mount namespace ------------------------------------

SCRIPT = """
set -e
cp -a /etc/. "$1/etc"
mount --bind "$1/etc" /etc
mount --bind "$1/home" /home
{python} -c 'from agentd import devuser; print(devuser.ensure("dev"))'
{python} -c 'from agentd import devuser; print(devuser.ensure("dev"))'
getent passwd dev
stat -c '%U %G %n' /home/dev /home/dev/workspace
grep -c zlh/env /etc/bash.bashrc
head -n1 /etc/bash.bashrc
getent shadow dev | cut -d: -f2
"""


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def in_namespace(folder: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run `script` in a new user and mount namespace where uids 0 to 65535 map onto this
    machine's (which takes root here, so the new user's files can be owned by it)."""
    go = folder / "go"
    os.mkfifo(go)
    argv = ["unshare", "--user", "--mount", "--fork", "sh", "-c",
            'read x < "$1/go"\n' + script, "sh", str(folder)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        ours = os.readlink("/proc/self/ns/user")
        poll(lambda: os.readlink(f"/proc/{proc.pid}/ns/user") != ours, 10,
             "unshare in its user namespace")
        for kind in ("uid", "gid"):
            Path(f"/proc/{proc.pid}/{kind}_map").write_text("0 0 65536\n")
        go.write_text("go\n")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_dev_user_is_created_in_a_namespace_not_on_this_machine(tmp_path: Path) -> None:
    for folder in ("etc", "home"):
        (tmp_path / folder).mkdir()
    before = {name: digest(Path("/etc", name)) for name in ("passwd", "group")}

    done = in_namespace(tmp_path, SCRIPT.format(python=sys.executable))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["created", "exists"]
    fields = lines[2].split(":")
    assert fields[0] == "dev" and fields[5] == "/home/dev" and fields[6] == "/bin/bash"
    assert lines[3:5] == ["dev dev /home/dev", "dev dev /home/dev/workspace"]
    assert lines[5:7] == ["1", devuser.HOOK.strip()]  # the env file's line, once, first
    assert lines[7:] == ["*"]  # no password, not locked: sshd (no PAM) lets its keys in

    # The namespace's copy has dev; this machine's own files are as they were.
    assert "\ndev:" in "\n" + (tmp_path / "etc/passwd").read_text()
    assert {name: digest(Path("/etc", name)) for name in ("passwd", "group")} == before
    assert "dev" not in [line.split(":")[0]
                         for line in Path("/etc/passwd").read_text().splitlines()]
