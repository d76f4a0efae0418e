"""Real drivers and tools through the proxy: psql, pgbench, asyncpg, psycopg pipelines, cancel."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.support import APP_PASSWORD, APP_USER

pytestmark = pytest.mark.timeout(120)


def client_env(**extra: str) -> dict[str, str]:
    """The environment for libpq tools: no stray PG* variables, the app password."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = APP_PASSWORD
    env.update(extra)
    return env


def psql(
    proxy: Any, *args: str, dbname: str = "appdb", cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = ["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-h", proxy.host, "-p", str(proxy.port)]
    out = subprocess.run(
        [*cmd, "-U", APP_USER, "-d", dbname, *args],
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )
    if check:
        assert out.returncode == 0, f"psql failed ({out.returncode}): {out.stderr}"
    return out


def connect(proxy: Any, dbname: str = "appdb", **kw: Any) -> psycopg.Connection[Any]:
    kw.setdefault("prepare_threshold", None)  # named prepared statements are issue 5
    kw.setdefault("connect_timeout", 10)
    return psycopg.connect(proxy.dsn(dbname), **kw)


@pytest.fixture
def table(cluster: Any) -> Iterator[str]:
    """A fresh table name in appdb, dropped afterwards (created by the test)."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    yield name
    cluster.primary.sql(f"DROP TABLE IF EXISTS {name}", dbname="appdb")


# ---- psql ------------------------------------------------------------------------------------


def test_psql_query_returns_rows(proxy_factory: Any) -> None:
    proxy = proxy_factory()
    out = psql(proxy, "-c", "SELECT g, g * g, 'r' || g FROM generate_series(1, 5) AS g")
    assert out.stdout.splitlines() == [f"{g}|{g * g}|r{g}" for g in range(1, 6)]
    out = psql(proxy, "-c", "SELECT current_database(), current_user", dbname="otherdb")
    assert out.stdout.strip() == "otherdb|app"


def test_psql_multiple_statements(cluster: Any, proxy_factory: Any, table: str) -> None:
    proxy = proxy_factory(pool_size=2)
    out = psql(
        proxy,
        "-c",
        f"CREATE TABLE {table} (id int PRIMARY KEY, v text); "
        f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two'); "
        f"SELECT count(*) FROM {table}; SELECT 'second result'",
        "-c",
        f"INSERT INTO {table} VALUES (3, 'three')",
        "-c",
        f"SELECT string_agg(v, ',' ORDER BY id) FROM {table}",
    )
    assert out.stdout.splitlines() == ["2", "second result", "one,two,three"]
    # an error in a multi-statement query rolls the whole query back, as on a server
    bad = psql(proxy, "-c", f"INSERT INTO {table} VALUES (4, 'four'); SELECT 1/0", check=False)
    assert bad.returncode != 0 and "division by zero" in bad.stderr
    assert cluster.primary.sql(f"SELECT count(*) FROM {table}", dbname="appdb") == "3"
    assert psql(proxy, "-c", "SELECT 'still fine'").stdout.strip() == "still fine"


def test_psql_copy_both_ways(cluster: Any, proxy_factory: Any, table: str, tmp_path: Path) -> None:
    proxy = proxy_factory()
    rows = [f'{i},"text, with ""quotes"" {i}",{i}.25' for i in range(1, 5001)]
    rows.append('5001,"two\nlines ✓",0')
    source = tmp_path / "in.csv"
    source.write_text("\n".join(rows) + "\n")
    psql(proxy, "-c", f"CREATE TABLE {table} (id int PRIMARY KEY, v text, f numeric)")
    psql(proxy, "-c", f"\\copy {table} FROM 'in.csv' WITH (FORMAT csv)", cwd=tmp_path)
    assert cluster.primary.sql(f"SELECT count(*), sum(id) FROM {table}", dbname="appdb") == (
        f"5001|{5001 * 5002 // 2}"
    )
    psql(
        proxy,
        "-c",
        f"\\copy (SELECT * FROM {table} ORDER BY id) TO 'out.csv' WITH (FORMAT csv)",
        cwd=tmp_path,
    )
    assert (tmp_path / "out.csv").read_text() == source.read_text()
    assert psql(proxy, "-c", f"SELECT v FROM {table} WHERE id = 5001").stdout == "two\nlines ✓\n"


# ---- pgbench ---------------------------------------------------------------------------------


def pgbench(proxy: Any, *args: str, timeout: float = 60) -> str:
    out = subprocess.run(
        ["pgbench", "-h", proxy.host, "-p", str(proxy.port), "-U", APP_USER, *args, "appdb"],
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, f"pgbench {args} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def assert_clean_run(output: str) -> int:
    processed = re.search(r"number of transactions actually processed: (\d+)", output)
    assert processed, output
    assert int(processed.group(1)) > 0, output
    assert re.search(r"number of failed transactions: 0 \(", output), output
    return int(processed.group(1))


@pytest.fixture
def pgbench_proxy(proxy_factory: Any) -> Any:
    proxy = proxy_factory(pool_size=10)
    pgbench(proxy, "-i", "-q", "-s", "1")
    return proxy


def test_pgbench_tpcb_through_the_proxy(cluster: Any, pgbench_proxy: Any) -> None:
    history_before = int(cluster.primary.sql("SELECT count(*) FROM pgbench_history", "appdb"))
    assert history_before == 0
    done = assert_clean_run(pgbench(pgbench_proxy, "-T", "3", "-c", "20", "-j", "2"))
    # every committed TPC-B transaction left its history row and balanced the books
    counts = cluster.primary.sql(
        "SELECT (SELECT count(*) FROM pgbench_history) || '|' || "
        "(SELECT sum(abalance) FROM pgbench_accounts) || '|' || "
        "(SELECT sum(bbalance) FROM pgbench_branches) || '|' || "
        "(SELECT sum(delta) FROM pgbench_history)",
        "appdb",
    ).split("|")
    assert int(counts[0]) == done
    assert counts[1] == counts[2] == counts[3]


def test_pgbench_select_only_simple_and_extended(pgbench_proxy: Any) -> None:
    assert_clean_run(pgbench(pgbench_proxy, "-S", "-T", "3", "-c", "20", "-j", "2"))
    assert_clean_run(pgbench(pgbench_proxy, "-S", "-M", "extended", "-T", "2", "-c", "20"))


# ---- asyncpg ---------------------------------------------------------------------------------


def test_asyncpg_concurrent_clients_on_a_small_pool(proxy_factory: Any, table: str) -> None:
    proxy = proxy_factory(pool_size=2)
    clients, rounds = 10, 15

    async def client(i: int) -> None:
        conn = await asyncpg.connect(
            host=proxy.host,
            port=proxy.port,
            user=APP_USER,
            password=APP_PASSWORD,
            database="appdb",
            statement_cache_size=0,
        )
        try:
            for r in range(rounds):
                assert await conn.fetchval("SELECT $1::int * $2::int", i, r) == i * r
                rows = await conn.fetch(
                    "SELECT g, $2::text || g FROM generate_series(1, $1) g", r, f"c{i}-"
                )
                assert [tuple(row) for row in rows] == [(g, f"c{i}-{g}") for g in range(1, r + 1)]
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", i, r)
                    n = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE client = $1", i)
                    assert n == r + 1
            await conn.executemany(
                f"INSERT INTO {table} VALUES ($1, $2)", [(i, 100 + k) for k in range(5)]
            )
        finally:
            await conn.close()

    async def main() -> None:
        setup = await asyncpg.connect(_url(proxy))
        try:
            await setup.execute(
                f"CREATE TABLE {table} (client int, r int, PRIMARY KEY (client, r))"
            )
        finally:
            await setup.close()
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), 60)
        check = await asyncpg.connect(_url(proxy), statement_cache_size=0)
        try:
            got = await check.fetch(f"SELECT client, count(*) FROM {table} GROUP BY 1 ORDER BY 1")
        finally:
            await check.close()
        assert [tuple(r) for r in got] == [(i, rounds + 5) for i in range(clients)]

    asyncio.run(main())


def _url(proxy: Any, dbname: str = "appdb") -> str:
    return f"postgresql://{APP_USER}:{APP_PASSWORD}@{proxy.host}:{proxy.port}/{dbname}"


def test_asyncpg_default_settings_single_client_pool_size_1(proxy_factory: Any) -> None:
    """Named statements from asyncpg's cache work while one client always has the one server."""
    proxy = proxy_factory(pool_size=1)

    async def main() -> None:
        conn = await asyncpg.connect(_url(proxy))
        try:
            for i in range(20):
                assert await conn.fetchval("SELECT $1::int + 1", i) == i + 1
                row = await conn.fetchrow("SELECT $1::text AS t, $2::float8 AS f", f"v{i}", i / 2)
                assert row is not None and (row["t"], row["f"]) == (f"v{i}", i / 2)
                async with conn.transaction():
                    vals = await conn.fetch("SELECT x FROM unnest($1::int[]) AS x", [i, i + 1])
                    assert [r["x"] for r in vals] == [i, i + 1]
            stmt = await conn.prepare("SELECT $1::int * 3")
            assert [await stmt.fetchval(k) for k in range(5)] == [0, 3, 6, 9, 12]
        finally:
            await conn.close()

    asyncio.run(main())


# ---- psycopg pipeline mode -------------------------------------------------------------------


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "transaction"])
def test_psycopg_pipeline_mode(proxy_factory: Any, table: str, autocommit: bool) -> None:
    proxy = proxy_factory(pool_size=1)
    with connect(proxy, autocommit=autocommit) as conn, connect(proxy) as other:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (id int PRIMARY KEY, v text)")
        conn.commit()
        with conn.pipeline() as pipe:
            cursors = []
            for i in range(10):
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, f"v{i}"))
                cursors.append(conn.execute("SELECT %s::int * 10, pg_backend_pid()", (i,)))
            pipe.sync()
            total = conn.execute(f"SELECT count(*), string_agg(v, ',' ORDER BY id) FROM {table}")
        results = [c.fetchone() for c in cursors]
        assert [r[0] for r in results if r] == [i * 10 for i in range(10)]
        assert total.fetchone() == (10, ",".join(f"v{i}" for i in range(10)))
        conn.commit()
        # a second client shares the single server once the pipeline is done
        assert other.execute(f"SELECT count(*) FROM {table}").fetchone() == (10,)
        other.commit()
        # an error inside a pipeline aborts the rest of that sync block only
        with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline():
            conn.execute(f"INSERT INTO {table} VALUES (%s, 'dup')", (1,))
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)
        conn.commit()


