"""Real OpenSSH servers on loopback for tests and benchmarks (REAL-COMPONENTS.md).

Each `Sshd` has its own config, host key, authorized_keys and pid file in a folder, runs
`/usr/sbin/sshd -D -e` on 127.0.0.1 and a port of its own, and counts as ready when it
logs `Server listening on 127.0.0.1 port N.`. It is stopped by its pid.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest
from components import free_port, wait_for_line

SSHD = Path("/usr/sbin/sshd")
READY_TIMEOUT = 20


def keygen(path: Path, comment: str = "zlh-test") -> Path:
    """An ed25519 key pair at `path` and `path.pub`; returns `path`."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                    "-f", str(path)], check=True)
    return path


class Sshd:
    def __init__(self, folder: Path, client_key: Path, bastion: bool = False,
                 port: int | None = None, extra: tuple[str, ...] = (),
                 netns: bool = False) -> None:
        if not os.access(SSHD, os.X_OK):
            pytest.fail("/usr/sbin/sshd is missing: apt-get install -y openssh-server "
                        "(bash .ci/setup installs it)", pytrace=False)
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host_key = folder / "ssh_host_ed25519_key"
        if not self.host_key.exists():
            keygen(self.host_key, "host")
        keys = folder / "authorized_keys"
        keys.write_text(Path(f"{client_key}.pub").read_text())
        lines = [
            "ListenAddress 127.0.0.1", f"Port {self.port}", f"HostKey {self.host_key}",
            f"PidFile {folder / 'sshd.pid'}", f"AuthorizedKeysFile {keys}",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "PermitRootLogin prohibit-password", "StrictModes no",
            "Subsystem sftp internal-sftp",
        ]
        if bastion:
            lines += ["AllowTcpForwarding yes", "PermitTTY no", "ForceCommand /bin/false"]
        lines += extra
        self.config = folder / "sshd_config"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = folder / "sshd.log"
        self.netns = netns  # in a network namespace of its own: unreachable from here
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Sshd:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with open(self.log, "wb") as out:
            argv = [str(SSHD), "-D", "-e", "-f", str(self.config)]
            if self.netns:
                argv = ["unshare", "--net", "--", "sh", "-c",
                        f"ip link set lo up && exec {shlex.join(argv)}"]
            self.process = subprocess.Popen(
                argv,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_for_line(self.log, rf"Server listening on 127\.0\.0\.1 port {self.port}\.",
                      READY_TIMEOUT)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        self.process = None

    def new_host_key(self) -> None:
        """Replace the host key (as a reinstalled host would have); restart to use it."""
        self.host_key.unlink()
        Path(f"{self.host_key}.pub").unlink()
        keygen(self.host_key, "host")


class BastionInto:
    """A bastion that listens here but forwards only inside `inside`'s network namespace:
    each connection to 127.0.0.1:`bastion.port` is served by its own `sshd -i` (inetd mode,
    with the bastion's config) started there. So a host behind it is reachable through
    it and not directly, as a container behind a real bastion."""

    def __init__(self, bastion: Sshd, inside: Sshd) -> None:
        self.bastion = bastion
        self.inside = inside
        self.children: list[subprocess.Popen[bytes]] = []
        self.listener: socket.socket | None = None

    def start(self) -> BastionInto:
        assert self.inside.process is not None
        self.listener = socket.create_server(("127.0.0.1", self.bastion.port))
        threading.Thread(target=self._serve, args=(self.listener,), daemon=True).start()
        return self

    def _serve(self, listener: socket.socket) -> None:
        assert self.inside.process is not None
        netns = f"--net=/proc/{self.inside.process.pid}/ns/net"
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            with conn, open(self.bastion.log, "ab") as log:
                self.children.append(subprocess.Popen(
                    ["nsenter", netns, str(SSHD), "-i", "-e", "-f", str(self.bastion.config)],
                    stdin=conn.fileno(), stdout=conn.fileno(), stderr=log))

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for child in self.children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGTERM)
                child.wait(timeout=10)
