"""Reproducible npm installs from a local cache of complete installs.

One fully installed copy of each PACKAGE@VERSION is kept under
`CACHE_ROOT/npm/PACKAGE@VERSION/` (a scoped `@scope/name` is stored as `@scope+name`):

    PACKAGE-VERSION.tgz     the tarball `npm pack` fetched, checked against the pinned sha256
    package.json            {"dependencies": {PACKAGE: "file:PACKAGE-VERSION.tgz"}}
    node_modules/           what `npm install --omit=dev` made of it
    .zlh-npm.json           package, version and the tarball's sha256

An entry is built in a temporary folder beside it and renamed into place as the last
step, so a crash mid-way leaves no half entry; a file lock keeps two concurrent builds of
the same entry from racing. Installing into a destination then only links (or, across
file systems, copies) the entry's `node_modules` tree: the linked files share their
inodes with the cache, so they are to be treated as read-only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from zlh.errors import ConfigError, IntegrityError, ProvisionError

logger = logging.getLogger(__name__)

NPM_TIMEOUT_S = 900
LOCK_TIMEOUT_S = 1800
LOCK_POLL_S = 0.2
OUTPUT_TAIL_CHARS = 2000
META_FILE = ".zlh-npm.json"

_NAME_RE = re.compile(r"^(?:@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9][a-z0-9._~-]*$")
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# npm settings passed through from the caller's environment; every other npm_* variable
# (an outer npm's lifecycle and config variables among them) is dropped.
_KEPT_NPM_VARS = {
    "npm_config_cache",
    "npm_config_userconfig",
    "npm_config_registry",
    "npm_config_cafile",
    "npm_config_proxy",
    "npm_config_https_proxy",
    "npm_config_noproxy",
    "npm_config_strict_ssl",
}
# Errors of os.link that mean "this file system does not do hard links here".
_NO_LINK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


def install_npm_package(
    package: str,
    version: str,
    sha256: str | None,
    dest: Path,
    cache_root: Path,
    allow_unpinned: bool = False,
) -> Path:
    """Install PACKAGE@VERSION with its dependencies into `dest/node_modules`.

    Returns the package's folder, `dest/node_modules/PACKAGE`. Raises IntegrityError when
    the tarball's sha256 is not `sha256`, ConfigError for a missing pin (unless
    `allow_unpinned`) or a malformed request, ProvisionError when npm fails.
    """
    entry = ensure_cached(package, version, sha256, cache_root, allow_unpinned)
    target = Path(dest) / "node_modules"
    logger.info("linking %s@%s from %s into %s", package, version, entry, target)
    link_tree(entry / "node_modules", target)
    return target / package


def ensure_cached(
    package: str,
    version: str,
    sha256: str | None,
    cache_root: Path,
    allow_unpinned: bool = False,
    extra_env: dict[str, str] | None = None,
) -> Path:
    """Return the complete cache entry of PACKAGE@VERSION, building it the first time.

    `extra_env` is added to npm's environment (a package whose install scripts need
    settings of their own, such as code-server's).
    """
    pin = _check_request(package, version, sha256, allow_unpinned)
    npm_dir = Path(cache_root) / "npm"
    npm_dir.mkdir(parents=True, exist_ok=True)
    key = f"{package.replace('/', '+')}@{version}"
    entry = npm_dir / key

    # The lock is taken even for an entry that exists, so that a build in progress is
    # waited for rather than mistaken for a missing entry.
    with _locked(npm_dir / f".{key}.lock"):
        if not entry.is_dir():
            _remove_stale_work(npm_dir, key)
            _build_entry(package, version, pin, entry, extra_env or {})
    _verify_entry(entry, package, version, pin)
    return entry


def _check_request(
    package: str, version: str, sha256: str | None, allow_unpinned: bool
) -> str | None:
    if not _NAME_RE.match(package):
        raise ConfigError(f"not an npm package name: {package!r}")
    if not _VERSION_RE.match(version):
        raise ConfigError(f"{package}: version {version!r} is not an exact version (x.y.z)")
    if sha256 is None:
        if not allow_unpinned:
            raise ConfigError(f"{package}@{version} is unpinned: give the tarball's sha256")
        return None
    pin = sha256.strip().lower()
    if not _SHA256_RE.match(pin):
        raise ConfigError(f"{package}@{version}: {sha256!r} is not a sha256 hex digest")
    return pin


def _build_entry(
    package: str, version: str, pin: str | None, entry: Path, extra_env: dict[str, str]
) -> None:
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        # 1. Fetch the tarball alone and check it before anything of it is installed.
        pack_dir = work / "pack"
        pack_dir.mkdir()
        _run_npm(["pack", f"{package}@{version}"], cwd=pack_dir)
        tarball = _single_tarball(pack_dir, package, version)
        actual = sha256_file(tarball)
        if pin is not None and actual != pin:
            raise IntegrityError(
                f"{package}@{version}: npm tarball sha256 is {actual}, expected {pin}"
            )

        # 2. Install it with its dependencies in a folder of its own.
        staged = work / "entry"
        staged.mkdir()
        local_tgz = staged / tarball.name
        tarball.rename(local_tgz)
        (staged / "package.json").write_text('{"private": true}\n')
        _run_npm(
            ["install", "--no-audit", "--no-fund", "--omit=dev", f"./{local_tgz.name}"],
            cwd=staged,
            extra_env=extra_env,
        )
        if not (staged / "node_modules" / package / "package.json").is_file():
            raise ProvisionError(f"npm install left no node_modules/{package} in {staged}")
        meta = {"package": package, "version": version, "sha256": actual}
        (staged / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

        # 3. Publish the entry in one step.
        os.rename(staged, entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info(
        "cached %s@%s (sha256 %s) in %s after %.1f s",
        package,
        version,
        actual,
        entry,
        time.monotonic() - started,
    )


def _verify_entry(entry: Path, package: str, version: str, pin: str | None) -> None:
    """Check an existing entry against the pin: a changed pin must not pass silently."""
    if pin is None:
        return
    tarballs = list(entry.glob("*.tgz"))
    if len(tarballs) != 1:
        raise IntegrityError(f"cache entry {entry} holds {len(tarballs)} tarballs, expected 1")
    actual = sha256_file(tarballs[0])
    if actual != pin:
        raise IntegrityError(
            f"{package}@{version}: cached tarball {tarballs[0]} has sha256 {actual}, expected {pin}"
        )


def _single_tarball(folder: Path, package: str, version: str) -> Path:
    tarballs = sorted(folder.glob("*.tgz"))
    if len(tarballs) != 1:
        names = [t.name for t in tarballs]
        raise ProvisionError(f"npm pack {package}@{version} left {names}, expected one .tgz")
    return tarballs[0]


def _remove_stale_work(npm_dir: Path, key: str) -> None:
    """Remove what an interrupted build of this entry left (the caller holds its lock)."""
    for stale in npm_dir.glob(f".tmp-{key}-*"):
        logger.info("removing %s left by an interrupted build", stale)
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    with open(lock_path, "a+") as lock_file:
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ProvisionError(
                        f"{lock_path} is still held after {LOCK_TIMEOUT_S} s"
                    ) from None
                time.sleep(LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def npm_environment() -> dict[str, str]:
    """The environment npm runs in: the caller's, cleaned of npm variables, no prompts."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.lower().startswith("npm_") or name.lower() in _KEPT_NPM_VARS
    }
    env.update(
        npm_config_yes="true",
        npm_config_update_notifier="false",
        npm_config_fund="false",
        npm_config_audit="false",
        npm_config_progress="false",
        npm_config_color="false",
    )
    return env


