"""The agent's API contract: request and response models.

`zlh` imports this module to talk to the agent; it must stay free of anything that
needs the agent's runtime (no starlette, no psutil).
"""

from __future__ import annotations

import re
import signal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
STATES = ("stopped", "starting", "running", "stopping", "backoff", "fatal")
ProcessState = Literal["stopped", "starting", "running", "stopping", "backoff", "fatal"]
CrashClass = Literal[
    "exit-code", "signal", "oom-killed", "startup-timeout", "hung", "spawn-failed"
]


class Out(BaseModel):
    """A response model. Its validator is built on first use (`defer_build`): models that a
    request never touches (backups, runtimes) cost the idle agent no memory."""

    model_config = ConfigDict(defer_build=True)


class Model(Out):
    """A request or spec model: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", defer_build=True)


def _check_signal(name: str) -> str:
    if not name.startswith("SIG") or not hasattr(signal.Signals, name):
        raise ValueError(f"unknown signal {name!r}")
    return name


# -- probes ----------------------------------------------------------------------------


class ProbeBase(Model):
    interval: float = Field(1.0, gt=0, le=3600, description="seconds between attempts")
    timeout: float = Field(2.0, gt=0, le=600, description="seconds per attempt")
    failure_threshold: int = Field(
        3, ge=1, le=100, description="liveness: consecutive failures that mean hung"
    )


class LogProbe(ProbeBase):
    type: Literal["log"]
    pattern: str = Field(description="regex searched in ANSI-stripped console lines")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regex: {exc}") from None
        return value


class TcpProbe(ProbeBase):
    type: Literal["tcp"]
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)


class HttpProbe(ProbeBase):
    type: Literal["http"]
    url: str = Field(pattern=r"^https?://")
    expect_status: int = Field(200, ge=100, le=599)


class MinecraftProbe(ProbeBase):
    type: Literal["minecraft"]
    host: str = "127.0.0.1"
    port: int = Field(25565, ge=1, le=65535)


Probe = Annotated[
    LogProbe | TcpProbe | HttpProbe | MinecraftProbe, Field(discriminator="type")
]


# -- process spec ----------------------------------------------------------------------


class StopSpec(Model):
    command: str | None = Field(None, description="console line that asks for a clean stop")
    signal: str = Field("SIGTERM", description="signal sent when there is no command")
    grace: float = Field(30.0, ge=0, le=3600, description="wait after command/signal")
    term_grace: float = Field(10.0, ge=0, le=600, description="wait after SIGTERM")

    @field_validator("signal")
    @classmethod
    def _known_signal(cls, value: str) -> str:
        return _check_signal(value)


class RestartSpec(Model):
    policy: Literal["on-failure", "always", "never"] = "on-failure"
    backoff_initial: float = Field(1.0, ge=0, le=3600)
    backoff_max: float = Field(60.0, ge=0, le=86400)
    backoff_jitter: float = Field(0.1, ge=0, le=1, description="fraction of the delay")
    stable_after: float = Field(60.0, ge=0, description="ready seconds that reset backoff")
    max_failures: int = Field(5, ge=1, le=1000, description="failures in window -> fatal")
    failure_window: float = Field(300.0, gt=0)
    clean_exit_codes: list[int] = Field(default_factory=lambda: [0])
    clean_exit_is_crash: bool = Field(
        False, description="treat a clean exit (e.g. after in-game stop) as a crash"
    )


class ProcessSpec(Model):
    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["game", "ide", "service"] = "game"
    argv: list[str] = Field(min_length=1)
    cwd: str | None = Field(None, description="relative to the server root, or absolute")
    env: dict[str, str] = Field(default_factory=dict)
    env_files: dict[str, str] = Field(
        default_factory=dict,
        description="VAR -> file relative to the container root, read at each spawn: "
                    "secrets stay out of the spec, its API answers and the logs",
    )
    user: str | None = None
    autostart: bool = True
    startup_timeout: float = Field(120.0, gt=0, le=3600)
    stop: StopSpec = Field(default_factory=StopSpec)
    restart: RestartSpec = Field(default_factory=RestartSpec)
    readiness: Probe | None = None
    liveness: Probe | None = None
    port: int | None = Field(None, ge=1, le=65535, description="public game port")
    memory_limit_mb: int | None = Field(
        None, ge=16, description="memory cgroup limit, where the machine allows one"
    )

    @field_validator("argv")
    @classmethod
    def _no_empty_program(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise ValueError("argv[0] must not be empty")
        return value

    @field_validator("env_files")
    @classmethod
    def _files_inside_root(cls, value: dict[str, str]) -> dict[str, str]:
        for var, path in value.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):
                raise ValueError(f"{var!r} is not an environment variable name")
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise ValueError(f"{var}: {path!r} must be relative to the container root")
        return value


class BackupStep(Model):
    """A quiesce step: a console line to send, or a console regex to wait for."""

    send: str | None = Field(None, min_length=1, max_length=4096)
    wait_for: str | None = Field(None, min_length=1)
    timeout: float = Field(60.0, gt=0, le=3600, description="wait_for: seconds")


class BackupSpec(Model):
    """The backup policy: what to archive and how to quiesce the process around it."""

    process: str | None = Field(None, pattern=NAME_PATTERN, description="to quiesce")
    paths: list[str] = Field(min_length=1, description="relative to the server root")
    exclude: list[str] = Field(default_factory=list, description="gitignore-style")
    quiesce: list[BackupStep] = Field(default_factory=list)
    resume: list[str] = Field(default_factory=list, description="console lines")


class ServerSpec(Model):
    """What `PUT /v1/spec` carries: the desired server."""

    playbook: str | None = None
    processes: list[ProcessSpec] = Field(default_factory=list, max_length=32)
    disk_limit_bytes: int | None = Field(
        None, ge=1, description="the tier's disk: the agent warns at 90% of it"
    )
    backup: BackupSpec | None = None

    @field_validator("processes")
    @classmethod
    def _unique_names(cls, value: list[ProcessSpec]) -> list[ProcessSpec]:
        names = [p.name for p in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate process names: {', '.join(dupes)}")
        return value


# -- status ----------------------------------------------------------------------------


class CrashRecord(Out):
    time: float
    crash_class: CrashClass = Field(alias="class", serialization_alias="class")
    exit_code: int | None = None
    signal: str | None = None
    uptime: float
    inferred: bool = False
    detail: str = ""
    last_lines: list[str] = Field(default_factory=list)

    model_config = ConfigDict(populate_by_name=True, defer_build=True)


class ProcessStatus(Out):
    name: str
    kind: str
    state: ProcessState
    ready: bool
    pid: int | None
    started_at: float | None
    uptime: float | None
    restarts: int
    backoff_until: float | None = None
    last_exit_code: int | None = None
    last_crash: CrashRecord | None = None
    port: int | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = None


class ProcessDetail(ProcessStatus):
    """`GET /v1/processes/{name}`: the status plus the crash history and the spec."""

    crashes: list[CrashRecord] = Field(default_factory=list, description="oldest first")
    console_log_error: str | None = None
    spec: ProcessSpec


class Provisioning(Model):
    state: Literal["pending", "running", "complete", "failed"] = "pending"
    step: str | None = None
    error: str | None = None


class Resources(Out):
    cpu_percent: float
    memory_rss_bytes: int
    memory_total_bytes: int
    memory_available_bytes: int
    sampled_at: float


class Disk(Out):
    path: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    tree_bytes: int | None = Field(None, description="what the container holds")
    limit_bytes: int | None = Field(None, description="the spec's disk_limit_bytes")
    warning: str | None = Field(None, description="set from 90% of the limit on")


class AgentInfo(Out):
    version: str
    pid: int
    uptime: float
    user: str
    in_container: bool = Field(
        False, description="false: the agent runs as the invoking user on this machine")
    rss_bytes: int


class RuntimeInstall(Model):
    """`POST /v1/runtimes`: one artifact of a catalog entry, with an absolute URL."""

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")
    version: str = Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
    url: str = Field(pattern=r"^https?://")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1)
    format: Literal["tar.zst", "tar.gz", "tar.xz", "tar", "zip"]
    path: list[str] = Field(default_factory=list, description="folders to put on PATH")
    verify: str | None = Field(None, description="command run in the runtime folder")
    activate: bool = Field(True, description="switch NAME/current to it once installed")
    timeout: float = Field(default=30.0, gt=0, le=3600, description="seconds without data")
    deadline: float | None = Field(
        None, gt=0, le=86400,
        description="seconds for the whole download; default a minute plus a second per MiB")

    @field_validator("path")
    @classmethod
    def _inside(cls, value: list[str]) -> list[str]:
        for folder in value:
            parts = folder.split("/")
            if not folder or folder.startswith("/") or ".." in parts or ":" in folder:
                raise ValueError(f"{folder!r} must be a relative folder inside the runtime")
        return value


class RuntimeInfo(Out):
    name: str
    version: str
    active: bool
    sha256: str
    size: int
    url: str
    path: list[str]
    installed_at: float


class RuntimeList(Out):
    runtimes: list[RuntimeInfo]


class Status(Out):
    agent: AgentInfo
    provisioning: Provisioning
    processes: list[ProcessStatus]
    runtimes: list[RuntimeInfo] = Field(default_factory=list)
    resources: Resources | None
    disk: Disk | None


# -- requests and records --------------------------------------------------------------


class ConsoleInput(Model):
    line: str = Field(max_length=4096)

    @field_validator("line")
    @classmethod
    def _single_line(cls, value: str) -> str:
        if "\n" in value or "\r" in value:
            raise ValueError("must be a single line")
        # Ctrl-C, Ctrl-\\ or Ctrl-D would reach the server as a signal or an end of input.
        bad = sorted({f"0x{ord(c):02x}" for c in value if ord(c) < 32 and c != "\t"}
                     | {f"0x{ord(c):02x}" for c in value if ord(c) == 127})
        if bad:
            raise ValueError(f"control characters are not allowed ({', '.join(bad)})")
        return value


class ConsoleLine(Out):
    seq: int
    ts: float
    text: str


class ConsoleGap(Out):
    seq: int = Field(description="first missing sequence number")
    lost: int = Field(description="how many lines are gone")


class ActionResult(Out):
    name: str
    action: str
    state: ProcessState
    pid: int | None


class ErrorDetail(Out):
    code: str
    message: str
    path: str | None = None


class ErrorBody(Out):
    error: ErrorDetail
