"""Backup and restore speed against tar + zstd, and how long a server stays quiesced.

A world of region-like files (4 to 8 MiB each, mixed compressibility: random, text-like,
half random and half zeros) is generated in a scratch folder. In the same run:

  backup   agentd.archive.write_archive (tar + zstd level 3, one zstd worker thread,
           sha256 of every file and of the archive, manifest) + fsync
           against `tar -I zstd -cf` (zstd's default: level 3, -T1) + fsync
  restore  agentd.archive.verify_and_extract (archive sha256 first, then every file's
           sha256 against the manifest while extracting) against `tar -I zstd -xf`
  quiesce  a real agentd with tests/programs/save_server.py on the same world:
           POST /v1/backups, the record's quiesced_seconds and duration

Both sides read a warm page cache (the world was just written); rounds alternate.
Everything is deleted at the end. Usage: python benchmarks/backup_speed.py [--gib 1]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentd.archive import Excluder, verify_and_extract, write_archive  # noqa: E402

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


def ours(world_root: Path, out: Path) -> float:
    began = time.perf_counter()
    with open(out, "wb") as handle:
        write_archive(world_root, ["world"], Excluder([]), handle, {"time": 0})
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


def restore_ours(archive: Path, target: Path) -> float:
    import hashlib
    import json

    import zstandard

    # The manifest's own hash, as the record holds it: read from the archive's last member.
    with open(archive, "rb") as handle:
        import tarfile
        with tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(handle),
                          mode="r|") as tar:
            manifest = b""
            for member in tar:
                if member.name == ".zlh-manifest.json":
                    manifest = tar.extractfile(member).read()  # type: ignore[union-attr]
    json.loads(manifest)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    began = time.perf_counter()
    verify_and_extract(archive, sha, hashlib.sha256(manifest).hexdigest(), target)
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
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="zlh-backup-bench-"))
    try:
        return run(scratch, int(args.gib * 1024 * MIB), max(1, min(args.rounds, 5)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(scratch: Path, total: int, rounds: int) -> int:
    world_root = scratch / "src"
    files = make_world(world_root, total)
    size = sum(p.stat().st_size for p in (world_root / "world" / "region").iterdir())
    print(f"world: {files} region files, {size / MIB:.0f} MiB; zstd level 3, one worker "
          f"thread on both sides; {os.cpu_count()} cores")
    mine, ref = [], []
    for index in range(rounds):
        for which in ((0, 1) if index % 2 == 0 else (1, 0)):
            out = scratch / f"out-{which}.tar.zst"
            out.unlink(missing_ok=True)
            (mine if which == 0 else ref).append(
                ours(world_root, out) if which == 0 else reference(world_root, out))
    ours_best, ref_best = min(mine), min(ref)
    print(f"backup   zlh {size / MIB / ours_best:7.0f} MiB/s ({ours_best:.2f} s, "
          f"{(scratch / 'out-0.tar.zst').stat().st_size / MIB:.0f} MiB)   "
          f"tar -I zstd {size / MIB / ref_best:7.0f} MiB/s ({ref_best:.2f} s, "
          f"{(scratch / 'out-1.tar.zst').stat().st_size / MIB:.0f} MiB)   "
          f"ratio {ref_best / ours_best:.2f}x")

    ours_restore = restore_ours(scratch / "out-0.tar.zst", scratch / "restore-0")
    ref_restore = restore_reference(scratch / "out-1.tar.zst", scratch / "restore-1")
    print(f"restore  zlh {size / MIB / ours_restore:7.0f} MiB/s ({ours_restore:.2f} s, "
          f"verified)   tar -x {size / MIB / ref_restore:7.0f} MiB/s ({ref_restore:.2f} s)   "
          f"ratio {ref_restore / ours_restore:.2f}x")
    for folder in ("restore-0", "restore-1", "out-0.tar.zst", "out-1.tar.zst"):
        target = scratch / folder
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    figures = quiesce_figures(scratch, world_root, rounds)
    quiet = [q for q, _ in figures]
    print(f"quiesce  agentd backup of the same world with save_server: quiesced "
          f"{statistics.median(quiet):.2f} s (median of {len(quiet)}; "
          f"{', '.join(f'{q:.2f}' for q in quiet)}), whole backup "
          f"{statistics.median([d for _, d in figures]):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
