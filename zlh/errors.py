"""Errors and exit codes of the zlh CLI.

Every expected failure is a ZlhError; the CLI's one top-level handler prints it as a
single line `zlh: error: ...` on stderr and exits with its code.

    ZlhError                      exit 1   anything expected that has no better code
    +-- UsageError                exit 2   bad arguments, unknown --set key, wrong type
    +-- ConfigError               exit 3   malformed YAML, playbook or catalog schema errors
    +-- NotFoundError             exit 4   unknown server, playbook, process, backup
    +-- ConflictError             exit 5   name clash, port taken, operation already running
    +-- AgentUnreachableError     exit 6   the agent does not answer (timeout, refused)
    +-- AgentRequestError         exit 7   the agent answered with an error (4 for its 404,
                                           5 for its 409: unknown, or not in that state;
                                           10 for a hash or size check that failed there)
    +-- ProvisionError            exit 8   a provisioning step failed (it is recorded)
    +-- CheckFailedError          exit 9   `zlh check` found a failing check
    +-- IntegrityError            exit 10  a hash or size does not match
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    CONFIG = 3
    NOT_FOUND = 4
    CONFLICT = 5
    AGENT_UNREACHABLE = 6
    AGENT_ERROR = 7
    PROVISION_FAILED = 8
    CHECK_FAILED = 9
    INTEGRITY = 10
    INTERRUPTED = 130


class ZlhError(Exception):
    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(ZlhError):
    exit_code = ExitCode.USAGE


class ConfigError(ZlhError):
    exit_code = ExitCode.CONFIG


class NotFoundError(ZlhError):
    exit_code = ExitCode.NOT_FOUND


class ConflictError(ZlhError):
    exit_code = ExitCode.CONFLICT


class AgentUnreachableError(ZlhError):
    exit_code = ExitCode.AGENT_UNREACHABLE


class AgentRequestError(ZlhError):
    exit_code = ExitCode.AGENT_ERROR

    def __init__(self, message: str, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        if code in _AGENT_CODE_EXITS:
            self.exit_code = _AGENT_CODE_EXITS[code]
        elif status in _AGENT_STATUS_EXITS:
            self.exit_code = _AGENT_STATUS_EXITS[status]


# What the agent's own answer already says, kept in the exit code: a cron job or a script can
# tell "no such thing" and "not now" from a failed request.
_AGENT_STATUS_EXITS = {404: ExitCode.NOT_FOUND, 409: ExitCode.CONFLICT}
# A download or an archive that fails its hash or size check, on either side, is exit 10.
_AGENT_CODE_EXITS = {"integrity": ExitCode.INTEGRITY, "corrupt": ExitCode.INTEGRITY}


class ProvisionError(ZlhError):
    exit_code = ExitCode.PROVISION_FAILED


class CheckFailedError(ZlhError):
    exit_code = ExitCode.CHECK_FAILED


class IntegrityError(ZlhError):
    exit_code = ExitCode.INTEGRITY
