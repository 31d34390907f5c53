"""Figures of the `zlh` program, each against a reference measured in the same run.

1. provision: `zlh provision minecraft-squid NAME` on the local provider, npm and
   artifact caches warm (the tests' cache, as for the other zlh benchmarks), timed until the
   command returns (it returns once the server answers a Minecraft status ping); a status
   ping of our own confirms it. Reference: the bare launcher (`node
   zlh/data/squid-launcher.js SETTINGS` with NODE_PATH on the cached flying-squid) from its
   start to its `[zlh] ready on` line, and to the first status ping it answers. The runs
   alternate (reference, provision, delete), after one untimed run of both (it would
   build a missing cache entry); median of 3 each.
2. cold: fresh processes of `zlh --help`, `zlh status` with an empty inventory and with one
   server (an idle agent), against `python -c pass`, all with the venv's interpreter and
   its installed `zlh` script; one untimed warm-up each, then 10 timed runs taken in
   turn; median and p90. Target: `zlh --help` median <= 0.3 s.
3. fleet: `zlh status --json` over 50 real agents (each supervising nothing, in containers
   laid out by the local provider, registered in a throwaway inventory). References: 50
   sequential `GET /v1/status` calls with httpx in one process (warm), the same in a fresh
   process (interpreter start and imports included, as for the CLI), and the fleet call
   `zlh.servers.fleet_status()` in this process, without the program's start. zlh has no
   knob that makes `zlh status` sequential, so there is no sequential CLI run. Target:
   `zlh status` over 50 servers median <= 1.5 s.

Every process started here is ended by pid; every folder is a temporary one, removed.

    .venv/bin/python benchmarks/cli_figures.py [--only provision,cold,fleet] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import (
    Started,
    descendants,
    end_processes,
    median,
    memory,
    percentile,
    poll,
    ratio,
    report,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python")
ZLH = str(VENV_BIN / "zlh")
PLAYBOOK = "minecraft-squid"
SECTIONS = ("provision", "cold", "fleet")
TARGET_HELP_S = 0.3
TARGET_FLEET_S = 1.5
MAX_SERVERS = 100
AGENT_START_TIMEOUT = 180.0
LAUNCHER_READY_TIMEOUT = 120.0
PING_TIMEOUT = 30.0
READY_LINE = "[zlh] ready on"
STATUS_CALLS = """
import sys, time, json, httpx
agents = json.load(sys.stdin)
with httpx.Client(timeout=10) as client:
    for url, token in agents:
        client.get(url + "/v1/status",
                   headers={"Authorization": "Bearer " + token}).raise_for_status()
"""


# -- shared pieces -----------------------------------------------------------------------


@contextlib.contextmanager
def operator_home(label: str, keep: bool = False) -> Iterator[tuple[Path, dict[str, str]]]:
    """A throwaway ZLH_HOME and operator config folder, and the environment naming them."""
    top = Path(tempfile.mkdtemp(prefix=f"zlh-bench-cli-{label}-"))
    home = top / "zlh"
    home.mkdir(mode=0o700)
    (top / "config").mkdir()
    env = {**os.environ, "ZLH_HOME": str(home), "XDG_CONFIG_HOME": str(top / "config")}
    for name in ("ZLH_DEBUG", "ZLH_ARTIFACTS_URL"):
        env.pop(name, None)
    try:
        yield home, env
    finally:
        if keep:
            print(f"(kept {top})", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)


def zlh(env: dict[str, str], *args: str, timeout: float = 120) -> tuple[str, float]:
    """Run the installed `zlh` script; its stdout and wall-clock seconds. Raises on failure."""
    started = time.perf_counter()
    done = subprocess.run([ZLH, *args], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"zlh {' '.join(args)}: exit {done.returncode}: "
                           f"{done.stderr.strip()[-2000:]}")
    return done.stdout, seconds


def stats(values: list[float]) -> dict[str, Any]:
    return {"median_s": round(median(values), 4), "p90_s": round(percentile(values, 90), 4),
            "min_s": round(min(values), 4), "max_s": round(max(values), 4),
            "runs_s": [round(v, 4) for v in values]}


def minecraft_status(port: int) -> str:
    from mcstatus import JavaServer

    answer = JavaServer("127.0.0.1", port, timeout=3).status()
    return f"{answer.version.name}, {answer.latency:.0f} ms"


def try_minecraft_status(port: int) -> str | None:
    try:
        return minecraft_status(port)
    except (OSError, ValueError):
        return None


# -- 1. provision-to-ready -----------------------------------------------------------------


def launcher_run(folder: Path) -> dict[str, float]:
    """The bare launcher on a free loopback port: seconds to its ready line and first ping."""
    from tests.components import free_port, squid_command, squid_settings

    folder.mkdir(parents=True)
    port = free_port()
    argv, env = squid_command(squid_settings(folder, port))
    ready = threading.Event()
    seen: list[str] = []
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=folder, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True, errors="replace")
    tracked = [Started(proc.pid)]
    at_ready = 0.0

    def read() -> None:
        nonlocal at_ready
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line.rstrip("\n"))
            if not ready.is_set() and READY_LINE in line:
                at_ready = time.perf_counter()
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + LAUNCHER_READY_TIMEOUT
        while not ready.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(seen[-20:])
                raise RuntimeError(f"the launcher gave no ready line (exit {proc.poll()}):"
                                   f"\n{tail}")
        answer = poll(lambda: try_minecraft_status(port), PING_TIMEOUT,
                      "the launcher to answer a status ping")
        at_ping = time.perf_counter()
        return {"to_ready_line_s": at_ready - started, "to_ping_s": at_ping - started,
                "ping": answer}
    finally:
        tracked += [Started(pid) for pid in descendants(proc.pid)]
        end_processes(tracked)
        proc.wait(10)
        reader.join(5)


def step_times(home: Path, name: str, began: float, ended: float) -> dict[str, float]:
    """Seconds per provisioning step, from the inventory's history (wall clock)."""
    from zlh.inventory import Inventory

    with Inventory(home / "inventory.db") as inventory:
        history = inventory.history(name)
    out: dict[str, float] = {}
    last = began
    for entry in history:
        if entry.event == "step":
            out[entry.detail] = round(entry.time - last, 3)
            last = entry.time
    out["exit after ready"] = round(ended - last, 3)
    return out


