"""Watches one backend on its own connection: reachable or not, primary or replica, its WAL
positions and how far behind the primary it is, every `interval`.

These are the facts routing and failover decide on, so they are polled often (100 ms by
default) with one cheap statement, never on a client's connection. Read-your-writes sends a
client's reads to replicas only once the primary's position was read after its write, and a
promotion is followed at the next check: both wait for the poll. The health *verdict* does
not flap with it: `fall` consecutive failed checks take a backend down (a refused connection,
a timeout or a shutdown error at once), `rise` consecutive good ones bring it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections import deque
from collections.abc import Callable

import structlog

from pools.server import ServerConnection, TLSOptions, open_server
from protocol.auth import LoginError

log = structlog.get_logger("pgrouter.monitor")

# The primary's *insert* position: the write position can trail a commit record that was
# just made (synchronous_commit = off), and read-your-writes must cover that commit. A replica
# also reports what it has received, and the server's own replay delay (0 when it replayed
# everything it received, else the age of the last replayed commit), computed there so that
# clock skew between us and the server does not matter.
POSITION_QUERY = (
    "SELECT pg_catalog.pg_is_in_recovery(), CASE WHEN pg_catalog.pg_is_in_recovery() "
    "THEN pg_catalog.pg_last_wal_replay_lsn() ELSE pg_catalog.pg_current_wal_insert_lsn() END, "
    "pg_catalog.pg_last_wal_receive_lsn(), CASE WHEN NOT pg_catalog.pg_is_in_recovery() "
    "OR pg_catalog.pg_last_wal_receive_lsn() <= pg_catalog.pg_last_wal_replay_lsn() THEN 0 "
    "ELSE extract(epoch FROM pg_catalog.clock_timestamp() "
    "- pg_catalog.pg_last_xact_replay_timestamp()) END"
)
# Server errors that end a backend at once: shutting down, starting up, crash recovery.
DOWN_AT_ONCE = frozenset({"57P01", "57P02", "57P03"})
MAX_TARGETS = 4096  # primary positions remembered per replica for its time lag


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> a byte position."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class BackendMonitor:
    """The latest known state of one backend (host, port).

    `up` is the verdict (None until the first check): it turns False after `fall` failed
    checks in a row (at once for a refused connection, a timeout or 57P01/57P02/57P03) and
    True again after `rise` good ones. `in_recovery` and the positions follow every good
    check. `listeners` are called after every change of `up` or `in_recovery`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str | None,
        dbname: str,
        *,
        interval: float = 0.1,
        timeout: float = 1.0,
        tls: TLSOptions | None = None,
        fall: int = 3,
        rise: int = 2,
    ) -> None:
        self.tls = tls
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.dbname = dbname
        self.interval = interval
        self.timeout = timeout
        self.fall = fall
        self.rise = rise
        self.up: bool | None = None  # None until the first check finished
        self.in_recovery: bool | None = None
        self.lsn: int | None = None  # the primary's insert position, a replica's replay position
        self.receive_lsn: int | None = None  # a replica's received position
        self.server_lag: float | None = None  # the replica's own replay delay (seconds)
        self.time_lag = 0.0  # seconds a replica is behind (see _track_lag)
        self.upstream: BackendMonitor | None = None  # the primary a replica follows, if known
        self.poll_started = 0.0  # monotonic start of the check that produced `lsn`
        self.checked_at: float | None = None  # wall-clock time of the last successful check
        self.error: str | None = None
        # The last failure was the server refusing the monitor for a reason other than
        # shutting down or starting up (wrong password, unknown database, too many
        # connections): the server is there, its role unknown.
        self.refused = False
        self.checks = 0
        self.failures = 0
        self.transitions = 0  # changes of the up/down verdict
        self.listeners: list[Callable[[BackendMonitor], None]] = []
        self._streak = 0  # consecutive checks that disagree with the verdict
        # (monotonic time, position) the upstream was seen at, beyond this replica's replay
        self._targets: deque[tuple[float, int]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._woken = False  # check now instead of at the end of the interval
        self._sleep: asyncio.Future[None] | None = None  # the pause between two checks
        self._suspect = False  # a pool connection broke: the next failed check counts at once

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def role(self) -> str | None:
        if self.in_recovery is None:
            return None
        return "replica" if self.in_recovery else "primary"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        conn: ServerConnection | None = None
        try:
            while True:
                self._woken = False
                suspect, self._suspect = self._suspect, False
                try:
                    if suspect and conn is not None:  # a new login is what a shutdown refuses
                        conn.abort()
                        conn = None
                    if conn is None or conn.closed:
                        conn = await open_server(
                            self.host,
                            self.port,
                            self.user,
                            self.password,
                            {"database": self.dbname, "application_name": "pgrouter monitor"},
                            self.timeout,
                            self.tls,
                        )
                    started = time.monotonic()
                    async with asyncio.timeout(self.timeout):
                        rows = await conn.query(POSITION_QUERY)
                    row = rows[0]
                    self._checked(started, row[0] == "t", row[1], row[2], row[3])
                except (OSError, TimeoutError, ConnectionError, LoginError, IndexError) as exc:
                    if conn is not None:
                        conn.abort()
                        conn = None
                    refused = isinstance(exc, LoginError) and exc.sqlstate not in DOWN_AT_ONCE
                    self.failed(
                        _describe(exc), at_once=suspect or fails_at_once(exc), refused=refused
                    )
                if not self._woken:
                    await self._pause()
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def _checked(
        self,
        started: float,
        in_recovery: bool,
        lsn: str | None,
        receive: str | None = None,
        server_lag: str | None = None,
    ) -> None:
        self.checks += 1
        self.error = None
        self.refused = False
        role_changed = self.in_recovery is not None and self.in_recovery != in_recovery
        self.in_recovery = in_recovery
        self.lsn = parse_lsn(lsn) if lsn else None
        self.receive_lsn = parse_lsn(receive) if receive else None
        self.server_lag = max(float(server_lag), 0.0) if server_lag else None
        self.poll_started = started
        self.checked_at = time.time()
        self._track_lag(started)
        changed = role_changed
        if self.up is True:
            self._streak = 0
        else:
            self._streak += 1
            if self.up is None or self._streak >= self.rise:
                self.up = True
                self._streak = 0
                self.transitions += 1
                changed = True
        if changed and self.up:
            log.info("backend state", backend=self.address, state="up", role=self.role)
        if changed:
            self._notify()

    def failed(self, error: str, *, at_once: bool = False, refused: bool = False) -> None:
        """A failed check, or a failure a pool connection saw (at_once: down now)."""
        self.failures += 1
        self.error = error
        self.refused = refused
        if self.up is False:
            self._streak = 0
            return
        self._streak += 1
        if at_once or self.up is None or self._streak >= self.fall:
            self.up = False
            self._streak = 0
            self.transitions += 1
            self._targets.clear()
            log.warning("backend state", backend=self.address, state="down", error=error)
            self._notify()

    async def _pause(self) -> None:
        """`interval`, or less when woken: a timer and a future, nothing cancelled (a timeout
        around an Event raises and catches an exception every time, ten times a second)."""
        loop = asyncio.get_running_loop()
        sleep = self._sleep = loop.create_future()
        timer = loop.call_later(self.interval, _finish, sleep)
        try:
            await sleep
        finally:
            timer.cancel()
            self._sleep = None

    def suspect(self) -> None:
        """A pool connection to this backend broke (a FATAL such as 57P01, or the socket
        closed): check now, and if that check fails the backend is down at once. A server
        shutting down refuses the check (57P03, or no listener); one session ended by
        pg_terminate_backend does not take a healthy server down."""
        self._suspect = True
        self._woken = True
        if self._sleep is not None:
            _finish(self._sleep)

    def _notify(self) -> None:
        for listener in self.listeners:
            listener(self)

    def _track_lag(self, now: float) -> None:
        """A replica's time lag: how long ago the upstream was first seen at a position this
        replica has not replayed yet. Our own clock only (no skew); it grows while replay is
        delayed or paused and while the WAL receiver is stopped and the primary writes, and
        stays 0 while the primary is idle. Without a known upstream: the server's own figure."""
        targets = self._targets
        lsn = self.lsn
        upstream = self.upstream
        if not self.in_recovery or lsn is None:
            targets.clear()
            self.time_lag = 0.0
            return
        if upstream is None or not upstream.up or upstream.in_recovery or upstream.lsn is None:
            targets.clear()
            self.time_lag = self.server_lag or 0.0
            return
        target = upstream.lsn
        if target > lsn and (not targets or target > targets[-1][1]) and len(targets) < MAX_TARGETS:
            targets.append((upstream.poll_started, target))
        while targets and targets[0][1] <= lsn:
            targets.popleft()
        self.time_lag = max(now - targets[0][0], 0.0) if targets else 0.0


def _finish(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, LoginError):
        return f"{exc.sqlstate}: {exc.message}"
    return str(exc) or type(exc).__name__


def fails_at_once(exc: BaseException) -> bool:
    """A refused connection, a timeout, or the server shutting down or starting up."""
    if isinstance(exc, TimeoutError | ConnectionRefusedError):
        return True
    if isinstance(exc, LoginError):
        return exc.sqlstate in DOWN_AT_ONCE
    return isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH)
