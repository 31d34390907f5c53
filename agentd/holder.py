"""The holder: keeps one supervised process and its PTY alive across agent restarts.

Run by the agent as `python3 -S -I holder.py LAUNCH_FILE INFO_FD` and standard library
only, so it stays small (one per supervised process). It

  1. detaches (double fork: it is never the agent's child, so an agent restart does
     not take it down and the agent never has to reap it),
  2. starts the program on a new PTY in its own session,
  3. tells the agent over INFO_FD: its pid, the program's pid (or why exec failed),
  4. drains the PTY continuously into spool segments `NAME.spool.OFFSET` (raw bytes,
     one global byte offset), so the program never blocks, with or without an agent,
  5. takes input lines from the agent on a unix socket `NAME.sock` and sends one tick
     byte per drained chunk so an attached agent knows to read the spool,
  6. records the program's exit status in `NAME.exit` (written before it exits) and
     leaves once the program is gone.

The agent owns everything else: the console numbering, the log, probes, signals.
"""

import errno
import fcntl
import json
import os
import pwd
import select
import signal
import socket
import struct
import sys
import termios
import time

SEGMENT_BYTES = 8 * 2**20
READ_BYTES = 65536
TICK = b"."
WINDOW = struct.pack("HHHH", 50, 200, 0, 0)


def _configure_pty(slave_fd):
    attrs = termios.tcgetattr(slave_fd)
    attrs[1] &= ~termios.OPOST  # keep "\n" as it is: no "\r\n" on output
    attrs[3] &= ~(termios.ECHO | termios.ECHONL)  # input lines are not echoed back
    attrs[3] &= ~termios.ISIG  # input never turns into SIGINT, SIGQUIT or SIGTSTP
    termios.tcsetattr(slave_fd, termios.TCSANOW, attrs)
    fcntl.ioctl(slave_fd, termios.TIOCSWINSZ, WINDOW)


def _exec_child(launch, slave_fd, report_fd):
    """In the forked child: become a session leader on the PTY, drop privileges, exec."""
    try:
        # Python ignores SIGPIPE and SIGXFSZ; the program must get the defaults back.
        for number in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(number, signal.SIG_DFL)
        if launch.get("cgroup_procs"):
            with open(launch["cgroup_procs"], "w") as procs:
                procs.write(str(os.getpid()))
        os.setsid()
        for fd in (0, 1, 2):
            os.dup2(slave_fd, fd)
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        user = launch.get("user")
        if user is not None and os.geteuid() == 0:
            entry = pwd.getpwnam(user)
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
        os.chdir(launch["cwd"])
        os.closerange(3, report_fd)
        os.closerange(report_fd + 1, 65536)
        os.execvpe(launch["argv"][0], launch["argv"], launch["env"])
    except BaseException as exc:  # noqa: BLE001 - anything here must reach the agent
        os.write(report_fd, f"{type(exc).__name__}: {exc}".encode()[:1000])
    os._exit(127)


def _start_child(launch):
    """Fork the program on a new PTY; returns (pid, master_fd) or raises with the reason."""
    master_fd, slave_fd = os.openpty()
    _configure_pty(slave_fd)
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(master_fd)
        os.close(report_r)
        _exec_child(launch, slave_fd, report_w)
    os.close(slave_fd)
    os.close(report_w)
    failure = os.read(report_r, 1000)  # empty: exec succeeded and closed the pipe
    os.close(report_r)
    if failure:
        os.waitpid(pid, 0)
        os.close(master_fd)
        raise OSError(failure.decode(errors="replace"))
    os.set_blocking(master_fd, False)
    return pid, master_fd


class Spool:
    """Append-only raw output in segments named by their first global byte offset."""

    def __init__(self, base):
        self.base = base
        self.offset = 0
        self.fd = -1
        self.segment_start = 0
        self._open(0)

    def _open(self, start):
        if self.fd >= 0:
            os.close(self.fd)
        self.segment_start = start
        path = f"{self.base}.{start:016d}"
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def append(self, data):
        if self.offset - self.segment_start >= SEGMENT_BYTES:
            self._open(self.offset)
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                # Disk full: the program must keep running; these bytes are lost,
                # and the agent sees the hole as lost lines.
                self.offset += len(view)
                self._open(self.offset)
                return
            view = view[written:]
            self.offset += written


