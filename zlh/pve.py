"""The Proxmox VE API through proxmoxer's https backend: auth, calls, tasks, errors.

Auth is an API token (`USER!NAME` and a secret) or a ticket from a password. A ticket
expires after 2 h; the client logs in again once its ticket is `ticket_renew_s` old, and
once more when the server answers 401 anyway (a cluster restart, a clock step).

Every API failure becomes one ProxmoxError line carrying Proxmox's own text:
`Proxmox: POST nodes/pve1/lxc: CT 100 already exists on node 'pve1'`. Tasks (UPIDs) are
waited for until they stop; only `OK` and `WARNINGS: N` count as success, and a failed
task names the error line of its log.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from zlh import opconfig
from zlh.errors import ConfigError, ProvisionError, ZlhError
from zlh.inventory import read_secret
from zlh.opconfig import ProxmoxConfig

log = logging.getLogger(__name__)

WARNINGS = re.compile(r"WARNINGS: \d+")
UPID = re.compile(r"UPID:(?P<node>[^:]+):[0-9A-Fa-f]{8}:[0-9A-Fa-f]{8}:[0-9A-Fa-f]{8}:"
                  r"(?P<type>[^:]*):(?P<id>[^:]*):(?P<user>[^:]*):")
POLL_START_S = 0.05
POLL_MAX_S = 1.0


class ProxmoxError(ProvisionError):
    """Proxmox refused a call or a task failed; the message is Proxmox's, on one line."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(" ".join(message.split()))
        self.status = status


@dataclass(frozen=True)
class TaskResult:
    upid: str
    exitstatus: str

    @property
    def warnings(self) -> int:
        return int(self.exitstatus.split()[-1]) if WARNINGS.fullmatch(self.exitstatus) else 0


