"""Runtime catalogs: which runtimes and server packages exist, and their artifacts' hashes.

A catalog is a YAML file under `catalogs/` with a `runtimes:` and/or a `servers:` mapping:

    runtimes:
      node:
        description: Node.js
        default: 20.18.0
        versions:
          - version: 20.18.0
            channel: stable            # stable | beta
            deprecated: false          # or a reason: "end of life 2026-04"
            artifacts:
              x86_64:
                url: node/node-20.18.0-linux-x86_64.tar.zst   # or an absolute URL
                sha256: 64 lowercase hex
                size: 12345678
                format: tar.zst
                path: [bin]            # folders put on PATH, relative to the runtime
                verify: bin/node --version

A version no artifact can be had for says why instead of listing artifacts:

          - version: "8.0"
            unavailable: no registry zlh reaches carries the .NET 8 SDK

`zlh catalog validate` accepts it and shows the reason; installing it (a playbook's
runtime, `zlh runtime install`) is refused with NotFoundError naming the reason.

Schema errors name the file, the line and the key (zlh/yamlfile.py). `verify_artifacts`
downloads every artifact, streamed and several at once, and checks size and sha256.
"""

from __future__ import annotations

import hashlib
import os
import platform
import queue
import re
import shlex
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from zlh.errors import ConfigError, IntegrityError, NotFoundError, UsageError
from zlh.yamlfile import Document, Loc, Problem, display_path, parse_yaml, read_yaml, validate

FORMATS = ("tar.zst", "tar.gz", "tar.xz", "tar", "zip")
ARCHES = ("x86_64", "aarch64")
SECTIONS = ("runtimes", "servers")
HASH_BLOCK = 1 << 20
READ_BYTES = 256 * 1024
DOWNLOAD_TIMEOUT = 30.0
VERIFY_WORKERS = 4

Format = Literal["tar.zst", "tar.gz", "tar.xz", "tar", "zip"]
Channel = Literal["stable", "beta"]
Arch = Literal["x86_64", "aarch64"]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _version_text(value: Any) -> Any:
    # YAML reads `1.10` as the number 1.1: a version must be a string or an integer.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        raise ValueError(  # noqa: TRY004 - pydantic turns ValueError into a located error
            f"write the version in quotes: {value!r} is read as a number")
    return value


VersionText = Annotated[
    str, BeforeValidator(_version_text), Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
]
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,30}$")]


def _inside(value: str) -> str:
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts:
        raise ValueError("must be a relative path inside the runtime, without '..'")
    return value


class Artifact(Model):
    url: str = Field(description="relative to the artifact server, or an absolute URL")
    sha256: str
    size: int = Field(ge=1)
    format: Format
    path: list[Annotated[str, BeforeValidator(_inside)]] = Field(default_factory=list)
    verify: str | None = Field(None, description="command run in the runtime folder")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("sha256 must be 64 lowercase hex characters")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if re.match(r"^[a-z][a-z0-9+.-]*://", value):
            if not value.startswith(("http://", "https://", "file://")):
                raise ValueError("absolute URLs must be http, https or file")
            return value
        if not value or value.startswith("/") or ".." in value.split("/"):
            raise ValueError("a relative URL must not start with '/' or contain '..'")
        return value

    @field_validator("verify")
    @classmethod
    def _verify(cls, value: str | None) -> str | None:
        if value is not None:
            argv = shlex.split(value)
            if not argv:
                raise ValueError("verify must be a command")
            _inside(argv[0])
        return value

    def verify_argv(self) -> list[str] | None:
        return shlex.split(self.verify) if self.verify else None


class Version(Model):
    version: VersionText
    channel: Channel = "stable"
    deprecated: bool | str = False
    unavailable: str | None = Field(None, min_length=1,
                                    description="why no artifact can be had, instead of them")
    artifacts: dict[Arch, Artifact] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _artifacts_or_why_not(self) -> Version:
        if self.unavailable is None and not self.artifacts:
            raise ValueError("list artifacts, or say why there are none with `unavailable`")
        if self.unavailable is not None and self.artifacts:
            raise ValueError("an unavailable version lists no artifacts")
        return self


class Entry(Model):
    description: str = ""
    default: Annotated[str | None, BeforeValidator(_version_text)] = None
    versions: list[Version] = Field(min_length=1)

    def find(self, version: str | None) -> Version:
        wanted = version or self.default or self.versions[-1].version
        for item in self.versions:
            if item.version == wanted:
                return item
        known = ", ".join(v.version for v in self.versions)
        raise NotFoundError(f"no version {wanted}; known: {known}")


