"""Crash-to-respawn latency with zero backoff.

A child (benchmarks/_crash_child.py) notes time.time() at its first line of Python,
prints a line, notes the time again as its last action and exits with code 1. agentd
supervises it with restart policy on-failure, backoff_initial 0, backoff_jitter 0,
max_failures 1000 and a 1 s failure window, so it respawns it at once, --crashes times.

Figures:
  exit -> spawn     from each `exit` record of the agent's JSON log (stdout) to the
                    following `spawn` record (the `ts` fields): the agent's own work,
                    fork and exec included (the target: median <= 50 ms)
  end to end        from the child's last action to the next child's first line of
                    Python: also the child's exit, the agent noticing it, and the
                    interpreter start
  and its parts     child end -> `exit` record, `spawn` record -> next child start

Reference in the same run: supervisord 4 (throwaway venv) restarting the same child
(autorestart=true, startsecs=0), its exit -> spawn from its own log (millisecond
timestamps) and the same end-to-end figure. --no-reference skips it.

    .venv/bin/python benchmarks/respawn.py [--crashes 50] [--json]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

from _common import (
    BENCH,
    Agent,
    Supervisord,
    add_common_args,
    median,
    percentile,
    poll,
    ratio,
    report,
    scratch,
    set_source,
    source_label,
    tool_venv,
)

TARGET_MS = 50.0
CHILD = BENCH / "_crash_child.py"
NAME = "crasher"


def read_marks(path: Path) -> list[tuple[str, float]]:
    if not path.exists():
        return []
    marks = []
    for line in path.read_text().splitlines():
        kind, _, value = line.partition(" ")
        try:
            marks.append((kind, float(value)))
        except ValueError:
            continue  # a line being written right now
    return marks


def end_to_end(marks: list[tuple[str, float]]) -> list[float]:
    """Each child's `end` to the next child's `start`, in ms."""
    out = []
    for (kind, ts), (next_kind, next_ts) in pairwise(marks):
        if kind == "end" and next_kind == "start":
            out.append((next_ts - ts) * 1000)
    return out


def stats(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median_ms": round(median(values), 2),
            "p95_ms": round(percentile(values, 95), 2),
            "min_ms": round(min(values), 2) if values else float("nan"),
            "max_ms": round(max(values), 2) if values else float("nan")}


def starts(marks_file: Path) -> int:
    return sum(1 for kind, _ in read_marks(marks_file) if kind == "start")


def run_agent(crashes: int, timeout: float) -> dict[str, Any]:
    with scratch("respawn-agent") as root:
        marks_file = root / "marks"
        agent = Agent(root)
        with agent:
            agent.start()
            agent.put_spec({
                "name": NAME, "argv": [sys.executable, str(CHILD), str(marks_file)],
                "restart": {"policy": "on-failure", "backoff_initial": 0,
                            "backoff_jitter": 0, "max_failures": 1000,
                            "failure_window": 1},
            })
            poll(lambda: starts(marks_file) > crashes, timeout,
                 f"{crashes} respawns under agentd", every=0.05)
            agent.remember_children()
            agent.client.post(f"/v1/processes/{NAME}/stop")
            events = [e for e in agent.events("exit", "spawn")
                      if e.get("process", NAME) == NAME]
            states = agent.events("state")
        marks = read_marks(marks_file)

    exit_to_spawn = [(following["ts"] - record["ts"]) * 1000
                     for record, following in pairwise(events)
                     if record["event"] == "exit" and following["event"] == "spawn"]
    # The k-th `exit` record is about the k-th child's end, the k-th `spawn` record
    # about the k-th child's start: pair them by order (a negative figure means the
    # record was written after the event it reports).
    ends = [ts for kind, ts in marks if kind == "end"]
    begins = [ts for kind, ts in marks if kind == "start"]
    exits = [e["ts"] for e in events if e["event"] == "exit"]
    spawns = [e["ts"] for e in events if e["event"] == "spawn"]
    end_to_exit = [(logged - ended) * 1000 for ended, logged in zip(ends, exits)]
    spawn_to_start = [(begun - logged) * 1000 for logged, begun in zip(spawns, begins)]
    fatal = [s for s in states if s.get("state") == "fatal"]
    return {
        "exit_to_spawn": exit_to_spawn[:crashes],
        "end_to_end": end_to_end(marks)[:crashes],
        "end_to_exit_record": end_to_exit[:crashes],
        "spawn_record_to_start": spawn_to_start[1 : crashes + 1],
        "went_fatal": bool(fatal),
    }


SUP_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (exited|spawned): '?"
                      + NAME)


def run_supervisord(crashes: int, timeout: float, bin_dir: Path) -> dict[str, Any]:
    with scratch("respawn-supervisord") as root:
        marks_file = root / "marks"
        program = {
            "command": f"{sys.executable} {CHILD} {marks_file}", "autostart": "true",
            "autorestart": "true", "startsecs": "0", "startretries": "1000",
            "exitcodes": "0", "stdout_logfile": str(root / "child.log"),
            "redirect_stderr": "true",
        }
        with Supervisord(root, bin_dir, {NAME: program}) as daemon:
            daemon.start()
            version = daemon.version()
            poll(lambda: starts(marks_file) > crashes, timeout,
                 f"{crashes} respawns under supervisord", every=0.05)
            daemon.remember_children()
            log = daemon.logs()
        marks = read_marks(marks_file)

    events = []
    for line in log.splitlines():
        match = SUP_LINE.match(line)
        if match:
            when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.append((match.group(2), when))
    exit_to_spawn = [(b[1] - a[1]) * 1000 for a, b in pairwise(events)
                     if a[0] == "exited" and b[0] == "spawned"]
    return {"version": version, "exit_to_spawn": exit_to_spawn[:crashes],
            "end_to_end": end_to_end(marks)[:crashes]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crashes", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=120, help="seconds per daemon")
    parser.add_argument("--reference-crashes", type=int, default=20,
                        help="crashes under supervisord (it restarts on a 1 s tick)")
    parser.add_argument("--no-reference", action="store_true", help="skip supervisord")
    parser.add_argument("--venv", type=Path, default=None,
                        help="throwaway venv for supervisor (default: a cache folder)")
    add_common_args(parser)
    args = parser.parse_args()
    set_source(args.source)

    started = time.monotonic()
    ours = run_agent(args.crashes, args.timeout)
    result: dict[str, Any] = {
        "benchmark": "respawn", "agentd_source": source_label(), "crashes": args.crashes,
        "target_median_ms": TARGET_MS,
        "child": f"{Path(sys.executable).name} {CHILD.name} MARKS (exit code 1)",
        "agentd": {key: stats(ours[key]) for key in
                   ("exit_to_spawn", "end_to_end", "end_to_exit_record",
                    "spawn_record_to_start")},
        "agentd_went_fatal": ours["went_fatal"],
    }
    if not args.no_reference:
        theirs = run_supervisord(min(args.crashes, args.reference_crashes), args.timeout,
                                 tool_venv(["supervisor"], args.venv))
        result["reference"] = f"supervisord {theirs['version']}"
        result["supervisord"] = {key: stats(theirs[key])
                                 for key in ("exit_to_spawn", "end_to_end")}
        result["ratio_end_to_end_median"] = round(ratio(
            result["agentd"]["end_to_end"]["median_ms"],
            result["supervisord"]["end_to_end"]["median_ms"]), 3)
    result["seconds"] = round(time.monotonic() - started, 1)

    a = result["agentd"]
    verdict = "met" if a["exit_to_spawn"]["median_ms"] <= TARGET_MS else "missed"
    lines = [
        f"respawn: {args.crashes} crashes, zero backoff, child {result['child']}",
        f"agentd: {result['agentd_source']}",
        "",
        f"{'':34}{'median':>10}{'p95':>10}{'min':>10}{'max':>10}",
    ]

    def row(label: str, s: dict[str, float]) -> str:
        return (f"{label:34}{s['median_ms']:>8.1f}ms{s['p95_ms']:>8.1f}ms"
                f"{s['min_ms']:>8.1f}ms{s['max_ms']:>8.1f}ms")

    lines += [
        row("agentd exit -> spawn record", a["exit_to_spawn"]),
        row("agentd end to end", a["end_to_end"]),
        row("  child end -> exit record", a["end_to_exit_record"]),
        row("  spawn record -> child start", a["spawn_record_to_start"]),
    ]
    if "supervisord" in result:
        s = result["supervisord"]
        lines += [
            row(f"{result['reference']} exit -> spawn", s["exit_to_spawn"]),
            row(f"{result['reference']} end to end", s["end_to_end"]),
            "",
            f"ratio end to end agentd/supervisord: {result['ratio_end_to_end_median']:.2f}",
        ]
    lines += ["", f"target: exit -> spawn median <= {TARGET_MS:g} ms: {verdict}"
              f" ({a['exit_to_spawn']['n']} intervals)"
              + ("; the process went fatal" if ours["went_fatal"] else "")]
    report(result, lines, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
