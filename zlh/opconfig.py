"""The operator config: `$XDG_CONFIG_HOME/zlh/config.yaml` plus `ZLH_*` overrides.

Sections read here (others belong to other parts of zlh and are left alone):

    proxmox:
      host: pve.example.net          # ZLH_PROXMOX_HOST
      port: 8006                     # ZLH_PROXMOX_PORT
      user: root@pam
      token_id: zlh                  # API token name (USER!NAME); or password_file
      token_secret_file: ~/.config/zlh/pve-token   # mode 0600; or ZLH_PROXMOX_TOKEN_SECRET
      verify: /etc/zlh/pve-ca.pem    # CA file; "true" (system CAs) or "false"
      nodes: [pve1, pve2]            # allow-list for placement; empty: every node
      storage: local-lvm             # rootfs storage
      bridge: vmbr0
      ip: dhcp                       # or a static CIDR with gateway
      template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst
      ssh_public_key_file: ~/.ssh/id_ed25519.pub
      agent_python: /usr/bin/python3  # has the agent's dependencies; default: a venv
    ssh:
      bastion: jump@bastion.example.net:22
      identity: ~/.ssh/id_ed25519
      known_hosts: ~/.local/state/zlh/known_hosts   # default: $ZLH_HOME/known_hosts

An environment variable `ZLH_<SECTION>_<KEY>` (upper case) replaces a scalar key; lists
are comma-separated. Secrets come from files of mode 0600 or from the environment and are
never printed: the models keep only their file paths.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from zlh.errors import ConfigError, NotFoundError, UsageError
from zlh.hop import parse_hop
from zlh.paths import config_path, zlh_home
from zlh.yamlfile import Document, display_path, read_yaml, validate


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProxmoxConfig(Model):
    host: str = Field(min_length=1)
    port: int = Field(default=8006, ge=1, le=65535)
    user: str = "root@pam"
    token_id: str | None = None
    token_secret_file: Path | None = None
    password_file: Path | None = None
    verify: str = "true"
    nodes: list[str] = Field(default_factory=list)
    storage: str = "local-lvm"
    bridge: str = "vmbr0"
    ip: str = "dhcp"
    gateway: str | None = None
    template: str = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"
    ssh_public_key_file: Path | None = None
    onboot: bool = True
    timeout: float = Field(default=15.0, gt=0)
    task_timeout: float = Field(default=600.0, gt=0)
    address_timeout: float = Field(default=120.0, gt=0)
    # A ticket lives 2 h; zlh logs in again well before that.
    ticket_renew_s: float = Field(default=5400.0, gt=0, le=7000)
    # Where a container's root lives on this machine, when containers are folders
    # (demos); unset on a real cluster, where everything goes over SSH.
    backing_root: Path | None = None
    # An interpreter in the containers that has the agent's dependencies; the agent's
    # wheel is unpacked for it. Unset: a venv /opt/zlh/agent/venv with the wheel and its
    # dependencies from the package index the containers reach.
    agent_python: str | None = None

    @field_validator("token_secret_file", "password_file", "ssh_public_key_file",
                     "backing_root")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @property
    def auth(self) -> Literal["token", "ticket"]:
        return "token" if self.token_id else "ticket"


class SshConfig(Model):
    bastion: str | None = None
    identity: Path | None = None
    known_hosts: Path | None = None
    authorized_keys: Path | None = None  # public keys for dev containers' sshd
    user: str = "root"
    port: int = Field(default=22, ge=1, le=65535)
    connect_timeout: float = Field(default=10.0, gt=0)

    @field_validator("identity", "known_hosts", "authorized_keys")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @field_validator("bastion")
    @classmethod
    def _bastion_form(cls, value: str | None) -> str | None:
        """Malformed is refused here, where the file and line are known, not looked up."""
        if value:
            try:
                parse_hop(value)
            except UsageError as exc:
                raise ValueError(exc.message) from None
        return value

    def known_hosts_file(self) -> Path:
        return self.known_hosts or zlh_home() / "known_hosts"


class OperatorConfig(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    proxmox: ProxmoxConfig | None = None
    ssh: SshConfig = Field(default_factory=lambda: SshConfig())


SECTIONS: dict[str, type[Model]] = {"proxmox": ProxmoxConfig, "ssh": SshConfig}


def load(path: Path | None = None) -> OperatorConfig:
    """The config file (if any) with the environment's overrides applied."""
    path = path or config_path()
    try:
        doc = read_yaml(path)
    except NotFoundError:
        doc = Document(path=path, data={}, lines={})
    if doc.data is None:  # empty, or only comments
        doc = Document(path=path, data={}, lines=doc.lines)
    if not isinstance(doc.data, dict):
        return validate(doc, OperatorConfig)  # says where the mapping should be
    data = dict(doc.data)
    overridden = _with_env(data, os.environ)
    if overridden == data:
        return validate(doc, OperatorConfig)
    try:
        return OperatorConfig.model_validate(overridden)
    except ValidationError as exc:
        raise ConfigError(f"{path} with ZLH_* overrides: {_first_error(exc)}") from None


def _with_env(data: dict[str, Any], env: os._Environ[str] | dict[str, str]) -> dict[str, Any]:
    result = dict(data)
    for section, model in SECTIONS.items():
        if not isinstance(result.get(section), dict | None):
            continue  # no mapping to override keys in: validation says so
        values = dict(result.get(section) or {})
        for key, info in model.model_fields.items():
            raw = env.get(f"ZLH_{section.upper()}_{key.upper()}")
            if raw is not None:
                values[key] = raw.split(",") if "list" in str(info.annotation) else raw
        if values:
            result[section] = values
    return result


def origin(section: str, key: str) -> str:
    """Where the value of `section.key` comes from, for messages: its environment
    variable, or `FILE:LINE: section.key` in the config file."""
    variable = f"ZLH_{section.upper()}_{key.upper()}"
    if variable in os.environ:
        return variable
    path = config_path()
    try:
        doc = read_yaml(path)
    except (NotFoundError, ConfigError):
        return f"{section}.{key}"
    return f"{display_path(path)}:{doc.line_of((section, key))}: {section}.{key}"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


def proxmox(config: OperatorConfig | None = None) -> ProxmoxConfig:
    section = (config or load()).proxmox
    if section is None:
        raise ConfigError(f"{config_path()}: no `proxmox:` section (host, token_id, "
                          "token_secret_file, ...); or set ZLH_PROXMOX_HOST")
    return section
