"""A Proxmox VE API double: a real HTTPS server on loopback that proxmoxer uses unchanged.

It keeps the state a cluster would (nodes and their memory, storages and their content,
containers with config, status, lock and snapshots, tasks with real UPIDs and logs) and
answers as Proxmox does:

- every request is checked against the published schema (`pve.schema`); a bad one gets
  HTTP 400 "Parameter verification failed." with an `errors` object;
- a refused action gets HTTP 500 with Proxmox's message as the reason phrase (duplicate
  vmid, locked container, running container deleted without force, unknown storage);
- long actions (create, start, stop, shutdown, destroy, snapshot, rollback) return a UPID
  at once and finish in a worker thread; their status turns `stopped` with `OK`,
  `WARNINGS: N` or the error text, and their log ends with `TASK OK` / `TASK ERROR: ...`;
  a create that fails (a scripted fault too) removes the container it began.

Auth: API tokens (`Authorization: PVEAPIToken=USER!NAME=SECRET`) and tickets from
`POST /access/ticket` (cookie `PVEAuthCookie`, `CSRFPreventionToken` header on writes),
which expire after `ticket_lifetime` seconds.

Faults a test can script: `fail_next(task_type, message)`, `warn_next(task_type, n)`,
`lock(vmid, reason)`, `interface_plan` (what `/interfaces` answers after a start, call by
call), `revoke_tickets()`, `hold_task_logs()` (task log reads wait, `task_log_asked` is
set, until `release_task_logs()`: a client can be killed right where it reads one).

Backing: with `backing_root`, each container gets a folder `backing_root/VMID/` (its root
file system). The SSH keys given at create land in `root/.ssh/authorized_keys`; stopping
the container stops a local-provider agent running from that folder; a purge removes it.

With `ssh_backing` (tests/ctfix.py), each container is a chroot with its own sshd that
zlh reaches only over SSH: create makes it and logs its host keys' fingerprints as
Proxmox does (`Creating SSH host key ...`, `done: SHA256:... root@HOSTNAME`), start and
stop run and kill it, a snapshot copies it, a rollback restores the copy, a purge
removes it; `/interfaces` answers with its address. `next_lease[vmid] = ADDRESS` gives it
another address at its next start (a new DHCP lease).
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import secrets
import shutil
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, Self

from pve.schema import Schema, SchemaError, parse_property_string
from pve.tls import TlsFiles, make_tls

log = logging.getLogger(__name__)

API_PREFIX = "/api2/json"
MB = 1024 * 1024
GB = 1024 * MB
DEFAULT_TEMPLATE = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"
LINK_LOCAL_PREFIX = "fe80::be24:11ff:fe00:"
# `current` stands for the live state in snapshot lists; vzdump uses `vzdump` for backups.
RESERVED_SNAPSHOTS = ("current", "vzdump")


class PveError(Exception):
    """An API error: HTTP status, message (the reason phrase), and field errors."""

    def __init__(self, status: int, message: str, errors: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors


class TaskFailed(Exception):
    """Raised by a task's work: the task ends with this text as its exit status."""


class SshBacking(Protocol):
    """Containers that run for real, reached over SSH (tests/ctfix.py's ChrootCluster)."""

    def address(self, vmid: int) -> str: ...

    def create(self, vmid: int, hostname: str, authorized_keys: str) -> list[str]: ...

    def start(self, vmid: int) -> None: ...

    def stop(self, vmid: int) -> None: ...

    def snapshot(self, vmid: int, name: str) -> None: ...

    def rollback(self, vmid: int, name: str) -> None: ...

    def destroy(self, vmid: int) -> None: ...

    def lease(self, vmid: int, address: str) -> None: ...


@dataclass
class Node:
    name: str
    maxmem: int = 64 * GB
    mem: int = 4 * GB
    maxcpu: int = 16
    status: str = "online"


@dataclass
class Storage:
    name: str
    content: set[str]
    nodes: set[str]
    volumes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Container:
    vmid: int
    node: str
    config: dict[str, str]
    status: str = "stopped"
    lock: str | None = None
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    interface_calls: int = 0
    plan: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)

    @property
    def memory_bytes(self) -> int:
        return int(self.config.get("memory", "512")) * MB


