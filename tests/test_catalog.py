"""Runtime catalogs: schema errors with file:line: key, --verify against real servers, promote."""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path

import pytest

from tests.artifactfix import FaultyServer, sha256, write
from zlh import catalog
from zlh.artifacts import ArtifactServer
from zlh.cli import run
from zlh.errors import ConfigError, NotFoundError

GOOD = """\
# a comment that promote keeps
runtimes:
  tool:
    description: a test runtime
    default: "1.0"
    versions:
      - version: "1.0"
        channel: stable
        artifacts:
          x86_64:
            url: tool/tool-1.0.tar.zst
            sha256: {sha_a}
            size: {size_a}
            format: tar.zst
            path: [bin]
            verify: bin/tool
      - version: "2.0"
        channel: beta   # trailing comment
        artifacts:
          x86_64:
            url: tool/tool-2.0.tar.zst
            sha256: {sha_b}
            size: {size_b}
            format: tar.zst
"""
A, B = b"A" * 300_000, b"B" * 5000


def good_text(**changes: object) -> str:
    values = {"sha_a": sha256(A), "size_a": len(A), "sha_b": sha256(B), "size_b": len(B)}
    values.update(changes)
    return GOOD.format(**values)


@pytest.fixture
def served(tmp_path: Path):
    folder = tmp_path / "artifacts"
    write(folder, "tool/tool-1.0.tar.zst", A)
    write(folder, "tool/tool-2.0.tar.zst", B)
    cat = tmp_path / "catalogs"
    write(cat, "runtimes.yaml", good_text().encode())
    with ArtifactServer(folder) as server:
        yield server, cat


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


BAD_YAML = [
    ("syntax", "runtimes:\n  tool: [\n", "runtimes.yaml:3:1: yaml syntax error"),
    ("duplicate-key", good_text().replace("    default:", "    default: '2.0'\n    default:"),
     "runtimes.yaml:6: key 'default' appears twice (first on line 5)"),
    ("missing-sha256", good_text().replace(f"            sha256: {sha256(B)}\n", ""),
     "runtimes.yaml:20: runtimes.tool.versions[1].artifacts.x86_64.sha256: required key"),
    ("bad-sha256", good_text(sha_a="ABC" + "0" * 61),
     "runtimes.yaml:12: runtimes.tool.versions[0].artifacts.x86_64.sha256: sha256 must be 64"),
    ("unknown-channel", good_text().replace("channel: beta", "channel: nightly"),
     "runtimes.yaml:18: runtimes.tool.versions[1].channel: Input should be 'stable' or 'beta'"),
    ("duplicate-version", good_text().replace('version: "2.0"', 'version: "1.0"'),
     "runtimes.yaml:17: runtimes.tool.versions[1].version: version 1.0 appears twice"),
    ("missing-default", good_text().replace('default: "1.0"', 'default: "3.0"'),
     "runtimes.yaml:5: runtimes.tool.default: default 3.0 is not a listed version"),
    ("bad-format", good_text().replace("format: tar.zst", "format: rar", 1),
     "runtimes.yaml:14: runtimes.tool.versions[0].artifacts.x86_64.format: Input should be"),
    ("url-escapes", good_text().replace("url: tool/tool-1.0", "url: ../tool/tool-1.0"),
     "runtimes.yaml:11: runtimes.tool.versions[0].artifacts.x86_64.url: a relative URL must"),
    ("no-artifacts", good_text().split("        artifacts:")[0],
     "runtimes.yaml:7: runtimes.tool.versions[0]: list artifacts, or say why there are none"),
    ("unavailable-with-artifacts",
     good_text().replace("        channel: stable\n", "        unavailable: not here\n"),
     "runtimes.yaml:7: runtimes.tool.versions[0]: an unavailable version lists no artifacts"),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in BAD_YAML],
                         ids=[c[0] for c in BAD_YAML])
