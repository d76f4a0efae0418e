"""Prepared statements in transaction mode (DESIGN "Routing rules", session state).

Protocol-level named statements are tracked per client and prepared on whichever server
(primary or replica) serves the client's next transaction; a client's names are its own
(duplicates get 42P05, unknown names 26000, and neither costs the connection); Close,
DEALLOCATE, DEALLOCATE ALL and DISCARD ALL free names; `max_prepared_statements` bounds the
statements kept per server connection (0: names pass through untouched). SQL-level
PREPARE/EXECUTE pins the client to its server until DEALLOCATE. Real drivers with their
defaults (asyncpg's statement cache, psycopg's prepare_threshold=0 and pipelines, SQLAlchemy's
asyncpg dialect, pgbench -M prepared/extended) run many clients over few servers with reads
routed to the replicas, and a statement survives a schema change under it.

`Raw` drives libpq's own calls (psycopg.pq), so statement names are exactly the test's, with
no driver cache in between. Servers are told apart by pg_backend_pid(); a client is moved to
another server by having other clients hold servers in open transactions (see
test_session_state.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import pq

from tests.integration.test_session_state import show_pins
from tests.support import APP_PASSWORD, APP_USER, ProxyProcess, deep_merge, wait_replica_reads

pytestmark = pytest.mark.timeout(120)

ADMIN = {"admin": {"users": [APP_USER]}}
ROUTED = {"databases": {"appdb": {"routing": {"reads": "replicas"}}}}

_SUFFIX = uuid.uuid4().hex[:8]
MOOD = f"pr_mood_{_SUFFIX}"  # enum ('sad', 'ok', 'happy')
PAIR = f"pr_pair_{_SUFFIX}"  # composite (a int, b text)
DRV = f"pr_drv_{_SUFFIX}"  # asyncpg clients' rows (enum, composite and array columns)
RT = f"pr_rt_{_SUFFIX}"  # psycopg clients' rows
SA = f"pr_sa_{_SUFFIX}"  # SQLAlchemy clients' rows (jsonb and int[] columns)
SCH = (f"pr_a_{_SUFFIX}", f"pr_b_{_SUFFIX}")  # schemas, each with a table marker(v) = 'a' / 'b'


# ---- helpers ---------------------------------------------------------------------------------


class ServerError(Exception):
    """An ErrorResponse as a libpq result: its SQLSTATE and primary message."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate
        self.message = message


class Raw:
    """One client on libpq's own calls: Parse/Bind/Describe/Close with the names given."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.pg = pq.PGconn.connect(proxy.dsn("appdb", connect_timeout="10").encode())
        assert self.pg.status == pq.ConnStatus.OK, self.pg.get_error_message()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pg.finish()

    def _rows(self, res: pq.abc.PGresult) -> list[tuple[str | None, ...]]:
        if res.status == pq.ExecStatus.FATAL_ERROR:
            state = res.error_field(pq.DiagnosticField.SQLSTATE) or b""
            message = res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b""
            raise ServerError(state.decode(), message.decode())
        assert res.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK), (
            f"unexpected result {res.status!r}: {self.pg.get_error_message()}"
        )
        return [
            tuple(
                None if (v := res.get_value(r, c)) is None else bytes(v).decode()
                for c in range(res.nfields)
            )
            for r in range(res.ntuples)
        ]

    def prepare(self, name: str, sql: str) -> None:
        self._rows(self.pg.prepare(name.encode(), sql.encode(), None))

    def execute(self, name: str, *params: object) -> list[tuple[str | None, ...]]:
        values = [str(p).encode() for p in params]
        return self._rows(self.pg.exec_prepared(name.encode(), values))

    def describe(self, name: str) -> int:
        """Describe (statement): the number of result columns."""
        res = self.pg.describe_prepared(name.encode())
        self._rows(res)
        return int(res.nfields)

    def close_statement(self, name: str) -> None:
        self._rows(self.pg.close_prepared(name.encode()))

    def query(self, sql: str) -> list[tuple[str | None, ...]]:
        """A simple-protocol query."""
        return self._rows(self.pg.exec_(sql.encode()))

    def usable(self) -> None:
        """Still connected, idle, and answering."""
        assert self.pg.status == pq.ConnStatus.OK
        assert self.pg.transaction_status == pq.TransactionStatus.IDLE
        assert self.query("SELECT 'still here'") == [("still here",)]


def raises(sqlstate: str, message: str) -> Any:
    """Context manager: the block fails with this ErrorResponse."""
    return pytest.raises(ServerError, match="^" + re.escape(f"{sqlstate}: {message}") + "$")


def connect(proxy: ProxyProcess, **kw: Any) -> psycopg.Connection[Any]:
    kw.setdefault("autocommit", True)
    kw.setdefault("prepare_threshold", 0)  # every statement a named prepared statement
    kw.setdefault("connect_timeout", 10)
    return psycopg.connect(proxy.dsn("appdb"), **kw)


def backend_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


@contextlib.contextmanager
def held(proxy: ProxyProcess) -> Iterator[int]:
    """Another client inside a transaction, holding a server; yields that server's pid."""
    conn = connect(proxy, autocommit=False, prepare_threshold=None)
    try:
        yield backend_pid(conn)
    finally:
        conn.rollback()
        conn.close()


