"""The SSH server of a dev container (`dev.ssh: true` in its playbook).

At container-created zlh generates the container's host key (ed25519, mode 0600, in the
container's `etc/zlh/sshd`), writes the operator's public keys as its authorized keys and
renders its `sshd_config` there, through the provider's files (a folder here, SFTP into a
Proxmox container); the key's public half goes straight into zlh's known_hosts for
`[ADDRESS]:PORT`. zlh made the key, so its fingerprint is known first hand: nothing is
accepted on first sight. Its files are its own: a container's system sshd (Proxmox's
containers have one, and zlh reaches them through it) keeps `/etc/ssh` and its pid file.
The agent runs `/usr/sbin/sshd -D -e -f CONFIG` as the supervised process `ssh` (kind
`service`), ready when its port answers.

It listens on the server's address as zlh reports it (as playbooks' `${host}`): 127.0.0.1
on the local provider, where zlh reaches it directly; the container's address on Proxmox,
reached through the bastion.

The keys are `ssh.authorized_keys` from the operator config (a file; the override
`ZLH_SSH_AUTHORIZED_KEYS` works too), else the public half of `ssh.identity`, else the
user's `~/.ssh/id_*.pub`.

Every session runs `etc/zlh/ssh-session` (sshd's ForceCommand): it reads the container's
env file (the canonical PATH the agent writes, agentd/runtimes.py) and then runs the
command with `/bin/sh -c`, or an interactive bash whose rc file reads the user's
`~/.bashrc` and then the env file. The user's own rc files (which on the local provider
are the invoking user's, on this machine) therefore never decide the PATH. `BASH_ENV` and
`ENV` point at the env file too, so shells started from the session (`bash -c`,
`bash -lc`) end with the same PATH. On the local provider sshd runs as the invoking user,
who is the only one it can log in; in a real container it runs as root and the login
user is `dev`.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import paramiko  # type: ignore[import-untyped]  # no stubs installed

from agentd.models import ProcessSpec, RestartSpec, StopSpec, TcpProbe
from agentd.runtimes import ENV_FILE
from zlh import ssh as zssh
from zlh.errors import ConfigError, ProvisionError
from zlh.opconfig import SshConfig
from zlh.playbooks import Playbook

if TYPE_CHECKING:
    from zlh.providers.base import ServerFiles

log = logging.getLogger(__name__)

PROCESS = "ssh"
PORT = "ssh"
SSHD = "/usr/sbin/sshd"
# Relative to the container root.
HOST_KEY = "etc/zlh/sshd/ssh_host_ed25519_key"
AUTHORIZED_KEYS = "etc/zlh/sshd/authorized_keys"
CONFIG = "etc/zlh/sshd/sshd_config"
SESSION = "etc/zlh/ssh-session"  # the ForceCommand: every session starts from one PATH
SESSION_RC = "etc/zlh/ssh-bashrc"  # an interactive bash's rc file: the user's, then ours
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
PID_FILE = "run/zlh/sshd.pid"
PRIVSEP_DIR = Path("/run/sshd")
DEFAULT_KEYS = ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub")  # sshd running as root wants it


def wants_ssh(playbook: Playbook) -> bool:
    return playbook.dev is not None and playbook.dev.ssh


def public_keys(config: SshConfig) -> str:
    """The operator's public keys, one a line; empty (with a warning) when none is found."""
    source = key_source(config)
    if source is None:
        log.warning("no public key for the dev container's sshd: set ssh.authorized_keys "
                    "(a file) or ssh.identity in the operator config")
        return ""
    try:
        text = source.read_text()
    except OSError as exc:
        raise ConfigError(f"ssh.authorized_keys: cannot read {source}: {exc.strerror}") from None
    keys = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not keys:
        raise ConfigError(f"ssh.authorized_keys: no public key in {source}")
    return "\n".join(keys) + "\n"


def key_source(config: SshConfig) -> Path | None:
    """ssh.authorized_keys, else ssh.identity's public half, else the user's own default
    key (as ssh-copy-id picks it)."""
    if config.authorized_keys is not None:
        return config.authorized_keys
    if config.identity is not None:
        return Path(f"{config.identity}.pub")
    for name in DEFAULT_KEYS:
        path = Path.home() / ".ssh" / name
        if path.is_file():
            return path
    return None


def host_key(files: ServerFiles, name: str) -> str:
    """The public half of the container's host key, generated once (a resumed run keeps
    it) on this machine and written into the container, the private half 0600."""
    try:
        public = files.read_text(f"{HOST_KEY}.pub")
        files.read_text(HOST_KEY)
        return public
    except FileNotFoundError:
        pass
    with tempfile.TemporaryDirectory(prefix="zlh-sshd-") as tmp:
        path = Path(tmp) / "key"
        done = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                               f"zlh-{name}", "-f", str(path)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ProvisionError(f"ssh-keygen failed: {done.stderr.strip()}")
        public = Path(f"{path}.pub").read_text()
        files.write_text(HOST_KEY, path.read_text(), 0o600)
    files.write_text(f"{HOST_KEY}.pub", public)
    return public