def test_bad_catalog_is_one_clear_error(tmp_path: Path, capsys, text: str, expected: str):
    path = write(tmp_path, "runtimes.yaml", text.encode())
    code, out, err = cli(capsys, "catalog", "validate", str(path))
    assert code == 3 and out == ""
    assert err.startswith("zlh: error: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1


def test_shipped_catalogs_are_valid():
    loaded = catalog.load_catalogs()
    names = {row["name"] for row in catalog.summary(loaded)}
    assert {"node", "flying-squid"} <= names
    node = catalog.find("node", arch="x86_64")
    assert node.version.version == "20.18.0" and node.artifact.verify == "bin/node --version"


UNAVAILABLE = """\
runtimes:
  sdk:
    default: "8.0"
    versions:
      - version: "8.0"
        unavailable: no registry carries it
"""


def test_an_unavailable_version_validates_and_is_refused_on_install(tmp_path: Path, capsys):
    path = write(tmp_path, "runtimes.yaml", UNAVAILABLE.encode())

    code, out, err = cli(capsys, "catalog", "validate", str(path), "--json")
    table = cli(capsys, "catalog", "validate", str(path))[1]
    with pytest.raises(NotFoundError) as refused:
        catalog.find("sdk", paths=[path])

    assert (code, err) == (0, "")
    [entry] = json.loads(out)["entries"]
    assert (entry["unavailable"], entry["arches"]) == ("no registry carries it", [])
    assert "none: not installable here" in table
    assert str(refused.value) == (f"sdk@8.0: not installable here: no registry carries it "
                                  f"({path})")


def test_validate_json_lists_entries(served, capsys):
    _, folder = served
    code, out, err = cli(capsys, "catalog", "validate", str(folder), "--json")
    assert code == 0 and err == ""
    report = json.loads(out)
    assert [(e["name"], e["version"], e["channel"], e["default"]) for e in report["entries"]] \
        == [("tool", "1.0", "stable", True), ("tool", "2.0", "beta", False)]


def test_verify_passes_against_a_real_server(served, capsys):
    server, folder = served
    code, out, err = cli(capsys, "catalog", "validate", str(folder), "--verify",
                         "--artifacts-url", server.url, "--json")
    assert code == 0, err
    verified = json.loads(out)["verified"]
    assert [(v["label"], v["ok"], v["size"]) for v in verified] == [
        ("tool@1.0 (x86_64)", True, len(A)), ("tool@2.0 (x86_64)", True, len(B))]


def test_verify_reports_every_mismatch(served, capsys):
    server, folder = served
    tampered = bytearray(A)
    tampered[1000] ^= 1
    (server.folder / "tool/tool-1.0.tar.zst").write_bytes(bytes(tampered))
    (server.folder / "tool/tool-2.0.tar.zst").unlink()
    code, _, err = cli(capsys, "catalog", "validate", str(folder), "--verify",
                       "--artifacts-url", server.url)
    assert code == 10
    assert err.splitlines() == [
        "zlh: error: 2 of 2 artifacts failed:",
        f"tool@1.0 (x86_64): sha256: got {sha256(bytes(tampered))}, expected {sha256(A)}",
        f"tool@2.0 (x86_64): {server.url}/tool/tool-2.0.tar.zst: HTTP 404",
    ]


def test_verify_without_a_base_url_is_a_usage_error(served, capsys, monkeypatch, tmp_path):
    _, folder = served
    monkeypatch.delenv("ZLH_ARTIFACTS_URL", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    code, _, err = cli(capsys, "catalog", "validate", str(folder), "--verify")
    assert code == 2 and "give --artifacts-url" in err


FAULTS = [
    ("truncated", {"mode": "truncate"}, "RemoteProtocolError"),
    ("http-500", {"mode": "status", "status": 500}, "HTTP 500"),
    ("stalled", {"mode": "stall"}, "timed out after 0.5 s without data"),
]


@pytest.mark.parametrize("options, expected", [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_verify_faulty_server(tmp_path: Path, options: dict, expected: str):
    body = b"z" * 4096
    text = good_text(sha_a=sha256(body), size_a=len(body))
    path = write(tmp_path, "runtimes.yaml", text.encode())
    items = [a for a in catalog.artifacts(catalog.load_catalogs([path])) if a.version.version
             == "1.0"]
    with FaultyServer(body=body, **options) as server:
        results = catalog.verify_artifacts(items, server.url, timeout=0.5)
    assert not results[0].ok and expected in results[0].problem


def test_oversized_download_stops_and_fails(served):
    server, folder = served
    (server.folder / "tool/tool-2.0.tar.zst").write_bytes(B + b"more" * 100_000)
    items = list(catalog.artifacts(catalog.load_catalogs([folder])))
    results = catalog.verify_artifacts(items, server.url)
    assert results[1].problem.startswith("size: got more than")


def test_artifact_server_refuses_paths_outside(tmp_path: Path):
    import httpx

    folder = tmp_path / "served"
    write(folder, "ok.txt", b"fine")
    write(tmp_path, "secret.txt", b"secret")
    (folder / "link").symlink_to(tmp_path / "secret.txt")
    with ArtifactServer(folder) as server:
        assert httpx.get(server.url + "/ok.txt").content == b"fine"
        assert httpx.get(server.url + "/link").status_code == 403
        raw = httpx.get(server.url + "/%2e%2e/secret.txt")
        assert raw.status_code in (403, 404) and b"secret" not in raw.content
        assert httpx.get(server.url + "/").status_code == 404


# Far more than the socket buffers hold: once the headers are in, the server is mid-send.
BIG = 32 << 20


def _asking(server: ArtifactServer, path: str) -> tuple[socket.socket, int, bytearray]:
    """A connection that sent `GET path` and read the headers: (socket, Content-Length,
    the body's first bytes). Reads time out after 30 s, so a kept-open connection fails
    the test instead of hanging it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 16)
        assert chunk, f"connection closed before the headers: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"Content-Length: (\d+)", head)
    assert found is not None, head
    return sock, int(found.group(1)), bytearray(body)


def test_a_file_rewritten_shorter_while_sent_closes_the_connection(tmp_path: Path):
    """The server announced 32 MiB, then the file became 4096 bytes (a rewrite in place,
    as write_bytes does): the client sees the body end, the connection is not kept open."""
    import httpx

    path = write(tmp_path / "served", "big.bin", b"a" * BIG)
    with ArtifactServer(path.parent) as server:
        sock, announced, body = _asking(server, "/big.bin")
        with sock:
            path.write_bytes(b"b" * 4096)
            while chunk := sock.recv(1 << 16):
                body += chunk
        assert announced == BIG and len(body) < BIG
        assert httpx.get(server.url + "/big.bin").content == b"b" * 4096


def test_a_file_grown_while_sent_gives_the_announced_bytes_only(tmp_path: Path):
    """Bytes appended after the headers went out stay out of the answer: the next answer
    on the same connection starts where the announced body ends."""
    path = write(tmp_path / "served", "big.bin", b"a" * BIG)
    with ArtifactServer(path.parent) as server:
        sock, announced, body = _asking(server, "/big.bin")
        with sock:
            with open(path, "ab") as more:
                more.write(b"b" * 4096)
            while len(body) < announced + 16:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                body += chunk
                if len(body) == announced:  # all of it: ask again on this connection
                    sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: test\r\n\r\n")
    assert body[:announced] == b"a" * BIG
    assert body[announced:].startswith(b"HTTP/1.1 200 ")


def test_a_faulty_server_stops_accepting_before_its_socket_is_closed():
    """Its accept thread ends before the socket goes: a thread that called accept() on the
    closed fd number took a connection meant for the next test's artifact server (whose
    socket got that number) and answered it with this server's fault."""
    import httpx

    with FaultyServer("truncate") as server, pytest.raises(
            httpx.RemoteProtocolError, match=r"received 2048 bytes, expected 4096"):
        httpx.get(server.url, timeout=5)
    assert not server.thread.is_alive()


def test_a_connection_gone_before_accept_does_not_block_the_server(tmp_path: Path):
    """serve_forever accepts after select() reported a connection; another accept() may have
    taken it meanwhile. A blocking accept() then waited for the next connection, and stop()
    (shutdown) for serve_forever, for ever: accept() must fail at once instead."""
    import httpx

    write(tmp_path / "served", "ok.txt", b"fine")
    outcome: list[str] = []

    def accept_with_nothing_waiting(server: ArtifactServer) -> None:
        try:
            server.httpd.get_request()
            outcome.append("accepted")
        except OSError as exc:
            outcome.append(type(exc).__name__)

    with ArtifactServer(tmp_path / "served") as server:
        thread = threading.Thread(target=accept_with_nothing_waiting, args=(server,),
                                  daemon=True)
        thread.start()
        thread.join(10)
        assert outcome == ["BlockingIOError"]
        assert httpx.get(server.url + "/ok.txt").content == b"fine"


def test_promote_rewrites_only_the_channel(served, capsys):
    _, folder = served
    path = folder / "runtimes.yaml"
    before = path.read_text()
    code, out, err = cli(capsys, "catalog", "promote", "tool", "2.0", "--channel", "stable",
                         "--catalog", str(folder))
    assert code == 0, err
    assert "tool 2.0: beta -> stable" in out
    after = path.read_text()
    assert after == before.replace("channel: beta   # trailing", "channel: stable   # trailing")
    code, out, _ = cli(capsys, "catalog", "promote", "tool", "2.0", "--catalog", str(folder))
    assert code == 0 and "already stable" in out


def test_promote_unknown_version_is_not_found(served, capsys):
    _, folder = served
    code, _, err = cli(capsys, "catalog", "promote", "tool", "9.9", "--catalog", str(folder))
    assert code == 4 and err == "zlh: error: tool: no version 9.9\n"


def test_name_in_two_files_is_an_error(served):
    _, folder = served
    write(folder, "more.yaml", good_text().encode())
    with pytest.raises(ConfigError, match="runtimes.tool: also defined in"):
        catalog.load_catalogs([folder])
