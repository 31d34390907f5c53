"""code-server for dev containers: the pinned install, the IDE secret and the process.

The install goes through the npm cache (zlh/npmcache.py) like any npm artifact, with what
code-server's install scripts need to run without the internet:

- Debian's libkrb5-dev, libxkbfile-dev and libsecret-1-dev for its native modules;
- root may run the scripts (`npm_config_unsafe_perm`), and they run in the foreground;
- @vscode/ripgrep's postinstall downloads `rg` from GitHub unless its download cache holds
  the tarball: we put Debian's ripgrep there, in a private TMPDIR.

In a container, code-server lives in `/opt/zlh/code-server/node_modules/code-server`, runs
in `/home/dev/workspace` and takes its password from the `PASSWORD` variable, which the
agent reads at spawn time from `/etc/zlh/ide.password` (mode 0600): the secret is in no
spec, no log and no API answer.

It runs on the catalog's Node.js NODE_VERSION (the one it installs on), a runtime of the
container that provisioning installs without making it current: the argv names its `node`
by path, and the dev user's PATH has only the runtimes the playbook names.
It reads zlh's CONFIG_FILE (no password in it): without `--config`, code-server writes
`~/.config/code-server/config.yaml` with a random password of its own, which the login
refuses.
"""

from __future__ import annotations

import logging
import secrets
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from agentd.models import HttpProbe, ProcessSpec, RestartSpec, StopSpec
from zlh.errors import NotFoundError, ProvisionError
from zlh.npmcache import ensure_cached

if TYPE_CHECKING:
    from zlh.catalog import Located
    from zlh.providers.base import ServerFiles

log = logging.getLogger(__name__)

PACKAGE = "code-server"
VERSION = "4.100.3"  # the newest release that installs on node 20
# sha256 of the tarball `npm pack code-server@4.100.3` fetches; its sha1 matched the
# registry's shasum 42e9938215d394721a64768aed26e677f89f41f7.
SHA256 = "a85138ac3a382a9ba1df652a751901ec598fed24f673b8a8653de7be8335bfaa"
APT_PACKAGES = ("libkrb5-dev", "libxkbfile-dev", "libsecret-1-dev", "ripgrep")
APT_HINT = f"apt-get install -y {' '.join(APT_PACKAGES)}"
HEADERS = (
    Path("/usr/include/krb5.h"),
    Path("/usr/include/X11/extensions/XKBfile.h"),
    Path("/usr/include/libsecret-1/libsecret/secret.h"),
)
RIPGREP = Path("/usr/bin/rg")
# Where @vscode/ripgrep 1.15.11's postinstall looks before it tries GitHub.
RIPGREP_CACHE = "vscode-ripgrep-cache-1.15.11"
RIPGREP_ASSET = "ripgrep-v13.0.0-10-x86_64-unknown-linux-musl.tar.gz"

PROCESS = "ide"
PORT = "ide"
INSTALL_DIR = "opt/zlh/code-server"  # relative to the container root
ENTRY = "node_modules/code-server/out/node/entry.js"
CONFIG_FILE = f"{INSTALL_DIR}/config.yaml"
CONFIG = (
    "# code-server's config from zlh: its settings are on the ide process's command line\n"
    "# and its password is PASSWORD, read by the agent from /etc/zlh/ide.password (0600).\n"
    "auth: password\n"
)
NODE_RUNTIME = "node"
NODE_VERSION = "20.18.0"
# In the agent's runtimes folder (agentd's runtimes_dir, ROOT/opt/zlh/runtimes): that
# version's own folder, not NAME/current, which `zlh runtime upgrade` switches.
NODE = f"opt/zlh/runtimes/{NODE_RUNTIME}/{NODE_VERSION}/bin/node"
PASSWORD_FILE = "etc/zlh/ide.password"
DEV_HOME = "home/dev"
WORKSPACE = "home/dev/workspace"
DATA_DIR = "home/dev/.local/share/code-server"
SECRET_BYTES = 24


# -- install ---------------------------------------------------------------------------


def ensure_installed(cache_root: Path) -> Path:
    """The cache entry of code-server@VERSION, built the first time (about a minute)."""
    _require_build_tools()
    with tempfile.TemporaryDirectory(prefix="zlh-code-server-") as tmp:
        _seed_ripgrep_cache(Path(tmp))
        env = {
            "TMPDIR": tmp,
            "npm_config_unsafe_perm": "true",
            "npm_config_foreground_scripts": "true",
            "npm_config_yes": "true",
        }
        return ensure_cached(PACKAGE, VERSION, SHA256, cache_root, extra_env=env)


