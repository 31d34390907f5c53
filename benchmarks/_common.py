"""Shared pieces of the benchmark scripts: a real agentd in a scratch folder, a
supervisord from a throwaway venv, /proc readers, statistics and output.

Every process started here is remembered by pid (plus its start time, so a reused pid
is never signalled) and ended by pid when the benchmark is done.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
PAGE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")  # the unit of cpu_ticks()
_source = ROOT


# -- which agentd ----------------------------------------------------------------------


def add_common_args(parser: Any) -> None:
    parser.add_argument("--source", type=Path, default=ROOT,
                        help="folder holding the agentd package to measure (default: this "
                             "work tree; e.g. an extracted `git archive COMMIT agentd`)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def set_source(path: Path) -> None:
    global _source
    path = Path(path).resolve()
    if not (path / "agentd" / "__init__.py").exists():
        raise SystemExit(f"{path} holds no agentd package")
    _source = path


def source_dir() -> Path:
    return _source


def source_env() -> dict[str, str]:
    """The environment for a Python that must import agentd from the chosen source."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(_source) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def source_label() -> str:
    if _source != ROOT:
        return str(_source)
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip() or "?"
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "agentd"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return f"work tree at {head}" + (" with uncommitted agentd changes" if dirty else "")


# -- small helpers ---------------------------------------------------------------------


def poll(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.02) -> Any:
    """Call `predicate` until it is truthy; raise naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-pct * len(ordered) // 100))))
    return ordered[rank - 1]


def ratio(ours: float, reference: float) -> float:
    return ours / reference if reference else float("nan")


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def scratch(prefix: str, keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"zlh-bench-{prefix}-"))
    try:
        yield path
    finally:
        if keep:
            print(f"(kept {path})", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zlh-bench"


def loadavg() -> str:
    """The 1/5/15-minute load averages: other work on the machine skews every figure."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


_LOAD_AT_START = loadavg()


def report(result: dict[str, Any], lines: list[str], as_json: bool) -> None:
    result.setdefault("loadavg_at_start", _LOAD_AT_START)
    result.setdefault("loadavg_at_end", loadavg())
    result.setdefault("cpus", os.cpu_count())
    if as_json:
        print(json.dumps(result, indent=1, default=str))
    else:
        lines.append(f"(machine: {result['cpus']} CPUs, load average at the start "
                     f"{result['loadavg_at_start']}, at the end {result['loadavg_at_end']})")
        print("\n".join(lines))


# -- /proc -----------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of stat)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(raw[raw.rindex(b")") + 2 :].split()[19])