class Catalog(Model):
    runtimes: dict[Name, Entry] = Field(default_factory=dict)
    servers: dict[Name, Entry] = Field(default_factory=dict)

    def problems(self) -> list[Problem]:
        found: list[Problem] = []
        for section in SECTIONS:
            for name, entry in getattr(self, section).items():
                found += _entry_problems((section, name), entry)
        for name in sorted(set(self.runtimes) & set(self.servers)):
            found.append(Problem(("servers", name), "also listed under runtimes"))
        return found


def _entry_problems(loc: Loc, entry: Entry) -> list[Problem]:
    found = []
    seen: list[str] = []
    for index, item in enumerate(entry.versions):
        if item.version in seen:
            found.append(Problem(loc + ("versions", index, "version"),
                                 f"version {item.version} appears twice"))
        seen.append(item.version)
    if entry.default is not None and entry.default not in seen:
        found.append(Problem(loc + ("default",),
                             f"default {entry.default} is not a listed version"))
    return found


# -- loading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedCatalog:
    path: Path
    catalog: Catalog
    document: Document


@dataclass(frozen=True)
class Located:
    """One artifact of one version, with where it came from."""

    section: str
    name: str
    version: Version
    arch: str
    artifact: Artifact
    source: Path

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version.version} ({self.arch})"


def catalogs_dir() -> Path:
    """`$ZLH_CATALOGS`, else the `catalogs/` folder next to the zlh package."""
    override = os.environ.get("ZLH_CATALOGS", "")
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / "catalogs"


def catalog_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given, folders as their *.yaml files (sorted); none given: catalogs_dir()."""
    given = list(paths) or [catalogs_dir()]
    files: list[Path] = []
    for path in given:
        if path.is_dir():
            files += sorted(p for p in path.glob("*.y*ml") if p.is_file())
        elif path.exists():
            files.append(path)
        else:
            raise NotFoundError(f"{display_path(path)}: no such file or folder")
    if not files:
        raise NotFoundError(f"no catalog files in {', '.join(map(str, given))}")
    return files


def load_catalog(path: Path) -> LoadedCatalog:
    doc = read_yaml(path)
    return LoadedCatalog(path, validate(doc, Catalog), doc)


def load_catalogs(paths: Iterable[Path] = ()) -> list[LoadedCatalog]:
    """Load every file; all their errors are reported together, and a name in two files
    is an error."""
    loaded, errors = [], []
    for path in catalog_files(paths):
        try:
            loaded.append(load_catalog(path))
        except ConfigError as exc:
            errors.append(exc.message)
    if errors:
        raise ConfigError("\n".join(errors))
    _check_unique(loaded)
    return loaded


def _check_unique(loaded: list[LoadedCatalog]) -> None:
    first: dict[str, Path] = {}
    for item in loaded:
        for section in SECTIONS:
            for name in getattr(item.catalog, section):
                if name in first:
                    line = item.document.line_of((section, name))
                    raise ConfigError(f"{display_path(item.path)}:{line}: {section}.{name}: "
                                      f"also defined in {display_path(first[name])}")
                first[name] = item.path


def artifacts(loaded: Iterable[LoadedCatalog]) -> Iterator[Located]:
    for item in loaded:
        for section in SECTIONS:
            for name, entry in getattr(item.catalog, section).items():
                for version in entry.versions:
                    for arch, artifact in version.artifacts.items():
                        yield Located(section, name, version, arch, artifact, item.path)


def machine_arch() -> str:
    arch = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def find(
    name: str, version: str | None = None, paths: Iterable[Path] = (), arch: str | None = None
) -> Located:
    """The artifact of NAME@VERSION (default version when None) for this machine's arch."""
    arch = arch or machine_arch()
    for item in load_catalogs(paths):
        for section in SECTIONS:
            entry = getattr(item.catalog, section).get(name)
            if entry is None:
                continue
            try:
                chosen = entry.find(version)
            except NotFoundError as exc:
                raise NotFoundError(f"{name}: {exc}") from None
            if chosen.unavailable is not None:
                raise NotFoundError(f"{name}@{chosen.version}: not installable here: "
                                    f"{chosen.unavailable} ({display_path(item.path)})")
            artifact = chosen.artifacts.get(arch)  # type: ignore[call-overload]
            if artifact is None:
                raise NotFoundError(f"{name}@{chosen.version}: no artifact for {arch}")
            return Located(section, name, chosen, arch, artifact, item.path)
    raise NotFoundError(f"no runtime or server package named {name!r} in the catalogs")


