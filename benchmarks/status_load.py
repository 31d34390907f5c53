"""GET /v1/status under 50 concurrent clients on loopback.

agentd supervises one process (`sleep 1000000`); wrk loads it:

    wrk -c50 -t2 -d10s --latency -H 'Authorization: Bearer TOKEN' URL/v1/status

and the same load goes to /healthz (no auth, a constant body) as the reference: the floor
of the agent's HTTP stack in the same run, so the ratio shows what the status handler
itself costs. The figures are requests/s and the p99 latency (targets: >= 2,000 req/s,
p99 <= 50 ms on this 2-core machine, where wrk's own two threads share the cores with the
agent); the agent's CPU use during each load comes from /proc. The agent samples its
resource figures in the background while the load runs, as it always does.

Without wrk (Debian package `wrk`: apt-get install -y wrk) the script falls back to a
bounded asyncio + httpx load generator and says so; its client is much slower than wrk
and takes CPU from the agent, so its figures are lower bounds.

    .venv/bin/python benchmarks/status_load.py [--duration 10] [--connections 50] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import time
from typing import Any

from _common import (
    CLK_TCK,
    Agent,
    add_common_args,
    cpu_ticks,
    median,
    percentile,
    poll,
    ratio,
    report,
    scratch,
    set_source,
    source_label,
)

TARGET_RPS = 2000.0
TARGET_P99_MS = 50.0
UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(text: str) -> dict[str, Any]:
    def latency(label: str) -> float | None:
        match = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
        return float(match.group(1)) * UNITS[match.group(2)] if match else None

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", text, re.MULTILINE)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    avg = re.search(r"^\s*Latency\s+([\d.]+)(us|ms|s|m)", text, re.MULTILINE)
    return {
        "requests_per_second": float(rps.group(1)) if rps else None,
        "requests": int(total.group(1)) if total else None,
        "latency_avg_ms": float(avg.group(1)) * UNITS[avg.group(2)] if avg else None,
        "p50_ms": latency("50%"), "p90_ms": latency("90%"), "p99_ms": latency("99%"),
        "socket_errors": sum(int(g) for g in errors.groups()) if errors else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def run_wrk(url: str, token: str | None, args: argparse.Namespace) -> dict[str, Any]:
    argv = ["wrk", f"-c{args.connections}", f"-t{args.threads}", f"-d{args.duration}s",
            "--latency", "--timeout", "5s"]
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run([*argv, url], capture_output=True, text=True,
                         timeout=args.duration + 30, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()}")
    figures = parse_wrk(out.stdout)
    figures["raw"] = out.stdout
    return figures


async def _python_load(url: str, token: str | None, args: argparse.Namespace
                       ) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=args.connections,
                          max_keepalive_connections=args.connections)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=5) as client:
        deadline = time.monotonic() + args.duration

        async def worker() -> None:
            nonlocal failures
            while time.monotonic() < deadline:  # bounded by time
                t0 = time.perf_counter()
                try:
                    response = await client.get(url)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append((time.perf_counter() - t0) * 1000)
                failures += not ok

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.connections)))
        elapsed = time.monotonic() - started
    return {
        "requests_per_second": len(latencies) / elapsed, "requests": len(latencies),
        "latency_avg_ms": sum(latencies) / len(latencies) if latencies else None,
        "p50_ms": median(latencies), "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99), "socket_errors": 0, "non_2xx": failures,
    }


def load(agent: Agent, path: str, token: str | None, tool: str,
         args: argparse.Namespace) -> dict[str, Any]:
    url = f"{agent.url}{path}"
    ticks = cpu_ticks(agent.pid)
    started = time.monotonic()
    if tool == "wrk":
        figures = run_wrk(url, token, args)
    else:
        figures = asyncio.run(_python_load(url, token, args))
    elapsed = time.monotonic() - started
    figures["agent_cpu_percent"] = round(100 * (cpu_ticks(agent.pid) - ticks) / CLK_TCK / elapsed,
                                         1)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per load")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--tool", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--no-reference", action="store_true", help="skip the /healthz load")
    add_common_args(parser)
    args = parser.parse_args()
    set_source(args.source)
    tool = args.tool
    note = ""
    if tool == "auto":
        tool = "wrk" if shutil.which("wrk") else "python"
        if tool == "python":
            note = ("wrk is not installed (apt-get install -y wrk): fell back to the "
                    "asyncio + httpx load script, whose client is the bottleneck")
    elif tool == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install -y wrk)")

    with scratch("status-load") as root:
        agent = Agent(root)
        with agent:
            agent.start()
            sleep = shutil.which("sleep") or "/bin/sleep"
            agent.put_spec({"name": "idle", "argv": [sleep, "1000000"],
                            "restart": {"policy": "never"}})
            poll(lambda: agent.process("idle")["state"] == "running", 20, "idle to run")
            time.sleep(2.5)  # a background resource sample with the process in it
            body = agent.client.get("/v1/status")
            status_bytes = len(body.content)
            has_usage = body.json()["processes"][0].get("rss_bytes") is not None
            status = load(agent, "/v1/status", agent.token, tool, args)
            healthz = None if args.no_reference else load(agent, "/healthz", None, tool, args)
            after = agent.process("idle")

    rps, p99 = status["requests_per_second"], status["p99_ms"]
    result: dict[str, Any] = {
        "benchmark": "status_load", "agentd_source": source_label(), "tool": tool,
        "note": note, "connections": args.connections, "threads": args.threads,
        "duration_s": args.duration, "status_body_bytes": status_bytes,
        "status_has_process_usage": has_usage,
        "status": {k: v for k, v in status.items() if k != "raw"},
        "targets": {"requests_per_second": TARGET_RPS, "p99_ms": TARGET_P99_MS},
        "met": {"requests_per_second": bool(rps and rps >= TARGET_RPS),
                "p99_ms": bool(p99 is not None and p99 <= TARGET_P99_MS)},
        "supervised_still_running": after["state"] == "running",
    }
    if healthz is not None:
        result["reference"] = "GET /healthz under the same load"
        result["healthz"] = {k: v for k, v in healthz.items() if k != "raw"}
        result["ratio_rps_status_healthz"] = round(ratio(rps, healthz["requests_per_second"]),
                                                   3)

    def row(label: str, f: dict[str, Any]) -> str:
        return (f"{label:14}{f['requests_per_second']:>10,.0f}{f['p50_ms']:>9.2f}"
                f"{f['p90_ms']:>9.2f}{f['p99_ms']:>9.2f}{f['agent_cpu_percent']:>9.0f}%"
                f"{f['socket_errors'] + f['non_2xx']:>8}")

    tool_line = (f"wrk -c{args.connections} -t{args.threads} -d{args.duration}s --latency"
                 if tool == "wrk" else
                 f"asyncio + httpx, {args.connections} concurrent clients, {args.duration}s")
    lines = [
        "status_load: GET /v1/status on loopback, agentd supervising one process",
        f"agentd: {result['agentd_source']}",
        f"load: {tool_line}" + (f"\nNOTE: {note}" if note else ""),
        f"status body {status_bytes} bytes (process usage filled in: {has_usage})",
        "",
        (f"{'':14}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'agent':>10}"
         f"{'errors':>8}"),
        row("/v1/status", status),
    ]
    if healthz is not None:
        lines += [row("/healthz", healthz), "",
                  f"ratio req/s status/healthz: {result['ratio_rps_status_healthz']:.2f}"]
    lines += ["",
              (f"target >= {TARGET_RPS:,.0f} req/s: "
               f"{'met' if result['met']['requests_per_second'] else 'missed'};  "
               f"target p99 <= {TARGET_P99_MS:g} ms: "
               f"{'met' if result['met']['p99_ms'] else 'missed'}")]
    report(result, lines, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