def _require_build_tools() -> None:
    missing = [str(path) for path in (*HEADERS, RIPGREP) if not path.exists()]
    if missing:
        raise ProvisionError(f"code-server needs {', '.join(missing)}: {APT_HINT}")


def _seed_ripgrep_cache(tmp: Path) -> None:
    folder = tmp / RIPGREP_CACHE
    folder.mkdir()
    with tarfile.open(folder / RIPGREP_ASSET, "w:gz") as archive:
        archive.add(RIPGREP, arcname="rg")


def install(files: ServerFiles, cache_root: Path) -> str:
    """Put the cached install into the container (hard links into a folder on this
    machine, one tar stream over SSH); returns the entry script's path in it."""
    entry = ensure_installed(cache_root)
    log.info("putting code-server %s into %s", VERSION, f"{files.root}/{INSTALL_DIR}")
    files.put(entry / "node_modules", f"{INSTALL_DIR}/node_modules")
    files.write_text(CONFIG_FILE, CONFIG)
    return str(PurePosixPath(files.root) / INSTALL_DIR / ENTRY)


def node_item() -> Located:
    """The catalog's Node.js that code-server runs on."""
    from zlh import catalog

    return catalog.find(NODE_RUNTIME, NODE_VERSION)


# -- the secret ------------------------------------------------------------------------


def password_path(root: str | PurePosixPath) -> PurePosixPath:
    """Where the password is, as the container sees it."""
    return PurePosixPath(root) / PASSWORD_FILE


def ensure_secret(files: ServerFiles) -> None:
    """Create the IDE password once (mode 0600); an existing one is kept."""
    try:
        files.read_text(PASSWORD_FILE)
    except FileNotFoundError:
        rotate_secret(files)


def rotate_secret(files: ServerFiles) -> None:
    """Replace the IDE password atomically; the file stays 0600 throughout."""
    files.write_text(PASSWORD_FILE, new_secret(), 0o600)


def read_password(files: ServerFiles) -> str:
    try:
        return files.read_text(PASSWORD_FILE).strip()
    except FileNotFoundError:
        raise NotFoundError(f"no IDE password at {password_path(files.root)}: is this a dev "
                            "container?") from None


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


# -- the process -----------------------------------------------------------------------


@dataclass(frozen=True)
class IdeLayout:
    """Where things are, as absolute paths on the machine the agent runs on."""

    container: PurePosixPath | Path
    port: int
    user: str | None  # None: the agent's own user (local provider)

    def path(self, relative: str) -> str:
        return str(self.container / relative)


def process_spec(layout: IdeLayout) -> ProcessSpec:
    """code-server as a supervised process of kind `ide`."""
    data = layout.path(DATA_DIR)
    argv = [
        layout.path(NODE), layout.path(f"{INSTALL_DIR}/{ENTRY}"),
        "--config", layout.path(CONFIG_FILE),
        "--bind-addr", f"127.0.0.1:{layout.port}",
        "--auth", "password",
        "--disable-telemetry", "--disable-update-check",
        "--user-data-dir", data,
        "--extensions-dir", f"{data}/extensions",
        layout.path(WORKSPACE),
    ]
    return ProcessSpec(
        name=PROCESS, kind="ide", argv=argv, cwd=layout.path(WORKSPACE),
        env={"HOME": layout.path(DEV_HOME)}, env_files={"PASSWORD": PASSWORD_FILE},
        user=layout.user, startup_timeout=60,
        # code-server ends its child (the extension host) on SIGTERM.
        stop=StopSpec(signal="SIGTERM", grace=10, term_grace=5),
        # The entry process exits 0 when its server process dies (a kill, the OOM
        # killer's choice: it is the larger one); only a stop of ours ends it cleanly.
        restart=RestartSpec(policy="on-failure", backoff_initial=1, backoff_max=30,
                            clean_exit_is_crash=True),
        readiness=HttpProbe(type="http", url=f"http://127.0.0.1:{layout.port}/healthz",
                            interval=0.25, timeout=2),
        liveness=HttpProbe(type="http", url=f"http://127.0.0.1:{layout.port}/healthz",
                           interval=10, timeout=5, failure_threshold=3),
        port=layout.port,
    )


def prepare_folders(files: ServerFiles) -> None:
    """The workspace and code-server's folders, for an agent that runs as the operator;
    in a container the dev user's home is made by the agent, owned by the user."""
    for relative in (WORKSPACE, f"{DATA_DIR}/extensions"):
        files.mkdir(relative)
