"""The admin HTTP endpoints (``admin.http``): /metrics, /healthz, /readyz.

A deliberately tiny HTTP/1.1 server on asyncio streams (not the data path): one request per
connection (``Connection: close``), request head limited to 8 kB and read within 5 s.

- ``GET /metrics``: Prometheus text format 0.0.4, computed at scrape time.
- ``GET /healthz``: 200 ``ok`` while the process serves requests.
- ``GET /readyz``: 200 when the proxy listens and every database has a reachable primary,
  503 with the reason otherwise (for load balancers and Kubernetes readiness probes).

HEAD is answered like GET without a body; other methods get 405, other paths 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import structlog

from router.admin import pool_unreachable
from router.metrics import CONTENT_TYPE, render

if TYPE_CHECKING:
    from router.proxy import Proxy

log = structlog.get_logger("pgrouter.http")

Responder = Callable[[str, str], Awaitable[bytes]]  # (method, target) -> the response
MAX_REQUEST_HEAD = 8 * 1024
READ_TIMEOUT = 5.0
_TEXT = "text/plain; charset=utf-8"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def readiness(proxy: Proxy) -> tuple[bool, str]:
    """(ready, reason): listening, and no database whose primary is known to be unreachable.

    A primary counts as unreachable when it has pools and every one of them failed its last
    connection attempt and holds no server; a database nobody has used yet counts as fine.
    """
    if not proxy.listeners:
        return False, "not listening"
    down = []
    for name, db in proxy.config.databases.items():
        primary = (db.primary.host, db.primary.port)
        pools = [
            p
            for k, p in proxy.pools.items()
            if k.database == name and (k.host, k.port) == primary and not p.closed
        ]
        if pools and all(pool_unreachable(p) for p in pools):
            down.append(f"{name} ({db.primary.address})")
    if down:
        return False, "primary unreachable: " + ", ".join(down)
    return True, "ready"


def response(
    status: int,
    body: bytes,
    content_type: str = _TEXT,
    *,
    head: bool = False,
    extra: tuple[tuple[str, str], ...] = (),
) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
        *(f"{k}: {v}" for k, v in extra),
    ]
    head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head_bytes if head else head_bytes + body


def handle_request(proxy: Proxy, method: str, target: str) -> bytes:
    """The complete HTTP response to one request line (sans-IO, used by the server)."""
    return answer(method, target, lambda: render(proxy), lambda: readiness(proxy))


def answer(
    method: str,
    target: str,
    metrics: Callable[[], bytes],
    ready: Callable[[], tuple[bool, str]],
) -> bytes:
    """The response to one request, given where the metrics and the readiness come from."""
    path = target.split("?", 1)[0]
    head = method == "HEAD"
    if path not in ("/metrics", "/healthz", "/readyz"):
        return response(404, b"not found\n", head=head)
    if method not in ("GET", "HEAD"):
        return response(405, b"method not allowed\n", extra=(("Allow", "GET, HEAD"),))
    if path == "/metrics":
        return response(200, metrics(), CONTENT_TYPE, head=head)
    if path == "/healthz":
        return response(200, b"ok\n", head=head)
    is_ready, reason = ready()
    return response(200 if is_ready else 503, reason.encode() + b"\n", head=head)


async def _serve(
    respond: Responder, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            writer.write(response(431, b"request too large\n"))
            return
        except TimeoutError:
            writer.write(response(408, b"request timeout\n"))
            return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            writer.write(response(400, b"bad request\n"))
            return
        method, target, _ = parts
        try:
            writer.write(await respond(method, target))
        except Exception:
            log.exception("http request failed", method=method, target=target)
            writer.write(response(500, b"internal error\n"))
    finally:
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def start_http(
    proxy: Proxy, host: str, port: int, sock: socket.socket | None = None
) -> asyncio.Server:
    """Listen for the admin HTTP endpoints (on `sock` when handed over); the caller closes
    the returned server."""

    async def respond(method: str, target: str) -> bytes:
        return handle_request(proxy, method, target)

    return await start_http_server(respond, host, port, sock)


async def start_http_server(
    respond: Responder, host: str, port: int, sock: socket.socket | None = None
) -> asyncio.Server:
    """An HTTP server whose answers come from `respond(method, target)`."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve(respond, reader, writer)

    if sock is not None:
        server = await asyncio.start_server(client, sock=sock, limit=MAX_REQUEST_HEAD)
    else:
        server = await asyncio.start_server(
            client, None if host in ("*", "") else host, port, limit=MAX_REQUEST_HEAD
        )
    log.info("http listening", address=f"{host}:{port}")
    return server