@contextlib.contextmanager
def holding(proxy: ProxyProcess, pid: int) -> Iterator[None]:
    """pool_size 2: another client holds server `pid`, the other server is free."""
    a = connect(proxy, autocommit=False, prepare_threshold=None)
    b = connect(proxy, autocommit=False, prepare_threshold=None)
    try:
        pa, pb = backend_pid(a), backend_pid(b)
        assert pid in (pa, pb), f"server {pid} is not in the pool of 2 ({pa}, {pb})"
        (b if pa == pid else a).commit()
        yield
    finally:
        for c in (a, b):
            c.rollback()
            c.close()


def sql_prepare_pins(proxy: ProxyProcess) -> int:
    return show_pins(proxy).get("sql_prepare", (0, 0))[0]


async def run_all(clients: list[Coroutine[Any, Any, None]], timeout: float = 90) -> None:
    """Run every client to its end (each closes its own connections), then fail with the
    first failure."""
    results = await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), timeout)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        pytest.fail(
            f"{len(failures)} of {len(results)} clients failed, first: {failures[0]!r}",
            pytrace=False,
        )


def primary_sql(cluster: Any, sql: str) -> str:
    return str(cluster.primary.sql(sql, dbname="appdb"))


def routed(proxy_factory: Any, config: dict[str, Any] | None = None, **kw: Any) -> ProxyProcess:
    proxy: ProxyProcess = proxy_factory(deep_merge(ROUTED, config or {}), **kw)
    wait_replica_reads(proxy)
    return proxy


def url(proxy: ProxyProcess, scheme: str = "postgresql") -> str:
    return f"{scheme}://{APP_USER}:{APP_PASSWORD}@{proxy.host}:{proxy.port}/appdb"


_SETUP = f"""
SET ROLE {APP_USER};
CREATE TYPE {MOOD} AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE {PAIR} AS (a int, b text);
CREATE TABLE {DRV} (client int, n int, mood {MOOD}, p {PAIR}, tags text[],
                    PRIMARY KEY (client, n));
CREATE TABLE {RT} (client int, n int, tag text, PRIMARY KEY (client, n));
CREATE TABLE {SA} (client int, n int, doc jsonb, nums int[], PRIMARY KEY (client, n));
CREATE SCHEMA {SCH[0]};
CREATE TABLE {SCH[0]}.marker (v text);
INSERT INTO {SCH[0]}.marker VALUES ('a');
CREATE SCHEMA {SCH[1]};
CREATE TABLE {SCH[1]}.marker (v text);
INSERT INTO {SCH[1]}.marker VALUES ('b');
"""

_TEARDOWN = f"""
DROP TABLE IF EXISTS {DRV}, {RT}, {SA};
DROP TYPE IF EXISTS {PAIR}, {MOOD};
DROP SCHEMA IF EXISTS {SCH[0]}, {SCH[1]} CASCADE;
"""


@pytest.fixture(scope="module")
def objects(cluster: Any) -> Iterator[None]:
    primary_sql(cluster, _SETUP)
    cluster.wait_replicated()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            primary_sql(cluster, _TEARDOWN)


# ---- protocol-level named statements -----------------------------------------------------------


