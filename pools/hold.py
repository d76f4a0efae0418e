"""The waiting room of a database without a usable primary.

During a failover the primary is down (or in recovery, or two backends claim the role) for a
second or two: a write that fails at once costs the application an error it must handle, one
that waits a little is served by the new primary. A `HoldingPool` stands in for the primary's
pool meanwhile: it never opens a server connection, it queues primary-bound transactions, and
the proxy moves them to the primary's pool the moment one is usable. Whoever is still waiting
after `timeout` gets the reason instead, with the client connection kept open.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from pools.pool import Pool, PoolKey, PoolSettings, Waiter
from protocol.errors import CONNECTION_FAILURE

# A timer may fire up to a clock tick before the deadline measured with time.monotonic().
_EARLY = 0.002


@dataclass(slots=True)
class HoldStats:
    """Per database, kept across holds: transactions that waited for a primary, and those
    that gave up after the timeout."""

    waited: int = 0
    timed_out: int = 0


class HoldingPool(Pool):
    """A pool with no servers: waiters are held until the proxy moves them elsewhere or for
    `timeout` seconds, then refused with `reason` (SQLSTATE 08006)."""

    def __init__(
        self,
        key: PoolKey,
        dbname: str,
        settings: PoolSettings,
        *,
        timeout: float,
        reason: str,
        stats: HoldStats,
        fenced: bool = False,
    ) -> None:
        super().__init__(key, dbname, None, settings)
        self.paused = True  # never grows, never hands out a server
        self.timeout = timeout
        self.reason = reason
        self.fenced = fenced  # two backends claim to be primary (else: none usable)
        # Logins without known server parameters wait too: the primary's backend is up but in
        # recovery, as the first of `hosts:` may be while the monitors look for the primary.
        self.logins_wait = False
        self.stats = stats
        self._timer: asyncio.TimerHandle | None = None

    def acquire(self, waiter: Waiter) -> None:
        """Queue `waiter`; refuse at once when closed, with a zero timeout, or for a login
        that needs server parameters nobody has seen yet, unless `logins_wait`."""
        if self.closed or self.timeout <= 0 or (self.parameters is None and not self.logins_wait):
            waiter.server_unavailable(CONNECTION_FAILURE, self.reason)
            return None
        self.stats.waited += 1
        self.waiters.append(waiter)
        self._wait_start[waiter] = time.monotonic()
        if self._timer is None:
            self._arm()
        return None

    def _arm(self) -> None:
        """One timer for the oldest waiter (a FIFO: it is always the first due)."""
        due = self._wait_start[self.waiters[0]] + self.timeout
        delay = max(due - time.monotonic(), 0.0)
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = time.monotonic() + _EARLY
        waiters = self.waiters
        while waiters and self._wait_start[waiters[0]] + self.timeout <= now:
            waiter = waiters.popleft()
            self._forget_waiter(waiter)
            self.stats.timed_out += 1
            waiter.server_unavailable(
                CONNECTION_FAILURE, f"{self.reason} (waited failover_timeout: {self.timeout:g}s)"
            )
        if waiters:
            self._arm()

    def close(self) -> None:
        """The hold is over; anyone the proxy did not move gets the reason."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.waiters:
            waiter = self.waiters.popleft()
            self._forget_waiter(waiter)
            waiter.server_unavailable(CONNECTION_FAILURE, self.reason)
