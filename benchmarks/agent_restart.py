"""Agent restarts: time to reattach, console lines across a kill -9, RSS over cycles.

Each section runs its own agentd in a scratch folder and ends every process it started.

  reattach  --processes N (`sleep`, no probe) run under an agent that is then killed
            with SIGKILL; a new agent is started at once. Timed from the exec of the new
            agent to /healthz answering, and to GET /v1/status showing all N running with
            the pids they had (checked: no second start). --rounds times; median and max.
            Reference in the same run: a fresh agent spawning the same N processes (exec
            of an agent whose spec is on disk, after a SIGTERM stopped them all).
  console   a paced child prints numbered lines at --rate lines/s for --seconds; the
            agent is killed with SIGKILL --kills times during that and started again at
            once. After the child's end, STATE/console/NAME.log* are read: numbers never
            logged (lost), numbers logged twice (duplicated), holes in the seq numbering.
            Target: 0 lost.
  cycles    agentd's RSS over --cycles POST start / POST stop of one `sleep` (SIGTERM
            stop, no probe), sampled after a warm-up of --warm-up cycles and every 100
            cycles; open fds and threads too. Target: growth under 5 MB.

    .venv/bin/python benchmarks/agent_restart.py [--only reattach,console,cycles] [--json]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
from _common import (
    Agent,
    add_common_args,
    median,
    poll,
    report,
    scratch,
    set_source,
    source_label,
)

RSS_TARGET_BYTES = 5_000_000
LOST_TARGET = 0
SLEEP = shutil.which("sleep") or "/bin/sleep"
POLL_S = 0.01

# Numbered lines at a steady rate (checked against the clock every 100 lines), then
# `end COUNT SECONDS`: the count and the time it really took.
PACED_CHILD = """
import os, sys, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
total = int(rate * seconds)
write = os.write
t0 = time.monotonic()
for i in range(total):
    if i % 100 == 0:
        ahead = t0 + i / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    write(1, b"line %d paced output of a busy server\\n" % i)
write(1, b"end %d %.3f\\n" % (total, time.monotonic() - t0))
"""


# -- helpers ---------------------------------------------------------------------------


def api(agent: Agent) -> httpx.Client:
    """A client for the agent's current port (a restarted agent has a new one)."""
    return httpx.Client(base_url=agent.url, timeout=30,
                        headers={"Authorization": f"Bearer {agent.token}"})


