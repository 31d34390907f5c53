"""Artifact servers for tests: the real one (zlh.artifacts) and a misbehaving one.

`FaultyServer` answers every request in one chosen bad way on a loopback port:
  `truncate`  announces N bytes, sends half, closes
  `stall`     sends the headers and part of the body, then nothing until closed
  `trickle`   sends the headers, then a byte of the body every 50 ms until closed
  `status`    answers with the given HTTP status
  `gate`      sends the whole body once `gate` is set (to hold an install in flight)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import tarfile
import threading
from pathlib import Path
from typing import Self

import zstandard


class FaultyServer:
    def __init__(self, mode: str, body: bytes = b"x" * 4096, status: int = 500) -> None:
        self.mode = mode
        self.body = body
        self.status = status
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.release = threading.Event()
        self.gate = threading.Event()  # mode "gate": the body goes out once it is set
        self.requests = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # The socket is closed once its accept thread has stopped. Closed earlier, a thread
        # still on its way into accept() takes the fd number, which the next socket made
        # reuses: it then took a connection meant for the next test's artifact server.
        self.release.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # a blocked accept() returns EINVAL
        self.thread.join(10)
        if self.thread.is_alive():
            raise AssertionError("FaultyServer: the accept thread did not stop")
        self.sock.close()

    def _serve(self) -> None:
        while not self.release.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            self.requests += 1
            if self.mode == "gate":
                self.gate.wait(60)
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(self.body)}\r\n"
                             "Connection: close\r\n\r\n".encode() + self.body)
                return
            if self.mode == "status":
                conn.sendall(f"HTTP/1.1 {self.status} Oops\r\nContent-Length: 0\r\n"
                             "Connection: close\r\n\r\n".encode())
                return
            head = (f"HTTP/1.1 200 OK\r\nContent-Length: {len(self.body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            if self.mode == "trickle":
                with contextlib.suppress(OSError):  # the client gave up
                    conn.sendall(head)
                    for byte in self.body:  # the pace is the fault, not a wait for an outcome
                        if self.release.wait(0.05):
                            return
                        conn.sendall(bytes([byte]))
                return
            conn.sendall(head + self.body[: len(self.body) // 2])
            if self.mode == "stall":
                self.release.wait(60)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_zst(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A .tar.zst holding exactly `members` (info, content) as given, hostile ones too."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, content in members:
            if content is not None:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                tar.addfile(info)
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def member(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
           link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = link
    return info


def script_runtime(version: str, text: str | None = None) -> bytes:
    """A tiny runtime: bin/tool prints `tool VERSION`; `verify: bin/tool`."""
    script = text if text is not None else f"#!/bin/sh\necho tool {version}\n"
    return tar_zst([
        (member("bin", tarfile.DIRTYPE, 0o755), None),
        (member("bin/tool", mode=0o755), script.encode()),
    ])


def write(folder: Path, rel: str, data: bytes) -> Path:
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
