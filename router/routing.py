"""Where each transaction of one database goes: its primary, or one of its replicas.

Correctness first: a statement goes to a replica only when the classifier proves it
read-only, the database's function list is known, and a replica has replayed everything
this client wrote (read-your-writes) and everything it already read (monotonic reads).
Anything else goes to the primary.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import structlog

from pools.monitor import BackendMonitor
from pools.pool import Pool
from pools.server import open_server
from protocol.auth import LoginError
from router.classify import VOLATILE_FUNCTIONS_SQL, Classifier
from router.config import Database, Endpoint

if TYPE_CHECKING:
    from router.proxy import Proxy

log = structlog.get_logger("pgrouter.routing")
CATALOG_REFRESH = 30.0  # seconds between re-reads of the database's VOLATILE functions
MAX_SHARED_READERS = 100_000  # (user, address) read-your-writes states kept, least recent dropped


class Reader:
    """What a client carries between transactions for routing its reads."""

    __slots__ = ("min_lsn", "wrote_at")

    def __init__(self) -> None:
        self.min_lsn = 0  # a replica must have replayed this far to serve the client
        self.wrote_at: float | None = None  # when its last primary transaction ended


class Router:
    def __init__(self, proxy: Proxy, database: Database, login: tuple[str, str | None]) -> None:
        self.proxy = proxy
        self.database = database
        self.routing = database.routing
        self.login = login
        self.classifier = self._classifier()
        self.catalog_known = False  # until pg_proc was read: every read goes to the primary
        self._catalog_generation = 0
        self._refresh = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The backends that may serve reads, with their monitors, and per user the pool of
        # each (same order): looked up once, not on every read.
        self._members: list[tuple[Endpoint, BackendMonitor]] = []
        self._pools: dict[str, list[Pool]] = {}
        self._served: list[int] = []  # reads sent to each member, by the same index
        self._primary_served = 0  # reads the primary took with reads: any
        self._find_members()
        # Plain counters, read by the metrics and the admin console.
        self.to_replica = 0
        self.to_primary = 0
        self.no_replica = 0  # read-only, but no replica qualified
        self.ryw_fallbacks = 0  # read-only, kept on the primary by read-your-writes
        self.misroutes = 0  # a replica refused a read: retried on the primary
        self.lost_retries = 0  # a read's backend failed before it answered: run elsewhere
        self.catalog_waits = 0  # read-only, held on the primary until pg_proc was read
        self.lag_fallbacks = 0  # read-only, every replica beyond max_replica_lag
        self.all_lagging = False  # every usable replica is beyond max_replica_lag (logged once)
        self._misrouted: set[str] = set()
        self._readers: OrderedDict[tuple[str, str], Reader] = OrderedDict()

    def _classifier(self) -> Classifier:
        r = self.routing
        return Classifier(
            r.classifier_cache_size, allow=r.read_only_functions, deny=r.writing_functions
        )

    def reconfigure(self, database: Database) -> None:
        """A reload: the new options apply to every client's next transaction at once, while
        what was learned (counters, read-your-writes positions, the classifier's cache) stays,
        unless the function lists changed: then verdicts are made afresh."""
        old, self.database, self.routing = self.routing, database, database.routing
        new = self.routing
        if (old.read_only_functions, old.writing_functions) != (
            new.read_only_functions,
            new.writing_functions,
        ):
            self.classifier = self._classifier()
            self.catalog_changed()  # the new classifier learns pg_proc's functions again
        else:
            self.classifier.cache_size = max(0, new.classifier_cache_size)
        if new.read_your_writes_scope != "user_address":
            self._readers.clear()
        self._find_members()  # the backends or their monitors may have changed

    def _find_members(self) -> None:
        monitors = self.proxy.monitors
        members = []
        for endpoint in self.database.backends:
            monitor = monitors.get((endpoint.host, endpoint.port))
            if monitor is not None:
                members.append((endpoint, monitor))
        self._members = members
        self._pools.clear()
        self._served = [0] * len(members)

    def _pools_of(self, user: str) -> list[Pool]:
        pools = self._pools.get(user)
        if pools is None:
            pool_for, database = self.proxy.pool_for, self.database
            pools = self._pools[user] = [pool_for(database, user, e) for e, _ in self._members]
        return pools

    def reader_for(self, user: str, address: str) -> Reader:
        """The read-your-writes state a client starts with: its own, or with
        `read_your_writes_scope: user_address` the one every connection of that user from that
        address shares (connect-per-request clients read what their last request wrote)."""
        if self.routing.read_your_writes_scope != "user_address":
            return Reader()
        key = (user, address)
        reader = self._readers.get(key)
        if reader is None:
            reader = self._readers[key] = Reader()
            if len(self._readers) > MAX_SHARED_READERS:
                self._readers.popitem(last=False)
        else:
            self._readers.move_to_end(key)
        return reader

    @property
    def primary(self) -> BackendMonitor | None:
        p = self.proxy.primary_endpoint(self.database)
        return self.proxy.monitors.get((p.host, p.port))

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._learn_catalog())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def catalog_changed(self) -> None:
        """DDL went through: hold reads on the primary until pg_proc was read again."""
        self.catalog_known = False
        self._catalog_generation += 1
        self._refresh.set()

    async def _learn_catalog(self) -> None:
        while True:
            generation = self._catalog_generation
            primary = self.proxy.primary_endpoint(self.database)
            try:
                conn = await open_server(
                    primary.host,
                    primary.port,
                    self.login[0],
                    self.login[1],
                    {"database": self.database.dbname, "application_name": "pgrouter catalog"},
                    5.0,
                    self.proxy.config.server_tls,
                )
                try:
                    rows = await conn.query(VOLATILE_FUNCTIONS_SQL)
                finally:
                    conn.close()
                self.classifier.set_volatile_functions(r[0] for r in rows if r and r[0])
                if generation == self._catalog_generation:
                    self.catalog_known = True
            except (OSError, TimeoutError, ConnectionError, LoginError) as exc:
                log.warning("cannot read functions", database=self.database.name, error=str(exc))
            self._refresh.clear()
            delay = CATALOG_REFRESH if self.catalog_known else 1.0
            try:
                async with asyncio.timeout(delay):
                    await self._refresh.wait()
            except TimeoutError:
                pass

    # ---- decisions ----------------------------------------------------------------------------

    def read_pool(self, reader: Reader, user: str) -> Pool | None:
        """A replica's pool for a provably read-only transaction, or None for the primary."""
        if not self.catalog_known:
            self.catalog_waits += 1
            self.to_primary += 1
            return None
        if reader.wrote_at is not None and not self._writes_visible(reader):
            self.ryw_fallbacks += 1
            self.to_primary += 1
            return None
        primary = self.primary
        primary_lsn = primary.lsn if primary is not None else None
        routing = self.routing
        max_lag = routing.max_replica_lag_bytes if primary_lsn is not None else None
        max_seconds = routing.max_replica_lag_seconds
        min_lsn = reader.min_lsn
        pools = self._pools_of(user)
        served = self._served
        best: tuple[float, float] | None = None
        chosen = -1
        least: tuple[float, int] | None = None  # the least lagged
        # Every backend in recovery may serve reads: after a failover the old primary can
        # come back as a replica, and the promoted one is skipped (no longer in recovery).
        for i, (endpoint, monitor) in enumerate(self._members):
            if not monitor.up or not monitor.in_recovery:
                continue
            lsn = monitor.lsn
            if lsn is None or lsn < min_lsn:
                continue
            if max_lag is not None and primary_lsn - lsn > max_lag:  # type: ignore[operator]
                if least is None or primary_lsn - lsn < least[0]:  # type: ignore[operator]
                    least = (primary_lsn - lsn, i)  # type: ignore[operator]
                continue
            if max_seconds is not None and monitor.time_lag > max_seconds:
                if least is None or monitor.time_lag < least[0]:
                    least = (monitor.time_lag, i)
                continue
            pool = pools[i]
            if pool.closed:
                pool = pools[i] = self.proxy.pool_for(self.database, user, endpoint)
            weight = endpoint.weight
            # Least busy per weight; among equally busy ones, the least served per weight,
            # which spreads an idle-time trickle of reads by weight too.
            score = ((len(pool.active) + len(pool.waiters)) / weight, served[i] / weight)
            if best is None or score < best:
                best, chosen = score, i
        if chosen < 0 and least is not None:
            self._lagging(True)
            self.lag_fallbacks += 1
            if routing.lagging_replicas == "least_lagged":
                chosen = least[1]
        elif chosen >= 0 and self.all_lagging:
            self._lagging(False)
        if chosen < 0 or (routing.reads == "any" and self._primary_turn()):
            if chosen < 0:
                self.no_replica += 1
            self.to_primary += 1
            return None
        served[chosen] += 1
        lsn = self._members[chosen][1].lsn
        assert lsn is not None
        reader.min_lsn = max(min_lsn, lsn)  # monotonic reads
        self.to_replica += 1
        pool = pools[chosen]
        if pool.closed:
            pool = pools[chosen] = self.proxy.pool_for(
                self.database, user, self._members[chosen][0]
            )
        return pool

    def _lagging(self, now: bool) -> None:
        """Log once when every replica falls beyond max_replica_lag, once when one is back."""
        if now == self.all_lagging:
            return
        self.all_lagging = now
        if now:
            log.warning(
                "every replica lags beyond max_replica_lag",
                database=self.database.name,
                reads=self.routing.lagging_replicas,
            )
        else:
            log.info("a replica is within max_replica_lag again", database=self.database.name)

    def _primary_turn(self) -> bool:
        """With reads: any, the primary takes its share as one more member of weight 1."""
        turns = sum(self._served) + self._primary_served
        if turns % (len(self.database.replicas) + 1) == 0:
            self._primary_served += 1
            return True
        return False

    def _writes_visible(self, reader: Reader) -> bool:
        """Read-your-writes: may this client's reads leave the primary yet?"""
        mode = self.routing.read_your_writes
        assert reader.wrote_at is not None
        if mode == "off":
            reader.wrote_at = None
            return True
        if mode == "duration":
            if time.monotonic() - reader.wrote_at < self.routing.read_your_writes_window:
                return False
            reader.wrote_at = None
            return True
        # lsn: any primary position read after the write ended covers the write's commit.
        primary = self.primary
        if primary is None or primary.lsn is None or primary.poll_started <= reader.wrote_at:
            return False
        reader.min_lsn = max(reader.min_lsn, primary.lsn)
        reader.wrote_at = None
        return True

    def misrouted(self, sql: str, sqlstate: str) -> None:
        self.misroutes += 1
        fingerprint = " ".join(sql.split())[:200]
        if fingerprint not in self._misrouted and len(self._misrouted) < 1000:
            self._misrouted.add(fingerprint)
            log.warning(
                "replica refused a read; retried on the primary",
                database=self.database.name,
                sqlstate=sqlstate,
                statement=fingerprint,
            )
