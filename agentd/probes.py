"""Readiness and liveness probes.

A probe answers one question once: does the process answer now? `check()` returns
None on success or a short reason on failure; it never raises and never takes longer
than the probe's timeout. The log probe is different: it waits for a console line.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from agentd.models import HttpProbe, LogProbe, MinecraftProbe, TcpProbe

ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"  # OSC: titles, links
    r"|\x1b[@-Z\\-_]"  # two-byte escapes
    r"|\u00a7[0-9a-fk-or]",  # Minecraft's own section-sign colour codes
    re.IGNORECASE,
)


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


async def check(probe: TcpProbe | HttpProbe | MinecraftProbe) -> str | None:
    try:
        return await asyncio.wait_for(_attempt(probe), probe.timeout)
    except TimeoutError:
        return f"no answer within {probe.timeout:g}s"
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - a probe reports every failure as a reason
        return f"{type(exc).__name__}: {exc}"


async def _attempt(probe: TcpProbe | HttpProbe | MinecraftProbe) -> str | None:
    if isinstance(probe, TcpProbe):
        return await _tcp(probe.host, probe.port)
    if isinstance(probe, HttpProbe):
        return await _http(probe)
    return await _minecraft(probe)


async def _tcp(host: str, port: int) -> str | None:
    _, writer = await asyncio.open_connection(host, port)
    writer.close()
    await writer.wait_closed()
    return None


async def _http(probe: HttpProbe) -> str | None:
    import httpx  # only processes with an http probe pay for the import

    async with httpx.AsyncClient(timeout=probe.timeout, follow_redirects=False) as client:
        response = await client.get(probe.url)
    if response.status_code != probe.expect_status:
        return f"HTTP {response.status_code}, expected {probe.expect_status}"
    return None


async def _minecraft(probe: MinecraftProbe) -> str | None:
    from mcstatus import JavaServer  # loaded on first use, kept out of the idle agent

    server = JavaServer(probe.host, probe.port, timeout=probe.timeout)
    status = await server.async_status()
    if status.version is None:
        return "status response without a version"
    return None


class LogWatch:
    """Waits until a console line (ANSI stripped) matches the log probe's pattern."""

    def __init__(self, probe: LogProbe) -> None:
        self._pattern = re.compile(probe.pattern)
        self._matched = asyncio.Event()

    def feed(self, batch: list[tuple[int, float, str]]) -> None:
        if self._matched.is_set():
            return
        for _, _, text in batch:
            if self._pattern.search(strip_ansi(text)):
                self._matched.set()
                return

    async def wait(self) -> None:
        await self._matched.wait()


Unsubscribe = Callable[[], None]
