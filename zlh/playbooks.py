"""Playbooks: the YAML description of a server kind, and its rendering into a ServerSpec.

A playbook names its resources per tier, runtimes, artifacts, variables (`--set`), ports,
config files and processes. `render()` fills the templates with the variables, the ports
the provisioner allocated (`${port_game}`), the server root (`${root}`) and the bind
address (`${host}`: the server's address as zlh reports it, 127.0.0.1 on the local
provider, the container's own address on Proxmox; tcp and minecraft probes use it too),
and returns the files to write and the agent's `ServerSpec`.

Templates use `string.Template`: `${name}` (or `$name`) is replaced, `$$` is a `$`.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from agentd.models import (
    NAME_PATTERN,
    BackupSpec,
    BackupStep,
    HttpProbe,
    LogProbe,
    MinecraftProbe,
    ProbeBase,
    ProcessSpec,
    RestartSpec,
    ServerSpec,
    StopSpec,
    TcpProbe,
)
from zlh.errors import ConfigError, NotFoundError, UsageError
from zlh.yamlfile import Loc, Problem, dotted, read_yaml, validate

HOST = "127.0.0.1"
BUILTIN_NAMES = ("root", "host")
IDENTIFIER = r"^[a-z][a-z0-9_]{0,30}$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
SHA256 = re.compile(r"[0-9a-f]{64}")
EXACT_VERSION = re.compile(r"\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _version_text(value: Any) -> Any:
    # YAML reads `version: 21` as a number; `1.10` would silently become 1.1.
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        raise ValueError(f"write the version in quotes: {value!r} is read as a number")
    return value


Version = Annotated[
    str,
    BeforeValidator(_version_text),
    Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$"),
]
Identifier = Annotated[str, Field(pattern=IDENTIFIER)]


def _relative_path(value: str, *, allow_dir: bool = False) -> str:
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or str(path) == ".":
        raise ValueError("must be a relative path inside the server root, without '..'")
    if value.endswith("/") and not allow_dir:
        raise ValueError("must name a file, not a folder")
    return value


# -- resources and runtimes ------------------------------------------------------------


class Resources(Model):
    cores: int = Field(ge=1, le=256)
    memory_mb: int = Field(ge=64, le=4 * 1024 * 1024)
    swap_mb: int = Field(0, ge=0, le=4 * 1024 * 1024)
    disk_gb: int = Field(ge=1, le=64 * 1024)


class Runtime(Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")
    version: Version
    source: Literal["system", "catalog"] = Field(
        "system", description="catalog: installed by the agent from catalogs/, hash-checked")


# -- artifacts -------------------------------------------------------------------------


class PinnedArtifact(Model):
    """An artifact fetched from elsewhere: it has a sha256, or says it is unpinned."""

    name: str = Field(pattern=NAME_PATTERN)
    sha256: str | None = None
    unpinned: bool = False

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not SHA256.fullmatch(value):
            raise ValueError("sha256 must be 64 lowercase hex characters")
        return value

    @model_validator(mode="after")
    def _pinned_or_said_so(self) -> PinnedArtifact:
        if self.sha256 is None and not self.unpinned:
            raise ValueError("needs a sha256, or `unpinned: true` to accept any content")
        if self.sha256 is not None and self.unpinned:
            raise ValueError("has a sha256 and `unpinned: true`: keep one")
        return self


class NpmArtifact(PinnedArtifact):
    source: Literal["npm"]
    package: str = Field(pattern=r"^(@[a-z0-9][a-z0-9._-]*/)?[a-z0-9][a-z0-9._-]*$")
    version: Version

    @model_validator(mode="after")
    def _exact_when_pinned(self) -> NpmArtifact:
        # A hash fits one tarball; a range or a tag would pick another one some day.
        if self.sha256 is not None and not EXACT_VERSION.fullmatch(self.version):
            raise ValueError(f"version {self.version!r} must be exact (x.y.z) with a sha256")
        return self


class UrlArtifact(PinnedArtifact):
    source: Literal["url"]
    url: str = Field(description="relative to the artifact server")
    size: int | None = Field(None, ge=1)
    dest: str | None = Field(None, description="where it goes, relative to the server root")

    @field_validator("url")
    @classmethod
    def _relative_url(cls, value: str) -> str:
        if "://" in value or value.startswith("/") or ".." in value.split("/") or not value:
            raise ValueError("must be relative to the artifact server (no scheme, no '/', "
                             "no '..')")
        return value

    @field_validator("dest")
    @classmethod
    def _dest_inside_root(cls, value: str | None) -> str | None:
        return None if value is None else _relative_path(value)


class SystemArtifact(Model):
    """A file the container's OS provides (a Debian package), checked before use."""

    source: Literal["system"]
    name: str = Field(pattern=NAME_PATTERN)
    path: str
    apt: str = Field(pattern=r"^[a-z0-9][a-z0-9+.-]+$", description="Debian package")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not PurePosixPath(value).is_absolute():
            raise ValueError("must be an absolute path")
        return value