def provision_section(args: argparse.Namespace) -> dict[str, Any]:
    from tests.components import cache_root, flying_squid_cache

    flying_squid_cache()  # the reference's NODE_PATH; built once, normally already there
    launcher: list[dict[str, Any]] = []
    provisions: list[dict[str, Any]] = []
    deletes: list[float] = []
    warm_up: dict[str, float] = {}
    with operator_home("provision", args.keep) as (home, env):
        (home / "cache").symlink_to(cache_root(), target_is_directory=True)
        undeleted: list[str] = []
        try:
            first = 0 if args.no_warm_up else -1  # run -1: untimed warm-up of both
            for index in range(first, args.provision_runs):
                ref = launcher_run(home.parent / f"launcher-{index + 1}")
                name = f"bench-squid-{index + 1}"
                undeleted.append(name)
                began = time.time()
                out, seconds = zlh(env, "provision", PLAYBOOK, name, "--json",
                                   timeout=args.provision_timeout)
                ended = time.time()
                result = json.loads(out)
                run = {"name": name, "wall_s": seconds, "zlh_reported_s": result["seconds"],
                       "ping": minecraft_status(int(result["game_port"])),
                       "steps_s": step_times(home, name, began, ended)}
                if index < 0:
                    warm_up = {"provision_s": round(seconds, 3),
                               "launcher_to_ready_line_s": round(ref["to_ready_line_s"], 3)}
                else:
                    provisions.append(run)
                    launcher.append(ref)
                deletes.append(zlh(env, "delete", name, "--yes", timeout=180)[1])
                undeleted.remove(name)
        finally:
            for name in undeleted:
                try:
                    zlh(env, "delete", name, "--yes", timeout=180)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    print(f"(cleanup of {name} failed: {exc})", file=sys.stderr)

    ours = [p["wall_s"] for p in provisions]
    ref_line = [r["to_ready_line_s"] for r in launcher]
    ref_ping = [r["to_ping_s"] for r in launcher]
    return {
        "provision": stats(ours),
        "launcher_to_ready_line": stats(ref_line),
        "launcher_to_first_ping": stats(ref_ping),
        "ratio_provision_to_launcher_ready_line": round(ratio(median(ours),
                                                              median(ref_line)), 2),
        "ratio_provision_to_launcher_first_ping": round(ratio(median(ours),
                                                              median(ref_ping)), 2),
        "overhead_over_launcher_ready_line_s": round(median(ours) - median(ref_line), 2),
        "runs": provisions,
        "launcher_pings": [r["ping"] for r in launcher],
        "delete": stats(deletes),
        "warm_up": warm_up,
    }


