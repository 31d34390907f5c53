"""The backup and files routes of the agent's API (docs/agent-api.md)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from agentd.backup_models import BackupRequest, PruneRequest, RestoreRequest
from agentd.errors import Conflict, Invalid

if TYPE_CHECKING:
    from agentd.agent import Agent

JSON = "application/json"
SHA_HEADER = "X-Sha256"


def routes(agent: Agent, limit: int) -> list[Route]:
    """The routes; nothing of `agent` is used before a request comes."""
    from agentd.api import _body, _json

    async def backup_list(request: Request) -> Response:
        return _json(agent.backups.listing())

    async def backup_run(request: Request) -> Response:
        body = await _body(request, BackupRequest, limit) if await _has_body(request) \
            else BackupRequest()
        return _json(await agent.backups.backup(body), 201)

    async def backup_download(request: Request) -> Response:
        path, record = agent.backups.archive_of(request.path_params["id"])
        headers = {SHA_HEADER: record.sha256 or "", "X-Backup-Id": record.id}
        return FileResponse(path, media_type="application/zstd", headers=headers,
                            filename=path.name)

    async def backup_restore(request: Request) -> Response:
        body = await _body(request, RestoreRequest, limit) if await _has_body(request) \
            else RestoreRequest()
        return _json(await agent.backups.restore(request.path_params["id"], body))

    async def backup_prune(request: Request) -> Response:
        body = await _body(request, PruneRequest, limit)
        return _json(await agent.backups.prune(body))

    async def files_get(request: Request) -> Response:
        path = _path(request)
        target = agent.files.lookup(path)
        if target.is_dir():
            return _json(agent.files.listing(target))
        if _flag(request, "info"):
            return _json(await asyncio.to_thread(agent.files.info, target, True))
        info = agent.files.info(target)
        if info.type != "file":  # reading a fifo would wait for a writer forever
            raise Conflict(f"{path!r} is not a regular file ({info.type})")
        return FileResponse(target, media_type="application/octet-stream",
                            headers={"X-File-Mode": f"{info.mode:o}"})

    async def files_put(request: Request) -> Response:
        declared = request.headers.get("content-length")
        size = int(declared) if declared and declared.isdigit() else None
        info = await agent.files.write(_path(request), request.stream(), size)
        return _json(info, 201)

    async def files_delete(request: Request) -> Response:
        return _json(agent.files.delete(_path(request), _flag(request, "recursive")))

    return [
        Route("/v1/backups", backup_list, methods=["GET"]),
        Route("/v1/backups", backup_run, methods=["POST"]),
        Route("/v1/backups/prune", backup_prune, methods=["POST"]),
        Route("/v1/backups/{id}", backup_download, methods=["GET"]),
        Route("/v1/backups/{id}/restore", backup_restore, methods=["POST"]),
        Route("/v1/files", files_get, methods=["GET"]),
        Route("/v1/files", files_put, methods=["PUT"]),
        Route("/v1/files", files_delete, methods=["DELETE"]),
    ]


async def _has_body(request: Request) -> bool:
    declared = request.headers.get("content-length")
    if declared is not None:
        return declared != "0"
    return request.headers.get("transfer-encoding", "") == "chunked"


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


def _path(request: Request) -> str:
    path = request.query_params.get("path")
    if path is None:
        raise Invalid("query parameter `path` is required", path="path")
    return path
