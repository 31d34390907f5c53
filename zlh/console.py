"""Core console operations: the last lines, a live follow, and sending a line.

A server's console is its game process's console on the agent (a dev container's: its
IDE's). Records are
`ConsoleLine` (`seq`, `ts`, `text`) or `ConsoleGap` (`seq`, `lost`) from agentd.models.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zlh import records
from zlh.errors import NotFoundError

if TYPE_CHECKING:
    from zlh.agent_client import AgentClient, ConsoleRecord

PAGE = 1000
MAX_PAGES = 1000  # a console ring larger than a million lines is not read in full
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")


@dataclass(frozen=True)
class Sent:
    server: str
    process: str
    line: str
    seq: int


_NOT_SGR = re.compile(
    r"\x1b(?!\[[0-9;]*m)(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|.?)"
    r"|[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f]"
)


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def safe_for_terminal(text: str) -> str:
    """Keep colours (SGR), drop every other escape and control character: a game's output
    must not retitle, move or reprogram the operator's terminal."""
    return _NOT_SGR.sub("", text)


def game_process(client: AgentClient, name: str) -> str:
    """The name of the server's game process (the first one, if several); a dev
    container's IDE, which is what it has instead."""
    processes = client.status().processes
    for kind in ("game", "ide"):
        for process in processes:
            if process.kind == kind:
                return process.name
    raise NotFoundError(f"server {name} has no game or IDE process (is it provisioned?)")


def connect(name: str) -> tuple[AgentClient, str]:
    """A client for the server's agent and the game process name; close the client."""
    from zlh.servers import agent_client

    client = agent_client(records.get(name))
    try:
        return client, game_process(client, name)
    except BaseException:
        client.close()
        raise


def last_lines(name: str, count: int) -> list[ConsoleRecord]:
    client, process = connect(name)
    with client:
        return tail(client, process, count)


def tail(client: AgentClient, process: str, count: int) -> list[ConsoleRecord]:
    """The last `count` records the agent keeps, read page by page."""
    kept: deque[Any] = deque(maxlen=max(count, 0))
    after = -1
    for _ in range(MAX_PAGES):
        page = client.console(process, after=after, limit=PAGE)
        kept.extend(page)
        if len(page) < PAGE:
            break
        after = _last_seq(page)
    return list(kept)


def follow(name: str, backlog: int) -> Iterator[ConsoleRecord]:
    """The last `backlog` records, then new ones as they come, until interrupted."""
    client, process = connect(name)
    with client:
        recent = tail(client, process, backlog)
        yield from recent
        after = _last_seq(recent) if recent else -1
        if not recent:
            after = _end_seq(client, process)
        yield from client.follow(process, after=after)


def send(name: str, line: str) -> Sent:
    client, process = connect(name)
    with client:
        seq = client.send(process, line)
    return Sent(name, process, line, seq)


def _last_seq(page: list[Any]) -> int:
    last = page[-1]
    # A gap record's seq is the first missing line; the last missing one is seq+lost-1.
    return int(last.seq + last.lost - 1) if hasattr(last, "lost") else int(last.seq)


def _end_seq(client: AgentClient, process: str) -> int:
    page = tail(client, process, 1)
    return _last_seq(page) if page else -1
