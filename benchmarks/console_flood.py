"""Console flood: a child writes 1,000,000 short log-like lines as fast as it can.

The child (benchmarks/_flood_child.py, run by this Python) times itself from its start
to the return of its last write, and writes that figure to a file, so every setup
measures the same thing:

  agentd   spawned by PUT /v1/spec (restart policy never, no readiness probe) and
           POST start, with a follower attached before the start
           (GET /v1/processes/NAME/console?after=-1&follow=true, read by a raw socket
           client that counts records and `lost` gap records at C speed)
  script   on a bare PTY drained by `script -q -c CHILD /dev/null > /dev/null`
           (the reference: the kernel's PTY is the physical limit)
  pipe     into a pipe: `CHILD | cat > /dev/null` (for scale)

Each setup runs --runs times (interleaved) and the median is reported. For agentd the
script also checks that the follower got every line or explicit `lost` records
(lines + lost == total), that the agent kept all the lines (GET console paged with
`after`, and the lines in STATE/console/NAME.log*), and how fast GET /v1/status answers
meanwhile (one request every 0.5 s). Write modes (--modes, default `line`):

  line     one write(2) per line, like a console logger that flushes every line
  4096     the lines joined in memory and written 4096 bytes at a time (block stdio)

    .venv/bin/python benchmarks/console_flood.py [--lines 1000000] [--runs 3]
        [--modes line,4096] [--profile] [--without-follower] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from _common import (
    BENCH,
    CLK_TCK,
    Agent,
    Started,
    add_common_args,
    cpu_ticks,
    descendants,
    end_processes,
    median,
    poll,
    ratio,
    report,
    scratch,
    set_source,
    source_label,
    tool_venv,
)

TARGET = 1.15
CHILD = BENCH / "_flood_child.py"
NAME = "flood"
GAP = re.compile(rb'\{"seq":(\d+),"lost":(\d+)\}')
SEQ = re.compile(rb'\{"seq":(\d+)')


def child_argv(lines: int, mode: str, timing: Path) -> list[str]:
    return [sys.executable, str(CHILD), str(lines), mode, str(timing)]


def read_timing(path: Path) -> float:
    return float(path.read_text())


# -- follower ---------------------------------------------------------------------------


class Follower(threading.Thread):
    """Follows the console over a raw HTTP/1.1 socket and counts what arrives.

    Each NDJSON record ends with `}` LF (text is JSON-escaped, so `}` LF occurs nowhere
    else, and the chunked framing only adds CR LF); gap records are found by pattern.
    """

    def __init__(self, port: int, token: str, name: str, deadline: float) -> None:
        super().__init__(daemon=True)
        self.port, self.token, self.name, self.deadline = port, token, name, deadline
        self.connected = threading.Event()
        self.finished = threading.Event()
        self.target: int | None = None  # the last seq, once the process is gone
        self.records = 0
        self.gaps = 0
        self.lost = 0
        self.flood_lines = 0
        self.first_seq: int | None = None
        self.last_seq = -1
        self.t_first: float | None = None
        self.t_done: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._follow()
        except (OSError, ValueError, RuntimeError) as exc:  # reported in the result
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.finished.set()

    def _follow(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.sendall(
                f"GET /v1/processes/{self.name}/console?after=-1&follow=true HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nAuthorization: Bearer {self.token}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed before the response head")
                head += data
            head, _, pending = head.partition(b"\r\n\r\n")
            status = head.split(b"\r\n", 1)[0]
            if b" 200 " not in status + b" ":
                raise ConnectionError(f"follow answered {status.decode(errors='replace')}")
            self.connected.set()
            sock.setblocking(False)
            pending = self._scan(pending)
            while not self._caught_up():
                if time.monotonic() > self.deadline:
                    raise TimeoutError("follower did not catch up before the deadline")
                ready, _, _ = select.select([sock], [], [], 0.2)
                if not ready:
                    continue
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                if not data:
                    raise ConnectionError("the agent closed the follow stream")
                pending = self._scan(pending + data)

    def _scan(self, buf: bytes) -> bytes:
        end = buf.rfind(b"}\n")
        if end < 0:
            return buf
        done, rest = buf[: end + 2], buf[end + 2 :]
        now = time.monotonic()
        if self.t_first is None:
            self.t_first = now
            first = SEQ.search(done)
            self.first_seq = int(first.group(1)) if first else None
        self.records += done.count(b"}\n")
        self.flood_lines += done.count(b"flood line")
        for match in GAP.finditer(done):
            self.gaps += 1
            self.lost += int(match.group(2))
        last = done.rfind(b'{"seq":')
        tail = SEQ.match(done, last)
        if tail:
            seq = int(tail.group(1))
            gap = GAP.match(done, last)
            self.last_seq = seq + int(gap.group(2)) - 1 if gap else seq
        if self._caught_up() and self.t_done is None:
            self.t_done = now
        return rest

    def _caught_up(self) -> bool:
        if self.target is not None and self.last_seq >= self.target:
            if self.t_done is None:
                self.t_done = time.monotonic()
            return True
        return False


# -- the three setups -------------------------------------------------------------------


def last_logged_seq(state: Path, name: str) -> int:
    path = state / "console" / f"{name}.log"
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(max(0, size - 65536))
        tail = handle.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    return int(tail.split(b"\t", 1)[0])


def verify_console(agent: Agent, name: str) -> dict[str, Any]:
    """Page through GET console with `after`; count lines, gaps and flood lines."""
    after, records, lost, flood, pages = -1, 0, 0, 0, 0
    first_seq = None
    while True:
        response = agent.client.get(f"/v1/processes/{name}/console",
                                    params={"after": after, "limit": 100_000})
        response.raise_for_status()
        body = response.content
        if not body:
            break
        pages += 1
        lines = body.splitlines()
        if first_seq is None:
            first_seq = json.loads(lines[0])["seq"]
        for match in GAP.finditer(body):
            lost += int(match.group(2))
        records += len(lines)
        flood += body.count(b"flood line")
        tail = json.loads(lines[-1])
        after = tail["seq"] + tail.get("lost", 1) - 1
    files = sorted((agent.state / "console").glob(f"{name}.log*"))
    in_files = 0
    for path in files:
        with open(path, "rb") as handle:
            rest = b""
            while chunk := handle.read(1 << 22):
                block = rest + chunk
                cut = block.rfind(b"\n") + 1  # count whole lines only
                in_files += block[:cut].count(b"flood line")
                rest = block[cut:]
            in_files += rest.count(b"flood line")
    return {"api_records": records, "api_lost": lost, "api_flood_lines": flood,
            "api_first_seq": first_seq, "api_last_seq": after, "api_pages": pages,
            "file_flood_lines": in_files, "log_files": [p.name for p in files]}


class StatusWatch(threading.Thread):
    """GET /v1/status every `every` seconds during the flood: is the agent answering?"""

    def __init__(self, agent: Agent, every: float = 0.5, timeout: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.url, self.token = agent.url, agent.token
        self.every, self.timeout = every, timeout
        self.stop = threading.Event()
        self.latencies: list[float] = []  # answered requests, seconds
        self.timeouts = 0
        self.state: str | None = None

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout) as client:
            while not self.stop.is_set():
                asked = time.monotonic()
                try:
                    status = client.get("/v1/status").json()
                except httpx.HTTPError:
                    self.timeouts += 1
                else:
                    self.latencies.append(time.monotonic() - asked)
                    self.state = next((p["state"] for p in status["processes"]
                                       if p["name"] == NAME), None)
                self.stop.wait(max(0.0, self.every - (time.monotonic() - asked)))

    def summary(self) -> dict[str, Any]:
        return {"answered": len(self.latencies), "timeouts": self.timeouts,
                "timeout_seconds": self.timeout,
                "median_ms": round(1000 * median(self.latencies), 1),
                "max_ms": round(1000 * max(self.latencies, default=float("nan")), 1)}


def run_agent(lines: int, mode: str, args: argparse.Namespace, profile: Path | None = None,
              follow: bool = True) -> dict[str, Any]:
    with scratch("flood-agent", keep=args.keep) as root:
        timing = root / "timing"
        # Big enough that no line of the flood is rotated away: the check below counts
        # every one of them in the file as well.
        agent = Agent(root, console_log_max_bytes=512 * 2**20)
        with agent:
            agent.start()
            agent.put_spec({"name": NAME, "argv": child_argv(lines, mode, timing),
                            "autostart": False, "restart": {"policy": "never"}})
            deadline = time.monotonic() + args.timeout
            follower = Follower(agent.port, agent.token, NAME, deadline)
            if follow:
                follower.start()
                if not follower.connected.wait(10):
                    raise RuntimeError(f"follower did not connect: {follower.error}")
            watch = StatusWatch(agent)
            spy = start_profiler(agent.pid, profile) if profile else None
            cpu_before = cpu_ticks(agent.pid)
            t_start = time.monotonic()
            response = agent.client.post(f"/v1/processes/{NAME}/start")
            response.raise_for_status()
            if response.json().get("pid"):
                agent.remember(response.json()["pid"])
            watch.start()
            poll(lambda: timing.exists() and timing.read_text().endswith("\n"),
                 args.timeout, "the child's timing file", every=0.05)
            t_child_done = time.monotonic()
            agent.remember_children()
            finished = True
            try:
                poll(lambda: watch.state == "stopped", max(1.0, deadline - time.monotonic()),
                     "the agent to report the flood process stopped", every=0.05)
                follower.target = last_logged_seq(agent.state, NAME)
                if follow:
                    follower.finished.wait(max(1.0, deadline - time.monotonic()))
                    finished = follower.t_done is not None
            except TimeoutError:
                finished = False
            cpu_after = cpu_ticks(agent.pid)
            t_end = time.monotonic()
            watch.stop.set()
            watch.join(watch.timeout + 5)
            if spy is not None:
                stop_profiler(spy)
            kept = verify_console(agent, NAME) if finished or not follow else None
            exit_record = next((e for e in agent.events("exit")
                                if e.get("process") == NAME), {})
        wall = read_timing(timing)

    f = follower
    follow_seconds = (f.t_done - f.t_first) if f.t_done and f.t_first else float("nan")
    total = f.target + 1 - (f.first_seq or 0) if f.target is not None else None
    return {
        "wall": wall,
        "finished_in_time": finished,
        "exit_code": exit_record.get("code"),
        "agent_cpu_seconds": (cpu_after - cpu_before) / CLK_TCK,
        "start_to_caught_up": t_end - t_start,
        "child_done_to_caught_up": (f.t_done or t_end) - t_child_done,
        "status_during_flood": watch.summary(),
        "follower": {
            "error": f.error, "records": f.records, "lines": f.records - f.gaps,
            "gaps": f.gaps, "lost": f.lost, "flood_lines": f.flood_lines,
            "first_seq": f.first_seq, "last_seq": f.last_seq, "total": total,
            "complete": total is not None and f.records - f.gaps + f.lost == total,
            "seconds": follow_seconds,
            "lines_per_second": (f.records - f.gaps) / follow_seconds
            if not math.isnan(follow_seconds) and follow_seconds > 0 else float("nan"),
        },
        "kept": kept,
    }


def run_bounded(argv: list[str], timeout: float) -> None:
    """Run a command in its own session; on timeout end it and its children by pid."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        family = [Started(pid) for pid in descendants(proc.pid)]
        proc.kill()
        proc.wait()
        end_processes(family)
        raise RuntimeError(f"{argv[0]} setup did not finish in {timeout}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {proc.returncode}: {err.decode()}")


