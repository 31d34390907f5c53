"""Provisioning: from a playbook and a name to a ready game server.

The steps run in order, and each one that completes is recorded in the inventory:

    registered -> container-created -> artifacts-installed -> files-rendered
               -> agent-started -> runtimes-installed -> spec-applied -> ready

(runtimes-installed: the playbook's catalog runtimes and server packages, through the
agent's hash-checked install; see zlh/runtimes.py.)

A re-run on an unfinished server resumes after the last recorded step (with the same
playbook); a finished one is refused. One run per name at a time: an flock on
`$ZLH_HOME/locks/NAME.lock` is held for the whole run, and the inventory's unique name is
the backstop. A failed step records its error and raises ProvisionError naming the step;
Ctrl-C leaves the last completed step recorded, so a re-run resumes.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zlh import devcontainer, records, tiers
from zlh.errors import (
    ConflictError,
    IntegrityError,
    ProvisionError,
    UsageError,
    ZlhError,
)
from zlh.inventory import Server, check_name

if TYPE_CHECKING:
    from agentd.models import Status
    from zlh.playbooks import Playbook
    from zlh.providers import Provider
    from zlh.providers.base import ServerFiles

log = logging.getLogger(__name__)

STEPS = (
    "registered",
    "container-created",
    "artifacts-installed",
    "files-rendered",
    "agent-started",
    "runtimes-installed",
    "spec-applied",
    "ready",
)
AGENT_START_TIMEOUT = 30.0
# Launchers zlh ships for npm packages whose own entry point cannot be used as is; they
# land in the server root as launcher.js. When playbook files can name packaged data
# files, this table moves into the playbooks.
LAUNCHERS = {"flying-squid": "squid-launcher.js"}
DATA = Path(__file__).parent / "data"
PROVIDER = "local"
# The processes a server is ready with: the game, or a dev container's IDE.
READY_KINDS = ("game", "ide", "service")

StepCallback = Callable[[str, str], None]
"""Called with (step, event): event is "start", "done" or "skip"."""


@dataclass(frozen=True)
class ProvisionRequest:
    playbook: str
    name: str
    values: dict[str, str] = field(default_factory=dict)
    allow_unpinned: bool = False
    timeout: float = 300.0
    tier: str | None = None  # default: the playbook's
    owner: str | None = None  # default: the operator's login name
    provider: str | None = None  # default: the unfinished run's, else local


@dataclass
class ProvisionResult:
    name: str
    playbook: str
    address: str
    game_port: int | None
    ports: dict[str, int]
    agent_port: int
    resumed: bool
    seconds: float


def parse_values(pairs: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` arguments as a dict; the playbook checks keys and types."""
    from zlh.playbooks import parse_sets

    return parse_sets(pairs)


def provision(request: ProvisionRequest, on_step: StepCallback | None = None) -> ProvisionResult:
    from zlh import playbooks
    from zlh.paths import zlh_home

    check_name(request.name)
    # Everything the operator can get wrong is checked before anything is registered.
    playbook = playbooks.load_playbook(request.playbook)
    playbooks.resolve_values(playbook, request.values)
    _check_pinned(playbook, request.allow_unpinned)
    if _provider_for(request) == "local":
        # Other providers' containers are checked at artifacts-installed, not this machine.
        playbooks.require_system_artifacts(playbook)
    from zlh import opconfig, runtimes

    runtimes.playbook_items(playbook)  # every catalog entry the playbook names exists
    devcontainer.tool_runtimes(playbook)  # and the one its IDE runs on
    tiers.for_request(playbook, request.tier)
    opconfig.load()  # the sections later steps read (ssh, proxmox)

    home = zlh_home()
    with _name_lock(home, request.name):
        run = _Run(request, playbook, home, on_step or (lambda step, event: None))
        return run.execute()


def rebind(name: str) -> None:
    """A ready server whose address changed (its container came back with another lease):
    the files and the spec that name the address (`${host}`, probes, a dev container's
    sshd) are made again by the steps that made them; its processes restart on them."""
    from zlh import playbooks
    from zlh.paths import zlh_home
    from zlh.servers import agent_client

    record = records.get(name)
    playbook = playbooks.load_playbook(record.playbook)
    request = ProvisionRequest(record.playbook, name, dict(record.values))
    with _name_lock(zlh_home(), name):
        run = _Run(request, playbook, zlh_home(), lambda step, event: None)
        run.record = record
        run._render_files()
        devcontainer.prepare_ssh(playbook, run.provider, record, record.address or "")
        run._apply_spec()
        with agent_client(record) as client:
            for process in playbook.processes:  # the playbook's: they read its files
                client.action(process, "restart")
        run._wait_ready()


