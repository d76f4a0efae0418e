"""The internal channel between the processes of one pgrouter (``workers: N``).

Every worker answers requests on its own Unix socket, which the supervisor creates (bound and
listening) in a private directory before starting the worker and keeps open, so requests to a
worker being restarted wait instead of failing. One request per connection: a JSON line in, the
answer's bytes out until the worker closes. Nothing here runs per client message: it carries
scrapes, admin commands and cancel requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

log = structlog.get_logger("pgrouter.peers")

Handler = Callable[[dict[str, Any]], Awaitable[bytes]]
TIMEOUT = 5.0
MAX_REQUEST = 64 * 1024


def peer_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.sock")


def listening_socket(path: str) -> socket.socket:
    """The bound, listening socket a worker answers on (made by the supervisor)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    return sock


async def serve(sock: socket.socket, handler: Handler) -> asyncio.Server:
    """Answer requests on `sock` with `handler`; the caller closes the returned server."""

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), TIMEOUT)
            if line:
                writer.write(await handler(json.loads(line)))
                await writer.drain()
        except Exception:  # one bad request must not end the channel
            log.exception("internal request failed")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_unix_server(session, sock=sock, limit=MAX_REQUEST)


async def ask(path: str, request: dict[str, Any], timeout: float = TIMEOUT) -> bytes | None:
    """Send one request to the worker answering on `path`; None if it could not answer."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                writer.write(json.dumps(request).encode() + b"\n")
                await writer.drain()
                return await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        log.info("worker did not answer", path=path, error=str(exc) or type(exc).__name__)
        return None


async def ask_all(
    paths: Sequence[str], request: dict[str, Any], timeout: float = TIMEOUT
) -> list[bytes | None]:
    """The same request to several workers at once, answers in the order of `paths`."""
    return list(await asyncio.gather(*(ask(p, request, timeout) for p in paths)))