def config_text(container: PurePosixPath, port: int, address: str) -> str:
    env = container / ENV_FILE
    lines = [
        "# Written by zlh at provisioning.",
        f"ListenAddress {address}", f"Port {port}",
        f"HostKey {container / HOST_KEY}",
        f"PidFile {container / PID_FILE}",
        f"AuthorizedKeysFile {container / AUTHORIZED_KEYS}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
        "PermitRootLogin prohibit-password",
        # The keys may live under a temporary folder (tests) that sshd's checks reject.
        "StrictModes no",
        f"SetEnv BASH_ENV={env} ENV={env}",
        f"ForceCommand {container / SESSION}",
        f"Subsystem sftp {SFTP_SERVER}",
    ]
    return "\n".join(lines) + "\n"


def session_script(container: PurePosixPath) -> str:
    env, rc = container / ENV_FILE, container / SESSION_RC
    return "\n".join([
        "#!/bin/sh",
        "# Written by zlh: each SSH session starts from the container's one PATH.",
        f". '{env}'",
        # bash run from a session at level < 2 reads ~/.bashrc instead of BASH_ENV (its
        # rsh/sshd rule); the session is level 1, so shells started from it are nested.
        "SHLVL=1; export SHLVL",
        'case "${SSH_ORIGINAL_COMMAND-}" in',
        f"  '') if [ -x /bin/bash ]; then exec /bin/bash --rcfile '{rc}' -i; fi",
        "      exec /bin/sh -i ;;",
        f"  sftp|internal-sftp) exec {SFTP_SERVER} ;;",
        '  *) exec /bin/sh -c "$SSH_ORIGINAL_COMMAND" ;;',
        "esac",
    ]) + "\n"


def session_rc(container: PurePosixPath) -> str:
    return ("# Written by zlh: the user's rc file, then the container's PATH.\n"
            '[ -r "$HOME/.bashrc" ] && . "$HOME/.bashrc"\n'
            f". '{container / ENV_FILE}'\n")


def prepare(files: ServerFiles, name: str, port: int, config: SshConfig, address: str,
            in_container: bool) -> None:
    """Host key, authorized keys and sshd_config in the container of server `name`; the
    key in known_hosts. `files` is the container's root; `address` is where sshd listens."""
    root = PurePosixPath(files.root)
    public = host_key(files, name)
    files.write_text(AUTHORIZED_KEYS, public_keys(config))
    files.mkdir(str(PurePosixPath(PID_FILE).parent))
    files.write_text(CONFIG, config_text(root, port, address))
    files.write_text(SESSION, session_script(root), 0o755)
    files.write_text(SESSION_RC, session_rc(root))
    if not in_container and os.geteuid() == 0:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # in a container, at each start
    record_host_key(public, address, port, config)


def record_host_key(public: str, address: str, port: int, config: SshConfig) -> str:
    """Put the key zlh generated into its known_hosts for `[address]:port`, replacing
    what an earlier container on the same address and port left there."""
    key_type, data = public.split()[:2]
    name = address if port == 22 else f"[{address}]:{port}"
    entry = paramiko.hostkeys.HostKeyEntry.from_line(f"{name} {key_type} {data}")
    if entry is None or entry.key is None:
        raise ProvisionError(f"{name}: not an OpenSSH public key: {public[:60]!r}")
    with zssh.edit_known_hosts(config) as keys:
        if name in keys:
            del keys[name]
        keys.add(name, key_type, entry.key)
    log.info("recorded the host key of %s in %s", name, config.known_hosts_file())
    return name


def process_spec(container: PurePosixPath, port: int, address: str,
                 in_container: bool) -> ProcessSpec:
    """sshd as the supervised process `ssh`; SIGTERM ends it and its sessions."""
    argv = [SSHD, "-D", "-e", "-f", str(container / CONFIG)]
    if in_container:
        # Its privilege separation folder lives on /run, which a container's start empties.
        argv = ["/bin/sh", "-c", f"mkdir -p -m 0755 {PRIVSEP_DIR} && exec {shlex.join(argv)}"]
    return ProcessSpec(
        name=PROCESS, kind="service", argv=argv,
        startup_timeout=30,
        stop=StopSpec(signal="SIGTERM", grace=5, term_grace=5),
        restart=RestartSpec(policy="on-failure", backoff_initial=1, backoff_max=30),
        readiness=TcpProbe(type="tcp", host=address, port=port, interval=0.25, timeout=2),
    )


def require_sshd() -> None:
    if not os.access(SSHD, os.X_OK):
        raise ProvisionError(f"{SSHD} is missing: apt-get install -y openssh-server")
