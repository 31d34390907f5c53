"""Runtime installs and switches through a real agent, from a real local artifact server.

1. Install time of Node.js (the shipped catalog's default) over HTTP on loopback:
   download with sha256, size check, extraction, `bin/node --version`, rename, switch,
   profile. Each run removes it again first. Printed: each run and the median.
2. Availability during switches: NAME/current is switched between two installed versions
   --switches times through the agent's API while reader processes resolve
   `NAME/current/bin/tool` in a loop (realpath and open). Bounded by --deadline seconds.
   Printed: switches, reads, failed reads (target 0), and the switch latency.

    .venv/bin/python benchmarks/runtime_install.py [--runs 5] [--switches 1000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.agentfix import AgentProcess
from tests.artifactfix import script_runtime, sha256
from zlh import artifacts, catalog
from zlh.artifacts import ArtifactServer


def node_body(base: str) -> dict[str, Any]:
    located = catalog.find("node", arch=catalog.machine_arch())
    art = located.artifact
    return {"name": "node", "version": located.version.version, "url": f"{base}/{art.url}",
            "sha256": art.sha256, "size": art.size, "format": art.format, "path": art.path,
            "verify": art.verify}


def install_times(agent: AgentProcess, base: str, runs: int) -> list[float]:
    assert agent.client is not None
    body = node_body(base)
    times = []
    for _ in range(runs):
        agent.client.delete(f"/v1/runtimes/node/{body['version']}", params={"force": "true"})
        started = time.perf_counter()
        answer = agent.client.post("/v1/runtimes", json=body, timeout=300)
        times.append(time.perf_counter() - started)
        if answer.status_code != 200:
            raise SystemExit(f"install failed: {answer.text}")
    return times


def _reader(path: str, stop: Any, counts: Any) -> None:
    reads = failures = 0
    while not stop.is_set():
        try:
            real = os.path.realpath(path, strict=True)
            with open(real, "rb") as handle:
                handle.read(16)
            reads += 1
        except OSError:
            failures += 1
    with counts.get_lock():
        counts[0] += reads
        counts[1] += failures


def switch_probe(agent: AgentProcess, base: str, switches: int, readers: int,
                 deadline: float) -> dict[str, Any]:
    assert agent.client is not None
    for version in ("1.0", "2.0"):
        data = script_runtime(version)
        body = {"name": "tool", "version": version, "url": f"{base}/tool/{version}.tar.zst",
                "sha256": sha256(data), "size": len(data), "format": "tar.zst",
                "path": ["bin"], "verify": "bin/tool"}
        answer = agent.client.post("/v1/runtimes", json=body)
        if answer.status_code != 200:
            raise SystemExit(f"install failed: {answer.text}")

    path = str(agent.root / "opt/runtimes/tool/current/bin/tool")
    stop = multiprocessing.Event()
    counts = multiprocessing.Array("q", 2)
    procs = [multiprocessing.Process(target=_reader, args=(path, stop, counts))
             for _ in range(readers)]
    for proc in procs:
        proc.start()
    latencies = []
    ends = time.monotonic() + deadline
    try:
        for index in range(switches):
            if time.monotonic() > ends:
                break
            version = "1.0" if index % 2 else "2.0"
            started = time.perf_counter()
            answer = agent.client.post(f"/v1/runtimes/tool/{version}/activate")
            latencies.append(time.perf_counter() - started)
            if answer.status_code != 200:
                raise SystemExit(f"activate failed: {answer.text}")
    finally:
        stop.set()
        for proc in procs:
            proc.join(10)
    return {"switches": len(latencies), "reads": counts[0], "failed_reads": counts[1],
            "switch_median_ms": statistics.median(latencies) * 1000,
            "switch_max_ms": max(latencies) * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--switches", type=int, default=1000)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--artifacts", type=Path,
                        default=Path.home() / ".cache" / "zlh-bench" / "artifacts")
    args = parser.parse_args()

    artifacts.ensure(catalog.find("node", arch=catalog.machine_arch()), args.artifacts)
    for version in ("1.0", "2.0"):
        target = args.artifacts / "tool" / f"{version}.tar.zst"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(script_runtime(version))

    with tempfile.TemporaryDirectory(prefix="zlh-bench-runtime-") as tmp, \
            ArtifactServer(args.artifacts) as server:
        agent = AgentProcess(Path(tmp) / "box", runtimes_dir="../opt/runtimes",
                             profile_path="../profile.d/zlh-runtimes.sh").start()
        try:
            times = install_times(agent, server.url, args.runs)
            size = catalog.find("node", arch=catalog.machine_arch()).artifact.size
            print(f"node install ({size / 2**20:.1f} MiB .tar.zst): "
                  + ", ".join(f"{t:.2f}" for t in times)
                  + f" s; median {statistics.median(times):.2f} s")
            probe = switch_probe(agent, server.url, args.switches, args.readers,
                                 args.deadline)
            print(f"current switch: {probe['switches']} switches, {probe['reads']} reads by "
                  f"{args.readers} processes, {probe['failed_reads']} failed; switch via API "
                  f"median {probe['switch_median_ms']:.1f} ms, max "
                  f"{probe['switch_max_ms']:.1f} ms")
        finally:
            agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
