"""Python from Debian's packages, repacked as a runtime a Debian 12 container can run.

`zlh artifacts add python 3.11.2` downloads Debian 12's python3.11 packages of one pinned
revision with `apt-get download` (apt checks them against Debian's signed indexes),
unpacks them with `dpkg-deb -x` and lays out a tree that finds itself wherever it is put
(Python computes its prefix from the landmark `lib/python3.11/os.py` next to the real
path of its executable):

    bin/python3.11, bin/python3 -> python3.11, bin/python -> python3.11
    lib/python3.11/               the standard library, with distutils, compiled .pyc
    share/python-wheels/          the pip and setuptools wheels ensurepip puts into a venv

What differs from the packages' files, and why:

- ensurepip looks for its wheels under the runtime (`sys.base_prefix/share/python-wheels`),
  not under the container's /usr/share, which may hold other versions or none;
- the `sitecustomize.py` link into /etc and the docs, man pages and desktop files go;
- EXTERNALLY-MANAGED says to use a venv, as Debian's does, without pointing at apt: the
  runtime has no pip of its own, `python3 -m venv DIR` gives one (pip 23.0.1);
- the standard library is compiled (checked-hash .pyc, PYTHONHASHSEED=0, one file after
  the other), since the dev user cannot write beside a runtime that root installed.

Shared libraries (libssl3, libsqlite3-0, libffi8, libexpat1, ...) are the container's own
Debian 12 ones, so its security updates reach them; the verify command imports the modules
that need them, and a container that lacks one fails the install with the loader's message.
C headers (python3.11-dev) are not in the runtime: packages that compile C need them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from zlh.errors import IntegrityError, NotFoundError, ProvisionError

# Python version -> the Debian 12 revision of python3.11 it is built from. The oldstable
# main archive keeps one revision per point release; bookworm-security's newer ones are
# replaced by the next update, so a pin there could not be rebuilt for long.
DEBIAN_REVISIONS = {"3.11.2": "3.11.2-6+deb12u8"}
PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
            "python3.11", "python3.11-venv")
# What venv's ensurepip installs, and distutils (a package of its own in Debian).
COMPANIONS = {
    "python3-pip-whl": "23.0.1+dfsg-1",
    "python3-setuptools-whl": "66.1.1-1+deb12u2",
    "python3-distutils": "3.11.2-3",
}
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


def verify_command(version: str) -> str:
    wanted = tuple(int(part) for part in version.split("."))
    return (f'bin/python3 -I -c "import sys, {CHECKED_MODULES}; '
            f'assert sys.version_info[:3] == {wanted}, sys.version"')


def build_tree(version: str, work: Path, tree: Path) -> tuple[list[str], str]:
    """Lay out Python VERSION in `tree`; (PATH folders, verify command)."""
    from zlh.artifacts import check_version

    revision = DEBIAN_REVISIONS.get(version)
    if revision is None:
        known = ", ".join(sorted(DEBIAN_REVISIONS))
        raise NotFoundError(f"no Debian revision known for Python {version}; known: {known}")
    unpacked = _unpack(_download(revision, work / "debs"), work / "unpacked")
    _assemble(unpacked / "usr", tree)
    _compile(tree, version, work)
    check_version(tree / "bin/python3", f"Python {version}")
    return ["bin"], verify_command(version)


def _download(revision: str, folder: Path) -> list[Path]:
    from zlh.artifacts import run_tool

    apt = shutil.which("apt-get")
    if apt is None:
        raise ProvisionError("apt-get is not installed: building the python runtime needs "
                             "Debian's packages")
    folder.mkdir(parents=True)
    wanted = [f"{name}={revision}" for name in PACKAGES]
    wanted += [f"{name}={pinned}" for name, pinned in COMPANIONS.items()]
    try:
        run_tool([apt, "download", *wanted], folder)
    except ProvisionError as exc:
        raise ProvisionError(f"{exc.message}\n(run `apt-get update`; when Debian no longer "
                             "serves a pinned revision, zlh/debian_python.py needs the one "
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


def _assemble(usr: Path, tree: Path) -> None:
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
    for path in tree.rglob("*"):
        if path.is_symlink() and os.readlink(path).startswith("/"):
            raise IntegrityError(f"{path.relative_to(tree)} links to {os.readlink(path)}, "
                                 "outside the runtime")


def _patch(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if text.count(old) != 1:
        raise IntegrityError(f"{path.name}: the line to change is not there once: {old!r}")
    path.write_text(text.replace(old, new))


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
