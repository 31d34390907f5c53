"""`zlh ide`: where a dev container's browser IDE is and how to log in; password rotation.

The hosted URL comes from a pattern in the operator config, filled with the container's
vmid (the provider id; the server name on the local provider), the name and the domain:

    ide_url: https://dev-{vmid}.{domain}/
    domain: example.net

The password is never printed unless asked for (`--show-password`); the file holding it
(mode 0600) is named instead.
"""

from __future__ import annotations

import logging
import string
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from zlh import codeserver, records
from zlh.errors import ConfigError, NotFoundError, ProvisionError, UsageError, ZlhError
from zlh.inventory import Server
from zlh.yamlfile import read_yaml, validate

if TYPE_CHECKING:
    from agentd.models import ProcessStatus
    from zlh.agent_client import AgentClient
    from zlh.providers.base import ServerFiles

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0
POLL_S = 0.25


class IdeConfig(BaseModel):
    """The operator config's keys for the IDE; the file's other keys are not ours."""

    model_config = ConfigDict(extra="ignore")

    ide_url: str | None = None
    domain: str | None = None


@dataclass
class IdeAccess:
    name: str
    url: str
    local: bool
    user: str | None  # who code-server runs as; None when the agent did not answer
    state: str
    ready: bool
    password_file: str
    password: str | None  # only with --show-password


@dataclass
class Rotated:
    name: str
    password_file: str
    state: str
    ready: bool
    pid: int | None


def load_config() -> IdeConfig:
    from zlh.paths import config_path

    path = config_path()
    if not path.is_file():
        return IdeConfig()
    doc = read_yaml(path)
    return validate(doc, IdeConfig) if isinstance(doc.data, dict) else IdeConfig()


def ide_access(name: str, local: bool = False, show_password: bool = False) -> IdeAccess:
    record = _dev_server(name)
    url = local_url(record) if local else hosted_url(record, load_config())
    state, ready, user = _process_state(record)
    with _container_files(record) as files:
        password = codeserver.read_password(files)
        where = _password_file(record, files.root)
    return IdeAccess(name, url, local, user, state, ready, where,
                     password if show_password else None)


def hosted_url(record: Server, config: IdeConfig) -> str:
    if not config.ide_url:
        raise ConfigError("no ide_url in the operator config (for example "
                          "`ide_url: https://dev-{vmid}.{domain}/`); on the local provider, "
                          "use --local")
    # A Proxmox container's provider id is NODE/VMID.
    vmid = record.name if record.provider == "local" else \
        (record.provider_id or record.name).rsplit("/", 1)[-1]
    values = {"vmid": vmid, "name": record.name, "domain": config.domain}
    try:
        fields = [field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
                  for _, field, spec, conversion in string.Formatter().parse(config.ide_url)
                  if field is not None]
    except ValueError as exc:
        raise ConfigError(f"ide_url {config.ide_url!r}: {exc}") from None
    for field in fields:
        if field not in values:
            raise ConfigError(f"ide_url {config.ide_url!r}: {{{field}}} is not one of "
                              "{vmid}, {name}, {domain}")
        if values[field] is None:
            raise ConfigError(f"ide_url {config.ide_url!r} names {{domain}} and the operator "
                              "config has no domain")
    return config.ide_url.format(**values)


def local_url(record: Server) -> str:
    if record.provider != "local":
        raise UsageError(f"--local works for the local provider; {record.name} runs on "
                         f"{record.provider}")
    return f"http://{record.address or '127.0.0.1'}:{record.ports['ide']}/"


def rotate(name: str) -> Rotated:
    """A new password (atomic, 0600), then code-server restarted to take it."""
    from zlh.servers import agent_client

    record = _dev_server(name)
    with _container_files(record) as files:
        codeserver.read_password(files)  # a dev container's, provisioned
        codeserver.rotate_secret(files)
        path = _password_file(record, files.root)
    log.info("IDE password of %s replaced in %s", name, path)
    with agent_client(record, timeout=60) as client:
        client.action(codeserver.PROCESS, "restart")
        process = _wait_ready(client, name)
    return Rotated(name, path, process.state, process.ready, process.pid)


def _wait_ready(client: AgentClient, name: str) -> ProcessStatus:
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        status = client.status()
        process = next(p for p in status.processes if p.name == codeserver.PROCESS)
        if process.ready or process.state == "fatal" or time.monotonic() > deadline:
            if not process.ready:
                raise ProvisionError(f"code-server of {name} is {process.state} after the "
                                     f"restart; see `zlh console {name}` (ide)")
            return process
        time.sleep(POLL_S)


def _dev_server(name: str) -> Server:
    record = records.get(name)
    if "ide" not in record.ports:
        raise NotFoundError(f"{name} has no IDE (playbook {record.playbook} is not a dev "
                            "playbook with code_server)")
    return record


def _container_files(record: Server) -> AbstractContextManager[ServerFiles]:
    """The container's files: a folder here, or over SSH."""
    from zlh.paths import zlh_home
    from zlh.providers import get_provider

    return get_provider(record.provider, zlh_home()).container_files(record.name)


def _password_file(record: Server, root: str) -> str:
    """The password file's path; in a container behind SSH, as `NAME:PATH`."""
    path = str(codeserver.password_path(root))
    return path if record.provider == "local" or root != "/" else f"{record.name}:{path}"


def _process_state(record: Server) -> tuple[str, bool, str | None]:
    from zlh.servers import agent_client

    try:
        with agent_client(record, timeout=5) as client:
            status = client.status()
            spec = client.get_spec()
    except ZlhError as exc:
        log.warning("agent of %s: %s", record.name, exc)
        return "unknown (agent unreachable)", False, None
    # The spec's user when the agent switches to it; the agent's own user otherwise.
    wanted = next((p.user for p in spec.processes if p.name == codeserver.PROCESS), None)
    user = wanted or status.agent.user
    for process in status.processes:
        if process.name == codeserver.PROCESS:
            return process.state, process.ready, user
    return "absent", False, user
