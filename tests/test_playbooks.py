"""Playbooks: the shipped ones validate and render; mistakes are named precisely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentd.models import LogProbe, MinecraftProbe, ServerSpec
from zlh.errors import ConfigError, NotFoundError, UsageError
from zlh.playbooks import (
    Playbook,
    list_playbooks,
    load_playbook,
    parse_sets,
    playbooks_dir,
    render,
    require_system_artifacts,
    resolve_values,
    write_files,
)

SHIPPED = [
    "dev-dotnet", "dev-java", "dev-node", "dev-python",
    "minecraft-paper", "minecraft-squid", "minetest",
]
GAMES = [name for name in SHIPPED if not name.startswith("dev-")]
REQUIRED_VALUES = {"minecraft-paper": {"eula": "true"}}
ROOT = Path("/srv/test-root")

# A small valid playbook; tests replace one line of it to make one mistake.
BASE = """\
name: tiny
kind: game
tier: small
resources:
  small: {cores: 1, memory_mb: 256, disk_gb: 1}
artifacts:
  - name: tool
    source: url
    url: tools/tool.tar.gz
    sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
variables:
  greeting: {type: str, default: hello}
  slots: {type: int, default: 4}
ports:
  game: {protocol: tcp}
files:
  - path: server.conf
    template: "port=${port_game} greeting=${greeting} price=$$5"
processes:
  game:
    argv: ["${root}/run", "--slots", "${slots}"]
    port: game
    stop:
      command: stop
      grace: 20
    readiness: {type: tcp}
