"""Containers on this machine that zlh can reach only over SSH, for the Proxmox double.

A container is a folder used as a root file system: this machine's /usr (read-only),
/dev, /proc and /sys, and the Python that runs the agent, are mounted into it in a mount
namespace of its own, and a real OpenSSH server runs chrooted in it (REAL-COMPONENTS:
OpenSSH). zlh is told only the container's address, the port and the key, as on a
cluster: whatever it writes to /etc/zlh or /srv/zlh lands in the folder only by way of
that sshd, and this machine's own /etc/zlh and /srv/zlh stay untouched.

Each container listens on its own loopback address (127.77.X.Y, from its vmid) on the port
all of them share, as every container of a cluster runs sshd on port 22. Its host keys
are made at create, and their fingerprints are what Proxmox logs. A test can hand it
another address for its next start (`lease`), as a DHCP server may after a restart.

Stopping a container kills every process whose root is its folder (as stopping an LXC
container kills everything in it); the mounts go with the last of them. A snapshot is a
copy of the folder, a rollback puts the copy back.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from agentfix import poll
from components import wait_for_line
from sshfix import SSHD

READY_TIMEOUT = 20
STOP_TIMEOUT = 20
ETC_FILES = ("passwd", "group", "shadow", "gshadow", "nsswitch.conf", "hosts", "host.conf",
             "localtime", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives")
HOST_KEY_TYPES = ("ed25519", "ecdsa")
MOUNT_POINTS = ("usr", "dev", "proc", "sys")
# The container's own /usr/local (over this machine's, which comes with /usr): a test can
# put programs there that come first on PATH.
USR_LOCAL = ".usr-local"


def address_of(vmid: int) -> str:
    return f"127.77.{vmid // 250 % 250}.{vmid % 250 + 1}"


def _python_trees() -> list[Path]:
    """The folders the Python running the tests lives in, when /usr does not hold them."""
    trees = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    return sorted(t for t in trees if not t.is_relative_to("/usr"))


class ChrootContainer:
    def __init__(self, folder: Path, address: str, port: int, systemd: bool = False) -> None:
        if not os.access(SSHD, os.X_OK):
            pytest.fail("/usr/sbin/sshd is missing: apt-get install -y openssh-server "
                        "(bash .ci/setup installs it)", pytrace=False)
        self.folder = folder
        self.address = address
        self.port = port
        self.systemd = systemd
        self.log = folder.parent / f"{folder.name}.sshd.log"
        self.process: subprocess.Popen[bytes] | None = None

    # -- the root file system ---------------------------------------------------------

    def create(self, hostname: str, authorized_keys: str) -> list[str]:
        """Lay out the root file system; returns the host keys' SHA256 fingerprints."""
        root = self.folder
        for sub in ("etc/ssh", "root/.ssh", "run/sshd", "tmp", "var/tmp", "var/log", "srv",
                    "opt", "home", f"{USR_LOCAL}/bin", *MOUNT_POINTS):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "tmp", 0o1777)
        for name in ("bin", "sbin", "lib", "lib64"):
            host = Path("/") / name
            if host.is_symlink():
                (root / name).symlink_to(os.readlink(host))
        for name in ETC_FILES:
            source = Path("/etc") / name
            if source.is_dir() and not source.is_symlink():
                shutil.copytree(source, root / "etc" / name, symlinks=True)
            elif source.exists() or source.is_symlink():
                shutil.copy2(source, root / "etc" / name, follow_symlinks=False)
        if self.systemd:
            (root / "run/systemd/system").mkdir(parents=True)
        keys = root / "root/.ssh/authorized_keys"
        keys.write_text(authorized_keys)
        keys.chmod(0o600)
        fingerprints = [self._host_key(kind, hostname) for kind in HOST_KEY_TYPES]
        (root / "etc/ssh/sshd_config").write_text("\n".join([
            f"ListenAddress {self.address}", f"Port {self.port}",
            *(f"HostKey /etc/ssh/ssh_host_{kind}_key" for kind in HOST_KEY_TYPES),
            "PidFile /run/sshd.pid", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no",
            "PermitRootLogin prohibit-password", "StrictModes no", "AllowTcpForwarding yes",
            "Subsystem sftp internal-sftp", "",
        ]))
        return fingerprints

    def _host_key(self, kind: str, hostname: str) -> str:
        path = self.folder / f"etc/ssh/ssh_host_{kind}_key"
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"root@{hostname}",
                        "-f", str(path)], check=True)
        listed = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{path}.pub"],
                                capture_output=True, text=True, check=True)
        return listed.stdout.split()[1]

    # -- running ----------------------------------------------------------------------

    def start(self) -> None:
        self._listen_on(self.address)  # its current lease, whatever a rollback put back
        binds = "\n".join(f'ro "{tree}"' for tree in _python_trees())
        script = f"""set -e
R="{self.folder}"
mount --rbind /dev "$R/dev"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount -o remount,bind,ro "$R/sys"
ro() {{ mkdir -p "$R$1"; mount --bind "$1" "$R$1"; mount -o remount,bind,ro "$R$1"; }}
ro /usr
mount --bind "$R/{USR_LOCAL}" "$R/usr/local"
{binds}
exec chroot "$R" {SSHD} -D -e -f /etc/ssh/sshd_config
"""
        log = open(self.log, "ab")  # noqa: SIM115 - the child writes it for as long as it runs
        with log:
            offset = log.tell()
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for_line(lambda: self.log.read_bytes()[offset:].decode(errors="replace"),
                      rf"Server listening on {self.address.replace('.', '[.]')} "
                      rf"port {self.port}\.", READY_TIMEOUT)

    def _listen_on(self, address: str) -> None:
        config = self.folder / "etc/ssh/sshd_config"
        lines = [f"ListenAddress {address}" if line.startswith("ListenAddress ") else line
                 for line in config.read_text().splitlines()]
        config.write_text("\n".join(lines) + "\n")

    def processes(self) -> list[int]:
        """Every process whose root is this container's folder."""
        inside = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "root") == str(self.folder):
                    inside.append(int(entry.name))
            except OSError:
                continue  # gone meanwhile, or a zombie
        return inside

    def stop(self) -> None:
        """Kill everything in the container, as a hard stop does."""
        def all_gone() -> bool:
            pids = self.processes()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return not pids

        poll(all_gone, STOP_TIMEOUT, f"every process in {self.folder} to end on SIGKILL")
        if self.process is not None:
            self.process.wait(timeout=STOP_TIMEOUT)
            self.process = None

    # -- snapshots and removal --------------------------------------------------------

    def check_unmounted(self) -> None:
        """Nothing of this machine may be mounted under the folder where it gets removed
        or copied: the mounts must live only in the container's namespace."""
        prefix = str(self.folder) + "/"
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text()
                  .splitlines()]
        leaked = [m for m in mounts if m.startswith(prefix)]
        if leaked:
            raise AssertionError(f"mounts under {self.folder} in this namespace: {leaked}")

    def copy_to(self, target: Path) -> None:
        self.check_unmounted()
        shutil.copytree(self.folder, target, symlinks=True, ignore=_sockets)

    def restore_from(self, source: Path) -> None:
        assert not self.processes(), "restore of a running container"
        self.check_unmounted()
        shutil.rmtree(self.folder)
        shutil.copytree(source, self.folder, symlinks=True)

    def destroy(self) -> None:
        self.stop()
        self.check_unmounted()
        if self.folder.exists():
            shutil.rmtree(self.folder)


