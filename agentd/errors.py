"""Errors of the agent, each mapped to an HTTP status and a stable code.

    AgentError                500 internal
    +-- ConfigFileError       (start-up only: bad config or token file; exit 2)
    +-- Unauthorized          401 unauthorized
    +-- NotFound              404 not-found
    +-- Conflict              409 conflict
    +-- TooLarge              413 too-large
    +-- TooMany               429 too-many
    +-- Invalid               422 invalid
    +-- Corrupt               422 corrupt        a backup archive fails its checks
    +-- OperationFailed       500 failed         a backup or restore ran and failed
"""

from __future__ import annotations


class AgentError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


class ConfigFileError(AgentError):
    code = "config"


class Unauthorized(AgentError):
    status = 401
    code = "unauthorized"


class NotFound(AgentError):
    status = 404
    code = "not-found"


class Conflict(AgentError):
    status = 409
    code = "conflict"


class TooMany(AgentError):
    status = 429
    code = "too-many"


class TooLarge(AgentError):
    status = 413
    code = "too-large"


class Invalid(AgentError):
    status = 422
    code = "invalid"


class Corrupt(AgentError):
    status = 422
    code = "corrupt"


class OperationFailed(AgentError):
    status = 500
    code = "failed"


def describe(exc: BaseException) -> str:
    """An error as one short phrase for a message: `no space left on device (PATH)`."""
    if isinstance(exc, AgentError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror.lower()}{where}"
    return f"{type(exc).__name__}: {exc}"