def healthy(agent: Agent) -> bool:
    try:
        return httpx.get(agent.url + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def processes(client: httpx.Client) -> dict[str, dict[str, Any]]:
    try:
        response = client.get("/v1/status")
    except httpx.TransportError:
        return {}
    if response.status_code != 200:
        return {}
    return {p["name"]: p for p in response.json()["processes"]}


def start_timed(agent: Agent, timeout: float) -> float:
    """Start `agent`; the monotonic time just before its exec."""
    t0 = time.monotonic()
    agent.start(healthz=False, timeout=timeout)
    return t0


def kill_agent(agent: Agent, sig: int = signal.SIGKILL) -> None:
    assert agent.proc is not None
    agent.remember_children()
    agent.proc.send_signal(sig)
    agent.proc.wait(120)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# -- reattach --------------------------------------------------------------------------


def wait_all(agent: Agent, t0: float, pids: dict[str, int] | None, count: int,
             timeout: float) -> tuple[float, float, dict[str, int]]:
    """(ms to /healthz, ms to all `count` running [with `pids`], the pids)."""
    poll(lambda: healthy(agent), timeout, "/healthz", every=POLL_S)
    t_health = time.monotonic() - t0
    with api(agent) as client:
        def all_running() -> dict[str, int] | None:
            procs = processes(client)
            if len(procs) != count or any(p["state"] != "running" for p in procs.values()):
                return None
            now = {name: p["pid"] for name, p in procs.items()}
            if pids is not None and now != pids:
                raise RuntimeError(f"pids changed across the restart: {pids} -> {now}")
            return now

        found = poll(all_running, timeout, f"{count} processes running", every=POLL_S)
    return ms(t_health), ms(time.monotonic() - t0), found


def run_reattach(count: int, rounds: int, timeout: float) -> dict[str, Any]:
    specs = [{"name": f"p{i}", "argv": [SLEEP, "3600"], "restart": {"policy": "never"},
              "stop": {"signal": "SIGTERM", "grace": 5}} for i in range(count)]
    reattach: dict[str, list[float]] = {"healthz_ms": [], "all_running_ms": [],
                                        "first_reattached_record_ms": [],
                                        "last_reattached_record_ms": []}
    fresh: dict[str, list[float]] = {"healthz_ms": [], "all_running_ms": []}
    with scratch("restart-reattach") as root:
        agent = Agent(root)
        agent.preload_spec(*specs)
        with agent:
            t0 = start_timed(agent, timeout)
            _, _, pids = wait_all(agent, t0, None, count, timeout)
            spawns = len(agent.events("spawn"))
            for _ in range(rounds):
                kill_agent(agent)
                wall0, t0 = time.time(), start_timed(agent, timeout)
                health, running, _ = wait_all(agent, t0, pids, count, timeout)
                reattach["healthz_ms"].append(health)
                reattach["all_running_ms"].append(running)
                marks = [e["ts"] for e in agent.events("reattached") if e["ts"] >= wall0]
                if len(marks) != count:
                    raise RuntimeError(f"{len(marks)} reattached records, not {count}")
                reattach["first_reattached_record_ms"].append(ms(min(marks) - wall0))
                reattach["last_reattached_record_ms"].append(ms(max(marks) - wall0))
            second_starts = len(agent.events("spawn")) - spawns
            for _ in range(rounds):
                kill_agent(agent, signal.SIGTERM)  # stops them all; the spec stays
                t0 = start_timed(agent, timeout)
                health, running, _ = wait_all(agent, t0, None, count, timeout)
                fresh["healthz_ms"].append(health)
                fresh["all_running_ms"].append(running)
    return {"processes": count, "rounds": rounds, "second_starts": second_starts,
            "reattach": summarise(reattach), "fresh_start": summarise(fresh)}


def summarise(series: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {key: {"median": round(median(v), 1), "max": max(v), "all": v}
            for key, v in series.items()}


# -- console lines across kill -9 ------------------------------------------------------


def read_console_logs(folder: Path, name: str) -> list[tuple[int, str]]:
    """(seq, text) of every record in NAME.log.N ... NAME.log, oldest file first."""
    paths = sorted(folder.glob(f"{name}.log.*"), key=lambda p: -int(p.suffix[1:]))
    records = []
    for path in [*paths, folder / f"{name}.log"]:
        if not path.exists():
            continue
        for raw in path.read_bytes().split(b"\n"):
            parts = raw.split(b"\t", 2)
            if len(parts) == 3:
                records.append((int(parts[0]), parts[2].decode(errors="replace")))
    return records


def count_lines(records: list[tuple[int, str]], total: int) -> dict[str, Any]:
    numbers = Counter(int(text.split()[1]) for _, text in records
                      if text.startswith("line ") and text.split()[1].isdigit())
    seqs = [seq for seq, _ in records]
    holes = sum(b - a - 1 for a, b in pairwise(seqs) if b > a + 1)
    ends = [text.split() for _, text in records if text.startswith("end ")]
    return {
        "expected": total,
        "logged": sum(numbers.values()),
        "lost": len(set(range(total)) - set(numbers)),
        "duplicated": sum(n - 1 for n in numbers.values() if n > 1),
        "seq_holes": holes,
        "seq_out_of_order": sum(1 for a, b in pairwise(seqs) if b <= a),
        "child_seconds": float(ends[-1][2]) if ends else None,
    }


def run_console(rate: float, seconds: float, kills: int, timeout: float) -> dict[str, Any]:
    total = int(rate * seconds)
    spec = {"name": "talker", "argv": [sys.executable, "-c", PACED_CHILD, str(rate),
                                       str(seconds)],
            "restart": {"policy": "never"}}
    gaps = []
    with scratch("restart-console") as root:
        agent = Agent(root, console_log_max_bytes=256 * 2**20)
        agent.preload_spec(spec)
        with agent:
            agent.start(timeout=timeout)
            with api(agent) as client:
                poll(lambda: processes(client).get("talker", {}).get("pid"), timeout,
                     "the talker to start", every=POLL_S)
            begun = time.monotonic()
            for k in range(kills):
                # Kills spread over the run (a measurement schedule, not a wait for an event).
                time.sleep(max(0.0, begun + seconds * (k + 1) / (kills + 1) - time.monotonic()))
                killed = time.monotonic()
                kill_agent(agent)
                agent.start(healthz=False, timeout=timeout)
                poll(lambda: healthy(agent), timeout, "/healthz", every=POLL_S)
                gaps.append(ms(time.monotonic() - killed))
            with api(agent) as client:
                final = poll(lambda: (p := processes(client).get("talker")) and
                             p["state"] == "stopped" and p, seconds + timeout,
                             "the talker to end", every=0.1)
            counts = count_lines(read_console_logs(agent.state / "console", "talker"), total)
    counts.update({"rate": rate, "seconds": seconds, "kills": kills,
                   "agent_down_ms": gaps, "exit_code": final["last_exit_code"],
                   "crash": final["last_crash"]})
    return counts


# -- RSS over start/stop cycles --------------------------------------------------------


def agent_figures(pid: int) -> dict[str, int]:
    out = {"rss": 0, "threads": 0, "fds": len(list(Path(f"/proc/{pid}/fd").iterdir()))}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss"] = int(line.split()[1]) * 1024
        elif line.startswith("Threads:"):
            out["threads"] = int(line.split()[1])
    return out


def one_cycle(client: httpx.Client) -> None:
    for verb, wanted in (("start", ("starting", "running")), ("stop", ("stopped",))):
        response = client.post(f"/v1/processes/idle/{verb}")
        response.raise_for_status()
        if response.json()["state"] not in wanted:
            raise RuntimeError(f"{verb}: {response.json()}")


def run_cycles(cycles: int, warm_up: int, timeout: float) -> dict[str, Any]:
    samples = []
    spec = {"name": "idle", "argv": [SLEEP, "3600"], "autostart": False,
            "stop": {"signal": "SIGTERM", "grace": 2, "term_grace": 1},
            "restart": {"policy": "never"}}
    with scratch("restart-cycles") as root:
        agent = Agent(root)
        agent.preload_spec(spec)
        with agent:
            agent.start(timeout=timeout)
            with api(agent) as client:
                for _ in range(warm_up):
                    one_cycle(client)
                samples.append({"cycle": 0, **agent_figures(agent.pid)})
                t0 = time.monotonic()
                for n in range(1, cycles + 1):
                    one_cycle(client)
                    if n % 100 == 0 or n == cycles:
                        samples.append({"cycle": n, **agent_figures(agent.pid)})
                elapsed = time.monotonic() - t0
            crashes = len(agent.events("crash"))
    first, last = samples[0], samples[-1]
    return {"cycles": cycles, "warm_up": warm_up, "seconds": round(elapsed, 1),
            "ms_per_cycle": ms(elapsed / cycles), "rss_after_warm_up": first["rss"],
            "rss_at_end": last["rss"], "rss_growth": last["rss"] - first["rss"],
            "rss_max": max(s["rss"] for s in samples), "fds": [first["fds"], last["fds"]],
            "threads": [first["threads"], last["threads"]], "crashes": crashes,
            "samples": samples}


# -- output ----------------------------------------------------------------------------


def reattach_lines(r: dict[str, Any]) -> list[str]:
    a, f = r["reattach"], r["fresh_start"]
    health, running = a["healthz_ms"], a["all_running_ms"]
    first, last = a["first_reattached_record_ms"], a["last_reattached_record_ms"]
    return [
        f"reattach: {r['processes']} processes, {r['rounds']} agent kills (SIGKILL)",
        (f"  exec -> /healthz                  median {health['median']:7.1f} ms"
         f"   max {health['max']:7.1f} ms"),
        (f"  exec -> all running, same pids    median {running['median']:7.1f} ms"
         f"   max {running['max']:7.1f} ms"),
        (f"  exec -> first / last `reattached` record: median {first['median']:.1f} / "
         f"{last['median']:.1f} ms (the agent's log clock)"),
        f"  second starts: {r['second_starts']}",
        (f"  reference, a fresh start of the same {r['processes']}: exec -> all running "
         f"median {f['all_running_ms']['median']:.1f} ms, exec -> /healthz "
         f"{f['healthz_ms']['median']:.1f} ms"),
    ]


def console_lines(c: dict[str, Any]) -> list[str]:
    verdict = "met" if c["lost"] <= LOST_TARGET else "missed"
    down = ", ".join(f"{g:.0f}" for g in c["agent_down_ms"])
    return [
        (f"console: {c['expected']:,} numbered lines at {c['rate']:,.0f}/s (the child took "
         f"{c['child_seconds']} s), {c['kills']} agent kill(s) (SIGKILL); agent down "
         f"{down} ms (kill -> the new agent's /healthz)"),
        (f"  logged {c['logged']:,}; lost {c['lost']}; duplicated {c['duplicated']}; "
         f"seq holes {c['seq_holes']}, out of order {c['seq_out_of_order']}; "
         f"child exit {c['exit_code']}"),
        f"  target: {LOST_TARGET} lost: {verdict}",
    ]


def cycles_lines(c: dict[str, Any]) -> list[str]:
    verdict = "met" if c["rss_growth"] < RSS_TARGET_BYTES else "missed"
    trend = ", ".join(f"{s['cycle']}: {s['rss'] / 2**20:.1f}" for s in c["samples"])
    return [
        (f"cycles: {c['cycles']} start/stop of `sleep` after {c['warm_up']} warm-up, "
         f"{c['ms_per_cycle']} ms per cycle"),
        (f"  agent RSS {c['rss_after_warm_up'] / 2**20:.1f} MiB -> "
         f"{c['rss_at_end'] / 2**20:.1f} MiB: growth {c['rss_growth'] / 1e6:+.2f} MB "
         f"({c['rss_growth'] / 2**20:+.2f} MiB), max {c['rss_max'] / 2**20:.1f} MiB"),
        f"  RSS MiB by cycle: {trend}",
        (f"  fds {c['fds'][0]} -> {c['fds'][1]}, threads {c['threads'][0]} -> "
         f"{c['threads'][1]}, crashes {c['crashes']}"),
        f"  target: growth under {RSS_TARGET_BYTES / 1e6:g} MB: {verdict}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="reattach,console,cycles",
                        help="comma-separated sections: reattach, console, cycles")
    parser.add_argument("--processes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="agent kills to time")
    parser.add_argument("--rate", type=float, default=10_000, help="lines per second")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--kills", type=int, default=1, help="agent kills during the flood")
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--warm-up", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=60, help="seconds per wait")
    add_common_args(parser)
    args = parser.parse_args()
    set_source(args.source)
    only = set(args.only.split(","))
    unknown = only - {"reattach", "console", "cycles"}
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")

    started = time.monotonic()
    result: dict[str, Any] = {"benchmark": "agent_restart", "agentd_source": source_label(),
                              "targets": {"console_lost": LOST_TARGET,
                                          "rss_growth_bytes_under": RSS_TARGET_BYTES}}
    lines = [f"agent restarts; agentd: {result['agentd_source']}", ""]
    if "reattach" in only:
        result["reattach"] = run_reattach(args.processes, args.rounds, args.timeout)
        lines += reattach_lines(result["reattach"]) + [""]
    if "console" in only:
        result["console"] = run_console(args.rate, args.seconds, args.kills, args.timeout)
        lines += console_lines(result["console"]) + [""]
    if "cycles" in only:
        result["cycles"] = run_cycles(args.cycles, args.warm_up, args.timeout)
        lines += cycles_lines(result["cycles"]) + [""]
    result["seconds"] = round(time.monotonic() - started, 1)
    report(result, lines, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