def test_named_statements_follow_the_client_to_another_server(proxy_factory: Any) -> None:
    """psycopg prepares every statement (prepare_threshold=0); they keep working when the
    client's next transaction runs on a server that never saw them, and back again."""
    proxy = proxy_factory(pool_size=2)
    double = "SELECT %s::int * 2, pg_backend_pid()"
    concat = "SELECT %s::text || '-' || %s::text"
    with connect(proxy) as conn:
        row = conn.execute(double, (1,)).fetchone()
        assert row is not None and row[0] == 2
        first = row[1]
        with holding(proxy, first):
            row = conn.execute(double, (2,)).fetchone()
            assert row is not None and row[0] == 4
            assert row[1] != first, "the client was not moved to another server"
            assert conn.execute(concat, ("made", "here")).fetchone() == ("made-here",)
        for i in range(5):
            row = conn.execute(double, (i,)).fetchone()
            assert row is not None and row[0] == i * 2
            assert conn.execute(concat, ("back", str(i))).fetchone() == (f"back-{i}",)
        # inside explicit transactions, and psycopg's own transactions
        with conn.transaction():
            row = conn.execute(double, (21,)).fetchone()
            assert row is not None and row[0] == 42
        conn.autocommit = False
        for i in range(3):
            last = backend_pid(conn)
            conn.commit()
            with holding(proxy, last) if i == 1 else contextlib.nullcontext():
                assert conn.execute(concat, ("txn", str(i))).fetchone() == (f"txn-{i}",)
                row = conn.execute(double, (i,)).fetchone()
                assert row is not None and row[0] == i * 2
                conn.commit()


def test_named_statements_on_primary_and_replicas(
    proxy_factory: Any, cluster: Any, objects: None
) -> None:
    """With reads routed to the replicas, a named statement works on whichever server runs it:
    writes on the primary, reads on the replicas, with the right values."""
    proxy = routed(proxy_factory, pool_size=2)
    client = 1000 + int(uuid.uuid4().int % 1000)
    insert = f"INSERT INTO {RT} (client, n, tag) VALUES (%s, %s, %s) RETURNING pg_is_in_recovery()"
    read = (
        f"SELECT count(*), max(n), pg_is_in_recovery(), inet_server_port() FROM {RT} "
        "WHERE client = %s"
    )
    replicas = {r.port for r in cluster.replicas}
    with connect(proxy) as conn:
        for n in range(10):
            assert conn.execute(insert, (client, n, "w")).fetchone() == (False,)
            row = conn.execute(read, (client,)).fetchone()
            assert row is not None and row[:2] == (n + 1, n), "a read missed the client's write"
        cluster.wait_replicated()
        ports: list[int] = []
        deadline = time.monotonic() + 3
        while sum(p in replicas for p in ports) < 10 and time.monotonic() < deadline:
            row = conn.execute(read, (client,)).fetchone()
            assert row is not None and row[:2] == (10, 9)
            assert row[2] == (row[3] in replicas)
            ports.append(row[3])
            if not row[2]:
                time.sleep(0.02)  # the monitors have not seen the replicas replay the writes
        assert sum(p in replicas for p in ports) >= 10, f"prepared reads ran on ports {ports}"
        assert conn.execute(insert, (client, 10, "w")).fetchone() == (False,)


def test_duplicate_name_gets_42P05_and_the_connection_stays_usable(proxy_factory: Any) -> None:
    proxy = proxy_factory(pool_size=2)
    with Raw(proxy) as a:
        a.prepare("dup", "SELECT 'first'")
        with held(proxy):  # the next transactions run on the other server
            with raises("42P05", 'prepared statement "dup" already exists'):
                a.prepare("dup", "SELECT 'second'")
            a.usable()
            assert a.execute("dup") == [("first",)]
        with raises("42P05", 'prepared statement "dup" already exists'):
            a.prepare("dup", "SELECT 'third'")
        a.usable()
        assert a.execute("dup") == [("first",)]
        # the unnamed statement is replaced by each Parse, as on a server
        a.prepare("", "SELECT 'unnamed 1'")
        a.prepare("", "SELECT 'unnamed 2'")
        assert a.execute("") == [("unnamed 2",)]


