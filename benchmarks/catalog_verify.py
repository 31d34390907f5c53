"""`zlh catalog validate --verify` against `curl -s URL | openssl dgst -sha256`.

Both read the same artifacts from the same local artifact server (`zlh artifacts serve`,
a separate process) in the same run:

  large   one artifact of --large-mib MiB (random bytes)
  many    --count artifacts of --small-kib KiB each

For zlh the whole command is timed (start-up included) and, separately, the verify call
alone in this process. The reference runs once per artifact, one at a time, as a shell
loop would. Printed: seconds, MiB/s and the ratio zlh/reference (throughput; above 1 is
faster than the reference).

    .venv/bin/python benchmarks/catalog_verify.py [--large-mib 1024] [--count 200]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ZLH = [sys.executable, "-c", "from zlh.cli import main; main()"]


def make_artifacts(folder: Path, large_mib: int, count: int, small_kib: int) -> dict:
    """Write the artifacts and one catalog per set; returns {set: (catalog, urls, bytes)}."""
    sets = {"large": [("big", large_mib * 2**20)],
            "many": [(f"s{i:04d}", small_kib * 1024) for i in range(count)]}
    made = {}
    for label, items in sets.items():
        lines = ["runtimes:\n"]
        urls, total = [], 0
        for name, size in items:
            data = os.urandom(size)
            rel = f"{label}/{name}.tar.zst"
            (folder / label).mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
            urls.append(rel)
            total += size
            digest = hashlib.sha256(data).hexdigest()
            lines.append(
                f"  r{name.lower()}:\n    versions:\n      - version: '1'\n        artifacts:\n"
                f"          x86_64: {{url: {rel}, sha256: {digest}, size: {size}, "
                "format: tar.zst}\n")
        catalog = folder / f"{label}.yaml"
        catalog.write_text("".join(lines))
        made[label] = (catalog, urls, total)
    return made


def start_server(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    server = subprocess.Popen([*ZLH, "artifacts", "serve", str(folder), "--port", "0"],
                              stderr=subprocess.PIPE)
    assert server.stderr is not None
    line = server.stderr.readline().decode()  # "serving DIR at URL/" once it listens
    match = re.search(r"at (http://\S+)/", line)
    if not match:
        server.kill()
        raise SystemExit(f"artifact server did not start: {line}")
    return server, match.group(1)


def time_zlh(catalog: Path, base: str, workers: int) -> float:
    started = time.perf_counter()
    done = subprocess.run([*ZLH, "catalog", "validate", str(catalog), "--verify",
                           "--artifacts-url", base, "--workers", str(workers), "--json"],
                          capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"zlh failed: {done.stderr}")
    assert all(item["ok"] for item in json.loads(done.stdout)["verified"])
    return elapsed


def time_in_process(catalog: Path, base: str, workers: int) -> float:
    from zlh import catalog as core

    items = list(core.artifacts(core.load_catalogs([catalog])))
    started = time.perf_counter()
    results = core.verify_artifacts(items, base, workers)
    elapsed = time.perf_counter() - started
    assert all(r.ok for r in results)
    return elapsed


def time_reference(urls: list[str], base: str) -> float:
    started = time.perf_counter()
    for rel in urls:
        subprocess.run(f"curl -s {base}/{rel} | openssl dgst -sha256", shell=True,
                       check=True, capture_output=True)
    return time.perf_counter() - started


def best(runs: int, measure: object, *args: object) -> float:
    return min(measure(*args) for _ in range(runs))  # type: ignore[operator]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-mib", type=int, default=1024)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--small-kib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3, help="best of N for each figure")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="zlh-bench-verify-") as tmp:
        folder = Path(tmp)
        made = make_artifacts(folder, args.large_mib, args.count, args.small_kib)
        server, base = start_server(folder)
        try:
            for label, (catalog, urls, total) in made.items():
                mib = total / 2**20
                ref = best(args.runs, time_reference, urls, base)
                cli = best(args.runs, time_zlh, catalog, base, 4)
                inproc = best(args.runs, time_in_process, catalog, base, 4)
                one = best(args.runs, time_in_process, catalog, base, 1)
                print(f"{label}: {len(urls)} artifact(s), {mib:.0f} MiB")
                print(f"  curl | openssl dgst, one at a time   {ref:7.3f} s  "
                      f"{mib / ref:8.1f} MiB/s")
                print(f"  zlh catalog validate --verify (CLI) {cli:7.3f} s  "
                      f"{mib / cli:8.1f} MiB/s  ratio {ref / cli:.2f}x")
                print(f"  verify_artifacts, 4 workers          {inproc:7.3f} s  "
                      f"{mib / inproc:8.1f} MiB/s  ratio {ref / inproc:.2f}x")
                print(f"  verify_artifacts, 1 worker           {one:7.3f} s  "
                      f"{mib / one:8.1f} MiB/s  ratio {ref / one:.2f}x")
        finally:
            server.terminate()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
