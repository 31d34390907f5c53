"""Backup archives: tar streamed through zstd, with a manifest, and their safe extraction.

Writing: one pass over the files, in four threads, each with about a quarter of the work
(`tar | zstd -T1` has three). The reading thread reads each file once into pooled buffers
(tar headers and small files packed together) and compares (size, mtime) before and after,
so a file that changed while it was read is reported instead of silently cut. The hashing
thread computes each file's sha256 from the same buffers, the compressing thread runs zstd
on them, and the writing thread hashes the compressed stream and writes it. hashlib, zstd
and file I/O release the GIL on large buffers, so they run on all the cores there are. The
manifest (every file's size and sha256) is the archive's last member.

Reading: the archive's sha256 is checked before anything else. Members are extracted
into a staging folder only: absolute names, `..`, links that leave the staging folder,
hard links and devices refuse the whole archive. Every file's hash is checked against
the manifest, and the manifest against the set of members.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import mmap
import os
import queue
import re
import stat
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import zstandard

log = logging.getLogger(__name__)

MANIFEST = ".zlh-manifest.json"
CHUNK = 1 << 20
BUFFERS = 6  # CHUNK-sized buffers in flight between the reading and compressing threads
LEVEL = 3  # zstd's own default, and what `tar -I zstd` uses
ALWAYS_EXCLUDED = ("session.lock", "/.zlh-*")  # a game's lock file; restore staging


class BadArchive(Exception):
    """The archive is corrupt or unsafe; nothing was changed."""


# -- exclusions ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


def _glob_regex(glob: str) -> str:
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


class Excluder:
    """gitignore-style patterns, matched against paths relative to the server root.

    A pattern without a `/` matches a name at any depth; with one, it is anchored at
    the server root; a trailing `/` matches folders only; `!` re-includes; the last
    matching pattern wins. A folder that is excluded is not descended into.
    """

    def __init__(self, patterns: list[str], absolute: list[Path] | None = None) -> None:
        self._rules = [rule for p in patterns if (rule := self._rule(p)) is not None]
        self._absolute = {os.path.realpath(p) for p in absolute or []}

    @staticmethod
    def _rule(pattern: str) -> _Rule | None:
        text = pattern.strip()
        if not text or text.startswith("#"):
            return None
        negate = text.startswith("!")
        text = text[1:] if negate else text
        dir_only = text.endswith("/")
        text = text.rstrip("/")
        anchored = "/" in text
        body = _glob_regex(text.lstrip("/"))
        regex = f"^{body}$" if anchored else f"^(?:.*/)?{body}$"
        return _Rule(re.compile(regex), negate, dir_only)

    def excluded(self, rel: str, is_dir: bool, real: str | None = None) -> bool:
        if real is not None and real in self._absolute:
            return True
        verdict = False
        for rule in self._rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.match(rel):
                verdict = not rule.negate
        return verdict


# -- writing ---------------------------------------------------------------------------


@dataclass
class Written:
    size: int = 0
    sha256: str = ""
    manifest_sha256: str = ""
    files: int = 0
    bytes_in: int = 0
    changed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    manifest: bytes = b""


def _buffer() -> mmap.mmap:
    """A CHUNK of memory of its own: unmapped when dropped, so the agent does not keep the
    few MiB of a backup in its heap afterwards (as 1 MiB bytearrays left it)."""
    return mmap.mmap(-1, CHUNK)


class _Writer:
    """The writing thread: the compressed stream, as zstd hands it over, hashed, counted and
    written to the file. An error (a full disk) is raised at zstd's next `write` and by
    `close`; the thread keeps taking chunks until it is closed."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.hash = hashlib.sha256()
        self.size = 0
        self._chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=BUFFERS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="archive-write", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> int:
        if self._error is not None:
            raise self._error
        self._chunks.put(data)  # a new bytes object from zstd for every call
        return len(data)

    def close(self) -> None:
        """Wait until everything is written; raise what went wrong."""
        if self._thread.is_alive():
            self._chunks.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (data := self._chunks.get()) is not None:
            if self._error is None:
                try:
                    self._handle.write(data)
                except BaseException as exc:  # noqa: BLE001 - raised again by the compressor
                    self._error = exc
                self.hash.update(data)
                self.size += len(data)


