"""Asks Patroni which member is the leader, for databases whose members name their REST API.

Patroni holds the leader lock in its DCS (etcd, Consul, ...) and answers `GET /primary` with
200 on the member that holds it and runs PostgreSQL read-write, 503 elsewhere: the check
HAProxy setups use. Polling that on every member at the health-check interval lets the lock,
not the servers' own view, decide where writes go, so a member promoted by hand behind
Patroni's back, or a demoted leader still running read-write, never takes them.

A tiny HTTP/1.1 client over asyncio streams does it (the standard library's clients block);
this is not the data path. When no member's API answers, the caller falls back to finding
the primary with pg_is_in_recovery(), and that is logged once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

import structlog

log = structlog.get_logger("pgrouter.patroni")

LEADER_PATH = "/primary"  # 200 on the lock holder running read-write (Patroni >= 1.x)
DEFAULT_PORT = 8008
MAX_RESPONSE = 65536  # /primary answers a small JSON document


class PatroniError(Exception):
    """The REST API could not be asked, or answered something that is not HTTP."""


async def http_status(host: str, port: int, path: str, timeout: float) -> int:
    """GET `path` and return the status code; the body is read and dropped, so the server
    never writes to a closed socket."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: pgrouter\r\n"
                "Accept: application/json\r\nConnection: close\r\n\r\n".encode("ascii")
            )
            response = await reader.read(MAX_RESPONSE)
            while response and not reader.at_eof() and len(response) < MAX_RESPONSE:
                response += await reader.read(MAX_RESPONSE - len(response))
    finally:
        if writer is not None:
            writer.close()
    version, _, rest = response.partition(b" ")
    status = rest[:3]
    if not version.startswith(b"HTTP/") or not status.isdigit():
        raise PatroniError(f"not an HTTP response: {response[:40]!r}")
    return int(status)


class PatroniWatcher:
    """What one member's Patroni says, asked every `interval`.

    `leader` is True while the member answers 200 (it holds the leader lock and runs
    read-write), False on any other status, None while its API does not answer (`error` says
    why) or before the first answer. `listeners` are called after every change of `leader`
    and when the API stops or starts answering.
    """

    def __init__(self, url: str, *, interval: float = 0.1, timeout: float = 1.0) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or ""
        self.port = parts.port or DEFAULT_PORT
        self.interval = interval
        self.timeout = timeout
        self.leader: bool | None = None
        self.error: str | None = None
        self.listeners: list[Callable[[PatroniWatcher], None]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                status = await http_status(self.host, self.port, LEADER_PATH, self.timeout)
            except (OSError, TimeoutError, PatroniError) as exc:
                self._set(None, _describe(exc))
            else:
                self._set(status == 200, None)
            await asyncio.sleep(self.interval)

    def _set(self, leader: bool | None, error: str | None) -> None:
        """Record an answer; the listeners hear of a new verdict and of the first failure."""
        changed = leader != self.leader or (error is None) != (self.error is None)
        self.leader, self.error = leader, error
        if changed:
            for listener in self.listeners:
                listener(self)


class PatroniCluster:
    """The Patroni view of one database: which member addresses hold the leader lock.

    `leaders()` is None once every member's API failed to answer: the caller then finds the
    primary by itself. Entering and leaving that fallback is logged once each. Before the
    first answers nobody is named, so nothing changes until Patroni has had its say.
    """

    def __init__(self, name: str, members: dict[tuple[str, int], PatroniWatcher]) -> None:
        self.name = name
        self.members = members  # backend (host, port) -> its member's watcher
        self.fallback = False

    def leaders(self) -> frozenset[tuple[str, int]] | None:
        answered = [a for a, w in self.members.items() if w.leader is not None]
        if not answered:
            if not all(w.error for w in self.members.values()):
                return frozenset()  # not every member asked yet
            if not self.fallback:
                self.fallback = True
                log.warning(
                    "Patroni unreachable: roles from pg_is_in_recovery()",
                    database=self.name,
                    errors=_errors(self.members.values()),
                )
            return None
        if self.fallback:
            self.fallback = False
            log.info("Patroni reachable again: it decides the leader", database=self.name)
        return frozenset(a for a in answered if self.members[a].leader)


def _errors(watchers: Iterable[PatroniWatcher]) -> str:
    return "; ".join(f"{w.url}: {w.error}" for w in watchers)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