class CatalogArtifact(Model):
    """A server package of the catalogs (`servers:`), installed by the agent like a runtime."""

    source: Literal["catalog"]
    name: str = Field(pattern=NAME_PATTERN)
    version: Version


Artifact = Annotated[
    NpmArtifact | UrlArtifact | SystemArtifact | CatalogArtifact, Field(discriminator="source")
]


# -- variables, ports, files -----------------------------------------------------------


class Variable(Model):
    type: Literal["str", "int", "bool"] = "str"
    default: Any = Field(None, description="none: `--set` must give a value")
    description: str = ""
    pattern: str | None = Field(None, description="str: regex the whole value must match")
    min: int | None = Field(None, description="int: smallest value")
    max: int | None = Field(None, description="int: largest value")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regex: {exc}") from None
        return value

    @model_validator(mode="after")
    def _default_fits(self) -> Variable:
        if self.pattern is not None and self.type != "str":
            raise ValueError("pattern applies to type str only")
        if (self.min is not None or self.max is not None) and self.type != "int":
            raise ValueError("min and max apply to type int only")
        if self.default is not None:
            try:
                self.check(self.default)
            except ValueError as exc:
                raise ValueError(f"default: {exc}") from None
        return self

    def check(self, value: Any) -> str:
        """`value` (from YAML or `--set`) as the text put in templates; ValueError if bad."""
        if self.type == "int":
            return self._check_int(value)
        if self.type == "bool":
            return self._check_bool(value)
        if not isinstance(value, str):
            raise ValueError("expected a string (quote it)")
        if CONTROL_CHARS.search(value):
            raise ValueError("control characters (newlines, tabs) are not allowed")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise ValueError(f"must match {self.pattern}")
        return value

    def _check_int(self, value: Any) -> str:
        if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,18}", value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        if self.min is not None and value < self.min:
            raise ValueError(f"must be at least {self.min}")
        if self.max is not None and value > self.max:
            raise ValueError(f"must be at most {self.max}")
        return str(value)

    def _check_bool(self, value: Any) -> str:
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            value = value.strip().lower() in TRUE_WORDS
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return "true" if value else "false"


class Port(Model):
    protocol: Literal["tcp", "udp"] = "tcp"
    description: str = ""


class FileTemplate(Model):
    path: str = Field(description="relative to the server root")
    template: str

    @field_validator("path")
    @classmethod
    def _inside_root(cls, value: str) -> str:
        return _relative_path(value)


# -- processes -------------------------------------------------------------------------


class PortProbe(ProbeBase):
    """tcp and minecraft probes name a port of the playbook; default: the process's."""

    port: str | None = Field(None, pattern=IDENTIFIER)


class TcpProbeDef(PortProbe):
    type: Literal["tcp"]


class MinecraftProbeDef(PortProbe):
    type: Literal["minecraft"]


ProbeDef = Annotated[
    LogProbe | TcpProbeDef | HttpProbe | MinecraftProbeDef, Field(discriminator="type")
]


