"""Watches one backend on its own connection: reachable or not, primary or replica, and its
WAL position (the primary's insert LSN, a replica's replay LSN), every `interval`.

These are the facts routing and failover decide on, so they are polled often (100 ms by
default) with one cheap statement, never on a client's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from pools.server import ServerConnection, TLSOptions, open_server
from protocol.auth import LoginError

log = structlog.get_logger("pgrouter.monitor")

# The primary's *insert* position: the write position can trail a commit record that was
# just made (synchronous_commit = off), and read-your-writes must cover that commit.
POSITION_QUERY = (
    "SELECT pg_catalog.pg_is_in_recovery(), CASE WHEN pg_catalog.pg_is_in_recovery() "
    "THEN pg_catalog.pg_last_wal_replay_lsn() ELSE pg_catalog.pg_current_wal_insert_lsn() END"
)


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> a byte position."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class BackendMonitor:
    """The latest known state of one backend (host, port)."""

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
    ) -> None:
        self.tls = tls
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.dbname = dbname
        self.interval = interval
        self.timeout = timeout
        self.up: bool | None = None  # None until the first check finished
        self.in_recovery: bool | None = None
        self.lsn: int | None = None
        self.poll_started = 0.0  # monotonic start of the check that produced `lsn`
        self.checked_at: float | None = None  # wall-clock time of the last successful check
        self.error: str | None = None
        self.checks = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

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
                try:
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
                    self._checked(started, rows[0][0] == "t", rows[0][1])
                except (OSError, TimeoutError, ConnectionError, LoginError, IndexError) as exc:
                    if conn is not None:
                        conn.abort()
                        conn = None
                    self._failed(str(exc) or type(exc).__name__)
                await asyncio.sleep(self.interval)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def _checked(self, started: float, in_recovery: bool, lsn: str | None) -> None:
        self.checks += 1
        if self.up is not True or self.in_recovery != in_recovery:
            log.info(
                "backend state",
                backend=f"{self.host}:{self.port}",
                state="up",
                role="replica" if in_recovery else "primary",
            )
        self.up = True
        self.error = None
        self.in_recovery = in_recovery
        self.lsn = parse_lsn(lsn) if lsn else None
        self.poll_started = started
        self.checked_at = time.time()

    def _failed(self, error: str) -> None:
        self.failures += 1
        if self.up is not False:
            log.warning(
                "backend state", backend=f"{self.host}:{self.port}", state="down", error=error
            )
        self.up = False
        self.error = error
