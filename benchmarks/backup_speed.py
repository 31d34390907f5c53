"""Backup and restore speed against tar + zstd, and how long a server stays quiesced.

A world of region-like files (4 to 8 MiB each, mixed compressibility: random, text-like,
half random and half zeros) is generated in a scratch folder. In the same run, in rounds
whose order alternates:

  backup   agentd.archive.write_archive: zstd level 3; threads that read, hash every
           file (sha256, manifest), compress, and hash and write the archive; + fsync
           against `tar -I zstd -cf` (the same zstd level 3, zstd's default; tar | zstd
           with one zstd worker, -T1, zstd's default) + fsync
  restore  agentd.archive.verify_and_extract (the archive's sha256 first, then every file's
           sha256 against the manifest while extracting) against `tar -I zstd -xf`
  quiesce  a real agentd with tests/programs/save_server.py on the same world:
           POST /v1/backups, the record's quiesced_seconds and duration

Both sides read a warm page cache (the world was just written). Every run writes a new
output and `sync` runs before each one, untimed, so that neither side pays for writing
back or discarding the other's output. Figures are medians over the rounds, with each
round's ratio. Everything is deleted at the end.
Usage: python benchmarks/backup_speed.py [--gib 1] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import report

from agentd.archive import Excluder, Written, verify_and_extract, write_archive

MIB = 2**20


def make_world(folder: Path, total: int, seed: int = 7) -> int:
    rng = random.Random(seed)
    words = b" ".join(rng.choice([b"stone", b"dirt", b"air", b"oak_log", b"water", b"sand"])
                      for _ in range(4096))
    written, index = 0, 0
    region = folder / "world" / "region"
    region.mkdir(parents=True)
    while written < total:
        size = rng.randrange(4 * MIB, 8 * MIB + 1) // 4096 * 4096
        kind = index % 3
        if kind == 0:
            data = os.urandom(size)
        elif kind == 1:
            data = (words * (size // len(words) + 1))[:size]
        else:
            data = os.urandom(size // 2) + bytes(size - size // 2)
        (region / f"r.{index % 40}.{index // 40}.mca").write_bytes(data)
        written, index = written + size, index + 1
    return index


def ours(world_root: Path, out: Path, archived: dict[Path, Written]) -> float:
    began = time.perf_counter()
    with open(out, "wb") as handle:
        archived[out] = write_archive(world_root, ["world"], Excluder([]), handle, {"time": 0})
        handle.flush()
        os.fsync(handle.fileno())
    return time.perf_counter() - began


def reference(world_root: Path, out: Path) -> float:
    began = time.perf_counter()
    subprocess.run(["tar", "-I", "zstd", "-cf", str(out), "-C", str(world_root), "world"],
                   check=True)
    with open(out, "rb") as handle:
        os.fsync(handle.fileno())
    return time.perf_counter() - began


def restore_ours(archive: Path, written: Written, target: Path) -> float:
    began = time.perf_counter()
    verify_and_extract(archive, written.sha256, written.manifest_sha256, target)
    return time.perf_counter() - began


def restore_reference(archive: Path, target: Path) -> float:
    target.mkdir()
    began = time.perf_counter()
    subprocess.run(["tar", "-I", "zstd", "-xf", str(archive), "-C", str(target)], check=True)
    return time.perf_counter() - began


def quiesce_figures(scratch: Path, world_root: Path, rounds: int) -> list[tuple[float, float]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from tests.agentfix import PROGRAMS, AgentProcess

    agent = AgentProcess(scratch / "box").start()
    try:
        (agent.root / "srv").mkdir(exist_ok=True)
        os.rename(world_root / "world", agent.root / "srv" / "world")
        argv = [sys.executable, "-u", str(PROGRAMS / "save_server.py"), "--files", "4"]
        spec = {"processes": [{"name": "game", "argv": argv,
                               "readiness": {"type": "log", "pattern": "Done"},
                               "stop": {"command": "stop", "grace": 5}}],
                "backup": {"paths": ["world"], "resume": ["save-on"], "quiesce": [
                    {"send": "save-off"}, {"send": "save-all flush"},
                    {"wait_for": "Saved the game", "timeout": 30}]}}
        assert agent.client.put("/v1/spec", json=spec).status_code == 200
        agent.wait_state("game", "running")
        figures = []
        for _ in range(rounds):
            answer = agent.client.post("/v1/backups", json={}, timeout=600)
            record = answer.json()["backup"]
            figures.append((record["quiesced_seconds"], record["duration"]))
            agent.client.post("/v1/backups/prune", json={"keep_last": 1})
        return figures
    finally:
        agent.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="world size (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each (3 to 9)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="zlh-backup-bench-"))
    try:
        result, lines = run(scratch, int(args.gib * 1024 * MIB), max(3, min(args.rounds, 9)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(result, lines, args.json)
    return 0


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def rounds_of(count: int, mine: Callable[[int], float],
              theirs: Callable[[int], float]) -> dict[str, list[float]]:
    """`count` rounds of both, alternating which goes first: each run's wall seconds and
    CPU seconds (ours: this process's threads; theirs: tar and zstd, its children)."""
    runs: dict[str, list[float]] = {"ours": [], "ref": [], "ours_cpu": [], "ref_cpu": []}
    for index in range(count):
        for which in (("ours", "ref") if index % 2 == 0 else ("ref", "ours")):
            os.sync()  # untimed: the previous run's writes are not the next run's cost
            who = resource.RUSAGE_SELF if which == "ours" else resource.RUSAGE_CHILDREN
            before = cpu_seconds(who)
            runs[which].append(mine(index) if which == "ours" else theirs(index))
            runs[f"{which}_cpu"].append(round(cpu_seconds(who) - before, 2))
    return runs


def figures(name: str, size: int, runs: dict[str, list[float]]) -> dict[str, Any]:
    ours_s, ref_s = runs["ours"], runs["ref"]
    ours_med, ref_med = statistics.median(ours_s), statistics.median(ref_s)
    return {"what": name, "ours_seconds": ours_s, "reference_seconds": ref_s,
            "ours_cpu_seconds": runs["ours_cpu"], "reference_cpu_seconds": runs["ref_cpu"],
            "ours_median_mib_s": round(size / MIB / ours_med),
            "reference_median_mib_s": round(size / MIB / ref_med),
            "ratio_of_medians": round(ref_med / ours_med, 2),
            "ratio_per_round": [round(r / o, 2) for o, r in zip(ours_s, ref_s, strict=True)]}


def line(fig: dict[str, Any], ours: str, ref: str) -> str:
    cpu = (f"CPU {statistics.median(fig['ours_cpu_seconds']):.2f} s against "
           f"{statistics.median(fig['reference_cpu_seconds']):.2f} s")
    return (f"{fig['what']:8s} zlh {fig['ours_median_mib_s']:5d} MiB/s   {ref} "
            f"{fig['reference_median_mib_s']:5d} MiB/s   ratio {fig['ratio_of_medians']:.2f}x "
            f"(medians of {len(fig['ours_seconds'])}; rounds "
            f"{', '.join(f'{r:.2f}' for r in fig['ratio_per_round'])}; {cpu}; {ours})")


def run(scratch: Path, total: int, rounds: int) -> tuple[dict[str, Any], list[str]]:
    world_root = scratch / "src"
    files = make_world(world_root, total)
    size = sum(p.stat().st_size for p in (world_root / "world" / "region").iterdir())
    lines = [f"world: {files} region files, {size / MIB:.0f} MiB; zstd level 3 on both sides"]
    result: dict[str, Any] = {"world_bytes": size, "files": files, "rounds": rounds}

    def out(side: int, index: int) -> Path:
        return scratch / f"out-{side}-{index}.tar.zst"

    archived: dict[Path, Written] = {}
    runs = rounds_of(rounds, lambda i: ours(world_root, out(0, i), archived),
                     lambda i: reference(world_root, out(1, i)))
    backup = figures("backup", size, runs)
    backup["ours_archive_bytes"] = out(0, 0).stat().st_size
    backup["reference_archive_bytes"] = out(1, 0).stat().st_size
    lines.append(line(backup, f"archives {backup['ours_archive_bytes'] / MIB:.0f} and "
                              f"{backup['reference_archive_bytes'] / MIB:.0f} MiB", "tar -I zstd"))

    first = out(0, 0)
    runs = rounds_of(
        rounds, lambda i: restore_ours(first, archived[first], scratch / f"restore-0-{i}"),
        lambda i: restore_reference(out(1, 0), scratch / f"restore-1-{i}"))
    restore = figures("restore", size, runs)
    lines.append(line(restore, "ours verified", "tar -x"))
    for path in scratch.iterdir():
        if path.name.startswith(("out-", "restore-")):
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    quiesced = quiesce_figures(scratch, world_root, rounds)
    quiet = [q for q, _ in quiesced]
    lines.append(f"quiesce  agentd backup of the same world with save_server: quiesced "
                 f"{statistics.median(quiet):.2f} s (median of {len(quiet)}; "
                 f"{', '.join(f'{q:.2f}' for q in quiet)}), whole backup "
                 f"{statistics.median([d for _, d in quiesced]):.2f} s")
    result.update(backup=backup, restore=restore,
                  quiesce={"quiesced_seconds": quiet,
                           "durations": [d for _, d in quiesced]})
    return result, lines


if __name__ == "__main__":
    sys.exit(main())