def summary(loaded: list[LoadedCatalog]) -> list[dict[str, Any]]:
    rows = []
    for item in loaded:
        for section in SECTIONS:
            for name, entry in getattr(item.catalog, section).items():
                for version in entry.versions:
                    rows.append({
                        "file": display_path(item.path), "kind": section[:-1], "name": name,
                        "version": version.version, "channel": version.channel,
                        "default": version.version == entry.default,
                        "deprecated": version.deprecated,
                        "unavailable": version.unavailable,
                        "arches": sorted(version.artifacts),
                    })
    return rows


# -- the artifact server ---------------------------------------------------------------


def artifacts_url(given: str | None = None) -> str | None:
    """`--artifacts-url`, else `$ZLH_ARTIFACTS_URL`, else `artifacts_url` in config.yaml."""
    if given:
        return given
    if os.environ.get("ZLH_ARTIFACTS_URL"):
        return os.environ["ZLH_ARTIFACTS_URL"]
    from zlh.paths import config_path

    path = config_path()
    if not path.is_file():
        return None
    data = read_yaml(path).data
    value = data.get("artifacts_url") if isinstance(data, dict) else None
    return str(value) if value else None


def resolve_url(url: str, base: str | None) -> str:
    if "://" in url:
        return url
    if not base:
        raise UsageError(f"artifact {url} is relative: give --artifacts-url, "
                         "$ZLH_ARTIFACTS_URL or artifacts_url in the operator config")
    return base.rstrip("/") + "/" + url


# -- verification ----------------------------------------------------------------------


@dataclass
class Checked:
    label: str
    url: str
    ok: bool
    size: int
    sha256: str
    seconds: float
    problem: str = ""


Progress = Callable[[int], None]


def _larger_reads() -> None:
    """Let httpcore read 256 KiB per call instead of 64 KiB.

    On loopback its per-read overhead, not the network or SHA-256, bounds a download:
    measured here 480 MiB/s at 64 KiB against 700 MiB/s at 256 KiB. READ_NUM_BYTES is a
    class attribute of httpcore's HTTP/1.1 connection, not a public setting; if a release
    drops it, this does nothing and downloads are only slower.
    """
    try:
        from httpcore._sync import http11
    except ImportError:
        return
    current = getattr(http11.HTTP11Connection, "READ_NUM_BYTES", None)
    if isinstance(current, int) and current < READ_BYTES:
        http11.HTTP11Connection.READ_NUM_BYTES = READ_BYTES