class ProcessDef(Model):
    """A process as agentd.models.ProcessSpec has it, with templates and a port name."""

    kind: Literal["game", "ide", "service"] = "game"
    argv: list[str] = Field(min_length=1)
    cwd: str | None = Field(None, description="default: the server root")
    env: dict[Annotated[str, Field(pattern=ENV_NAME)], str] = Field(default_factory=dict)
    user: str | None = None
    autostart: bool = True
    startup_timeout: float = Field(120.0, gt=0, le=3600)
    stop: StopSpec = Field(default_factory=StopSpec)
    restart: RestartSpec = Field(default_factory=RestartSpec)
    readiness: ProbeDef | None = None
    liveness: ProbeDef | None = None
    port: str | None = Field(None, pattern=IDENTIFIER, description="a name from `ports`")


# -- backup and dev --------------------------------------------------------------------


class QuiesceStep(Model):
    """Either a console line to send, or a console regex to wait for."""

    send: str | None = Field(None, min_length=1)
    wait_for: str | None = Field(None, min_length=1)
    timeout: float = Field(60.0, gt=0, le=3600, description="wait_for: seconds")

    @field_validator("wait_for")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regex: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_action(self) -> QuiesceStep:
        if (self.send is None) == (self.wait_for is None):
            raise ValueError("give exactly one of `send` or `wait_for`")
        return self


class Backup(Model):
    paths: list[str] = Field(min_length=1, description="relative to the server root")
    exclude: list[str] = Field(default_factory=list, description="gitignore-style")
    quiesce: list[QuiesceStep] = Field(default_factory=list)
    resume: list[str] = Field(default_factory=list, description="console lines")

    @field_validator("paths")
    @classmethod
    def _inside_root(cls, value: list[str]) -> list[str]:
        return [_relative_path(path, allow_dir=True) for path in value]


class Dev(Model):
    code_server: bool = False
    ssh: bool = False


# -- the playbook ----------------------------------------------------------------------


