"""Server files (mods, configs) through the agent's files API, under the server root only."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from zlh import records
from zlh.errors import UsageError

if TYPE_CHECKING:
    from agentd.backup_models import FileInfo, FileListing

CHUNK = 1 << 20


def _client(name: str) -> Any:
    from zlh.servers import agent_client

    return agent_client(records.get(name))


def ls(name: str, path: str) -> FileListing | FileInfo:
    """A folder's entries, or one file's details."""
    with _client(name) as client:
        return client.files_list(path)  # type: ignore[no-any-return]


@dataclass
class Fetched:
    path: str
    dest: str
    size: int
    sha256: str


def get(name: str, path: str, dest: Path | None, out: BinaryIO) -> Fetched:
    """Download a file to `dest` (renamed when complete), or to `out` when dest is None."""
    from zlh.download import Landing, target_of

    target = target_of(dest, PurePosixPath(path).name) if dest is not None else None
    with _client(name) as client, client.stream("GET", "/v1/files", params={"path": path}) as r:
        if r.headers.get("content-type", "").startswith("application/json"):
            raise UsageError(f"{path!r} is a folder; use `zlh files ls`")
        if target is None:
            size, digest = _copy(r, out)
        else:
            landing = Landing(target)
            with landing as sink:
                size, digest = _copy(r, sink)
                landing.keep()
    return Fetched(path, str(target) if target else "-", size, digest)


def _copy(answer: Any, sink: BinaryIO) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    for chunk in answer.iter_bytes(CHUNK):
        digest.update(chunk)
        sink.write(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def put(name: str, source: Path, path: str) -> FileInfo:
    """Upload a local file to `path` under the server root (written atomically there)."""
    if not source.is_file():
        raise UsageError(f"{source} is not a file")
    local = hashlib.sha256()
    with open(source, "rb") as handle, _client(name) as client:
        def chunks() -> Any:
            while chunk := handle.read(CHUNK):
                local.update(chunk)
                yield chunk
        info: FileInfo = client.files_put(path, chunks())
    if info.sha256 != local.hexdigest():
        from zlh.errors import IntegrityError

        raise IntegrityError(f"{path}: the agent stored sha256 {info.sha256}, "
                             f"the local file has {local.hexdigest()}")
    return info


def rm(name: str, path: str, recursive: bool) -> FileInfo:
    with _client(name) as client:
        return client.files_delete(path, recursive)  # type: ignore[no-any-return]
