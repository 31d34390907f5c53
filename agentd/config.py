"""The agent's own configuration file (`/etc/zlh/agentd.yaml`)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agentd.errors import ConfigFileError


class AgentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bind: str = "127.0.0.1"
    port: int = Field(7440, ge=0, le=65535)
    token_file: Path = Path("/etc/zlh/agent.token")
    state_dir: Path = Path("/var/lib/zlh")
    server_root: Path = Path("/srv/zlh")
    root: Path = Field(Path("/"), description="the container's root; env_files are in it")
    in_container: bool = Field(
        False, description="runs as root inside its container: creates the dev user")
    runtimes_dir: Path | None = Field(None, description="default: ROOT/opt/zlh/runtimes")
    profile_path: Path | None = Field(
        None, description="PATH profile; default: ROOT/etc/profile.d/zlh-runtimes.sh")
    runtime_cache: Path | None = Field(
        None, description="verified runtime trees by sha256, hard-linked into new installs "
        "(containers that share a disk, e.g. the local provider's)")
    console_ring: int = Field(10_000, ge=100, le=1_000_000)
    console_log_max_bytes: int = Field(16 * 2**20, ge=4096)
    console_log_backups: int = Field(3, ge=0, le=100)
    max_body_bytes: int = Field(2**20, ge=1024)
    max_followers: int = Field(64, ge=1, le=10_000, description="console followers per process")
    max_upload_bytes: int = Field(256 * 2**20, ge=1024, description="PUT /v1/files")
    sample_interval: float = Field(2.0, gt=0, description="seconds between resource samples")
    disk_check_interval: float = Field(30.0, gt=0, description="seconds between disk walks")
    shutdown_deadline: float = Field(60.0, gt=0, description="stop-all budget on SIGTERM")


def load_config(path: Path) -> AgentConfig:
    """Read and validate the config; relative paths are taken from the file's folder."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigFileError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path}: yaml syntax error: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigFileError(f"{path}: expected a mapping at the top level")
    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigFileError(f"{path}: {where}: {first['msg']}") from None
    base = path.parent
    root = base / config.root
    runtimes = config.runtimes_dir or Path("opt/zlh/runtimes")
    profile = config.profile_path or Path("etc/profile.d/zlh-runtimes.sh")
    return config.model_copy(
        update={
            # Normalised: these paths end up in PATH, where `etc/../opt` would be noise.
            "runtimes_dir": Path(os.path.abspath((base if config.runtimes_dir else root)
                                                 / runtimes)),
            "profile_path": Path(os.path.abspath((base if config.profile_path else root)
                                                 / profile)),
            "token_file": base / config.token_file,
            "state_dir": base / config.state_dir,
            "server_root": base / config.server_root,
            "root": base / config.root,
            "runtime_cache": base / config.runtime_cache if config.runtime_cache else None,
        }
    )


def read_token(path: Path) -> str:
    """The bearer token; refuse a token file that others can read."""
    try:
        mode = path.stat().st_mode & 0o777
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigFileError(f"{path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigFileError(f"{path}: token file mode is {mode:o}; it must be 0600")
    if len(token) < 16:
        raise ConfigFileError(f"{path}: token is shorter than 16 characters")
    return token
