"""Idle RSS of agentd supervising one process, against supervisord 4 supervising the same.

Both daemons run the same child (`sleep 1000000`), are started fresh for each run, and are
measured from /proc (VmRSS of the daemon itself, not of its child; PSS and private memory
too) at two points:

  before   the daemon started its child and settled; no API request has reached it yet
           (agentd loads a spec left in its state folder, supervisord its config file)
  after    one status request (GET /v1/status; supervisord: getAllProcessInfo over its
           XML-RPC HTTP interface) and a short settle: the steady idle state

Each point is the median of a few samples; each figure is the median over the runs.
supervisord is pip-installed into a throwaway venv (a cache folder, reused).

Then, for agentd alone: what its resident set is made of (resident bytes per mapping of
the running agent, the RSS each import stage adds, and Python allocations per package).

    .venv/bin/python benchmarks/agent_rss.py [--runs 3] [--samples 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

from _common import (
    Agent,
    Supervisord,
    add_common_args,
    cmdline,
    median,
    memory,
    mib,
    poll,
    ratio,
    report,
    rss_by_mapping,
    scratch,
    set_source,
    source_dir,
    source_env,
    source_label,
    tool_venv,
)

TARGET, STRETCH = 1.5, 1.3


def sample(pids: list[int], helpers: list[int], count: int, every: float
           ) -> dict[str, dict[str, float]]:
    """Medians of `count` samples: the daemon alone, and with its helper processes
    (agentd's process holders: one small Python per supervised process)."""
    alone: dict[str, list[float]] = {"rss": [], "pss": [], "uss": []}
    total: dict[str, list[float]] = {"rss": [], "pss": [], "uss": []}
    for i in range(count):
        if i:
            time.sleep(every)
        own = [memory(pid) for pid in pids]
        extra = [memory(pid) for pid in helpers]
        for key, values in alone.items():
            values.append(sum(m[key] for m in own))
            total[key].append(sum(m[key] for m in own + extra))
    return {"daemon": {k: median(v) for k, v in alone.items()},
            "with_helpers": {k: median(v) for k, v in total.items()},
            "helpers": len(helpers)}


def wait_child(daemon: Any, program: str) -> int:
    def found() -> int | None:
        for pid in daemon.remember_children():
            argv = cmdline(pid)
            if argv and os.path.basename(argv[0]) == os.path.basename(program):
                return pid
        return None

    return poll(found, 20, f"{program} under the daemon")


def run_agent(child: list[str], args: argparse.Namespace) -> dict[str, Any]:
    with scratch("rss-agent") as root:
        agent = Agent(root)
        agent.preload_spec({"name": "idle", "argv": child, "restart": {"policy": "never"}})
        with agent:
            agent.start(healthz=False)
            wait_child(agent, child[0])
            time.sleep(args.settle)
            holders = agent.holders()
            before = sample([agent.pid], holders, args.samples, args.every)
            proc = agent.process("idle")
            assert proc["state"] == "running", proc
            time.sleep(args.settle)
            after = sample([agent.pid], agent.holders(), args.samples, args.every)
            mappings = rss_by_mapping(agent.pid)
    return {"before": before, "after": after, "mappings": mappings}


def run_supervisord(child: list[str], bin_dir: Path, args: argparse.Namespace
                    ) -> dict[str, Any]:
    with scratch("rss-supervisord") as root:
        program = {"command": " ".join(child), "autostart": "true", "autorestart": "false",
                   "startsecs": "1", "stdout_logfile": str(root / "idle.log"),
                   "redirect_stderr": "true"}
        with Supervisord(root, bin_dir, {"idle": program}) as daemon:
            daemon.start()
            wait_child(daemon, child[0])
            time.sleep(args.settle)
            before = sample([daemon.pid], [], args.samples, args.every)
            info = daemon.rpc().supervisor.getAllProcessInfo()
            assert info and info[0]["name"] == "idle", info
            time.sleep(args.settle)
            after = sample([daemon.pid], [], args.samples, args.every)
            mappings = rss_by_mapping(daemon.pid)
            version = daemon.version()
    return {"before": before, "after": after, "mappings": mappings, "version": version}


# -- what agentd's resident set is made of ----------------------------------------------

STAGES = [  # (label, code), in the order agentd's own imports load them
    ("ssl (asyncio needs it)", "import ssl"),
    ("asyncio", "import asyncio"),
    ("pydantic", "import pydantic"),
    ("first pydantic model class", "class _M(pydantic.BaseModel):\n    x: int"),
    ("agentd.models (the rest)", "import agentd.models"),
    ("yaml", "import yaml"),
    ("psutil", "import psutil"),
    ("starlette", "import starlette.applications, starlette.responses"),
    ("uvicorn (+click, multiprocessing, email)", "import uvicorn"),
    ("agentd.console", "import agentd.console"),
    ("agentd.agent (supervisor, probes...)", "import agentd.agent"),
    ("agentd.main (all of agentd)", "import agentd.main"),
]

STAGE_SCRIPT = """
import json, sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
rows = [('interpreter', rss(), len(sys.modules))]
for label, code in STAGES:
    exec(code)
    rows.append((label, rss(), len(sys.modules)))
print(json.dumps(rows))
"""

TRACE_SCRIPT = """
import json, sys, tracemalloc
tracemalloc.start(1)
import agentd.main
snap = tracemalloc.take_snapshot()
by_file = {}
for stat in snap.statistics('filename'):
    by_file[stat.traceback[0].filename] = stat.size
print(json.dumps(by_file))
"""


def _package_of(filename: str) -> str:
    path = Path(filename)
    parts = path.parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            rest = parts[parts.index(anchor) + 1 :]
            return rest[0].removesuffix(".py") if rest else filename
    if filename.startswith("<frozen importlib"):
        return "module code objects (unmarshalled .pyc, via importlib)"
    if str(path).startswith(str(source_dir())):
        return path.relative_to(source_dir()).parts[0] + "." + path.stem
    if "lib" in parts:
        rest = parts[len(parts) - 1 - parts[::-1].index("lib") + 2 :]
        if rest:
            return "stdlib:" + rest[0].removesuffix(".py")
    return filename


def breakdown() -> dict[str, Any]:
    env, cwd = source_env(), "/"  # not the repo: `-c` puts the cwd first on sys.path
    code = f"STAGES = {STAGES!r}\n" + STAGE_SCRIPT
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=cwd, check=True)
    rows = json.loads(out.stdout)
    stages = [{"stage": rows[0][0], "rss": rows[0][1], "added": rows[0][1],
               "modules": rows[0][2]}]
    for prev, row in pairwise(rows):
        stages.append({"stage": row[0], "rss": row[1], "added": row[1] - prev[1],
                       "modules": row[2]})

    out = subprocess.run([sys.executable, "-c", TRACE_SCRIPT], capture_output=True,
                         text=True, env=env, cwd=cwd, check=True)
    per_package: dict[str, int] = {}
    for filename, size in json.loads(out.stdout).items():
        key = _package_of(filename)
        per_package[key] = per_package.get(key, 0) + size
    packages = sorted(per_package.items(), key=lambda item: -item[1])

    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import agentd.main"],
                         capture_output=True, text=True, env=env, cwd=cwd, check=True)
    imports: list[dict[str, Any]] = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        own, cumulative, name = line[len("import time:"):].split("|")
        if not own.strip().isdigit():
            continue  # the header line
        depth = (len(name) - len(name.lstrip()) - 1) // 2
        imports.append({"module": name.strip(), "cumulative_us": int(cumulative),
                        "depth": depth})
    top = sorted((i for i in imports if int(i["depth"]) <= 1),
                 key=lambda i: -int(i["cumulative_us"]))
    return {"stages": stages, "tracemalloc": packages[:12],
            "tracemalloc_total": sum(per_package.values()),
            "importtime": [{"module": i["module"], "cumulative_ms":
                            round(i["cumulative_us"] / 1000, 1)} for i in top[:12]]}