def test_unknown_name_gets_26000_and_names_are_per_client(proxy_factory: Any) -> None:
    """pool_size 1: both clients share one server, yet each sees only its own statements."""
    proxy = proxy_factory(pool_size=1)
    with Raw(proxy) as a, Raw(proxy) as b:
        with raises("26000", 'prepared statement "nope" does not exist'):
            a.execute("nope")
        a.usable()
        with raises("26000", 'prepared statement "nope" does not exist'):
            a.describe("nope")
        a.usable()
        with raises("26000", 'prepared statement "nope" does not exist'):
            a.query("DEALLOCATE nope")
        a.usable()
        a.close_statement("nope")  # closing a name that does not exist is no error
        a.usable()

        a.prepare("mine", "SELECT 'a', $1::int")
        with raises("26000", 'prepared statement "mine" does not exist'):
            b.execute("mine", 1)
        b.usable()
        b.prepare("mine", "SELECT 'b', $1::int + 100")  # the same name, its own text
        for i in range(3):
            assert a.execute("mine", i) == [("a", str(i))]
            assert b.execute("mine", i) == [("b", str(i + 100))]
        assert a.describe("mine") == 2
        b.close_statement("mine")
        with raises("26000", 'prepared statement "mine" does not exist'):
            b.execute("mine", 1)
        assert a.execute("mine", 7) == [("a", "7")]


def test_unknown_name_inside_a_transaction_aborts_it(proxy_factory: Any) -> None:
    """As on a server: the error aborts the open transaction, ROLLBACK ends it."""
    proxy = proxy_factory(pool_size=2)
    with Raw(proxy) as a:
        a.prepare("known", "SELECT 'known'")
        a.query("BEGIN")
        assert a.execute("known") == [("known",)]
        with raises("26000", 'prepared statement "nope" does not exist'):
            a.execute("nope")
        assert a.pg.transaction_status == pq.TransactionStatus.INERROR
        with raises(
            "25P02",
            "current transaction is aborted, commands ignored until end of transaction block",
        ):
            a.query("SELECT 1")
        a.query("ROLLBACK")
        a.usable()
        assert a.execute("known") == [("known",)]


CLEARS = {
    "close": (lambda raw: raw.close_statement("s1"), False),
    "deallocate": (lambda raw: raw.query("DEALLOCATE s1"), False),
    "deallocate_prepare": (lambda raw: raw.query("DEALLOCATE PREPARE s1"), False),
    "deallocate_all": (lambda raw: raw.query("DEALLOCATE ALL"), True),
    "discard_all": (lambda raw: raw.query("DISCARD ALL"), True),
}


@pytest.mark.parametrize("how", CLEARS)
def test_freed_names_are_gone_and_can_be_prepared_again(proxy_factory: Any, how: str) -> None:
    """After Close / DEALLOCATE / DEALLOCATE ALL / DISCARD ALL the name gives 26000 on every
    server, and preparing it again (with another text) works."""
    clear, clears_all = CLEARS[how]
    proxy = proxy_factory(pool_size=2)
    with Raw(proxy) as a:
        a.prepare("s1", "SELECT 'one'")
        a.prepare("s2", "SELECT 'two'")
        assert a.execute("s1") == [("one",)]
        with held(proxy):
            assert a.execute("s2") == [("two",)]  # used on the other server too
        with held(proxy):
            clear(a)
        gone = ["s1", "s2"] if clears_all else ["s1"]
        for hold in (False, True, False):
            with held(proxy) if hold else contextlib.nullcontext():
                for name in gone:
                    with raises("26000", f'prepared statement "{name}" does not exist'):
                        a.execute(name)
                    a.usable()
                if not clears_all:
                    assert a.execute("s2") == [("two",)]
        a.prepare("s1", "SELECT 'uno'")
        for hold in (True, False, True):
            with held(proxy) if hold else contextlib.nullcontext():
                assert a.execute("s1") == [("uno",)]


def test_small_max_prepared_statements_evicts_and_prepares_again(proxy_factory: Any) -> None:
    """max_prepared_statements: 3 with 10 statements in use: every one keeps working on both
    servers, and no server holds more than 3 of them."""
    proxy = proxy_factory(pool_size=2, max_prepared_statements=3)
    with Raw(proxy) as a:
        for i in range(10):
            a.prepare(f"s{i}", f"SELECT {i}::int AS n, $1::text AS echo")
        for round_ in range(3):
            with held(proxy) if round_ == 1 else contextlib.nullcontext():
                for i in (*range(10), *range(9, -1, -1), 0, 5, 0, 5):
                    assert a.execute(f"s{i}", f"r{round_}") == [(str(i), f"r{round_}")]
                (count,) = a.query("SELECT count(*) FROM pg_prepared_statements")[0]
                assert count is not None and int(count) <= 3, f"{count} statements on a server"


