"""The inventory: what servers exist, where, and what happened to them.

One SQLite file (`zlh_home()/inventory.db`) in WAL mode, so `zlh` commands and cron jobs
can read while one of them writes. A server's name is its primary key: of two processes
adding the same name, exactly one wins and the other gets ConflictError.

Agent tokens are not in the database: they live in files of mode 0600 (`write_secret`),
and a server row only keeps the path.
"""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import re
import secrets
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from zlh.errors import ConfigError, ConflictError, NotFoundError, UsageError
from zlh.paths import STATE_MODE, inventory_path

SERVER_NAME = re.compile(r"[a-z][a-z0-9-]{0,30}")
STATUSES = ("provisioning", "ready", "failed", "deleting")
Status = Literal["provisioning", "ready", "failed", "deleting"]
BUSY_TIMEOUT_MS = 10_000
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE servers (
    name TEXT PRIMARY KEY,
    playbook TEXT NOT NULL,
    provider TEXT NOT NULL,
    provider_id TEXT,
    address TEXT,
    agent_port INTEGER,
    ports TEXT NOT NULL DEFAULT '{}',
    "values" TEXT NOT NULL DEFAULT '{}',
    token_path TEXT,
    step TEXT,
    status TEXT NOT NULL CHECK (status IN ('provisioning', 'ready', 'failed', 'deleting')),
    owner TEXT,
    tier TEXT,
    resources TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    server TEXT NOT NULL REFERENCES servers (name) ON DELETE CASCADE,
    time REAL NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX history_by_server ON history (server, id);
"""


Admission = Callable[[list["Server"]], None]
"""Called with every stored server before a new one is added; raises to refuse it."""


def check_name(name: str) -> str:
    """A server name: lowercase letter, then letters, digits and '-', 31 at most."""
    if not SERVER_NAME.fullmatch(name):
        raise UsageError(f"invalid server name {name!r}: use a lowercase letter, then "
                         "lowercase letters, digits or '-' (31 characters at most)")
    return name


@dataclass(frozen=True)
class Server:
    name: str
    playbook: str
    provider: str
    provider_id: str | None = None
    address: str | None = None
    agent_port: int | None = None
    ports: dict[str, int] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)
    token_path: str | None = None
    step: str | None = None
    status: Status = "provisioning"
    owner: str | None = None
    tier: str | None = None
    resources: dict[str, int] = field(default_factory=dict)  # the tier's, when provisioned
    created_at: float = 0.0  # set by Inventory.add
    updated_at: float = 0.0


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    server: str
    time: float
    event: str
    detail: str


SERVER_COLUMNS = tuple(f.name for f in fields(Server))
UPDATABLE = frozenset(SERVER_COLUMNS) - {"name", "created_at", "updated_at"}
JSON_COLUMNS = ("ports", "values", "resources")
# Statements that bring a database of version N (the key) to N + 1.
MIGRATIONS = {
    1: ("ALTER TABLE servers ADD COLUMN owner TEXT",
        "ALTER TABLE servers ADD COLUMN tier TEXT",
        "ALTER TABLE servers ADD COLUMN resources TEXT NOT NULL DEFAULT '{}'"),
}


class Inventory:
    """The inventory database; one connection, used from one thread."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else inventory_path()
        self.path.parent.mkdir(mode=STATE_MODE, parents=True, exist_ok=True)
        # Autocommit mode: every write below opens its own explicit transaction.
        self._db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA foreign_keys = ON")
        # Switching a new file to WAL fails at once ("database is locked", no busy wait)
        # while another process does the same; a file lock serialises the setup.
        with _setup_lock(self.path):
            if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self._db.execute("PRAGMA journal_mode = WAL")
            self._migrate()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Inventory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a read-then-write cannot be
        # overtaken by another process between the two.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version < SCHEMA_VERSION:
                for step in range(version, SCHEMA_VERSION):
                    for statement in MIGRATIONS[step]:
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise ConfigError(f"{self.path}: inventory schema {version} is newer than "
                                  f"this zlh knows ({SCHEMA_VERSION}); upgrade zlh")

    # -- servers ---------------------------------------------------------------------

    def add(self, server: Server, admit: Admission | None = None) -> Server:
        """Store a new server; ConflictError if the name is taken.

        `admit` sees the servers stored when the new one is added, in the same write
        transaction, and refuses it by raising: of two processes adding at once, the
        second sees the first's server (quotas, zlh/tiers.py).
        """
        check_name(server.name)
        _check_status(server.status)
        now = time.time()
        row = _to_row(server) | {"created_at": now, "updated_at": now}
        columns = ", ".join(f'"{c}"' for c in row)
        marks = ", ".join("?" for _ in row)
        try:
            with self._write() as db:
                if admit is not None:
                    admit([_from_row(r) for r in db.execute("SELECT * FROM servers")])
                db.execute(f"INSERT INTO servers ({columns}) VALUES ({marks})",
                           tuple(row.values()))
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
                raise ConflictError(f"a server named {server.name} already exists") from None
            raise
        return self.get(server.name)

    def find(self, name: str) -> Server | None:
        row = self._db.execute("SELECT * FROM servers WHERE name = ?", (name,)).fetchone()
        return None if row is None else _from_row(row)

    def get(self, name: str) -> Server:
        server = self.find(name)
        if server is None:
            raise NotFoundError(f"no server named {name!r}")
        return server

    def list(self) -> builtins.list[Server]:
        rows = self._db.execute("SELECT * FROM servers ORDER BY name").fetchall()
        return [_from_row(row) for row in rows]

    def update(self, name: str, **changes: Any) -> Server:
        """Change some fields of a server (not its name); returns the stored server."""
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise TypeError(f"not updatable: {', '.join(sorted(unknown))}")
        if "status" in changes:
            _check_status(changes["status"])
        row = _to_row_fields(changes) | {"updated_at": time.time()}
        assignments = ", ".join(f'"{column}" = ?' for column in row)
        with self._write() as db:
            cursor = db.execute(f"UPDATE servers SET {assignments} WHERE name = ?",
                                (*row.values(), name))
        if cursor.rowcount == 0:
            raise NotFoundError(f"no server named {name!r}")
        return self.get(name)

    def remove(self, name: str) -> None:
        """Forget a server and its history."""
        with self._write() as db:
            cursor = db.execute("DELETE FROM servers WHERE name = ?", (name,))
        if cursor.rowcount == 0:
            raise NotFoundError(f"no server named {name!r}")

    # -- history ---------------------------------------------------------------------

    def record(self, name: str, event: str, detail: str = "") -> None:
        """Append an event to a server's history."""
        try:
            with self._write() as db:
                db.execute("INSERT INTO history (server, time, event, detail) "
                           "VALUES (?, ?, ?, ?)", (name, time.time(), event, detail))
        except sqlite3.IntegrityError:  # the foreign key: no such server
            raise NotFoundError(f"no server named {name!r}") from None

    def history(self, name: str) -> builtins.list[HistoryEntry]:
        """A server's events, oldest first."""
        self.get(name)
        rows = self._db.execute("SELECT * FROM history WHERE server = ? ORDER BY id",
                                (name,)).fetchall()
        return [HistoryEntry(**dict(row)) for row in rows]


@contextmanager
def _setup_lock(db_path: Path) -> Iterator[None]:
    lock_path = db_path.with_name(db_path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")


def _to_row(server: Server) -> dict[str, Any]:
    return _to_row_fields(asdict(server))


def _to_row_fields(values: dict[str, Any]) -> dict[str, Any]:
    return {
        key: json.dumps(value, sort_keys=True) if key in JSON_COLUMNS else value
        for key, value in values.items()
    }


def _from_row(row: sqlite3.Row) -> Server:
    values = dict(row)
    for key in JSON_COLUMNS:
        values[key] = json.loads(values[key])
    return Server(**values)


# -- secrets ---------------------------------------------------------------------------


def write_secret(path: Path, text: str) -> None:
    """Write `text` to `path`, a file of mode 0600 from its first byte on.

    The text goes to a new file created with O_EXCL and mode 0600, which then replaces
    `path` atomically: a reader sees the old secret or the new one, never a partial one,
    and no moment exists where the file is readable by others.
    """
    path.parent.mkdir(mode=STATE_MODE, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def read_secret(path: Path) -> str:
    """The secret in `path`, without surrounding whitespace.

    Refused (ConfigError) when the file is readable or writable by group or others.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFoundError(f"secret file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"secret file {path} is not a regular file")
    with os.fdopen(fd, encoding="utf-8") as handle:
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        if mode & 0o077:
            raise ConfigError(f"secret file {path} is open to others (mode {mode:04o}); "
                              f"run: chmod 600 {path}")
        return handle.read().strip()
