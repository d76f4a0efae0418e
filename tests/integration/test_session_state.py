"""Session state in transaction mode (DESIGN "Routing rules", session state).

Settings: SET, RESET, RESET ALL and set_config(name, value, false) are kept per client and
hold on every server that serves a later transaction of that client, and never show to
another client sharing the servers. State that cannot move (LISTEN, session advisory locks,
temporary tables, WITH HOLD cursors, SET ROLE / SET SESSION AUTHORIZATION) pins the client
to its server until the state is cleared or the client leaves; every pin shows in the admin
console (SHOW PINS) and in /metrics.

Servers are told apart by pg_backend_pid(). To see a setting on another server, the client
is moved off the server it used last: with pool_size 2, two other clients open transactions
(so both servers are taken), and the one holding the other server commits; the client's
next transaction can then only run there. To see a pin, another client opens a transaction
while the pinned client is idle: it must get another server, and the pinned client keeps its
own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import APP_PASSWORD, APP_USER, ProxyProcess, free_port

pytestmark = pytest.mark.timeout(120)

REASONS = ("listen", "advisory_lock", "temp_table", "holdable_cursor", "role", "sql_prepare")
ADMIN = {"admin": {"users": [APP_USER]}}


# ---- helpers ---------------------------------------------------------------------------------


def connect(proxy: ProxyProcess, **kw: Any) -> psycopg.Connection[Any]:
    kw.setdefault("autocommit", True)
    kw.setdefault("prepare_threshold", None)  # plain queries: only the state under test moves
    kw.setdefault("connect_timeout", 10)
    return psycopg.connect(proxy.dsn("appdb"), **kw)


def one(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None, sql
    return row[0] if len(row) == 1 else tuple(row)


def backend_pid(conn: psycopg.Connection[Any]) -> int:
    return int(one(conn, "SELECT pg_backend_pid()"))


def setting(conn: psycopg.Connection[Any], name: str) -> str:
    """current_setting(name), '' for a custom setting never set on this server."""
    return str(one(conn, f"SELECT coalesce(current_setting('{name}', true), '')"))


@contextlib.contextmanager
def holding(proxy: ProxyProcess, pid: int) -> Iterator[None]:
    """pool_size 2: another client holds server `pid` in an open transaction, and the pool's
    other server is free, so the next transaction of any other client runs there."""
    a, b = connect(proxy, autocommit=False), connect(proxy, autocommit=False)
    try:
        pa, pb = backend_pid(a), backend_pid(b)
        assert pid in (pa, pb), f"server {pid} is not in the pool of 2 ({pa}, {pb})"
        (b if pa == pid else a).commit()
        yield
    finally:
        for c in (a, b):
            c.rollback()
            c.close()


@contextlib.contextmanager
def elsewhere(proxy: ProxyProcess, conn: psycopg.Connection[Any]) -> Iterator[None]:
    """Inside: `conn`'s transactions run on another server than its last one (pool_size 2)."""
    last = backend_pid(conn)
    with holding(proxy, last):
        assert backend_pid(conn) != last, "the client was not moved to another server"
        yield


@contextlib.contextmanager
def bystander(proxy: ProxyProcess) -> Iterator[tuple[psycopg.Connection[Any], int]]:
    """Another client inside a transaction (holding a server) for the duration."""
    conn = connect(proxy, autocommit=False)
    try:
        yield conn, backend_pid(conn)
    finally:
        conn.rollback()
        conn.close()


def show_pins(proxy: ProxyProcess) -> dict[str, tuple[int, int]]:
    """SHOW PINS in the admin console: reason -> (pinned now, total since start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=APP_PASSWORD, PGSSLMODE="disable")
    out = subprocess.run(
        ["psql", "-X", "-h", proxy.host, "-p", str(proxy.port), "-U", APP_USER, "-d", "pgrouter",
         "-A", "-F", "|", "-P", "footer=off", "-c", "SHOW PINS"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, f"SHOW PINS failed: {out.stderr.strip()}"
    header, *rows = out.stdout.strip().splitlines()
    cols = header.split("|")
    assert cols[:3] == ["reason", "pinned", "total"], f"SHOW PINS columns: {cols}"
    table = {}
    for line in rows:
        reason, pinned, total = line.split("|")[:3]
        table[reason] = (int(pinned), int(total))
    assert set(table) <= set(REASONS), f"unknown pin reasons: {sorted(set(table) - set(REASONS))}"
    return table


def pinned(proxy: ProxyProcess, reason: str) -> int:
    return show_pins(proxy).get(reason, (0, 0))[0]


def wait_for(check: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
    """Poll `check` until it returns something true; fail with the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f}s (last: {value!r})", pytrace=False)
        time.sleep(0.05)