class Playbook(Model):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    kind: Literal["game", "dev"]
    tier: str
    resources: dict[Identifier, Resources] = Field(min_length=1)
    runtimes: list[Runtime] = Field(default_factory=list)
    artifacts: list[Artifact] = Field(default_factory=list)
    variables: dict[Identifier, Variable] = Field(default_factory=dict)
    ports: dict[Identifier, Port] = Field(default_factory=dict)
    files: list[FileTemplate] = Field(default_factory=list)
    processes: dict[Annotated[str, Field(pattern=NAME_PATTERN)], ProcessDef] = Field(
        default_factory=dict, max_length=32
    )
    backup: Backup | None = None
    dev: Dev | None = None

    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The file it was loaded from, if any."""
        return self._source

    def template_names(self) -> list[str]:
        """The names a template may use: variables, `port_NAME`, root and host."""
        names = [*self.variables, *(f"port_{port}" for port in self.ports), *BUILTIN_NAMES]
        return sorted(names)

    def problems(self) -> list[Problem]:
        """What the schema alone cannot see: names that must refer to each other."""
        return [
            *self._name_problems(),
            *self._process_problems(),
            *self._template_problems(),
        ]

    def _name_problems(self) -> Iterator[Problem]:
        if self.tier not in self.resources:
            yield Problem(("tier",), f"no such tier; known: {', '.join(self.resources)}")
        for name in self.variables:
            if name in BUILTIN_NAMES or name.startswith("port_"):
                yield Problem(("variables", name), "reserved name (root, host, port_*)")
        for field, items in (("artifacts", [a.name for a in self.artifacts]),
                             ("files", [f.path for f in self.files])):
            for index, item in enumerate(items):
                if item in items[:index]:
                    yield Problem((field, index), f"{item!r} appears twice")

    def _process_problems(self) -> Iterator[Problem]:
        if self.kind == "game" and not any(p.kind == "game" for p in self.processes.values()):
            yield Problem(("processes",), "a game playbook needs a process of kind game")
        if self.dev is not None and self.dev.code_server:
            # zlh adds code-server as the process `ide` on the port `ide` (zlh/codeserver.py).
            port = self.ports.get("ide")
            if "ide" in self.processes or port is None or port.protocol != "tcp":
                yield Problem(("dev", "code_server"), "needs a tcp port named ide and no "
                                                     "process named ide")
        if self.dev is not None and self.dev.ssh:
            # zlh adds sshd as the process `ssh` on the port `ssh` (zlh/devssh.py).
            port = self.ports.get("ssh")
            if "ssh" in self.processes or port is None or port.protocol != "tcp":
                yield Problem(("dev", "ssh"), "needs a tcp port named ssh and no process "
                                              "named ssh")
        for name, process in self.processes.items():
            loc: Loc = ("processes", name)
            if process.port is not None and process.port not in self.ports:
                yield Problem(loc + ("port",), self._unknown_port(process.port))
            for which in ("readiness", "liveness"):
                probe = getattr(process, which)
                if isinstance(probe, (TcpProbeDef, MinecraftProbeDef)):
                    yield from self._probe_problems(probe, process, loc + (which,))

    def _probe_problems(
        self, probe: TcpProbeDef | MinecraftProbeDef, process: ProcessDef, loc: Loc
    ) -> Iterator[Problem]:
        port = probe.port or process.port
        if probe.port is None and port is not None and port not in self.ports:
            return  # the process's own port is already reported
        if port is None:
            yield Problem(loc + ("port",), "needs a port: name one, or set the process's port")
        elif port not in self.ports:
            yield Problem(loc + ("port",), self._unknown_port(port))
        elif self.ports[port].protocol != "tcp":
            yield Problem(loc + ("port",), f"a {probe.type} probe needs a tcp port; "
                                           f"{port!r} is {self.ports[port].protocol}")

    def _unknown_port(self, name: str) -> str:
        return f"no port named {name!r}; known: {', '.join(self.ports) or 'none'}"

    def _template_problems(self) -> Iterator[Problem]:
        known = set(self.template_names())
        for loc, text in templates(self):
            template = string.Template(text)
            if not template.is_valid():
                yield Problem(loc, "a '$' that starts no ${name}: write $$ for a '$'")
            for name in template.get_identifiers():
                if name not in known:
                    yield Problem(loc, f"unknown variable ${{{name}}}{_in_file(self, loc)}; "
                                       f"known: {', '.join(sorted(known))}")


def _in_file(playbook: Playbook, loc: Loc) -> str:
    if loc[0] == "files" and isinstance(loc[1], int):
        return f" in {playbook.files[loc[1]].path}"
    return ""


def templates(playbook: Playbook) -> Iterator[tuple[Loc, str]]:
    """Every text that render() substitutes, with its location in the playbook."""
    for index, item in enumerate(playbook.files):
        yield ("files", index, "template"), item.template
    for name, process in playbook.processes.items():
        loc: Loc = ("processes", name)
        for index, arg in enumerate(process.argv):
            yield loc + ("argv", index), arg
        if process.cwd is not None:
            yield loc + ("cwd",), process.cwd
        for key, value in process.env.items():
            yield loc + ("env", key), value
        for which in ("readiness", "liveness"):
            probe = getattr(process, which)
            if isinstance(probe, HttpProbe):
                yield loc + (which, "url"), probe.url


# -- finding and loading ---------------------------------------------------------------


def playbooks_dir() -> Path:
    """`$ZLH_PLAYBOOKS`, else the `playbooks/` folder next to the zlh package."""
    override = os.environ.get("ZLH_PLAYBOOKS", "")
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / "playbooks"


def list_playbooks() -> list[str]:
    """The names of the playbooks in playbooks_dir(), sorted."""
    folder = playbooks_dir()
    if not folder.is_dir():
        return []
    return sorted(path.stem for path in folder.glob("*.yaml") if path.is_file())


def load_playbook(name_or_path: str | Path) -> Playbook:
    """Load a playbook by name (`minetest`) or from a path to a .yaml file."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith((".yaml", ".yml")):
        return _load_file(Path(name_or_path))
    path = playbooks_dir() / f"{text}.yaml"
    if not re.fullmatch(NAME_PATTERN, text) or not path.is_file():
        available = ", ".join(list_playbooks()) or f"none in {playbooks_dir()}"
        raise NotFoundError(f"no playbook named {text!r}; available: {available}")
    return _load_file(path, expected_name=text)


