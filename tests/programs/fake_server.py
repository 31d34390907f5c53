"""A console-driven test server with the habits of real game servers.

Options pick the behaviour under test; the console understands:
  say TEXT      -> "[CHAT] TEXT"
  stop          -> "Stopping the server", exit 0
  crash N       -> exit with code N
  hang          -> stop answering everything (console and HTTP)
"""

import argparse
import http.server
import os
import signal
import sys
import threading
import time

HANGING = threading.Event()


def serve_http(port: int) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if HANGING.is_set():
                time.sleep(3600)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def fork_grandchild() -> None:
    # A grandchild that leaves the process group, as daemonising helpers do.
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(1)
        os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-after", type=float, default=0.0)
    parser.add_argument("--never-ready", action="store_true")
    parser.add_argument("--colour", action="store_true")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--ignore-stop", action="store_true")
    parser.add_argument("--grandchild", action="store_true")
    parser.add_argument("--exit", type=int, default=None, help="exit with this code at once")
    parser.add_argument("--signal", default=None, help="kill itself with this signal")
    parser.add_argument("--flood", type=int, default=0)
    parser.add_argument("--weird", action="store_true", help="invalid UTF-8, big line, \\r")
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--pid-file", default=None)
    args = parser.parse_args()

    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.grandchild:
        fork_grandchild()
    if args.http_port:
        serve_http(args.http_port)
    if args.pid_file:
        with open(args.pid_file, "w") as handle:
            handle.write(str(os.getpid()))
    print("Starting test server", flush=True)
    if args.exit is not None:
        print(f"exiting with {args.exit}", flush=True)
        sys.exit(args.exit)
    if args.signal:
        os.kill(os.getpid(), getattr(signal, args.signal))
    if args.flood:
        out = sys.stdout
        for i in range(args.flood):
            out.write(f"[12:00:00 INFO]: flood line {i} lorem ipsum dolor sit amet\n")
        out.flush()
        return
    if args.weird:
        sys.stdout.buffer.write(b"bad \xff\xfe bytes\n")
        sys.stdout.buffer.write(b"x" * (1024 * 1024) + b"\n")
        sys.stdout.buffer.write(b"after the big line\n\nprogress 10%\rprogress 100%\n")
        sys.stdout.buffer.write(b"no newline at the end")
        sys.stdout.flush()
        return
    if args.ready_after:
        time.sleep(args.ready_after)
    if not args.never_ready:
        line = "Done (0.1s)! For help, type \"help\""
        print(f"\x1b[32m[Server]\x1b[0m \x1b[1m{line}\x1b[0m" if args.colour else line,
              flush=True)
    for raw in sys.stdin:
        command = raw.strip()
        if HANGING.is_set():
            continue
        if command.startswith("say "):
            print(f"[CHAT] {command[4:]}", flush=True)
        elif command == "stop" and not args.ignore_stop:
            print("Stopping the server", flush=True)
            sys.exit(0)
        elif command.startswith("crash "):
            sys.exit(int(command.split()[1]))
        elif command == "hang":
            HANGING.set()
            print("hanging", flush=True)
    time.sleep(3600)


if __name__ == "__main__":
    main()