def wait_unpinned(proxy: ProxyProcess, reason: str) -> None:
    wait_for(lambda: pinned(proxy, reason) == 0, f"{reason} pin cleared ({show_pins(proxy)})")


@pytest.fixture
def schemas(cluster: Any) -> Iterator[tuple[str, str]]:
    """Two schemas in appdb, each with a table `marker` holding its own letter."""
    suffix = uuid.uuid4().hex[:8]
    names = (f"ss_a_{suffix}", f"ss_b_{suffix}")
    for name, letter in zip(names, "ab", strict=True):
        cluster.primary.sql(
            f"CREATE SCHEMA {name} AUTHORIZATION {APP_USER}; "
            f"CREATE TABLE {name}.marker (v text); INSERT INTO {name}.marker VALUES ('{letter}');"
            f"ALTER TABLE {name}.marker OWNER TO {APP_USER};",
            dbname="appdb",
        )
    yield names
    for name in names:
        cluster.primary.sql(f"DROP SCHEMA IF EXISTS {name} CASCADE", dbname="appdb")


@pytest.fixture
def role(cluster: Any) -> Iterator[str]:
    """A role the app user may SET ROLE to."""
    name = f"pin_role_{uuid.uuid4().hex[:8]}"
    cluster.primary.sql(f"CREATE ROLE {name} NOLOGIN; GRANT {name} TO {APP_USER};")
    yield name
    cluster.primary.sql(f"DROP ROLE IF EXISTS {name}")


def server_default(cluster: Any, name: str) -> str:
    with psycopg.connect(cluster.primary.dsn("appdb", APP_USER, APP_PASSWORD)) as conn:
        return str(one(conn, f"SELECT current_setting('{name}')"))


# ---- settings --------------------------------------------------------------------------------


def test_set_holds_on_every_later_server(proxy_factory: Any, schemas: tuple[str, str]) -> None:
    """SET, SET of a custom setting and set_config(..., false) outside a transaction: each
    value holds in later transactions, also on another server."""
    proxy = proxy_factory(pool_size=2)
    with connect(proxy) as conn:
        conn.execute("SET work_mem = '7MB'")
        conn.execute(f"SET search_path = {schemas[1]}, public")
        conn.execute("SET myapp.tenant = 'tenant-1'")
        conn.execute("SELECT set_config('statement_timeout', '4321', false)")
        conn.execute("SELECT set_config('myapp.region', 'eu-west', false)")
        want = {
            "work_mem": "7MB",
            "search_path": f"{schemas[1]}, public",
            "myapp.tenant": "tenant-1",
            "statement_timeout": "4321ms",
            "myapp.region": "eu-west",
        }
        for _ in range(2):
            got = {name: setting(conn, name) for name in want}
            assert got == want, "on the client's current server"
            assert one(conn, "SELECT v FROM marker") == "b"
            with elsewhere(proxy, conn):
                got = {name: setting(conn, name) for name in want}
                assert got == want, "after moving to another server"
                assert one(conn, "SELECT v FROM marker") == "b"
                # the extended protocol sees the same session
                row = conn.execute(
                    "SELECT current_setting(%s), current_setting(%s)", ("work_mem", "myapp.tenant")
                ).fetchone()
                assert row == ("7MB", "tenant-1")


