"""SSH connect-and-run through a bastion: zlh (paramiko) against `ssh -J`, same run.

Two real sshd on loopback (a bastion with ForceCommand, a target), one client key. Each
round opens a fresh connection through the bastion, runs `true` on the target and
closes; N rounds each, alternating, medians and their ratio.

    .venv/bin/python benchmarks/ssh_bastion.py [-n 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sshfix import Sshd, keygen

from zlh import ssh as zssh
from zlh.opconfig import SshConfig


def zlh_round(hop: zssh.Hop, config: SshConfig) -> float:
    started = time.perf_counter()
    with zssh.session(hop, config) as conn:
        sink = open("/dev/null", "wb")  # noqa: SIM115  (closed below)
        status = zssh.run(conn, "true", sink, sink)
        sink.close()
    assert status == 0
    return time.perf_counter() - started


def openssh_round(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        key = keygen(folder / "id_ed25519")
        bastion = Sshd(folder / "bastion", key, bastion=True).start()
        target = Sshd(folder / "target", key).start()
        try:
            config = SshConfig(bastion=f"root@127.0.0.1:{bastion.port}", identity=key,
                               known_hosts=folder / "known_hosts", port=target.port)
            for sshd in (bastion, target):
                zssh.trust(zssh.Hop("root", "127.0.0.1", sshd.port), config)
            hop = zssh.Hop("root", "127.0.0.1", target.port)
            # `-J` passes no -o/-i to the jump process; a config file reaches both hops,
            # so OpenSSH gets the snippet `zlh ssh-config` prints (ProxyJump = -J).
            snippet = folder / "ssh_config"
            snippet.write_text(zssh.ssh_config_text([("bench", hop)], config))
            argv = ["ssh", "-F", str(snippet), "-o", "BatchMode=yes", "zlh-bench", "true"]
            zlh_times, ssh_times = [], []
            for _ in range(args.n):
                zlh_times.append(zlh_round(hop, config))
                ssh_times.append(openssh_round(argv))
        finally:
            target.stop()
            bastion.stop()
    zlh_median, ssh_median = statistics.median(zlh_times), statistics.median(ssh_times)
    print(f"connect through the bastion + run `true`, N={args.n} each, medians:")
    print(f"  zlh (paramiko): {zlh_median * 1000:7.1f} ms")
    print(f"  ssh -J        : {ssh_median * 1000:7.1f} ms")
    print(f"  ratio zlh/ssh : {zlh_median / ssh_median:.2f}")


if __name__ == "__main__":
    main()
