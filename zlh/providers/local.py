"""The local provider: each container is a folder with its own agent on loopback.

    $ZLH_HOME/containers/NAME/
        etc/zlh/agentd.yaml      agent config (bind 127.0.0.1, port, paths)
        etc/zlh/agent.token      bearer token, mode 0600
        var/lib/zlh/             agent state
        var/log/agentd.log       the agent's stdout and stderr
        var/run/agentd.json      the agent's pid and start time (its identity)
        opt/zlh/runtimes/        installed runtimes
        srv/zlh/                 the server root
        home/dev/workspace/      dev containers' workspace

The agent runs detached (its own session) so it outlives zlh; zlh finds it again from
the folder. It is stopped by pid after checking its start time, never by name.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import yaml

from zlh.errors import ConflictError, NotFoundError, ProvisionError
from zlh.inventory import read_secret, write_secret
from zlh.ports import require_free
from zlh.providers.base import AgentEndpoint, AgentProcess

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LAYOUT = (
    "etc/zlh",
    "var/lib/zlh",
    "var/log",
    "var/run",
    "opt/zlh/runtimes",
    "srv/zlh",
    "home/dev/workspace",
)
CONSOLE_RING = 5000


class LocalProvider:
    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    def preflight(self) -> None:
        """Nothing outside this machine to check."""

    def folder(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.folder(name) / "etc/zlh/agentd.yaml").is_file()

    def token_path(self, name: str) -> Path:
        return self.folder(name) / "etc/zlh/agent.token"

    def server_root(self, name: str) -> Path:
        return self.folder(name) / "srv/zlh"

    def address(self, name: str) -> str:
        return LOOPBACK

    def server_files(self, name: str) -> AbstractContextManager[LocalServerFiles]:
        return nullcontext(LocalServerFiles(self.server_root(name)))

    def container_files(self, name: str) -> AbstractContextManager[LocalServerFiles]:
        return nullcontext(LocalServerFiles(self.folder(name)))

    def create(self, name: str, agent_port: int) -> str:
        """Lay out the folder and the agent's config; keeps an existing token."""
        top = self.folder(name)
        for sub in LAYOUT:
            (top / sub).mkdir(parents=True, exist_ok=True)

        token_file = self.token_path(name)
        if not token_file.is_file():
            write_secret(token_file, secrets.token_urlsafe(32))

        config = {
            "bind": LOOPBACK,
            "port": agent_port,
            "token_file": str(token_file),
            "state_dir": str(top / "var/lib/zlh"),
            "server_root": str(self.server_root(name)),
            "root": str(top),  # env_files (the IDE password) are read from here
            # Containers on one machine share verified runtime trees (hard links).
            "runtime_cache": str(self.root.parent / "cache" / "runtime-trees"),
            "console_ring": CONSOLE_RING,
        }
        (top / "etc/zlh/agentd.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return str(top)

    def _config(self, name: str) -> dict[str, object]:
        path = self.folder(name) / "etc/zlh/agentd.yaml"
        try:
            return dict(yaml.safe_load(path.read_text()))
        except FileNotFoundError:
            raise NotFoundError(f"container {name} has no agent config ({path})") from None

    def endpoint(self, name: str) -> AgentEndpoint:
        config = self._config(name)
        token = read_secret(Path(str(config["token_file"])))
        return AgentEndpoint(LOOPBACK, int(str(config["port"])), token.strip())

    # -- the agent process ------------------------------------------------------------

    def _pid_file(self, name: str) -> Path:
        return self.folder(name) / "var/run/agentd.json"

    def agent_process(self, name: str) -> AgentProcess | None:
        """The recorded agent, if that very process (pid and start time) still runs."""
        try:
            data = json.loads(self._pid_file(name).read_text())
            recorded = AgentProcess(int(data["pid"]), float(data["create_time"]))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None
        return recorded if _alive(recorded) else None

    def agent_running(self, name: str) -> bool:
        return self.agent_process(name) is not None

    def start_agent(self, name: str, timeout: float = 30.0) -> AgentProcess:
        running = self.agent_process(name)
        if running is not None:
            self._wait_healthy(name, running, timeout)
            return running

        top = self.folder(name)
        port = int(str(self._config(name)["port"]))
        require_free(port, "tcp", f"agent of {name}")
        log_file = top / "var/log/agentd.log"
        rotate_log(log_file)
        with open(log_file, "ab") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "agentd", "--config", str(top / "etc/zlh/agentd.yaml")],
                cwd=top,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        process = AgentProcess(child.pid, _create_time(child.pid))
        self._pid_file(name).write_text(json.dumps(process.__dict__))
        log.info("agent of %s started, pid %d, port %d", name, child.pid, port)

        self._wait_healthy(name, process, timeout)
        return process

    def _wait_healthy(self, name: str, process: AgentProcess, timeout: float) -> None:
        from zlh.agent_client import AgentClient
        from zlh.errors import AgentUnreachableError

        endpoint = self.endpoint(name)
        deadline = time.monotonic() + timeout
        with AgentClient(endpoint.base_url, endpoint.token, timeout=2.0) as client:
            while True:
                if not _alive(process):
                    raise ProvisionError(
                        f"agent of {name} exited at start; see {self._log_tail(name)}"
                    )
                try:
                    if client.health():
                        return
                except AgentUnreachableError:
                    pass
                if time.monotonic() > deadline:
                    raise ProvisionError(
                        f"agent of {name} did not answer on {endpoint.base_url} "
                        f"within {timeout:.0f} s; see {self._log_tail(name)}"
                    )
                time.sleep(0.1)

    def _log_tail(self, name: str) -> str:
        return str(self.folder(name) / "var/log/agentd.log")

    def stop_agent(self, name: str, timeout: float = 60.0, detach: bool = False) -> None:
        """SIGTERM to the recorded agent (identity checked), SIGKILL after `timeout`.
        With `detach`, SIGUSR2: the agent leaves and its processes keep running."""
        process = self.agent_process(name)
        if process is None:
            return
        import psutil

        try:
            target = psutil.Process(process.pid)
            target.send_signal(signal.SIGUSR2 if detach else signal.SIGTERM)
            target.wait(timeout)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            log.warning("agent of %s ignored SIGTERM for %.0f s; killing", name, timeout)
            target.kill()
            target.wait(10)
        self._pid_file(name).unlink(missing_ok=True)

    def folder_exists(self, name: str) -> bool:
        return self.folder(name).exists()

    def delete(self, name: str) -> None:
        if self.agent_running(name):
            raise ConflictError(f"the agent of {name} still runs; stop it first")
        # An agent that died or hung could not stop its processes: their holders still
        # keep them. Nothing of the container may outlive its folder.
        for pid in kill_held(self.folder(name) / "var/lib/zlh/holders"):
            log.warning("killed process %d left running in %s", pid, name)
        if self.folder(name).exists():
            shutil.rmtree(self.folder(name))

    def kill_leftover(self, pid: int, started_at: float | None) -> bool:
        return kill_process(pid, started_at)