def test_max_prepared_statements_0_passes_names_through(proxy_factory: Any) -> None:
    proxy = proxy_factory(pool_size=1, max_prepared_statements=0)
    with Raw(proxy) as a:
        a.prepare("plain_ps", "SELECT 40 + $1::int")
        assert a.execute("plain_ps", 2) == [("42",)]
        names = a.query("SELECT name FROM pg_prepared_statements")
        assert ("plain_ps",) in names, f"the server knows the statement as {names}"
        with raises("42P05", 'prepared statement "plain_ps" already exists'):
            a.prepare("plain_ps", "SELECT 1")
        a.close_statement("plain_ps")
        assert a.query("SELECT name FROM pg_prepared_statements") == []


# ---- SQL-level PREPARE / EXECUTE / DEALLOCATE ------------------------------------------------


def test_sql_prepare_pins_until_deallocated(proxy_factory: Any) -> None:
    proxy = proxy_factory(ADMIN, pool_size=2)
    with connect(proxy, prepare_threshold=None) as conn:
        conn.execute("PREPARE double_it(int) AS SELECT $1 * 2")
        pid = backend_pid(conn)
        with held(proxy) as other:
            assert other != pid, "another client was given the server of a SQL-prepared statement"
            for i in range(3):
                assert conn.execute(f"EXECUTE double_it({i})").fetchone() == (i * 2,)
                assert backend_pid(conn) == pid
            with conn.transaction():
                assert conn.execute("EXECUTE double_it(50)").fetchone() == (100,)
        assert sql_prepare_pins(proxy) == 1, show_pins(proxy)

        conn.execute("PREPARE triple_it(int) AS SELECT $1 * 3")
        conn.execute("DEALLOCATE double_it")
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute("EXECUTE double_it(1)")
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)
        assert sql_prepare_pins(proxy) == 1, "triple_it still pins the client"
        assert conn.execute("EXECUTE triple_it(3)").fetchone() == (9,)

        conn.execute("DEALLOCATE ALL")
        deadline = time.monotonic() + 5
        while sql_prepare_pins(proxy) != 0:
            assert time.monotonic() < deadline, f"still pinned: {show_pins(proxy)}"
            time.sleep(0.05)
        assert show_pins(proxy)["sql_prepare"][1] >= 1
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute("EXECUTE triple_it(1)")
        conn.execute("PREPARE double_it(int) AS SELECT $1 * 2")  # the name is free again
        assert conn.execute("EXECUTE double_it(2)").fetchone() == (4,)
        conn.execute("DEALLOCATE double_it")


# ---- drivers with their defaults, many clients, reads routed to the replicas ----------------


def test_asyncpg_statement_cache_many_clients(
    proxy_factory: Any, cluster: Any, objects: None
) -> None:
    """20 asyncpg clients (statement cache on) over 2 servers per backend: cached and
    conn.prepare() statements across transactions, type introspection (enum, composite,
    arrays), a search_path set once."""
    proxy = routed(proxy_factory, pool_size=2)
    clients, rounds = 20, 6

    async def client(i: int) -> None:
        conn = await asyncpg.connect(url(proxy), timeout=10)
        try:
            schema, letter = (SCH[0], "a") if i % 2 else (SCH[1], "b")
            await conn.execute(f"SET search_path = {schema}, public")
            stmt = await conn.prepare("SELECT $1::int * 2 AS doubled, (SELECT v FROM marker) AS v")
            count = await conn.prepare(f"SELECT count(*) FROM public.{DRV} WHERE client = $1")
            for r in range(rounds):
                assert await conn.fetchval("SELECT v FROM marker") == letter, "search_path lost"
                row = await stmt.fetchrow(r)
                assert row is not None and (row["doubled"], row["v"]) == (2 * r, letter)
                assert await conn.fetchval(f"SELECT $1::public.{MOOD}", "happy") == "happy"
                assert await conn.fetchval(f"SELECT enum_range(NULL::public.{MOOD})") == [
                    "sad",
                    "ok",
                    "happy",
                ]
                pair = await conn.fetchval(f"SELECT ROW($1::int, $2::text)::public.{PAIR}", i, "x")
                assert tuple(pair) == (i, "x")
                assert await conn.fetchval("SELECT $1::text[] || $2::text", ["a"], f"r{r}") == [
                    "a",
                    f"r{r}",
                ]
                async with conn.transaction():
                    await conn.execute(
                        f"INSERT INTO public.{DRV} "
                        f"VALUES ($1, $2, $3, ROW($1::int, $4::text)::public.{PAIR}, $5)",
                        i,
                        r,
                        "ok",
                        f"c{i}",
                        [f"t{r}"],
                    )
                    assert await count.fetchval(i) == r + 1
                    row = await stmt.fetchrow(r + 100)
                    assert row is not None and row["doubled"] == 2 * (r + 100)
                assert await count.fetchval(i) == r + 1, "a read missed the client's write"
                got = await conn.fetchrow(
                    f"SELECT mood, p, tags FROM public.{DRV} WHERE client = $1 AND n = $2", i, r
                )
                assert got is not None
                assert (got["mood"], tuple(got["p"]), got["tags"]) == (
                    "ok",
                    (i, f"c{i}"),
                    [f"t{r}"],
                )
        finally:
            await conn.close()

    asyncio.run(run_all([client(i) for i in range(clients)]))
    got = primary_sql(
        cluster,
        f"SELECT string_agg(client || ':' || c, ',' ORDER BY client) FROM "
        f"(SELECT client, count(*) AS c FROM {DRV} GROUP BY client) s",
    )
    assert got == ",".join(f"{i}:{rounds}" for i in range(clients))


