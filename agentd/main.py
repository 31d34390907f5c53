"""`agentd --config FILE`: load the config, start the supervisors, serve the API.

Signals only set a flag; the main coroutine acts on it:
  SIGTERM, SIGINT  stop every process gracefully (in parallel, with a deadline), then exit
                   (a container shutdown). A second one during that kills what is left.
  SIGUSR2          exit and leave every process running under its holder (an agent
                   upgrade or restart); the next agent reattaches to them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from agentd import logs
from agentd.agent import Agent
from agentd.api import create_app
from agentd.config import AgentConfig, load_config, read_token
from agentd.errors import ConfigFileError
from agentd.logs import fields

log = logging.getLogger("agentd")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The agent owns its signals (see run()); uvicorn must not take them over.
        yield


def _listen(config: AgentConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.bind else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio turns Nagle's algorithm off only for sockets that
    # say so, and with it on every small answer waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.bind, config.port))
    sock.listen(512)
    sock.set_inheritable(False)
    return sock


async def run(config: AgentConfig, token: str) -> None:
    agent = Agent(config)
    sock = _listen(config)
    port = sock.getsockname()[1]
    (config.state_dir / "agent.port").write_text(f"{port}\n")
    # ws="none": the API has no websocket route, and uvicorn would otherwise load the
    # websockets package (~0.4 MiB resident) for upgrades nobody may make.
    server = _Server(uvicorn.Config(
        create_app(agent, token), log_config=None, access_log=False, lifespan="off",
        ws="none", timeout_graceful_shutdown=2,
    ))

    stop_requested = asyncio.Event()
    signals_seen: list[int] = []

    def on_signal(signum: int) -> None:
        signals_seen.append(signum)
        stop_requested.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        loop.add_signal_handler(signum, on_signal, signum)

    await agent.open()
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    log.info("listening", extra=fields(address=config.bind, port=port))
    await stop_requested.wait()

    # Shutdown, in order: stop the processes (the API keeps answering status while
    # they stop, so an operator can watch), then close the API, then exit.
    log.info("signal", extra=fields(signal=signal.Signals(signals_seen[0]).name))
    if signals_seen[0] == signal.SIGUSR2:
        agent.detach()
        server.should_exit = True
        await serving
        log.info("stopped", extra=fields(mode="detach"))
        return
    stopping = asyncio.create_task(agent.shutdown(config.shutdown_deadline))
    while not stopping.done():
        stop_requested.clear()
        waiter = asyncio.create_task(stop_requested.wait())
        await asyncio.wait({stopping, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            log.warning("forced_shutdown")
            await asyncio.gather(*(s.kill() for s in agent.supervisors.values()))
        waiter.cancel()
    await stopping
    server.should_exit = True
    await serving
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentd", description="ZeroLagHub container agent")
    parser.add_argument("--config", type=Path, default=Path("/etc/zlh/agentd.yaml"))
    parser.add_argument("--debug", action="store_true", help="log at debug level")
    args = parser.parse_args(argv)
    logs.setup(logging.DEBUG if args.debug else logging.INFO)
    try:
        config = load_config(args.config)
        token = read_token(config.token_file)
    except ConfigFileError as exc:
        log.error("config_error", extra=fields(message=exc.message))
        print(f"agentd: error: {exc.message}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run(config, token))
    except OSError as exc:
        log.error("start_failed", extra=fields(message=str(exc)))
        print(f"agentd: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
