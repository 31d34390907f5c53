"""Runtimes built from Debian 12's packages, repacked so a Debian 12 container can run them.

`zlh artifacts add python 3.11.2` and `zlh artifacts add jdk 17.0.19` download the
packages of one pinned revision with `apt-get download` (apt checks them against Debian's
signed indexes), unpack them with `dpkg-deb -x` and lay out a tree that finds itself
wherever it is put. A `Recipe` names the packages and lays out the tree; what every recipe
shares is here: the download, the unpacking and the rule that no link leaves the tree
(Debian points configuration into /etc; a runtime carries its own).

The pins come from bookworm's main archive, which changes only at point releases, where
bookworm-security replaces its revisions at each update, so a pin there could not be
rebuilt for long. Shared libraries are the container's own Debian 12 ones, so its security
updates reach them.

python (Debian's python3.11; Python computes its prefix from the landmark
`lib/python3.11/os.py` next to the real path of its executable):

    bin/python3.11, bin/python3 -> python3.11, bin/python -> python3.11
    lib/python3.11/               the standard library, with distutils, compiled .pyc
    share/python-wheels/          the pip and setuptools wheels ensurepip puts into a venv

- ensurepip looks for its wheels under the runtime (`sys.base_prefix/share/python-wheels`),
  not under the container's /usr/share, which may hold other versions or none;
- the `sitecustomize.py` link into /etc and the docs, man pages and desktop files go;
- EXTERNALLY-MANAGED says to use a venv, as Debian's does, without pointing at apt: the
  runtime has no pip of its own, `python3 -m venv DIR` gives one (pip 23.0.1);
- the standard library is compiled (checked-hash .pyc, PYTHONHASHSEED=0, one file after
  the other), since the dev user cannot write beside a runtime that root installed.
  The verify command imports the modules that use the container's libssl3, libsqlite3-0,
  libffi8, ...; C headers (python3.11-dev) are not in the runtime.

jdk (Debian's openjdk-17-jdk-headless and openjdk-17-jre-headless: javac, java, jar,
jshell, javadoc, jdb, keytool, ...; the launcher takes its home from the real path of its
executable, `bin/..`):

    bin/  conf/  include/  legal/  lib/  release     as under /usr/lib/jvm/java-17-openjdk-ARCH

- the configuration Debian keeps in /etc/java-17-openjdk (conf/security/java.security,
  the policies, lib/jvm.cfg, blocked.certs, public_suffix_list.dat, ...) is copied into
  the tree where the links were: the package's files, unchanged;
- trusted certificates: `lib/security/cacerts`, where Debian links to the keystore that
  ca-certificates-java generates in /etc (a package that needs a JRE installed by dpkg to
  run), is a JKS keystore written here from the Mozilla certificates of Debian's
  ca-certificates package of a pinned revision (the set update-ca-certificates enables by
  default), with no dates, so two builds give the same bytes; the container's
  /etc/ssl/certs is not read: a newer set comes with a new catalog version, and a private
  CA is given with -Djavax.net.ssl.trustStore;
- jmods/ (75 MB, what jlink and jpackage link from) goes, as Ubuntu splits it into a
  package of its own; the docs link, the man pages and the src.zip link (a package not
  taken) go too. The class-data sharing archives (lib/server/*.jsa) stay and are used.
  The JVM needs libc, libstdc++6, libgcc-s1 and zlib1g from the container; AWT fonts,
  sound and smart cards would need libfreetype6, libasound2, libpcsclite1.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from zlh.errors import IntegrityError, NotFoundError, ProvisionError


@dataclass(frozen=True)
class Recipe:
    """How one runtime is built: from which packages, and how its tree is laid out."""

    label: str
    revisions: dict[str, str]  # runtime version -> the Debian revision of `packages`
    packages: tuple[str, ...]
    # (unpacked packages, tree, version, work folder) -> the verify command
    assemble: Callable[[Path, Path, str, Path], str]
    companions: dict[str, str] = field(default_factory=dict)  # pinned on their own
    path: tuple[str, ...] = ("bin",)


def build_tree(name: str, version: str, work: Path, tree: Path) -> tuple[list[str], str]:
    """Lay out runtime NAME (a key of RECIPES) at VERSION in `tree`; (PATH folders,
    verify command)."""
    recipe = RECIPES[name]
    revision = recipe.revisions.get(version)
    if revision is None:
        known = ", ".join(sorted(recipe.revisions))
        raise NotFoundError(f"no Debian revision known for {recipe.label} {version}; "
                            f"known: {known}")
    wanted = [f"{package}={revision}" for package in recipe.packages]
    wanted += [f"{package}={pinned}" for package, pinned in recipe.companions.items()]
    unpacked = _unpack(_download(wanted, work / "debs"), work / "unpacked")
    verify = recipe.assemble(unpacked, tree, version, work)
    _refuse_links_out(tree)
    return list(recipe.path), verify


def _download(wanted: list[str], folder: Path) -> list[Path]:
    from zlh.artifacts import run_tool

    apt = shutil.which("apt-get")
    if apt is None:
        raise ProvisionError("apt-get is not installed: runtimes built from Debian's packages "
                             "need it")
    folder.mkdir(parents=True)
    try:
        run_tool([apt, "download", *wanted], folder)
    except ProvisionError as exc:
        raise ProvisionError(f"{exc.message}\n(run `apt-get update`; when Debian no longer "
                             "serves a pinned revision, zlh/debian_runtimes.py needs the one "
                             "it serves and the catalog a new sha256)") from None
    debs = sorted(folder.glob("*.deb"))
    if len(debs) != len(wanted):
        raise ProvisionError(f"apt-get download left {len(debs)} packages, expected "
                             f"{len(wanted)}: {[deb.name for deb in debs]}")
    return debs


def _unpack(debs: list[Path], folder: Path) -> Path:
    from zlh.artifacts import run_tool

    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        raise ProvisionError("dpkg-deb is not installed (Debian: apt-get install -y dpkg)")
    folder.mkdir()
    for deb in debs:
        run_tool([dpkg_deb, "-x", str(deb), str(folder)], folder)
    return folder


def _refuse_links_out(tree: Path) -> None:
    for path in tree.rglob("*"):
        if path.is_symlink() and os.readlink(path).startswith("/"):
            raise IntegrityError(f"{path.relative_to(tree)} links to {os.readlink(path)}, "
                                 "outside the runtime")


def _patch(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise IntegrityError(f"{path.name}: the line to change is not there once: {old!r}")
    path.write_text(text.replace(old, new))


# -- python --------------------------------------------------------------------------------

MINOR = "3.11"
# Where a container has the runtime; recorded in the .pyc files only (importlib puts the
# real path into code objects when it loads them).
INSTALLED_AT = "/opt/zlh/runtimes/python"
# Modules whose C parts need the container's shared libraries, and what a venv needs.
CHECKED_MODULES = "ssl, sqlite3, ctypes, lzma, bz2, zlib, pyexpat, hashlib, venv, ensurepip"
ENSUREPIP_LINE = "_WHEEL_PKG_DIR = sysconfig.get_config_var('WHEEL_PKG_DIR')\n"
ENSUREPIP_OURS = "_WHEEL_PKG_DIR = os.path.join(sys.base_prefix, 'share', 'python-wheels')\n"
EXTERNALLY_MANAGED = """\
[externally-managed]
Error=This Python is a runtime zlh installed; it has no pip of its own.
 Create a virtual environment and install into it:
     python3 -m venv ~/workspace/.venv
     ~/workspace/.venv/bin/pip install PACKAGE