def test_set_local_rollback_and_commit(proxy_factory: Any) -> None:
    """SET LOCAL ends with its transaction; a SET in a transaction that rolls back (or fails)
    is not kept; a SET in a committed transaction is."""
    proxy = proxy_factory(pool_size=2)

    def check(conn: psycopg.Connection[Any], want: str, after: str) -> None:
        assert setting(conn, "work_mem") == want, f"after {after}, same server"
        with elsewhere(proxy, conn):
            assert setting(conn, "work_mem") == want, f"after {after}, on another server"

    with connect(proxy) as conn:
        conn.execute("SET work_mem = '7MB'")
        check(conn, "7MB", "a plain SET")

        conn.execute("BEGIN")
        conn.execute("SET LOCAL work_mem = '9MB'")
        assert setting(conn, "work_mem") == "9MB"
        conn.execute("COMMIT")
        check(conn, "7MB", "SET LOCAL in a committed transaction")

        conn.execute("BEGIN")
        conn.execute("SET work_mem = '11MB'")
        assert setting(conn, "work_mem") == "11MB"
        conn.execute("ROLLBACK")
        check(conn, "7MB", "SET in a rolled-back transaction")

        conn.execute("BEGIN")
        conn.execute("SET work_mem = '15MB'")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.execute("COMMIT")  # the server answers ROLLBACK
        check(conn, "7MB", "SET in a failed transaction")

        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SET work_mem = 'lots'")
        check(conn, "7MB", "a SET that failed")

        conn.execute("BEGIN")
        conn.execute("SET work_mem = '13MB'")
        conn.execute("SET myapp.tenant = 'in-txn'")
        conn.execute("COMMIT")
        check(conn, "13MB", "SET in a committed transaction")
        with elsewhere(proxy, conn):
            assert setting(conn, "myapp.tenant") == "in-txn"

    # psycopg's own transactions (BEGIN sent with the first statement)
    with connect(proxy, autocommit=False) as conn:
        conn.execute("SET work_mem = '17MB'")
        conn.commit()
        conn.execute("SET work_mem = '19MB'")
        conn.rollback()
        assert setting(conn, "work_mem") == "17MB"
        conn.commit()
        last = backend_pid(conn)
        conn.commit()
        with holding(proxy, last):
            assert setting(conn, "work_mem") == "17MB"
            conn.commit()


def test_reset_returns_to_startup_values(
    cluster: Any, proxy_factory: Any, schemas: tuple[str, str]
) -> None:
    """RESET x goes back to what the client's startup packet set (options, application_name),
    else to the server default; RESET ALL does it for every setting."""
    proxy = proxy_factory(pool_size=2)
    default_timeout = server_default(cluster, "statement_timeout")
    assert default_timeout != "7s"
    startup = {
        "application_name": "startup-app",
        "search_path": f"{schemas[0]},public",
        "work_mem": "5MB",
        "statement_timeout": default_timeout,
        "myapp.tenant": "",
    }

    def check(conn: psycopg.Connection[Any], want: dict[str, str], after: str) -> None:
        got = {name: setting(conn, name) for name in want}
        assert got == want, f"after {after}, same server"
        with elsewhere(proxy, conn):
            got = {name: setting(conn, name) for name in want}
            assert got == want, f"after {after}, on another server"
            letter = "a" if want["search_path"].startswith(schemas[0]) else "b"
            assert one(conn, "SELECT v FROM marker") == letter

    with connect(
        proxy,
        application_name="startup-app",
        options=f"-c search_path={schemas[0]},public -c work_mem=5MB",
    ) as conn:
        check(conn, startup, "login")
        conn.execute("SET application_name = 'changed'")
        conn.execute(f"SET search_path = {schemas[1]}, public")
        conn.execute("SET work_mem = '9MB'")
        conn.execute("SET statement_timeout = '7s'")
        conn.execute("SET myapp.tenant = 't1'")
        changed = {
            "application_name": "changed",
            "search_path": f"{schemas[1]}, public",
            "work_mem": "9MB",
            "statement_timeout": "7s",
            "myapp.tenant": "t1",
        }
        check(conn, changed, "SET")

        conn.execute("RESET search_path")
        conn.execute("RESET application_name")
        partly = {
            **changed,
            "search_path": startup["search_path"],
            "application_name": "startup-app",
        }
        check(conn, partly, "RESET of startup settings")

        conn.execute("RESET statement_timeout")
        check(conn, {**partly, "statement_timeout": default_timeout}, "RESET of a plain setting")

        conn.execute("SET statement_timeout = '7s'")
        conn.execute("RESET ALL")
        check(conn, startup, "RESET ALL")


