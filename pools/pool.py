"""The pool of server connections for one (database, user, backend).

Acquiring never creates a coroutine when an idle server exists: the caller gets the server
at once, or is queued (FIFO) and called back through `Waiter`. New connections are opened
in parallel, up to the number of waiting clients, never beyond `pool_size`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import structlog

from pools.monitor import fails_at_once
from pools.server import ServerConnection, TLSOptions, open_server
from protocol import messages as m
from protocol.auth import LoginError, ServerSecret
from protocol.errors import CANNOT_CONNECT_NOW, CONNECTION_FAILURE, QUERY_CANCELED

log = structlog.get_logger("pgrouter.pool")


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """A pool's share of the topology (its defaults live in router.config, not here)."""

    pool_size: int
    min_pool_size: int
    server_idle_timeout: float
    server_lifetime: float
    server_connect_timeout: float
    query_wait_timeout: float
    server_reset_query: str  # run before reuse (session mode); "" for none
    server_tls: TLSOptions | None = None  # None: no TLS


class PoolKey(NamedTuple):
    """A tuple, not a frozen dataclass: built and hashed at every login, at C speed."""

    database: str  # the client-facing name
    user: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.database}/{self.user}@{self.host}:{self.port}"


class Waiter(Protocol):
    """A client waiting for a server connection."""

    def server_assigned(self, server: ServerConnection) -> None: ...
    def server_unavailable(self, sqlstate: str, message: str) -> None: ...


class BackendTrouble(Protocol):
    """Told what a pool's connections learn about their backend: `error` when it is down
    (refused, timed out, shutting down or starting up), None when a connection broke and
    the backend should be checked now."""

    def __call__(self, host: str, port: int, error: str | None) -> None: ...


class PoolError(Exception):
    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message