"""


@pytest.fixture()
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_playbook(folder: Path, text: str = BASE, name: str = "tiny") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def changed(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_playbook(path)
    return str(info.value)


# -- shipped playbooks -----------------------------------------------------------------


def test_shipped_playbooks_are_listed() -> None:
    assert list_playbooks() == SHIPPED


@pytest.mark.parametrize("name", GAMES, ids=GAMES)
def test_shipped_playbook_renders_a_valid_spec(name: str) -> None:
    playbook = load_playbook(name)

    rendered = render(playbook, REQUIRED_VALUES.get(name, {}), {"game": 41234}, ROOT)

    spec = ServerSpec.model_validate(rendered.spec.model_dump())
    game = spec.processes[0]
    assert (spec.playbook, game.name, game.port, game.cwd) == (name, "game", 41234, str(ROOT))
    assert all("$" not in arg for arg in game.argv)
    assert all("${" not in f.content for f in rendered.files)
    assert any("41234" in f.content for f in rendered.files)


def test_squid_settings_are_json_with_the_values() -> None:
    playbook = load_playbook("minecraft-squid")

    rendered = render(playbook, {"motd": "Hi there", "max_players": "7"}, {"game": 25599}, ROOT)

    settings = json.loads(rendered.files[0].content)
    assert settings == {
        "host": "127.0.0.1", "port": 25599, "online-mode": False, "max-players": 7,
        "motd": "Hi there", "logging": False, "worldFolder": f"{ROOT}/world",
        "version": "1.21.4",
    }
    game = rendered.spec.processes[0]
    assert game.argv == ["flying-squid-server", f"{ROOT}/settings.json"]
    assert game.readiness == MinecraftProbe.model_validate(
        {"type": "minecraft", "host": "127.0.0.1", "port": 25599, "interval": 0.5, "timeout": 2}
    )
    assert (game.stop.command, game.stop.grace, game.startup_timeout) == ("stop", 20, 90)


def test_squid_binds_and_is_probed_at_the_host_given() -> None:
    # A Proxmox container's own address: where players reach it, and where it is probed.
    rendered = render(load_playbook("minecraft-squid"), {}, {"game": 25599}, ROOT,
                      "127.77.0.101")

    assert json.loads(rendered.files[0].content)["host"] == "127.77.0.101"
    readiness = rendered.spec.processes[0].readiness
    assert isinstance(readiness, MinecraftProbe)
    assert (readiness.host, readiness.port) == ("127.77.0.101", 25599)


def test_squid_comes_from_the_catalogs() -> None:
    from zlh import catalog

    playbook = load_playbook("minecraft-squid")
    (artifact,) = playbook.artifacts
    assert artifact.model_dump() == {"source": "catalog", "name": "flying-squid",
                                     "version": "1.12.0"}
    assert [(r.name, r.version, r.source) for r in playbook.runtimes] == [
        ("node", "20.18.0", "catalog")]
    squid = catalog.find("flying-squid", "1.12.0", arch="x86_64")
    assert squid.artifact.sha256 == (
        "85c5b5747836d5e51772555bfd507ec48486313f6a17587d38a18b39128c3d4b")


def test_minetest_runs_the_binary_with_its_config() -> None:
    rendered = render(load_playbook("minetest"), {}, {"game": 30001}, ROOT)

    game = rendered.spec.processes[0]
    assert game.argv[:3] == ["/usr/lib/minetest/minetestserver", "--config",
                             f"{ROOT}/minetest.conf"]
    assert (game.stop.command, game.stop.signal) == (None, "SIGINT")
    assert isinstance(game.readiness, LogProbe)
    assert "bind_address = 127.0.0.1\n" in rendered.files[0].content
    assert "port = 30001\n" in rendered.files[0].content


def test_paper_needs_an_explicit_eula_answer() -> None:
    with pytest.raises(UsageError, match=r"^--set eula=\.\.\.: required by playbook"):
        render(load_playbook("minecraft-paper"), {}, {"game": 25565}, ROOT)


def test_paper_heap_comes_from_memory_mb() -> None:
    values = {"eula": "yes", "memory_mb": "4096"}

    rendered = render(load_playbook("minecraft-paper"), values, {"game": 25565}, ROOT)

    assert rendered.spec.processes[0].argv[1:3] == ["-Xms4096M", "-Xmx4096M"]
    assert rendered.files[0].content == "eula=true\n"


# -- finding playbooks -----------------------------------------------------------------


def test_unknown_playbook_lists_the_available_ones() -> None:
    with pytest.raises(NotFoundError) as info:
        load_playbook("minecraft")

    assert str(info.value) == (
        "no playbook named 'minecraft'; available: dev-dotnet, dev-java, dev-node, dev-python, "
        "minecraft-paper, minecraft-squid, minetest"
    )


def test_playbooks_folder_can_be_overridden(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_playbook(in_tmp)
    monkeypatch.setenv("ZLH_PLAYBOOKS", str(in_tmp))

    assert (playbooks_dir(), list_playbooks(), load_playbook("tiny").name) == (
        in_tmp, ["tiny"], "tiny"
    )


def test_playbook_by_name_must_declare_that_name(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_playbook(in_tmp, name="other")
    monkeypatch.setenv("ZLH_PLAYBOOKS", str(in_tmp))

    with pytest.raises(ConfigError, match=r"other.yaml:1: name: must be 'other'"):
        load_playbook("other")


def test_playbook_by_path_remembers_its_source(in_tmp: Path) -> None:
    path = write_playbook(in_tmp)

    assert load_playbook(str(path)).source == path


# -- schema errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "    sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n",
            "",
            "tiny.yaml:7: artifacts[0]: needs a sha256, or `unpinned: true` to accept any "
            "content",
        ),
        (
            "sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256: E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "tiny.yaml:10: artifacts[0].sha256: sha256 must be 64 lowercase hex characters",
        ),
        (
            "    url: tools/tool.tar.gz\n",
            "    url: tools/tool.tar.gz\n    unpinned: true\n",
            "tiny.yaml:7: artifacts[0]: has a sha256 and `unpinned: true`: keep one",
        ),
        (
            "    source: url\n",
            "    source: ftp\n",
            "tiny.yaml:8: artifacts[0].source: should be one of 'npm', 'url', 'system', 'catalog', "
            "not 'ftp'",
        ),
        (
            "      grace: 20\n",
            "      grace: twenty\n",
            "tiny.yaml:25: processes.game.stop.grace: Input should be a valid number, "
            "unable to parse string as a number",
        ),
        (
            "      command: stop\n",
            "      command: stop\n      signal: SIGSTOPP\n",
            "tiny.yaml:25: processes.game.stop.signal: unknown signal 'SIGSTOPP'",
        ),
        (
            "    readiness: {type: tcp}\n",
            "    readiness: {type: tcp, intervall: 1}\n",
            "tiny.yaml:26: processes.game.readiness.intervall: unknown key",
        ),
        (
            "  slots: {type: int, default: 4}\n",
            "  slots: {type: int, default: four}\n",
            "tiny.yaml:13: variables.slots: default: expected an integer",
        ),
        (
            "kind: game\n",
            "kind: gaem\n",
            "tiny.yaml:2: kind: Input should be 'game' or 'dev'",
        ),
        (
            "  - path: server.conf\n",
            "  - path: ../server.conf\n",
            "tiny.yaml:17: files[0].path: must be a relative path inside the server root, "
            "without '..'",
        ),
    ],
    ids=[
        "artifact-unpinned-without-hash", "sha256-uppercase", "hash-and-unpinned",
        "unknown-source", "deep-wrong-type", "unknown-signal", "probe-extra-key",
        "default-of-wrong-type", "bad-kind", "file-outside-root",
    ],
)
def test_schema_error_names_line_and_key_path(
    in_tmp: Path, old: str, new: str, expected: str
) -> None:
    assert load_error(write_playbook(in_tmp, changed(old, new))) == expected


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "tier: small\n",
            "tier: huge\n",
            "tiny.yaml:3: tier: no such tier; known: small",
        ),
        (
            "    port: game\n",
            "    port: query\n",
            "tiny.yaml:22: processes.game.port: no port named 'query'; known: game",
        ),
        (
            "  game: {protocol: tcp}\n",
            "  game: {protocol: udp}\n",
            "tiny.yaml:26: processes.game.readiness.port: a tcp probe needs a tcp port; "
            "'game' is udp",
        ),
        (
            '    template: "port=${port_game} greeting=${greeting} price=$$5"\n',
            '    template: "port=${port_game} greeting=${greting}"\n',
            "tiny.yaml:18: files[0].template: unknown variable ${greting} in server.conf; "
            "known: greeting, host, port_game, root, slots",
        ),
        (
            '    argv: ["${root}/run", "--slots", "${slots}"]\n',
            '    argv: ["${root}/run", "--cost", "$5"]\n',
            "tiny.yaml:21: processes.game.argv[2]: a '$' that starts no ${name}: "
            "write $$ for a '$'",
        ),
        (
            "  slots: {type: int, default: 4}\n",
            "  slots: {type: int, default: 4}\n  root: {default: x}\n",
            "tiny.yaml:14: variables.root: reserved name (root, host, port_*)",
        ),
    ],
    ids=[
        "unknown-tier", "unknown-port", "probe-on-udp-port", "unknown-template-variable",
        "stray-dollar", "reserved-variable",
    ],
)
def test_cross_reference_error_names_line(
    in_tmp: Path, old: str, new: str, expected: str
) -> None:
    assert load_error(write_playbook(in_tmp, changed(old, new))) == expected


def test_unknown_template_variable_at_render_names_playbook_file_and_variable(
    in_tmp: Path,
) -> None:
    playbook = load_playbook(write_playbook(in_tmp))
    bad = playbook.files[0].model_copy(update={"template": "motd=${motd}"})
    broken = playbook.model_copy(update={"files": [bad]})

    with pytest.raises(ConfigError) as info:
        render(broken, {}, {"game": 4000}, ROOT)

    assert str(info.value).startswith(
        f"{in_tmp / 'tiny.yaml'}: files[0].template: unknown variable ${{motd}} in server.conf"
    )


# -- values and rendering --------------------------------------------------------------


def test_render_fills_templates_and_escapes(in_tmp: Path) -> None:
    playbook = load_playbook(write_playbook(in_tmp))

    rendered = render(playbook, {"slots": "9"}, {"game": 4000}, ROOT)

    assert rendered.files[0].content == "port=4000 greeting=hello price=$5"
    assert rendered.spec.processes[0].argv == [f"{ROOT}/run", "--slots", "9"]
    readiness = rendered.spec.processes[0].readiness
    assert readiness is not None
    assert readiness.model_dump() == {
        "type": "tcp", "host": "127.0.0.1", "port": 4000,
        "interval": 1.0, "timeout": 2.0, "failure_threshold": 3,
    }
    assert rendered.values == {"greeting": "hello", "slots": "9"}


def test_unknown_set_key_names_the_known_keys(in_tmp: Path) -> None:
    playbook = load_playbook(write_playbook(in_tmp))

    with pytest.raises(UsageError) as info:
        render(playbook, {"slot": "9"}, {"game": 4000}, ROOT)

    assert str(info.value) == (
        "--set slot: playbook tiny has no such variable; known: greeting, slots"
    )


@pytest.mark.parametrize(
    ("playbook", "values", "expected"),
    [
        ("minecraft-squid", {"max_players": "abc"}, "--set max_players=abc: expected an integer"),
        ("minecraft-squid", {"max_players": "0"}, "--set max_players=0: must be at least 1"),
        ("minecraft-squid", {"motd": 'say "hi"'},
         '--set motd=say "hi": must match [^"\\\\]{0,200}'),
        ("minetest", {"motd": "two\nlines"},
         "--set motd=two\nlines: control characters (newlines, tabs) are not allowed"),
        ("minecraft-paper", {"eula": "maybe"}, "--set eula=maybe: expected true or false"),
    ],
    ids=["int-not-a-number", "int-below-min", "str-pattern", "str-newline", "bool"],
)
def test_wrong_set_value_is_a_usage_error(
    playbook: str, values: dict[str, str], expected: str
) -> None:
    with pytest.raises(UsageError) as info:
        resolve_values(load_playbook(playbook), values)

    assert str(info.value) == expected


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["a=1", "b=x=y", "c="], {"a": "1", "b": "x=y", "c": ""}),
        (["a"], "--set a: expected KEY=VALUE"),
        (["=1"], "--set =1: expected KEY=VALUE"),
        (["a=1", "a=2"], "--set a: given twice"),
    ],
    ids=["good", "no-equals", "no-key", "twice"],
)
def test_parse_sets(items: list[str], expected: dict[str, str] | str) -> None:
    if isinstance(expected, dict):
        assert parse_sets(items) == expected
        return
    with pytest.raises(UsageError) as info:
        parse_sets(items)
    assert str(info.value) == expected


def test_render_refuses_ports_that_do_not_match(in_tmp: Path) -> None:
    playbook = load_playbook(write_playbook(in_tmp))

    with pytest.raises(ValueError, match="do not match"):
        render(playbook, {}, {"query": 4000}, ROOT)


def test_write_files_puts_them_under_the_root(in_tmp: Path) -> None:
    playbook = load_playbook(write_playbook(in_tmp))
    rendered = render(playbook, {}, {"game": 4000}, in_tmp / "srv")

    written = write_files(rendered)

    assert written == [in_tmp / "srv/server.conf"]
    assert written[0].read_text() == "port=4000 greeting=hello price=$5"


def test_missing_system_artifact_names_the_package(in_tmp: Path) -> None:
    present = in_tmp / "present"
    present.write_text("")
    text = changed(
        "    url: tools/tool.tar.gz\n"
        "    sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n",
        f"    url: tools/tool.tar.gz\n    unpinned: true\n"
        f"  - {{name: here, source: system, path: {present}, apt: here-pkg}}\n"
        f"  - {{name: gone, source: system, path: {in_tmp}/gone, apt: gone-pkg}}\n",
    )
    playbook = load_playbook(write_playbook(in_tmp, text))

    with pytest.raises(NotFoundError) as info:
        require_system_artifacts(playbook)

    assert str(info.value) == (
        f"playbook tiny needs {in_tmp}/gone: apt-get install -y gone-pkg"
    )


def test_playbook_model_is_strict() -> None:
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        Playbook.model_validate({"name": "x", "kind": "game", "tier": "s", "resources": {},
                                 "colour": "red"})