"""
COMPILE = """\
import os, py_compile, sys
root, dest = sys.argv[1], sys.argv[2]
mode = py_compile.PycInvalidationMode.CHECKED_HASH
for top, dirs, files in os.walk(os.path.join(root, "lib")):
    dirs.sort()
    for name in sorted(files):
        if name.endswith(".py"):
            path = os.path.join(top, name)
            rel = os.path.relpath(path, root)
            try:
                py_compile.compile(path, dfile=os.path.join(dest, rel), doraise=True,
                                   invalidation_mode=mode)
            except py_compile.PyCompileError as exc:
                print("not compiled:", rel, exc.msg.splitlines()[-1], file=sys.stderr)
"""


def python_verify(version: str) -> str:
    wanted = tuple(int(part) for part in version.split("."))
    return (f'bin/python3 -I -c "import sys, {CHECKED_MODULES}; '
            f'assert sys.version_info[:3] == {wanted}, sys.version"')


def _python(unpacked: Path, tree: Path, version: str, work: Path) -> str:
    from zlh.artifacts import check_version

    _python_layout(unpacked / "usr", tree)
    _compile(tree, version, work)
    check_version(tree / "bin/python3", f"Python {version}")
    return python_verify(version)


def _python_layout(usr: Path, tree: Path) -> None:
    stdlib = f"lib/python{MINOR}"
    (tree / "bin").mkdir(parents=True)
    shutil.copy2(usr / f"bin/python{MINOR}", tree / f"bin/python{MINOR}")
    for alias in ("python3", "python"):
        (tree / "bin" / alias).symlink_to(f"python{MINOR}")
    shutil.copytree(usr / stdlib, tree / stdlib, symlinks=True)
    shutil.copytree(usr / "share/python-wheels", tree / "share/python-wheels")

    (tree / stdlib / "sitecustomize.py").unlink()  # a link to /etc/python3.11
    _patch(tree / stdlib / "ensurepip/__init__.py", ENSUREPIP_LINE, ENSUREPIP_OURS)
    (tree / stdlib / "EXTERNALLY-MANAGED").write_text(EXTERNALLY_MANAGED)


def _compile(tree: Path, version: str, work: Path) -> None:
    from zlh.artifacts import run_tool

    script = work / "compile_stdlib.py"
    script.write_text(COMPILE)
    # PYTHONHASHSEED fixes the order of set constants; one process keeps marshal's
    # references the same from one build to the next.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0"}
    python = str(tree / f"bin/python{MINOR}")
    run_tool([python, "-s", "-S", str(script), str(tree), f"{INSTALLED_AT}/{version}"],
             tree, env)


# -- jdk -----------------------------------------------------------------------------------

JDK_FEATURE = "17"
JDK_ETC = f"/etc/java-{JDK_FEATURE}-openjdk/"
# Not in the runtime (see the module docstring); relative to the JDK's home.
JDK_DROPPED = ("jmods", "man", "docs", "lib/src.zip")
CACERTS = "lib/security/cacerts"
MOZILLA_CERTS = "usr/share/ca-certificates/mozilla"
JKS_PASSWORD = "changeit"  # the JDK's default for cacerts; only the checksum uses it
JDK_VERIFY = "bin/javac --version"  # starts the JVM with the compiler's modules


def _jdk(unpacked: Path, tree: Path, version: str, work: Path) -> str:
    from zlh.artifacts import check_version

    homes = [p for p in (unpacked / "usr/lib/jvm").glob(f"java-{JDK_FEATURE}-openjdk-*")
             if not p.is_symlink()]
    if len(homes) != 1:
        raise IntegrityError(f"expected one JDK home in the packages, found {homes}")
    shutil.copytree(homes[0], tree, symlinks=True)
    for rel in JDK_DROPPED:
        path = tree / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for path in sorted(tree.rglob("*")):
        target = os.readlink(path) if path.is_symlink() else ""
        if target.startswith(JDK_ETC):
            path.unlink()
            shutil.copyfile(unpacked / target.lstrip("/"), path)
    (tree / CACERTS).unlink()  # a link to /etc/ssl/certs/java/cacerts
    (tree / CACERTS).write_bytes(jks_truststore(_mozilla_certificates(unpacked)))
    check_version(tree / "bin/javac", f"javac {version}")
    return JDK_VERIFY


def _mozilla_certificates(unpacked: Path) -> list[tuple[str, bytes]]:
    """(alias, DER) of the Mozilla certificates Debian's ca-certificates carries, named
    as ca-certificates-java names them."""
    found = []
    for pem in sorted((unpacked / MOZILLA_CERTS).glob("*.crt")):
        alias = f"debian:{pem.stem.lower()}.pem"
        found.append((alias, ssl.PEM_cert_to_DER_cert(pem.read_text())))
    if not found:
        raise IntegrityError(f"no certificates under {MOZILLA_CERTS} in ca-certificates")
    return found


def jks_truststore(certificates: list[tuple[str, bytes]]) -> bytes:
    """A JKS keystore of trusted certificates (alias, DER), every entry dated 0.

    The format: magic, version 2, the count, per entry tag 2 (trusted certificate), the
    alias and "X.509" as Java's writeUTF, the date in ms, the DER with its length; then
    SHA-1 over the password's UTF-16BE bytes, "Mighty Aphrodite" and all of the above.
    """
    out = bytearray(struct.pack(">III", 0xFEEDFEED, 2, len(certificates)))
    for alias, der in sorted(certificates):
        name = alias.encode()
        out += struct.pack(">IH", 2, len(name)) + name + struct.pack(">q", 0)
        out += struct.pack(">H", 5) + b"X.509" + struct.pack(">I", len(der)) + der
    seal = hashlib.sha1(JKS_PASSWORD.encode("utf-16-be") + b"Mighty Aphrodite" + out)
    return bytes(out + seal.digest())


RECIPES = {
    "python": Recipe(
        label="Python",
        revisions={"3.11.2": "3.11.2-6+deb12u8"},
        packages=("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
                  "python3.11", "python3.11-venv"),
        # What venv's ensurepip installs, and distutils (a package of its own in Debian).
        companions={"python3-pip-whl": "23.0.1+dfsg-1",
                    "python3-setuptools-whl": "66.1.1-1+deb12u2",
                    "python3-distutils": "3.11.2-3"},
        assemble=_python,
    ),
    "jdk": Recipe(
        label="JDK",
        revisions={"17.0.19": "17.0.19+10-1~deb12u2"},
        packages=(f"openjdk-{JDK_FEATURE}-jre-headless", f"openjdk-{JDK_FEATURE}-jdk-headless"),
        companions={"ca-certificates": "20230311+deb12u1"},
        assemble=_jdk,
    ),
}