def cpu_ticks(pid: int) -> int:
    """utime + stime of the process, in clock ticks."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                found += [int(p) for p in text.split()]
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (e.g. a scratch folder's path)."""
    needle = text.encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if needle in raw:
                found.append(int(entry))
    return found


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def memory(pid: int) -> dict[str, int]:
    """rss, pss and uss (private) of one process, in bytes."""
    out = {"rss": 0, "pss": 0, "uss": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if not parts or not parts[0].isdigit():
                continue
            value = int(parts[0]) * 1024
            if key == "Pss":
                out["pss"] = value
            elif key in ("Private_Clean", "Private_Dirty"):
                out["uss"] += value
    return out


def rss_by_mapping(pid: int) -> list[tuple[str, int]]:
    """Resident bytes per mapping name (anonymous memory as one entry), largest first."""
    totals: dict[str, int] = {}
    name = "?"
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            path = head[5].strip() if len(head) == 6 else ""
            if not path or path == "[heap]":
                name = "[anonymous: heap, arenas, mmap]"
            elif path.startswith("["):
                name = path
            else:
                name = os.path.basename(path)
        elif line.startswith("Rss:"):
            totals[name] = totals.get(name, 0) + int(line.split()[1]) * 1024
    return sorted(totals.items(), key=lambda item: -item[1])


class Started:
    """A process we started (or found among our children), known by pid + start time."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.started = start_time(pid)

    def alive(self) -> bool:
        return self.started is not None and start_time(self.pid) == self.started

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait_gone(self, timeout: float) -> bool:
        try:
            poll(lambda: not self.alive() or _is_zombie(self.pid), timeout, "exit")
            return True
        except TimeoutError:
            return False


def _is_zombie(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return raw[raw.rindex(b")") + 2 : raw.rindex(b")") + 3] == b"Z"


def end_processes(procs: list[Started], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left, each by pid."""
    for proc in procs:
        proc.signal(signal.SIGTERM)
    for proc in procs:
        if not proc.wait_gone(grace):
            proc.signal(signal.SIGKILL)
            proc.wait_gone(grace)


# -- agentd ----------------------------------------------------------------------------


class Agent:
    """A real agentd on a loopback port, with its own folder, config and token."""

    def __init__(self, root: Path, python: str = sys.executable, **config: Any) -> None:
        import yaml

        self.root = root
        self.python = python
        self.token = secrets.token_urlsafe(32)
        etc = root / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        fd = os.open(etc / "agent.token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, self.token.encode())
        os.close(fd)
        settings = {"bind": "127.0.0.1", "port": 0, "token_file": "agent.token",
                    "state_dir": "../state", "server_root": "../srv", **config}
        self.config_path = etc / "agentd.yaml"
        self.config_path.write_text(yaml.safe_dump(settings))
        self.state = root / "state"
        self.srv = root / "srv"
        self.log_path = root / "agentd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.url = ""
        self._client: Any = None
        self._seen: dict[int, Started] = {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def preload_spec(self, *processes: dict[str, Any]) -> None:
        """Leave a spec for the agent to load at start, so it needs no request for it."""
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "spec.json").write_text(json.dumps({"processes": list(processes)}))

    def start(self, healthz: bool = True, timeout: float = 20) -> Agent:
        port_file = self.state / "agent.port"
        port_file.unlink(missing_ok=True)
        env = source_env()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [self.python, "-m", "agentd", "--config", str(self.config_path)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env, cwd=self.root,
            )
        poll(lambda: (port_file.exists() and port_file.read_text().strip()) or self._died(),
             timeout, "the agent's port file")
        self.port = int(port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"
        if healthz:
            poll(self._healthy, timeout, "the agent's /healthz")
        return self

    def _died(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"agentd exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
        return False

    def _healthy(self) -> bool:
        import httpx

        self._died()
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    @property
    def client(self) -> Any:
        import httpx

        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=60,
                                        headers={"Authorization": f"Bearer {self.token}"})
        return self._client

    def put_spec(self, *processes: dict[str, Any]) -> Any:
        response = self.client.put("/v1/spec", json={"processes": list(processes)})
        response.raise_for_status()
        return response.json()

    def status(self) -> dict[str, Any]:
        response = self.client.get("/v1/status")
        response.raise_for_status()
        return response.json()

    def process(self, name: str) -> dict[str, Any]:
        proc = next(p for p in self.status()["processes"] if p["name"] == name)
        if proc.get("pid"):
            self.remember(proc["pid"])
        return proc

    def remember(self, pid: int) -> None:
        """Note a supervised pid so that stop() can make sure it is gone."""
        if pid not in self._seen:
            self._seen[pid] = Started(pid)

    def holders(self) -> list[int]:
        """The agent's process holders for this folder (they are not its children)."""
        return [pid for pid in processes_mentioning(str(self.root))
                if pid != self.pid and any("holder" in part for part in cmdline(pid))]

    def remember_children(self) -> list[int]:
        """Every process the agent runs for us: its children, holders and their trees."""
        if self.proc is None:
            return []
        pids = descendants(self.pid)
        for pid in processes_mentioning(str(self.root)):
            if pid != self.pid:
                pids += [pid, *descendants(pid)]
        for pid in pids:
            self.remember(pid)
        return pids

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, *names: str) -> list[dict[str, Any]]:
        records = []
        for line in self.logs().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not names or record.get("event") in names:
                records.append(record)
        return records

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the agent (it stops its processes), then make sure all are gone."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is not None:
            self.remember_children()
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.remember_children()  # whatever outlived the agent (holders)
        end_processes(list(self._seen.values()))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- supervisord -----------------------------------------------------------------------


def tool_venv(packages: list[str], where: Path | None = None) -> Path:
    """A throwaway venv with `packages` (pip-installed once, then reused); its bin folder."""
    venv = where or cache_dir() / "venv"
    bin_dir = venv / "bin"
    marker = venv / ".zlh-bench-packages"
    wanted = set(packages)
    have = set(marker.read_text().split()) if marker.exists() else set()
    if not (bin_dir / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if not wanted <= have:
        print(f"(installing {' '.join(sorted(wanted - have))} into {venv})", file=sys.stderr)
        subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", *sorted(wanted - have)],
                       check=True, stdout=sys.stderr)
        marker.write_text(" ".join(sorted(have | wanted)) + "\n")
    return bin_dir


class Supervisord:
    """supervisord 4 (from a throwaway venv) on a loopback port, with the given programs."""

    def __init__(self, root: Path, bin_dir: Path, programs: dict[str, dict[str, Any]]) -> None:
        self.root = root
        self.bin_dir = bin_dir
        self.port = free_port()
        self.conf = root / "supervisord.conf"
        self.log_path = root / "supervisord.log"
        sections = [
            "[supervisord]", "nodaemon=true", f"logfile={self.log_path}",
            f"pidfile={root / 'supervisord.pid'}", f"childlogdir={root}", "loglevel=info", "",
            "[inet_http_server]", f"port=127.0.0.1:{self.port}", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "",
            "[supervisorctl]", f"serverurl=http://127.0.0.1:{self.port}", "",
        ]
        for name, options in programs.items():
            sections.append(f"[program:{name}]")
            sections += [f"{key}={value}" for key, value in options.items()]
            sections.append("")
        self.conf.write_text("\n".join(sections))
        self.proc: subprocess.Popen[bytes] | None = None
        self._seen: dict[int, Started] = {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def version(self) -> str:
        out = subprocess.run([str(self.bin_dir / "supervisord"), "--version"],
                             capture_output=True, text=True, check=False)
        return out.stdout.strip()

    def start(self) -> Supervisord:
        self.proc = subprocess.Popen(
            [str(self.bin_dir / "supervisord"), "-n", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=self.root,
        )
        poll(self._listening, 20, "supervisord's http port")
        return self

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"supervisord exited with {self.proc.returncode}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def rpc(self) -> Any:
        return xmlrpc.client.ServerProxy(f"http://127.0.0.1:{self.port}/RPC2")

    def remember_children(self) -> list[int]:
        pids = children(self.pid) if self.proc is not None else []
        for pid in pids:
            if pid not in self._seen:
                self._seen[pid] = Started(pid)
        return pids

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None:
            self.remember_children()
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        end_processes(list(self._seen.values()))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