@dataclass
class _FileHash:
    """One file's sha256, fed by the hashing thread; its manifest entry gets the result."""

    entry: dict[str, object]
    hash: Any = field(default_factory=hashlib.sha256)


# (start, end, file, last): bytes [start, end) of a buffer belong to `file`; `last` when
# they are the end of it.
_Segment = tuple[int, int, _FileHash, bool]
_Full = tuple[mmap.mmap, int, list[_Segment]]


class _Pipeline:
    """Behind the reading thread: a hashing thread (each file's sha256), a compressing
    thread (zstd) and the writing thread. Buffers go from one to the next and back to the
    pool once compressed.

    An error in any of them (a full disk) is raised in the reading thread at its next
    `take`; the threads keep passing buffers on until they are told to end, so the reader
    never waits on a thread that is gone.
    """

    def __init__(self, out: BinaryIO, level: int) -> None:
        self.sink = _Writer(out)
        # The sink is a writable file-like object; zstandard's stubs ask for a narrower type.
        self._zstd = zstandard.ZstdCompressor(level=level).stream_writer(
            self.sink, closefd=False)  # type: ignore[arg-type]
        self._to_hash: queue.Queue[_Full | threading.Event | None] = queue.Queue()
        self._to_compress: queue.Queue[_Full | None] = queue.Queue()
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(BUFFERS):
            self._free.put(_buffer())
        self._error: BaseException | None = None
        self._aborted = False
        self._threads = [threading.Thread(target=self._hashing, name="archive-sha256",
                                          daemon=True),
                         threading.Thread(target=self._compressing, name="archive-zstd",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    def take(self) -> mmap.mmap:
        """An empty buffer to fill (waits while all are in flight)."""
        buffer = self._free.get()
        self._check()
        return buffer

    def send(self, buffer: mmap.mmap, used: int, segments: list[_Segment]) -> None:
        self._to_hash.put((buffer, used, segments))

    def hashed(self) -> None:
        """Wait until every file sent so far is hashed (its manifest entry complete)."""
        done = threading.Event()
        self._to_hash.put(done)
        done.wait()
        self._check()

    def finish(self) -> None:
        """End the zstd frame and wait for everything to be written."""
        self._end()
        self._check()

    def abort(self) -> None:
        """The reading side failed: end the threads without ending the frame."""
        self._aborted = True
        self._end()

    def _end(self) -> None:
        if any(thread.is_alive() for thread in self._threads):
            self._to_hash.put(None)
            for thread in self._threads:
                thread.join()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _hashing(self) -> None:
        while (item := self._to_hash.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            if self._error is None:
                view = memoryview(item[0])
                for start, end, file, last in item[2]:
                    file.hash.update(view[start:end])
                    if last:
                        file.entry["sha256"] = file.hash.hexdigest()
            self._to_compress.put(item)
        self._to_compress.put(None)

    def _compressing(self) -> None:
        while (item := self._to_compress.get()) is not None:
            buffer, used, _ = item
            if self._error is None:
                try:
                    self._zstd.write(memoryview(buffer)[:used])
                except BaseException as exc:  # noqa: BLE001 - raised again by the reader
                    self._error = exc
            self._free.put(buffer)
        try:
            if self._error is None and not self._aborted:
                self._zstd.close()  # ends the frame; closefd=False leaves `out` open
            self.sink.close()
        except BaseException as exc:  # noqa: BLE001 - raised again by finish()
            self._error = self._error or exc


class _Feed:
    """The reading side: fills pooled buffers, noting which bytes are which file's, and
    hands each buffer on when it is full."""

    def __init__(self, pipeline: _Pipeline) -> None:
        self._pipeline = pipeline
        self._buffer: mmap.mmap | None = None
        self._used = 0
        self._segments: list[_Segment] = []

    def _space(self) -> memoryview:
        if self._buffer is not None and self._used == len(self._buffer):
            self.flush()
        if self._buffer is None:
            self._buffer, self._used = self._pipeline.take(), 0
        return memoryview(self._buffer)[self._used:]

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            space = self._space()
            count = min(len(space), len(view))
            space[:count] = view[:count]
            self._used += count
            view = view[count:]

    def copy(self, source: _FileSource, file: _FileHash) -> None:
        while True:
            space = self._space()  # may hand the full buffer on and take a new one
            start = self._used
            self._used += source.fill(space)
            self._segments.append((start, self._used, file, source.left == 0))
            if source.left == 0:
                return

    def flush(self) -> None:
        if self._buffer is not None and self._used:
            self._pipeline.send(self._buffer, self._used, self._segments)
            self._buffer, self._segments = None, []


class _FileSource:
    """Exactly `size` bytes of a file, read straight into the feed's buffers.

    tar needs exactly the size in the header: a file that shrank while it was read is
    padded with zeros (and reported), one that grew is cut at the header's size.
    """

    def __init__(self, handle: io.FileIO, size: int) -> None:
        self._handle = handle
        self.left = size
        self.short = False

    def fill(self, view: memoryview) -> int:
        """Read into `view` what is left, up to its length; the count."""
        want = min(len(view), self.left)
        got = (self._handle.readinto(view[:want]) or 0) if want else 0
        if got == 0 and want:
            self.short = True
            view[:want] = bytes(want)
            got = want
        self.left -= got
        return got


@dataclass
class _Manifest:
    paths: list[str]
    files: dict[str, dict[str, object]] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)

    def encode(self, meta: dict[str, object]) -> bytes:
        body = {"version": 1, **meta, "paths": self.paths, "files": self.files,
                "dirs": self.dirs, "links": self.links}
        return json.dumps(body, indent=0, sort_keys=True).encode()


def write_archive(root: Path, paths: list[str], excluder: Excluder, out: BinaryIO,
                  meta: dict[str, object], level: int = LEVEL) -> Written:
    """Archive `paths` (relative to `root`) into `out` as tar + zstd; returns the figures."""
    written = Written()
    manifest = _Manifest([os.path.normpath(p) for p in paths])
    pipeline = _Pipeline(out, level)
    try:
        tar = _TarStream(_Feed(pipeline))
        for rel, st in walk(root, manifest.paths, excluder, written.skipped):
            _add(tar, root, rel, st, manifest, written)
        tar.flush()
        pipeline.hashed()  # every file's sha256 is in the manifest now
        data = manifest.encode(meta)
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime, info.mode = len(data), int(float(str(meta.get("time", 0)))), 0o644
        tar.add(info, data)
        tar.close()
        pipeline.finish()
    finally:
        pipeline.abort()
    written.manifest, written.manifest_sha256 = data, hashlib.sha256(data).hexdigest()
    written.size, written.sha256 = pipeline.sink.size, pipeline.sink.hash.hexdigest()
    return written


class _TarStream:
    """A tar writer with no buffering of its own: headers and data go straight to the feed.

    tarfile's stream mode re-slices a 10 KiB buffer for every block it writes, which
    made archiving a third as fast as `tar | zstd`; this writes what tarfile would.
    """

    def __init__(self, feed: _Feed) -> None:
        self._feed = feed
        self._offset = 0

    def _put(self, data: bytes) -> None:
        self._feed.write(data)
        self._offset += len(data)

    def add(self, info: tarfile.TarInfo, data: bytes | None = None) -> None:
        """A member whose data, if any, is in memory."""
        self._put(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
        if data is not None:
            self._put(data)
            self._put(bytes((-len(data)) % tarfile.BLOCKSIZE))

    def add_file(self, info: tarfile.TarInfo, source: _FileSource, file: _FileHash) -> None:
        self._put(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
        self._feed.copy(source, file)
        self._offset += info.size
        self._put(bytes((-info.size) % tarfile.BLOCKSIZE))

    def flush(self) -> None:
        self._feed.flush()

    def close(self) -> None:
        self._put(bytes(2 * tarfile.BLOCKSIZE))
        self._put(bytes((-self._offset) % tarfile.RECORDSIZE))
        self._feed.flush()


def walk(root: Path, paths: list[str], excluder: Excluder,
         skipped: list[str]) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything to archive, folders before their content."""
    tops = [os.path.normpath(p) for p in paths]
    if "." in tops:
        tops = sorted(os.listdir(root))
    for top in tops:
        try:
            st = os.lstat(root / top)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_dir(root, top, st, excluder, skipped)
        elif not excluder.excluded(top, False):
            yield top, st


def _walk_dir(root: Path, rel: str, st: os.stat_result, excluder: Excluder,
              skipped: list[str]) -> Iterator[tuple[str, os.stat_result]]:
    if excluder.excluded(rel, True, os.path.realpath(root / rel)):
        return
    yield rel, st
    try:
        entries = sorted(os.scandir(root / rel), key=lambda e: e.name)
    except OSError as exc:
        log.warning("backup_unreadable", extra={"fields": {"path": rel, "error": str(exc)}})
        skipped.append(rel + "/")
        return
    for entry in entries:
        child = f"{rel}/{entry.name}"
        child_st = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(child_st.st_mode):
            yield from _walk_dir(root, child, child_st, excluder, skipped)
        elif not excluder.excluded(child, False):
            yield child, child_st


def _add(tar: _TarStream, root: Path, rel: str, st: os.stat_result,
         manifest: _Manifest, written: Written) -> None:
    info = tarfile.TarInfo(rel)
    info.mode, info.mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
    info.uid, info.gid = st.st_uid, st.st_gid
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        tar.add(info)
        manifest.dirs.append(rel)
    elif stat.S_ISLNK(st.st_mode):
        _add_link(tar, root, rel, info, manifest, written)
    elif stat.S_ISREG(st.st_mode):
        _add_file(tar, root, rel, info, manifest, written)
    else:
        written.skipped.append(rel)


def _add_link(tar: _TarStream, root: Path, rel: str, info: tarfile.TarInfo,
              manifest: _Manifest, written: Written) -> None:
    target = os.readlink(root / rel)
    if not inside(root, os.path.join(os.path.dirname(root / rel), target)):
        written.skipped.append(rel)  # a link out of the server root is not world data
        return
    info.type, info.linkname = tarfile.SYMTYPE, target
    tar.add(info)
    manifest.links[rel] = target


def _add_file(tar: _TarStream, root: Path, rel: str, info: tarfile.TarInfo,
              manifest: _Manifest, written: Written) -> None:
    try:
        handle = open(root / rel, "rb", buffering=0)  # noqa: SIM115 - `with` just below
    except OSError as exc:
        log.warning("backup_unreadable", extra={"fields": {"path": rel, "error": str(exc)}})
        written.skipped.append(rel)
        return
    with handle:
        before = os.fstat(handle.fileno())
        info.size = before.st_size
        # The hashing thread fills in the sha256 once it has seen the file's last byte.
        entry: dict[str, object] = {"size": before.st_size, "sha256": None}
        source = _FileSource(handle, before.st_size)
        tar.add_file(info, source, _FileHash(entry))
        after = os.fstat(handle.fileno())
    changed = source.short or (after.st_size, after.st_mtime_ns) != (
        before.st_size, before.st_mtime_ns)
    if changed:
        entry["changed"] = True
        written.changed.append(rel)
    manifest.files[rel] = entry
    written.files += 1
    written.bytes_in += before.st_size


# -- reading ---------------------------------------------------------------------------


def inside(base: Path | str, candidate: str) -> bool:
    """True when `candidate` (after resolving links) lies within `base`."""
    real_base = os.path.realpath(base)
    real = os.path.realpath(candidate)
    return real == real_base or real.startswith(real_base + os.sep)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Extracted:
    paths: list[str]
    files: int
    manifest: dict[str, object]


def verify_and_extract(archive: Path, sha256: str, manifest_sha256: str | None,
                       staging: Path) -> Extracted:
    """Check the archive's hash, then extract it into `staging` (created here, empty).

    Raises BadArchive when anything does not match; `staging` may then hold a part of
    the archive and is the caller's to remove. Nothing outside `staging` is touched.
    """
    actual = file_sha256(archive)
    if actual != sha256:
        raise BadArchive(f"archive sha256 is {actual}, the record says {sha256}")
    staging.mkdir(mode=0o700)
    seen: dict[str, str] = {}
    manifest_raw = b""
    buffer = memoryview(_buffer())
    with open(archive, "rb") as handle:
        data = zstandard.ZstdDecompressor().stream_reader(handle, read_size=CHUNK)
        try:
            # Read mode "r" on the decompressing stream: tarfile reads headers from it and
            # only ever seeks forward (which the stream does by reading), and file data is
            # read from the stream straight into `buffer`. Stream mode "r|" copies every
            # read through a 10 KiB buffer: a third slower.
            with tarfile.TarFile(fileobj=data, mode="r") as tar:
                for member in tar:
                    if member.name == MANIFEST:
                        manifest_raw = _read_member(tar, member)
                    else:
                        _extract(data, member, staging, seen, buffer)
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
            raise BadArchive(f"unreadable archive: {exc}") from None
        except FileExistsError as exc:
            raise BadArchive(f"member {exc.filename!r} appears twice") from None
    return _check_manifest(manifest_raw, manifest_sha256, seen)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    source = tar.extractfile(member)
    if source is None or member.size > 256 * 2**20:
        raise BadArchive("the manifest member is not a plain file of sane size")
    return source.read()


def _safe_name(name: str) -> str:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\0" in name:
        raise BadArchive(f"member {name!r} would leave the staging folder")
    return str(path)


def _extract(data: zstandard.ZstdDecompressionReader, member: tarfile.TarInfo,
             staging: Path, seen: dict[str, str], buffer: memoryview) -> None:
    name = _safe_name(member.name)
    target = staging / name
    if not inside(staging, str(target.parent)):
        raise BadArchive(f"member {name!r} goes through a link out of the staging folder")
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, 0o700 | (member.mode & 0o777))
        seen[name] = "dir"
    elif member.issym():
        link_at = os.path.join(os.path.dirname(target), member.linkname)
        if os.path.isabs(member.linkname) or not inside(staging, link_at):
            raise BadArchive(f"link {name!r} -> {member.linkname!r} points out of the world")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(member.linkname, target)
        seen[name] = "link:" + member.linkname
    elif member.isreg() and not member.issparse():
        seen[name] = _extract_file(data, member, target, buffer)
    else:
        raise BadArchive(f"member {name!r} is a {_kind(member)}; only files, folders "
                         "and links inside the world are restored")
    _set_owner(target, member)


def _extract_file(data: zstandard.ZstdDecompressionReader, member: tarfile.TarInfo,
                  target: Path, buffer: memoryview) -> str:
    """The member's data, read from the archive's stream where tarfile left it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    digest = hashlib.sha256()
    left = member.size
    with os.fdopen(os.open(target, flags, 0o600), "wb") as out:
        while left > 0:
            got = data.readinto(buffer[:min(len(buffer), left)])
            if not got:
                raise BadArchive(f"member {member.name!r} is cut short")
            digest.update(buffer[:got])
            out.write(buffer[:got])
            left -= got
    os.chmod(target, member.mode & 0o777)
    os.utime(target, (member.mtime, member.mtime))
    return f"{member.size}:{digest.hexdigest()}"


def _set_owner(target: Path, member: tarfile.TarInfo) -> None:
    # Only root can give files back to the game's user; others restore as themselves.
    if os.geteuid() == 0:
        os.lchown(target, member.uid, member.gid)


def _kind(member: tarfile.TarInfo) -> str:
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    if member.issparse():
        return "sparse file"
    if member.isfifo():
        return "fifo"
    return f"member of type {member.type!r}"


def _check_manifest(raw: bytes, expected_sha: str | None, seen: dict[str, str]) -> Extracted:
    if not raw:
        raise BadArchive("the archive has no manifest")
    if expected_sha is not None and hashlib.sha256(raw).hexdigest() != expected_sha:
        raise BadArchive("the archive's manifest is not the one recorded for this backup")
    try:
        manifest = json.loads(raw)
        files = {name: f"{e['size']}:{e['sha256']}" for name, e in manifest["files"].items()}
        dirs = {name: "dir" for name in manifest["dirs"]}
        links = {name: "link:" + t for name, t in manifest["links"].items()}
        paths = [str(p) for p in manifest["paths"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadArchive(f"the manifest is malformed: {exc}") from None
    expected = {**files, **dirs, **links}
    if expected != seen:
        wrong = sorted(set(expected.items()) ^ set(seen.items()))
        raise BadArchive(f"the archive does not match its manifest: {wrong[:5]}")
    for name in seen:
        if not any(name == p or name.startswith(p + "/") for p in paths):
            raise BadArchive(f"member {name!r} is outside the backup's paths")
    return Extracted(paths, len(files), manifest)
