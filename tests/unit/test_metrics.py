"""router/metrics.py and router/http.py: the exposition parsed back, and the HTTP endpoints
answered over a real loopback socket. No PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import router
from pools.pool import PoolError
from router.client import State
from router.config import parse_config
from router.http import readiness, start_http
from router.metrics import ProxyCollector, render
from router.proxy import Proxy
from tests.support import free_port
from tests.unit.test_admin import TOPOLOGY, FakeServer, add_client, link, make_proxy, wait

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(proxy: Proxy) -> Samples:
    """Every sample of the exposition, keyed by (name, labels); duplicates are an error."""
    text = render(proxy).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[metric, frozenset(labels.items())]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@pytest.fixture
def busy_proxy() -> Proxy:
    """appdb/app on the primary and a replica, sessions/report; clients in every state."""
    proxy = make_proxy()
    appdb = proxy.config.databases["appdb"]
    primary = proxy.pool_for(appdb, "app")
    replica = proxy.pool_for(appdb, "app", appdb.replicas[0])
    report = proxy.pool_for(proxy.config.databases["sessions"], "report")
    link(add_client(proxy, port=1), FakeServer("10.0.0.1", 5432, (1, 1)))
    add_client(proxy, port=2)
    wait(add_client(proxy, port=3), 1.5)
    add_client(proxy, state=State.AUTH, database=None, port=4)
    primary.idle.append(FakeServer("10.0.0.1", 5432, (2, 1)))  # type: ignore[arg-type]
    replica.idle.extend([FakeServer("10.0.0.2", 5432, (3, 1)) for _ in range(2)])  # type: ignore[misc]
    replica.connecting = 1
    for pool, n in ((primary, 1), (replica, 2), (report, 4)):
        pool.xact_count = 10 * n
        pool.query_count = 20 * n
        pool.bytes_received = 300 * n
        pool.bytes_sent = 4000 * n
        pool.wait_time = 0.5 * n
        pool.wait_count = n
        pool.max_wait = 0.25 * n
        pool.assignment_count = 11 * n
        pool.login_count = 3 * n
        pool.connect_count = 5 * n
        pool.connect_failures = n
    proxy.auth_failures = 7
    proxy.cancel_requests = 2
    proxy.login_refusals = 3
    proxy.auth_query.lookups = 5
    proxy.auth_query.failures = 1
    return proxy


def test_pgrouter_pool_metrics(busy_proxy: Proxy) -> None:
    s = scrape(busy_proxy)
    primary = {"database": "appdb", "user": "app", "backend": "10.0.0.1:5432"}
    replica = {"database": "appdb", "user": "app", "backend": "10.0.0.2:5432"}
    report = {"database": "sessions", "user": "report", "backend": "10.0.1.1:6543"}
    assert value(s, "pgrouter_pool_clients_active", **primary) == 2
    assert value(s, "pgrouter_pool_clients_waiting", **primary) == 1
    assert value(s, "pgrouter_pool_servers_active", **primary) == 1
    assert value(s, "pgrouter_pool_servers_idle", **primary) == 1
    assert value(s, "pgrouter_pool_servers_idle", **replica) == 2
    assert value(s, "pgrouter_pool_servers_login", **replica) == 1
    assert value(s, "pgrouter_pool_servers_tested", **replica) == 0
    assert value(s, "pgrouter_pool_size", **report) == 7
    assert 1.5 <= value(s, "pgrouter_pool_max_wait_seconds", **primary) < 2.5
    assert value(s, "pgrouter_pool_max_wait_seconds", **replica) == 0
    assert value(s, "pgrouter_pool_longest_wait_seconds", **report) == 1.0
    assert value(s, "pgrouter_pool_paused", **primary) == 0
    expected = {
        "pgrouter_pool_transactions_total": 20,
        "pgrouter_pool_queries_total": 40,
        "pgrouter_pool_received_bytes_total": 600,
        "pgrouter_pool_sent_bytes_total": 8000,
        "pgrouter_pool_wait_seconds_total": 1.0,
        "pgrouter_pool_waits_total": 2,
        "pgrouter_pool_server_assignments_total": 22,
        "pgrouter_pool_logins_total": 6,
        "pgrouter_pool_server_connects_total": 10,
        "pgrouter_pool_server_connect_failures_total": 2,
    }
    for name, v in expected.items():
        assert value(s, name, **replica) == v, name


def test_process_metrics(busy_proxy: Proxy) -> None:
    s = scrape(busy_proxy)
    assert value(s, "pgrouter_clients_connected") == 4
    assert value(s, "pgrouter_clients_logging_in") == 1
    assert value(s, "pgrouter_auth_failures_total") == 7
    assert value(s, "pgrouter_cancel_requests_total") == 2
    assert value(s, "pgrouter_login_refusals_total") == 3
    assert value(s, "pgrouter_auth_query_lookups_total") == 5
    assert value(s, "pgrouter_auth_query_failures_total") == 1
    assert value(s, "pgrouter_start_time_seconds") == pytest.approx(busy_proxy.started)
    info = [labels for name, labels in s if name == "pgrouter_build_info"]
    assert len(info) == 1
    assert dict(info[0])["version"] == router.__version__


def test_pgbouncer_exporter_pool_names(busy_proxy: Proxy) -> None:
    s = scrape(busy_proxy)
    app = {"database": "appdb", "user": "app"}  # summed over primary and replica
    assert value(s, "pgbouncer_pools_client_active_connections", **app) == 2
    assert value(s, "pgbouncer_pools_client_waiting_connections", **app) == 1
    assert value(s, "pgbouncer_pools_server_active_connections", **app) == 1
    assert value(s, "pgbouncer_pools_server_idle_connections", **app) == 3
    assert value(s, "pgbouncer_pools_server_used_connections", **app) == 0
    assert value(s, "pgbouncer_pools_server_testing_connections", **app) == 0
    assert value(s, "pgbouncer_pools_server_login_connections", **app) == 1
    assert 1.5 <= value(s, "pgbouncer_pools_client_maxwait_seconds", **app) < 2.5
    report = {"database": "sessions", "user": "report"}
    assert value(s, "pgbouncer_pools_client_active_connections", **report) == 0
    pool_series = [labels for name, labels in s if name.startswith("pgbouncer_pools_")]
    assert {frozenset(dict(lb)) for lb in pool_series} == {frozenset({"database", "user"})}


def test_pgbouncer_exporter_stats_names(busy_proxy: Proxy) -> None:
    s = scrape(busy_proxy)
    for prefix in ("pgbouncer_stats_totals", "pgbouncer_stats"):
        appdb = {"database": "appdb"}
        assert value(s, f"{prefix}_queries_pooled_total", **appdb) == 60
        assert value(s, f"{prefix}_queries_total", **appdb) == 60
        assert value(s, f"{prefix}_received_bytes_total", **appdb) == 900
        assert value(s, f"{prefix}_sent_bytes_total", **appdb) == 12000
        assert value(s, f"{prefix}_client_wait_seconds_total", **appdb) == 1.5
        assert value(s, f"{prefix}_sql_transactions_pooled_total", **appdb) == 30
        assert value(s, f"{prefix}_server_assignments_total", **appdb) == 33
        assert value(s, f"{prefix}_sql_transactions_pooled_total", database="sessions") == 40


def test_pgbouncer_exporter_database_list_and_meta_names(busy_proxy: Proxy) -> None:
    busy_proxy.pause("sessions")
    s = scrape(busy_proxy)
    appdb = {
        "name": "appdb", "host": "10.0.0.1", "port": "5432", "database": "appdb",
        "force_user": "", "pool_mode": "transaction",
    }  # fmt: skip
    sessions = {
        "name": "sessions", "host": "10.0.1.1", "port": "6543", "database": "sessions",
        "force_user": "", "pool_mode": "session",
    }  # fmt: skip
    assert value(s, "pgbouncer_databases_pool_size", **appdb) == 20
    assert value(s, "pgbouncer_databases_current_connections", **appdb) == 5
    assert value(s, "pgbouncer_databases_paused", **appdb) == 0
    assert value(s, "pgbouncer_databases_paused", **sessions) == 1
    assert value(s, "pgbouncer_databases_reserve_pool", **sessions) == 0
    assert value(s, "pgbouncer_databases_disabled", **sessions) == 0
    assert value(s, "pgbouncer_up") == 1
    assert value(s, "pgbouncer_version_info", version=f"pgrouter {router.__version__}") == 1
    assert value(s, "pgbouncer_databases") == 2
    assert value(s, "pgbouncer_users") == 3
    assert value(s, "pgbouncer_pools") == 3
    assert value(s, "pgbouncer_used_clients") == 4
    assert value(s, "pgbouncer_login_clients") == 1
    assert value(s, "pgbouncer_used_servers") == 4
    assert value(s, "pgbouncer_config_max_client_connections") == 10000
    assert value(s, "pgrouter_pool_paused", database="sessions", user="report",
                 backend="10.0.1.1:6543") == 1  # fmt: skip


def test_metric_types_and_no_global_registration(busy_proxy: Proxy) -> None:
    text = render(busy_proxy).decode()
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["pgrouter_pool_transactions"] == "counter"
    assert types["pgrouter_pool_clients_active"] == "gauge"
    assert types["pgbouncer_stats_totals_queries_pooled"] == "counter"
    assert types["pgbouncer_pools_client_active_connections"] == "gauge"
    assert not any(n.startswith(("pgrouter_", "pgbouncer_")) for n in _global_names())
    # Collecting twice gives the same families (no state kept between scrapes).
    collector = ProxyCollector(busy_proxy)
    first = Counter(m.name for m in collector.collect())
    assert first == Counter(m.name for m in collector.collect())


def _global_names() -> set[str]:
    return {m.name for m in REGISTRY.collect()}


def test_empty_proxy_renders() -> None:
    s = scrape(make_proxy())
    assert value(s, "pgbouncer_up") == 1
    assert value(s, "pgbouncer_stats_totals_queries_pooled_total", database="appdb") == 0
    assert not [n for n in names(s) if n.startswith("pgrouter_pool_")]


# ---- readiness ---------------------------------------------------------------------------


class FakeListener:
    """Stands for a listening asyncio.Server in proxy.listeners."""


def test_readiness_states() -> None:
    proxy = make_proxy()
    assert readiness(proxy) == (False, "not listening")
    proxy.listeners.append(FakeListener())  # type: ignore[arg-type]
    assert readiness(proxy) == (True, "ready")
    appdb = proxy.config.databases["appdb"]
    primary = proxy.pool_for(appdb, "app")
    primary.last_error = PoolError("08006", "cannot connect")
    ready, reason = readiness(proxy)
    assert not ready
    assert reason == "primary unreachable: appdb (10.0.0.1:5432)"
    # Another user's pool reaching the same primary proves it reachable.
    proxy.pool_for(appdb, "report").idle.append(FakeServer("10.0.0.1", 5432, (1, 1)))  # type: ignore[arg-type]
    assert readiness(proxy) == (True, "ready")
    # A replica failing does not make the proxy unready.
    proxy.pool_for(appdb, "app", appdb.replicas[0]).last_error = PoolError("08006", "x")
    primary.last_error = None
    assert readiness(proxy) == (True, "ready")


# ---- HTTP over a real socket --------------------------------------------------------------


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)  # the server closes: read to EOF
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    assert lines[0].startswith("HTTP/1.1 ")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


def test_http_endpoints() -> None:
    async def main() -> dict[str, Any]:
        proxy = make_proxy()
        proxy.pool_for(proxy.config.databases["appdb"], "app").xact_count = 9
        port = free_port()
        server = await start_http(proxy, "127.0.0.1", port)
        out: dict[str, Any] = {}
        try:
            out["metrics"] = await request(port, get("/metrics"))
            out["healthz"] = await request(port, get("/healthz"))
            out["not_ready"] = await request(port, get("/readyz"))
            await proxy_listening(proxy)
            out["ready"] = await request(port, get("/readyz?verbose=1"))
            primary = proxy.pool_for(proxy.config.databases["sessions"], "report")
            primary.last_error = PoolError("08006", "refused")
            out["primary_down"] = await request(port, get("/readyz"))
            out["missing"] = await request(port, get("/nope"))
            out["post"] = await request(port, get("/metrics", "POST"))
            out["head"] = await request(port, get("/healthz", "HEAD"))
            out["garbage"] = await request(port, b"hello\r\n\r\n")
            out["huge"] = await request(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000)
        finally:
            server.close()
            await server.wait_closed()
            for listener in proxy.listeners:
                listener.close()
        return out

    async def proxy_listening(proxy: Proxy) -> None:
        listener = await asyncio.get_running_loop().create_server(
            asyncio.Protocol, "127.0.0.1", free_port()
        )
        proxy.listeners.append(listener)

    out = asyncio.run(main())

    status, headers, body = out["metrics"]
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"pgrouter_pool_transactions", "pgbouncer_up"} <= families
    assert b'pgrouter_pool_transactions_total{backend="10.0.0.1:5432"' in body

    assert out["healthz"][0] == 200 and out["healthz"][2] == b"ok\n"
    assert out["not_ready"][0] == 503 and out["not_ready"][2] == b"not listening\n"
    assert out["ready"][0] == 200 and out["ready"][2] == b"ready\n"
    status, _, body = out["primary_down"]
    assert status == 503
    assert body == b"primary unreachable: sessions (10.0.1.1:6543)\n"
    assert out["missing"][0] == 404
    status, headers, _ = out["post"]
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, headers, body = out["head"]
    assert (status, body, headers["content-length"]) == (200, b"", "3")
    assert out["garbage"][0] == 400
    assert out["huge"][0] == 431


def test_http_listener_survives_a_silent_client() -> None:
    """A client that connects and says nothing does not block others."""

    async def main() -> int:
        proxy = Proxy(parse_config(TOPOLOGY, env={}))
        port = free_port()
        server = await start_http(proxy, "127.0.0.1", port)
        try:
            _, silent = await asyncio.open_connection("127.0.0.1", port)
            started = time.monotonic()
            status, _, _ = await request(port, get("/healthz"))
            assert time.monotonic() - started < 2
            silent.close()
            return status
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) == 200
