"""The dev user of a dev container, created by the agent running as root inside it.

`ensure(NAME)` makes the user with `useradd` (busybox `adduser` where there is no
useradd), home `/home/NAME`, its own group and bash (sh when there is no bash), then the
workspace `/home/NAME/workspace` owned by it. It also hooks the env file (the canonical
PATH, agentd/runtimes.py) into `/etc/bash.bashrc`, which interactive non-login shells
read; login shells read `/etc/profile.d/zlh-runtimes.sh`, and non-interactive shells
started over SSH get `BASH_ENV`/`ENV` from the container's sshd config.

Only an agent with `in_container` calls this: on the local provider the agent runs as
the invoking user and the machine's own user database is never written.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from agentd.logs import fields
from agentd.runtimes import ENV_FILE
from agentd.spawn import SYSTEM_PATH

log = logging.getLogger(__name__)

USER = "dev"
WORKSPACE = "workspace"
BASHRC = Path("/etc/bash.bashrc")
HOOK = f"[ -r /{ENV_FILE} ] && . /{ENV_FILE}  # zlh: the canonical PATH\n"


class DevUserError(Exception):
    """The user could not be created (no useradd or adduser, or it failed)."""


def ensure(name: str = USER) -> str:
    """Create `name` unless it exists; "created" or "exists". Home and workspace are
    (re)made and owned by the user either way."""
    try:
        entry = pwd.getpwnam(name)
        result = "exists"
    except KeyError:
        _create(name)
        entry = pwd.getpwnam(name)
        result = "created"
        log.info("dev_user_created", extra=fields(user=name, uid=entry.pw_uid))
    home = Path(entry.pw_dir)
    for folder in (home, home / WORKSPACE):
        folder.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    hook_bashrc()
    return result


def _create(name: str) -> None:
    shell = "/bin/bash" if Path("/bin/bash").exists() else "/bin/sh"
    home = f"/home/{name}"
    if useradd := shutil.which("useradd", path=SYSTEM_PATH):
        # No password, but not locked ("!", useradd's default): sshd without PAM refuses
        # a locked account even its keys, and the dev user logs in with keys only.
        argv = [useradd, "--create-home", "--home-dir", home, "--shell", shell,
                "--user-group", "--password", "*", name]
    elif adduser := shutil.which("adduser", path=SYSTEM_PATH):
        argv = [adduser, "-D", "-h", home, "-s", shell, name]  # busybox
    else:
        raise DevUserError(f"cannot create user {name}: no useradd or adduser")
    log.info("run", extra=fields(argv=argv))
    done = subprocess.run(argv, env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DevUserError(f"{Path(argv[0]).name} {name} failed ({done.returncode}): "
                           f"{done.stderr.strip()[-300:]}")


def hook_bashrc(path: Path = BASHRC) -> None:
    """Put the env file's line first in bash.bashrc, once (where bash is installed):
    first, because Debian's returns early for non-interactive shells."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    if HOOK not in text:
        tmp = path.with_name(f".{path.name}.zlh")
        tmp.write_text(HOOK + text)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
