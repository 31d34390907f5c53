"""The runtime routes of the agent's API (docs/agent-api.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agentd.models import RuntimeInstall, RuntimeList

if TYPE_CHECKING:
    from agentd.agent import Agent


def routes(agent: Agent, limit: int) -> list[Route]:
    """The routes; nothing of `agent` is used before a request comes."""
    import asyncio

    from agentd.api import _body, _json

    async def runtime_list(request: Request) -> Response:
        return _json(RuntimeList(runtimes=await asyncio.to_thread(agent.runtimes.installed)))

    async def runtime_install(request: Request) -> Response:
        body = await _body(request, RuntimeInstall, limit)
        return _json(await agent.runtimes.install(body))

    async def runtime_activate(request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params["version"]
        return _json(await asyncio.to_thread(agent.runtimes.activate, name, version))

    async def runtime_rollback(request: Request) -> Response:
        name = request.path_params["name"]
        return _json(await asyncio.to_thread(agent.runtimes.rollback, name))

    async def runtime_remove(request: Request) -> Response:
        name, version = request.path_params["name"], request.path_params["version"]
        force = request.query_params.get("force", "false").lower() in ("1", "true", "yes")
        return _json(await asyncio.to_thread(agent.runtimes.remove, name, version, force))

    return [
        Route("/v1/runtimes", runtime_list, methods=["GET"]),
        Route("/v1/runtimes", runtime_install, methods=["POST"]),
        Route("/v1/runtimes/{name}/rollback", runtime_rollback, methods=["POST"]),
        Route("/v1/runtimes/{name}/{version}/activate", runtime_activate, methods=["POST"]),
        Route("/v1/runtimes/{name}/{version}", runtime_remove, methods=["DELETE"]),
    ]