def provision_lines(res: dict[str, Any]) -> list[str]:
    def row(label: str, fig: dict[str, Any]) -> str:
        return f"   {label:44}{fig['median_s']:8.2f} s   runs {fmt_runs(fig)}"

    lines = [
        (f"1. provision-to-ready of {PLAYBOOK}, local provider, caches warm "
         f"(median of {len(res['runs'])})"),
        row("zlh provision (until it returns)", res["provision"]),
        row("launcher start -> ready line (reference)", res["launcher_to_ready_line"]),
        row("launcher start -> first status ping", res["launcher_to_first_ping"]),
        (f"   ratio provision / launcher ready line: "
         f"{res['ratio_provision_to_launcher_ready_line']:.2f} "
         f"(provisioning overhead {res['overhead_over_launcher_ready_line_s']:.2f} s)"),
        (f"   ratio provision / launcher first ping: "
         f"{res['ratio_provision_to_launcher_first_ping']:.2f}"),
        f"   status ping after provision: {res['runs'][0]['ping']}",
        "   steps of the median run (s):",
    ]
    middle = sorted(res["runs"], key=lambda r: r["wall_s"])[len(res["runs"]) // 2]
    steps = list(middle["steps_s"].items())
    for start in range(0, len(steps), 4):
        lines.append("     " + ", ".join(f"{k} {v:.2f}" for k, v in steps[start:start + 4]))
    lines.append(f"   zlh delete NAME --yes: median {res['delete']['median_s']:.2f} s")
    if res["warm_up"]:
        lines.append(f"   untimed warm-up run (not in the figures): provision "
                     f"{res['warm_up']['provision_s']:.2f} s, launcher ready line "
                     f"{res['warm_up']['launcher_to_ready_line_s']:.2f} s")
    return lines


# -- agents for sections 2 and 3 -------------------------------------------------------------


class Fleet:
    """Idle agents in containers laid out by the local provider, registered as servers."""

    def __init__(self, home: Path, count: int) -> None:
        self.home = home
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tracked: list[Started] = []
        self.agents: list[tuple[str, str]] = []  # (url, token)

    def start(self) -> Fleet:
        from zlh.inventory import Inventory, Server, read_secret
        from zlh.providers.local import LocalProvider

        provider = LocalProvider(self.home / "containers")
        names = [f"bench-{index:03d}" for index in range(self.count)]
        for name in names:
            provider.create(name, 0)  # port 0: the agent picks one and writes it down
            top = provider.folder(name)
            with open(top / "var/log/agentd.log", "ab") as out:
                proc = subprocess.Popen(
                    [PYTHON, "-m", "agentd", "--config", str(top / "etc/zlh/agentd.yaml")],
                    cwd=top, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            self.procs.append(proc)
            self.tracked.append(Started(proc.pid))
        ports = [self._port(provider, name, proc) for name, proc in zip(names, self.procs)]
        with Inventory(self.home / "inventory.db") as inventory:
            for name, port in zip(names, ports):
                token_path = provider.token_path(name)
                inventory.add(Server(
                    name=name, playbook=PLAYBOOK, provider="local",
                    provider_id=str(provider.folder(name)), address="127.0.0.1",
                    agent_port=port, token_path=str(token_path), step="ready", status="ready"))
                self.agents.append((f"http://127.0.0.1:{port}",
                                    read_secret(token_path).strip()))
        return self

    def _port(self, provider: Any, name: str, proc: subprocess.Popen[bytes]) -> int:
        port_file = provider.folder(name) / "var/lib/zlh/agent.port"

        def port() -> int | None:
            if proc.poll() is not None:
                log = (provider.folder(name) / "var/log/agentd.log").read_text()
                raise RuntimeError(f"agent of {name} exited with {proc.returncode}: "
                                   f"{log[-2000:]}")
            text = port_file.read_text().strip() if port_file.exists() else ""
            return int(text) if text else None

        return int(poll(port, AGENT_START_TIMEOUT, f"the port file of {name}", every=0.05))

    def wait_healthy(self) -> None:
        import httpx

        def healthy(url: str) -> bool:
            try:
                return httpx.get(url + "/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        for url, _ in self.agents:
            poll(functools.partial(healthy, url), AGENT_START_TIMEOUT, f"{url}/healthz",
                 every=0.05)

    def rss_bytes(self) -> int:
        return sum(memory(proc.pid)["rss"] for proc in self.procs)

    def stop(self) -> None:
        """SIGTERM every agent (by pid), wait, SIGKILL what is left; their children too."""
        for proc in self.procs:
            self.tracked += [Started(pid) for pid in descendants(proc.pid)]
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        end_processes(self.tracked)


# -- 2. cold start -------------------------------------------------------------------------


def cold_section(args: argparse.Namespace) -> dict[str, Any]:
    with operator_home("cold-empty", args.keep) as (_empty, empty_env), \
            operator_home("cold-one", args.keep) as (one, one_env):
        fleet = Fleet(one, 1)
        try:
            fleet.start().wait_healthy()
            commands: dict[str, tuple[list[str], dict[str, str]]] = {
                "python -c pass": ([PYTHON, "-c", "pass"], empty_env),
                "zlh --help": ([ZLH, "--help"], empty_env),
                "zlh status (empty inventory)": ([ZLH, "status"], empty_env),
                "zlh status (1 server)": ([ZLH, "status"], one_env),
            }
            times: dict[str, list[float]] = {label: [] for label in commands}
            for run in range(args.cold_runs + 1):  # run 0 is the untimed warm-up
                for label, (argv, env) in commands.items():
                    started = time.perf_counter()
                    done = subprocess.run(argv, env=env, capture_output=True, text=True,
                                          stdin=subprocess.DEVNULL, timeout=60, check=False)
                    seconds = time.perf_counter() - started
                    if done.returncode != 0:
                        raise RuntimeError(f"{label}: exit {done.returncode}: {done.stderr}")
                    if label == "zlh status (1 server)" and "bench-000" not in done.stdout:
                        raise RuntimeError(f"{label}: the server is missing:\n{done.stdout}")
                    if run:
                        times[label].append(seconds)
        finally:
            fleet.stop()
    base = median(times["python -c pass"])
    result: dict[str, Any] = {"runs": args.cold_runs, "commands": {}}
    for label, values in times.items():
        result["commands"][label] = {**stats(values),
                                     "ratio_to_python_pass": round(ratio(median(values), base),
                                                                   2)}
    help_median = median(times["zlh --help"])
    result["target_help_s"] = TARGET_HELP_S
    result["target_help_met"] = help_median <= TARGET_HELP_S
    return result


def cold_lines(res: dict[str, Any]) -> list[str]:
    lines = [(f"2. cold start, fresh processes ({res['runs']} runs each, in turn, "
             "after one warm-up)"),
             f"   {'':32}{'median s':>10}{'p90 s':>9}{'ratio to python -c pass':>26}"]
    for label, fig in res["commands"].items():
        lines.append(f"   {label:32}{fig['median_s']:10.3f}{fig['p90_s']:9.3f}"
                     f"{fig['ratio_to_python_pass']:26.2f}")
    met = "met" if res["target_help_met"] else "missed"
    lines.append(f"   target zlh --help median <= {res['target_help_s']:g} s: {met}")
    return lines


# -- 3. zlh status over 50 servers ---------------------------------------------------------


def fleet_section(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    with operator_home("fleet", args.keep) as (home, env):
        fleet = Fleet(home, args.servers)
        try:
            began = time.perf_counter()
            fleet.start().wait_healthy()
            start_s = time.perf_counter() - began
            rss = fleet.rss_bytes()

            def sequential() -> float:
                with httpx.Client(timeout=10) as client:
                    started = time.perf_counter()
                    for url, token in fleet.agents:
                        client.get(url + "/v1/status",
                                   headers={"Authorization": f"Bearer {token}"}
                                   ).raise_for_status()
                    return time.perf_counter() - started

            def sequential_process() -> float:
                started = time.perf_counter()
                subprocess.run([PYTHON, "-c", STATUS_CALLS], input=json.dumps(fleet.agents),
                               text=True, check=True, timeout=120)
                return time.perf_counter() - started

            def in_process() -> float:
                from zlh.servers import fleet_status

                previous = os.environ.get("ZLH_HOME")
                os.environ["ZLH_HOME"] = str(home)
                try:
                    started = time.perf_counter()
                    statuses = fleet_status()
                    seconds = time.perf_counter() - started
                finally:
                    if previous is None:
                        os.environ.pop("ZLH_HOME", None)
                    else:
                        os.environ["ZLH_HOME"] = previous
                check_all_reachable([s.reachable for s in statuses], args.servers)
                return seconds

            def cli_json() -> float:
                out, seconds = zlh(env, "status", "--json", timeout=120)
                check_all_reachable([s["reachable"] for s in json.loads(out)], args.servers)
                return seconds

            def cli_table() -> float:
                return zlh(env, "status", timeout=120)[1]

            measures: dict[str, Callable[[], float]] = {
                "zlh status --json": cli_json,
                "zlh status (table)": cli_table,
                "sequential httpx, one warm process": sequential,
                "sequential httpx, fresh process": sequential_process,
                "fleet_status() in this process": in_process,
            }
            times: dict[str, list[float]] = {label: [] for label in measures}
            for run in range(args.fleet_runs + 1):  # run 0 is the untimed warm-up
                for label, measure in measures.items():
                    seconds = measure()
                    if run:
                        times[label].append(seconds)
        finally:
            fleet.stop()
    ours = median(times["zlh status --json"])
    result: dict[str, Any] = {
        "servers": args.servers, "runs": args.fleet_runs,
        "agents_start_s": round(start_s, 2), "agents_rss_total_bytes": rss,
        "figures": {label: stats(values) for label, values in times.items()},
        "sequential_cli_knob": None,
        "ratio_cli_to_sequential_warm": round(
            ratio(ours, median(times["sequential httpx, one warm process"])), 2),
        "ratio_cli_to_sequential_fresh_process": round(
            ratio(ours, median(times["sequential httpx, fresh process"])), 2),
        "ratio_fleet_status_to_sequential_warm": round(
            ratio(median(times["fleet_status() in this process"]),
                  median(times["sequential httpx, one warm process"])), 2),
        "target_s": TARGET_FLEET_S, "target_met": ours <= TARGET_FLEET_S,
    }
    return result


def check_all_reachable(reachable: list[bool], count: int) -> None:
    if len(reachable) != count or not all(reachable):
        raise RuntimeError(f"zlh status saw {sum(reachable)} reachable servers of "
                           f"{len(reachable)}, expected {count}")


def fleet_lines(res: dict[str, Any]) -> list[str]:
    lines = [(f"3. zlh status over {res['servers']} local servers (real idle agents, "
             f"{res['runs']} runs each, in turn, after one warm-up)"),
             (f"   agents: started in {res['agents_start_s']:.1f} s, "
             f"{res['agents_rss_total_bytes'] / 2**20:.0f} MiB RSS in all"),
             f"   {'':38}{'median s':>10}{'p90 s':>9}"]
    for label, fig in res["figures"].items():
        lines.append(f"   {label:38}{fig['median_s']:10.3f}{fig['p90_s']:9.3f}")
    lines += [
        (f"   ratio zlh status --json / sequential (warm process): "
        f"{res['ratio_cli_to_sequential_warm']:.2f}; / sequential (fresh process): "
        f"{res['ratio_cli_to_sequential_fresh_process']:.2f}"),
        (f"   ratio fleet_status() / sequential, both in a warm process: "
        f"{res['ratio_fleet_status_to_sequential_warm']:.2f}"),
        "   (zlh has no knob to make `zlh status` sequential: no sequential CLI run)",
        (f"   target zlh status --json median <= {res['target_s']:g} s: "
        f"{'met' if res['target_met'] else 'missed'}"),
    ]
    return lines


# -- main ----------------------------------------------------------------------------------


def fmt_runs(fig: dict[str, Any]) -> str:
    return " ".join(f"{v:.2f}" for v in fig["runs_s"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run ({', '.join(SECTIONS)})")
    parser.add_argument("--provision-runs", type=int, default=3, choices=range(1, 11),
                        metavar="1..10")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="skip the untimed provision and launcher run before the timed ones")
    parser.add_argument("--provision-timeout", type=float, default=360.0)
    parser.add_argument("--cold-runs", type=int, default=10, choices=range(1, 51),
                        metavar="1..50")
    parser.add_argument("--fleet-runs", type=int, default=10, choices=range(1, 51),
                        metavar="1..50")
    parser.add_argument("--servers", type=int, default=50, choices=range(1, MAX_SERVERS + 1),
                        metavar=f"1..{MAX_SERVERS}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}")
    if not os.access(ZLH, os.X_OK):
        parser.error(f"{ZLH} is missing: bash .ci/setup installs the project into .venv")

    result: dict[str, Any] = {"benchmark": "cli_figures", "python": PYTHON, "zlh": ZLH}
    lines = ["cli_figures: the zlh program against references in the same run", ""]
    runners = {"provision": (provision_section, provision_lines),
               "cold": (cold_section, cold_lines),
               "fleet": (fleet_section, fleet_lines)}
    for section in SECTIONS:
        if section in chosen:
            run, show = runners[section]
            result[section] = run(args)
            lines += [*show(result[section]), ""]
    report(result, lines, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
