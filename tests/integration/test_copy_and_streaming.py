"""COPY both ways and large results through the proxy, with the proxy's memory watched."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.support import APP_PASSWORD, APP_USER

pytestmark = pytest.mark.timeout(120)

BIG_ROWS = 100_000
BIG_WIDTH = 1000  # 100 MB of row data in all
BIG_SELECT = f"SELECT repeat('x', {BIG_WIDTH}) FROM generate_series(1, {BIG_ROWS})"
RSS_GROWTH_LIMIT_KB = 10 * 1024


def connect(proxy: Any, dbname: str = "appdb", **kw: Any) -> psycopg.Connection[Any]:
    kw.setdefault("prepare_threshold", None)  # named prepared statements are issue 5
    kw.setdefault("connect_timeout", 10)
    return psycopg.connect(proxy.dsn(dbname), **kw)


@pytest.fixture
def table(cluster: Any) -> Iterator[str]:
    name = f"copy_{uuid.uuid4().hex[:8]}"
    cluster.primary.sql(
        f"CREATE TABLE {name} (id int PRIMARY KEY, v text NOT NULL);"
        f"GRANT ALL ON {name} TO {APP_USER};",
        dbname="appdb",
    )
    yield name
    cluster.primary.sql(f"DROP TABLE IF EXISTS {name}", dbname="appdb")


def copy_text(n: int) -> bytes:
    return "".join(f"{i}\trow {i} \\\\ tab\\there ✓\n" for i in range(n)).encode()


# ---- COPY ------------------------------------------------------------------------------------


def test_copy_in_and_out_100k_rows(cluster: Any, proxy_factory: Any, table: str) -> None:
    proxy = proxy_factory(pool_size=1)
    data = copy_text(100_000)
    with connect(proxy) as conn:
        with conn.cursor() as cur:
            with cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy:
                for start in range(0, len(data), 64 * 1024):
                    copy.write(data[start : start + 64 * 1024])
            assert cur.rowcount == 100_000
        conn.commit()
        assert cluster.primary.sql(f"SELECT count(*) FROM {table}", dbname="appdb") == "100000"
        assert cluster.primary.sql(f"SELECT v FROM {table} WHERE id = 99999", dbname="appdb") == (
            "row 99999 \\ tab\there ✓"
        )

        out = bytearray()
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY (SELECT id, v FROM {table} ORDER BY id) TO STDOUT") as copy,
        ):
            for block in copy:
                out += block
        conn.commit()
        assert out.count(b"\n") == 100_000
        assert hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()

        # rows as Python values through the same path
        with conn.cursor() as cur, cur.copy(f"COPY {table} (id, v) TO STDOUT") as copy:
            copy.set_types(["int4", "text"])
            n = sum(1 for _ in copy.rows())
        assert n == 100_000
        conn.commit()


def test_copy_with_bad_data_fails_and_the_connection_stays_usable(
    proxy_factory: Any, table: str
) -> None:
    proxy = proxy_factory(pool_size=1)
    with connect(proxy, autocommit=True) as conn, connect(proxy, autocommit=True) as other:
        with (
            pytest.raises(psycopg.errors.InvalidTextRepresentation),
            conn.cursor() as cur,
            cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy,
        ):
            copy.write(copy_text(1000))
            copy.write(b"not-a-number\tbad row\n")
            copy.write(b"5000\tafter the bad row\n")
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        # pool_size 1: the other client gets the server, so it went back to the pool
        assert other.execute("SELECT 'served'").fetchone() == ("served",)

        # the client aborts a COPY itself (CopyFail)
        with (
            pytest.raises(ZeroDivisionError),
            conn.cursor() as cur,
            cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy,
        ):
            copy.write(copy_text(100))
            raise ZeroDivisionError("client gave up")
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        assert other.execute("SELECT 'served again'").fetchone() == ("served again",)

        # COPY to a table that does not exist: refused before any data moves
        with (
            pytest.raises(psycopg.errors.UndefinedTable),
            conn.cursor() as cur,
            cur.copy("COPY no_such_table FROM STDIN") as copy,
        ):
            copy.write(b"1\n")
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)

        # and a good COPY afterwards
        with conn.cursor() as cur, cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy:
            copy.write(copy_text(10))
        assert other.execute(f"SELECT count(*) FROM {table}").fetchone() == (10,)


def test_copy_inside_a_transaction_rolls_back(proxy_factory: Any, table: str) -> None:
    proxy = proxy_factory(pool_size=1)
    with connect(proxy) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (-1, 'before copy')")
        with conn.cursor() as cur, cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy:
            copy.write(copy_text(500))
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (501,)
        conn.rollback()
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        conn.commit()


# ---- large results and the proxy's memory ----------------------------------------------------


class RssSampler(threading.Thread):
    def __init__(self, proxy: Any) -> None:
        super().__init__(daemon=True)
        self.proxy = proxy
        self.peak = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self.proxy.rss_kb())
            self.samples += 1
            time.sleep(0.02)

    def finish(self) -> int:
        self._stop_event.set()
        self.join(5)
        return self.peak


def _baseline(proxy: Any) -> int:
    """RSS after the pool and a client are warmed up with a modest result."""
    with connect(proxy, autocommit=True) as conn:
        for _ in range(3):
            rows = conn.execute(
                f"SELECT repeat('x', {BIG_WIDTH}) FROM generate_series(1, 2000)"
            ).fetchall()
            assert len(rows) == 2000
    time.sleep(0.2)
    return max(proxy.rss_kb() for _ in range(3))


def _psql_stream(proxy: Any, sql: str) -> tuple[int, int]:
    """Run sql with psql, reading its stdout as it comes; return (bytes, newlines)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = APP_PASSWORD
    cmd = ["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-h", proxy.host, "-p", str(proxy.port)]
    proc = subprocess.Popen(
        [*cmd, "-U", APP_USER, "-d", "appdb", "-c", sql],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    total = lines = 0
    while block := proc.stdout.read(1 << 20):
        total += len(block)
        lines += block.count(b"\n")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode(errors="replace")
    return total, lines


@pytest.mark.parametrize(
    "sql",
    [BIG_SELECT, f"COPY ({BIG_SELECT}) TO STDOUT"],
    ids=["select", "copy-to-stdout"],
)
def test_100mb_result_through_psql_keeps_proxy_memory_flat(proxy_factory: Any, sql: str) -> None:
    proxy = proxy_factory(pool_size=2)
    before = _baseline(proxy)
    sampler = RssSampler(proxy)
    sampler.start()
    try:
        total, lines = _psql_stream(proxy, sql)
    finally:
        peak = sampler.finish()
    assert lines == BIG_ROWS
    assert total == BIG_ROWS * (BIG_WIDTH + 1)
    assert sampler.samples >= 5
    growth = peak - before
    assert growth <= RSS_GROWTH_LIMIT_KB, f"proxy RSS grew by {growth} kB ({before} -> {peak})"


def test_100mb_result_to_a_slow_reader_keeps_proxy_memory_flat(proxy_factory: Any) -> None:
    """The client reads slower than the server sends: the proxy must push back, not buffer."""
    proxy = proxy_factory(pool_size=2)
    before = _baseline(proxy)
    sampler = RssSampler(proxy)
    sampler.start()
    rows = size = 0
    try:
        with connect(proxy, autocommit=True) as conn, conn.cursor() as cur:
            for (value,) in cur.stream(BIG_SELECT):
                rows += 1
                size += len(value)
                if rows % 2000 == 0:
                    time.sleep(0.02)  # about a second of stalls in all
            # the server went back to the pool and still works
            assert conn.execute("SELECT 'after'").fetchone() == ("after",)
    finally:
        peak = sampler.finish()
    assert rows == BIG_ROWS and size == BIG_ROWS * BIG_WIDTH
    growth = peak - before
    assert growth <= RSS_GROWTH_LIMIT_KB, f"proxy RSS grew by {growth} kB ({before} -> {peak})"
