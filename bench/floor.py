"""The least a uvloop proxy can do: each client gets its own server connection and the bytes are
copied both ways untouched. No pooling, no message headers walked, nothing parsed.

Its CPU per transaction is the floor under any Python proxy on the machine it runs on: `make
bench` measures it next to PgBouncer, so pgrouter's figures can be read against what Python
and the event loop cost before pgrouter does any work of its own.

Usage: ``python bench/floor.py LISTEN_PORT SERVER_HOST SERVER_PORT``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import uvloop


class ServerSide(asyncio.Protocol):
    def __init__(self, client: ClientSide) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class ClientSide(asyncio.Protocol):
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.early: list[bytes] = []  # sent before the server connection was up
        self.server: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            server, _ = await loop.create_connection(lambda: ServerSide(self), self.host, self.port)
        except OSError:
            self.transport.close()
            return
        self.server = server
        for data in self.early:
            server.write(data)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        if self.server is None:
            self.early.append(data)
        else:
            self.server.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.server is not None:
            self.server.close()


async def serve(listen_port: int, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(lambda: ClientSide(host, port), "127.0.0.1", listen_port)
    await listener.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
