"""YAML loading: syntax errors, duplicate keys and schema errors point at file and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from zlh.errors import ConfigError, NotFoundError
from zlh.yamlfile import Problem, load_model, parse_yaml, read_yaml


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stop(Strict):
    grace: float = 10.0
    command: str | None = None


class Process(Strict):
    argv: list[str]
    stop: Stop = Field(default_factory=Stop)


class Config(Strict):
    name: str
    processes: dict[str, Process] = Field(default_factory=dict)


class Linked(Config):
    main: str

    def problems(self) -> list[Problem]:
        if self.main in self.processes:
            return []
        return [Problem(("main",), f"no process named {self.main!r}")]


@pytest.fixture()
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Work inside tmp_path, so messages name files relative to it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(folder: Path, text: str, name: str = "conf.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def load_error(path: Path, model: type[BaseModel] = Config) -> str:
    with pytest.raises(ConfigError) as info:
        load_model(path, model)
    return str(info.value)


def test_valid_file_loads(in_tmp: Path) -> None:
    path = write(in_tmp, "name: a\nprocesses:\n  game:\n    argv: [x]\n    stop: {grace: 3}\n")

    config = load_model(path, Config)

    assert config.processes["game"].stop.grace == 3.0


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("name: a\nprocesses: [1, 2\n", "conf.yaml:3:1"),
        ("name: a\n  bad: indent\n", "conf.yaml:2:6"),
        ("name: a\nargv:\n\t- x\n", "conf.yaml:3:1"),
        ("name: 'open\n", "conf.yaml:2:1"),
        ("---\nname: a\n---\nname: b\n", "conf.yaml:3:1"),
    ],
    ids=["unclosed-flow", "bad-indent", "tab", "unclosed-quote", "two-documents"],
)
def test_syntax_error_names_file_line_and_column(in_tmp: Path, text: str, where: str) -> None:
    message = load_error(write(in_tmp, text))

    assert message.startswith(f"{where}: yaml syntax error: ")


def test_python_tags_are_refused(in_tmp: Path) -> None:
    path = write(in_tmp, "name: !!python/object/apply:os.getcwd []\n")

    assert load_error(path).startswith("conf.yaml:1:7: yaml syntax error: could not determine")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: a\nname: b\n", "conf.yaml:2: key 'name' appears twice (first on line 1)"),
        (
            "name: a\nprocesses:\n  game:\n    argv: [x]\n    stop: {}\n    argv: [y]\n",
            "conf.yaml:6: key 'argv' appears twice (first on line 4)",
        ),
        ("name: a\nprocesses: {g: 1, g: 2}\n",
         "conf.yaml:2: key 'g' appears twice (first on line 2)"),
    ],
    ids=["top-level", "nested", "flow-mapping"],
)
def test_duplicate_key_is_refused(in_tmp: Path, text: str, expected: str) -> None:
    assert load_error(write(in_tmp, text)) == expected


def test_merge_key_may_be_overridden(in_tmp: Path) -> None:
    path = write(in_tmp, "base: &b {grace: 1, command: stop}\nover:\n  <<: *b\n  grace: 2\n")

    assert read_yaml(path).data["over"] == {"grace": 2, "command": "stop"}


def test_wrong_type_deep_names_key_path_and_line(in_tmp: Path) -> None:
    path = write(in_tmp, (
        "name: a\n"
        "processes:\n"
        "  game:\n"
        "    argv: [x]\n"
        "    stop:\n"
        "      command: stop\n"
        "      grace: soon\n"
    ))

    assert load_error(path) == (
        "conf.yaml:7: processes.game.stop.grace: "
        "Input should be a valid number, unable to parse string as a number"
    )


def test_list_item_error_names_index(in_tmp: Path) -> None:
    path = write(in_tmp, "name: a\nprocesses:\n  game:\n    argv:\n      - x\n      - [y]\n")

    assert load_error(path) == (
        "conf.yaml:6: processes.game.argv[1]: Input should be a valid string"
    )


def test_several_errors_are_listed_by_line(in_tmp: Path) -> None:
    path = write(in_tmp, (
        "processes:\n"
        "  game:\n"
        "    stop: {grace: x}\n"
        "    colour: red\n"
        "name: [a]\n"
    ))

    assert load_error(path).splitlines() == [
        "conf.yaml:2: processes.game.argv: required key is missing",
        "conf.yaml:3: processes.game.stop.grace: "
        "Input should be a valid number, unable to parse string as a number",
        "conf.yaml:4: processes.game.colour: unknown key",
        "conf.yaml:5: name: Input should be a valid string",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "conf.yaml:1: should be a mapping (key: value lines), not empty"),
        ("- a\n", "conf.yaml:1: should be a mapping (key: value lines), not a list"),
    ],
    ids=["empty", "list"],
)
def test_document_of_wrong_shape(in_tmp: Path, text: str, expected: str) -> None:
    assert load_error(write(in_tmp, text)) == expected


def test_cross_checks_are_reported_with_line(in_tmp: Path) -> None:
    path = write(in_tmp, "name: a\nprocesses:\n  game: {argv: [x]}\nmain: gmae\n")

    assert load_error(path, Linked) == "conf.yaml:4: main: no process named 'gmae'"


def test_missing_file_is_not_found(in_tmp: Path) -> None:
    with pytest.raises(NotFoundError, match="nothere.yaml: no such file"):
        load_model(in_tmp / "nothere.yaml", Config)


def test_file_that_is_not_utf8(in_tmp: Path) -> None:
    path = in_tmp / "conf.yaml"
    path.write_bytes(b"name: caf\xe9\n")

    assert load_error(path).startswith("conf.yaml: not UTF-8 text")


def test_file_outside_working_folder_keeps_its_path(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\nname: b\n")

    assert load_error(path) == f"{path}:2: key 'name' appears twice (first on line 1)"


def test_recursive_alias_is_bounded() -> None:
    doc = parse_yaml("a: &a [*a]\nb: 1\n", Path("x.yaml"))

    assert doc.lines[("b",)] == 2
