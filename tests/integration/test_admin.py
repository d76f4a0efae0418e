"""The admin console and the HTTP endpoints of a running pgrouter, used as operators do:
psql against the virtual database, curl-like GETs against admin.http."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import APP_PASSWORD, APP_USER, free_port

ADMIN = {"admin": {"users": [APP_USER]}}


def psql(
    proxy: Any, sql: str, dbname: str = "pgrouter", user: str = APP_USER
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PGPASSWORD=APP_PASSWORD, PGSSLMODE="disable")
    return subprocess.run(
        ["psql", "-X", "-h", proxy.host, "-p", str(proxy.port), "-U", user, "-d", dbname,
         "-A", "-F", "|", "-c", sql],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_show_pools_counts_a_running_transaction(proxy_factory: Any) -> None:
    proxy = proxy_factory(ADMIN)
    with psycopg.connect(proxy.dsn(), prepare_threshold=None) as conn:
        conn.execute("SELECT 1")
        with conn.transaction():
            conn.execute("SELECT 1")
            out = psql(proxy, "SHOW POOLS")
            assert out.returncode == 0, out.stderr
            header, *rows = out.stdout.strip().splitlines()
            assert header.startswith("database|user|cl_active|cl_waiting")
            appdb = [r.split("|") for r in rows if r.startswith("appdb|app|")]
            assert appdb, out.stdout
            cols = header.split("|")
            row = dict(zip(cols, appdb[0], strict=False))
            assert row["sv_active"] == "1" and row["cl_active"] == "1"
            assert row["pool_mode"] == "transaction"


def test_show_stats_and_databases(proxy_factory: Any) -> None:
    proxy = proxy_factory(ADMIN)
    with psycopg.connect(proxy.dsn(), prepare_threshold=None, autocommit=True) as conn:
        for _ in range(5):
            conn.execute("SELECT 1")
    stats = psql(proxy, "SHOW STATS")
    assert stats.returncode == 0, stats.stderr
    header, *rows = stats.stdout.strip().splitlines()
    cols = header.split("|")
    assert cols[:3] == ["database", "total_server_assignment_count", "total_xact_count"]
    row = dict(zip(cols, next(r for r in rows if r.startswith("appdb|")).split("|"), strict=False))
    assert int(row["total_xact_count"]) >= 5
    assert int(row["total_query_count"]) >= 5
    dbs = psql(proxy, "SHOW DATABASES")
    assert "appdb|" in dbs.stdout and "otherdb|" in dbs.stdout


def test_non_admin_user_is_refused(proxy_factory: Any) -> None:
    proxy = proxy_factory({"admin": {"users": ["somebody_else"]}})
    out = psql(proxy, "SHOW POOLS")
    assert out.returncode != 0
    assert "admin console is for admin users only" in out.stderr
    assert "database|user" not in out.stdout


def test_unknown_command_keeps_the_console_usable(proxy_factory: Any) -> None:
    proxy = proxy_factory(ADMIN)
    out = psql(proxy, "SHOW NONSENSE")
    assert out.returncode != 0 and "SHOW HELP" in out.stderr
    assert psql(proxy, "SHOW VERSION").returncode == 0


def test_pause_holds_new_transactions_until_resume(proxy_factory: Any) -> None:
    proxy = proxy_factory(ADMIN)
    with psycopg.connect(proxy.dsn(), prepare_threshold=None, autocommit=True) as conn:
        conn.execute("SELECT 1")
        assert psql(proxy, "PAUSE appdb").returncode == 0
        done = threading.Event()

        def query() -> None:
            conn.execute("SELECT 1")
            done.set()

        worker = threading.Thread(target=query)
        worker.start()
        assert not done.wait(1.0), "a transaction ran while the database was paused"
        assert psql(proxy, "RESUME appdb").returncode == 0
        assert done.wait(5.0)
        worker.join()


def test_pause_waits_for_running_transactions(proxy_factory: Any) -> None:
    """PAUSE answers only when the transaction running on the database has ended; what starts
    meanwhile waits for RESUME."""
    proxy = proxy_factory(ADMIN)
    with psycopg.connect(proxy.dsn(), prepare_threshold=None) as running:
        running.execute("SELECT 1")  # a transaction is open (psycopg is not in autocommit)
        paused = threading.Event()

        def pause() -> None:
            assert psql(proxy, "PAUSE appdb").returncode == 0
            paused.set()

        admin = threading.Thread(target=pause)
        admin.start()
        assert not paused.wait(1.0), "PAUSE answered while a transaction was running"
        running.execute("SELECT 2")  # the running transaction goes on
        running.commit()
        assert paused.wait(5.0), "PAUSE did not answer once the transaction ended"
        admin.join()
        with psycopg.connect(proxy.dsn(), prepare_threshold=None, autocommit=True) as late:
            done = threading.Event()
            worker = threading.Thread(target=lambda: (late.execute("SELECT 1"), done.set()))
            worker.start()
            assert not done.wait(0.5), "a new transaction ran while paused"
            assert psql(proxy, "RESUME appdb").returncode == 0
            assert done.wait(5.0)
            worker.join()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.timeout(60)
def test_metrics_health_and_readiness(proxy_factory: Any) -> None:
    http_port = free_port()
    proxy = proxy_factory({"admin": {"users": [APP_USER], "http": f"127.0.0.1:{http_port}"}})
    base = f"http://127.0.0.1:{http_port}"
    with psycopg.connect(proxy.dsn(), prepare_threshold=None, autocommit=True) as conn:
        for _ in range(3):
            conn.execute("SELECT 1")
    assert _get(base + "/healthz")[0] == 200
    assert _get(base + "/readyz")[0] == 200
    status, text = _get(base + "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "pgbouncer_pools_server_idle_connections" in families
    xacts = [
        s.value
        for s in families["pgrouter_pool_transactions"].samples
        if s.labels.get("database") == "appdb" and s.name.endswith("_total")
    ]
    assert xacts and sum(xacts) >= 3
    assert _get(base + "/nope")[0] == 404


def test_errors_by_sqlstate_class_in_metrics(proxy_factory: Any) -> None:
    """Server errors are counted by SQLSTATE class and database; pgrouter's own by class."""
    http_port = free_port()
    proxy = proxy_factory({"admin": {"users": [APP_USER], "http": f"127.0.0.1:{http_port}"}})
    with psycopg.connect(proxy.dsn(), prepare_threshold=None, autocommit=True) as conn:
        for _ in range(3):
            with pytest.raises(psycopg.errors.DivisionByZero):
                conn.execute("SELECT 1 / 0")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table_here")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(dbname="no_such_db"), connect_timeout=5)
    status, text = _get(f"http://127.0.0.1:{http_port}/metrics")
    assert status == 200
    errors = {
        (s.labels["database"], s.labels["source"], s.labels["class"]): s.value
        for f in text_string_to_metric_families(text)
        if f.name == "pgrouter_errors"
        for s in f.samples
        if s.name == "pgrouter_errors_total"
    }
    assert errors.get(("appdb", "server", "22")) == 3, errors  # division_by_zero: 22012
    assert errors.get(("appdb", "server", "42")) == 1, errors  # undefined_table: 42P01
    assert errors.get(("", "pgrouter", "3D")) == 1, errors  # invalid_catalog_name: 3D000


