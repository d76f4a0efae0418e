"""`pgrouter --config PATH` | `pgrouter check --config PATH` | `pgrouter demo`."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import structlog
import uvloop

from router.config import Config, ConfigError, check_main, load_config
from router.handover import HandoverError, HandoverServer, Takeover, take_over
from router.logs import setup_logging

WORKER_ENV = "PGROUTER_WORKER"  # the worker's description, from its supervisor

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
    parser.add_argument(
        "--takeover",
        action="store_true",
        help="take the listening sockets over from the pgrouter running on handover_socket, "
        "which then drains and exits (nobody running there: listen afresh)",
    )
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
    spec = os.environ.get(WORKER_ENV)
    if spec is not None:  # started by a supervisor
        from router.worker import WorkerSpec, run_worker

        return run_worker(config, WorkerSpec.decode(spec))
    if args.takeover and config.handover_socket is None:
        print("pgrouter: --takeover needs handover_socket in the topology", file=sys.stderr)
        return 2
    return serve(config, takeover=args.takeover)


def serve(config: Config, *, takeover: bool = False) -> int:
    """Run the proxy in the foreground until SIGTERM (drain) or SIGINT (at once)."""
    setup_logging(config.log.level, config.log.format)
    handed: Takeover | None = None
    if takeover:
        assert config.handover_socket is not None
        try:
            handed = take_over(config.handover_socket)
        except HandoverError as exc:
            log.error("cannot take over", error=str(exc))
            return 1
        if handed is None:
            log.warning("no pgrouter to take over from; listening afresh")
        else:
            log.info("took over the listening sockets", predecessor=handed.pid)
    try:
        if config.workers > 1:
            from router.supervisor import run_supervisor

            return run_supervisor(config, handed)
        return uvloop.run(_serve(config, handed))
    except OSError as exc:
        log.error("cannot start", error=str(exc))
        return 1
    finally:
        if handed is not None:
            handed.close()


async def _serve(config: Config, handed: Takeover | None) -> int:
    from router.proxy import Proxy

    proxy = Proxy(config)
    await proxy.start(handed.sockets if handed is not None else None)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[float] = loop.create_future()

    def finish(timeout: float) -> None:
        if not stop.done():
            stop.set_result(timeout)

    proxy.on_shutdown_request = lambda: finish(proxy.config.shutdown_timeout)
    loop.add_signal_handler(signal.SIGTERM, finish, config.shutdown_timeout)
    loop.add_signal_handler(signal.SIGINT, finish, 0.0)
    loop.add_signal_handler(signal.SIGHUP, proxy.reload_from_file)
    handover: HandoverServer | None = None
    if config.handover_socket is not None:
        handover = HandoverServer(
            config.handover_socket,
            proxy.handover_sockets,
            lambda: finish(config.shutdown_timeout),
            lambda key: proxy.cancel(key, forwarded=True),
        )
        await handover.start()
    if handed is not None:
        await handed.ready()
        proxy.cancel_elsewhere = handed.forward_cancel
    timeout = await stop
    log.info("shutting down", timeout=timeout)
    if handover is not None:
        handover.close()
    await proxy.shutdown(timeout)
    return 0
