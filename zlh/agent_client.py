"""The one client of the agent's HTTP API (docs/agent-api.md).

Wraps httpx. Every transport failure becomes AgentUnreachableError naming the address,
every error answer becomes AgentRequestError carrying the agent's message. The bearer
token lives only in the request headers: it is never part of a message, a repr or a log.
"""

from __future__ import annotations

import functools
import json
import logging
import ssl
from collections.abc import Iterator
from typing import Any

import httpx

from agentd.models import (
    ActionResult,
    ConsoleGap,
    ConsoleLine,
    Provisioning,
    RuntimeInfo,
    RuntimeInstall,
    RuntimeList,
    ServerSpec,
    Status,
)
from zlh.errors import AgentRequestError, AgentUnreachableError

log = logging.getLogger(__name__)

ConsoleRecord = ConsoleLine | ConsoleGap
ACTIONS = ("start", "stop", "restart", "kill")
# A stop waits for the game's own shutdown (grace + term_grace in its StopSpec).
ACTION_TIMEOUT = 120.0
# An install downloads, extracts and verifies a runtime of up to a few hundred MB.
INSTALL_TIMEOUT = 600.0
# A backup or restore of a big world, or a big upload, takes a while.
LONG_TIMEOUT = 3600.0


class AgentClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=transport,
            verify=_tls_context(),
        )

    def __repr__(self) -> str:
        return f"AgentClient({self.base_url!r})"

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- routes -----------------------------------------------------------------------

    def health(self) -> bool:
        """True when /healthz answers; needs no token."""
        # Whatever holds the port answers /healthz; it must not be handed the token.
        answer = self._request("GET", "/healthz", headers={"Authorization": ""})
        return bool(answer.json().get("ok"))

    def status(self) -> Status:
        return Status.model_validate(self._request("GET", "/v1/status").json())

    def get_spec(self) -> ServerSpec:
        return ServerSpec.model_validate(self._request("GET", "/v1/spec").json())

    def put_spec(self, spec: ServerSpec, timeout: float = ACTION_TIMEOUT) -> ServerSpec:
        body = spec.model_dump(mode="json", exclude_none=True)
        answer = self._request("PUT", "/v1/spec", json=body, timeout=timeout)
        return ServerSpec.model_validate(answer.json())

    def get_provisioning(self) -> Provisioning:
        return Provisioning.model_validate(self._request("GET", "/v1/provisioning").json())

    def set_provisioning(self, provisioning: Provisioning) -> Provisioning:
        body = provisioning.model_dump(mode="json")
        answer = self._request("PUT", "/v1/provisioning", json=body)
        return Provisioning.model_validate(answer.json())

    def action(self, name: str, action: str, timeout: float = ACTION_TIMEOUT) -> ActionResult:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        answer = self._request("POST", f"/v1/processes/{name}/{action}", timeout=timeout)
        return ActionResult.model_validate(answer.json())

    def console(self, name: str, after: int = -1, limit: int = 1000) -> list[ConsoleRecord]:
        params = {"after": after, "limit": limit}
        answer = self._request("GET", f"/v1/processes/{name}/console", params=params)
        return [_record(line) for line in answer.text.splitlines() if line.strip()]

    def follow(self, name: str, after: int = -1) -> Iterator[ConsoleRecord]:
        """Stream console records as they come; ends when the agent closes the stream."""
        params: dict[str, str | int] = {"after": after, "follow": "true"}
        url = f"/v1/processes/{name}/console"
        timeout = httpx.Timeout(self._http.timeout.connect, read=None)
        try:
            with self._http.stream("GET", url, params=params, timeout=timeout) as answer:
                if answer.is_error:
                    answer.read()
                    raise _request_error(answer)
                for line in answer.iter_lines():
                    if line.strip():
                        yield _record(line)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def send(self, name: str, line: str) -> int:
        """Send one console line; returns the console's last sequence number."""
        answer = self._request("POST", f"/v1/processes/{name}/console", json={"line": line})
        return int(answer.json().get("seq", -1))

    # -- backups and files (agentd/backup_models.py) ----------------------------------

    def backups(self) -> Any:
        from agentd.backup_models import BackupList

        return BackupList.model_validate(self._request("GET", "/v1/backups").json())

    def backup(self, prune: Any = None) -> Any:
        from agentd.backup_models import BackupOutcome

        body = {"prune": prune.model_dump()} if prune is not None else {}
        answer = self._request("POST", "/v1/backups", json=body, timeout=LONG_TIMEOUT)
        return BackupOutcome.model_validate(answer.json())

    def restore(self, backup_id: str, timeout: float | None = None) -> Any:
        from agentd.backup_models import RestoreResult

        answer = self._request("POST", f"/v1/backups/{backup_id}/restore",
                               json={"timeout": timeout}, timeout=LONG_TIMEOUT)
        return RestoreResult.model_validate(answer.json())

    def prune(self, request: Any) -> Any:
        from agentd.backup_models import PruneResult

        answer = self._request("POST", "/v1/backups/prune", json=request.model_dump())
        return PruneResult.model_validate(answer.json())

    def stream(self, method: str, url: str, **kwargs: Any) -> Any:
        """A streamed answer (a context manager); error answers raise as usual."""
        return _Streamed(self, method, url, kwargs)

    def files_put(self, path: str, content: Any) -> Any:
        from agentd.backup_models import FileInfo

        answer = self._request("PUT", "/v1/files", params={"path": path}, content=content,
                               timeout=LONG_TIMEOUT)
        return FileInfo.model_validate(answer.json())

    def files_list(self, path: str) -> Any:
        """A folder's FileListing, or a file's FileInfo with its sha256 (not its bytes)."""
        from agentd.backup_models import FileInfo, FileListing

        data = self._request("GET", "/v1/files", params={"path": path, "info": "true"}).json()
        return FileListing.model_validate(data) if "entries" in data \
            else FileInfo.model_validate(data)

    def files_delete(self, path: str, recursive: bool = False) -> Any:
        from agentd.backup_models import FileInfo

        params = {"path": path, "recursive": str(recursive).lower()}
        return FileInfo.model_validate(self._request("DELETE", "/v1/files", params=params).json())

    def runtimes(self) -> list[RuntimeInfo]:
        return RuntimeList.model_validate(self._request("GET", "/v1/runtimes").json()).runtimes

    def install_runtime(self, body: RuntimeInstall, timeout: float = INSTALL_TIMEOUT
                        ) -> RuntimeInfo:
        answer = self._request("POST", "/v1/runtimes", json=body.model_dump(mode="json"),
                               timeout=timeout)
        return RuntimeInfo.model_validate(answer.json())

    def activate_runtime(self, name: str, version: str) -> RuntimeInfo:
        answer = self._request("POST", f"/v1/runtimes/{name}/{version}/activate")
        return RuntimeInfo.model_validate(answer.json())

    def rollback_runtime(self, name: str) -> RuntimeInfo:
        answer = self._request("POST", f"/v1/runtimes/{name}/rollback")
        return RuntimeInfo.model_validate(answer.json())

    def remove_runtime(self, name: str, version: str, force: bool = False) -> RuntimeInfo:
        params = {"force": "true"} if force else {}
        answer = self._request("DELETE", f"/v1/runtimes/{name}/{version}", params=params,
                               timeout=ACTION_TIMEOUT)
        return RuntimeInfo.model_validate(answer.json())

    # -- plumbing ---------------------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            answer = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if answer.is_error:
            raise _request_error(answer)
        return answer

    def _unreachable(self, exc: httpx.TransportError) -> AgentUnreachableError:
        if isinstance(exc, httpx.TimeoutException):
            reason = "timed out"
        elif isinstance(exc, httpx.ConnectError):
            reason = "connection refused"
        else:
            reason = type(exc).__name__
        log.debug("agent %s unreachable: %r", self.base_url, exc)
        return AgentUnreachableError(f"agent at {self.base_url} does not answer ({reason})")


