"""code-server as a supervised process: real code-server 4.100.3 through a real agent.

A module-scoped agent runs one code-server in a container folder laid out as the local
provider does; the tests log in over HTTP, crash it, stop it and open it in headless
Chromium. The end-to-end test provisions a dev container through the `zlh` program.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from tests.agentfix import AgentProcess, poll
from tests.codeserverfix import SESSION_COOKIE, Browser, code_server_cache, login
from tests.components import cache_root, free_port
from zlh import codeserver
from zlh.artifacts import ArtifactServer, ensure
from zlh.providers.local import LocalServerFiles
from zlh.runtimes import install_body

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ZLH = [sys.executable, "-c", "from zlh.cli import main; main()"]
READY_TIMEOUT = 60


class IdeAgent:
    """An agent whose container root holds code-server, the workspace and the password."""

    def __init__(self, folder: Path) -> None:
        self.container = folder / "container"
        self.agent = AgentProcess(folder / "agent", sample_interval=0.5)
        # The container root: the agent reads the spec's env_files from it.
        config = yaml.safe_load(self.agent.config_path.read_text())
        self.agent.config_path.write_text(yaml.safe_dump({**config,
                                                          "root": str(self.container)}))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> IdeAgent:
        code_server_cache()
        files = LocalServerFiles(self.container)
        codeserver.install(files, cache_root())
        codeserver.ensure_secret(files)
        codeserver.prepare_folders(files)
        self.agent.start()
        self.install_node()
        layout = codeserver.IdeLayout(self.container, self.port, None)
        answer = self.agent.put_spec(codeserver.process_spec(layout).model_dump())
        assert answer.status_code == 200, answer.text
        self.wait_ready()
        return self

    def install_node(self) -> None:
        """The Node.js code-server runs on, as provisioning installs it: from the
        catalog, through the agent, not made current."""
        item = codeserver.node_item()
        artifacts = cache_root() / "artifacts"
        ensure(item, artifacts)
        assert self.agent.client is not None
        with ArtifactServer(artifacts) as server:
            body = install_body(item, server.url, activate=False).model_dump(mode="json")
            answer = self.agent.client.post("/v1/runtimes", json=body, timeout=120)
        assert answer.status_code == 200, answer.text

    @property
    def password(self) -> str:
        return codeserver.read_password(LocalServerFiles(self.container))

    def ide(self) -> dict[str, Any]:
        return self.agent.process(codeserver.PROCESS)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        # poll returns what the predicate returned: the ide process's status.
        return poll(lambda: (p := self.ide())["ready"] and p, timeout,  # type: ignore
                    "code-server to be ready")


@pytest.fixture(scope="module")
def ide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdeAgent]:
    running = IdeAgent(tmp_path_factory.mktemp("ide"))
    try:
        yield running.start()
    finally:
        running.agent.stop()


# -- over HTTP ---------------------------------------------------------------------------


def test_login_with_the_secret_sets_the_session_cookie(ide: IdeAgent) -> None:
    answer = login(ide.url, ide.password)

    assert answer.status_code == 302
    assert answer.cookies.get(SESSION_COOKIE)
    page = httpx.get(ide.url + "/", cookies={SESSION_COOKIE: answer.cookies[SESSION_COOKIE]},
                     follow_redirects=True)
    assert page.status_code == 200 and "/login" not in str(page.url)
    assert page.url.params["folder"] == str(ide.container / "home/dev/workspace")


def test_a_wrong_secret_gets_the_form_again(ide: IdeAgent) -> None:
    answer = login(ide.url, ide.password + "x")

    assert answer.status_code == 200
    assert SESSION_COOKIE not in answer.cookies
    assert 'type="password"' in answer.text


def test_without_a_session_the_ide_sends_you_to_login(ide: IdeAgent) -> None:
    answer = httpx.get(ide.url + "/", follow_redirects=False)

    assert answer.status_code == 302 and answer.headers["location"].endswith("login")


def test_ready_comes_from_healthz(ide: IdeAgent) -> None:
    detail = ide.agent.client.get(f"/v1/processes/{codeserver.PROCESS}").json()

    assert detail["spec"]["readiness"] == {
        "type": "http", "url": f"{ide.url}/healthz", "expect_status": 200,
        "interval": 0.25, "timeout": 2.0, "failure_threshold": 3,
    }
    assert detail["ready"] and detail["kind"] == "ide"
    assert httpx.get(ide.url + "/healthz").json()["status"] in ("alive", "expired")


def test_the_secret_is_in_no_log_spec_or_status(ide: IdeAgent) -> None:
    secret = ide.password
    answers = [ide.agent.client.get(path).text for path in (
        "/v1/spec", "/v1/status", f"/v1/processes/{codeserver.PROCESS}",
        f"/v1/processes/{codeserver.PROCESS}/console?limit=100000")]

    assert ide.agent.client.get("/v1/spec").json()["processes"][0]["env_files"] == {
        "PASSWORD": "etc/zlh/ide.password"}
    assert all(secret not in text for text in answers)
    assert secret not in ide.agent.logs()
    password = Path(codeserver.password_path(str(ide.container)))
    assert password.stat().st_mode & 0o777 == 0o600


def test_a_killed_code_server_comes_back_after_a_backoff(ide: IdeAgent) -> None:
    before = ide.wait_ready()
    restarts = before["restarts"]

    os.kill(before["pid"], signal.SIGKILL)

    after = poll(lambda: (p := ide.ide())["ready"] and p["pid"] != before["pid"] and p,
                 READY_TIMEOUT, "code-server to come back")
    assert after["restarts"] == restarts + 1
    assert after["last_crash"]["class"] == "signal"
    assert after["last_crash"]["signal"] == "SIGKILL"
    backoffs = [e for e in ide.agent.events("state")
                if e.get("process") == "ide" and e["state"] == "backoff"]
    assert backoffs and backoffs[-1]["delay"] > 0
    assert login(ide.url, ide.password).status_code == 302


def test_a_killed_server_process_brings_code_server_back(ide: IdeAgent) -> None:
    # code-server's entry process exits 0 when its server process (its child) is killed;
    # that had been taken as a clean exit: the IDE stayed stopped.
    before = ide.wait_ready()
    restarts = before["restarts"]
    [server] = psutil.Process(before["pid"]).children()

    server.kill()

    after = poll(lambda: (p := ide.ide())["ready"] and p["pid"] != before["pid"] and p,
                 READY_TIMEOUT, "code-server to come back")
    assert after["restarts"] == restarts + 1
    assert (after["last_crash"]["class"], after["last_crash"]["exit_code"]) == ("exit-code", 0)
    assert login(ide.url, ide.password).status_code == 302


def test_the_workbench_opens_in_headless_chromium(ide: IdeAgent, tmp_path: Path) -> None:
    cookie = login(ide.url, ide.password).cookies[SESSION_COOKIE]
    browser = Browser(tmp_path).start()
    try:
        figures = browser.open_workbench(ide.url + "/", cookie)
        browser.screenshot(ARTIFACTS / "code-server-workbench.png")
    finally:
        browser.stop()

    assert figures["workbench_seconds"] > 0
    assert (ARTIFACTS / "code-server-workbench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stop_leaves_no_process_of_the_tree(ide: IdeAgent) -> None:
    leader = psutil.Process(ide.wait_ready()["pid"])
    tree = [leader, *leader.children(recursive=True)]
    assert len(tree) >= 2  # code-server's entry process and its server process

    stopped = ide.agent.client.post(f"/v1/processes/{codeserver.PROCESS}/stop").json()

    assert stopped["state"] == "stopped"
    assert ide.ide()["pid"] is None
    assert [p.pid for p in tree if _alive(p)] == []
    with pytest.raises(httpx.TransportError):
        httpx.get(ide.url + "/healthz", timeout=2)
    ide.agent.client.post(f"/v1/processes/{codeserver.PROCESS}/start")
    ide.wait_ready()


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- through the zlh program -------------------------------------------------------------


def _zlh(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*ZLH, *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, check=False)


@pytest.fixture
def operator_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    home, config = tmp_path / "zlh", tmp_path / "config"
    home.mkdir(mode=0o700)
    (config / "zlh").mkdir(parents=True)
    (config / "zlh/config.yaml").write_text(yaml.safe_dump(
        {"ide_url": "https://dev-{vmid}.{domain}/", "domain": "zlh.test"}))
    code_server_cache()
    (home / "cache").symlink_to(cache_root(), target_is_directory=True)
    env = {**os.environ, "ZLH_HOME": str(home), "XDG_CONFIG_HOME": str(config)}
    env.pop("ZLH_DEBUG", None)
    yield env
    _zlh(env, "delete", "devnode", "--yes")


def test_a_dev_container_from_provision_to_login(operator_env: dict[str, str]) -> None:
    started = time.monotonic()
    done = _zlh(operator_env, "provision", "dev-node", "devnode", "--json")
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    port = json.loads(done.stdout)["ports"]["ide"]
    container = Path(operator_env["ZLH_HOME"]) / "containers/devnode"

    local = _zlh(operator_env, "ide", "devnode", "--local", "--json")
    hosted = _zlh(operator_env, "ide", "devnode")
    access = json.loads(local.stdout)
    old = codeserver.read_password(LocalServerFiles(container))
    rotated = _zlh(operator_env, "ide", "rotate", "devnode")
    new = codeserver.read_password(LocalServerFiles(container))
    shown = _zlh(operator_env, "ide", "devnode", "--local", "--show-password", "--json")

    print(f"provision-to-IDE-ready: {seconds:.1f} s")
    assert local.returncode == 0, local.stderr
    assert access["url"] == f"http://127.0.0.1:{port}/"
    assert access["ready"] and access["password"] is None
    assert access["password_file"] == str(container / "etc/zlh/ide.password")
    assert old not in local.stdout + hosted.stdout + rotated.stdout + rotated.stderr
    assert hosted.returncode == 0, hosted.stderr
    assert "open:      https://dev-devnode.zlh.test/" in hosted.stdout
    assert rotated.returncode == 0, rotated.stderr
    assert "IDE password replaced" in rotated.stdout and new != old
    assert json.loads(shown.stdout)["password"] == new
    assert login(access["url"].rstrip("/"), old).status_code == 200  # refused: the form
    assert login(access["url"].rstrip("/"), new).status_code == 302
    assert (container / "etc/zlh/ide.password").stat().st_mode & 0o777 == 0o600


def test_power_actions_and_console_of_a_dev_container(operator_env: dict[str, str]) -> None:
    # A dev container has no game process: zlh stop, start and console had refused it
    # ("has no game process"), so its IDE could not be stopped or read through zlh.
    done = _zlh(operator_env, "provision", "dev-node", "devnode", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(_zlh(operator_env, "status", "devnode", "--json").stdout)
    leaders = [psutil.Process(p["pid"]) for p in status["processes"]]
    tree = [p for leader in leaders for p in (leader, *leader.children(recursive=True))]

    stopped = _zlh(operator_env, "stop", "devnode", "--json")
    console = _zlh(operator_env, "console", "devnode", "--lines", "50")
    started = _zlh(operator_env, "start", "devnode", "--json")

    assert stopped.returncode == 0, stopped.stderr
    assert sorted((r["name"], r["state"]) for r in json.loads(stopped.stdout)) == [
        ("ide", "stopped"), ("ssh", "stopped")]
    assert [p.pid for p in tree if _alive(p)] == []
    assert console.returncode == 0, console.stderr
    assert "HTTP server listening on" in console.stdout
    assert console.stdout.rstrip().endswith("[zlh] ide stopped (exit 0)")
    assert started.returncode == 0, started.stderr
    assert sorted(r["name"] for r in json.loads(started.stdout)) == ["ide", "ssh"]
    poll(lambda: _ide_ready(operator_env), READY_TIMEOUT, "the IDE after zlh start")


def _ide_ready(env: dict[str, str]) -> bool:
    status = json.loads(_zlh(env, "status", "devnode", "--json").stdout)
    return any(p["name"] == "ide" and p["ready"] for p in status["processes"])
