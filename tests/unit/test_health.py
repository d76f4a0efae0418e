"""Backend health verdicts (fall / rise), time lag, lag-aware replica choice and the choice of
a database's primary (failover, split brain), on monitors fed by hand: no servers needed."""

from __future__ import annotations

from typing import Any

import pytest

from pools.monitor import BackendMonitor, fails_at_once, format_lsn
from pools.pool import Pool
from pools.server import ServerConnection
from protocol.auth import LoginError
from router.config import parse_config
from router.proxy import Proxy
from router.routing import Reader, Router
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
        endpoint = router.read_endpoint(Reader(), "app")
        assert endpoint is not None and (endpoint.host, endpoint.port) == R2


def test_every_replica_lagging_reads_go_to_the_primary(proxy: Proxy) -> None:
    router = routed(proxy, max_replica_lag="1s")
    lagging(proxy, 5.0, 3.0)
    assert router.read_endpoint(Reader(), "app") is None
    assert router.read_endpoint(Reader(), "app") is None
    assert router.lag_fallbacks == 2 and router.all_lagging
    proxy.monitors[R1].time_lag = 0.0
    endpoint = router.read_endpoint(Reader(), "app")
    assert endpoint is not None and (endpoint.host, endpoint.port) == R1
    assert not router.all_lagging


def test_least_lagged_when_every_replica_lags(proxy: Proxy) -> None:
    router = routed(proxy, max_replica_lag="1s", lagging_replicas="least_lagged")
    lagging(proxy, 5.0, 3.0)
    endpoint = router.read_endpoint(Reader(), "app")
    assert endpoint is not None and (endpoint.host, endpoint.port) == R2
    assert router.lag_fallbacks == 1


def test_least_lagged_still_honours_read_your_writes(proxy: Proxy) -> None:
    router = routed(proxy, max_replica_lag="1s", lagging_replicas="least_lagged")
    lagging(proxy, 5.0, 3.0)
    reader = Reader()
    reader.min_lsn = 200  # wrote beyond what either replica replayed
    assert router.read_endpoint(reader, "app") is None


def test_byte_lag_least_lagged(proxy: Proxy) -> None:
    router = routed(proxy, max_replica_lag="10", lagging_replicas="least_lagged")
    good(proxy.monitors[P], recovery=False, lsn=1000)
    good(proxy.monitors[R1], recovery=True, lsn=900)
    good(proxy.monitors[R2], recovery=True, lsn=950)
    endpoint = router.read_endpoint(Reader(), "app")
    assert endpoint is not None and (endpoint.host, endpoint.port) == R2


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
    endpoint = router.read_endpoint(Reader(), "app")
    assert endpoint is not None and (endpoint.host, endpoint.port) == P


def test_router_reconfigure_keeps_learned_state(proxy: Proxy) -> None:
    """A reload's routing options reach the router in place: lag limits and the cache size
    apply at once; the cache and counters stay unless the function lists change."""
    router = routed(proxy, classifier_cache_size=5)
    assert router.classifier.cache_size == 5
    lagging(proxy, 5.0, 3.0)
    assert router.read_endpoint(Reader(), "app") is not None  # default lag limit is in bytes
    classifier = router.classifier
    router.reconfigure(routed(proxy, max_replica_lag="1s", classifier_cache_size=0).database)
    assert router.read_endpoint(Reader(), "app") is None  # the new time limit applies
    assert router.classifier is classifier and classifier.cache_size == 0
    assert router.to_replica == 1 and router.catalog_known
    router.reconfigure(routed(proxy, writing_functions=["audit_read"]).database)
    assert router.classifier is not classifier and not router.catalog_known
