"""The disk watch adds up a container's own files: a bind mount of the same file system
inside it (a read-only /usr, as a container of tests/ctfix.py has) is not its disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys
from pathlib import Path
from agentd.diskwatch import tree_bytes
print(json.dumps(tree_bytes(Path(sys.argv[1]))))
"""


def test_a_bind_mount_of_the_same_file_system_is_not_counted(tmp_path: Path) -> None:
    root = tmp_path / "ct"
    (root / "usr").mkdir(parents=True)
    (root / "own.bin").write_bytes(os.urandom(256 * 1024))
    outside = tmp_path / "host-usr"
    outside.mkdir()
    (outside / "big.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    assert outside.stat().st_dev == root.stat().st_dev  # the case: one file system
    script = (f'mount --bind "{outside}" "{root}/usr" && '
              f'exec "{sys.executable}" -c "$0" "{root}"')

    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "--",
                           "sh", "-c", script, CHILD], capture_output=True, text=True,
                          timeout=60, check=False)

    assert done.returncode == 0, done.stderr
    counted = json.loads(done.stdout)
    assert 256 * 1024 <= counted < 1024 * 1024, counted