@dataclass
class Task:
    upid: str
    node: str
    type: str
    id: str
    user: str
    pid: int
    pstart: int
    starttime: int
    status: str = "running"
    exitstatus: str | None = None
    endtime: int | None = None
    log: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def as_status(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "upid": self.upid, "node": self.node, "pid": self.pid, "pstart": self.pstart,
            "starttime": self.starttime, "type": self.type, "id": self.id,
            "user": self.user, "status": self.status,
        }
        if self.exitstatus is not None:
            data["exitstatus"] = self.exitstatus
        return data

    def as_list_entry(self) -> dict[str, Any]:
        """As `GET /nodes/{node}/tasks` lists it: a finished task's `status` is its exit
        status, with its `endtime`."""
        data = {k: v for k, v in self.as_status().items() if k not in ("status", "exitstatus")}
        if self.exitstatus is not None:
            data.update(status=self.exitstatus, endtime=self.endtime)
        return data


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: dict[str, str]
    user: str


class PveDouble:
    """The cluster's state and its HTTPS API. Use as a context manager or start/stop."""

    def __init__(
        self,
        folder: Path,
        nodes: tuple[Node, ...] = (Node("pve1"), Node("pve2", mem=8 * GB)),
        backing_root: Path | None = None,
        task_seconds: float = 0.02,
        ssh_backing: SshBacking | None = None,
    ) -> None:
        self.folder = folder
        self.schema = Schema()
        self.nodes = {n.name: n for n in nodes}
        node_names = set(self.nodes)
        self.storages = {
            "local": Storage("local", {"vztmpl", "iso", "backup"}, node_names,
                             [_template_volume(DEFAULT_TEMPLATE)]),
            "local-lvm": Storage("local-lvm", {"rootdir", "images"}, node_names),
        }
        self.containers: dict[int, Container] = {}
        self.tasks: dict[str, Task] = {}
        self.backing_root = backing_root
        self.ssh_backing = ssh_backing
        self.task_seconds = task_seconds
        self.ticket_lifetime = 7200.0
        self.interface_plan = ["link-local", "address"]
        self.next_lease: dict[int, str] = {}
        self.interfaces_style = "both"
        # Seconds a new container stays unseen by /cluster/nextid, as when the cluster file
        # system has not carried its config to the node answering yet: provisions race.
        self.nextid_lag = 0.0
        self.requests: list[Request] = []
        self.logins = 0
        self._log_gate = threading.Event()
        self._log_gate.set()
        self.task_log_asked = threading.Event()
        self._users: dict[str, str] = {}
        self._tokens: dict[str, str] = {}
        self._tickets: dict[str, tuple[str, float, str]] = {}
        self._faults: dict[str, list[tuple[str, str | int]]] = {}
        self._lock = threading.RLock()
        self._pids = itertools.count(0x1A2B00)
        self._threads: list[threading.Thread] = []
        self.tls: TlsFiles | None = None
        self._server: ThreadingHTTPServer | None = None
        self._routes = self._route_table()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> Self:
        self.tls = make_tls(self.folder / "tls")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.tls.server_cert, self.tls.server_key)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        # The handshake runs in the handler's thread, so one slow client stalls nobody.
        server.socket = context.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
        server.double = self  # type: ignore[attr-defined]  # read by _Handler
        self._server = server
        thread = threading.Thread(target=server.serve_forever, name="pve-double", daemon=True)
        thread.start()
        return self

    def stop(self) -> None:
        self._log_gate.set()  # no request left waiting
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "the double is not started"
        return int(self._server.server_address[1])

    @property
    def ca_path(self) -> Path:
        assert self.tls is not None, "the double is not started"
        return self.tls.ca_cert

    # -- what tests set up ------------------------------------------------------------

    def add_user(self, user: str, password: str) -> None:
        self._users[user] = password

    def add_token(self, user: str, name: str) -> str:
        """Create API token USER!NAME; returns its secret."""
        secret = str(uuid.uuid4())
        self._tokens[f"{user}!{name}"] = secret
        return secret

    def add_template(self, volid: str) -> None:
        storage = self.storages[volid.split(":", 1)[0]]
        storage.volumes.append(_template_volume(volid))

    def fail_next(self, task_type: str, message: str) -> None:
        """The next task of `task_type` fails with `message` (its exit status)."""
        self._faults.setdefault(task_type, []).append(("error", message))

    def warn_next(self, task_type: str, count: int) -> None:
        """The next task of `task_type` ends with `WARNINGS: count`."""
        self._faults.setdefault(task_type, []).append(("warn", count))

    def lock(self, vmid: int, reason: str | None) -> None:
        with self._lock:
            self.containers[vmid].lock = reason

    def revoke_tickets(self) -> None:
        """Every ticket stops working, as after its expiry."""
        with self._lock:
            self._tickets.clear()

    def hold_task_logs(self) -> None:
        """Task log reads wait from now on until `release_task_logs()`."""
        self.task_log_asked.clear()
        self._log_gate.clear()

    def release_task_logs(self) -> None:
        self._log_gate.set()

    def params_of(self, method: str, suffix: str) -> list[dict[str, str]]:
        """The parameters of each request whose path ends with `suffix`."""
        return [r.params for r in self.requests if r.method == method and
                r.path.endswith(suffix)]

    # -- request handling -------------------------------------------------------------

    def handle(
        self, method: str, raw_path: str, body: bytes, headers: Any
    ) -> tuple[int, str, Any]:
        """Answer one request: (status, reason, JSON body)."""
        try:
            return 200, "OK", {"data": self._dispatch(method, raw_path, body, headers)}
        except SchemaError as exc:
            return 400, "Parameter verification failed.", {"data": None, "errors": exc.errors}
        except PveError as exc:
            body_out: dict[str, Any] = {"data": None, "message": exc.message + "\n"}
            if exc.errors:
                body_out["errors"] = exc.errors
            return exc.status, exc.message, body_out

    def _dispatch(self, method: str, raw_path: str, body: bytes, headers: Any) -> Any:
        url = urllib.parse.urlsplit(raw_path)
        if not url.path.startswith(API_PREFIX + "/"):
            raise PveError(404, "Not Found")
        path = url.path[len(API_PREFIX):].rstrip("/") or "/"
        params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        if body:
            params.update(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))

        found = self.schema.find(path)
        endpoint = self.schema.endpoint(found[0], method) if found else None
        if found is None or endpoint is None:
            raise PveError(501, f"Method '{method} {path}' not implemented")
        template, path_params = found
        user = "" if template == "/access/ticket" else self._authenticate(method, headers)
        params.update({k: urllib.parse.unquote(v) for k, v in path_params.items()})
        self.schema.check(endpoint, params)
        with self._lock:
            self.requests.append(Request(method, path, dict(params), user))

        route = self._routes.get((method, template))
        if route is None:
            raise PveError(501, f"Method '{method} {template}' not implemented by the double")
        return route(params, user)

    def _authenticate(self, method: str, headers: Any) -> str:
        authorization = headers.get("Authorization", "")
        if authorization.startswith("PVEAPIToken="):
            token_id, _, secret = authorization[len("PVEAPIToken="):].partition("=")
            if self._tokens.get(token_id) != secret or not secret:
                raise PveError(401, "invalid token value!")
            return token_id
        cookie = _cookie(headers.get("Cookie", ""), "PVEAuthCookie")
        if not cookie:
            raise PveError(401, "No ticket")
        with self._lock:
            entry = self._tickets.get(cookie)
        if entry is None or time.monotonic() - entry[1] > self.ticket_lifetime:
            raise PveError(401, "invalid PVE ticket")
        if method != "GET" and headers.get("CSRFPreventionToken") != entry[2]:
            raise PveError(401, "Permission denied - invalid csrf token")
        return entry[0]

    def _route_table(self) -> dict[tuple[str, str], Callable[[dict[str, str], str], Any]]:
        lxc = "/nodes/{node}/lxc/{vmid}"
        return {
            ("POST", "/access/ticket"): self._create_ticket,
            ("GET", "/version"): lambda p, u: {"version": "9.1.1", "release": "9.1"},
            ("GET", "/nodes"): self._list_nodes,
            ("GET", "/nodes/{node}/status"): self._node_status,
            ("GET", "/cluster/resources"): self._resources,
            ("GET", "/cluster/nextid"): self._nextid,
            ("GET", "/nodes/{node}/lxc"): self._list_containers,
            ("POST", "/nodes/{node}/lxc"): self._create,
            ("GET", lxc): lambda p, u: [{"subdir": s} for s in ("config", "status", "snapshot")],
            ("DELETE", lxc): self._destroy,
            ("GET", f"{lxc}/config"): lambda p, u: dict(self._ct(p).config),
            ("GET", f"{lxc}/status/current"): self._current,
            ("POST", f"{lxc}/status/start"): self._start,
            ("POST", f"{lxc}/status/stop"): lambda p, u: self._halt(p, u, "vzstop"),
            ("POST", f"{lxc}/status/shutdown"): lambda p, u: self._halt(p, u, "vzshutdown"),
            ("GET", f"{lxc}/interfaces"): self._interfaces,
            ("GET", f"{lxc}/snapshot"): self._list_snapshots,
            ("POST", f"{lxc}/snapshot"): self._snapshot,
            ("DELETE", f"{lxc}/snapshot/{{snapname}}"): self._delete_snapshot,
            ("POST", f"{lxc}/snapshot/{{snapname}}/rollback"): self._rollback,
            ("GET", "/nodes/{node}/storage/{storage}/content"): self._content,
            ("GET", "/nodes/{node}/tasks"): self._list_tasks,
            ("GET", "/nodes/{node}/tasks/{upid}/status"): self._task_status,
            ("GET", "/nodes/{node}/tasks/{upid}/log"): self._task_log,
        }

    # -- access -----------------------------------------------------------------------

    def _create_ticket(self, params: dict[str, str], user: str) -> dict[str, Any]:
        username, password = params["username"], params["password"]
        with self._lock:
            renewing = self._tickets.get(password)
            fresh = renewing is not None and \
                time.monotonic() - renewing[1] <= self.ticket_lifetime
            if not (fresh and renewing and renewing[0] == username) and \
                    self._users.get(username) != password:
                raise PveError(401, "authentication failure")
            now = int(time.time())
            ticket = f"PVE:{username}:{now:08X}::" + \
                base64.b64encode(secrets.token_bytes(48)).decode()
            csrf = f"{now:08X}:" + base64.b64encode(secrets.token_bytes(24)).decode()
            self._tickets[ticket] = (username, time.monotonic(), csrf)
            self.logins += 1
        return {"username": username, "ticket": ticket, "CSRFPreventionToken": csrf,
                "clustername": "zlh-test"}

    # -- nodes and resources ----------------------------------------------------------

    def _node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise PveError(595, f"no such cluster node '{name}'")
        if node.status != "online":
            raise PveError(595, f"Connection refused - node '{name}' is offline")
        return node

    def _list_nodes(self, params: dict[str, str], user: str) -> list[dict[str, Any]]:
        return [self._node_entry(n) for n in self.nodes.values()]

    def _node_status(self, params: dict[str, str], user: str) -> dict[str, Any]:
        node = self._node(params["node"])
        return {"memory": {"total": node.maxmem, "used": node.mem,
                           "free": node.maxmem - node.mem}, "cpuinfo": {"cpus": node.maxcpu}}

    def _node_entry(self, node: Node) -> dict[str, Any]:
        return {"id": f"node/{node.name}", "type": "node", "node": node.name,
                "status": node.status, "maxmem": node.maxmem, "mem": node.mem,
                "maxcpu": node.maxcpu, "cpu": 0.02}

    def _resources(self, params: dict[str, str], user: str) -> list[dict[str, Any]]:
        kind = params.get("type")
        entries: list[dict[str, Any]] = []
        with self._lock:
            if kind in (None, "node"):
                entries += [self._node_entry(n) for n in self.nodes.values()]
            if kind in (None, "vm"):
                entries += [self._vm_entry(ct) for ct in self.containers.values()]
            if kind in (None, "storage"):
                entries += [self._storage_entry(s, n) for s in self.storages.values()
                            for n in sorted(s.nodes)]
        return entries

    def _vm_entry(self, ct: Container) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "id": f"lxc/{ct.vmid}", "type": "lxc", "vmid": ct.vmid, "node": ct.node,
            "name": ct.config.get("hostname", f"CT{ct.vmid}"), "status": ct.status,
            "template": 0, "maxmem": ct.memory_bytes, "tags": ct.config.get("tags", ""),
        }
        if ct.lock:
            entry["lock"] = ct.lock
        return entry

    def _storage_entry(self, storage: Storage, node: str) -> dict[str, Any]:
        return {"id": f"storage/{node}/{storage.name}", "type": "storage",
                "storage": storage.name, "node": node, "status": "available",
                "content": ",".join(sorted(storage.content))}

    def _nextid(self, params: dict[str, str], user: str) -> int:
        with self._lock:
            if "vmid" in params:
                wanted = int(params["vmid"])
                if wanted in self.containers:
                    raise SchemaError({"vmid": f"VM {wanted} already exists"})
                return wanted
            now = time.monotonic()
            seen = {v for v, ct in self.containers.items() if now - ct.created >= self.nextid_lag}
            return next(v for v in itertools.count(100) if v not in seen)

    def _storage(self, name: str, node: str, content: str | None = None) -> Storage:
        storage = self.storages.get(name)
        if storage is None or node not in storage.nodes:
            raise PveError(500, f"storage '{name}' does not exist")
        if content and content not in storage.content:
            raise PveError(500, f"storage '{name}' does not support {_content_words(content)}")
        return storage

    def _content(self, params: dict[str, str], user: str) -> list[dict[str, Any]]:
        self._node(params["node"])
        storage = self._storage(params["storage"], params["node"])
        wanted = params.get("content")
        return [dict(v) for v in storage.volumes if wanted in (None, v["content"])]

    # -- containers -------------------------------------------------------------------

    def _ct(self, params: dict[str, str]) -> Container:
        vmid = int(params["vmid"])
        with self._lock:
            ct = self.containers.get(vmid)
        if ct is None or ct.node != params["node"]:
            raise PveError(500, f"Configuration file 'nodes/{params['node']}/lxc/{vmid}.conf' "
                                "does not exist")
        return ct

    def _list_containers(self, params: dict[str, str], user: str) -> list[dict[str, Any]]:
        self._node(params["node"])
        with self._lock:
            return [{"vmid": ct.vmid, "name": ct.config.get("hostname", ""),
                     "status": ct.status, "tags": ct.config.get("tags", "")}
                    for ct in self.containers.values() if ct.node == params["node"]]

    def _create(self, params: dict[str, str], user: str) -> str:
        node = self._node(params["node"])
        vmid = int(params["vmid"])
        rootfs = parse_property_string(params.get("rootfs", "local:4"), "volume")["volume"]
        self._storage(rootfs.split(":", 1)[0], node.name, "rootdir")
        self._storage(params["ostemplate"].split(":", 1)[0], node.name, "vztmpl")
        config = {k: v for k, v in params.items() if k not in ("node", "vmid", "password",
                                                                 "ostemplate", "start")}
        config["rootfs"] = f"{rootfs.split(':', 1)[0]}:vm-{vmid}-disk-0,size=" \
                           f"{rootfs.split(':', 1)[1]}G"
        with self._lock:
            existing = self.containers.get(vmid)
            if existing is not None:
                raise PveError(500, f"CT {vmid} already exists on node '{existing.node}'")
            ct = Container(vmid, node.name, config, lock="create")
            self.containers[vmid] = ct
            node.mem += ct.memory_bytes
        start = params.get("start", "0") in ("1", "true", "yes", "on")
        template = params["ostemplate"]
        # A create that fails removes what it made, as pve-container does.
        return self._spawn(node.name, "vzcreate", str(vmid), user,
                           lambda task: self._finish_create(ct, template, start, task),
                           undo=lambda: self._forget(ct))

    def _finish_create(self, ct: Container, template: str, start: bool, task: Task) -> None:
        storage = self.storages[template.split(":", 1)[0]]
        if not any(v["volid"] == template for v in storage.volumes):
            raise TaskFailed(f"unable to create CT {ct.vmid} - volume '{template}' "
                             "does not exist")
        task.log.append(f"extracting archive '{template}'")
        folder = self._backing(ct.vmid)
        if folder is not None:
            keys = folder / "root/.ssh/authorized_keys"
            keys.parent.mkdir(parents=True, exist_ok=True)
            keys.write_text(ct.config.get("ssh-public-keys", ""))
        if self.ssh_backing is not None:
            hostname = ct.config.get("hostname", f"CT{ct.vmid}")
            made = self.ssh_backing.create(ct.vmid, hostname,
                                           ct.config.get("ssh-public-keys", ""))
            for kind, fingerprint in zip(("ed25519", "ecdsa"), made, strict=False):
                created = f"Creating SSH host key 'ssh_host_{kind}_key' - this may take " \
                    "some time ..."
                task.log += [created, f"done: {fingerprint} root@{hostname}"]
        with self._lock:
            ct.lock = None
        if start:
            self._set_running(ct)

    def _forget(self, ct: Container) -> None:
        with self._lock:
            if self.containers.get(ct.vmid) is ct:
                del self.containers[ct.vmid]
                self.nodes[ct.node].mem -= ct.memory_bytes
        if self.ssh_backing is not None:
            self.ssh_backing.destroy(ct.vmid)
        folder = self._backing(ct.vmid)
        if folder is not None and folder.exists():
            shutil.rmtree(folder)

    def _backing(self, vmid: int) -> Path | None:
        return None if self.backing_root is None else self.backing_root / str(vmid)

    def _check_lock(self, ct: Container, params: dict[str, str]) -> None:
        if ct.lock and params.get("skiplock") not in ("1", "true"):
            raise PveError(500, f"CT is locked ({ct.lock})")

    def _current(self, params: dict[str, str], user: str) -> dict[str, Any]:
        ct = self._ct(params)
        data = {"vmid": ct.vmid, "status": ct.status, "name": ct.config.get("hostname", ""),
                "maxmem": ct.memory_bytes, "cpus": int(ct.config.get("cores", "1")),
                "ha": {"managed": 0}}
        if ct.lock:
            data["lock"] = ct.lock
        return data

    def _start(self, params: dict[str, str], user: str) -> str:
        ct = self._ct(params)
        self._check_lock(ct, params)
        if ct.status == "running":
            raise PveError(500, f"CT {ct.vmid} already running")
        return self._spawn(ct.node, "vzstart", str(ct.vmid), user,
                           lambda task: self._set_running(ct))

    def _set_running(self, ct: Container) -> None:
        if self.ssh_backing is not None:
            with self._lock:
                lease = self.next_lease.pop(ct.vmid, None)
            if lease is not None:
                self.ssh_backing.lease(ct.vmid, lease)
            self.ssh_backing.start(ct.vmid)
        with self._lock:
            ct.status = "running"
            ct.interface_calls = 0
            ct.plan = list(self.interface_plan)

    def _halt(self, params: dict[str, str], user: str, kind: str) -> str:
        ct = self._ct(params)
        self._check_lock(ct, params)
        if ct.status != "running":
            raise PveError(500, f"CT {ct.vmid} not running")
        return self._spawn(ct.node, kind, str(ct.vmid), user, lambda task: self._set_stopped(ct))

    def _set_stopped(self, ct: Container) -> None:
        if self.backing_root is not None:
            # A stopped container takes every process inside it down, its agent too.
            from zlh.providers.local import LocalProvider

            LocalProvider(self.backing_root).stop_agent(str(ct.vmid), timeout=20.0)
        if self.ssh_backing is not None:
            self.ssh_backing.stop(ct.vmid)
        with self._lock:
            ct.status = "stopped"

    def _destroy(self, params: dict[str, str], user: str) -> str:
        ct = self._ct(params)
        self._check_lock(ct, params)
        force = params.get("force") in ("1", "true")
        if ct.status == "running" and not force:
            raise PveError(500, f"CT {ct.vmid} is running - destroy failed")
        return self._spawn(ct.node, "vzdestroy", str(ct.vmid), user,
                           lambda task: self._finish_destroy(ct))

    def _finish_destroy(self, ct: Container) -> None:
        if ct.status == "running":
            self._set_stopped(ct)
        self._forget(ct)

    def _interfaces(self, params: dict[str, str], user: str) -> list[dict[str, Any]] | None:
        ct = self._ct(params)
        with self._lock:
            if ct.status != "running":
                return None
            stage = ct.plan[min(ct.interface_calls, len(ct.plan) - 1)] if ct.plan else "address"
            ct.interface_calls += 1
        return self._interface_list(ct, stage)

    def _interface_list(self, ct: Container, stage: str) -> list[dict[str, Any]]:
        if stage == "empty":
            return []
        mac = f"bc:24:11:00:{ct.vmid // 256 % 256:02x}:{ct.vmid % 256:02x}"
        link_local = f"{LINK_LOCAL_PREFIX}{ct.vmid % 65536:x}"
        addresses = [("inet6", link_local, 64)]
        if stage == "address":
            addresses.insert(0, ("inet", self.address_of(ct), 24))
        return [self._iface("lo", "00:00:00:00:00:00", [("inet", "127.0.0.1", 8),
                                                         ("inet6", "::1", 128)]),
                self._iface("eth0", mac, addresses)]

    def _iface(self, name: str, mac: str, addresses: list[tuple[str, str, int]]) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": name, "hwaddr": mac, "hardware-address": mac}
        if self.interfaces_style in ("both", "inet"):
            for kind, address, prefix in addresses:
                entry[kind] = f"{address}/{prefix}"
        if self.interfaces_style in ("both", "ip-addresses"):
            entry["ip-addresses"] = [
                {"ip-address": a, "ip-address-type": k, "prefix": p} for k, a, p in addresses
            ]
        return entry

    def address_of(self, ct: Container) -> str:
        """A backed container answers on loopback; others get a static or a 127.77.x.y one."""
        if self.backing_root is not None:
            return "127.0.0.1"
        if self.ssh_backing is not None:
            return self.ssh_backing.address(ct.vmid)
        net = parse_property_string(ct.config.get("net0", ""))
        if net.get("ip", "dhcp") not in ("dhcp", "manual"):
            return net["ip"].split("/")[0]
        return f"127.77.{ct.vmid // 250 % 250}.{ct.vmid % 250 + 1}"

    # -- snapshots --------------------------------------------------------------------

    def _list_snapshots(self, params: dict[str, str], user: str) -> list[dict[str, Any]]:
        ct = self._ct(params)
        entries = [{"name": n, "description": s["description"], "snaptime": s["snaptime"]}
                   for n, s in ct.snapshots.items()]
        return entries + [{"name": "current", "description": "You are here!",
                           "running": int(ct.status == "running")}]

    def _snapshot(self, params: dict[str, str], user: str) -> str:
        ct = self._ct(params)
        self._check_lock(ct, params)
        name = params["snapname"]
        if name in RESERVED_SNAPSHOTS:
            raise PveError(500, f"unable to use snapshot name '{name}' (reserved name)")
        if name in ct.snapshots:
            raise PveError(500, f"snapshot name '{name}' already used")
        with self._lock:
            ct.lock = "snapshot"

        def work(task: Task) -> None:
            if self.ssh_backing is not None:
                self.ssh_backing.snapshot(ct.vmid, name)
            with self._lock:
                ct.snapshots[name] = {"description": params.get("description", ""),
                                      "snaptime": int(time.time()),
                                      "config": dict(ct.config)}
                ct.lock = None

        return self._spawn(ct.node, "vzsnapshot", str(ct.vmid), user, work)

    def _known_snapshot(self, ct: Container, name: str) -> dict[str, Any]:
        if name not in ct.snapshots:
            raise PveError(500, f"snapshot '{name}' does not exist")
        return ct.snapshots[name]

    def _rollback(self, params: dict[str, str], user: str) -> str:
        ct = self._ct(params)
        self._check_lock(ct, params)
        snapshot = self._known_snapshot(ct, params["snapname"])

        start = params.get("start") in ("1", "true")

        def work(task: Task) -> None:
            # As Proxmox does: a running container is stopped first; `start` starts it after.
            if ct.status == "running":
                self._set_stopped(ct)
            if self.ssh_backing is not None:
                self.ssh_backing.rollback(ct.vmid, params["snapname"])
            with self._lock:
                ct.config = dict(snapshot["config"])
            if start:
                self._set_running(ct)

        return self._spawn(ct.node, "vzrollback", str(ct.vmid), user, work)

    def _delete_snapshot(self, params: dict[str, str], user: str) -> str:
        ct = self._ct(params)
        self._known_snapshot(ct, params["snapname"])

        def work(task: Task) -> None:
            with self._lock:
                ct.snapshots.pop(params["snapname"], None)

        return self._spawn(ct.node, "vzdelsnapshot", str(ct.vmid), user, work)

    # -- tasks ------------------------------------------------------------------------

    def _spawn(self, node: str, kind: str, ident: str, user: str,
               work: Callable[[Task], None], undo: Callable[[], None] | None = None) -> str:
        """Run `work` as a task; when the task fails (scripted or not), `undo` runs."""
        pid, pstart, start = next(self._pids), 0x0C0FFEE, int(time.time())
        upid = f"UPID:{node}:{pid:08X}:{pstart:08X}:{start:08X}:{kind}:{ident}:{user}:"
        task = Task(upid, node, kind, ident, user, pid, pstart, start)
        with self._lock:
            fault = self._faults.get(kind, [])
            scripted = fault.pop(0) if fault else None
            self.tasks[upid] = task
        thread = threading.Thread(target=self._run_task, args=(task, work, scripted, undo),
                                  name=f"pve-task-{kind}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return upid

    def _run_task(self, task: Task, work: Callable[[Task], None],
                  scripted: tuple[str, str | int] | None,
                  undo: Callable[[], None] | None) -> None:
        # The pause stands for the work a real node does; tests see `running` first.
        task.done.wait(self.task_seconds)
        try:
            if scripted is not None and scripted[0] == "error":
                raise TaskFailed(str(scripted[1]))
            work(task)
        except TaskFailed as exc:
            if undo is not None:
                undo()
            self._end_task(task, str(exc), f"TASK ERROR: {exc}")
            return
        except Exception as exc:  # a bug in the double: make it visible in the task
            log.exception("task %s crashed", task.upid)
            self._end_task(task, f"double crashed: {exc}", f"TASK ERROR: {exc}")
            return
        if scripted is not None and scripted[0] == "warn":
            count = int(scripted[1])
            task.log += [f"WARN: scripted warning {n + 1}" for n in range(count)]
            self._end_task(task, f"WARNINGS: {count}", f"TASK WARNINGS: {count}")
        else:
            self._end_task(task, "OK", "TASK OK")

    def _end_task(self, task: Task, exitstatus: str, last_line: str) -> None:
        with self._lock:
            task.log.append(last_line)
            task.exitstatus = exitstatus
            task.endtime = int(time.time())
            task.status = "stopped"
        task.done.set()

    def _task(self, params: dict[str, str]) -> Task:
        with self._lock:
            task = self.tasks.get(params["upid"])
        if task is None or task.node != params["node"]:
            raise PveError(500, f"unable to parse worker upid '{params['upid']}'")
        return task

    def _task_status(self, params: dict[str, str], user: str) -> dict[str, Any]:
        with self._lock:
            return self._task(params).as_status()

    def _list_tasks(self, params: dict[str, str], user: str) -> list[dict[str, Any]]:
        """The node's tasks, newest first, filtered as Proxmox filters them."""
        node = self._node(params["node"]).name
        source = params.get("source", "archive")
        wanted = {"archive": ("stopped",), "active": ("running",),
                  "all": ("stopped", "running")}[source]
        with self._lock:
            tasks = [t for t in self.tasks.values() if t.node == node and t.status in wanted]
        if "vmid" in params:
            tasks = [t for t in tasks if t.id == params["vmid"]]
        if "typefilter" in params:
            tasks = [t for t in tasks if t.type.startswith(params["typefilter"])]
        if "userfilter" in params:
            tasks = [t for t in tasks if params["userfilter"] in t.user]
        if params.get("errors") in ("1", "true"):
            tasks = [t for t in tasks if t.exitstatus not in (None, "OK")]
        tasks.sort(key=lambda t: (t.starttime, t.pid), reverse=True)
        start, limit = int(params.get("start", "0")), int(params.get("limit", "50"))
        with self._lock:
            return [t.as_list_entry() for t in tasks[start:start + limit]]

    def _task_log(self, params: dict[str, str], user: str) -> list[dict[str, Any]]:
        self.task_log_asked.set()
        self._log_gate.wait()
        task = self._task(params)
        start, limit = int(params.get("start", "0")), int(params.get("limit", "50"))
        with self._lock:
            lines = list(enumerate(task.log, 1))[start:start + limit]
        return [{"n": n, "t": text} for n, text in lines]


def _template_volume(volid: str) -> dict[str, Any]:
    return {"volid": volid, "content": "vztmpl", "format": "tzst", "size": 126_000_000,
            "ctime": 1_700_000_000}


def _content_words(content: str) -> str:
    return {"rootdir": "container directories", "vztmpl": "container templates"}.get(
        content, content)


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return urllib.parse.unquote(value)
    return ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        double: PveDouble = self.server.double  # type: ignore[attr-defined]
        status, reason, payload = double.handle(self.command, self.path, body, self.headers)
        data = json.dumps(payload).encode()
        # Proxmox puts its message in the status line; it must be one latin-1 line there.
        reason = reason.replace("\r", " ").replace("\n", " ")
        self.send_response(status, reason.encode("latin-1", "replace").decode("latin-1"))
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        try:
            self.end_headers()
            self.wfile.write(data)
        except OSError as exc:  # ssl.SSLError too: the client went away (a killed zlh)
            log.debug("pve double: answer to a client that left: %s", exc)
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("pve double: " + format, *args)