class Pool:
    """Server connections for one (database, user, backend), shared by its clients."""

    def __init__(
        self,
        key: PoolKey,
        dbname: str,
        password: ServerSecret,
        settings: PoolSettings,
    ) -> None:
        self.key = key
        self.dbname = dbname
        self.password = password
        self.settings = settings
        self.idle: deque[ServerConnection] = deque()  # most recently used at the right
        self.active: set[ServerConnection] = set()
        self.connecting = 0
        self.waiters: deque[Waiter] = deque()
        self._wait_start: dict[Waiter, float] = {}  # checked by `maintain`, not per-waiter timers
        self.parameters: dict[str, str] | None = None  # the welcome set, from the first login
        self._welcome: dict[tuple[tuple[str, str], ...], bytes] = {}
        self.closed = False
        self.paused = False
        self.last_error: PoolError | None = None
        self.on_trouble: BackendTrouble | None = None  # set by the proxy
        # Plain counters, read by the stats and metrics at scrape time.
        self.xact_count = 0  # transactions (server releases)
        self.query_count = 0  # ReadyForQuery answered (simple queries and Syncs)
        self.assignment_count = 0  # times a server was linked to a client
        self.bytes_received = 0  # client -> server
        self.bytes_sent = 0  # server -> client
        self.login_count = 0  # client logins
        self.wait_count = 0
        self.wait_time = 0.0
        self.xact_time_ns = 0  # servers linked in a transaction, until ReadyForQuery 'I'
        self.query_time_ns = 0  # servers busy with client queries, until ReadyForQuery
        self.max_wait = 0.0
        self.connect_count = 0
        self.connect_failures = 0
        self.error_counts: dict[str, int] = {}  # server errors by SQLSTATE class (shared)

    def welcome(self, settings: dict[str, str]) -> bytes:
        """AuthenticationOk and the ParameterStatus set a new client gets, its own settings
        (lower-case names) overriding the server's; built once per distinct settings."""
        key = tuple(settings.items())
        cached = self._welcome.get(key)
        if cached is None:
            assert self.parameters is not None
            parts = [m.AUTHENTICATION_OK]
            for name, value in self.parameters.items():
                parts.append(m.parameter_status(name, settings.get(name.lower(), value)))
            cached = b"".join(parts)
            if len(self._welcome) < 1000:
                self._welcome[key] = cached
        return cached

    @property
    def settings(self) -> PoolSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: PoolSettings) -> None:
        self._settings = settings
        self.reset_query = settings.server_reset_query  # read on every release

    # ---- acquire / release ------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.active) + self.connecting

    def acquire(self, waiter: Waiter) -> ServerConnection | None:
        """An idle server at once, or None and `waiter` is called back later."""
        idle = self.idle
        if idle and not self.waiters and not self.paused:  # a closed pool has no idle servers
            server = idle.pop()
            self.active.add(server)
            self.assignment_count += 1
            return server
        if self.closed:
            waiter.server_unavailable(CANNOT_CONNECT_NOW, "pool is closed")
            return None
        self.waiters.append(waiter)
        self._wait_start[waiter] = time.monotonic()
        if len(idle) + len(self.active) + self.connecting < self.settings.pool_size:  # self.size
            self._grow()
        return None

    def cancel_wait(self, waiter: Waiter) -> None:
        """The waiting client left."""
        try:
            self.waiters.remove(waiter)
        except ValueError:
            return
        self._forget_waiter(waiter)

    def release(self, server: ServerConnection, *, used: bool = True) -> None:
        """A client is done with `server` (between transactions)."""
        self.active.discard(server)
        if used:
            self.xact_count += 1
        if server.retired or self.closed or not server.clean:
            server.close()
            self._grow()
            return
        reset = self.reset_query
        if reset:
            self.active.add(server)
            server.run_hidden(reset, lambda errors, _rows: self._after_reset(server, errors))
            return
        self._make_idle(server)

    def discard(self, server: ServerConnection) -> None:
        """The server cannot be reused (broken, or left mid-transaction)."""
        self.active.discard(server)
        with contextlib.suppress(ValueError):
            self.idle.remove(server)
        server.close()
        if not self.closed:
            self._grow()

    def _after_reset(self, server: ServerConnection, errors: list[dict[str, str]]) -> None:
        self.active.discard(server)
        if errors or not server.clean:
            server.close()
            self._grow()
        else:
            self._make_idle(server)

    def _make_idle(self, server: ServerConnection) -> None:
        if self.waiters and not self.paused:
            self._hand_over(server)
        else:
            server.last_used = time.monotonic()
            self.idle.append(server)

    def _hand_over(self, server: ServerConnection) -> None:
        waiter = self.waiters.popleft()
        self._forget_waiter(waiter)
        self.active.add(server)
        self.assignment_count += 1
        waiter.server_assigned(server)

    def _forget_waiter(self, waiter: Waiter) -> None:
        start = self._wait_start.pop(waiter, None)
        if start is not None:
            waited = time.monotonic() - start
            self.wait_count += 1
            self.wait_time += waited
            if waited > self.max_wait:
                self.max_wait = waited

    def expire_waiters(self, now: float) -> None:
        """Fail clients waiting longer than query_wait_timeout (oldest first: a FIFO)."""
        timeout = self.settings.query_wait_timeout
        while self.waiters and now - self._wait_start[self.waiters[0]] >= timeout:
            self._wait_timed_out(self.waiters.popleft())

    def _wait_timed_out(self, waiter: Waiter) -> None:
        self._forget_waiter(waiter)
        detail = f" ({self.last_error.message})" if self.last_error else ""
        waiter.server_unavailable(
            QUERY_CANCELED,
            f"query_wait_timeout: no server connection for {self.key} within "
            f"{self.settings.query_wait_timeout:g}s{detail}",
        )

    # ---- growth -----------------------------------------------------------------------------

    def _grow(self) -> None:
        """Open connections for waiting clients (in parallel) and up to min_pool_size."""
        if self.closed or self.paused:
            return
        want = max(len(self.waiters) - self.connecting, self.settings.min_pool_size - self.size)
        room = self.settings.pool_size - self.size
        for _ in range(min(want, room)):
            self.connecting += 1
            asyncio.get_running_loop().create_task(self._connect())

    def busy(self) -> int:
        """Linked servers in the middle of a transaction or of an answer."""
        return sum(1 for s in self.active if not s.clean or getattr(s.client, "pending", 0) > 0)

    def pause(self) -> None:
        """Hold new transactions (running ones finish); servers stay open."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        while self.waiters and self.idle:
            server = self.idle.pop()
            self._hand_over(server)
        self._grow()

    def fill(self) -> None:
        """Top up to min_pool_size (called by the janitor and at start)."""
        self._grow()

    async def _connect(self) -> None:
        key = self.key
        error: PoolError | None = None
        down = False
        try:
            server = await open_server(
                key.host,
                key.port,
                key.user,
                self.password,
                {"database": self.dbname},
                self.settings.server_connect_timeout,
                self.settings.server_tls,
            )
        except LoginError as exc:
            error = PoolError(exc.sqlstate, exc.message)
            down = fails_at_once(exc)
        except (OSError, TimeoutError, ConnectionError) as exc:
            what = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            error = PoolError(
                CONNECTION_FAILURE, f"cannot connect to {key.host}:{key.port}: {what}"
            )
            down = fails_at_once(exc)
        self.connecting -= 1
        if error is not None:
            if down and self.on_trouble is not None:  # before the waiters hear: they may move
                self.on_trouble(key.host, key.port, error.message)
            self._connect_failed(error)
            return
        self.connect_count += 1
        self.last_error = None
        if self.parameters is None:
            self.parameters = dict(server.parameters)
        server.on_lost = self.server_gone
        server.error_counts = self.error_counts
        if self.closed:
            server.close()
            return
        self._make_idle(server)

    def _connect_failed(self, error: PoolError) -> None:
        self.connect_failures += 1
        self.last_error = error
        log.warning("server login failed", pool=str(self.key), error=error.message)
        # Nothing else can serve the waiters soon: tell them now instead of at the timeout.
        if not self.active and not self.idle and not self.connecting:
            while self.waiters:
                waiter = self.waiters.popleft()
                self._forget_waiter(waiter)
                waiter.server_unavailable(error.sqlstate, error.message)

    # ---- maintenance --------------------------------------------------------------------------

    def maintain(self, now: float) -> None:
        """Close idle servers past server_idle_timeout or server_lifetime; refill."""
        s = self.settings
        self.expire_waiters(now)
        keep = s.min_pool_size
        for server in self.active:  # closed when next released, never mid-transaction
            if now - server.created > s.server_lifetime:
                server.retired = True
        total = len(self.idle) + len(self.active)
        survivors: deque[ServerConnection] = deque()
        for server in self.idle:
            expired = now - server.created > s.server_lifetime
            stale = now - server.last_used > s.server_idle_timeout
            if server.closed or expired or (stale and total > keep):
                server.close()
                total -= 1
            else:
                survivors.append(server)
        self.idle = survivors
        self._grow()

    def close(self) -> None:
        """Close idle servers now; active ones close when their clients release them."""
        self.closed = True
        for server in self.idle:
            server.close()
        self.idle.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            self._forget_waiter(waiter)
            waiter.server_unavailable(CANNOT_CONNECT_NOW, "pool is shutting down")

    def drop_idle(self) -> None:
        """The backend went down: close the idle servers (the busy ones end with their
        transactions' errors); the pool stays usable for when it comes back."""
        idle, self.idle = self.idle, deque()
        for server in idle:
            server.close()

    def server_gone(self, server: ServerConnection) -> None:
        """A server's socket closed (server restart, idle kill, crash)."""
        if server.broken and self.on_trouble is not None:
            self.on_trouble(server.host, server.port, None)
        self.active.discard(server)
        with contextlib.suppress(ValueError):
            self.idle.remove(server)
        if not self.closed:
            self._grow()
