"""Supervision of one process: states, crash recovery, probes, graceful stop.

    stopped -> starting -> running (ready) -> stopping -> stopped
                  |            |
                  +--- exit ---+--> crash --> backoff --> starting ...
                                          \\-> fatal (too many failures in the window)

Power actions (start, stop, restart) are serialised by one lock; `kill` never waits
for it. Every transition is logged once with the pid and saved to `NAME.state` in the
holders folder, so a restarted agent takes up where the last one left. The program
runs under a holder (see spawn.py); its end is noticed through the holder's pidfd in
the event loop, so there is no polling and no reaper thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import signal
import time
from collections import deque
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from agentd.cgroup import MemoryGroup
from agentd.console import Console
from agentd.errors import Conflict
from agentd.logs import fields
from agentd.models import (
    CrashRecord,
    LogProbe,
    ProcessDetail,
    ProcessSpec,
    ProcessState,
    ProcessStatus,
)
from agentd.probes import LogWatch, check
from agentd.proctree import signal_leader, signal_tree
from agentd.spawn import Child, Found, Launch, SpawnError, Spool, find, spawn
from agentd.spawn import forget as forget_files

log = logging.getLogger(__name__)

CRASH_HISTORY = 20
CRASH_LINES = 20
# Output is taken in slices of READ_SLICE, READ_BURST per turn of the event loop: a
# turn adds fewer lines than the console ring holds, so live followers are served from
# the ring, and probes and API requests get their turns during a flood.
READ_SLICE = 128 * 1024
READ_BURST = 2


class Supervisor:
    def __init__(self, spec: ProcessSpec, console: Console, server_root: Path,
                 holders: Path, on_change: Callable[[], None] = lambda: None) -> None:
        self.spec = spec
        self.console = console
        self.server_root = server_root
        self.container_root = Path("/")  # env_files are relative to it
        self.holders = holders
        self.state: ProcessState = "stopped"
        self.ready = False
        self.restarts = 0
        self.crashes: deque[CrashRecord] = deque(maxlen=CRASH_HISTORY)
        self.last_exit_code: int | None = None
        self.backoff_until: float | None = None
        self._on_change = on_change
        self._lock = asyncio.Lock()
        self._child: Child | None = None
        self._exited: asyncio.Future[int] | None = None
        self._started_at: float | None = None
        self._ready_at: float | None = None
        self._expect_exit = False  # an operator stop, restart or kill is under way
        self._stop_sent = False  # the stop command went in through the console
        self._kill_reason: str | None = None  # startup-timeout or hung, when we killed it
        self._sent_sigkill = False
        self._holder_lost = False
        self._pump_queued = False  # a _pump for output already in the spool is scheduled
        self._unsubscribe_watch: Callable[[], None] = lambda: None
        self._wanted = False  # the operator wants it up: false after stop or kill
        self._oom_before: int | None = None
        self._memory: MemoryGroup | None = None
        self._failures: deque[float] = deque()
        self._streak = 0  # crashes since the last stable run; sets the backoff delay
        self._tasks: set[asyncio.Task[None]] = set()
        self._backoff_task: asyncio.Task[None] | None = None

    # -- public actions -----------------------------------------------------------------

    async def start(self) -> None:
        async with self._lock:
            if self.state in ("starting", "running") or self._child is not None:
                return
            self._cancel_backoff()
            self._failures.clear()
            self._streak = 0
            self._wanted = True
            self._spawn()

    async def stop(self) -> None:
        self._cancel_backoff()
        self._wanted = False
        async with self._lock:
            if self.state in ("backoff", "fatal"):
                self._transition("stopped")
            await self._stop_child()

    async def restart(self) -> None:
        self._cancel_backoff()
        async with self._lock:
            await self._stop_child()
            self._failures.clear()
            self._streak = 0
            self._spawn()

    async def kill(self) -> None:
        """SIGKILL to the whole tree, now; no restart follows."""
        self._cancel_backoff()
        self._wanted = False
        if self.state in ("backoff", "fatal"):
            self._transition("stopped")
        child, exited = self._child, self._exited
        if child is None or exited is None:
            return
        self._expect_exit = True
        self._sent_sigkill = True
        signal_tree(child.identity, child.marker, signal.SIGKILL)
        await asyncio.shield(exited)

    def send(self, line: str) -> None:
        child = self._child
        if child is None or self.state not in ("starting", "running"):
            raise Conflict(f"process {self.spec.name!r} is {self.state}; it takes no input")
        data = (line + "\n").encode()
        if not child.send(data):
            raise Conflict(f"process {self.spec.name!r} is not reading its input")
        if self.spec.stop.command is not None and line.strip() == self.spec.stop.command:
            self._stop_sent = True
        log.info("console_input", extra=fields(process=self.spec.name, bytes=len(data)))

    async def shutdown(self) -> None:
        """Stop for the agent's own shutdown: no restart, whatever the policy."""
        self._cancel_backoff()
        async with self._lock:
            await self._stop_child()

    # -- status -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def status(self, usage: tuple[float, int] | None = None) -> ProcessStatus:
        now = time.time()
        started = self._started_at if self._child is not None else None
        return ProcessStatus(
            name=self.spec.name,
            kind=self.spec.kind,
            state=self.state,
            ready=self.ready,
            pid=self.pid,
            started_at=started,
            uptime=None if started is None else round(now - started, 3),
            restarts=self.restarts,
            backoff_until=self.backoff_until,
            last_exit_code=self.last_exit_code,
            last_crash=self.crashes[-1] if self.crashes else None,
            port=self.spec.port,
            cpu_percent=usage[0] if usage else None,
            rss_bytes=usage[1] if usage else None,
        )

    def detail(self) -> ProcessDetail:
        return ProcessDetail(
            **self.status().model_dump(by_alias=True), crashes=list(self.crashes),
            console_log_error=self.console.log_error, spec=self.spec,
        )

    def child_identity(self) -> tuple[int, float] | None:
        child = self._child
        return None if child is None else (child.identity.pid, child.identity.started)

    # -- spawning -----------------------------------------------------------------------

    def _spawn(self) -> None:
        self._expect_exit = self._stop_sent = self._sent_sigkill = self._holder_lost = False
        self._kill_reason = None
        self.backoff_until = None
        cwd = self.server_root / (self.spec.cwd or ".")
        files = tuple((var, self.container_root / path)
                      for var, path in self.spec.env_files.items())
        memory = self._memory_group()
        launch = Launch(self.spec.argv, cwd, self.spec.env, self.spec.user, files,
                        memory.procs_file if memory else None)
        try:
            self._oom_before = self._oom_count()
            child = spawn(launch, self.holders, self.spec.name)
        except SpawnError as exc:
            self.console.note(f"[zlh] {exc}")
            self._crashed("spawn-failed", None, None, 0.0, str(exc))
            return
        self._started_at = time.time()
        self._attach(child)
        self._transition("starting")
        self._start_probes(child)
        self._pump(child)  # after the probes: a ready line already written is seen

    def _attach(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        self._child, self._exited = child, loop.create_future()
        loop.add_reader(child.sock, self._on_tick, child)
        loop.add_reader(child.holder_pidfd, self._reap, child)

    def _report_lost_output(self, spool: Spool) -> None:
        self.console.flush_partial()  # the line cut by the hole ends here, not glued on
        self.console.note(f"[zlh] {spool.skipped} bytes of output were lost: the holder "
                          "could not write them (disk full)")
        log.warning("output_lost", extra=fields(process=self.spec.name,
                                                bytes=spool.skipped))
        spool.skipped = 0

    def _on_tick(self, child: Child) -> None:
        # The ticks only say "there is output"; the output itself is in the spool.
        try:
            if not child.sock.recv(65536):
                asyncio.get_running_loop().remove_reader(child.sock)
        except BlockingIOError:
            pass
        except OSError:
            asyncio.get_running_loop().remove_reader(child.sock)
        self._pump(child)

    def _pump(self, child: Child, burst: int = READ_BURST) -> None:
        self._pump_queued = False
        if child.closed:
            return  # a queued turn for a process that has been reaped since
        more = False
        for _ in range(burst):
            data = child.spool.read(READ_SLICE)
            if child.spool.skipped:
                self._report_lost_output(child.spool)
            if data:
                self.console.feed(data)
            more = len(data) == READ_SLICE or child.spool.hole_ahead
            if not more:
                break
        # What is in the console is safe; an unterminated line is read again after a
        # restart, so it is not counted as consumed yet.
        child.spool.save(child.spool.offset - self.console.pending_bytes)
        if more and not self._pump_queued and self._child is child:
            self._pump_queued = True
            asyncio.get_running_loop().call_soon(self._pump, child)

    # -- exit handling ------------------------------------------------------------------

    def _reap(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(child.holder_pidfd)
        loop.remove_reader(child.sock)
        self._pump(child, burst=1_000_000)  # everything the holder wrote, to the end
        status = child.wait_status()
        self._holder_lost = status is None
        code = -signal.SIGKILL if status is None else status
        # Leftover descendants must not outlive their process: they would hold the
        # game port and the PTY.
        signal_tree(child.identity, child.marker, signal.SIGKILL)
        self.console.flush_partial()
        child.forget()
        uptime = time.time() - (self._started_at or time.time())
        ready_for = 0.0 if self._ready_at is None else time.time() - self._ready_at
        self._child = None
        self.ready = False
        self._ready_at = None
        self._cancel_probes()
        self.last_exit_code = code
        self._settle(code, uptime, ready_for)
        assert self._exited is not None
        if not self._exited.done():
            self._exited.set_result(code)

    def _settle(self, code: int, uptime: float, ready_for: float) -> None:
        name = self.spec.name
        signame = _signal_name(-code) if code < 0 else None
        log.info("exit", extra=fields(process=name, code=code, signal=signame,
                                       uptime=round(uptime, 3)))
        if self._expect_exit:
            self.console.note(f"[zlh] {name} stopped (exit {_describe(code)})")
            self._transition("stopped")
            return
        clean = code in self.spec.restart.clean_exit_codes and self._kill_reason is None
        if clean and (self._stop_sent or not self.spec.restart.clean_exit_is_crash):
            self.console.note(f"[zlh] {name} exited cleanly (exit {code})")
            if self.spec.restart.policy == "always" and not self._stop_sent:
                # Not a failure, but still paced: a program that exits at once must
                # not turn into a tight loop.
                stable = ready_for >= self.spec.restart.stable_after
                self._streak = 0 if stable else self._streak + 1
                self._schedule_restart(self._backoff_delay())
            else:
                self._transition("stopped")
            return
        if ready_for >= self.spec.restart.stable_after:
            self._streak = 0
        crash_class, detail, inferred = self._classify(code)
        self._crashed(crash_class, code if code >= 0 else None, signame, uptime, detail,
                      inferred)

    def _classify(self, code: int) -> tuple[str, str, bool]:
        if self._holder_lost:
            return ("signal", "its holder died, so its exit status is unknown; the agent "
                    "killed what was left", True)
        if self._kill_reason is not None:
            return self._kill_reason, f"killed by the agent: {self._kill_reason}", False
        if code >= 0:
            return "exit-code", f"exited with code {code}", False
        if -code == signal.SIGKILL and not self._sent_sigkill:
            after = self._oom_count()
            if after is not None and self._oom_before is not None and after > self._oom_before:
                return "oom-killed", "the memory cgroup's oom_kill counter rose", False
            if after is None:
                return ("signal", "SIGKILL not sent by the agent; possibly the OOM killer "
                        "(inferred: no cgroup memory events here)", True)
        return "signal", f"killed by {_signal_name(-code)}", False

    def _crashed(self, crash_class: str, code: int | None, signame: str | None,
                 uptime: float, detail: str, inferred: bool = False) -> None:
        # crash_class is one of CrashClass's values; pydantic checks it at construction.
        record = CrashRecord(
            time=time.time(), crash_class=crash_class,  # type: ignore[arg-type]
            exit_code=code, signal=signame, uptime=round(uptime, 3), inferred=inferred,
            detail=detail,
            last_lines=self.console.tail(CRASH_LINES),
        )
        self.crashes.append(record)
        log.warning("crash", extra=fields(process=self.spec.name, crash_class=crash_class,
                                          exit_code=code, signal=signame, detail=detail))
        self.console.note(f"[zlh] {self.spec.name} crashed: {crash_class}: {detail}")
        policy = self.spec.restart
        if policy.policy == "never":
            self._transition("stopped")
            return
        now = time.time()
        self._failures.append(now)
        while self._failures and now - self._failures[0] > policy.failure_window:
            self._failures.popleft()
        if len(self._failures) >= policy.max_failures:
            log.error("fatal", extra=fields(process=self.spec.name,
                                            failures=len(self._failures),
                                            window=policy.failure_window))
            self._transition("fatal")
            return
        self._streak += 1
        self._schedule_restart(self._backoff_delay())

    def _backoff_delay(self) -> float:
        policy = self.spec.restart
        base = min(policy.backoff_max, policy.backoff_initial * 2 ** max(0, self._streak - 1))
        jitter = base * policy.backoff_jitter
        return max(0.0, base + random.uniform(-jitter, jitter))

    def _schedule_restart(self, delay: float) -> None:
        self.backoff_until = time.time() + delay
        self._transition("backoff", delay=round(delay, 3))
        self._backoff_task = asyncio.get_running_loop().create_task(self._restart_after(delay))

    async def _restart_after(self, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        async with self._lock:
            if self.state != "backoff":
                return
            self._backoff_task = None
            self.restarts += 1
            self._spawn()

    def _cancel_backoff(self) -> None:
        task, self._backoff_task = self._backoff_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self.backoff_until = None

    # -- stopping -----------------------------------------------------------------------

    async def _stop_child(self) -> None:
        """Stop command or signal -> grace -> SIGTERM to the group -> SIGKILL."""
        child, exited = self._child, self._exited
        if child is None or exited is None:
            return
        self._expect_exit = True
        self.ready = False
        self._cancel_probes()
        self._transition("stopping")
        stop = self.spec.stop

        # Step 1: ask politely, the way the server wants to be asked.
        if stop.command is not None:
            child.send((stop.command + "\n").encode())
        else:
            signal_leader(child.identity, signal.Signals[stop.signal])
        if await _wait(exited, stop.grace):
            return

        # Step 2: SIGTERM to everything in the tree.
        log.warning("stop_escalate", extra=fields(process=self.spec.name, pid=child.pid,
                                                  signal="SIGTERM"))
        signal_tree(child.identity, child.marker, signal.SIGTERM)
        if await _wait(exited, stop.term_grace):
            return

        # Step 3: SIGKILL; the kernel does not refuse it.
        log.warning("stop_escalate", extra=fields(process=self.spec.name, pid=child.pid,
                                                  signal="SIGKILL"))
        self._sent_sigkill = True
        signal_tree(child.identity, child.marker, signal.SIGKILL)
        await asyncio.shield(exited)

    # -- probes -------------------------------------------------------------------------

    def _start_probes(self, child: Child) -> None:
        # A log probe subscribes here, synchronously, before any output is read.
        watch = None
        if isinstance(self.spec.readiness, LogProbe):
            watch = LogWatch(self.spec.readiness)
            self._unsubscribe_watch = self.console.subscribe(watch.feed)
        self._track(self._readiness(child, watch))
        self._track(self._startup_deadline(child))

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _drop_watch(self) -> None:
        unsubscribe, self._unsubscribe_watch = self._unsubscribe_watch, lambda: None
        unsubscribe()

    def _cancel_probes(self) -> None:
        self._drop_watch()  # also when the readiness task is cancelled before it ran
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()

    async def _readiness(self, child: Child, watch: LogWatch | None) -> None:
        probe = self.spec.readiness
        if watch is not None:
            try:
                await watch.wait()
            finally:
                self._drop_watch()
        elif probe is not None:
            while await check(probe) is not None:
                await asyncio.sleep(probe.interval)
        if self._child is not child or self.state != "starting":
            return
        self.ready = True
        self._ready_at = time.time()
        self._transition("running", ready=True)
        if self.spec.liveness is not None:
            self._track(self._liveness(child))

    async def _startup_deadline(self, child: Child) -> None:
        await asyncio.sleep(self.spec.startup_timeout)
        if self._child is child and self.state == "starting":
            self.console.note(f"[zlh] not ready after {self.spec.startup_timeout:g}s")
            self._kill_for("startup-timeout", child)

    async def _liveness(self, child: Child) -> None:
        probe = self.spec.liveness
        assert probe is not None and not isinstance(probe, LogProbe)
        failures = 0
        while self._child is child:
            await asyncio.sleep(probe.interval)
            reason = await check(probe)
            failures = 0 if reason is None else failures + 1
            if reason is not None:
                log.warning("liveness_failed", extra=fields(
                    process=self.spec.name, pid=child.pid, failures=failures, reason=reason))
            if failures >= probe.failure_threshold and self._child is child:
                self.console.note(f"[zlh] liveness failed {failures} times: {reason}")
                self._kill_for("hung", child)
                return

    def _kill_for(self, reason: str, child: Child) -> None:
        self._kill_reason = reason
        self.ready = False
        self._sent_sigkill = True
        signal_tree(child.identity, child.marker, signal.SIGKILL)

    # -- memory cgroup ------------------------------------------------------------------

    def _memory_group(self) -> MemoryGroup | None:
        """The process's own memory cgroup (named after the process and this agent's
        state folder, so a restarted agent finds the same one), if the machine allows."""
        if self._memory is None:
            suffix = hashlib.sha1(str(self.holders).encode()).hexdigest()[:8]
            limit = self.spec.memory_limit_mb
            self._memory = MemoryGroup.open(f"zlh-{self.spec.name}-{suffix}",
                                            None if limit is None else limit * 2**20)
        return self._memory

    def _oom_count(self) -> int | None:
        """OOM kills in the process's own cgroup, else in the agent's."""
        if self._memory is not None:
            return self._memory.oom_kills()
        own = MemoryGroup.own()
        return None if own is None else own.oom_kills()

    def release(self) -> None:
        """The process is removed from the spec: its cgroup goes too."""
        if self._memory is not None:
            self._memory.remove()
            self._memory = None

    # -- bookkeeping --------------------------------------------------------------------

    def _transition(self, state: ProcessState, **extra: object) -> None:
        previous, self.state = self.state, state
        if previous != state:
            log.info("state", extra=fields(process=self.spec.name, previous=previous,
                                           state=state, pid=self.pid, **extra))
        self._save()
        self._on_change()

    # -- surviving an agent restart -----------------------------------------------------

    def _save(self) -> None:
        record = {
            "state": self.state, "ready": self.ready, "wanted": self._wanted,
            "started_at": self._started_at, "ready_at": self._ready_at,
            "restarts": self.restarts, "last_exit_code": self.last_exit_code,
            "expect_exit": self._expect_exit, "stop_sent": self._stop_sent,
            "oom_before": self._oom_before,
            "crashes": [c.model_dump(by_alias=True) for c in self.crashes],
        }
        path = self.holders / f"{self.spec.name}.state"
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError as exc:
            # A full disk must not stop a stop: the process is handled all the same, and
            # only a restarted agent would know less about it.
            log.warning("state_save_failed", extra=fields(process=self.spec.name,
                                                          error=str(exc)))

    def _load(self) -> dict[str, object]:
        try:
            saved = json.loads((self.holders / f"{self.spec.name}.state").read_text())
        except (OSError, ValueError):
            return {}
        self.restarts = int(saved.get("restarts", 0))
        self.last_exit_code = saved.get("last_exit_code")
        self._wanted = bool(saved.get("wanted", False))
        oom_before = saved.get("oom_before")
        self._oom_before = oom_before if isinstance(oom_before, int) else None
        for crash in saved.get("crashes", []):
            self.crashes.append(CrashRecord.model_validate(crash))
        return saved  # type: ignore[no-any-return]  # our own JSON

    def resume(self) -> bool:
        """Take up what a previous agent left: reattach, or settle an exit that happened
        while no agent was there. False when there is nothing to take up."""
        saved = self._load()
        found = find(self.holders, self.spec.name)
        self._memory_group()
        if found is None:
            return bool(saved) and not self._wanted
        if found.child is not None:
            self._reattach(found.child, saved)
        else:
            self._settle_absent(found, saved)
        return True

    def _reattach(self, child: Child, saved: dict[str, object]) -> None:
        self._started_at = float(saved.get("started_at") or time.time())  # type: ignore[arg-type]
        self._expect_exit = bool(saved.get("expect_exit"))
        self._stop_sent = bool(saved.get("stop_sent"))
        self._attach(child)
        log.info("reattached", extra=fields(process=self.spec.name, pid=child.pid,
                                            holder=child.holder.pid))
        if saved.get("ready"):
            self.ready = True
            self._ready_at = float(saved.get("ready_at") or time.time())  # type: ignore[arg-type]
            self._transition("running")
            if self.spec.liveness is not None:
                self._track(self._liveness(child))
        else:
            self._transition("starting")
            self._start_probes(child)
        self._pump(child)  # after the probes: what was written meanwhile is seen
        if saved.get("state") == "stopping":
            # The last agent died mid-stop: finish the job, escalation included.
            self._track(self.stop())

    def _settle_absent(self, found: Found, saved: dict[str, object]) -> None:
        """The program ended while no agent was attached: record it as if seen."""
        assert found.spool is not None
        while data := found.spool.read():
            self.console.feed(data)
        self.console.flush_partial()
        if found.program is not None and found.marker is not None:
            signal_tree(found.program, found.marker, signal.SIGKILL)
        found.spool.close()
        forget_files(self.holders, self.spec.name)
        self._holder_lost = found.status is None
        self._expect_exit = bool(saved.get("expect_exit"))
        self._stop_sent = bool(saved.get("stop_sent"))
        code = -signal.SIGKILL if found.status is None else found.status
        started = float(saved.get("started_at") or time.time())  # type: ignore[arg-type]
        self.last_exit_code = code
        log.info("exited_while_away", extra=fields(process=self.spec.name, code=code))
        self.state = "running" if saved.get("ready") else "starting"
        self._settle(code, time.time() - started, 0.0)

    def detach(self) -> None:
        """The agent leaves (upgrade or restart); the program stays with its holder."""
        self._cancel_backoff()
        self._cancel_probes()
        child = self._child
        if child is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(child.sock)
        loop.remove_reader(child.holder_pidfd)
        self._pump(child, burst=1_000_000)
        self._save()
        child.close()
        self._child = None


async def _wait(future: asyncio.Future[int], timeout: float) -> bool:
    """True when the process exited within `timeout` seconds."""
    try:
        await asyncio.wait_for(asyncio.shield(future), timeout)
        return True
    except TimeoutError:
        return False


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _describe(code: int) -> str:
    return str(code) if code >= 0 else _signal_name(-code)
