"""Backend health verdicts (fall / rise), time lag, lag-aware replica choice and the choice of
a database's primary (failover, split brain), on monitors fed by hand: no servers needed."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pools.hold import HoldingPool, HoldStats
from pools.monitor import BackendMonitor, fails_at_once, format_lsn
from pools.pool import Pool, PoolKey, PoolSettings
from pools.server import ServerConnection
from protocol.auth import LoginError
from router.client import State, _FirstLogin
from router.config import parse_config
from router.proxy import Proxy
from router.routing import Reader, Router
from tests.support import free_port
from tests.unit.test_admin import add_client

TOPOLOGY: dict[str, Any] = {
    "users": {"app": {"password": "app-secret"}},
    "databases": {
        "appdb": {
            "primary": "10.0.0.1:5432",
            "replicas": ["10.0.0.2:5432", "10.0.0.3:5432"],
        },
    },
}
P, R1, R2 = ("10.0.0.1", 5432), ("10.0.0.2", 5432), ("10.0.0.3", 5432)


def monitor(address: tuple[str, int] = P, **kw: Any) -> BackendMonitor:
    return BackendMonitor(address[0], address[1], "app", "pw", "appdb", **kw)


def good(m: BackendMonitor, *, recovery: bool, lsn: int, at: float = 0.0) -> None:
    m._checked(at, recovery, format_lsn(lsn), format_lsn(lsn) if recovery else None, "0")


# ---- fall / rise --------------------------------------------------------------------------------


def test_fall_failures_in_a_row_take_a_backend_down() -> None:
    m = monitor(fall=3, rise=2)
    seen: list[bool | None] = []
    m.listeners.append(lambda mon: seen.append(mon.up))
    good(m, recovery=False, lsn=100)
    assert m.up is True and seen == [True]
    m.failed("boom")
    m.failed("boom")
    assert m.up is True, "down before `fall` failures"
    good(m, recovery=False, lsn=100)  # a good check resets the count
    m.failed("boom")
    m.failed("boom")
    assert m.up is True
    m.failed("boom")
    assert m.up is False and seen == [True, False]
    m.failed("boom")
    assert seen == [True, False], "a second failure must not notify again"


def test_rise_successes_in_a_row_bring_it_back() -> None:
    m = monitor(fall=3, rise=2)
    good(m, recovery=True, lsn=100)
    m.failed("refused", at_once=True)
    assert m.up is False
    good(m, recovery=True, lsn=100)
    assert m.up is False, "a flapping backend is re-admitted before `rise`"
    m.failed("refused", at_once=True)  # flaps: the count starts again
    good(m, recovery=True, lsn=100)
    assert m.up is False
    good(m, recovery=True, lsn=100)
    assert m.up is True
    assert m.transitions == 3


def test_first_check_decides_at_once() -> None:
    up, down = monitor(), monitor()
    good(up, recovery=False, lsn=1)
    down.failed("boom")
    assert up.up is True and down.up is False


@pytest.mark.parametrize(
    ("exc", "at_once"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (TimeoutError(), True),
        (LoginError("57P03", "the database system is starting up"), True),
        (LoginError("57P01", "terminating connection due to administrator command"), True),
        (LoginError("28P01", "password authentication failed"), False),
        (ConnectionError("server closed the connection"), False),
    ],
)
def test_what_counts_at_once(exc: BaseException, at_once: bool) -> None:
    assert fails_at_once(exc) is at_once


# ---- time lag -----------------------------------------------------------------------------------


def test_time_lag_follows_the_oldest_unreplayed_primary_position() -> None:
    primary, replica = monitor(P), monitor(R1)
    replica.upstream = primary
    good(primary, recovery=False, lsn=1000, at=10.0)
    good(replica, recovery=True, lsn=1000, at=10.05)
    assert replica.time_lag == 0.0
    good(primary, recovery=False, lsn=2000, at=10.1)  # the primary writes
    good(replica, recovery=True, lsn=1000, at=10.15)
    good(primary, recovery=False, lsn=3000, at=10.2)
    good(replica, recovery=True, lsn=1000, at=12.15)  # receiver stopped or replay delayed
    assert replica.time_lag == pytest.approx(2.05)
    good(replica, recovery=True, lsn=2000, at=12.2)  # caught up to the first write only
    assert replica.time_lag == pytest.approx(2.0)
    good(replica, recovery=True, lsn=3000, at=12.3)
    assert replica.time_lag == 0.0


def test_idle_primary_means_no_time_lag() -> None:
    primary, replica = monitor(P), monitor(R1)
    replica.upstream = primary
    good(primary, recovery=False, lsn=1000, at=0.0)
    for t in range(1, 100):
        good(replica, recovery=True, lsn=1000, at=float(t))
    assert replica.time_lag == 0.0


def test_without_upstream_the_servers_own_delay() -> None:
    replica = monitor(R1)
    replica._checked(1.0, True, "0/10", "0/20", "3.5")
    assert replica.time_lag == 3.5 and replica.server_lag == 3.5


# ---- the proxy: pools of a down backend, failover, split brain -------------------------------


@pytest.fixture
def proxy() -> Proxy:
    proxy = Proxy(parse_config(TOPOLOGY, env={}))
    for address in (P, R1, R2):
        m = monitor(address)
        m.listeners.append(proxy._backend_changed)
        proxy.monitors[address] = m
    proxy._set_upstream(proxy.config.databases["appdb"])
    return proxy


class FakeServer:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_down_backend_loses_its_idle_connections(proxy: Proxy) -> None:
    db = proxy.config.databases["appdb"]
    pool = proxy.pool_for(db, "app", db.replicas[0])
    idle = FakeServer()
    pool.idle.append(idle)  # type: ignore[arg-type]
    good(proxy.monitors[R1], recovery=True, lsn=1)
    assert not idle.closed
    proxy.monitors[R1].failed("refused", at_once=True)
    assert idle.closed and not pool.idle and not pool.closed


def test_promoted_replica_becomes_the_primary(proxy: Proxy) -> None:
    db = proxy.config.databases["appdb"]
    client = add_client(proxy, database="appdb")
    client.primary_pool = client.pool
    old_pool = proxy.pool_for(db, "app")
    assert client.primary_pool is old_pool
    good(proxy.monitors[P], recovery=False, lsn=100)
    good(proxy.monitors[R1], recovery=True, lsn=100)
    assert proxy.primary_endpoint(db) == db.primary and not proxy.failovers

    proxy.monitors[P].failed("refused", at_once=True)
    assert proxy.primary_endpoint(db) == db.primary, "no other primary yet: keep it"
    good(proxy.monitors[R1], recovery=False, lsn=200)  # promoted
    assert proxy.primary_endpoint(db) == db.replicas[0]
    assert proxy.failovers == {"appdb": 1}
    assert old_pool.closed
    new_pool = proxy.pool_for(db, "app")
    assert (new_pool.key.host, new_pool.key.port) == R1
    assert client.primary_pool is new_pool
    assert proxy.monitors[R2].upstream is proxy.monitors[R1]


def test_two_primaries_fence_the_database(proxy: Proxy) -> None:
    db = proxy.config.databases["appdb"]
    client = add_client(proxy, database="appdb")
    client.primary_pool = client.pool
    good(proxy.monitors[P], recovery=False, lsn=100)
    good(proxy.monitors[R1], recovery=False, lsn=100)  # promoted while the primary lives
    fenced = proxy.primary_pool(db, "app")
    assert "appdb" in proxy.fenced and client.primary_pool is fenced
    answers: list[tuple[str, str]] = []

    class Waiter:
        def server_assigned(self, server: ServerConnection) -> None:
            raise AssertionError("a fenced database handed out a server")

        def server_unavailable(self, sqlstate: str, message: str) -> None:
            answers.append((sqlstate, message))

    assert fenced.acquire(Waiter()) is None
    assert answers and answers[0][0] == "08006"
    assert "10.0.0.1:5432" in answers[0][1] and "10.0.0.2:5432" in answers[0][1]

    proxy.monitors[P].failed("refused", at_once=True)  # one remains: the promoted one
    assert "appdb" not in proxy.fenced
    assert proxy.primary_endpoint(db) == db.replicas[0]
    assert isinstance(client.primary_pool, Pool) and not client.primary_pool.closed
    assert client.primary_pool.key.host == "10.0.0.2"


def test_login_during_split_brain_gets_the_fenced_pool(proxy: Proxy) -> None:
    db = proxy.config.databases["appdb"]
    good(proxy.monitors[P], recovery=False, lsn=100)
    good(proxy.monitors[R2], recovery=False, lsn=100)
    assert proxy.primary_pool(db, "app") is proxy.fenced["appdb"]


# ---- lag-aware replica choice ---------------------------------------------------------------


def routed(proxy: Proxy, **routing: Any) -> Router:
    topology = {
        **TOPOLOGY,
        "databases": {"appdb": {**TOPOLOGY["databases"]["appdb"], "routing": routing}},
    }
    proxy.config = parse_config(topology, env={})
    router = Router(proxy, proxy.config.databases["appdb"], ("app", "pw"))
    router.catalog_known = True
    return router


def lagging(proxy: Proxy, r1: float, r2: float) -> None:
    good(proxy.monitors[P], recovery=False, lsn=100)
    good(proxy.monitors[R1], recovery=True, lsn=100)
    good(proxy.monitors[R2], recovery=True, lsn=100)
    proxy.monitors[R1].time_lag = r1
    proxy.monitors[R2].time_lag = r2


def test_time_lag_limit_skips_a_replica(proxy: Proxy) -> None:
    router = routed(proxy, max_replica_lag="1s")
    lagging(proxy, 5.0, 0.2)
    for _ in range(4):
        pool = router.read_pool(Reader(), "app")
        assert pool is not None and (pool.key.host, pool.key.port) == R2


def test_every_replica_lagging_reads_go_to_the_primary(proxy: Proxy) -> None:
    router = routed(proxy, max_replica_lag="1s")
    lagging(proxy, 5.0, 3.0)
    assert router.read_pool(Reader(), "app") is None
    assert router.read_pool(Reader(), "app") is None
    assert router.lag_fallbacks == 2 and router.all_lagging
    proxy.monitors[R1].time_lag = 0.0
    pool = router.read_pool(Reader(), "app")
    assert pool is not None and (pool.key.host, pool.key.port) == R1
    assert not router.all_lagging


def test_least_lagged_when_every_replica_lags(proxy: Proxy) -> None:
    router = routed(proxy, max_replica_lag="1s", lagging_replicas="least_lagged")
    lagging(proxy, 5.0, 3.0)
    pool = router.read_pool(Reader(), "app")
    assert pool is not None and (pool.key.host, pool.key.port) == R2
    assert router.lag_fallbacks == 1


def test_least_lagged_still_honours_read_your_writes(proxy: Proxy) -> None:
    router = routed(proxy, max_replica_lag="1s", lagging_replicas="least_lagged")
    lagging(proxy, 5.0, 3.0)
    reader = Reader()
    reader.min_lsn = 200  # wrote beyond what either replica replayed
    assert router.read_pool(reader, "app") is None


def test_byte_lag_least_lagged(proxy: Proxy) -> None:
    router = routed(proxy, max_replica_lag="10", lagging_replicas="least_lagged")
    good(proxy.monitors[P], recovery=False, lsn=1000)
    good(proxy.monitors[R1], recovery=True, lsn=900)
    good(proxy.monitors[R2], recovery=True, lsn=950)
    pool = router.read_pool(Reader(), "app")
    assert pool is not None and (pool.key.host, pool.key.port) == R2


def test_old_primary_back_as_a_replica_serves_reads(proxy: Proxy) -> None:
    router = routed(proxy)
    good(proxy.monitors[P], recovery=False, lsn=100)
    good(proxy.monitors[R1], recovery=True, lsn=100)
    proxy.monitors[P].failed("refused", at_once=True)
    good(proxy.monitors[R1], recovery=False, lsn=200)  # promoted
    good(proxy.monitors[R2], recovery=True, lsn=50)
    proxy.monitors[R2].failed("refused", at_once=True)
    good(proxy.monitors[P], recovery=True, lsn=200)  # rewound, following the new primary
    good(proxy.monitors[P], recovery=True, lsn=200)
    pool = router.read_pool(Reader(), "app")
    assert pool is not None and (pool.key.host, pool.key.port) == P


def test_router_reconfigure_keeps_learned_state(proxy: Proxy) -> None:
    """A reload's routing options reach the router in place: lag limits and the cache size
    apply at once; the cache and counters stay unless the function lists change."""
    router = routed(proxy, classifier_cache_size=5)
    assert router.classifier.cache_size == 5
    lagging(proxy, 5.0, 3.0)
    assert router.read_pool(Reader(), "app") is not None  # default lag limit is in bytes
    classifier = router.classifier
    router.reconfigure(routed(proxy, max_replica_lag="1s", classifier_cache_size=0).database)
    assert router.read_pool(Reader(), "app") is None  # the new time limit applies
    assert router.classifier is classifier and classifier.cache_size == 0
    assert router.to_replica == 1 and router.catalog_known
    router.reconfigure(routed(proxy, writing_functions=["audit_read"]).database)
    assert router.classifier is not classifier and not router.catalog_known


# ---- a database without a usable primary: writes wait (failover_timeout) -------------------------


class Answers:
    """A pool waiter that records what it is told."""

    def __init__(self) -> None:
        self.refusals: list[tuple[str, str, float]] = []

    def server_assigned(self, server: ServerConnection) -> None:
        raise AssertionError("a hold handed out a server")

    def server_unavailable(self, sqlstate: str, message: str) -> None:
        self.refusals.append((sqlstate, message, time.monotonic()))


def hold_of(proxy: Proxy) -> HoldingPool:
    hold = proxy.primary_pool(proxy.config.databases["appdb"], "app")
    assert isinstance(hold, HoldingPool)
    return hold


def test_down_primary_holds_writes_and_a_promotion_moves_them(proxy: Proxy) -> None:
    async def scenario() -> None:
        db = proxy.config.databases["appdb"]
        client = add_client(proxy, database="appdb")
        client.primary_pool = client.pool
        good(proxy.monitors[P], recovery=False, lsn=100)
        good(proxy.monitors[R1], recovery=True, lsn=100)
        assert not proxy.holds

        proxy.monitors[P].failed("refused", at_once=True)
        hold = hold_of(proxy)
        assert client.primary_pool is hold and not hold.fenced
        assert "10.0.0.1:5432 is down (refused)" in hold.reason
        hold.parameters = {"server_version": "15"}  # what logged-in clients were welcomed with
        client._acquire(hold, b"Q\x00\x00\x00\x0dINSERT 1\x00")
        assert client.waiting and client in hold.waiters

        good(proxy.monitors[R1], recovery=False, lsn=200)  # promoted
        assert not proxy.holds and hold.closed
        new_pool = proxy.pool_for(db, "app")
        assert (new_pool.key.host, new_pool.key.port) == R1
        assert client.primary_pool is new_pool and client.pool is new_pool
        assert client in new_pool.waiters and client.buffer, "the write moved, bytes and all"
        assert proxy.hold_stats["appdb"].waited == 1
        new_pool.close()

    asyncio.run(scenario())


def test_the_old_primary_back_ends_the_hold(proxy: Proxy) -> None:
    good(proxy.monitors[P], recovery=False, lsn=100)
    proxy.monitors[P].failed("refused", at_once=True)
    assert "appdb" in proxy.holds
    good(proxy.monitors[P], recovery=False, lsn=100)
    assert "appdb" in proxy.holds, "back before `rise` good checks"
    good(proxy.monitors[P], recovery=False, lsn=100)
    assert not proxy.holds and not proxy.failovers


def test_a_primary_in_recovery_holds_writes(proxy: Proxy) -> None:
    good(proxy.monitors[P], recovery=True, lsn=100)  # demoted, nothing promoted yet
    assert "is in recovery" in hold_of(proxy).reason


def test_a_monitor_refused_by_the_server_holds_nothing(proxy: Proxy) -> None:
    """A wrong monitor password says nothing about the server: its own errors tell clients."""
    proxy.monitors[P].failed("28P01: password authentication failed", refused=True)
    assert proxy.monitors[P].up is False and not proxy.holds


def test_hold_times_out_with_the_reason_on_time(proxy: Proxy) -> None:
    async def scenario() -> list[tuple[str, str, float]]:
        hold = HoldingPool(
            PoolKey("appdb", "", "no primary", 0),
            "appdb",
            proxy._pool_settings(proxy.config.databases["appdb"]),
            timeout=0.2,
            reason='database "appdb" has no primary: 10.0.0.1:5432 is down (refused)',
            stats=HoldStats(),
        )
        hold.parameters = {}
        first, second = Answers(), Answers()
        started = time.monotonic()
        hold.acquire(first)
        await asyncio.sleep(0.1)
        hold.acquire(second)
        await asyncio.sleep(0.35)
        assert hold.stats.timed_out == 2 and not hold.waiters
        return [(r[0][0], r[0][1], r[0][2] - started) for r in (first.refusals, second.refusals)]

    (state1, message, at1), (_, _, at2) = asyncio.run(scenario())
    assert state1 == "08006"
    assert message.startswith('database "appdb" has no primary') and "failover_timeout" in message
    assert 0.2 <= at1 < 0.45 and 0.3 <= at2 < 0.55, (at1, at2)  # a timer each, no polling


def test_zero_failover_timeout_and_logins_are_refused_at_once(proxy: Proxy) -> None:
    zero = HoldingPool(
        PoolKey("appdb", "", "no primary", 0),
        "appdb",
        proxy._pool_settings(proxy.config.databases["appdb"]),
        timeout=0,
        reason="no primary",
        stats=HoldStats(),
    )
    zero.parameters = {}
    waiter = Answers()
    zero.acquire(waiter)
    assert [r[:2] for r in waiter.refusals] == [("08006", "no primary")]

    zero.timeout, zero.parameters = 10, None  # a login: no server parameters known yet
    zero.acquire(waiter)
    assert len(waiter.refusals) == 2 and not zero.waiters

    async def login() -> None:  # unless the primary's backend is up, only in recovery
        zero.logins_wait = True
        zero.acquire(waiter)
        assert len(waiter.refusals) == 2 and list(zero.waiters) == [waiter]
        zero.close()

    asyncio.run(login())


def test_split_brain_holds_like_a_missing_primary(proxy: Proxy) -> None:
    good(proxy.monitors[P], recovery=False, lsn=100)
    proxy.monitors[P].failed("refused", at_once=True)
    assert not hold_of(proxy).fenced
    good(proxy.monitors[P], recovery=False, lsn=100)
    good(proxy.monitors[R1], recovery=False, lsn=100)
    good(proxy.monitors[P], recovery=False, lsn=100)  # back: two claim the role
    hold = hold_of(proxy)
    assert (
        hold.fenced and "more than one primary" in hold.reason and proxy.fenced == {"appdb": hold}
    )


def test_pool_reports_a_refused_backend() -> None:
    async def scenario() -> list[tuple[str, int, str | None]]:
        told: list[tuple[str, int, str | None]] = []
        settings = PoolSettings(1, 0, 60.0, 60.0, 2.0, 5.0, "")
        pool = Pool(PoolKey("appdb", "app", "127.0.0.1", free_port()), "appdb", "pw", settings)
        pool.on_trouble = lambda host, port, error: told.append((host, port, error))
        waiter = Answers()
        pool.acquire(waiter)
        for _ in range(200):
            if waiter.refusals:
                break
            await asyncio.sleep(0.01)
        assert waiter.refusals and waiter.refusals[0][0] == "08006"
        return told

    told = asyncio.run(scenario())
    assert len(told) == 1 and told[0][2] is not None and "cannot connect" in told[0][2]


def test_a_login_waiting_for_its_first_server_follows_the_primary(proxy: Proxy) -> None:
    """A client logging in while pgrouter still looks for the primary (the first listed backend
    is not it) waits for the first server's parameters; that wait moves with the primary (and
    through the hold while none is known) instead of failing when the old pool closes."""

    async def scenario() -> None:
        db = proxy.config.databases["appdb"]
        client = add_client(proxy, database="appdb", state=State.WELCOME)
        client.key = (1, 2)
        old_pool = proxy.pool_for(db, "app")
        client.pool = client.primary_pool = old_pool
        client.waiting = True
        client._waiter = _FirstLogin(client)
        old_pool.waiters.append(client._waiter)  # queued: nothing answered yet
        good(proxy.monitors[P], recovery=True, lsn=100)  # no primary known: a hold
        assert client.state is State.WELCOME and client.pool is proxy.holds["appdb"]
        new_pool = proxy.pool_for(db, "app", db.replicas[0])
        new_pool.parameters = {"server_version": "15.0"}  # its first login is done
        good(proxy.monitors[R1], recovery=False, lsn=100)  # the primary: the second backend
        assert old_pool.closed and not old_pool.waiters
        assert client.state is State.READY and client.pool is new_pool and not client.waiting
        written = b"".join(client.transport.written)  # type: ignore[attr-defined]
        assert b"server_version\x0015.0\x00" in written

    asyncio.run(scenario())