# ---- cancel ----------------------------------------------------------------------------------


def test_cancel_a_running_query(proxy_factory: Any) -> None:
    proxy = proxy_factory(pool_size=2)
    with connect(proxy, autocommit=True) as conn, connect(proxy, autocommit=True) as bystander:
        timer = threading.Timer(0.5, conn.cancel)
        started = time.monotonic()
        timer.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled) as excinfo:
                conn.execute("SELECT pg_sleep(30)")
        finally:
            timer.cancel()
        elapsed = time.monotonic() - started
        assert excinfo.value.sqlstate == "57014"
        assert "user request" in str(excinfo.value)
        assert elapsed < 2.5, f"cancel took {elapsed:.2f}s"
        assert conn.execute("SELECT 'after cancel'").fetchone() == ("after cancel",)
        assert bystander.execute("SELECT 'bystander'").fetchone() == ("bystander",)


def _send_cancel_request(proxy: Any, pid: int, secret: int) -> None:
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as s:
        s.sendall(struct.pack("!IIII", 16, 80877102, pid, secret))
        s.settimeout(5)
        assert s.recv(1) == b""  # answered by closing the connection


def test_cancel_with_unknown_or_stale_keys_is_ignored(proxy_factory: Any) -> None:
    proxy = proxy_factory(pool_size=2)
    with connect(proxy, autocommit=True) as conn, connect(proxy, autocommit=True) as sleeper:
        # a cancel for a connection whose query has finished (no server linked): nothing breaks
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.cancel()
        time.sleep(0.2)
        assert conn.execute("SELECT 2").fetchone() == (2,)

        # unknown keys, and the right pid with a wrong secret, while a query runs
        result: list[Any] = []

        def sleep() -> None:
            result.append(sleeper.execute("SELECT pg_sleep(1), 'slept'").fetchone())

        thread = threading.Thread(target=sleep)
        thread.start()
        time.sleep(0.3)
        key_pid = sleeper.info.backend_pid
        _send_cancel_request(proxy, secrets.randbits(31) or 1, secrets.randbits(32))
        _send_cancel_request(proxy, key_pid, secrets.randbits(32))
        thread.join(10)
        assert result == [("", "slept")]
        assert conn.execute("SELECT 3").fetchone() == (3,)
    assert "Traceback" not in proxy.log_text()