class _Hasher:
    """sha256 in a thread of its own, so that reading the next block from the socket
    overlaps hashing this one (hashlib releases the GIL on large blocks)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.blocks: queue.Queue[bytes | None] = queue.Queue(maxsize=64)
        self.thread = threading.Thread(target=self._run, daemon=True, name="sha256")
        self.thread.start()

    def _run(self) -> None:
        while (block := self.blocks.get()) is not None:
            self.digest.update(block)

    def update(self, block: bytes) -> None:
        self.blocks.put(block)

    def finish(self) -> str:
        self.blocks.put(None)
        self.thread.join()
        return self.digest.hexdigest()


def fetch_hash(url: str, expected_size: int, timeout: float = DOWNLOAD_TIMEOUT,
               advance: Progress | None = None, client: Any = None) -> tuple[int, str]:
    """Stream `url` and return (bytes, sha256); more bytes than expected stop the read.

    Raises IntegrityError for a transport failure or an HTTP error (the bytes cannot be
    checked), naming the URL. `client`: an httpx.Client to share connections.
    """
    import httpx

    if url.startswith("file://"):
        return _hash_file(Path(url[len("file://"):]), expected_size, advance)
    _larger_reads()
    own = client is None
    http = httpx.Client(timeout=timeout, follow_redirects=True) if own else client
    hasher, size = _Hasher(), 0
    try:
        with http.stream("GET", url, timeout=timeout) as answer:
            if answer.status_code != 200:
                raise IntegrityError(f"{url}: HTTP {answer.status_code}")
            for block in answer.iter_raw():
                hasher.update(block)
                size += len(block)
                if advance is not None:
                    advance(len(block))
                if size > expected_size:
                    break
    except httpx.TimeoutException:
        raise IntegrityError(f"{url}: timed out after {timeout:g} s without data") from None
    except httpx.TransportError as exc:
        raise IntegrityError(f"{url}: {type(exc).__name__}: {exc}") from None
    finally:
        sha = hasher.finish()
        if own:
            http.close()
    return size, sha


def _hash_file(path: Path, expected_size: int, advance: Progress | None) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as handle:
            while block := handle.read(HASH_BLOCK):
                digest.update(block)
                size += len(block)
                if advance is not None:
                    advance(len(block))
                if size > expected_size:
                    break
    except OSError as exc:
        raise IntegrityError(f"{path}: {exc.strerror}") from None
    return size, digest.hexdigest()


def check_one(item: Located, base: str | None, timeout: float = DOWNLOAD_TIMEOUT,
              advance: Progress | None = None, client: Any = None) -> Checked:
    url = resolve_url(item.artifact.url, base)
    started = time.monotonic()
    expected = item.artifact
    try:
        size, sha = fetch_hash(url, expected.size, timeout, advance, client)
    except IntegrityError as exc:
        return Checked(item.label, url, False, 0, "", time.monotonic() - started, exc.message)
    problem = ""
    if size != expected.size:
        more = "more than" if size > expected.size else "only"
        problem = f"size: got {more} {size} bytes, expected {expected.size}"
    elif sha != expected.sha256:
        problem = f"sha256: got {sha}, expected {expected.sha256}"
    return Checked(item.label, url, not problem, size, sha, time.monotonic() - started, problem)


def verify_artifacts(
    items: list[Located], base: str | None, workers: int = VERIFY_WORKERS,
    timeout: float = DOWNLOAD_TIMEOUT, progress: bool = False,
) -> list[Checked]:
    """Download and check every artifact, `workers` at a time; results in input order."""
    for item in items:
        resolve_url(item.artifact.url, base)  # a missing base fails before any download
    import httpx

    total = sum(item.artifact.size for item in items)
    workers = max(1, workers)
    # One client: its connections are kept and reused across artifacts.
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    with (
        httpx.Client(timeout=timeout, follow_redirects=True, limits=limits) as client,
        _progress_bar(progress, total) as advance,
        ThreadPoolExecutor(workers) as pool,
    ):
        futures = [pool.submit(check_one, item, base, timeout, advance, client)
                   for item in items]
        return [future.result() for future in futures]


class _progress_bar:
    """A byte counter on a TTY (rich), nothing otherwise; safe to advance from threads."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self.lock = threading.Lock()
        self.bar: Any = None

    def __enter__(self) -> Progress | None:
        if not self.enabled:
            return None
        from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

        self.bar = Progress(*Progress.get_default_columns(), DownloadColumn(),
                            TransferSpeedColumn(), transient=True)
        self.bar.start()
        task = self.bar.add_task("verifying", total=self.total)

        def advance(count: int) -> None:
            with self.lock:
                self.bar.advance(task, count)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def raise_on_mismatch(results: list[Checked]) -> None:
    bad = [r for r in results if not r.ok]
    if bad:
        lines = [f"{r.label}: {r.problem}" for r in bad]
        raise IntegrityError(f"{len(bad)} of {len(results)} artifacts failed:\n"
                             + "\n".join(lines))


# -- promote ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Promoted:
    file: str
    name: str
    version: str
    channel: str
    previous: str


def promote(name: str, version: str, channel: str, paths: Iterable[Path] = ()) -> Promoted:
    """Set the channel of NAME VERSION in its catalog file, keeping comments and layout."""
    if channel not in ("stable", "beta"):
        raise UsageError(f"--channel {channel}: expected stable or beta")
    for item in load_catalogs(paths):
        for section in SECTIONS:
            entry = getattr(item.catalog, section).get(name)
            if entry is None:
                continue
            index = next((i for i, v in enumerate(entry.versions) if v.version == version),
                         None)
            if index is None:
                raise NotFoundError(f"{name}: no version {version}")
            previous = entry.versions[index].channel
            if previous != channel:
                _rewrite_channel(item, (section, name, "versions", index), channel)
            return Promoted(display_path(item.path), name, version, channel, previous)
    raise NotFoundError(f"no runtime or server package named {name!r} in the catalogs")


def _rewrite_channel(item: LoadedCatalog, loc: Loc, channel: str) -> None:
    lines = item.path.read_text(encoding="utf-8").splitlines(keepends=True)
    key_line = item.document.lines.get(loc + ("channel",))
    if key_line is not None:
        text = lines[key_line - 1]
        new, count = re.subn(r"(\bchannel:\s*)[\"']?[A-Za-z]+[\"']?", rf"\g<1>{channel}",
                             text, count=1)
        if count != 1:
            raise ConfigError(f"{display_path(item.path)}:{key_line}: cannot rewrite the "
                              "channel here (write it as `channel: NAME` on its own line)")
        lines[key_line - 1] = new
    else:
        version_line = item.document.lines[loc + ("version",)]
        text = lines[version_line - 1]
        indent = re.match(r"\s*(- )?", text)
        width = len(indent.group(0)) if indent else 0
        lines.insert(version_line, " " * width + f"channel: {channel}\n")
    _write_checked(item.path, "".join(lines))


def _write_checked(path: Path, text: str) -> None:
    """Validate the new text as a catalog, then replace the file atomically."""
    validate(parse_yaml(text, path), Catalog)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
