"""Load YAML files safely, keep line numbers, and validate them with pydantic.

Every failure becomes one ConfigError that points at the file, the line and the key path,
one line per problem, ordered by line:

    playbooks/minetest.yaml:12: processes.game.stop.grace: Input should be a valid number

A model that needs checks across fields (a name that must refer to another section)
defines `problems()`; `validate` runs it and reports its findings the same way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from zlh.errors import ConfigError, NotFoundError

MAX_BYTES = 4 * 1024 * 1024
MAX_SHOWN = 20
MERGE_TAG = "tag:yaml.org,2002:merge"

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Problem:
    """One finding: where in the document (keys and list indices) and what is wrong."""

    loc: Loc
    message: str


@runtime_checkable
class CrossChecked(Protocol):
    def problems(self) -> list[Problem]: ...


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: object, line: int, first_line: int) -> None:
        super().__init__(f"key {key!r} appears twice")
        self.key = key
        self.line = line
        self.first_line = first_line


class LineLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys and records the line of every node.

    `lines` maps a key path such as `("processes", "game", "argv", 0)` to the 1-based
    line of that key (or list item), filled by `load_document`.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.lines: dict[Loc, int] = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Checked before merge keys are flattened: `<<: *base` then overriding is allowed.
        self._refuse_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_duplicates(self, node: yaml.MappingNode) -> None:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it with its mark
                continue
            if first is not None:
                raise DuplicateKeyError(key, line, first)
            seen[key] = line

    def load_document(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        data = self.construct_document(node)
        self.lines[()] = node.start_mark.line + 1
        self._record_lines(node, (), set())
        return data

    def _record_lines(self, node: yaml.Node, loc: Loc, seen: set[int]) -> None:
        # An anchored node reached again through an alias keeps its first lines; this
        # also bounds the walk on alias bombs and recursive anchors.
        if id(node) in seen:
            return
        seen.add(id(node))
        for child_loc, line, child in self._children(node, loc):
            self.lines[child_loc] = line  # last wins, as in the constructed dict
            self._record_lines(child, child_loc, seen)

    def _children(self, node: yaml.Node, loc: Loc) -> Iterator[tuple[Loc, int, yaml.Node]]:
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                yield loc + (index,), item.start_mark.line + 1, item
        elif isinstance(node, yaml.MappingNode):
            for key_node, value in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int)):
                    yield loc + (key,), key_node.start_mark.line + 1, value


@dataclass(frozen=True)
class Document:
    """A parsed YAML file: its data and the line of every key path."""

    path: Path
    data: Any
    lines: Mapping[Loc, int]

    def line_of(self, loc: Loc) -> int:
        """The line of `loc`, or of its nearest ancestor present in the file."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return line
        return 1

    def error(self, problems: Iterable[Problem]) -> ConfigError:
        """One ConfigError listing `problems` by line, each as `file:line: path: reason`."""
        located = sorted({(self.line_of(p.loc), dotted(p.loc), p.message) for p in problems})
        lines = [
            f"{display_path(self.path)}:{line}: {path + ': ' if path else ''}{message}"
            for line, path, message in located[:MAX_SHOWN]
        ]
        if len(located) > MAX_SHOWN:
            lines.append(f"... and {len(located) - MAX_SHOWN} more problems")
        return ConfigError("\n".join(lines))


def display_path(path: Path) -> str:
    """`path` relative to the working folder when it is inside it, as typed otherwise."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


def dotted(loc: Loc) -> str:
    """`("runtimes", "java", "versions", 2)` -> `runtimes.java.versions[2]`."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text


