"""Files under the server root: list, read, write (atomically, size-limited), delete.

A path is relative to the server root; an absolute path, a `..` part or a NUL is
refused, and so is any path whose resolved location (links followed) is outside the
root. The last part of a path given to `delete` is not followed, so deleting a link
removes the link. An upload goes to a temporary file beside its target, named in a note
under the state folder while it runs, so that the next agent removes what an agent killed
mid-upload left. Known limit: a link swapped in between the check and the open could
still redirect one access; when the agent runs as the game's own user that gains
nothing, and openat2(RESOLVE_BENEATH) would close it once Python exposes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath

from agentd.backup_models import FileInfo, FileListing
from agentd.errors import Conflict, Invalid, NotFound, TooLarge
from agentd.logs import fields

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class ServerFiles:
    def __init__(self, root: Path, max_upload: int, uploads: Path) -> None:
        self.root = root
        self.max_upload = max_upload
        self.uploads = uploads  # one note per upload under way: its temporary file
        uploads.mkdir(parents=True, exist_ok=True)

    # -- paths --------------------------------------------------------------------------

    def _relative(self, path: str, allow_root: bool = False) -> str:
        pure = PurePosixPath(path or ".")
        if pure.is_absolute() or ".." in pure.parts or "\0" in path:
            raise Invalid(f"path {path!r} must be relative to the server root, without '..'",
                          path="path")
        rel = str(pure)
        if rel == "." and not allow_root:
            raise Invalid("the server root itself cannot be written or deleted", path="path")
        return rel

    def _inside(self, candidate: Path) -> bool:
        base = os.path.realpath(self.root)
        real = os.path.realpath(candidate)
        return real == base or real.startswith(base + os.sep)

    def resolve(self, path: str, allow_root: bool = False) -> Path:
        """The location of `path`, links followed, refused when it leaves the root."""
        target = self.root / self._relative(path, allow_root)
        if not self._inside(target):
            raise Invalid(f"path {path!r} leads out of the server root", path="path")
        return target

    def _parent_checked(self, path: str) -> Path:
        """`path` with its folder checked, its last part not followed (write, delete)."""
        target = self.root / self._relative(path)
        if not self._inside(target.parent):
            raise Invalid(f"path {path!r} leads out of the server root", path="path")
        return target

    # -- reading ------------------------------------------------------------------------

    def info(self, target: Path, with_hash: bool = False) -> FileInfo:
        st = os.lstat(target)
        kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
                else "link" if stat.S_ISLNK(st.st_mode) else "other")
        rel = os.path.relpath(target, self.root)
        digest = _sha256(target) if with_hash and kind == "file" else None
        return FileInfo(name=target.name, path=rel, type=kind, size=st.st_size,
                        mtime=st.st_mtime, mode=stat.S_IMODE(st.st_mode), sha256=digest)

    def listing(self, target: Path) -> FileListing:
        entries = [self.info(Path(entry.path)) for entry in os.scandir(target)]
        entries.sort(key=lambda e: (e.type != "dir", e.name))
        return FileListing(path=os.path.relpath(target, self.root), entries=entries)

    def lookup(self, path: str) -> Path:
        target = self.resolve(path, allow_root=True)
        if not target.exists():
            raise NotFound(f"no file {path!r} in the server root")
        return target

    # -- writing ------------------------------------------------------------------------

    async def write(self, path: str, chunks: AsyncIterator[bytes],
                    declared: int | None) -> FileInfo:
        """Stream an upload to a temporary file beside the target, then rename it."""
        if declared is not None and declared > self.max_upload:
            raise TooLarge(f"upload over {self.max_upload} bytes")
        target = self._parent_checked(path)
        if target.is_dir() and not target.is_symlink():
            raise Conflict(f"{path!r} is a folder")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise Conflict(f"{path!r}: a part of its folder is a file, not a folder") from None
        if not self._inside(target.parent):
            raise Invalid(f"path {path!r} leads out of the server root", path="path")
        token = secrets.token_hex(8)
        tmp = target.with_name(f".{target.name}.upload-{token}")
        note = self.uploads / token
        note.write_text(str(tmp))  # so that an agent killed meanwhile has it removed
        try:
            await self._receive(tmp, chunks)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            note.unlink()
        log.info("file_written", extra=fields(path=path, bytes=target.stat().st_size))
        return self.info(target, with_hash=True)

    async def _receive(self, tmp: Path, chunks: AsyncIterator[bytes]) -> None:
        size = 0
        with open(tmp, "xb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_upload:
                    raise TooLarge(f"upload over {self.max_upload} bytes")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())

    def recover(self) -> None:
        """At agent start: remove the temporary files of uploads a previous agent left."""
        for note in self.uploads.iterdir():
            tmp = Path(note.read_text())
            if tmp.name.startswith(".") and ".upload-" in tmp.name and \
                    self._inside(tmp.parent):
                tmp.unlink(missing_ok=True)
                log.warning("upload_leftover_removed", extra=fields(path=str(tmp)))
            note.unlink()

    def delete(self, path: str, recursive: bool) -> FileInfo:
        target = self._parent_checked(path)
        if not os.path.lexists(target):
            raise NotFound(f"no file {path!r} in the server root")
        info = self.info(target)
        if info.type == "dir":
            if not recursive:
                raise Conflict(f"{path!r} is a folder; pass recursive=true to delete it")
            shutil.rmtree(target)
        else:
            target.unlink()
        log.info("file_deleted", extra=fields(path=path, type=info.type))
        return info


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