def _run_npm(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise ProvisionError("npm is not installed (Debian: apt-get install -y nodejs npm)")
    command = [npm, *args]
    logger.info("running %s in %s", " ".join(command), cwd)
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            env={**npm_environment(), **(extra_env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=NPM_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ProvisionError(f"npm {args[0]} did not finish in {NPM_TIMEOUT_S} s") from exc
    logger.debug("npm %s output:\n%s", args[0], done.stdout)
    if done.returncode != 0:
        tail = done.stdout[-OUTPUT_TAIL_CHARS:].strip()
        raise ProvisionError(f"npm {' '.join(args)} failed with exit {done.returncode}: {tail}")
    return done.stdout


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def link_tree(src: Path, dst: Path) -> None:
    """Recreate the tree `src` under `dst` with hard links, copying where links fail.

    Files already in `dst` are replaced; symbolic links are recreated as they are.
    """
    linking = True
    for root, dirs, files in os.walk(src):
        here = Path(root)
        there = dst / here.relative_to(src)
        there.mkdir(parents=True, exist_ok=True)
        for name in [d for d in dirs if (here / d).is_symlink()]:
            dirs.remove(name)
            files.append(name)
        for name in files:
            linking = _place(here / name, there / name, linking)


def _place(source: Path, target: Path, linking: bool) -> bool:
    """Put one file or symlink at `target`; return whether hard links still work."""
    if target.is_symlink() or target.exists():
        if not source.is_symlink() and _same_file(source, target):
            return linking
        target.unlink()
    if source.is_symlink():
        target.symlink_to(os.readlink(source))
        return linking
    if linking:
        try:
            os.link(source, target)
            return True
        except OSError as exc:
            if exc.errno not in _NO_LINK_ERRNOS:
                raise
            logger.info("hard links fail here (%s): copying %s instead", exc.strerror, source)
    shutil.copy2(source, target)
    return False


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