def test_settings_never_show_to_other_clients(
    cluster: Any, proxy_factory: Any, schemas: tuple[str, str]
) -> None:
    """pool_size 1: one server for everybody; each client sees only its own settings, also
    after the one that set them has left."""
    proxy = proxy_factory(pool_size=1)
    default_mem = server_default(cluster, "work_mem")
    defaults = {"work_mem": default_mem, "myapp.tenant": "", "search_path": '"$user", public'}
    with connect(proxy) as a, connect(proxy) as b:
        a.execute("SET work_mem = '7MB'")
        a.execute("SET myapp.tenant = 'tenant-a'")
        a.execute(f"SELECT set_config('search_path', '{schemas[0]}', false)")
        b.execute("SET myapp.tenant = 'tenant-b'")
        want_a = {"work_mem": "7MB", "myapp.tenant": "tenant-a", "search_path": schemas[0]}
        want_b = {**defaults, "myapp.tenant": "tenant-b"}
        for _ in range(3):
            assert backend_pid(a) == backend_pid(b), "pool_size 1 has one server"
            assert {n: setting(a, n) for n in want_a} == want_a
            assert {n: setting(b, n) for n in want_b} == want_b
            with connect(proxy) as c:
                assert {n: setting(c, n) for n in defaults} == defaults
    with connect(proxy) as c:
        assert {n: setting(c, n) for n in defaults} == defaults


def test_settings_under_concurrency(proxy_factory: Any, schemas: tuple[str, str]) -> None:
    """10 clients on 2 servers, each with its own settings, mixing autocommit statements and
    explicit transactions: every transaction sees exactly its client's settings."""
    proxy = proxy_factory(pool_size=2)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with connect(proxy) as conn:
                schema, letter = (schemas[0], "a") if i % 2 else (schemas[1], "b")
                conn.execute(f"SET myapp.tenant = 'tenant-{i}'")
                conn.execute(f"SET work_mem = '{i + 1}MB'")
                conn.execute(f"SET search_path = {schema}")
                want = (f"tenant-{i}", f"{i + 1}MB", letter)
                sql = (
                    "SELECT current_setting('myapp.tenant'), current_setting('work_mem'), v "
                    "FROM marker"
                )
                for r in range(15):
                    if r % 3 == 0:
                        with conn.transaction():
                            assert tuple(conn.execute(sql).fetchone() or ()) == want
                            conn.execute("SELECT pg_sleep(0.005)")
                    else:
                        assert tuple(conn.execute(sql).fetchone() or ()) == want, f"client {i}"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "clients still running after 60 s"
    assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"


# ---- pins ------------------------------------------------------------------------------------


def _assert_pinned(
    proxy: ProxyProcess, conn: psycopg.Connection[Any], pid: int, reason: str
) -> None:
    """While another client holds a server, `conn` keeps running on server `pid`."""
    with bystander(proxy) as (_, other):
        assert other != pid, f"{reason}: another client was given the pinned server"
        for _ in range(3):
            assert backend_pid(conn) == pid, f"{reason}: the pinned client changed servers"
    assert pinned(proxy, reason) == 1, show_pins(proxy)


def test_listen_pins_and_notifications_arrive(proxy_factory: Any) -> None:
    proxy = proxy_factory(ADMIN, pool_size=2)
    channel = f"ch_{uuid.uuid4().hex[:8]}"
    with connect(proxy) as listener:
        listener.execute(f"LISTEN {channel}")
        pid = backend_pid(listener)
        _assert_pinned(proxy, listener, pid, "listen")
        assert one(listener, "SELECT array_agg(c) FROM pg_listening_channels() c") == [channel]

        with connect(proxy) as notifier:
            notifier.execute(f"NOTIFY {channel}, 'first'")
            notifier.execute("SELECT pg_notify(%s, %s)", (channel, "second"))
        got = list(listener.notifies(timeout=5, stop_after=2))
        assert [(n.channel, n.payload) for n in got] == [(channel, "first"), (channel, "second")]
        assert backend_pid(listener) == pid

        # a notification that arrives while the listener runs a query of its own
        seen: list[psycopg.Notify] = []
        listener.add_notify_handler(seen.append)
        with connect(proxy) as notifier:
            notifier.execute(f"NOTIFY {channel}, 'during'")

        def poll() -> list[psycopg.Notify]:
            if not seen:
                listener.execute("SELECT pg_sleep(0.05)")
            return seen

        wait_for(poll, "a notification delivered during the listener's queries")
        assert [(n.channel, n.payload) for n in seen] == [(channel, "during")]
        listener.remove_notify_handler(seen.append)

        listener.execute("UNLISTEN *")
        wait_unpinned(proxy, "listen")
        assert show_pins(proxy)["listen"][1] >= 1, "the total counts past pins"
        with connect(proxy) as notifier:
            notifier.execute(f"NOTIFY {channel}, 'after unlisten'")
        assert list(listener.notifies(timeout=0.5)) == []