def _ssh_failed(exc: ZlhError) -> bool:
    """SSH itself failed: the agent in the container is reached over SSH too, so asking it
    would only fail again, with the same reason."""
    from zlh.ssh import SshError

    return isinstance(exc, SshError)


@contextmanager
def _name_lock(home: Path, name: str) -> Iterator[None]:
    folder = home / "locks"
    folder.mkdir(mode=0o700, exist_ok=True)
    with open(folder / f"{name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConflictError(f"provisioning of {name} is already running") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_pinned(playbook: Playbook, allow_unpinned: bool) -> None:
    unpinned = [a for a in playbook.artifacts if getattr(a, "unpinned", False)]
    if unpinned and not allow_unpinned:
        names = ", ".join(_artifact_label(a) for a in unpinned)
        raise UsageError(
            f"playbook {playbook.name}: artifact {names} is unpinned (no sha256 known); "
            "pass --allow-unpinned to install it anyway"
        )


def _artifact_label(artifact: Any) -> str:
    version = getattr(artifact, "version", None)
    return f"{artifact.name}@{version}" if version else str(artifact.name)


def _provider_for(request: ProvisionRequest) -> str:
    """`--provider`, else the one an unfinished run of this name began with, else local."""
    existing = records.find(request.name)
    if existing is not None and request.provider not in (None, existing.provider):
        raise ConflictError(f"server {existing.name} is being provisioned on provider "
                            f"{existing.provider}, not {request.provider}")
    return request.provider or (existing.provider if existing else PROVIDER)


class _Run:
    """One provisioning run: the steps after the recorded one, in order."""

    def __init__(
        self, request: ProvisionRequest, playbook: Playbook, home: Path, on_step: StepCallback
    ) -> None:
        from zlh.providers import get_provider

        self.request = request
        self.playbook = playbook
        self.home = home
        self.on_step = on_step
        self.provider: Provider = get_provider(_provider_for(request), home, playbook)
        self.record: Server | None = None
        self.started = time.monotonic()

    def execute(self) -> ProvisionResult:
        resumed = self._load_existing()
        self.provider.preflight()  # before anything is registered or created
        done = 0
        if self.record is not None:
            step = self.record.step
            done = STEPS.index(step) + 1 if step in STEPS else 1
        actions: dict[str, Callable[[], None]] = {
            "registered": self._register,
            "container-created": self._create_container,
            "artifacts-installed": self._install_artifacts,
            "files-rendered": self._render_files,
            "agent-started": self._start_agent,
            "runtimes-installed": self._install_runtimes,
            "spec-applied": self._apply_spec,
            "ready": self._wait_ready,
        }
        agent_step = STEPS.index("agent-started")
        for index, step in enumerate(STEPS):
            if index < done:
                self.on_step(step, "skip")
                continue
            action = actions[step]
            if index > agent_step and index == done:
                # Resuming past the agent's start: the agent may have died since (a
                # running agent is left as it is).
                action = self._after_agent_start(action)
            self._run_step(step, action)
        return self._result(resumed)

    def _load_existing(self) -> bool:
        existing = records.find(self.request.name)
        if existing is None:
            return False
        if existing.step == "ready":
            raise ConflictError(
                f"server {existing.name} already exists (playbook {existing.playbook}); "
                f"use `zlh delete {existing.name}` first"
            )
        if existing.playbook != self.playbook.name:
            raise ConflictError(
                f"server {existing.name} is being provisioned with playbook "
                f"{existing.playbook}, not {self.playbook.name}; re-run with "
                f"{existing.playbook} to resume, or `zlh delete {existing.name}`"
            )
        if self.request.values and self.request.values != existing.values:
            raise ConflictError(
                f"server {existing.name} is being provisioned with other --set values "
                f"({_show(existing.values)}); re-run with those, or `zlh delete {existing.name}`"
            )
        self.record = existing
        return True

    def _run_step(self, step: str, action: Callable[[], None]) -> None:
        name = self.request.name
        self.on_step(step, "start")
        try:
            action()
        except KeyboardInterrupt as exc:
            exc.add_note(self._resume_hint("was interrupted during", step))
            raise
        except (ConflictError, IntegrityError) as exc:
            # A port taken or a hash that does not match keep their own exit codes.
            self._record_failure(step, exc.message)
            exc.message = f"provisioning {name}: step {step} failed: {exc.message}"
            raise
        except ZlhError as exc:
            self._record_failure(step, exc.message, tell_agent=not _ssh_failed(exc))
            raise ProvisionError(f"provisioning {name}: step {step} failed: {exc}") from exc
        except OSError as exc:
            self._record_failure(step, str(exc))
            raise ProvisionError(f"provisioning {name}: step {step} failed: {exc}") from exc
        status = "ready" if step == "ready" else "provisioning"
        self.record = records.update(name, "step", step, step=step, status=status)
        self.on_step(step, "done")

    def _resume_hint(self, what: str, step: str) -> str:
        name = self.request.name
        return (
            f"provisioning of {name} {what} step {step}; run "
            f"`zlh provision {self.playbook.name} {name}` again to resume, "
            f"or `zlh delete {name}` to remove it"
        )

    def _record_failure(self, step: str, message: str, tell_agent: bool = True) -> None:
        if step == "registered" or records.find(self.request.name) is None:
            return  # not registered by this run: nothing of ours to record
        records.update(self.request.name, "failed", f"{step}: {message}", status="failed")
        if tell_agent:
            self._tell_agent_failed(step, message)

    def _tell_agent_failed(self, step: str, error: str) -> None:
        """Best effort: mirror the failure into the agent's provisioning state, if it runs."""
        from agentd.models import Provisioning
        from zlh.servers import agent_client

        if self.record is None or not self.provider.agent_running(self.request.name):
            return
        try:
            with agent_client(self.record) as client:
                client.set_provisioning(Provisioning(state="failed", step=step, error=error))
        except ZlhError as exc:
            log.warning("could not record provisioning state in the agent: %s", exc)

    # -- the steps --------------------------------------------------------------------

    def _register(self) -> None:
        from zlh.ports import free_port

        taken: set[int] = set()
        agent_port = free_port("tcp", taken)
        taken.add(agent_port)
        ports: dict[str, int] = {}
        for port_name, port in self.playbook.ports.items():
            ports[port_name] = free_port(port.protocol, taken)
            taken.add(ports[port_name])
        tier = tiers.for_request(self.playbook, self.request.tier)
        owner = self.request.owner or tiers.default_owner()

        # The limits are checked in the inventory's transaction that adds the server.
        records.add(
            Server(
                name=self.request.name,
                playbook=self.playbook.name,
                provider=self.provider.name,
                address=self.provider.address(self.request.name),
                agent_port=agent_port,
                ports=ports,
                values=dict(self.request.values),
                owner=owner,
                tier=tier.name,
                resources=tier.resources.model_dump(),
                step="registered",
                status="provisioning",
            ),
            admit=tiers.admission(owner, tier),
        )

    def _create_container(self) -> None:
        assert self.record is not None
        assert self.record.agent_port is not None
        provider_id = self.provider.create(self.record.name, self.record.agent_port)
        token_path = self.provider.token_path(self.record.name)
        devcontainer.prepare(self.playbook, self.provider, self.record.name)
        records.update(
            self.record.name, "container-created", provider_id,
            provider_id=provider_id, token_path=str(token_path),
            address=self.provider.address(self.record.name),
        )
        devcontainer.prepare_ssh(self.playbook, self.provider, self.record,
                                 self.provider.address(self.record.name))

    def _install_artifacts(self) -> None:
        # Through the provider: the server root may be a folder here or a container's
        # behind SSH.
        with self.provider.server_files(self.request.name) as files:
            for artifact in self.playbook.artifacts:
                _install_artifact(artifact, files, self.home / "cache",
                                  self.request.allow_unpinned)
        devcontainer.install(self.playbook, self.provider, self.request.name, self.home / "cache")

    def _render_files(self) -> None:
        with self.provider.server_files(self.request.name) as files:
            for item in self._rendered().files:
                files.write_text(item.path, item.content)

    def _rendered(self) -> Any:
        from zlh import playbooks

        assert self.record is not None
        root = self.provider.server_root(self.record.name)
        # Bound where zlh says players reach it: the container's address on Proxmox.
        host = self.record.address or playbooks.HOST
        return playbooks.render(self.playbook, self.record.values, self.record.ports, root,
                                host)

    def _after_agent_start(self, action: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            self._start_agent()
            action()
        return run

    def _start_agent(self) -> None:
        self.provider.start_agent(self.request.name, timeout=AGENT_START_TIMEOUT)

    def _install_runtimes(self) -> None:
        # Catalog runtimes and server packages: the agent downloads and checks them.
        from zlh import runtimes

        assert self.record is not None
        items = runtimes.playbook_items(self.playbook)
        tools = devcontainer.tool_runtimes(self.playbook)
        if items or tools:
            runtimes.install_many(self.record, items, tools=tools)

    def _apply_spec(self) -> None:
        from agentd.models import Provisioning
        from zlh.ports import require_free
        from zlh.servers import agent_client

        assert self.record is not None
        # Ports of this machine only: an agent inside its container binds the container's.
        on_this_machine = not getattr(self.provider, "agent_in_container", False)
        for port_name, number in self.record.ports.items() if on_this_machine else ():
            protocol = self.playbook.ports[port_name].protocol
            require_free(number, protocol, f"{port_name} of {self.record.name}")

        spec = devcontainer.complete_spec(self._rendered().spec, self.playbook, self.record,
                                          self.provider)
        with agent_client(self.record) as client:
            client.set_provisioning(Provisioning(state="running", step="spec-applied"))
            client.put_spec(spec)

    def _wait_ready(self) -> None:
        from agentd.models import Provisioning
        from zlh.servers import agent_client

        assert self.record is not None
        deadline = time.monotonic() + self.request.timeout
        with agent_client(self.record) as client:
            while True:
                status = client.status()
                if _games_ready(status):
                    break
                _raise_if_fatal(status)
                if time.monotonic() > deadline:
                    raise ProvisionError(
                        f"the game did not become ready within {self.request.timeout:.0f} s "
                        f"({_game_states(status)}); see `zlh console {self.record.name}`"
                    )
                time.sleep(0.25)
            client.set_provisioning(Provisioning(state="complete", step="ready"))

    def _result(self, resumed: bool) -> ProvisionResult:
        assert self.record is not None
        return ProvisionResult(
            name=self.record.name,
            playbook=self.record.playbook,
            address=self.record.address or "",
            game_port=records.game_port(self.record),
            ports=dict(self.record.ports),
            agent_port=self.record.agent_port or 0,
            resumed=resumed,
            seconds=round(time.monotonic() - self.started, 2),
        )


def _install_artifact(artifact: Any, files: ServerFiles, cache: Path,
                      allow_unpinned: bool) -> None:
    if artifact.source == "npm":
        from zlh.npmcache import ensure_cached

        entry = ensure_cached(artifact.package, artifact.version, artifact.sha256, cache,
                              allow_unpinned)
        files.put(entry / "node_modules", "node_modules")
        launcher = LAUNCHERS.get(artifact.package)
        if launcher is not None:
            # The launcher zlh ships for this package (see LAUNCHERS).
            files.put(DATA / launcher, "launcher.js")
    elif artifact.source == "catalog":
        return  # installed by the agent in the runtimes-installed step
    elif artifact.source == "system":
        if not files.has(artifact.path):
            raise ProvisionError(f"{artifact.path} is missing: apt-get install -y {artifact.apt}")
    else:
        # When the catalogs issue lands, url artifacts come from the artifact server
        # through the hash-checked download path.
        raise ProvisionError(
            f"artifact {_artifact_label(artifact)}: source {artifact.source!r} "
            "is not supported by the local provider yet"
        )


def _games_ready(status: Status) -> bool:
    games = [p for p in status.processes if p.kind in READY_KINDS]
    return bool(games) and all(p.ready for p in games)


def _raise_if_fatal(status: Status) -> None:
    from zlh.console import strip_ansi

    for process in status.processes:
        if process.kind not in READY_KINDS or process.state != "fatal":
            continue
        why = ""
        crash = process.last_crash
        if crash is not None:
            why = f"; last crash: {crash.crash_class} ({crash.detail})"
            said = [strip_ansi(line).strip() for line in crash.last_lines]
            said = [line for line in said if line]
            if said:
                why += f"; its last line: {said[-1]}"
        raise ProvisionError(f"{process.name} gave up restarting (fatal){why}")


def _game_states(status: Status) -> str:
    games = [p for p in status.processes if p.kind in READY_KINDS]
    return ", ".join(f"{p.name} {p.state}" for p in games) or "no game process"


def _show(values: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(values.items())) or "none"
