"""Installed runtimes: hash-checked installs, atomic switches, the PATH profile.

Layout (under the config's runtimes_dir, `/opt/zlh/runtimes` in a container):

    .staging/NAME-VERSION-XXXX/   one install in progress (removed at agent start)
        download                  the artifact, hashed while it streams in
        tree/                     the archive extracted, then renamed to NAME/VERSION
    NAME/VERSION/                 an installed runtime; .zlh-runtime.json holds its record
    NAME/current -> VERSION       the active version (switched with os.replace)
    NAME/previous -> VERSION      the version active before it (rollback target)

An install goes: download (size and sha256 checked before anything is extracted; a read
waits at most the request's `timeout`, the whole download ends by its `deadline`) ->
safe extraction (no absolute paths, no `..`, no links leaving the tree, no device files
or fifos) -> the verify command -> rename into NAME/VERSION -> switch NAME/current ->
rewrite the PATH profile. A failure at any step leaves the installed runtimes as they
were. One install per runtime name at a time; a request for the same artifact while it
runs joins it.

The PATH folders of active runtimes go first in supervised processes' PATH
(spawn.set_runtime_path) and in login shells (the profile). They name NAME/current/...,
so a switch shows in every process started after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from agentd import spawn
from agentd.errors import AgentError, Conflict, Invalid, NotFound
from agentd.logs import fields
from agentd.models import RuntimeInfo, RuntimeInstall

log = logging.getLogger(__name__)

STAGING = ".staging"
RECORD = ".zlh-runtime.json"
DOWNLOAD_TIMEOUT = 30.0
# A download's deadline, unless the request gives one: a minute plus a second per MiB.
# Without one, a server that sends a byte now and then, each within the read timeout, would
# hold the install, and the runtime's one install at a time, for ever.
DEADLINE_BASE = 60.0
DEADLINE_RATE = 1 << 20  # bytes per second
VERIFY_TIMEOUT = 120.0
# flying-squid's package unpacks to 18 times its .tar.zst, Node.js to 5 times.
EXPANSION_LIMIT = 64
MIN_EXTRACT_LIMIT = 2**30
OUTPUT_TAIL = 1000


class IntegrityFailed(AgentError):
    """The artifact's size or sha256 is not the catalog's."""

    status = 422
    code = "integrity"


class ArtifactUnavailable(AgentError):
    """The artifact server did not deliver it (HTTP error, refused, timed out, cut off)."""

    status = 502
    code = "artifact-unavailable"


class UnsafeArchive(AgentError):
    """The archive holds a path or a link that would land outside the runtime, or a device."""

    status = 422
    code = "unsafe-archive"


class VerifyFailed(AgentError):
    """The runtime's verify command failed."""

    status = 422
    code = "verify-failed"


# -- download ----------------------------------------------------------------------------


def download_deadline(size: int) -> float:
    return DEADLINE_BASE + size / DEADLINE_RATE


def download(url: str, target: Path, size: int, sha256: str,
             timeout: float = DOWNLOAD_TIMEOUT, deadline: float | None = None) -> None:
    """Stream `url` into `target`, hashing as it comes; refuse a wrong size or hash.

    ArtifactUnavailable when no data comes for `timeout` seconds, or when the body is not
    complete `deadline` seconds (default: download_deadline(size)) after the request or, if
    the headers came later than that, as soon as they come.
    """
    import httpx

    limit = deadline if deadline is not None else download_deadline(size)
    digest, count = hashlib.sha256(), 0
    watch = _Deadline(limit)
    try:
        with open(target, "wb") as out, httpx.stream(
            "GET", url, timeout=timeout, follow_redirects=True
        ) as answer, watch.over(answer):
            if answer.status_code != 200:
                raise ArtifactUnavailable(f"{url}: HTTP {answer.status_code}")
            for block in answer.iter_raw():
                count += len(block)
                if count > size:
                    raise IntegrityFailed(f"{url}: more than the expected {size} bytes")
                digest.update(block)
                out.write(block)
    except httpx.TransportError as exc:
        if watch.passed.is_set():
            raise ArtifactUnavailable(f"{url}: not complete after {limit:g} s ({count} of "
                                      f"{size} bytes)") from None
        if isinstance(exc, httpx.TimeoutException):
            raise ArtifactUnavailable(f"{url}: timed out after {timeout:g} s without data"
                                      ) from None
        raise ArtifactUnavailable(f"{url}: {type(exc).__name__}: {exc}") from None
    if count != size:
        raise IntegrityFailed(f"{url}: got {count} bytes, expected {size}")
    if digest.hexdigest() != sha256:
        raise IntegrityFailed(f"{url}: sha256 is {digest.hexdigest()}, expected {sha256}")


