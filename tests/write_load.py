"""A steady write load through pgrouter and a direct watch for the moment a server accepts
writes, for the failover tests: how long writes stop, and whether any acknowledged one is lost.

The load retries a failed write itself (same id, idempotent) until it succeeds, so it measures
when writes resume whether pgrouter holds transactions during a failover or fails them fast.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

STOP_TIMEOUT = 30.0  # a write stuck longer than this fails the test instead of hanging it


@dataclass
class Ack:
    id: int
    at: float  # monotonic time the acknowledgement arrived
    port: int  # the server that committed it (inet_server_port())


@dataclass
class WriteLoad:
    """A thread inserting ids 1, 2, ... into `table` (id int primary key) through `dsn`, in
    autocommit, one at a time, `pause` seconds apart; every acknowledged id is recorded."""

    dsn: str
    table: str
    pause: float = 0.005
    acks: list[Ack] = field(default_factory=list)
    errors: list[tuple[float, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    crashed: BaseException | None = None

    def start(self) -> WriteLoad:
        self._thread = threading.Thread(target=self._run, name="write-load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=STOP_TIMEOUT)
        assert not self._thread.is_alive(), "the write load did not stop"
        if self.crashed is not None:
            raise self.crashed

    def _run(self) -> None:
        # ON CONFLICT: a write whose acknowledgement was lost may have committed; its retry
        # must succeed (and is then acknowledged) rather than fail on the duplicate.
        sql = (
            f"INSERT INTO {self.table} (id) VALUES (%s) ON CONFLICT (id) DO UPDATE "
            f"SET retries = {self.table}.retries + 1 RETURNING inet_server_port()"
        )
        conn: psycopg.Connection[Any] | None = None
        next_id = 1
        try:
            while not self._stop.is_set():
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                    row = conn.execute(sql, (next_id,), prepare=False).fetchone()
                except psycopg.Error as exc:
                    self.errors.append((time.monotonic(), f"{exc.sqlstate}: {exc}".strip()))
                    time.sleep(0.01)
                    continue
                assert row is not None
                self.acks.append(Ack(next_id, time.monotonic(), int(row[0])))
                next_id += 1
                time.sleep(self.pause)
        except BaseException as exc:  # reported by stop()
            self.crashed = exc
        finally:
            if conn is not None:
                conn.close()

    def wait_acks(self, count: int, timeout: float = 30) -> None:
        """Until `count` more writes are acknowledged."""
        target = len(self.acks) + count
        deadline = time.monotonic() + timeout
        while len(self.acks) < target:
            assert self.crashed is None, self.crashed
            assert time.monotonic() < deadline, f"writes stalled: {self.errors[-3:]}"
            time.sleep(0.01)

    def first_ack(self, after: float, port: int) -> Ack | None:
        """The first write acknowledged after `after` by the server on `port`."""
        return next((a for a in self.acks if a.at > after and a.port == port), None)


def wait_writable(
    candidates: Sequence[tuple[str, int]], dsn_for: Callable[[str, int], str], timeout: float
) -> tuple[float, tuple[str, int]]:
    """Poll every candidate directly (a real write: txid_current() commits an xid) until one
    accepts it: (the monotonic time it did, its address)."""
    deadline = time.monotonic() + timeout
    conns: dict[tuple[str, int], psycopg.Connection[Any]] = {}
    try:
        while time.monotonic() < deadline:
            for address in candidates:
                try:
                    conn = conns.get(address)
                    if conn is None or conn.closed:
                        conn = conns[address] = psycopg.connect(
                            dsn_for(*address), autocommit=True, connect_timeout=2
                        )
                    conn.execute("SELECT txid_current()")
                    return time.monotonic(), address
                except psycopg.Error:
                    pass
            time.sleep(0.01)
    finally:
        for conn in conns.values():
            conn.close()
    raise AssertionError(f"none of {candidates} accepted a write within {timeout}s")
