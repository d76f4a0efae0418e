"""`pgrouter --config PATH` | `pgrouter check --config PATH` | `pgrouter demo`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import structlog
import uvloop

from router.config import Config, ConfigError, check_main, load_config
from router.logs import setup_logging

log = structlog.get_logger("pgrouter")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgrouter",
        description="PostgreSQL proxy: pooling, read/write routing, health checks.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=["run", "check", "demo"],
        help="run the proxy (default), check a topology file, or start a demo",
    )
    parser.add_argument("--config", "-c", help="topology file (YAML)")
    parser.add_argument("--port", type=int, default=6432, help="demo: the proxy's port")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from router.demo import run_demo

        return run_demo(args.port)
    if not args.config:
        print("pgrouter: --config PATH is required", file=sys.stderr)
        return 2
    if args.command == "check":
        return check_main(args.config)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"pgrouter: {line}", file=sys.stderr)
        return 1
    return serve(config)


def serve(config: Config) -> int:
    """Run the proxy in the foreground until SIGTERM (drain) or SIGINT (at once)."""
    setup_logging(config.log.level, config.log.format)
    try:
        return uvloop.run(_serve(config))
    except OSError as exc:
        log.error("cannot start", error=str(exc))
        return 1


async def _serve(config: Config) -> int:
    from router.proxy import Proxy

    proxy = Proxy(config)
    await proxy.start()
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[float] = loop.create_future()

    def finish(timeout: float) -> None:
        if not stop.done():
            stop.set_result(timeout)

    proxy.on_shutdown_request = lambda: finish(proxy.config.shutdown_timeout)
    loop.add_signal_handler(signal.SIGTERM, finish, config.shutdown_timeout)
    loop.add_signal_handler(signal.SIGINT, finish, 0.0)
    loop.add_signal_handler(signal.SIGHUP, proxy.reload_from_file)
    timeout = await stop
    log.info("shutting down", timeout=timeout)
    await proxy.shutdown(timeout)
    return 0