def _load_file(path: Path, expected_name: str | None = None) -> Playbook:
    doc = read_yaml(path)
    playbook = validate(doc, Playbook)
    if expected_name is not None and playbook.name != expected_name:
        # list_playbooks() shows file names; they must be the names the files declare.
        raise doc.error([Problem(("name",), f"must be {expected_name!r}, as the file name")])
    playbook._source = path
    return playbook


def missing_system_artifacts(playbook: Playbook) -> list[SystemArtifact]:
    """The system artifacts whose path does not exist on this machine."""
    return [
        item for item in playbook.artifacts
        if isinstance(item, SystemArtifact) and not os.path.exists(item.path)
    ]


def require_system_artifacts(playbook: Playbook) -> None:
    """NotFoundError naming the Debian packages to install when a system file is missing."""
    missing = missing_system_artifacts(playbook)
    if missing:
        paths = ", ".join(item.path for item in missing)
        packages = " ".join(sorted({item.apt for item in missing}))
        raise NotFoundError(f"playbook {playbook.name} needs {paths}: "
                            f"apt-get install -y {packages}")


# -- values ----------------------------------------------------------------------------


def parse_sets(items: Iterable[str]) -> dict[str, str]:
    """`["motd=hi", "max_players=5"]` -> `{"motd": "hi", "max_players": "5"}`."""
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item}: expected KEY=VALUE")
        if key in values:
            raise UsageError(f"--set {key}: given twice")
        values[key] = value
    return values


def resolve_values(playbook: Playbook, values: Mapping[str, str]) -> dict[str, str]:
    """Check `--set` values against the playbook's variables and fill in the defaults."""
    unknown = sorted(set(values) - set(playbook.variables))
    if unknown:
        known = ", ".join(sorted(playbook.variables)) or "none"
        raise UsageError(f"--set {unknown[0]}: playbook {playbook.name} has no such "
                         f"variable; known: {known}")
    resolved = {}
    for name, variable in playbook.variables.items():
        value = values.get(name, variable.default)
        if value is None:
            raise UsageError(f"--set {name}=...: required by playbook {playbook.name} "
                             f"({variable.description or variable.type})")
        try:
            resolved[name] = variable.check(value)
        except ValueError as exc:
            raise UsageError(f"--set {name}={value}: {exc}") from None
    return resolved


# -- rendering -------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedFile:
    path: str  # relative to the server root
    content: str


@dataclass(frozen=True)
class RenderedServer:
    playbook: str
    root: Path
    values: dict[str, str]
    ports: dict[str, int]
    files: tuple[RenderedFile, ...]
    spec: ServerSpec


def render(
    playbook: Playbook, values: dict[str, str], ports: dict[str, int], root: Path,
    host: str = HOST,
) -> RenderedServer:
    """Fill the playbook's templates for one server and build its ServerSpec.

    `values` are the raw `--set` values; `ports` has a concrete port for every port of
    the playbook; `root` is the absolute server root as the server's processes see it;
    `host` is the address its ports are bound on and probed at.
    """
    _check_inputs(playbook, ports, root)
    resolved = resolve_values(playbook, values)
    mapping = {**resolved, **{f"port_{k}": str(v) for k, v in ports.items()},
               "root": str(root), "host": host}
    files = tuple(
        RenderedFile(item.path, _fill(playbook, ("files", index, "template"), mapping))
        for index, item in enumerate(playbook.files)
    )
    processes = [
        _render_process(playbook, name, mapping, ports, root)
        for name in playbook.processes
    ]
    try:
        spec = ServerSpec(playbook=playbook.name, processes=processes,
                          backup=_render_backup(playbook))
    except ValidationError as exc:
        raise ConfigError(f"playbook {playbook.name} renders an invalid spec: {exc}") from None
    return RenderedServer(playbook.name, root, resolved, dict(ports), files, spec)


def _render_backup(playbook: Playbook) -> BackupSpec | None:
    """The agent's backup policy; it quiesces the first game process."""
    if playbook.backup is None:
        return None
    games = [name for name, p in playbook.processes.items() if p.kind == "game"]
    steps = [BackupStep(**step.model_dump()) for step in playbook.backup.quiesce]
    return BackupSpec(process=games[0] if games else None, paths=playbook.backup.paths,
                      exclude=playbook.backup.exclude, quiesce=steps,
                      resume=playbook.backup.resume)