class _Deadline:
    """Shuts the answer's socket down `seconds` after it was made: a read blocked in it
    returns at once and the download fails, however the server paces its bytes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()
        self.passed = threading.Event()

    @contextlib.contextmanager
    def over(self, answer: Any) -> Iterator[None]:
        stream = answer.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        left = self.seconds - (time.monotonic() - self.started)
        timer = threading.Timer(max(0.0, left), self._expire, args=(sock,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _expire(self, sock: socket.socket | None) -> None:
        self.passed.set()
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed: the download ended
                sock.shutdown(socket.SHUT_RDWR)


# -- extraction --------------------------------------------------------------------------


def extract_limit(size: int) -> int:
    """The most bytes an archive of `size` bytes may unpack to (a bomb stops there)."""
    return max(MIN_EXTRACT_LIMIT, EXPANSION_LIMIT * size)


def extract(archive: Path, fmt: str, dest: Path, limit: int | None = None) -> None:
    """Extract `archive` into the new folder `dest`; UnsafeArchive for a hostile member or
    for more than `limit` bytes unpacked (default: extract_limit of the archive's size)."""
    dest.mkdir()
    limit = limit if limit is not None else extract_limit(archive.stat().st_size)
    if fmt == "zip":
        _extract_zip(archive, dest, limit)
        return
    total = 0
    with open(archive, "rb") as raw, _decompressed(raw, fmt) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    _check_member(member)
                    total += member.size
                    if total > limit:
                        raise UnsafeArchive(f"archive unpacks to more than {limit} bytes")
                    tar.extract(member, dest, filter="data")
        except tarfile.FilterError as exc:
            raise UnsafeArchive(f"archive member refused: {exc}") from None
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise UnsafeArchive(f"archive is not a readable {fmt}: {exc}") from None


def _check_member(member: tarfile.TarInfo) -> None:
    # The data filter refuses these too; the checks here give the clearer message and
    # refuse what it would only rewrite (fifos, setuid bits are dropped by it).
    name = member.name
    if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
        raise UnsafeArchive(f"archive member {name!r}: path leaves the runtime folder")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise UnsafeArchive(f"archive member {name!r}: device files and fifos are refused")
    if member.issym() or member.islnk():
        base = PurePosixPath(name).parent if member.issym() else PurePosixPath()
        target = base / member.linkname
        if member.linkname.startswith("/") or _escapes(target):
            kind = "symlink" if member.issym() else "hard link"
            raise UnsafeArchive(f"archive member {name!r}: {kind} to {member.linkname!r} "
                                "leaves the runtime folder")


def _escapes(path: PurePosixPath) -> bool:
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else 0 if part in (".", "") else 1
        if depth < 0:
            return True
    return False


class _decompressed:
    def __init__(self, raw: IO[bytes], fmt: str) -> None:
        self.raw, self.fmt = raw, fmt
        self.stream: Any = None

    def __enter__(self) -> IO[bytes]:
        if self.fmt == "tar.zst":
            import zstandard

            self.stream = zstandard.ZstdDecompressor().stream_reader(self.raw)
        elif self.fmt == "tar.gz":
            import gzip

            self.stream = gzip.GzipFile(fileobj=self.raw)
        elif self.fmt == "tar.xz":
            import lzma

            self.stream = lzma.LZMAFile(self.raw)
        elif self.fmt == "tar":
            return self.raw
        else:
            raise Invalid(f"unknown archive format {self.fmt!r}", path="format")
        return self.stream  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        if self.stream is not None:
            self.stream.close()


def _extract_zip(archive: Path, dest: Path, limit: int) -> None:
    try:
        with zipfile.ZipFile(archive) as zipped:
            if sum(info.file_size for info in zipped.infolist()) > limit:
                raise UnsafeArchive(f"archive unpacks to more than {limit} bytes")
            for info in zipped.infolist():
                path = PurePosixPath(info.filename)
                if path.is_absolute() or ".." in path.parts or "\\" in info.filename:
                    raise UnsafeArchive(f"archive member {info.filename!r}: path leaves the "
                                        "runtime folder")
                mode = (info.external_attr >> 16) & 0o170000
                if mode not in (0, 0o100000, 0o040000):
                    raise UnsafeArchive(f"archive member {info.filename!r}: only files and "
                                        "folders are allowed in a zip")
                zipped.extract(info, dest)
                if (info.external_attr >> 16) & 0o111:
                    os.chmod(dest / path, 0o755)
    except zipfile.BadZipFile as exc:
        raise UnsafeArchive(f"archive is not a readable zip: {exc}") from None


# -- verify ------------------------------------------------------------------------------


def run_verify(tree: Path, command: str, path: list[str]) -> str:
    """Run the verify command in `tree` with the runtime's folders first on PATH."""
    import shlex

    argv = shlex.split(command)
    program = tree / argv[0]
    if not program.is_file():
        raise VerifyFailed(f"verify: {argv[0]} is not in the runtime")
    own = ":".join(str(tree / folder) for folder in path)
    env = spawn.build_env({"PATH": f"{own}:{spawn.SYSTEM_PATH}" if own else spawn.SYSTEM_PATH},
                          None)
    log.info("runtime_verify", extra=fields(argv=argv, cwd=str(tree)))
    try:
        done = subprocess.run([str(program), *argv[1:]], cwd=tree, env=env, check=False,
                              stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=VERIFY_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VerifyFailed(f"verify {command!r}: {exc}") from None
    output = (done.stdout + done.stderr).decode(errors="replace")
    log.debug("runtime_verify_output", extra=fields(output=output[-OUTPUT_TAIL:]))
    if done.returncode != 0:
        raise VerifyFailed(f"verify {command!r} exited with {done.returncode}: "
                           f"{output[-OUTPUT_TAIL:].strip()}")
    return output.strip()


# -- the runtimes folder -------------------------------------------------------------------


def _switch(link: Path, target: str) -> None:
    """Point `link` at `target` in one step: a new symlink renamed over the old one."""
    tmp = link.with_name(f".{link.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def link_tree(source: Path, dest: Path) -> None:
    """Copy a tree as hard links (a copy across file systems); symlinks stay symlinks.
    Runtime trees are read-only by convention, so sharing their inodes is safe."""
    for folder, dirs, files in os.walk(source):
        rel = Path(folder).relative_to(source)
        (dest / rel).mkdir(mode=0o755, parents=True, exist_ok=True)
        for name in dirs + files:
            src, dst = Path(folder, name), dest / rel / name
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
                if name in dirs:
                    dirs.remove(name)  # os.walk would not descend anyway; keep it explicit
            elif name in files:
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
        shutil.copystat(folder, dest / rel)


ENV_FILE = "etc/zlh/env"  # relative to the container root


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class Runtimes:
    def __init__(self, root: Path, profile: Path, pids: Callable[[], list[int]],
                 cache: Path | None = None, env_file: Path | None = None) -> None:
        self.root = root
        self.cache = cache
        self.profile = profile
        # The same script for shells that read no profile (BASH_ENV, ENV, bash.bashrc).
        self.env_file = env_file
        self.pids = pids
        self.staging = root / STAGING
        self._installs: dict[str, tuple[RuntimeInstall, asyncio.Future[RuntimeInfo]]] = {}
        # Switches, removals and the PATH they publish happen one at a time (installs
        # run in threads and switch at their end).
        self._switching = threading.RLock()

    def open(self) -> None:
        """Remove what an interrupted install left, and take up the active runtimes' PATH.

        With an env file (a container's agent), the profile and the env file are written
        now, so shells get the canonical PATH before any install; without one, nothing
        is created here.
        """
        if self.staging.is_dir():
            for leftover in self.staging.iterdir():
                log.warning("runtime_leftover_removed", extra=fields(path=str(leftover)))
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        if self.env_file is not None:
            self._publish_path()
        else:
            spawn.set_runtime_path(self.path_entries())

    # -- queries ------------------------------------------------------------------------

    def installed(self) -> list[RuntimeInfo]:
        found = []
        for name_dir in sorted(self._names()):
            active = self._active(name_dir.name)
            for version_dir in sorted(p for p in name_dir.iterdir() if _is_version(p)):
                record = self._record(version_dir)
                if record is not None:
                    found.append(record.model_copy(update={"active": version_dir.name == active}))
        return found

    def _names(self) -> Iterator[Path]:
        if self.root.is_dir():
            yield from (p for p in self.root.iterdir() if p.is_dir() and p.name != STAGING)

    def _active(self, name: str) -> str | None:
        try:
            return os.readlink(self.root / name / "current")
        except OSError:
            return None

    def _record(self, version_dir: Path) -> RuntimeInfo | None:
        try:
            return RuntimeInfo.model_validate_json((version_dir / RECORD).read_text())
        except (OSError, ValueError):
            return None

    def get(self, name: str, version: str) -> RuntimeInfo:
        record = self._record(self._version_dir(name, version))
        if record is None:
            raise NotFound(f"runtime {name} {version} is not installed")
        return record.model_copy(update={"active": self._active(name) == version})

    def path_entries(self) -> list[str]:
        entries: list[str] = []
        for info in self.installed():
            if info.active:
                current = self.root / info.name / "current"
                entries += [str(current / folder) for folder in info.path]
        return list(dict.fromkeys(entries))

    def _version_dir(self, name: str, version: str) -> Path:
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", name) or not _version_ok(version):
            raise NotFound(f"runtime {name} {version} is not installed")
        return self.root / name / version

    # -- install ------------------------------------------------------------------------

    async def install(self, request: RuntimeInstall) -> RuntimeInfo:
        """Install (or join the running install of) `request`; one per name at a time."""
        running = self._installs.get(request.name)
        if running is not None:
            same, task = running
            if (same.version, same.sha256) != (request.version, request.sha256):
                raise Conflict(f"an install of {same.name} {same.version} is running")
            log.info("runtime_install_joined", extra=fields(name=request.name,
                                                             version=request.version))
            return await asyncio.shield(task)
        task = asyncio.ensure_future(asyncio.to_thread(self._install, request))
        self._installs[request.name] = (request, task)
        task.add_done_callback(lambda _: self._installs.pop(request.name, None))
        return await asyncio.shield(task)

    def _install(self, request: RuntimeInstall) -> RuntimeInfo:
        target = self.root / request.name / request.version
        if target.exists():
            existing = self._record(target)
            if existing is None or existing.sha256 != request.sha256:
                raise Conflict(f"runtime {request.name} {request.version} is installed with "
                               "other content; remove it first")
            if request.activate:
                return self.activate(request.name, request.version)
            return self.get(request.name, request.version)

        started = time.monotonic()
        self.staging.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{request.name}-{request.version}-",
                                     dir=self.staging))
        try:
            if not self._from_cache(request, work / "tree"):
                log.info("runtime_download", extra=fields(name=request.name, url=request.url))
                download(request.url, work / "download", request.size, request.sha256,
                         request.timeout, request.deadline)
                extract(work / "download", request.format, work / "tree")
                self._to_cache(request, work / "tree")
            if request.verify:
                run_verify(work / "tree", request.verify, request.path)
            record = RuntimeInfo(name=request.name, version=request.version, active=False,
                                 sha256=request.sha256, size=request.size, url=request.url,
                                 path=request.path, installed_at=time.time())
            (work / "tree" / RECORD).write_text(record.model_dump_json())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(work / "tree", target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log.info("runtime_installed", extra=fields(name=request.name, version=request.version,
                                                   seconds=round(time.monotonic() - started, 3)))
        if request.activate:
            return self.activate(request.name, request.version)
        return self.get(request.name, request.version)

    # -- the shared tree cache ------------------------------------------------------------

    def _from_cache(self, request: RuntimeInstall, tree: Path) -> bool:
        """Link a tree that an earlier install verified (same sha256) instead of fetching."""
        if self.cache is None or not (self.cache / request.sha256).is_dir():
            return False
        link_tree(self.cache / request.sha256, tree)
        log.info("runtime_from_cache", extra=fields(name=request.name, sha256=request.sha256))
        return True

    def _to_cache(self, request: RuntimeInstall, tree: Path) -> None:
        # Only a tree whose archive passed the size and sha256 checks gets here; it is
        # entered under its archive's sha256, complete or not at all (rename).
        if self.cache is None or (self.cache / request.sha256).exists():
            return
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.cache))
        try:
            link_tree(tree, tmp / "tree")
            os.rename(tmp / "tree", self.cache / request.sha256)
        except OSError as exc:
            log.warning("runtime_cache_failed", extra=fields(error=str(exc)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- switch and remove ----------------------------------------------------------------

    def activate(self, name: str, version: str) -> RuntimeInfo:
        """Make VERSION current (the old current becomes `previous`); rewrite the PATH."""
        with self._switching:
            info = self.get(name, version)
            folder = self.root / name
            old = self._active(name)
            if old != version:
                if old is not None:
                    _switch(folder / "previous", old)
                _switch(folder / "current", version)
                log.info("runtime_activated", extra=fields(name=name, version=version,
                                                           previous=old))
            self._publish_path()
            return info.model_copy(update={"active": True})

    def rollback(self, name: str) -> RuntimeInfo:
        """Switch NAME back to its previous version."""
        previous = _readlink(self.root / name / "previous")
        if previous is None:
            raise NotFound(f"runtime {name} has no previous version to roll back to")
        return self.activate(name, previous)

    def remove(self, name: str, version: str, force: bool = False) -> RuntimeInfo:
        if name in self._installs:
            raise Conflict(f"an install of {name} is running; remove after it ends")
        with self._switching:
            return self._remove(name, version, force)

    def _remove(self, name: str, version: str, force: bool) -> RuntimeInfo:
        info = self.get(name, version)
        if not force:
            users = self.users(name, version)
            if users:
                raise Conflict(f"runtime {name} {version} is in use by pid "
                               f"{', '.join(map(str, users))}; pass force=true to remove it")
        folder = self.root / name
        for link in ("current", "previous"):
            if _readlink(folder / link) == version:
                (folder / link).unlink()
        # Renamed away first, so the version is gone in one step even if the delete
        # of a large tree is cut off; what is left in .staging goes at the next start.
        doomed = self.staging / f"removed-{name}-{version}-{time.monotonic_ns()}"
        os.rename(folder / version, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        self._publish_path()
        log.info("runtime_removed", extra=fields(name=name, version=version, force=force))
        return info

    def users(self, name: str, version: str) -> list[int]:
        """Pids of supervised processes (and descendants) that use NAME/VERSION."""
        import psutil

        home = (self.root / name / version).resolve()
        found = []
        for pid in self.pids():
            try:
                top = psutil.Process(pid)
                family = [top, *top.children(recursive=True)]
            except psutil.Error:
                continue
            found += [p.pid for p in family if _uses(p, home)]
        return sorted(set(found))

    def _publish_path(self) -> None:
        entries = self.path_entries()
        spawn.set_runtime_path(entries)
        text = profile_text(entries)
        for path in (self.profile, self.env_file):
            if path is not None and _read(path) != text:
                _write_atomic(path, text)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _uses(process: Any, home: Path) -> bool:
    import psutil

    paths: list[str] = []
    try:
        paths.append(process.exe())
        paths.append(process.cwd())
        paths += [arg for arg in process.cmdline() if arg.startswith("/")]
        paths += process.environ().get("PATH", "").split(":")
    except psutil.Error:
        pass
    return any(_under(path, home) for path in paths if path)


def _under(path: str, home: Path) -> bool:
    try:
        return Path(os.path.realpath(path)).is_relative_to(home)
    except (OSError, ValueError):
        return False


def _readlink(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _is_version(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and _version_ok(path.name)


def _version_ok(version: str) -> bool:
    return bool(re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}", version))


def profile_text(entries: list[str]) -> str:
    """The shell script that sets the canonical PATH (spawn.canonical_path), the same for
    login shells (/etc/profile.d), non-login shells (BASH_ENV, ENV) and the console."""
    return ("# Written by agentd: the PATH folders of the active runtimes, then the system's."
            " Do not edit.\n"
            f'PATH="{spawn.canonical_path(entries)}"\n'
            "export PATH\n")