def run_script(lines: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with scratch("flood-script") as root:
        timing = root / "timing"
        command = shlex.join(child_argv(lines, mode, timing))
        run_bounded(["sh", "-c", f"script -q -c {shlex.quote(command)} /dev/null > /dev/null"],
                    args.timeout)
        return {"wall": read_timing(timing)}


def run_pipe(lines: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    with scratch("flood-pipe") as root:
        timing = root / "timing"
        command = shlex.join(child_argv(lines, mode, timing))
        run_bounded(["sh", "-c", f"{command} | cat > /dev/null"], args.timeout)
        return {"wall": read_timing(timing)}


# -- profiling (optional) ---------------------------------------------------------------


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes]:
    bin_dir = tool_venv(["py-spy"])
    proc = subprocess.Popen(
        [str(bin_dir / "py-spy"), "record", "--pid", str(pid), "--rate", "200",
         "--nonblocking", "--nolineno", "--format", "raw", "--output", str(out),
         "--duration", "120"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    time.sleep(1.0)  # py-spy attaches before the flood begins
    return proc


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def summarise_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def shares(table: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(table.items(), key=lambda item: -item[1])[:top]
        return [(name, round(100 * n / total, 1)) for name, n in ranked]

    return {"samples": total, "self": shares(own), "inclusive": shares(inclusive)}


# -- main -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default="line",
                        help="comma-separated write modes: line and/or a write size")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per run at most")
    parser.add_argument("--profile", action="store_true",
                        help="one more agentd run per mode under py-spy (throwaway venv)")
    parser.add_argument("--without-follower", action="store_true",
                        help="also run agentd with no follower (to split the costs)")
    parser.add_argument("--keep", action="store_true", help="keep the agent's folders")
    add_common_args(parser)
    args = parser.parse_args()
    set_source(args.source)
    if not shutil.which("script"):
        parser.error("`script` (util-linux) is not installed")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    result: dict[str, Any] = {
        "benchmark": "console_flood", "agentd_source": source_label(),
        "lines": args.lines, "runs": args.runs,
        "child": f"{Path(sys.executable).name} {CHILD.relative_to(BENCH.parent)} "
                 "N MODE TIMING_FILE",
        "reference": "script -q -c CHILD /dev/null > /dev/null", "target_ratio": TARGET,
        "modes": {},
    }
    lines = [f"console_flood: {args.lines:,} lines, {args.runs} runs per setup, median",
             f"agentd: {result['agentd_source']}",
             f"child: {result['child']} (one Python program for every setup)",
             f"reference: {result['reference']}; also a pipe: CHILD | cat > /dev/null", ""]
    for mode in modes:
        agent_runs, script_runs, pipe_runs = [], [], []
        for _ in range(args.runs):
            agent_runs.append(run_agent(args.lines, mode, args))
            script_runs.append(run_script(args.lines, mode, args))
            pipe_runs.append(run_pipe(args.lines, mode, args))
        walls = {
            "agentd": median([r["wall"] for r in agent_runs]),
            "script": median([r["wall"] for r in script_runs]),
            "pipe": median([r["wall"] for r in pipe_runs]),
        }
        follower_rates = [r["follower"]["lines_per_second"] for r in agent_runs]
        entry: dict[str, Any] = {
            "wall_seconds": walls,
            "wall_runs": {"agentd": [r["wall"] for r in agent_runs],
                          "script": [r["wall"] for r in script_runs],
                          "pipe": [r["wall"] for r in pipe_runs]},
            "ratio_agentd_script": round(ratio(walls["agentd"], walls["script"]), 3),
            "ratio_script_pipe": round(ratio(walls["script"], walls["pipe"]), 3),
            "follower_lines_per_second": median(follower_rates),
            "agent_cpu_seconds": median([r["agent_cpu_seconds"] for r in agent_runs]),
            "child_done_to_follower_caught_up": median(
                [r["child_done_to_caught_up"] for r in agent_runs]),
            "status_during_flood_max_ms": max(
                r["status_during_flood"]["max_ms"] for r in agent_runs),
            "status_during_flood_timeouts": sum(
                r["status_during_flood"]["timeouts"] for r in agent_runs),
            "agentd_runs": agent_runs,
        }
        if args.without_follower:
            alone = [run_agent(args.lines, mode, args, follow=False) for _ in range(args.runs)]
            entry["agentd_without_follower"] = {
                "wall_seconds": median([r["wall"] for r in alone]),
                "wall_runs": [r["wall"] for r in alone],
                "agent_cpu_seconds": median([r["agent_cpu_seconds"] for r in alone]),
                "kept_flood_lines": [r["kept"]["file_flood_lines"] if r["kept"] else None
                                     for r in alone],
            }
        if args.profile:
            with scratch("flood-profile") as tmp:
                out = tmp / "profile.txt"
                run_agent(args.lines, mode, args, profile=out)
                entry["profile"] = summarise_profile(out) if out.exists() else None
        result["modes"][mode] = entry

        label = ("one write(2) per line" if mode == "line"
                 else f"lines joined, written {mode} bytes at a time")
        r = entry["ratio_agentd_script"]
        lines += [
            f"mode {mode}: {label}",
            (f"  child wall time  agentd {walls['agentd']:.3f} s   script {walls['script']:.3f} s"
             f"   pipe {walls['pipe']:.3f} s"),
            (f"  ratio agentd/script {r:.3f}  (target <= {TARGET}: "
             f"{'met' if r <= TARGET else 'missed'});  script/pipe "
             f"{entry['ratio_script_pipe']:.2f}"),
            (f"  runs: agentd {_fmt(entry['wall_runs']['agentd'])}  script "
             f"{_fmt(entry['wall_runs']['script'])}  pipe {_fmt(entry['wall_runs']['pipe'])}"),
            (f"  follower: {entry['follower_lines_per_second']:,.0f} lines/s (median); caught up "
             f"{entry['child_done_to_follower_caught_up']:.2f} s after the child's last write"),
            (f"  agent CPU during a run: {entry['agent_cpu_seconds']:.2f} s "
             f"({1e6 * entry['agent_cpu_seconds'] / args.lines:.2f} us per line)"),
            (f"  GET /v1/status every 0.5 s meanwhile: slowest answer "
             f"{entry['status_during_flood_max_ms'] / 1000:.2f} s, "
             f"{entry['status_during_flood_timeouts']} requests timed out (10 s)"),
        ]
        if "agentd_without_follower" in entry:
            alone = entry["agentd_without_follower"]
            lines.append(
                f"  agentd without a follower: {alone['wall_seconds']:.3f} s "
                f"(ratio to script {ratio(alone['wall_seconds'], walls['script']):.3f}), "
                f"agent CPU {alone['agent_cpu_seconds']:.2f} s")
        for i, run in enumerate(agent_runs, 1):
            fo, kept = run["follower"], run["kept"]
            if kept is None:
                lines.append(f"  run {i}: the follower did not catch up within --timeout "
                             f"{args.timeout:g} s: lines {fo['lines']:,} + lost {fo['lost']:,} "
                             f"so far (error: {fo['error']})")
                continue
            lines.append(
                f"  run {i}: follower lines {fo['lines']:,} + lost {fo['lost']:,} "
                f"({fo['gaps']} gap records) = {fo['lines'] + fo['lost']:,} of total "
                f"{fo['total']:,}: {'complete' if fo['complete'] else 'MISMATCH'}"
                f"{'; error ' + fo['error'] if fo['error'] else ''}; flood lines followed "
                f"{fo['flood_lines']:,}; kept by the agent: API {kept['api_flood_lines']:,}"
                f" (lost {kept['api_lost']}), log file {kept['file_flood_lines']:,}")
        if entry.get("profile"):
            prof = entry["profile"]
            lines.append(f"  py-spy ({prof['samples']} samples), top self time:")
            lines += [f"    {share:5.1f}%  {name}" for name, share in prof["self"][:12]]
        lines.append("")
    report(result, lines, args.json)
    return 0


def _fmt(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
