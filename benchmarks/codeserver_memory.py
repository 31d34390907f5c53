"""code-server's memory in a dev container: idle, and with one browser session open.

Each run provisions a fresh `dev-node` container with `zlh` on the local provider (the
provision-to-IDE-ready time is reported too), then measures the process tree of the `ide`
process (code-server's entry process and its children: RSS and PSS added up, the median of
a few samples):

  idle      code-server ready, no browser has connected
  session   headless Chromium (Debian's) logged in with the session cookie, the workbench
            (`.monaco-workbench` with its editor part) on screen, then `--settle` seconds
            for the extension host and file watcher to start
  closed    the browser closed again, after `--settle` seconds

The recommended dev-tier RAM: the session figure twice over (a second tab, a language server,
a build), plus 256 MiB for the shell and the runtime's own tools, rounded up to 256 MiB.

    .venv/bin/python benchmarks/codeserver_memory.py [--runs 2] [--settle 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _zlh import MIB, Operator, mib, process, settled_memory, tree_memory

from tests.codeserverfix import SESSION_COOKIE, Browser, code_server_cache, login
from zlh import codeserver
from zlh.providers.local import LocalServerFiles

HEADROOM = 256 * MIB
STEP = 256 * MIB


def one_run(ops: Operator, index: int, settle: float) -> dict[str, Any]:
    name = f"idemem{index}"
    result, seconds = ops.provision("dev-node", name)
    url = f"http://127.0.0.1:{result['ports']['ide']}"
    pid = process(ops.json("status", name), codeserver.PROCESS)["pid"]
    figures: dict[str, Any] = {"provision_seconds": round(seconds, 2)}

    time.sleep(settle)  # let the freshly started server go quiet: this is a measurement
    figures["idle"] = settled_memory(pid)

    password = codeserver.read_password(LocalServerFiles(ops.container(name)))
    cookie = login(url, password).cookies[SESSION_COOKIE]
    with tempfile.TemporaryDirectory(prefix="zlh-bench-chromium-") as tmp:
        browser = Browser(Path(tmp)).start()
        try:
            figures["workbench_seconds"] = browser.open_workbench(url + "/", cookie)[
                "workbench_seconds"]
            time.sleep(settle)
            figures["session"] = settled_memory(pid)
            assert browser.proc is not None
            figures["chromium"] = tree_memory(browser.proc.pid)
        finally:
            browser.stop()
    time.sleep(settle)
    figures["closed"] = settled_memory(pid)
    ops("delete", name, "--yes")
    ops.names.remove(name)
    return figures


def recommend(session_rss: float) -> int:
    wanted = 2 * session_rss + HEADROOM
    return int(math.ceil(wanted / STEP) * STEP)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(key: str, field: str) -> float:
        return statistics.median(run[key][field] for run in runs)

    summary: dict[str, Any] = {
        point: {"rss": median(point, "rss"), "pss": median(point, "pss"),
                "processes": median(point, "processes")}
        for point in ("idle", "session", "closed", "chromium")
    }
    summary["provision_seconds"] = statistics.median(r["provision_seconds"] for r in runs)
    summary["workbench_seconds"] = statistics.median(r["workbench_seconds"] for r in runs)
    summary["recommended_dev_tier_mb"] = recommend(summary["session"]["rss"]) // MIB
    return summary


def lines(summary: dict[str, Any], runs: int) -> list[str]:
    out = [f"code-server {codeserver.VERSION}, median of {runs} run(s)",
           "", f"{'':24} {'RSS':>9} {'PSS':>9}  processes"]
    for point, label in (("idle", "idle"), ("session", "one browser session"),
                         ("closed", "session closed"), ("chromium", "(the browser itself)")):
        row = summary[point]
        out.append(f"{label:24} {mib(row['rss']):>9} {mib(row['pss']):>9}  "
                   f"{row['processes']:g}")
    out += ["", (f"provision to IDE ready: {summary['provision_seconds']:.1f} s; "
                f"workbench on screen {summary['workbench_seconds']:.1f} s after navigation"),
            (f"recommended dev-tier RAM: {summary['recommended_dev_tier_mb']} MiB "
            "(session RSS x 2 + 256 MiB, rounded up to 256 MiB)")]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--settle", type=float, default=10.0,
                        help="seconds between a change and its measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    code_server_cache()
    with Operator() as ops:
        runs = [one_run(ops, index, args.settle) for index in range(args.runs)]
    summary = summarize(runs)
    if args.json:
        print(json.dumps({"summary": summary, "runs": runs}, indent=2))
    else:
        print("\n".join(lines(summary, args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