class _Streamed:
    def __init__(self, client: AgentClient, method: str, url: str, kwargs: Any) -> None:
        self._client, self._args, self._kwargs = client, (method, url), kwargs
        self._context: Any = None

    def __enter__(self) -> httpx.Response:
        timeout = httpx.Timeout(10.0, read=LONG_TIMEOUT)
        self._context = self._client._http.stream(*self._args, timeout=timeout, **self._kwargs)
        try:
            answer = self._context.__enter__()
        except httpx.TransportError as exc:
            raise self._client._unreachable(exc) from exc
        if answer.is_error:
            answer.read()
            self._context.__exit__(None, None, None)
            raise _request_error(answer)
        return answer  # type: ignore[no-any-return]  # httpx's stream context

    def __exit__(self, *exc: object) -> None:
        self._context.__exit__(*exc)


def prepare() -> None:
    """Build what every client shares, once, before clients are made in threads.

    Imports and the TLS context done by 32 threads at once contend on the import lock and
    the GIL: `zlh status` over 50 servers took 1.0 s instead of 0.15 s without this.
    """
    _tls_context()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Building a context with the CA bundle costs ~20 ms; `zlh status` makes one client
    # per server, so they share one.
    return httpx.create_ssl_context()


def _record(line: str | bytes) -> ConsoleRecord:
    data = json.loads(line)
    if "lost" in data:
        return ConsoleGap.model_validate(data)
    return ConsoleLine.model_validate(data)


def _request_error(answer: httpx.Response) -> AgentRequestError:
    try:
        detail = answer.json()["error"]
        code, message = str(detail["code"]), str(detail["message"])
        if detail.get("path"):
            message = f"{detail['path']}: {message}"
    except (ValueError, KeyError, TypeError):
        code, message = "http", answer.reason_phrase or "unexpected answer"
    return AgentRequestError(
        f"agent: {message} (HTTP {answer.status_code})", status=answer.status_code, code=code
    )
