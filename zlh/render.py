"""The one output layer: commands return data, this module shows it.

`emit(data, as_json, human)` prints `data` as JSON when asked, or hands it to `human`,
which builds a rich renderable (a table, a text). rich is imported here lazily so that
`zlh --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

_console: Any = None


def console() -> Any:
    global _console
    if _console is None:
        from rich.console import Console

        # Piped output (grep, cron mail) is not cut at 80 columns.
        width = None if sys.stdout.isatty() else 200
        _console = Console(highlight=False, soft_wrap=True, width=width)
    return _console


def to_jsonable(data: Any) -> Any:
    if hasattr(data, "model_dump"):
        return data.model_dump(mode="json", by_alias=True)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return {f.name: to_jsonable(getattr(data, f.name)) for f in dataclasses.fields(data)}
    if isinstance(data, dict):
        return {str(k): to_jsonable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in data]
    if isinstance(data, enum.Enum):
        return data.value
    if isinstance(data, Path):
        return str(data)
    return data


def emit(data: Any, as_json: bool, human: Callable[[Any], Any] | None = None) -> None:
    if as_json or human is None:
        sys.stdout.write(json.dumps(to_jsonable(data), indent=2) + "\n")
        sys.stdout.flush()
        return
    renderable = human(data)
    if renderable is not None:
        console().print(renderable)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> Any:
    from rich.table import Table

    out = Table(title=title, box=None, pad_edge=False, header_style="bold")
    for column in columns:
        out.add_column(column)
    for row in rows:
        out.add_row(*("-" if cell is None else str(cell) for cell in row))
    return out


def pairs(rows: Iterable[tuple[str, Any]], title: str | None = None) -> Any:
    """A two-column key/value view for one object."""
    from rich.table import Table

    out = Table(title=title, box=None, show_header=False, pad_edge=False)
    out.add_column(style="bold")
    out.add_column()
    for key, value in rows:
        out.add_row(key, "-" if value is None else str(value))
    return out


# -- formatting ------------------------------------------------------------------------


def duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def size(count: int | None) -> str | None:
    if count is None:
        return None
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return None  # unreachable: the loop returns at TiB


def when(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    stamp = dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp} ({duration(time.time() - timestamp)} ago)"


def yes_no(flag: bool | None) -> str | None:
    return None if flag is None else ("yes" if flag else "no")