def test_psycopg_prepared_and_pipelines_many_clients(
    proxy_factory: Any, cluster: Any, objects: None
) -> None:
    """20 psycopg clients with prepare_threshold=0 over 2 servers per backend: plain
    statements, pipelines and transactions, a search_path set once."""
    proxy = routed(proxy_factory, pool_size=2)
    clients, rounds = 20, 6
    errors: list[BaseException] = []

    def client(i: int) -> None:
        schema, letter = (SCH[0], "a") if i % 2 else (SCH[1], "b")
        with connect(proxy) as conn:
            conn.execute(f"SET search_path = {schema}, public")
            for r in range(rounds):
                got = conn.execute("SELECT %s::int + 1, v FROM marker", (r,)).fetchone()
                assert got == (r + 1, letter), f"client {i}: {got}"
                with conn.pipeline():
                    c1 = conn.execute(
                        f"INSERT INTO public.{RT} (client, n, tag) VALUES (%s, %s, %s) RETURNING n",
                        (i, r, letter),
                    )
                    c2 = conn.execute(f"SELECT count(*) FROM public.{RT} WHERE client = %s", (i,))
                    c3 = conn.execute("SELECT %s::text || v FROM marker", (f"c{i}-",))
                assert c1.fetchone() == (r,)
                assert c2.fetchone() == (r + 1,)
                assert c3.fetchone() == (f"c{i}-{letter}",)
                with conn.transaction():
                    conn.execute(
                        f"UPDATE public.{RT} SET tag = tag || '+' WHERE client = %s AND n = %s",
                        (i, r),
                    )
                    got = conn.execute(
                        f"SELECT tag FROM public.{RT} WHERE client = %s AND n = %s", (i, r)
                    ).fetchone()
                    assert got == (letter + "+",)
                got = conn.execute(
                    f"SELECT count(*), min(tag) FROM public.{RT} WHERE client = %s", (i,)
                ).fetchone()
                assert got == (r + 1, letter + "+"), f"client {i} round {r}: {got}"

    def run(i: int) -> None:
        try:
            client(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "clients still running after 90 s"
    assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"
    got = primary_sql(
        cluster, f"SELECT count(*) || ':' || count(DISTINCT client) FROM {RT} WHERE client < 1000"
    )
    assert got == f"{clients * rounds}:{clients}"


def test_sqlalchemy_asyncpg_default_pool(proxy_factory: Any, cluster: Any, objects: None) -> None:
    """SQLAlchemy 2 with the asyncpg dialect and its default pool (up to 15 connections) for 30
    tasks over 1 server per backend: its prepared statement cache (statements made in
    read-write transactions on the primary, reused in read-only ones on the replicas) and its
    json/array codecs."""
    from sqlalchemy import ARRAY, Column, Integer, MetaData, Table, func, insert, select, text
    from sqlalchemy.dialects.postgresql import JSONB
    from sqlalchemy.ext.asyncio import create_async_engine

    proxy = routed(proxy_factory, pool_size=1)
    tasks, rounds = 30, 4
    table = Table(
        SA,
        MetaData(),
        Column("client", Integer, primary_key=True),
        Column("n", Integer, primary_key=True),
        Column("doc", JSONB),
        Column("nums", ARRAY(Integer)),
    )
    echo = text("SELECT CAST(:x AS int) * 3, CAST(:s AS text) || '!', pg_is_in_recovery()")
    landed: list[bool] = []

    async def main() -> None:
        engine = create_async_engine(url(proxy, "postgresql+asyncpg"))

        async def client(i: int) -> None:
            for r in range(rounds):
                async with engine.begin() as c:  # a read-write transaction: the primary
                    await c.execute(
                        insert(table),
                        {"client": i, "n": r, "doc": {"c": i, "r": r}, "nums": [i, r]},
                    )
                    rows = await c.execute(
                        select(table.c.n, table.c.doc, table.c.nums)
                        .where(table.c.client == i)
                        .order_by(table.c.n)
                    )
                    assert [tuple(x) for x in rows] == [
                        (k, {"c": i, "r": k}, [i, k]) for k in range(r + 1)
                    ]
                    row = (await c.execute(echo, {"x": r, "s": f"w{i}"})).one()
                    assert tuple(row) == (3 * r, f"w{i}!", False)
                    total = await c.execute(
                        select(func.count()).select_from(table).where(table.c.client == i)
                    )
                    assert total.scalar_one() == r + 1
                async with engine.connect() as c:  # BEGIN READ ONLY: a replica may serve it
                    c = await c.execution_options(postgresql_readonly=True)
                    row = (await c.execute(echo, {"x": r, "s": f"c{i}"})).one()
                    assert tuple(row[:2]) == (3 * r, f"c{i}!")
                    landed.append(row[2])
                    got = await c.execute(select(func.count()).select_from(table))
                    assert got.scalar_one() >= r + 1

        try:
            await run_all([client(i) for i in range(tasks)])
            deadline = time.monotonic() + 3
            while not any(landed) and time.monotonic() < deadline:
                async with engine.connect() as c:
                    c = await c.execution_options(postgresql_readonly=True)
                    row = (await c.execute(echo, {"x": 1, "s": "late"})).one()
                    assert tuple(row[:2]) == (3, "late!")
                    landed.append(row[2])
                await asyncio.sleep(0.05)
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert any(landed), "no read-only transaction ran on a replica"
    got = primary_sql(cluster, f"SELECT count(*) || ':' || sum((doc->>'r')::int) FROM {SA}")
    assert got == f"{tasks * rounds}:{tasks * sum(range(rounds))}"


# ---- pgbench ---------------------------------------------------------------------------------


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = APP_PASSWORD
    return env


@pytest.fixture(scope="module")
def pgbench_tables(cluster: Any) -> None:
    """pgbench's tables (scale 1) in appdb, made on the primary if they are not there."""
    present = primary_sql(cluster, "SELECT to_regclass('pgbench_branches') IS NOT NULL")
    if present != "t" or primary_sql(cluster, "SELECT count(*) FROM pgbench_branches") != "1":
        out = subprocess.run(
            ["pgbench", "-i", "-q", "-s", "1", "-h", cluster.primary.host,
             "-p", str(cluster.primary.port), "-U", APP_USER, "appdb"],
            env=_client_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, f"pgbench -i failed:\n{out.stdout}\n{out.stderr}"
    cluster.wait_replicated(timeout=30)


# Each statement fails (division by zero) unless its result is the one asked for.
_CHECK_SCRIPT = """\\set aid random(1, 100000)
SELECT 1 / (count(*) = 1 AND min(aid) = :aid)::int FROM pgbench_accounts WHERE aid = :aid;
SELECT 1 / (x = :aid * 2)::int FROM (SELECT :aid * 2 AS x) s;
"""


def _pgbench(proxy: ProxyProcess, *args: str) -> tuple[int, str]:
    cmd = ["pgbench", "-h", proxy.host, "-p", str(proxy.port), "-U", APP_USER, "-n"]
    out = subprocess.run(
        [*cmd, "-c", "100", "-j", "2", "-T", "2", *args, "appdb"],
        env=_client_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"pgbench {args} failed ({out.returncode}):\n{text[-3000:]}"
    processed = re.search(r"number of transactions actually processed: (\d+)", text)
    assert processed and int(processed.group(1)) > 0, text
    assert re.search(r"number of failed transactions: 0 \(", text), text
    return int(processed.group(1)), text


@pytest.mark.parametrize("mode", ["prepared", "extended"])
def test_pgbench_100_clients_pool_size_10(
    mode: str, proxy_factory: Any, cluster: Any, pgbench_tables: None, tmp_path: Path
) -> None:
    """pgbench -M prepared / extended, 100 clients through pool_size 10, reads routed: the
    select-only script with a script that checks its results, then TPC-B (writes)."""
    proxy = routed(proxy_factory, pool_size=10)
    check = tmp_path / "check.sql"
    check.write_text(_CHECK_SCRIPT)
    _pgbench(proxy, "-M", mode, "-S", "-f", str(check))

    def books() -> list[int]:
        row = primary_sql(
            cluster,
            "SELECT (SELECT count(*) FROM pgbench_history) || '|' || "
            "(SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts) || '|' || "
            "(SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches) || '|' || "
            "(SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers) || '|' || "
            "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
        )
        return [int(v) for v in row.split("|")]

    history_before = books()[0]
    done, _ = _pgbench(proxy, "-M", mode)
    history, accounts, branches, tellers, deltas = books()
    assert history - history_before == done, "committed TPC-B transactions and history rows"
    assert accounts == branches == tellers == deltas, "the books do not balance"


# ---- a schema change under a prepared statement ----------------------------------------------


@pytest.fixture
def altered_table(cluster: Any) -> Iterator[str]:
    name = f"pr_sc_{uuid.uuid4().hex[:8]}"
    primary_sql(
        cluster,
        f"SET ROLE {APP_USER}; CREATE TABLE {name} (id int PRIMARY KEY, a text);"
        f"INSERT INTO {name} VALUES (1, 'x'), (2, 'y');",
    )
    cluster.wait_replicated()
    yield name
    primary_sql(cluster, f"DROP TABLE IF EXISTS {name}")


BEFORE = [(1, "x"), (2, "y")]
AFTER = [(1, "x", 7), (2, "y", 7)]


def _alter(cluster: Any, table: str) -> None:
    primary_sql(cluster, f"ALTER TABLE {table} ADD COLUMN b int DEFAULT 7")
    cluster.wait_replicated()


def test_schema_change_under_an_asyncpg_statement(
    proxy_factory: Any, cluster: Any, altered_table: str
) -> None:
    """SELECT * prepared by asyncpg's cache, ALTER TABLE ADD COLUMN elsewhere: the next runs
    return the new column, or fail with InvalidCachedStatementError and the connection goes
    on (never a disconnect or a hang)."""
    proxy = routed(proxy_factory, pool_size=2)
    sql = f"SELECT * FROM {altered_table} ORDER BY id"

    async def main() -> None:
        conn = await asyncpg.connect(url(proxy), timeout=10)
        try:
            for _ in range(6):
                rows = await asyncio.wait_for(conn.fetch(sql), 10)
                assert [tuple(r) for r in rows] == BEFORE
            _alter(cluster, altered_table)
            for _ in range(6):
                try:
                    rows = await asyncio.wait_for(conn.fetch(sql), 10)
                    assert [tuple(r) for r in rows] == AFTER
                except asyncpg.exceptions.InvalidCachedStatementError:
                    pass  # acceptable: the connection must go on
                assert await asyncio.wait_for(conn.fetchval("SELECT $1::int", 5), 10) == 5
            rows = await asyncio.wait_for(conn.fetch(sql), 10)
            assert [tuple(r) for r in rows] == AFTER
        finally:
            await conn.close()

    asyncio.run(main())


def test_schema_change_under_a_psycopg_statement(
    proxy_factory: Any, cluster: Any, altered_table: str
) -> None:
    """The same with psycopg (prepare_threshold=0, autocommit): the next runs return the new
    column; the server's "cached plan must not change result type" never reaches the client."""
    proxy = routed(proxy_factory, pool_size=2)
    sql = f"SELECT * FROM {altered_table} ORDER BY id"
    with connect(proxy) as conn:
        for _ in range(6):
            assert conn.execute(sql).fetchall() == BEFORE
        _alter(cluster, altered_table)
        for _ in range(6):
            # psycopg describes the portal each time, so the stale server copy is prepared
            # afresh and the statement run again before the client sees anything.
            assert conn.execute(sql).fetchall() == AFTER
            assert conn.execute("SELECT %s::int", (5,)).fetchone() == (5,)
        assert conn.execute(sql, prepare=False).fetchall() == AFTER
        assert not conn.broken
