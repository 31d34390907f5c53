"""Where zlh keeps its state and where it reads the operator config.

State (inventory, agent tokens, local containers) lives in one folder, private to the
operator: `$ZLH_HOME`, else `$XDG_STATE_HOME/zlh`, else `~/.local/state/zlh`.
"""

from __future__ import annotations

import os
from pathlib import Path

STATE_MODE = 0o700


def _xdg_dir(variable: str, fallback: str) -> Path:
    # The XDG spec says a relative path in these variables is invalid and must be ignored.
    value = os.environ.get(variable, "")
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / fallback


def zlh_home() -> Path:
    """The state folder, created with mode 0700 when it does not exist yet."""
    override = os.environ.get("ZLH_HOME", "")
    if override:
        home = Path(override).expanduser().absolute()
    else:
        home = _xdg_dir("XDG_STATE_HOME", ".local/state") / "zlh"

    # mkdir's mode only applies to the last component, which is the private one.
    home.mkdir(mode=STATE_MODE, parents=True, exist_ok=True)
    return home


def inventory_path() -> Path:
    return zlh_home() / "inventory.db"


def config_path() -> Path:
    """The operator config file; it may not exist."""
    return _xdg_dir("XDG_CONFIG_HOME", ".config") / "zlh" / "config.yaml"
