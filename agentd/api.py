"""The agent's HTTP API (see docs/agent-api.md): routes, bearer auth, errors as JSON."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator
from json.encoder import encode_basestring_ascii as _string  # type: ignore[attr-defined]
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from agentd.agent import Agent
from agentd.api_backups import routes as backup_routes
from agentd.api_runtimes import routes as runtime_routes
from agentd.errors import AgentError, Invalid, NotFound, TooLarge, TooMany
from agentd.logs import fields
from agentd.models import ConsoleInput, ErrorBody, ErrorDetail, Provisioning, ServerSpec

log = logging.getLogger(__name__)

JSON = "application/json"
NDJSON = "application/x-ndjson"
ACTIONS = ("start", "stop", "restart", "kill")


def _json(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(by_alias=True), status, media_type=JSON)


def error_response(status: int, code: str, message: str, path: str | None = None) -> Response:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, path=path))
    return _json(body, status)


class BearerAuth:
    """Every path but /healthz needs the token; compared in constant time."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        given = b""
        for key, value in scope["headers"]:
            if key == b"authorization":
                given = value
                break
        if not hmac.compare_digest(given, self._expected):
            log.warning("api_error", extra=fields(status=401, path=scope["path"],
                                                  code="unauthorized"))
            response = error_response(401, "unauthorized", "missing or wrong bearer token")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _body(request: Request, model: type[BaseModel], limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body over {limit} bytes")
        chunks.append(chunk)
    try:
        return model.model_validate_json(b"".join(chunks))
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(part) for part in first["loc"]) or None
        where = f"{path}: " if path else ""
        raise Invalid(f"{where}{first['msg']}", path=path) from None


def create_app(agent: Agent, token: str) -> ASGIApp:
    limit = agent.config.max_body_bytes

    async def healthz(request: Request) -> Response:
        return Response(b'{"ok":true}', media_type=JSON)

    async def status(request: Request) -> Response:
        return _json(agent.status())

    async def get_spec(request: Request) -> Response:
        return _json(agent.spec)

    async def put_spec(request: Request) -> Response:
        spec = await _body(request, ServerSpec, limit)
        return _json(await agent.apply_spec(spec))

    async def get_provisioning(request: Request) -> Response:
        return _json(agent.provisioning)

    async def put_provisioning(request: Request) -> Response:
        value = await _body(request, Provisioning, limit)
        return _json(agent.set_provisioning(value))

    async def action(request: Request) -> Response:
        name, verb = request.path_params["name"], request.path_params["action"]
        sup = agent.supervisor(name)
        if verb not in ACTIONS:
            raise NotFound(f"unknown action {verb!r}; one of {', '.join(ACTIONS)}")
        agent.backups.check_power(verb)
        await getattr(sup, verb)()
        result = {"name": name, "action": verb, "state": sup.state, "pid": sup.pid}
        return Response(json.dumps(result), media_type=JSON)

    async def process_detail(request: Request) -> Response:
        return _json(agent.supervisor(request.path_params["name"]).detail())

    async def console_read(request: Request) -> Response:
        console = agent.supervisor(request.path_params["name"]).console
        after = _int_param(request, "after", -1)
        limit_lines = _int_param(request, "limit", 1000)
        if request.query_params.get("follow", "false").lower() in ("1", "true", "yes"):
            if followers.get(console.name, 0) >= agent.config.max_followers:
                raise TooMany(f"{agent.config.max_followers} followers already read this "
                              "console; try again later")
            return StreamingResponse(_counted(console.name, console.follow_batches(after)),
                                     media_type=NDJSON)
        records = console.records(after, max(1, min(limit_lines, 100_000)))
        return Response(encode_records(records), media_type=NDJSON)

    followers: dict[str, int] = {}

    async def _counted(name: str, batches: AsyncIterator[list[Any]]) -> AsyncIterator[bytes]:
        followers[name] = followers.get(name, 0) + 1
        try:
            async for chunk in _ndjson(batches):
                yield chunk
        finally:
            followers[name] -= 1

    async def console_write(request: Request) -> Response:
        sup = agent.supervisor(request.path_params["name"])
        line = await _body(request, ConsoleInput, limit)
        sup.send(line.line)
        return Response(json.dumps({"ok": True, "seq": sup.console.last_seq}), media_type=JSON)

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/v1/spec", get_spec, methods=["GET"]),
        Route("/v1/spec", put_spec, methods=["PUT"]),
        Route("/v1/provisioning", get_provisioning, methods=["GET"]),
        Route("/v1/provisioning", put_provisioning, methods=["PUT"]),
        Route("/v1/processes/{name}", process_detail, methods=["GET"]),
        Route("/v1/processes/{name}/console", console_read, methods=["GET"]),
        Route("/v1/processes/{name}/console", console_write, methods=["POST"]),
        Route("/v1/processes/{name}/{action:str}", action, methods=["POST"]),
        *backup_routes(agent, limit),
        *runtime_routes(agent, limit),
    ]
    app = Starlette(routes=routes, exception_handlers=_handlers())
    return BearerAuth(app, token)


def _int_param(request: Request, key: str, default: int) -> int:
    raw = request.query_params.get(key)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise Invalid(f"{key}: expected an integer, got {raw!r}", path=key) from None


def encode_records(records: list[Any]) -> bytes:
    """NDJSON for console records (plain tuples), without a model per line: a flood is
    streamed at hundreds of thousands of lines a second. The lines of one read share their
    timestamp, so its repr (half the cost of a line) is made once per run of them."""
    parts = []
    ts, stamp = None, ""
    for rec in records:
        if len(rec) == 3:
            if rec[1] != ts:
                ts, stamp = rec[1], repr(rec[1])
            parts.append(f'{{"seq":{rec[0]:d},"ts":{stamp},"text":{_string(rec[2])}}}\n')
        else:
            parts.append(f'{{"seq":{rec[0]:d},"lost":{rec[1]:d}}}\n')
    return "".join(parts).encode()


async def _ndjson(batches: AsyncIterator[list[Any]]) -> AsyncIterator[bytes]:
    async for batch in batches:
        yield encode_records(batch)


def _handlers() -> dict[Any, Any]:
    from starlette.exceptions import HTTPException

    async def agent_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AgentError)
        log.warning("api_error", extra=fields(status=exc.status, code=exc.code,
                                              path=request.url.path, message=exc.message))
        return error_response(exc.status, exc.code, exc.message, exc.path)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http")
        log.warning("api_error", extra=fields(status=exc.status_code, code=code,
                                              path=request.url.path))
        return error_response(exc.status_code, code, str(exc.detail))

    async def internal(request: Request, exc: Exception) -> Response:
        log.error("api_error", exc_info=exc, extra=fields(status=500, path=request.url.path))
        return error_response(500, "internal", "internal error; see the agent log")

    return {AgentError: agent_error, HTTPException: http_error, Exception: internal}