@pytest.mark.parametrize("clear", ["unlock", "unlock_all"])
def test_session_advisory_lock_pins(cluster: Any, proxy_factory: Any, clear: str) -> None:
    proxy = proxy_factory(ADMIN, pool_size=2)
    key = int(uuid.uuid4().int % 1_000_000_000)
    direct = psycopg.connect(cluster.primary.dsn("appdb"), autocommit=True)
    try:
        with connect(proxy) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            pid = backend_pid(conn)
            assert one(direct, f"SELECT pg_try_advisory_lock({key})") is False, "lock not held"
            _assert_pinned(proxy, conn, pid, "advisory_lock")
            # a transaction-level lock does not pin anything more
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (key + 1,))
            assert one(direct, f"SELECT pg_try_advisory_lock({key + 1})") is True
            one(direct, f"SELECT pg_advisory_unlock({key + 1})")
            if clear == "unlock":
                # true only in the session that holds the lock
                assert one(conn, f"SELECT pg_advisory_unlock({key})") is True
            else:
                conn.execute("SELECT pg_advisory_unlock_all()")
            wait_unpinned(proxy, "advisory_lock")
            assert one(direct, f"SELECT pg_try_advisory_lock({key})") is True, "lock still held"
            one(direct, f"SELECT pg_advisory_unlock({key})")
    finally:
        direct.close()


@pytest.mark.parametrize("clear", ["DROP TABLE tmp_pin", "DISCARD TEMP", "DISCARD ALL"])
def test_temp_table_pins(proxy_factory: Any, clear: str) -> None:
    proxy = proxy_factory(ADMIN, pool_size=2)
    with connect(proxy) as conn:
        conn.execute("CREATE TEMP TABLE tmp_pin (x int)")
        conn.execute("INSERT INTO tmp_pin VALUES (1), (2)")
        pid = backend_pid(conn)
        _assert_pinned(proxy, conn, pid, "temp_table")
        with bystander(proxy) as (_, other):
            assert other != pid
            conn.execute("INSERT INTO tmp_pin VALUES (3)")
            assert one(conn, "SELECT sum(x) FROM tmp_pin") == 6
            with conn.transaction():
                conn.execute("INSERT INTO tmp_pin VALUES (4)")
            assert one(conn, "SELECT count(*) FROM tmp_pin") == 4
        conn.execute(clear)
        wait_unpinned(proxy, "temp_table")
        assert one(conn, "SELECT to_regclass('pg_temp.tmp_pin')") is None


def test_holdable_cursor_pins(proxy_factory: Any) -> None:
    proxy = proxy_factory(ADMIN, pool_size=2)
    with connect(proxy) as conn:
        conn.execute("DECLARE held CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 10) g")
        assert conn.execute("FETCH 3 FROM held").fetchall() == [(1,), (2,), (3,)]
        pid = backend_pid(conn)
        _assert_pinned(proxy, conn, pid, "holdable_cursor")
        with bystander(proxy) as (_, other):
            assert other != pid
            assert conn.execute("FETCH 3 FROM held").fetchall() == [(4,), (5,), (6,)]
        conn.execute("CLOSE held")
        wait_unpinned(proxy, "holdable_cursor")
        # a cursor without HOLD ends with its transaction: no pin
        with conn.transaction():
            conn.execute("DECLARE plain CURSOR FOR SELECT 1")
            assert conn.execute("FETCH 1 FROM plain").fetchall() == [(1,)]
        assert pinned(proxy, "holdable_cursor") == 0


