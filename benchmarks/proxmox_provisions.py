"""Provisions per minute against the Proxmox API double, 8 in parallel and 1 at a time.

A provision here is the Proxmox part of `zlh provision --provider proxmox`: find, place,
nextid + create (with the race retry), wait for the task, start, wait, and read the
address from /interfaces (first answer link-local only). Everything goes through
proxmoxer over TLS to the double on loopback, which simulates 20 ms per task.

    .venv/bin/python benchmarks/proxmox_provisions.py [--count 24]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from pve import PveDouble

from zlh.inventory import write_secret
from zlh.opconfig import ProxmoxConfig
from zlh.playbooks import load_playbook
from zlh.providers.proxmox import ProxmoxProvider


def provider(double: PveDouble, secret: Path, home: Path) -> ProxmoxProvider:
    config = ProxmoxConfig(host="127.0.0.1", port=double.port, token_id="zlh",
                           token_secret_file=secret, verify=str(double.ca_path))
    return ProxmoxProvider(home, config, load_playbook("minetest"))


def provision(prov: ProxmoxProvider, name: str) -> None:
    prov.create_container(name)
    prov.start(name)
    prov.wait_address(name)


def run(parallel: int, count: int, folder: Path) -> float:
    """Provisions per minute with `parallel` workers making `count` containers."""
    with PveDouble(folder) as double:
        secret = folder / "token"
        write_secret(secret, double.add_token("root@pam", "zlh"))
        names = [f"bench{n}" for n in range(count)]
        lock = threading.Lock()

        def worker() -> None:
            prov = provider(double, secret, folder / "home")
            while True:
                with lock:
                    if not names:
                        return
                    name = names.pop()
                provision(prov, name)

        started = time.monotonic()
        threads = [threading.Thread(target=worker) for _ in range(parallel)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        assert len(double.containers) == count
    return count / elapsed * 60


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args.count, Path(tmp) / "one")
        eight = run(8, args.count, Path(tmp) / "eight")
    print(f"provisions against the double ({args.count} each):")
    print(f"  1 at a time : {one:7.0f} per minute")
    print(f"  8 in parallel: {eight:7.0f} per minute  ({eight / one:.1f}x)")


if __name__ == "__main__":
    main()