def parse_yaml(text: str, path: Path) -> Document:
    """Parse `text`; `path` is only used in messages."""
    loader = LineLoader(text)
    try:
        data = loader.load_document()
    except DuplicateKeyError as exc:
        where = f"{display_path(path)}:{exc.line}"
        raise ConfigError(f"{where}: key {exc.key!r} appears twice "
                          f"(first on line {exc.first_line})") from None
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_syntax_message(path, exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{display_path(path)}: yaml error: {exc}") from None
    finally:
        loader.dispose()
    return Document(path=path, data=data, lines=loader.lines)


def _syntax_message(path: Path, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = display_path(path)
    if mark is not None:
        where += f":{mark.line + 1}:{mark.column + 1}"
    reason = exc.problem or exc.context or "invalid document"
    if exc.context and exc.problem and exc.context_mark is not None:
        reason += f" ({exc.context} on line {exc.context_mark.line + 1})"
    return f"{where}: yaml syntax error: {reason}"


def read_yaml(path: Path) -> Document:
    """Read and parse a YAML file. Missing file -> NotFoundError, any other -> ConfigError."""
    try:
        if os.path.getsize(path) > MAX_BYTES:
            raise ConfigError(f"{display_path(path)}: larger than {MAX_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFoundError(f"{display_path(path)}: no such file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{display_path(path)}: not UTF-8 text ({exc.reason} "
                          f"at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{display_path(path)}: cannot read: {exc.strerror}") from None
    return parse_yaml(text, path)


def validate(doc: Document, model: type[M]) -> M:
    """Validate `doc` against `model` (and its `problems()`); failures -> ConfigError."""
    try:
        obj = model.model_validate(doc.data)
    except ValidationError as exc:
        raise doc.error(_from_pydantic(doc.data, exc.errors())) from None
    if isinstance(obj, CrossChecked):
        problems = obj.problems()
        if problems:
            raise doc.error(problems)
    return obj


def load_model(path: Path, model: type[M]) -> M:
    """Read the YAML file at `path` and validate it as `model`."""
    return validate(read_yaml(path), model)


def _from_pydantic(data: Any, errors: list[ErrorDetails]) -> list[Problem]:
    problems = []
    for err in errors:
        loc = document_loc(data, err["loc"], err.get("input"), err["type"] == "missing")
        if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
            # Point at the tag key itself (`source`, `type`), present or missing.
            loc += (str((err.get("ctx") or {}).get("discriminator", "")).strip("'"),)
        problems.append(Problem(loc, _reason(err)))
    return problems


def document_loc(data: Any, loc: Loc, error_input: Any, missing_last: bool) -> Loc:
    """Keep the parts of a pydantic error location that name keys or items of `data`.

    Pydantic adds union tags (`npm`, `function-after[...]`) and `[key]` to locations;
    those are not in the file. A tag can also be a key (an artifact of source `url` has
    a key `url`), so every reading is tried and the one that leads to the value pydantic
    complained about wins; then the one that keeps more parts. The last part of a
    `missing` error is kept: it is the key the file should have had.
    """
    def rank(reading: _Reading) -> tuple[bool, int]:
        target = reading.parent if missing_last else reading.node
        return (target is error_input or _same(target, error_input), len(reading.loc))

    return max(_readings(data, data, loc, missing_last), key=rank).loc


@dataclass(frozen=True)
class _Reading:
    loc: Loc
    node: Any
    parent: Any


def _readings(node: Any, parent: Any, loc: Loc, missing_last: bool) -> list[_Reading]:
    if not loc:
        return [_Reading((), node, parent)]
    part, rest = loc[0], loc[1:]
    readings = _readings(node, parent, rest, missing_last)
    if _has(node, part):
        readings += [
            _Reading((part,) + r.loc, r.node, r.parent)
            for r in _readings(node[part], node, rest, missing_last)
        ]
    elif missing_last and not rest and isinstance(node, dict):
        readings.append(_Reading((part,), None, node))
    return readings


def _same(value: Any, other: Any) -> bool:
    return type(value) is type(other) and bool(value == other)


def _has(node: Any, part: str | int) -> bool:
    if isinstance(node, dict):
        return part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _reason(err: ErrorDetails) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "union_tag_not_found":
        return "required key is missing"
    if kind == "union_tag_invalid":
        return f"should be one of {ctx.get('expected_tags', '')}, not {ctx.get('tag', '')!r}"
    if kind in ("model_type", "dict_type"):
        return f"should be a mapping (key: value lines), not {_kind_of(err.get('input'))}"
    message = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def _kind_of(value: Any) -> str:
    """What a YAML value is, in the words of a message."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    return "text" if isinstance(value, str) else "empty" if value is None else "another type"
