"""A real agentd for tests: its own folder, config, token and a loopback port."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

PROGRAMS = Path(__file__).parent / "programs"
FAKE = str(PROGRAMS / "fake_server.py")


def poll(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.02) -> Any:
    """Poll until predicate() is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)  # a poll interval, not a wait for an outcome


def fake(*args: str) -> list[str]:
    return [sys.executable, "-u", FAKE, *args]


class AgentProcess:
    def __init__(self, root: Path, **config: Any) -> None:
        self.root = root
        self.token = secrets.token_urlsafe(32)
        etc = root / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        token_file = etc / "agent.token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, self.token.encode())
        os.close(fd)
        settings = {"bind": "127.0.0.1", "port": 0, "token_file": "agent.token",
                    "state_dir": "../state", "server_root": "../srv", **config}
        self.config_path = etc / "agentd.yaml"
        self.config_path.write_text(yaml.safe_dump(settings))
        self.state = root / "state"
        self.log_path = root / "agentd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: httpx.Client | None = None

    def start(self) -> "AgentProcess":
        port_file = self.state / "agent.port"
        port_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agentd", "--config", str(self.config_path)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        poll(lambda: port_file.exists() and port_file.read_text().strip()
             or self._died(), 15, "the agent's port file")
        self.port = int(port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=30,
                                   headers={"Authorization": f"Bearer {self.token}"})
        poll(self._healthy, 15, "the agent's /healthz")
        return self

    def _died(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agentd exited with {self.proc.returncode}:\n{self.logs()}")
        return False

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        records = []
        for line in self.logs().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if name is None or record.get("event") == name:
                records.append(record)
        return records

    # -- API shortcuts --------------------------------------------------------------------

    def put_spec(self, *processes: dict[str, Any]) -> httpx.Response:
        assert self.client is not None
        return self.client.put("/v1/spec", json={"processes": list(processes)})

    def process(self, name: str) -> dict[str, Any]:
        assert self.client is not None
        status = self.client.get("/v1/status").json()
        return next(p for p in status["processes"] if p["name"] == name)

    def wait_state(self, name: str, state: str, timeout: float = 20, **more: Any) -> dict:
        def matches() -> dict | None:
            proc = self.process(name)
            ok = proc["state"] == state and all(proc.get(k) == v for k, v in more.items())
            return proc if ok else None
        return poll(matches, timeout, f"{name} to be {state} {more or ''}")

    def action(self, name: str, verb: str) -> httpx.Response:
        assert self.client is not None
        return self.client.post(f"/v1/processes/{name}/{verb}")

    def console(self, name: str, after: int = -1) -> list[dict[str, Any]]:
        assert self.client is not None
        text = self.client.get(f"/v1/processes/{name}/console",
                               params={"after": after, "limit": 100000}).text
        return [json.loads(line) for line in text.splitlines()]

    def console_text(self, name: str) -> list[str]:
        return [r["text"] for r in self.console(name) if "text" in r]

    def send(self, name: str, line: str) -> httpx.Response:
        assert self.client is not None
        return self.client.post(f"/v1/processes/{name}/console", json={"line": line})

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.client is not None:
            self.client.close()
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)