class LocalServerFiles:
    """A server root that is a folder on this machine."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = str(path)

    def write_text(self, rel: str, text: str, mode: int = 0o644) -> None:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.zlh-tmp")
        temp.unlink(missing_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with open(fd, "w", encoding="utf-8") as handle:
            os.fchmod(fd, mode)  # whatever the umask
            handle.write(text)
        os.replace(temp, target)

    def read_text(self, rel: str) -> str:
        return (self.path / rel).read_text(encoding="utf-8")

    def mkdir(self, rel: str) -> None:
        (self.path / rel).mkdir(mode=0o755, parents=True, exist_ok=True)

    def put(self, local: Path, rel: str) -> None:
        target = self.path / rel
        if local.is_dir():
            from zlh.npmcache import link_tree

            link_tree(local, target)  # hard links: the source is a verified cache entry
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)

    def has(self, path: str) -> bool:
        return Path(path).exists()


def _create_time(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).create_time())


def _alive(process: AgentProcess) -> bool:
    import psutil

    try:
        target = psutil.Process(process.pid)
        if abs(target.create_time() - process.create_time) > 0.05:
            return False  # the pid was reused by another process
        return bool(target.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


AGENT_LOG_MAX = 16 * 2**20
AGENT_LOG_KEEP = 3


def rotate_log(path: Path) -> None:
    """Rotate the agent's log at its start once it is over AGENT_LOG_MAX (3 kept)."""
    try:
        if path.stat().st_size <= AGENT_LOG_MAX:
            return
    except FileNotFoundError:
        return
    for index in range(AGENT_LOG_KEEP - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{index + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))


def kill_held(holders: Path) -> list[int]:
    """SIGKILL every process a holder recorded in `holders` (identity checked) and every
    process carrying one of their markers; returns the pids killed."""
    import psutil

    markers, killed = set(), []
    for record_file in holders.glob("*.json"):
        try:
            record = json.loads(record_file.read_text())
            markers.add(str(record["marker"]))
            recorded = [tuple(record["pid"]), tuple(record["holder"])]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        killed += [pid for pid, started in recorded if kill_process(int(pid), float(started))]
    if not markers:
        return killed
    for proc in psutil.process_iter():
        try:
            environ = proc.environ()
        except psutil.Error:
            continue
        if environ.get("ZLH_PROCESS_ID") in markers and kill_process(proc.pid, None):
            killed.append(proc.pid)
    return killed


def kill_process(pid: int, started_at: float | None) -> bool:
    """SIGKILL a leftover process after checking its identity; True when one was killed."""
    import psutil

    try:
        target = psutil.Process(pid)
        if started_at is not None and abs(target.create_time() - started_at) > 1.0:
            return False
        target.kill()
        return True
    except psutil.NoSuchProcess:
        return False


if os.name != "posix":  # pragma: no cover - the local provider needs sessions and signals
    raise ImportError("the local provider needs a POSIX system")