@pytest.mark.timeout(60)
def test_backends_show_roles_positions_and_lag(proxy_factory: Any, cluster: Any) -> None:
    """The monitors find the real roles and WAL positions; a held-back replica shows lag."""
    http_port = free_port()
    proxy = proxy_factory({"admin": {"users": [APP_USER], "http": f"127.0.0.1:{http_port}"}})
    replica = cluster.replicas[0]
    replica.sql("SELECT pg_wal_replay_pause()")
    try:
        cluster.primary.sql("CREATE TABLE IF NOT EXISTS lag_probe (x int)", dbname="appdb")
        cluster.primary.sql(
            "INSERT INTO lag_probe SELECT generate_series(1, 20000)", dbname="appdb"
        )
        deadline = time.monotonic() + 10
        while True:
            out = psql(proxy, "SHOW BACKENDS")
            rows = [r.split("|") for r in out.stdout.strip().splitlines()[1:-1]]
            appdb = {int(r[2]): r for r in rows if r[0] == "appdb"}
            lagging = appdb.get(replica.port)
            if lagging and lagging[5] and int(lagging[5]) > 0:
                break
            assert time.monotonic() < deadline, out.stdout
            time.sleep(0.2)
        assert appdb[cluster.primary.port][3:5] == ["primary", "up"]
        assert all(appdb[r.port][3:5] == ["replica", "up"] for r in cluster.replicas)
        assert "/" in appdb[cluster.primary.port][7]  # an LSN like 0/3000148
        status, text = _get(f"http://127.0.0.1:{http_port}/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        lag = {s.labels["backend"]: s.value for s in families["pgrouter_backend_lag_bytes"].samples}
        assert lag[f"{replica.host}:{replica.port}"] > 0
    finally:
        replica.sql("SELECT pg_wal_replay_resume()")
        cluster.primary.sql("DROP TABLE IF EXISTS lag_probe", dbname="appdb")


@pytest.mark.timeout(60)
def test_routing_decisions_and_classifier_in_metrics(proxy_factory: Any) -> None:
    http_port = free_port()
    proxy = proxy_factory(
        {
            "admin": {"users": [APP_USER], "http": f"127.0.0.1:{http_port}"},
            "databases": {"appdb": {"routing": {"reads": "replicas"}}},
        }
    )
    url = f"http://127.0.0.1:{http_port}/metrics"

    def samples() -> dict[tuple[str, str], float]:
        families = {f.name: f for f in text_string_to_metric_families(_get(url)[1])}
        out = {}
        for family in ("pgrouter_routed_transactions", "pgrouter_classifier_cache"):
            for s in families[family].samples:
                if s.name.endswith("_total") and s.labels["database"] == "appdb":
                    out[(family, s.labels.get("target") or s.labels["result"])] = s.value
        return out

    deadline = time.monotonic() + 10
    with psycopg.connect(proxy.dsn(), prepare_threshold=None, autocommit=True) as conn:
        while samples().get(("pgrouter_routed_transactions", "replica"), 0) < 5:
            assert time.monotonic() < deadline, samples()
            conn.execute("SELECT 1")
            time.sleep(0.05)
        conn.execute("SELECT pg_advisory_lock(1), pg_advisory_unlock(1)")  # a writer: primary
    got = samples()
    routes = psql(proxy, "SHOW ROUTES")
    assert routes.returncode == 0, routes.stderr
    header, *lines = routes.stdout.strip().splitlines()[:-1]
    assert header == "database|target|reason|transactions"
    table = {tuple(r.split("|")[:3]): int(r.split("|")[3]) for r in lines}
    assert table[("appdb", "replica", "read_only")] >= 5
    assert table[("appdb", "primary", "write_or_unproven")] >= 1
    assert got[("pgrouter_routed_transactions", "primary")] >= 1
    assert got[("pgrouter_classifier_cache", "hit")] >= 4  # "SELECT 1" parsed once
    assert got[("pgrouter_classifier_cache", "miss")] >= 2


def _stats_row(proxy: Any, database: str = "appdb") -> dict[str, int]:
    out = psql(proxy, "SHOW STATS")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.strip().splitlines()
    row = next(r for r in rows if r.startswith(f"{database}|")).split("|")
    return {k: int(v) for k, v in zip(header.split("|")[1:], row[1:], strict=True)}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_transaction_and_query_times(proxy_factory: Any, pool_mode: str) -> None:
    """SHOW STATS and /metrics sum the time servers spend in transactions and in queries
    (PgBouncer's xact_time and query_time, in µs): a client's pause inside a transaction
    counts as transaction time, never as query time."""
    http_port = free_port()
    proxy = proxy_factory(
        {"admin": {"users": [APP_USER], "http": f"127.0.0.1:{http_port}"}},
        pool_mode=pool_mode,
    )
    sleep, pause = 0.2, 0.5
    started = time.monotonic()
    with psycopg.connect(proxy.dsn(), prepare_threshold=None, autocommit=True) as conn:
        for _ in range(3):
            conn.execute(f"SELECT pg_sleep({sleep})")
        with conn.transaction():
            conn.execute(f"SELECT pg_sleep({sleep})")
            time.sleep(pause)  # the server waits, linked to this client's transaction
            conn.execute("SELECT 1")
    elapsed = time.monotonic() - started

    stats = _stats_row(proxy)
    xact_s, query_s = stats["total_xact_time"] / 1e6, stats["total_query_time"] / 1e6
    # Four transactions, four pg_sleep queries; the pause is transaction time only.
    assert 4 * sleep + pause <= xact_s <= elapsed, stats
    assert 4 * sleep <= query_s <= elapsed - pause, stats
    assert query_s < xact_s - pause * 0.9, stats
    if pool_mode == "transaction":  # session mode releases (counts) its server only at the end
        assert stats["total_xact_count"] == 4, stats
        assert stats["avg_xact_time"] == stats["total_xact_time"] // 4, stats
    queries = stats["total_query_count"]
    assert queries >= 6, stats  # BEGIN, COMMIT and the five statements, however sent
    assert stats["avg_query_time"] == stats["total_query_time"] // queries, stats

    families = {
        f.name: f
        for f in text_string_to_metric_families(_get(f"http://127.0.0.1:{http_port}/metrics")[1])
    }

    def metric(name: str, **labels: str) -> float:
        return sum(
            s.value
            for s in families[name].samples
            if s.name.endswith("_total") and labels.items() <= s.labels.items()
        )

    for name, seconds in (
        ("pgbouncer_stats_totals_server_in_transaction_seconds", xact_s),
        ("pgbouncer_stats_totals_queries_duration_seconds", query_s),
        ("pgbouncer_stats_server_in_transaction_seconds", xact_s),
        ("pgbouncer_stats_queries_duration_seconds", query_s),
        ("pgrouter_pool_transaction_seconds", xact_s),
        ("pgrouter_pool_query_seconds", query_s),
    ):
        # SHOW STATS rounds down to µs; no traffic ran between the two reads
        assert metric(name, database="appdb") == pytest.approx(seconds, abs=1e-5), name
