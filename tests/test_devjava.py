"""`dev-java` on the local provider, through the `zlh` program: the catalog's jdk (Debian
12's OpenJDK 17, repacked) is installed and first on the container's PATH; over SSH and as
the dev user, its javac compiles a Hello.java and its java runs it, finding its home from
where it is installed and trusting the certificates the runtime carries.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd.spawn import SYSTEM_PATH
from tests.codeserverfix import code_server_cache
from tests.test_devenv import in_namespace
from tests.test_devssh import Operator
from zlh import catalog, codeserver

pytestmark = pytest.mark.slow

NAME = "devjava"
# The Mozilla certificates of ca-certificates 20230311+deb12u1 (zlh/debian_runtimes.py).
TRUSTED = 142
HELLO = """\
import java.security.KeyStore;
import javax.net.ssl.TrustManagerFactory;
import javax.net.ssl.X509TrustManager;

public class Hello {
    public static void main(String[] args) throws Exception {
        TrustManagerFactory factory =
            TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        factory.init((KeyStore) null);
        X509TrustManager trust = (X509TrustManager) factory.getTrustManagers()[0];
        System.out.println("Hello, " + args[0] + " from Java " + Runtime.version().feature()
            + " in " + System.getProperty("java.home") + ", trusting "
            + trust.getAcceptedIssuers().length);
    }
}
"""


class JavaOperator(Operator):
    @property
    def container(self) -> Path:
        return self.home / "containers" / NAME


@pytest.fixture(scope="module")
def operator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JavaOperator]:
    code_server_cache()
    op = JavaOperator(tmp_path_factory.mktemp("devjava"))
    try:
        done = op.zlh("provision", "dev-java", NAME, "--json")
        assert done.returncode == 0, done.stderr
        yield op
    finally:
        op.zlh("delete", NAME, "--yes")


def _version() -> str:
    return catalog.find("jdk", arch=catalog.machine_arch()).version.version


def test_javac_and_java_over_ssh_are_the_catalog_jdk(operator: JavaOperator) -> None:
    runtime = operator.container / "opt/zlh/runtimes/jdk/current"
    work = operator.container / "home/dev/workspace"
    (work / "Hello.java").write_text(HELLO)
    script = (f"command -v javac; command -v java; cd {work} && javac Hello.java && "
              "java Hello ssh && echo $PATH")
    done = operator.zlh("ssh", NAME, "--", script, timeout=120)
    assert done.returncode == 0, done.stderr
    home = operator.container / f"opt/zlh/runtimes/jdk/{_version()}"
    assert done.stdout.splitlines() == [
        f"{runtime}/bin/javac",
        f"{runtime}/bin/java",
        f"Hello, ssh from Java 17 in {home}, trusting {TRUSTED}",
        f"{runtime}/bin:{SYSTEM_PATH}",
    ]
    listed = json.loads(operator.zlh("runtime", "list", NAME, "--json").stdout)
    # The IDE's node is installed, not current: the PATH above has the jdk only.
    assert [(r["name"], r["version"], r["active"]) for r in listed] == [
        ("jdk", _version(), True), ("node", codeserver.NODE_VERSION, False)]


# As the dev user of a container laid out as on Proxmox (see tests/test_devssh.py): the
# runtime belongs to root, the dev user compiles in the workspace it owns.
AS_DEV = """
set -e
cp -a /etc/. "$1/etc"
mount --bind "$1/etc" /etc
mount --bind {container}/opt /opt
mount --bind {container}/home /home
{python} -c 'from agentd import devuser; devuser.ensure("dev")'
exec setpriv --reuid=dev --regid=dev --init-groups env -i HOME=/home/dev PATH={path} sh -c '
cd /home/dev/workspace
mkdir -p dev && cp /dev/stdin dev/Hello.java <<EOF
{hello}EOF
id -un
javac -d dev/classes dev/Hello.java
java -cp dev/classes Hello dev
'
"""


def test_the_dev_user_compiles_and_runs_hello(operator: JavaOperator, tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    runtime = "/opt/zlh/runtimes/jdk/current"
    script = AS_DEV.format(container=operator.container, python=sys.executable,
                           path=f"{runtime}/bin:{SYSTEM_PATH}", hello=HELLO)
    done = in_namespace(tmp_path, script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "dev",
        f"Hello, dev from Java 17 in /opt/zlh/runtimes/jdk/{_version()}, trusting {TRUSTED}",
    ]
    classes = operator.container / "home/dev/workspace/dev/classes/Hello.class"
    assert classes.is_file()