class PveClient:
    """One connection to a cluster; thread-safe for the calls zlh makes."""

    def __init__(self, config: ProxmoxConfig) -> None:
        self.config = config
        self._secret = _secret(config)
        self._api: Any = None
        self._born = 0.0
        self._login_lock = threading.Lock()
        self.logins = 0

    # -- connection and auth ----------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"https://{self.config.host}:{self.config.port}"

    def _verify(self) -> bool | str:
        value = self.config.verify
        if value.lower() in ("true", "yes", "1"):
            return True
        if value.lower() in ("false", "no", "0"):
            return False
        return value

    def _connect(self) -> Any:
        from proxmoxer import ProxmoxAPI  # type: ignore[import-untyped]  # no type hints
        from proxmoxer.core import AuthenticationError  # type: ignore[import-untyped]

        cfg = self.config
        common = {"port": cfg.port, "user": cfg.user, "verify_ssl": self._verify(),
                  "timeout": cfg.timeout}
        try:
            if cfg.auth == "token":
                return ProxmoxAPI(cfg.host, token_name=cfg.token_id,
                                  token_value=self._secret, **common)
            api = ProxmoxAPI(cfg.host, password=self._secret, **common)
        except AuthenticationError:
            raise ConfigError(f"Proxmox at {self.base_url} refused the login of "
                              f"{cfg.user} (check proxmox.password_file)") from None
        except Exception as exc:  # requests' connection and TLS errors
            raise self._transport_error(exc) from exc
        self._born = time.monotonic()
        self.logins += 1
        log.info("logged in to Proxmox at %s as %s", self.base_url, cfg.user)
        return api

    def _session(self, renew: bool = False) -> Any:
        with self._login_lock:
            stale = self.config.auth == "ticket" and \
                time.monotonic() - self._born >= self.config.ticket_renew_s
            if self._api is None or renew or stale:
                self._api = self._connect()
            return self._api

    def _transport_error(self, exc: Exception) -> ProxmoxError:
        import requests  # type: ignore[import-untyped]  # no stubs installed

        if isinstance(exc, requests.exceptions.SSLError):
            return ProxmoxError(f"TLS check of {self.base_url} failed (proxmox.verify names "
                                f"the cluster's CA file): {_short(exc)}")
        if isinstance(exc, requests.exceptions.RequestException):
            return ProxmoxError(f"cannot reach Proxmox at {self.base_url}: {_short(exc)}")
        raise exc

    # -- calls ------------------------------------------------------------------------

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params)

    def post(self, path: str, **params: Any) -> Any:
        return self.call("POST", path, params)

    def delete(self, path: str, **params: Any) -> Any:
        return self.call("DELETE", path, params)

    def call(self, method: str, path: str, params: dict[str, Any]) -> Any:
        """One API call; booleans go out as 1/0, as Proxmox's schema wants them."""
        sent = {k: int(v) if isinstance(v, bool) else v for k, v in params.items()}
        try:
            return self._request(self._session(), method, path, sent)
        except ProxmoxError as exc:
            if exc.status == 401 and self.config.auth == "token":
                cfg = self.config
                raise ConfigError(f"{exc} (API token {cfg.user}!{cfg.token_id}, its secret "
                                  f"from {_secret_origin(cfg)})") from None
            if exc.status != 401:
                raise
            log.info("Proxmox answered 401 (%s); logging in again", exc.message)
            return self._request(self._session(renew=True), method, path, sent)

    def _request(self, api: Any, method: str, path: str, params: dict[str, Any]) -> Any:
        from proxmoxer.core import ResourceException  # type: ignore[import-untyped]

        resource = api(path)
        try:
            return getattr(resource, method.lower())(**params)
        except ResourceException as exc:
            raise ProxmoxError(f"Proxmox: {method} {path}: {_describe(exc)}",
                               exc.status_code) from None
        except Exception as exc:  # requests' connection and TLS errors
            raise self._transport_error(exc) from exc

    # -- tasks ------------------------------------------------------------------------

    def wait_task(self, upid: str, timeout: float | None = None) -> TaskResult:
        """Wait for a task to stop; ProxmoxError unless it ended `OK` or `WARNINGS: N`."""
        match = UPID.fullmatch(upid)
        if match is None:
            raise ProxmoxError(f"Proxmox returned {upid!r} where a task id (UPID) belongs")
        node, kind, ident = match.group("node", "type", "id")
        limit = self.config.task_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        delay = POLL_START_S
        while True:
            status = self.get(f"nodes/{node}/tasks/{upid}/status")
            if status.get("status") == "stopped":
                break
            if time.monotonic() > deadline:
                raise ProxmoxError(f"Proxmox task {kind} {ident} on {node} still runs after "
                                   f"{limit:.0f} s ({upid})")
            time.sleep(delay)
            delay = min(delay * 2, POLL_MAX_S)

        exitstatus = str(status.get("exitstatus", ""))
        if exitstatus == "OK" or WARNINGS.fullmatch(exitstatus):
            if exitstatus != "OK":
                log.warning("Proxmox task %s %s on %s ended with %s", kind, ident, node,
                            exitstatus)
            return TaskResult(upid, exitstatus)
        reason = self._error_line(node, upid) or exitstatus or "no exit status"
        raise ProxmoxError(f"Proxmox task {kind} {ident} on {node} failed: {reason}")

    def task_log(self, upid: str, limit: int = 500) -> list[str]:
        """The first `limit` lines of a task's log."""
        match = UPID.fullmatch(upid)
        if match is None:
            raise ProxmoxError(f"Proxmox returned {upid!r} where a task id (UPID) belongs")
        entries = self.get(f"nodes/{match.group('node')}/tasks/{upid}/log", start=0,
                           limit=limit)
        return [str(entry.get("t", "")) for entry in entries]

    def _error_line(self, node: str, upid: str) -> str:
        lines = self.task_log(upid)
        for line in reversed(lines):
            if line.startswith("TASK ERROR: "):
                return line.removeprefix("TASK ERROR: ")
        return next((line for line in reversed(lines) if line.strip()), "")

    def run_task(self, method: str, path: str, **params: Any) -> TaskResult:
        """Start a task with one call and wait for it."""
        return self.wait_task(str(self.call(method, path, params)))


def _secret(config: ProxmoxConfig) -> str:
    """The token secret or the password, from the environment or a file of mode 0600."""
    if config.auth == "token":
        env, path, what = "ZLH_PROXMOX_TOKEN_SECRET", config.token_secret_file, "token_secret"
    else:
        env, path, what = "ZLH_PROXMOX_PASSWORD", config.password_file, "password"
    if os.environ.get(env):
        return os.environ[env]
    if path is None:
        raise ConfigError(f"proxmox: set {what}_file (a file of mode 0600) or {env}")
    try:
        return read_secret(path)
    except ZlhError as exc:
        raise ConfigError(f"{opconfig.origin('proxmox', f'{what}_file')}: {exc}") from None


def _secret_origin(config: ProxmoxConfig) -> str:
    """Where the token secret came from: its variable, or the config key that names its
    file."""
    variable = "ZLH_PROXMOX_TOKEN_SECRET"
    return variable if os.environ.get(variable) else \
        opconfig.origin("proxmox", "token_secret_file")


def _describe(exc: Any) -> str:
    """Proxmox's text of a ResourceException: the reason phrase, then field errors."""
    text = str(exc.content or exc.status_message or exc.status_code).strip()
    errors = exc.errors
    if isinstance(errors, dict) and errors:
        text += " (" + "; ".join(f"{k}: {v}" for k, v in sorted(errors.items())) + ")"
    return text


def _short(exc: Exception) -> str:
    # requests nests the reason deep in its message; the last clause is the useful one.
    text = " ".join(str(exc).split())
    return text[-200:]