def _sockets(folder: str, names: list[str]) -> list[str]:
    """Sockets are not copied: nothing listens on them after a restore."""
    return [n for n in names if stat.S_ISSOCK(os.lstat(os.path.join(folder, n)).st_mode)]


class ChrootCluster:
    """The double's backing: one ChrootContainer per vmid under `root`."""

    def __init__(self, root: Path, port: int, systemd: bool = False) -> None:
        self.root = root
        self.port = port
        self.systemd = systemd
        self.containers: dict[int, ChrootContainer] = {}
        root.mkdir(parents=True, exist_ok=True)

    def address(self, vmid: int) -> str:
        container = self.containers.get(vmid)
        return container.address if container is not None else address_of(vmid)

    def lease(self, vmid: int, address: str) -> None:
        """The container listens on `address` from its next start."""
        self.containers[vmid].address = address

    def create(self, vmid: int, hostname: str, authorized_keys: str) -> list[str]:
        container = ChrootContainer(self.root / str(vmid), address_of(vmid), self.port,
                                    self.systemd)
        self.containers[vmid] = container
        return container.create(hostname, authorized_keys)

    def start(self, vmid: int) -> None:
        self.containers[vmid].start()

    def stop(self, vmid: int) -> None:
        self.containers[vmid].stop()

    def snapshot(self, vmid: int, name: str) -> None:
        self.containers[vmid].copy_to(self._snapshot_folder(vmid, name))

    def rollback(self, vmid: int, name: str) -> None:
        self.containers[vmid].restore_from(self._snapshot_folder(vmid, name))

    def destroy(self, vmid: int) -> None:
        container = self.containers.pop(vmid, None)
        if container is not None:
            container.destroy()
        snapshots = self.root / "snapshots" / str(vmid)
        if snapshots.exists():
            shutil.rmtree(snapshots)

    def _snapshot_folder(self, vmid: int, name: str) -> Path:
        return self.root / "snapshots" / str(vmid) / name

    def stop_all(self) -> None:
        for container in list(self.containers.values()):
            container.stop()


def install_program(container: ChrootContainer, name: str, script: str) -> None:
    """A program in the container's /usr/local/bin (before /usr/bin on PATH)."""
    path = container.folder / USR_LOCAL / "bin" / name
    path.write_text(script)
    path.chmod(0o755)