def _check_inputs(playbook: Playbook, ports: Mapping[str, int], root: Path) -> None:
    # These come from the provisioner, not from the operator: a mismatch is a bug.
    if set(ports) != set(playbook.ports):
        raise ValueError(f"ports {sorted(ports)} do not match the playbook's "
                         f"{sorted(playbook.ports)}")
    if any(not 1 <= port <= 65535 for port in ports.values()):
        raise ValueError(f"ports out of range: {ports}")
    if not root.is_absolute() or CONTROL_CHARS.search(str(root)) or '"' in str(root):
        raise ValueError(f"server root must be an absolute, plain path: {str(root)!r}")
    problems = playbook.problems()
    if problems:
        where = playbook.source or f"playbook {playbook.name}"
        raise ConfigError("\n".join(f"{where}: {dotted(p.loc)}: {p.message}" for p in problems))


def _fill(playbook: Playbook, loc: Loc, mapping: Mapping[str, str]) -> str:
    text = _lookup(playbook, loc)
    try:
        return string.Template(text).substitute(mapping)
    except KeyError as exc:
        raise ConfigError(f"playbook {playbook.name}: {dotted(loc)}{_in_file(playbook, loc)}: "
                          f"unknown variable ${{{exc.args[0]}}}") from None
    except ValueError:
        raise ConfigError(f"playbook {playbook.name}: {dotted(loc)}: a '$' that starts no "
                          "${name}: write $$ for a '$'") from None


def _lookup(playbook: Playbook, loc: Loc) -> str:
    node: Any = playbook
    for part in loc:
        node = getattr(node, str(part)) if isinstance(node, BaseModel) else node[part]
    return str(node)


def _render_process(
    playbook: Playbook, name: str, mapping: Mapping[str, str], ports: Mapping[str, int],
    root: Path,
) -> ProcessSpec:
    process = playbook.processes[name]
    loc: Loc = ("processes", name)
    argv = [_fill(playbook, loc + ("argv", i), mapping) for i in range(len(process.argv))]
    cwd = _fill(playbook, loc + ("cwd",), mapping) if process.cwd is not None else str(root)
    env = {key: _fill(playbook, loc + ("env", key), mapping) for key in process.env}
    fields = process.model_dump(exclude={"argv", "cwd", "env", "readiness", "liveness", "port"})
    try:
        return ProcessSpec(
            **fields, name=name, argv=argv, cwd=cwd, env=env,
            port=ports[process.port] if process.port else None,
            readiness=_render_probe(playbook, loc + ("readiness",), mapping, ports),
            liveness=_render_probe(playbook, loc + ("liveness",), mapping, ports),
        )
    except ValidationError as exc:
        raise ConfigError(f"playbook {playbook.name}: process {name} renders invalid: "
                          f"{exc}") from None


def _render_probe(
    playbook: Playbook, loc: Loc, mapping: Mapping[str, str], ports: Mapping[str, int]
) -> LogProbe | TcpProbe | HttpProbe | MinecraftProbe | None:
    process = playbook.processes[str(loc[1])]
    probe = getattr(process, str(loc[2]))
    if probe is None or isinstance(probe, LogProbe):
        return probe
    if isinstance(probe, HttpProbe):
        return probe.model_copy(update={"url": _fill(playbook, loc + ("url",), mapping)})
    timing = probe.model_dump(include={"interval", "timeout", "failure_threshold"})
    port = ports[probe.port or process.port or ""]
    if isinstance(probe, TcpProbeDef):
        return TcpProbe(type="tcp", host=mapping["host"], port=port, **timing)
    return MinecraftProbe(type="minecraft", host=mapping["host"], port=port, **timing)


def write_files(rendered: RenderedServer) -> list[Path]:
    """Write the rendered files under the server root; returns their paths."""
    written = []
    for item in rendered.files:
        target = rendered.root / item.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(item.content, encoding="utf-8")
        written.append(target)
    return written