# -- main -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh daemon starts per side")
    parser.add_argument("--samples", type=int, default=5, help="RSS samples per point")
    parser.add_argument("--every", type=float, default=0.3, help="seconds between samples")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before sampling")
    parser.add_argument("--venv", type=Path, default=None,
                        help="throwaway venv for supervisor (default: a cache folder)")
    parser.add_argument("--no-breakdown", action="store_true")
    add_common_args(parser)
    args = parser.parse_args()
    set_source(args.source)

    sleep = shutil.which("sleep") or "/bin/sleep"
    child = [sleep, "1000000"]
    bin_dir = tool_venv(["supervisor"], args.venv)

    agent_runs, sup_runs = [], []
    for _ in range(args.runs):  # interleaved, so drift on the machine hits both sides
        agent_runs.append(run_agent(child, args))
        sup_runs.append(run_supervisord(child, bin_dir, args))

    keys = ("rss", "pss", "uss")

    def point(runs: list[dict[str, Any]], when: str, part: str) -> dict[str, float]:
        return {key: median([r[when][part][key] for r in runs]) for key in keys}

    result: dict[str, Any] = {
        "benchmark": "agent_rss",
        "agentd_source": source_label(),
        "child": child,
        "runs": args.runs,
        "samples_per_point": args.samples,
        "reference": f"supervisord {sup_runs[0]['version']}",
        "agentd": {w: point(agent_runs, w, "daemon") for w in ("before", "after")},
        "agentd_with_holders": {w: point(agent_runs, w, "with_helpers")
                                for w in ("before", "after")},
        "agentd_holders": agent_runs[-1]["after"]["helpers"],
        "supervisord": {w: point(sup_runs, w, "daemon") for w in ("before", "after")},
        "agentd_runs_rss_after": [r["after"]["daemon"]["rss"] for r in agent_runs],
        "supervisord_runs_rss_after": [r["after"]["daemon"]["rss"] for r in sup_runs],
        "target_ratio": TARGET,
        "stretch_ratio": STRETCH,
    }
    for name in ("agentd", "agentd_with_holders"):
        for when in ("before", "after"):
            suffix = "" if name == "agentd" else "_with_holders"
            result[f"ratio_{when}{suffix}"] = {
                key: round(ratio(result[name][when][key], result["supervisord"][when][key]), 3)
                for key in keys}
    result["agentd_mappings"] = agent_runs[-1]["mappings"][:10]
    result["supervisord_mappings"] = sup_runs[-1]["mappings"][:10]
    if not args.no_breakdown:
        result["breakdown"] = breakdown()

    lines = [
        f"agent_rss: idle daemon RSS with one supervised child ({' '.join(child)})",
        f"agentd: {result['agentd_source']}",
        (f"reference: {result['reference']} (throwaway venv), same child, same Python "
         f"({sys.version.split()[0]})"),
        f"runs: {args.runs} fresh starts per daemon, median of {args.samples} samples each",
        "",
        f"{'':36}{'agentd':>12}{'supervisord':>14}{'ratio':>8}",
    ]
    rows = [("agentd", "before", "rss", "RSS before any request"),
            ("agentd", "after", "rss", "RSS after first status"),
            ("agentd", "after", "pss", "PSS after first status"),
            ("agentd", "after", "uss", "private after first status")]
    if result["agentd_holders"]:
        rows += [("agentd_with_holders", "before", "rss", "+ holder: RSS before any request"),
                 ("agentd_with_holders", "after", "rss", "+ holder: RSS after first status"),
                 ("agentd_with_holders", "after", "pss", "+ holder: PSS after first status")]
    for name, when, key, label in rows:
        a, s = result[name][when][key], result["supervisord"][when][key]
        lines.append(f"{label:36}{mib(a):>12}{mib(s):>14}{ratio(a, s):>8.2f}")

    def verdict(value: float) -> str:
        return ("meets the stretch target" if value <= STRETCH else
                "meets the target" if value <= TARGET else "misses the target")

    headline = result["ratio_after"]["rss"]
    lines += ["", (f"ratio (agent's RSS after first status): {headline:.2f}  target <= {TARGET}, "
                   f"stretch <= {STRETCH}: {verdict(headline)}")]
    if result["agentd_holders"]:
        both = result["ratio_after_with_holders"]["rss"]
        lines.append(f"ratio counting its {result['agentd_holders']} process holder(s): "
                     f"{both:.2f}: {verdict(both)}")
    lines += ["", "agentd resident set by mapping (last run, after status):"]
    lines += [f"  {mib(size):>10}  {name}" for name, size in result["agentd_mappings"][:8]]
    lines += ["supervisord resident set by mapping (last run, after status):"]
    lines += [f"  {mib(size):>10}  {name}" for name, size in result["supervisord_mappings"][:6]]
    if "breakdown" in result:
        b = result["breakdown"]
        lines += ["", "RSS each import stage adds (fresh interpreter, agentd's import order):"]
        lines += [f"  {mib(s['added']):>10}  {s['stage']:<42} (total {mib(s['rss'])}, "
                  f"{s['modules']} modules)" for s in b["stages"]]
        lines += ["", (f"Python allocations after `import agentd.main` (tracemalloc, "
                  f"total {mib(b['tracemalloc_total'])}), by package:")]
        lines += [f"  {mib(size):>10}  {name}" for name, size in b["tracemalloc"][:10]]
        lines += ["", "slowest top-level imports (-X importtime, cumulative):"]
        lines += [f"  {i['cumulative_ms']:>8.1f} ms  {i['module']}" for i in b["importtime"][:8]]
    report(result, lines, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
