"""The respawn child: note the time at its first line of Python, print a line, note the
time again as its last action, and exit with code 1.

    python3 _crash_child.py MARKS_FILE

MARKS_FILE gets `start TS` and `end TS` lines (time.time()), appended.
"""

import time

t_start = time.time()
import sys

marks = sys.argv[1]
with open(marks, "a") as out:
    out.write(f"start {t_start:.6f}\n")
print("crash child: exiting with code 1", flush=True)
with open(marks, "a") as out:
    out.write(f"end {time.time():.6f}\n")
sys.exit(1)
