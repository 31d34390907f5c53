"""Where a download lands on this machine: whole or not at all.

The destination is a file, or a folder to put the file in under its own name. Bytes go
to a temporary file of its own beside the target (so a stale or concurrent download
cannot collide with it), which is fsynced and renamed over the target only once the
caller accepts it; anything else removes it. A destination that exists and is not a
regular file (a device such as /dev/null, a socket, a link) is refused rather than
replaced, and a place that cannot be written is one error naming it.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from zlh.errors import UsageError, ZlhError


def target_of(dest: Path, name: str) -> Path:
    """The file a download to `dest` writes: `dest`, or `dest/name` when it is a folder."""
    target = dest / name if dest.is_dir() else dest
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise UsageError(f"{dest}: the folder {target.parent} does not exist") from None
        return target
    if stat.S_ISDIR(mode):
        raise UsageError(f"{target} is a folder")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{target} exists and is not a regular file; nothing was written")
    return target


class Landing:
    """A temporary file beside `target`; `keep()` renames it over the target."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.tmp: Path | None = None
        self.out: BinaryIO | None = None

    def __enter__(self) -> BinaryIO:
        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".part",
                                        dir=self.target.parent)
        except OSError as exc:
            raise ZlhError(f"{self.target}: cannot write there ({exc.strerror})") from None
        self.tmp = Path(name)
        os.fchmod(fd, 0o666 & ~_umask())  # as a plain open() would create it
        self.out = os.fdopen(fd, "wb")
        return self.out

    def keep(self) -> None:
        """The download is whole and accepted: make it durable and put it in place."""
        assert self.out is not None and self.tmp is not None
        self.out.flush()
        os.fsync(self.out.fileno())
        self.out.close()
        try:
            os.replace(self.tmp, self.target)
        except OSError as exc:
            raise ZlhError(f"{self.target}: cannot write there ({exc.strerror})") from None
        self.tmp = None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.out is not None:
            self.out.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk, say, while writing
            raise ZlhError(f"{self.target}: cannot write there ({exc.strerror or exc}); "
                           "nothing was written") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
