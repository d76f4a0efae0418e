"""Patroni deciding the leader: the REST client against a real local HTTP listener, and the
proxy's choice of primary with monitors and Patroni answers fed by hand (the real cluster is
in tests/integration/test_patroni.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pools.monitor import BackendMonitor, format_lsn
from pools.patroni import PatroniError, http_status
from router.config import parse_config
from router.proxy import Proxy
from tests.support import free_port

P, R1, R2 = ("10.0.0.1", 5432), ("10.0.0.2", 5432), ("10.0.0.3", 5432)
TOPOLOGY: dict[str, Any] = {
    "users": {"app": {"password": "app-secret"}},
    "databases": {
        "appdb": {
            "hosts": [
                {"host": host, "port": port, "patroni": f"http://{host}:8008"}
                for host, port in (P, R1, R2)
            ]
        },
    },
}


async def answer_with(response: bytes, path: str = "/primary") -> int:
    """http_status against a listener that answers `response` and closes."""
    requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await http_status("127.0.0.1", port, path, timeout=5)
    finally:
        server.close()
        assert requests and requests[0].startswith(f"GET {path} HTTP/1.1\r\n".encode())
        assert f"Host: 127.0.0.1:{port}\r\n".encode() in requests[0]


def test_http_status() -> None:
    body = b'{"state": "running", "role": "master"}' * 100
    ok = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body
    assert asyncio.run(answer_with(ok)) == 200
    assert asyncio.run(answer_with(b"HTTP/1.1 503 Service Unavailable\r\n\r\n{}")) == 503
    with pytest.raises(PatroniError, match="not an HTTP response"):
        asyncio.run(answer_with(b"SSH-2.0-OpenSSH\r\n"))
    with pytest.raises(PatroniError):
        asyncio.run(answer_with(b""))
    with pytest.raises(OSError):
        asyncio.run(http_status("127.0.0.1", free_port(), "/primary", timeout=5))


@pytest.fixture
def proxy() -> Proxy:
    proxy = Proxy(parse_config(TOPOLOGY, env={}))
    for address in (P, R1, R2):
        m = BackendMonitor(*address, "app", "pw", "appdb")
        m.listeners.append(proxy._backend_changed)
        proxy.monitors[address] = m
    proxy._watch_patroni()
    return proxy


def server(proxy: Proxy, address: tuple[str, int], *, recovery: bool) -> None:
    """A good health check of `address`."""
    lsn = format_lsn(100)
    proxy.monitors[address]._checked(0.0, recovery, lsn, lsn if recovery else None, "0")


def patroni(proxy: Proxy, address: tuple[str, int], leader: bool | None) -> None:
    """The member's Patroni answers 200 (True), 503 (False) or nothing (None)."""
    watcher = proxy.patroni["appdb"].members[address]
    watcher._set(leader, "connection refused" if leader is None else None)


def primary(proxy: Proxy) -> tuple[str, int]:
    endpoint = proxy.primary_endpoint(proxy.config.databases["appdb"])
    return endpoint.host, endpoint.port


def test_the_member_patroni_names_takes_the_writes_once_out_of_recovery(proxy: Proxy) -> None:
    for address, leader in ((P, True), (R1, False), (R2, False)):
        server(proxy, address, recovery=not leader)
        patroni(proxy, address, leader)
    assert primary(proxy) == P

    proxy.monitors[P].failed("refused", at_once=True)
    patroni(proxy, P, None)
    patroni(proxy, R1, True)  # the lock moved, the promotion has not ended
    assert primary(proxy) == P, "a leader still in recovery is not writable yet"
    server(proxy, R2, recovery=False)  # promoted behind Patroni's back: never the primary
    assert primary(proxy) == P and "appdb" not in proxy.fenced
    server(proxy, R1, recovery=False)
    assert primary(proxy) == R1
    assert proxy.failovers == {"appdb": 1}
    assert "appdb" not in proxy.fenced, "Patroni decides: two servers out of recovery is no split"


def test_without_any_answer_the_servers_decide(proxy: Proxy) -> None:
    for address in (P, R1, R2):
        server(proxy, address, recovery=address != R1)  # R1 is the one out of recovery
    assert primary(proxy) == P, "no Patroni answer yet: keep the first listed host"
    cluster = proxy.patroni["appdb"]
    patroni(proxy, P, None)
    patroni(proxy, R1, None)
    assert primary(proxy) == P and not cluster.fallback, "R2's Patroni was not asked yet"
    patroni(proxy, R2, None)
    assert cluster.fallback and primary(proxy) == R1
    server(proxy, P, recovery=False)
    assert "appdb" in proxy.fenced, "the servers' view: two primaries fail closed"

    patroni(proxy, P, True)  # Patroni is back and names P
    assert not cluster.fallback
    assert primary(proxy) == P and "appdb" not in proxy.fenced
