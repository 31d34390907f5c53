"""The console-flood child: N short log-like lines to stdout as fast as it can.

    python3 _flood_child.py N MODE TIMING_FILE

MODE `line`: one write(2) per line, as a game server's console logger that flushes
every line. MODE `BYTES` (e.g. 4096): the lines are built in memory with one join and
written in writes of BYTES bytes, as a C program's block-buffered stdio would.
The child does not look at what its stdout is, so it behaves the same on a PTY and a
pipe. It times itself from its start to the return of its last write and writes the
seconds to TIMING_FILE.
"""

import os
import sys
import time

t0 = time.perf_counter()
count, mode, timing_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
LINE = b"[12:00:00 INFO]: flood line %d lorem ipsum dolor sit amet\n"
write = os.write
if mode == "line":
    for i in range(count):
        write(1, LINE % i)
else:
    size = int(mode)
    view = memoryview(b"".join([LINE % i for i in range(count)]))
    pos, end = 0, len(view)
    while pos < end:
        pos += write(1, view[pos : pos + size])
elapsed = time.perf_counter() - t0
with open(timing_file, "w") as out:
    out.write(f"{elapsed:.6f}\n")