def test_set_role_pins(proxy_factory: Any, role: str) -> None:
    """SET ROLE pins until RESET ROLE. (SET SESSION AUTHORIZATION to another user needs a
    superuser, and a non-superuser naming itself changes nothing: the same check of
    current_user and session_user covers both.)"""
    proxy = proxy_factory(ADMIN, pool_size=2)
    with connect(proxy) as conn:
        conn.execute(f"SET ROLE {role}")
        pid = backend_pid(conn)
        _assert_pinned(proxy, conn, pid, "role")
        with bystander(proxy) as (other_conn, _):
            assert one(conn, "SELECT current_user") == role
            assert one(other_conn, "SELECT current_user") == APP_USER
        conn.execute("RESET ROLE")
        wait_unpinned(proxy, "role")
        assert one(conn, "SELECT current_user") == APP_USER


def test_show_pins_and_metrics_count_every_reason(proxy_factory: Any, role: str) -> None:
    http_port = free_port()
    proxy = proxy_factory(
        {"admin": {"users": [APP_USER], "http": f"127.0.0.1:{http_port}"}}, pool_size=8
    )
    url = f"http://127.0.0.1:{http_port}/metrics"

    def metrics() -> dict[tuple[str, str], float]:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in ("pgrouter_pinned_clients", "pgrouter_pins_total"):
                    key = (s.name, s.labels.get("reason", ""))
                    out[key] = out.get(key, 0.0) + s.value
        return out

    pin_sql = {
        "listen": ("LISTEN pins_ch", "UNLISTEN *"),
        "advisory_lock": ("SELECT pg_advisory_lock(770077)", "SELECT pg_advisory_unlock_all()"),
        "temp_table": ("CREATE TEMP TABLE pins_tmp (x int)", "DROP TABLE pins_tmp"),
        "holdable_cursor": ("DECLARE pins_cur CURSOR WITH HOLD FOR SELECT 1", "CLOSE pins_cur"),
        "role": (f"SET ROLE {role}", "RESET ROLE"),
        "sql_prepare": ("PREPARE pins_ps AS SELECT 1", "DEALLOCATE pins_ps"),
    }
    before = show_pins(proxy)
    assert all(pinned_now == 0 for pinned_now, _ in before.values()), before
    conns = {reason: connect(proxy) for reason in REASONS}
    try:
        for reason, conn in conns.items():
            conn.execute(pin_sql[reason][0])
        pins = show_pins(proxy)
        assert set(pins) == set(REASONS), f"SHOW PINS rows: {pins}"
        for reason in REASONS:
            pinned_now, total = pins[reason]
            assert pinned_now == 1, f"{reason}: {pins}"
            assert total == before.get(reason, (0, 0))[1] + 1, f"{reason}: {pins}"
        got = metrics()
        for reason in REASONS:
            assert got.get(("pgrouter_pinned_clients", reason)) == 1, f"{reason}: {got}"
            assert got.get(("pgrouter_pins_total", reason), 0) >= 1, f"{reason}: {got}"

        for reason, conn in conns.items():
            conn.execute(pin_sql[reason][1])
        pins = wait_for(
            lambda: (p := show_pins(proxy)) and all(p[r][0] == 0 for r in REASONS) and p,
            "every pin cleared",
        )
        for reason in REASONS:
            assert pins[reason][1] == before.get(reason, (0, 0))[1] + 1, f"{reason}: {pins}"
        got = metrics()
        for reason in REASONS:
            assert got.get(("pgrouter_pinned_clients", reason), 0) == 0, f"{reason}: {got}"
            assert got.get(("pgrouter_pins_total", reason), 0) >= 1, f"{reason}: {got}"
    finally:
        for conn in conns.values():
            conn.close()


def test_discard_all_clears_every_pin_and_setting(
    cluster: Any, proxy_factory: Any, role: str
) -> None:
    proxy = proxy_factory(ADMIN, pool_size=2)
    default_mem = server_default(cluster, "work_mem")
    with connect(proxy) as conn:
        conn.execute("SET work_mem = '7MB'")
        conn.execute("LISTEN discard_ch")
        conn.execute("SELECT pg_advisory_lock(880088)")
        conn.execute("CREATE TEMP TABLE discard_tmp (x int)")
        conn.execute("DECLARE discard_cur CURSOR WITH HOLD FOR SELECT 1")
        conn.execute("PREPARE discard_ps AS SELECT 1")
        conn.execute(f"SET ROLE {role}")
        pid = backend_pid(conn)
        pins = show_pins(proxy)
        assert all(pins.get(r, (0, 0))[0] == 1 for r in REASONS), pins
        with bystander(proxy) as (_, other):
            assert other != pid
            assert backend_pid(conn) == pid
        conn.execute("DISCARD ALL")
        wait_for(
            lambda: all(n == 0 for n, _ in show_pins(proxy).values()),
            f"every pin cleared by DISCARD ALL ({show_pins(proxy)})",
        )
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            conn.execute("EXECUTE discard_ps")
        with elsewhere(proxy, conn):
            assert setting(conn, "work_mem") == default_mem
            assert one(conn, "SELECT current_user") == APP_USER
            assert one(conn, "SELECT to_regclass('pg_temp.discard_tmp')") is None


