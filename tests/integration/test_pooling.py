"""Pooling through the proxy with real clients: the users' scenario, connect-per-request,
startup parameters on shared servers, session/statement modes, pool settings, many databases.

Server-side connection counts come from pg_stat_activity on the primary, read by a superuser
connection (so the sampler never counts itself: it is not the `app` user), restricted to the
backends whose client socket is one of the proxy process's sockets.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.support import APP_PASSWORD, APP_USER, address

pytestmark = pytest.mark.timeout(120)

# Pool connections only: each backend's health monitor has its own (one per backend, not
# per pool), named "pgrouter monitor".
_BACKENDS_SQL = (
    "SELECT pid, datname, client_port FROM pg_stat_activity "
    "WHERE usename = %s AND backend_type = 'client backend' AND datname = ANY(%s) "
    "AND pid <> pg_backend_pid() AND application_name <> 'pgrouter monitor'"
)
DBS = ("appdb", "otherdb")


def proxy_ports(pid: int) -> set[int]:
    """Local TCP ports of the sockets process `pid` holds (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as f:
            for line in f.read().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class Activity:
    """pg_stat_activity on the primary, read as the superuser.

    Only backends whose client socket belongs to the given proxy process count, so
    connections of other tests or tools never disturb the numbers.
    """

    def __init__(self, cluster: Any) -> None:
        self.conn = psycopg.connect(cluster.primary.dsn(), autocommit=True)

    def close(self) -> None:
        self.conn.close()

    def backends(
        self, proxy: Any, dbnames: tuple[str, ...] = DBS, user: str = APP_USER
    ) -> dict[str, set[int]]:
        rows = self.conn.execute(_BACKENDS_SQL, (user, list(dbnames))).fetchall()
        ports = proxy_ports(proxy.pid)  # after the query: every counted socket existed then
        found: dict[str, set[int]] = {db: set() for db in dbnames}
        for pid, db, port in rows:
            if port in ports:
                found[db].add(pid)
        return found

    def pids(self, proxy: Any, dbname: str = "appdb") -> set[int]:
        return self.backends(proxy, (dbname,))[dbname]

    def wait_pids(
        self, proxy: Any, predicate, dbname: str = "appdb", timeout: float = 5.0
    ) -> set[int]:
        """Poll until predicate(pids) holds; return the pids (the last seen ones on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids(proxy, dbname)
            if predicate(pids) or time.monotonic() > deadline:
                return pids
            time.sleep(0.05)


@pytest.fixture
def activity(cluster: Any) -> Iterator[Activity]:
    a = Activity(cluster)
    try:
        yield a
    finally:
        a.close()


class Sampler(threading.Thread):
    """Samples a proxy's server connections per database until stopped; keeps the maximum."""

    def __init__(self, cluster: Any, proxy: Any, dbnames: tuple[str, ...] = DBS) -> None:
        super().__init__(daemon=True)
        self.activity = Activity(cluster)
        self.proxy = proxy
        self.dbnames = dbnames
        self.maximum = dict.fromkeys(dbnames, 0)
        self.samples = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                for db, pids in self.activity.backends(self.proxy, self.dbnames).items():
                    self.maximum[db] = max(self.maximum[db], len(pids))
                self.samples += 1
                time.sleep(0.01)
        except BaseException as exc:
            self.error = exc
        finally:
            self.activity.close()

    def finish(self) -> dict[str, int]:
        self._stop_event.set()
        self.join(10)
        assert self.error is None, f"sampler failed: {self.error!r}"
        return self.maximum


def connect(proxy: Any, dbname: str = "appdb", **kw: Any) -> psycopg.Connection[Any]:
    # psycopg prepares (named statements) after 5 runs of a query; named prepared statements
    # in transaction mode are issue 5, so they are off here.
    kw.setdefault("prepare_threshold", None)
    kw.setdefault("connect_timeout", 10)
    return psycopg.connect(proxy.dsn(dbname), **kw)


def backend_pid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def run_threads(target, count: int, timeout: float = 90) -> list[BaseException]:
    """Run target(i) in `count` threads; return the exceptions raised."""
    errors: list[BaseException] = []
    lock = threading.Lock()

    def wrapper(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=wrapper, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    alive = sum(t.is_alive() for t in threads)
    if alive:
        errors.append(TimeoutError(f"{alive} client threads still running after {timeout}s"))
    return errors


# ---- the users' scenario ---------------------------------------------------------------------


def test_100_concurrent_clients_on_two_databases_with_pool_size_10(
    cluster: Any, proxy_factory: Any
) -> None:
    clients, rows_each, pool_size = 100, 8, 10
    table = f"scenario_{uuid.uuid4().hex[:8]}"
    dbs = DBS
    for db in dbs:
        cluster.primary.sql(
            f"CREATE TABLE {table} (client int NOT NULL, seq int NOT NULL, db text NOT NULL, "
            f"PRIMARY KEY (client, seq)); GRANT ALL ON {table} TO {APP_USER};",
            dbname=db,
        )
    proxy = proxy_factory(pool_size=pool_size)
    barrier = threading.Barrier(clients, timeout=60)

    def client(i: int) -> None:
        db = dbs[i % 2]
        with connect(proxy, db, autocommit=True) as conn:
            barrier.wait()
            for seq in range(rows_each):
                if seq % 2 == 0:  # an explicit transaction: write then read
                    with conn.transaction():
                        conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", (i, seq, db))
                        row = conn.execute(
                            f"SELECT count(*), current_database() FROM {table} WHERE client = %s",
                            (i,),
                        ).fetchone()
                else:  # autocommit statements
                    conn.execute(f"INSERT INTO {table} VALUES (%s, %s, %s)", (i, seq, db))
                    row = conn.execute(
                        f"SELECT count(*), current_database() FROM {table} WHERE client = %s",
                        (i,),
                    ).fetchone()
                assert row == (seq + 1, db), f"client {i} read {row} after {seq + 1} inserts"
                conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # a plain read

    sampler = Sampler(cluster, proxy, dbs)
    sampler.start()
    started = time.monotonic()
    errors = run_threads(client, clients)
    elapsed = time.monotonic() - started
    maximum = sampler.finish()
    try:
        assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"
        for db in dbs:
            got = cluster.primary.sql(
                f"SELECT client || ':' || count(*) FROM {table} GROUP BY client ORDER BY client",
                dbname=db,
            ).split()
            expected = [f"{i}:{rows_each}" for i in range(clients) if dbs[i % 2] == db]
            assert got == expected, f"rows missing or extra in {db}"
            assert (
                cluster.primary.sql(
                    f"SELECT count(*) FROM {table} WHERE db <> current_database()", dbname=db
                )
                == "0"
            )
        assert sampler.samples >= 3, f"only {sampler.samples} samples in {elapsed:.1f}s"
        for db in dbs:
            assert 1 <= maximum[db] <= pool_size, f"{db}: {maximum[db]} server connections"
    finally:
        for db in dbs:
            cluster.primary.sql(f"DROP TABLE IF EXISTS {table}", dbname=db)


def test_connect_per_request_clients_reuse_pooled_servers(
    cluster: Any, proxy_factory: Any, activity: Activity
) -> None:
    pool_size = 3
    proxy = proxy_factory(pool_size=pool_size)
    sampler = Sampler(cluster, proxy, ("appdb",))
    sampler.start()
    pids: set[int] = set()
    try:
        for i in range(300):
            with connect(proxy, autocommit=True) as conn:
                row = conn.execute("SELECT pg_backend_pid(), %s::int * 2", (i,)).fetchone()
                assert row is not None and row[1] == i * 2
                pids.add(row[0])
    finally:
        maximum = sampler.finish()
    assert len(pids) <= pool_size, f"300 clients were served by {len(pids)} server connections"
    assert sampler.samples >= 3
    assert 1 <= maximum["appdb"] <= pool_size
    assert len(activity.pids(proxy)) <= pool_size


# ---- startup parameters on shared servers ----------------------------------------------------


@pytest.fixture
def marker_schema(cluster: Any) -> Iterator[str]:
    """A schema in appdb holding a table `marker` that only its search_path finds."""
    schema = f"s_{uuid.uuid4().hex[:8]}"
    cluster.primary.sql(
        f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.marker (v text);"
        f"INSERT INTO {schema}.marker VALUES ('found in {schema}');"
        f"GRANT USAGE ON SCHEMA {schema} TO {APP_USER};"
        f"GRANT SELECT ON {schema}.marker TO {APP_USER};",
        dbname="appdb",
    )
    yield schema
    cluster.primary.sql(f"DROP SCHEMA {schema} CASCADE", dbname="appdb")


def _server_defaults(cluster: Any) -> dict[str, str]:
    with psycopg.connect(cluster.primary.dsn("appdb", APP_USER, APP_PASSWORD)) as conn:
        row = conn.execute(
            "SELECT current_setting('TimeZone'), current_setting('DateStyle'), "
            "extract(timezone FROM '2024-01-01 00:00:00+00'::timestamptz)::int"
        ).fetchone()
    assert row is not None
    return {"timezone": row[0], "datestyle": row[1], "offset": str(row[2])}


_CHECK_SQL = (
    "SELECT current_setting('application_name'), current_setting('search_path'), "
    "current_setting('statement_timeout'), current_setting('TimeZone'), "
    "current_setting('DateStyle'), "
    "extract(timezone FROM '2024-01-01 00:00:00+00'::timestamptz)::int::text, "
    "to_regclass('marker') IS NOT NULL, '2024-03-05'::date, pg_backend_pid()"
)


def _profiles(schema: str, defaults: dict[str, str]) -> dict[str, dict[str, Any]]:
    """name -> (psycopg connect kwargs, expected values of _CHECK_SQL[:6], marker visible)."""
    return {
        "a": {
            "kw": {
                "application_name": "client-a",
                "options": f"-c search_path={schema},public -c statement_timeout=1234 "
                "-c TimeZone=UTC -c DateStyle=German",
            },
            "want": ("client-a", f"{schema},public", "1234ms", "UTC", "German, DMY", "0", True),
        },
        "b": {
            "kw": {
                "application_name": "client-b",
                # written as the server reports it: the raw-string case is tested on its own
                "options": r"-c statement_timeout=5s -c TimeZone=Asia/Tokyo -c DateStyle=SQL,\ DMY",
            },
            "want": ("client-b", '"$user", public', "5s", "Asia/Tokyo", "SQL, DMY", "32400", False),
        },
        "c": {  # nothing set: the server defaults, whatever the previous user of the server set
            "kw": {},
            "want": (
                "",
                '"$user", public',
                "0",
                defaults["timezone"],
                defaults["datestyle"],
                defaults["offset"],
                False,
            ),
        },
    }


def _check(conn: psycopg.Connection[Any], name: str, want: tuple[Any, ...]) -> int:
    row = conn.execute(_CHECK_SQL).fetchone()
    assert row is not None
    assert row[:7] == want, f"client {name} saw {row[:7]}, expected {want}"
    assert row[7].isoformat() == "2024-03-05", f"client {name} parsed the date as {row[7]}"
    if want[6]:
        assert conn.execute("SELECT v FROM marker").fetchone() == (
            f"found in {want[1].split(',')[0]}",
        )
    conn.commit()
    return int(row[8])


def psql_cmd(proxy: Any, *args: str, dbname: str = "appdb") -> list[str]:
    host, port = proxy.host, str(proxy.port)
    return ["psql", "-XAtq", "-h", host, "-p", port, "-U", APP_USER, "-d", dbname, *args]


def _psql_settings(proxy: Any) -> list[str]:
    """A libpq client taking TimeZone/DateStyle from PGTZ/PGDATESTYLE; two transactions."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=APP_PASSWORD, PGTZ="America/New_York", PGDATESTYLE="Postgres, DMY")
    out = subprocess.run(
        psql_cmd(
            proxy,
            *["-c", "SELECT current_setting('TimeZone') || '|' || current_setting('DateStyle')"]
            * 2,
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_startup_parameters_follow_each_client_across_a_shared_server(
    cluster: Any, proxy_factory: Any, marker_schema: str
) -> None:
    proxy = proxy_factory(pool_size=1)
    profiles = _profiles(marker_schema, _server_defaults(cluster))
    conns = {name: connect(proxy, **p["kw"]) for name, p in profiles.items()}
    try:
        for name, conn in conns.items():  # what the driver was told at login
            want = profiles[name]["want"]
            assert conn.info.parameter_status("application_name") == want[0]
        pids = set()
        for round_ in range(4):
            for name, conn in conns.items():
                pids.add(_check(conn, name, profiles[name]["want"]))
            if round_ % 2 == 0:
                assert _psql_settings(proxy) == ["America/New_York|Postgres, DMY"] * 2
        assert len(pids) == 1, "pool_size 1: every client must have used the same server"
        # the settings are sent to the server, not only reported: they act on queries
        with pytest.raises(psycopg.errors.QueryCanceled):
            conns["a"].execute("SELECT pg_sleep(3)")
        conns["a"].rollback()
        assert conns["c"].execute("SELECT pg_sleep(1.3)::text").fetchone() == ("",)
        conns["c"].commit()
    finally:
        for conn in conns.values():
            conn.close()


def test_startup_parameters_under_concurrency(
    cluster: Any, proxy_factory: Any, marker_schema: str
) -> None:
    proxy = proxy_factory(pool_size=2)
    profiles = _profiles(marker_schema, _server_defaults(cluster))
    names = sorted(profiles) * 2

    def client(i: int) -> None:
        name = names[i]
        with connect(proxy, **profiles[name]["kw"]) as conn:
            for _ in range(15):
                _check(conn, name, profiles[name]["want"])

    errors = run_threads(client, len(names))
    assert not errors, f"{len(errors)} clients failed, first: {errors[0]!r}"


def test_startup_settings_are_reported_as_the_server_reports_them(
    cluster: Any, proxy_factory: Any
) -> None:
    options = "-c DateStyle=SQL,DMY -c TimeZone=Asia/Tokyo"
    with psycopg.connect(
        cluster.primary.dsn("appdb", APP_USER, APP_PASSWORD), options=options
    ) as d:
        direct = {k: d.info.parameter_status(k) for k in ("DateStyle", "TimeZone")}
        assert d.execute("SELECT '2024-03-05'::date").fetchone() == (dt.date(2024, 3, 5),)
    assert direct == {"DateStyle": "SQL, DMY", "TimeZone": "Asia/Tokyo"}
    proxy = proxy_factory(pool_size=1)
    for n in range(2):  # the second client finds the server already in its settings
        with connect(proxy, options=options) as conn:
            assert conn.execute("SELECT '2024-03-05'::date").fetchone() == (dt.date(2024, 3, 5),), (
                f"client {n + 1} misread a date"
            )
            reported = {k: conn.info.parameter_status(k) for k in direct}
            assert reported == direct, f"client {n + 1}"


# ---- pool modes ------------------------------------------------------------------------------


def test_session_mode_keeps_session_state_and_resets_it_for_the_next_client(
    cluster: Any, proxy_factory: Any
) -> None:
    proxy = proxy_factory(databases={"appdb": {"pool_mode": "session", "pool_size": 1}})
    with psycopg.connect(cluster.primary.dsn("appdb", APP_USER, APP_PASSWORD)) as direct:
        default_work_mem = direct.execute("SHOW work_mem").fetchone()
    assert default_work_mem != ("7MB",)

    with connect(proxy) as first:
        pid = backend_pid(first)
        first.execute("SET work_mem = '7MB'")
        first.execute("CREATE TEMP TABLE session_tmp (x int)")
        first.execute("INSERT INTO session_tmp VALUES (1), (2)")
        first.execute("PREPARE session_ps AS SELECT 40 + 2")
        first.commit()
        for _ in range(3):
            assert first.execute("SHOW work_mem").fetchone() == ("7MB",)
            assert first.execute("SELECT count(*) FROM session_tmp").fetchone() == (2,)
            assert first.execute("EXECUTE session_ps").fetchone() == (42,)
            assert backend_pid(first) == pid
            first.commit()

    with connect(proxy) as second:
        assert backend_pid(second) == pid, "pool_size 1: the same server serves the next client"
        assert second.execute("SHOW work_mem").fetchone() == default_work_mem
        assert second.execute("SELECT to_regclass('pg_temp.session_tmp')").fetchone() == (None,)
        assert second.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)


def test_statement_mode_runs_autocommit_statements(proxy_factory: Any) -> None:
    proxy = proxy_factory(pool_mode="statement", pool_size=2)
    with connect(proxy, autocommit=True) as conn:
        table = f"stmt_{uuid.uuid4().hex[:8]}"
        conn.execute(f"CREATE TABLE {table} (x int)")
        try:
            for i in range(5):
                conn.execute(f"INSERT INTO {table} VALUES (%s)", (i,))
            assert conn.execute(f"SELECT sum(x) FROM {table}").fetchone() == (10,)
            cur = conn.execute(f"SELECT 1; SELECT count(*) FROM {table}")
            assert cur.fetchone() == (1,) and cur.nextset() and cur.fetchone() == (5,)
        finally:
            conn.execute(f"DROP TABLE {table}")


def test_statement_mode_psql_sees_why_begin_is_refused(proxy_factory: Any) -> None:
    proxy = proxy_factory(pool_mode="statement")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = APP_PASSWORD
    out = subprocess.run(
        psql_cmd(proxy, "-c", "BEGIN", "-c", "SELECT 'inside'"),
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "transaction blocks not allowed in statement pooling mode" in out.stderr
    assert "inside" not in out.stdout


def test_statement_mode_explicit_begin_gets_an_error(proxy_factory: Any) -> None:
    proxy = proxy_factory(pool_mode="statement")
    with connect(proxy, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.Error, match="transaction blocks not allowed"):
            conn.execute("BEGIN")


# ---- pool settings ---------------------------------------------------------------------------


def test_min_pool_size_opens_servers_without_clients(
    proxy_factory: Any, activity: Activity
) -> None:
    proxy = proxy_factory(min_pool_size=3, pool_size=5)
    pids = activity.wait_pids(proxy, lambda p: len(p) >= 3)
    assert len(pids) == 3
    assert len(activity.wait_pids(proxy, lambda p: len(p) >= 3, dbname="otherdb")) == 3
    time.sleep(1.2)  # a janitor round: no more than min_pool_size
    assert activity.pids(proxy) == pids
    with connect(proxy) as conn:  # a client is served by one of them
        assert backend_pid(conn) in pids
    assert activity.pids(proxy) == pids


def _hold_servers(proxy: Any, count: int) -> set[int]:
    """`count` clients in a transaction at once (forcing `count` servers), then all commit."""
    conns = [connect(proxy) for _ in range(count)]
    try:
        pids = {backend_pid(c) for c in conns}
        for c in conns:
            c.commit()
    finally:
        for c in conns:
            c.close()
    assert len(pids) == count
    return pids


def test_server_idle_timeout_closes_idle_servers_down_to_min_pool_size(
    proxy_factory: Any, activity: Activity
) -> None:
    proxy = proxy_factory(server_idle_timeout="1s", min_pool_size=1, pool_size=5)
    assert len(activity.wait_pids(proxy, lambda p: len(p) >= 1)) == 1
    held = _hold_servers(proxy, 4)
    assert activity.pids(proxy) == held
    started = time.monotonic()
    remaining = activity.wait_pids(proxy, lambda p: len(p) == 1, timeout=6)
    assert len(remaining) == 1, f"idle servers not closed: {remaining}"
    assert time.monotonic() - started < 4.5
    time.sleep(1.2)
    assert len(activity.pids(proxy)) == 1
    with connect(proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_server_idle_timeout_keeps_min_pool_size_servers_open(
    proxy_factory: Any, activity: Activity
) -> None:
    proxy = proxy_factory(server_idle_timeout="1s", min_pool_size=2, pool_size=5)
    assert len(activity.wait_pids(proxy, lambda p: len(p) >= 2)) == 2
    held = _hold_servers(proxy, 4)
    activity.wait_pids(proxy, lambda p: len(p) <= 2, timeout=6)
    time.sleep(0.3)  # a replacement would be connected by now
    remaining = activity.pids(proxy)
    assert len(remaining) == 2
    assert remaining <= held, f"min_pool_size servers were closed and reopened: {remaining}"


def test_server_lifetime_replaces_servers_only_between_transactions(
    proxy_factory: Any, activity: Activity
) -> None:
    proxy = proxy_factory(server_lifetime="1s", pool_size=1)
    with connect(proxy) as conn:
        first = backend_pid(conn)
        conn.commit()
        time.sleep(2.5)  # past the lifetime and at least one janitor round
        second = backend_pid(conn)
        conn.commit()
        assert second != first, "a server past server_lifetime was reused"
        # a transaction longer than the lifetime keeps its server to the end
        started = conn.execute("SELECT now(), pg_backend_pid()").fetchone()
        time.sleep(2.0)
        assert conn.execute("SELECT now(), pg_backend_pid()").fetchone() == started, (
            "server replaced inside a transaction"
        )
        assert started is not None
        inside = started[1]
        conn.commit()
        assert backend_pid(conn) != inside
        conn.commit()


def test_query_wait_timeout_fails_the_waiting_client_and_keeps_it_usable(
    proxy_factory: Any,
) -> None:
    proxy = proxy_factory(query_wait_timeout="1s", pool_size=1)
    with connect(proxy) as holder, connect(proxy, autocommit=True) as waiter:
        backend_pid(holder)  # holds the only server in an open transaction
        started = time.monotonic()
        with pytest.raises(psycopg.Error) as excinfo:
            waiter.execute("SELECT %s::int", (1,))  # extended protocol: Parse ... Sync
        waited = time.monotonic() - started
        assert "query_wait_timeout" in str(excinfo.value)
        assert 0.9 <= waited < 3.5, f"failed after {waited:.2f}s"
        holder.commit()
        assert waiter.execute("SELECT 42").fetchone() == (42,)
        assert holder.execute("SELECT 43").fetchone() == (43,)
        holder.commit()
    assert "Traceback" not in proxy.log_text()


# ---- many databases behind one listener ------------------------------------------------------


def test_one_listener_serves_many_databases(cluster: Any, proxy_factory: Any) -> None:
    proxy = proxy_factory(
        databases={"aliasdb": {"dbname": "otherdb", "primary": address(cluster.primary)}}
    )
    table = f"only_app_{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        conns = {
            db: stack.enter_context(connect(proxy, db, autocommit=True))
            for db in ("appdb", "otherdb", "aliasdb")
        }
        conns["appdb"].execute(f"CREATE TABLE {table} (x int)")
        try:
            for _ in range(3):  # interleaved, each lands on its own database every time
                for db, conn in conns.items():
                    expected = "otherdb" if db == "aliasdb" else db
                    row = conn.execute(
                        "SELECT current_database(), current_user, to_regclass(%s) IS NOT NULL",
                        (table,),
                    ).fetchone()
                    assert row == (expected, APP_USER, db == "appdb")
        finally:
            conns["appdb"].execute(f"DROP TABLE {table}")
    with psycopg.connect(proxy.dsn("otherdb", "md5user", "md5-secret")) as conn:
        assert conn.execute("SELECT current_database(), current_user").fetchone() == (
            "otherdb",
            "md5user",
        )
