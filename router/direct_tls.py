"""PostgreSQL 17 direct TLS: the TLS handshake starts with the client's very first bytes.

A client with `sslnegotiation=direct` sends its TLS ClientHello at once instead of an
SSLRequest. By the time the session sees the record's first byte, those bytes have been read
from the socket, and `loop.start_tls()` cannot be handed bytes already read. So the loop's own
SSL protocol (uvloop's, or asyncio's: the one `start_tls()` builds, with its flow control,
close_notify and timeouts) is set up here the way `start_tls()` does it, and fed the ClientHello
before the socket is read again. Only direct-TLS connections come here; the others pay one
byte compare.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
from typing import Any, cast

import uvloop
import uvloop.loop

from router.config import ALPN_POSTGRESQL

#: A TLS record carrying a handshake message starts with this byte. A startup packet starts
#: with its length, which is never as large as 0x16000000 bytes: the two cannot be confused.
TLS_HANDSHAKE_RECORD = 0x16
#: A TLS alert record: fatal handshake_failure. Sent to a direct-TLS client when TLS is off.
HANDSHAKE_FAILURE_ALERT = bytes([21, 3, 3, 0, 2, 2, 40])


async def start_tls_after(
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    context: ssl.SSLContext,
    first: bytes,
) -> asyncio.Transport:
    """Run the server side of a TLS handshake whose first bytes were already read; return
    the TLS transport, as `loop.start_tls()` does. The caller paused reading on `transport`
    when it took `first`."""
    if transport.is_closing():  # the client left while the handshake was being scheduled
        raise ConnectionResetError("connection lost before the TLS handshake")
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    # Neither class is public API, but both are what start_tls() itself uses, with the same
    # signature; uvloop's transport needs uvloop's protocol to be fast.
    if isinstance(loop, uvloop.Loop):
        factory: Any = uvloop.loop.SSLProtocol  # type: ignore[attr-defined]  # not in its stubs
    else:
        factory = asyncio.sslproto.SSLProtocol
    ssl_protocol = factory(
        loop, protocol, context, waiter, server_side=True, call_connection_made=False
    )
    tls_transport = ssl_protocol._get_app_transport()
    transport.set_protocol(ssl_protocol)
    ssl_protocol.connection_made(transport)
    view = memoryview(first)
    while view:
        buffer = ssl_protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        ssl_protocol.buffer_updated(size)
        view = view[size:]
    transport.resume_reading()
    try:
        await waiter
    except BaseException:
        transport.abort()
        raise
    return cast(asyncio.Transport, tls_transport)


def alpn_ok(transport: asyncio.BaseTransport) -> bool:
    """PostgreSQL 17 refuses a direct TLS connection that did not negotiate ALPN
    `postgresql`: it guards against TLS traffic for another protocol (cross-protocol
    attacks). Python's server side cannot refuse in the handshake, so this is asked after."""
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object is not None and ssl_object.selected_alpn_protocol() == ALPN_POSTGRESQL