def test_a_leaving_client_takes_its_pinned_state_along(
    cluster: Any, proxy_factory: Any, role: str
) -> None:
    """pool_size 1: the next client on the same server finds none of the state of a pinned
    client that left without clearing it."""
    proxy = proxy_factory(ADMIN, pool_size=1)
    key = 990099
    with connect(proxy) as conn:
        conn.execute("LISTEN leave_ch")
        conn.execute(f"SELECT pg_advisory_lock({key})")
        conn.execute("CREATE TEMP TABLE leave_tmp (x int)")
        conn.execute("DECLARE leave_cur CURSOR WITH HOLD FOR SELECT 1")
        conn.execute("PREPARE leave_ps AS SELECT 1")
        conn.execute("SET work_mem = '7MB'")
        conn.execute(f"SET ROLE {role}")
        pins = show_pins(proxy)
        assert all(pins.get(r, (0, 0))[0] == 1 for r in REASONS), pins
    wait_for(
        lambda: all(n == 0 for n, _ in show_pins(proxy).values()),
        "pins of a client that left cleared",
    )
    with psycopg.connect(cluster.primary.dsn("appdb"), autocommit=True) as direct:
        wait_for(
            lambda: one(direct, f"SELECT pg_try_advisory_lock({key})"),
            "the advisory lock of a client that left released",
        )
        one(direct, f"SELECT pg_advisory_unlock({key})")
    with connect(proxy) as after:
        row = after.execute(
            "SELECT current_user, current_setting('work_mem'), "
            "to_regclass('pg_temp.leave_tmp'), "
            "(SELECT count(*) FROM pg_listening_channels()), "
            "(SELECT count(*) FROM pg_cursors), "
            "(SELECT count(*) FROM pg_prepared_statements WHERE from_sql)"
        ).fetchone()
        assert row == (APP_USER, server_default(cluster, "work_mem"), None, 0, 0, 0)


def test_read_only_sessions_send_transactions_to_replicas(proxy_factory: Any) -> None:
    """default_transaction_read_only, set with SET or in the startup packet, sends explicit
    transactions that leave the access mode open to a replica; READ WRITE ones and sessions
    without it stay on the primary."""
    from tests.integration.test_prepared import ROUTED
    from tests.support import wait_replica_reads

    proxy = proxy_factory(ROUTED, pool_size=2)
    wait_replica_reads(proxy)

    def in_transaction(conn: psycopg.Connection[Any], begin: str = "BEGIN") -> bool:
        conn.execute(begin)
        on_replica = bool(one(conn, "SELECT pg_is_in_recovery()"))
        conn.execute("COMMIT")
        return on_replica

    def settled(conn: psycopg.Connection[Any]) -> bool:
        """Replicas are used once they replayed what this client may have written."""
        deadline = time.monotonic() + 5
        while not in_transaction(conn):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return all(in_transaction(conn) for _ in range(5))

    with connect(proxy, prepare_threshold=None) as conn:
        assert not in_transaction(conn), "a read-write session's BEGIN goes to the primary"
        conn.execute("SET default_transaction_read_only = on")
        assert settled(conn)
        assert not in_transaction(conn, "BEGIN READ WRITE")
        conn.execute("RESET default_transaction_read_only")
        assert not any(in_transaction(conn) for _ in range(5))
    options = "-c default_transaction_read_only=on"
    with connect(proxy, prepare_threshold=None, options=options) as conn:
        assert settled(conn)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("BEGIN")
            conn.execute("CREATE TEMP TABLE ro_refused (x int)")
        conn.execute("ROLLBACK")