class Holder:
    def __init__(self, launch, pid, master_fd):
        self.launch = launch
        base = os.path.join(launch["dir"], launch["name"])
        self.base = base
        self.pid = pid
        self.master_fd = master_fd
        self.pidfd = os.pidfd_open(pid)
        self.spool = Spool(base + ".spool")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(base + ".sock")
        except FileNotFoundError:
            pass
        # A socket path is limited to 107 bytes; bound relative to the folder, it is not.
        os.chdir(launch["dir"])
        self.listener.bind(launch["name"] + ".sock")
        os.chmod(base + ".sock", 0o600)
        self.listener.listen(4)
        self.agent = None
        self.pending_input = b""
        # The exit record's room is taken now: on a full disk at exit, a clean exit
        # must still be recorded as one.
        self.exit_fd = os.open(base + ".exit.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                               0o600)
        os.write(self.exit_fd, b" " * 256)
        os.fsync(self.exit_fd)

    def run(self):
        while True:
            readable = self._wait()
            if self.master_fd in readable:
                self._drain()
            if self.listener.fileno() in readable:
                self._accept()
            if self.agent is not None and self.agent.fileno() in readable:
                self._take_input()
            if self.pidfd in readable:
                return self._finish()

    def _wait(self):
        fds = [self.master_fd, self.listener.fileno(), self.pidfd]
        if self.agent is not None:
            fds.append(self.agent.fileno())
        readable, _, _ = select.select(fds, [], [])
        return set(readable)

    def _drain(self, limit=64):
        drained = False
        for _ in range(limit):
            try:
                data = os.read(self.master_fd, READ_BYTES)
            except BlockingIOError:
                break
            except OSError:  # EIO: nobody holds the PTY's other side any more
                break
            if not data:
                break
            self.spool.append(data)
            drained = True
        if drained:
            self._tick(TICK)

    def _tick(self, byte):
        if self.agent is None:
            return
        try:
            self.agent.send(byte)
        except BlockingIOError:
            pass  # ticks are queued already: the agent will read the spool anyway
        except OSError:
            self._drop_agent()

    def _accept(self):
        conn, _ = self.listener.accept()
        if self.agent is not None:
            self._drop_agent()  # a new agent replaces a dead one
        conn.setblocking(False)
        self.agent = conn
        self._tick(TICK)

    def _drop_agent(self):
        if self.agent is not None:
            self.agent.close()
            self.agent = None

    def _take_input(self):
        try:
            data = self.agent.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_agent()
            return
        try:
            os.write(self.master_fd, data)
        except OSError:
            pass  # the program is gone or not reading; its exit is reported next

    def _finish(self):
        _, status = os.waitpid(self.pid, 0)
        self._drain(limit=1024)
        # No fsync: the record is for an agent on this machine, which reads it from the
        # page cache; a machine that loses power loses its game servers anyway.
        record = {"status": status, "time": time.time(), "spool_end": self.spool.offset}
        os.pwrite(self.exit_fd, json.dumps(record).encode()[:256], 0)
        os.close(self.exit_fd)
        os.replace(self.base + ".exit.tmp", self.base + ".exit")
        self._tick(b"x")
        os.unlink(self.base + ".sock")
        return 0


def main():
    launch_path, info_fd = sys.argv[1], int(sys.argv[2])
    with open(launch_path) as handle:
        launch = json.load(handle)
    os.unlink(launch_path)  # it holds the environment, which may hold secrets

    # Detach: the first child carries on, the original exits at once so the agent
    # reaps it immediately; the holder then belongs to init, not to the agent.
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    signal_fds_to_null()
    try:
        pid, master_fd = _start_child(launch)
    except OSError as exc:
        os.write(info_fd, json.dumps({"error": str(exc)}).encode() + b"\n")
        return 1
    try:
        holder = Holder(launch, pid, master_fd)
    except BaseException as exc:  # noqa: BLE001 - the agent must learn why, then we leave
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        reason = f"holder: {type(exc).__name__}: {exc}"
        os.write(info_fd, json.dumps({"error": reason}).encode() + b"\n")
        return 1
    os.write(info_fd, json.dumps({"holder": os.getpid(), "pid": pid}).encode() + b"\n")
    os.close(info_fd)
    return holder.run()


def signal_fds_to_null():
    """Standard streams go nowhere: the agent's log must not receive holder output."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


if __name__ == "__main__":
    sys.exit(main())
