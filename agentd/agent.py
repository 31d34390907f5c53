"""The agent: one supervisor per process of the desired spec, plus its persisted state.

State on disk (under the config's state_dir):

    spec.json            the last accepted ServerSpec
    provisioning.json    what the provisioner last reported
    console/NAME.log     each process's console (see console.py)
    holders/NAME.*       each process's holder files and saved state (see spawn.py)
    uploads/TOKEN        an upload under way: its temporary file (see files.py)
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import time
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from agentd import __version__, devuser
from agentd.backups import BackupManager
from agentd.config import AgentConfig
from agentd.console import Console
from agentd.diskwatch import watched_root
from agentd.errors import NotFound, OperationFailed
from agentd.files import ServerFiles
from agentd.logs import fields
from agentd.models import AgentInfo, Provisioning, ServerSpec, Status
from agentd.runtimes import ENV_FILE, Runtimes
from agentd.sampler import Sampler
from agentd.supervisor import Supervisor

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


def _env_file(config: AgentConfig) -> Path | None:
    """The shells' env file, for an agent that manages a container: the real one (root
    `/`, `in_container`) or a folder laid out as one; an agent given the machine's own
    root writes nothing outside its profile."""
    if config.in_container or config.root != Path("/"):
        return config.root / ENV_FILE
    return None


def _ensure_users(spec: ServerSpec) -> None:
    """Inside a container, the users the processes run as (the dev user) exist."""
    for user in sorted({p.user for p in spec.processes if p.user}):
        try:
            devuser.ensure(user)
        except devuser.DevUserError as exc:
            raise OperationFailed(str(exc)) from None


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.spec = ServerSpec()
        self.provisioning = Provisioning()
        self.supervisors: dict[str, Supervisor] = {}
        self.sampler = Sampler(config.server_root, config.sample_interval, self._pids,
                               watched_root(config.root, config.server_root,
                                            config.in_container))
        self.sampler.disk_watch.interval = config.disk_check_interval
        self._apply_lock = asyncio.Lock()
        self.holders = config.state_dir / "holders"
        for folder in (config.state_dir, config.state_dir / "console", self.holders,
                       config.server_root):
            folder.mkdir(parents=True, exist_ok=True)
        self.backups = BackupManager(config.state_dir, config.server_root, self)
        self.files = ServerFiles(config.server_root, config.max_upload_bytes,
                                 config.state_dir / "uploads")
        self.runtimes = Runtimes(
            config.runtimes_dir or config.root / "opt/zlh/runtimes",
            config.profile_path or config.root / "etc/profile.d/zlh-runtimes.sh", self._pids,
            cache=config.runtime_cache, env_file=_env_file(config))

    # -- life cycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Load the persisted spec and bring its processes up."""
        self.provisioning = self._load("provisioning.json", Provisioning) or Provisioning()
        self.runtimes.open()  # before any spawn: the runtimes' PATH goes into children
        self.backups.recover_world()  # before any spawn: no game on a half-restored world
        self.files.recover()
        spec = self._load("spec.json", ServerSpec)
        self.sampler.start()
        if spec is not None:
            await self.apply_spec(spec, persist=False)
        self.backups.recover()

    async def shutdown(self, deadline: float) -> None:
        """Stop every process gracefully, in parallel, within `deadline` seconds."""
        self.sampler.stop()
        stops = [sup.shutdown() for sup in self.supervisors.values()]
        if not stops:
            return
        log.info("shutdown", extra=fields(processes=len(stops), deadline=deadline))
        try:
            await asyncio.wait_for(asyncio.gather(*stops), deadline)
        except TimeoutError:
            log.error("shutdown_deadline", extra=fields(deadline=deadline))
            await asyncio.gather(*(sup.kill() for sup in self.supervisors.values()))
        for sup in self.supervisors.values():
            sup.console.close()

    # -- spec ---------------------------------------------------------------------------

    async def apply_spec(self, spec: ServerSpec, persist: bool = True) -> ServerSpec:
        """Converge: remove what is gone, replace what changed, add what is new."""
        async with self._apply_lock:
            if self.config.in_container:
                await asyncio.to_thread(_ensure_users, spec)
            wanted = {p.name: p for p in spec.processes}
            created: list[Supervisor] = []
            for name in [n for n in self.supervisors if n not in wanted]:
                await self._remove(name)
            for name, proc_spec in wanted.items():
                current = self.supervisors.get(name)
                if current is not None and current.spec == proc_spec:
                    continue
                if current is not None:
                    await self._remove(name)
                console = Console(
                    name, self.config.state_dir / "console",
                    ring_size=self.config.console_ring,
                    log_max_bytes=self.config.console_log_max_bytes,
                    log_backups=self.config.console_log_backups,
                )
                sup = Supervisor(proc_spec, console, self.config.server_root, self.holders)
                sup.container_root = self.config.root
                self.supervisors[name] = sup
                created.append(sup)
            self.spec = spec
            self.sampler.disk_watch.set_limit(spec.disk_limit_bytes)
            if persist:
                write_json_atomic(self.config.state_dir / "spec.json", spec.model_dump())
            log.info("spec_applied", extra=fields(processes=list(wanted)))
            for sup in created:
                # A process a previous agent left running is taken up, not started twice.
                if not sup.resume() and sup.spec.autostart:
                    await sup.start()
            return spec

    def detach(self) -> None:
        """Leave every process running under its holder (agent upgrade or restart)."""
        self.sampler.stop()
        for sup in self.supervisors.values():
            sup.detach()
            sup.console.close()
        log.info("detached", extra=fields(processes=len(self.supervisors)))

    async def _remove(self, name: str) -> None:
        sup = self.supervisors.pop(name)
        await sup.shutdown()
        sup.release()
        sup.console.close()

    def set_provisioning(self, value: Provisioning) -> Provisioning:
        self.provisioning = value
        write_json_atomic(self.config.state_dir / "provisioning.json", value.model_dump())
        log.info("provisioning", extra=fields(state=value.state, step=value.step))
        return value

    # -- queries ------------------------------------------------------------------------

    def supervisor(self, name: str) -> Supervisor:
        try:
            return self.supervisors[name]
        except KeyError:
            raise NotFound(f"no process named {name!r}") from None

    def status(self) -> Status:
        self.sampler.refresh_if_missing(self._pids())
        sample = self.sampler.latest
        processes = [
            sup.status(sample.processes.get(sup.pid) if sample and sup.pid else None)
            for sup in self.supervisors.values()
        ]
        agent = AgentInfo(
            version=__version__, pid=os.getpid(), uptime=round(time.time() - self.started_at, 3),
            user=getpass.getuser(), in_container=self.config.in_container,
            rss_bytes=sample.agent_rss if sample else 0,
        )
        return Status(
            agent=agent, provisioning=self.provisioning, processes=processes,
            runtimes=self.runtimes.installed(),
            resources=sample.resources if sample else None, disk=sample.disk if sample else None,
        )

    def _pids(self) -> list[int]:
        return [sup.pid for sup in self.supervisors.values() if sup.pid is not None]

    def _load(self, filename: str, model: type[M]) -> M | None:
        path = self.config.state_dir / filename
        try:
            return model.model_validate_json(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("state_unreadable", extra=fields(path=str(path), error=str(exc)))
            return None
