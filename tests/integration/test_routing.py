"""Read/write routing through the proxy on the real cluster (issue 3, DESIGN "Routing rules").

Every statement reports where it ran from inside itself (``pg_is_in_recovery()``: true on a
replica, ``inet_server_port()``). Statements that cannot report it (INSERT, COPY FROM, SELECT
INTO...) are checked through the replicas' own server logs: a write that reaches a replica fails
there with 25006 ("... in a read-only transaction") or "... during recovery", and PostgreSQL logs
that error before answering, even when pgrouter's misroute guard retries it on the primary
invisibly. `ReplicaLogs` reads those lines, so a misroute shows even when the user sees nothing.

The base test topology keeps reads on the primary; every test here turns routing on explicitly.
Tables, sequences and functions get a per-run suffix and are created directly on the primary
(as the `app` user) before any routed proxy starts, so pgrouter learns the VOLATILE functions at
start, and are dropped at the end.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support import (
    APP_USER,
    DELETE,
    ProxyProcess,
    ProxyStartError,
    address,
    base_topology,
    deep_merge,
    free_port,
    log_tail,
    start_proxy,
    wait_for,
    wait_replica_reads,
)

pytestmark = pytest.mark.timeout(120)

_SUFFIX = uuid.uuid4().hex[:8]
T = f"rt_t_{_SUFFIX}"  # (tag text, v int), one seed row
SEQ = f"rt_seq_{_SUFFIX}"
INS = f"rt_ins_{_SUFFIX}"  # user VOLATILE SQL function that inserts into T
RO_FN = f"rt_ro_{_SUFFIX}"  # user STABLE function that only reads
PROC = f"rt_proc_{_SUFFIX}"  # procedure returning pg_is_in_recovery() as its INOUT argument
S2 = f"rt_s2_{_SUFFIX}"
V = f"rt_v_{_SUFFIX}"  # a view hiding a writer: SELECT nextval(S2) AS n
C = f"rt_c_{_SUFFIX}"  # a counter (id 1, n) incremented directly on the primary
INTO = f"rt_into_{_SUFFIX}"  # created through the proxy by SELECT ... INTO
INS2 = f"rt_ins2_{_SUFFIX}"  # a VOLATILE writer created through the proxy

ROUTING_ON = {"reads": "replicas"}

# A write that reaches a replica fails with one of these (25006 or a recovery-only error).
_WRITE_ERRORS = ("read-only transaction", "during recovery", "recovery is in progress")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def connect(proxy: ProxyProcess, **kw: Any) -> psycopg.Connection[Any]:
    kw.setdefault("autocommit", True)
    kw.setdefault("prepare_threshold", None)
    kw.setdefault("connect_timeout", 10)
    return psycopg.connect(proxy.dsn("appdb"), **kw)


def routed_config(
    replicas: list[Any] | None = None, **routing: Any
) -> dict[str, dict[str, dict[str, Any]]]:
    db: dict[str, Any] = {"routing": {**ROUTING_ON, **routing}}
    if replicas is not None:
        db["replicas"] = replicas
    return {"databases": {"appdb": db}}


def start_routed(proxy_factory: Any, replicas: list[Any] | None = None, **routing: Any) -> Any:
    proxy = proxy_factory(routed_config(replicas, **routing))
    wait_replica_reads(proxy)
    return proxy


def landing(cur: psycopg.Cursor[Any]) -> Any:
    """The last column of the first row of the last result (None without rows)."""
    while cur.nextset():
        pass
    if cur.description is None:
        return None
    row = cur.fetchone()
    return None if row is None else row[-1]


def named(cluster: Any, ports: Counter[int]) -> dict[str, int]:
    """Landing counts by server name instead of port."""
    names = {n.port: getattr(n, "name", str(n.port)) for n in [cluster.primary, *cluster.replicas]}
    return {names.get(port, str(port)): count for port, count in ports.items()}


def primary_sql(cluster: Any, sql: str) -> str:
    return str(cluster.primary.sql(sql, dbname="appdb"))


class ReplicaLogs:
    """New lines in the replicas' server logs since `mark()`: where misrouted writes show."""

    def __init__(self, cluster: Any) -> None:
        self.nodes = [r for r in cluster.replicas if getattr(r, "log_path", None)]
        self.available = bool(self.nodes)
        self.offsets: dict[str, int] = {}
        self.mark()

    def mark(self) -> None:
        self.offsets = {n.name: self._size(n.log_path) for n in self.nodes}

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0

    def new_lines(self) -> list[tuple[str, str]]:
        out = []
        for node in self.nodes:
            with contextlib.suppress(OSError), open(node.log_path, "rb") as f:
                f.seek(self.offsets.get(node.name, 0))
                text = f.read().decode("utf-8", "replace")
                out += [(node.name, line) for line in text.splitlines()]
        return out

    def write_errors(self) -> list[str]:
        """Each write error a replica logged since mark(), with its STATEMENT line."""
        lines = self.new_lines()
        found = []
        for i, (name, line) in enumerate(lines):
            if "ERROR:" in line and any(m in line for m in _WRITE_ERRORS):
                stmt = ""
                if i + 1 < len(lines) and "STATEMENT:" in lines[i + 1][1]:
                    stmt = " | " + lines[i + 1][1].split("STATEMENT:", 1)[1].strip()
                found.append(f"{name}: {line.split('ERROR:', 1)[1].strip()}{stmt}")
        return found

    def assert_no_writes(self, proxy: ProxyProcess | None = None) -> None:
        errors = self.write_errors()
        log = f"\n--- proxy log:\n{log_tail(proxy)}" if proxy is not None and errors else ""
        assert not errors, "writes reached a replica (server logs):\n" + "\n".join(errors) + log


@pytest.fixture
def replica_logs(cluster: Any) -> ReplicaLogs:
    return ReplicaLogs(cluster)


@contextlib.contextmanager
def delayed(cluster: Any, nodes: Sequence[Any], delay: str = "2s") -> Iterator[None]:
    """recovery_min_apply_delay on `nodes`, checked to be in effect; reset and caught up after."""
    try:
        for node in nodes:
            node.set_config("recovery_min_apply_delay", delay)
        for _ in range(20):
            lsn = primary_sql(
                cluster,
                f"INSERT INTO {T} (tag, v) VALUES ('probe', 0);\nSELECT pg_current_wal_lsn();",
            )
            time.sleep(0.3)
            behind = [n.sql(f"SELECT pg_last_wal_replay_lsn() < '{lsn}'") == "t" for n in nodes]
            if all(behind):
                break
        else:
            pytest.fail(f"recovery_min_apply_delay={delay} never took effect on {nodes}")
        yield
    finally:
        for node in nodes:
            node.set_config("recovery_min_apply_delay", "0")
        cluster.wait_replicated(timeout=20)


@contextlib.contextmanager
def replay_paused(cluster: Any) -> Iterator[None]:
    try:
        for node in cluster.replicas:
            node.sql("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + 10
        while any(
            n.sql("SELECT pg_get_wal_replay_pause_state()") != "paused" for n in cluster.replicas
        ):
            assert time.monotonic() < deadline, "replicas never paused replay"
            time.sleep(0.05)
        yield
    finally:
        for node in cluster.replicas:
            node.sql("SELECT pg_wal_replay_resume()")
        cluster.wait_replicated(timeout=20)


# --------------------------------------------------------------------------------------------
# Module fixtures: the objects, and one routed proxy for the table and transaction tests
# --------------------------------------------------------------------------------------------

_SETUP = f"""
SET ROLE app;
CREATE TABLE {T} (tag text, v int);
INSERT INTO {T} VALUES ('seed', 0);
CREATE SEQUENCE {SEQ};
CREATE FUNCTION {INS}() RETURNS boolean LANGUAGE sql VOLATILE
    AS $$ INSERT INTO {T} (tag, v) VALUES ('ins', 1) RETURNING pg_is_in_recovery() $$;
CREATE FUNCTION {RO_FN}() RETURNS boolean LANGUAGE sql STABLE AS $$ SELECT pg_is_in_recovery() $$;
CREATE PROCEDURE {PROC}(INOUT r boolean) LANGUAGE plpgsql
    AS $$ BEGIN r := pg_is_in_recovery(); END $$;
CREATE SEQUENCE {S2};
CREATE VIEW {V} AS SELECT nextval('{S2}') AS n;
CREATE TABLE {C} (id int PRIMARY KEY, n bigint NOT NULL);
INSERT INTO {C} VALUES (1, 0);
"""

_TEARDOWN = f"""
DROP VIEW IF EXISTS {V};
DROP FUNCTION IF EXISTS {INS}(), {INS2}(), {RO_FN}();
DROP PROCEDURE IF EXISTS {PROC}(boolean);
DROP TABLE IF EXISTS {T}, {C}, {INTO};
DROP SEQUENCE IF EXISTS {SEQ}, {S2};
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


@pytest.fixture(scope="module")
def routed_proxy(
    cluster: Any, objects: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """One routed proxy (lsn read-your-writes, connection scope) for the stateless tests."""
    topology = deep_merge(base_topology(cluster, free_port()), routed_config())
    failure = ""
    try:
        proxy = start_proxy(topology, tmp_path_factory.mktemp("routing"), name="routed")
    except ProxyStartError as exc:
        failure = str(exc)
    if failure:
        pytest.fail(failure, pytrace=False)
    try:
        wait_replica_reads(proxy)
        yield proxy
    finally:
        proxy.stop()


# --------------------------------------------------------------------------------------------
# 1. Where each statement lands
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """Statements run in order on one fresh autocommit connection.

    lands: "replica" (the last result's last column is true), "primary" (false, or no
    rows: then the replica logs and `after` decide) or "any" (must just work). `params` go with
    the last statement (extended protocol; otherwise the simple protocol). `after` is SQL run
    on the primary afterwards that must answer "t".
    """

    id: str
    sql: tuple[str, ...]
    lands: str
    params: tuple[Any, ...] | None = None
    after: str | None = None


def _c(
    id: str,
    sql: str | tuple[str, ...],
    lands: str,
    params: tuple[Any, ...] | None = None,
    after: str | None = None,
) -> Case:
    return Case(id, (sql,) if isinstance(sql, str) else sql, lands, params, after)


_RIR = "pg_is_in_recovery()"
_INSERT_RET = f"INSERT INTO {T} (tag, v) VALUES ('%s', 1) RETURNING {_RIR}"

CASES = [
    _c("select", f"SELECT {_RIR}", "replica"),
    _c("select_extended", f"SELECT {_RIR} WHERE %s::int = 1", "replica", params=(1,)),
    _c("select_table", f"SELECT count(*), {_RIR} FROM {T}", "replica"),
    _c("values", f"VALUES (1, {_RIR})", "replica"),
    _c("builtin_volatile_read", f"SELECT random() >= 0, now() IS NOT NULL, {_RIR}", "replica"),
    _c("user_stable_function", f"SELECT {RO_FN}()", "replica"),
    _c("for_update", f"SELECT {_RIR} FROM {T} LIMIT 1 FOR UPDATE", "primary"),
    _c("for_share", f"SELECT {_RIR} FROM {T} LIMIT 1 FOR SHARE", "primary"),
    _c(
        "for_update_subquery",
        f"SELECT {_RIR} FROM (SELECT * FROM {T} LIMIT 1 FOR UPDATE) s",
        "primary",
    ),
    _c("nextval", f"SELECT nextval('{SEQ}'), {_RIR}", "primary"),
    _c("nextval_extended", f"SELECT nextval('{SEQ}'), %s::int, {_RIR}", "primary", params=(1,)),
    _c("txid_current", f"SELECT txid_current() > 0, {_RIR}", "primary"),
    _c("advisory_lock", f"SELECT pg_try_advisory_xact_lock(4242), {_RIR}", "primary"),
    _c("set_config", f"SELECT set_config('application_name', 'x', false), {_RIR}", "primary"),
    _c("pg_notify", f"SELECT pg_notify('rt_channel', 'x') IS NULL, {_RIR}", "primary"),
    _c("user_volatile_function", f"SELECT {INS}()", "primary"),
    _c("user_volatile_in_subquery", f"SELECT x FROM (SELECT {INS}() AS x) s", "primary"),
    _c(
        "writing_cte",
        f"WITH d AS (DELETE FROM {T} WHERE false RETURNING 1) SELECT {_RIR}",
        "primary",
    ),
    _c(
        "select_into",
        f"SELECT {_RIR} AS r INTO {INTO}",
        "primary",
        after=f"SELECT r = false FROM {INTO}",
    ),
    _c(
        "explain_analyze_insert",
        f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) "
        f"INSERT INTO {T} (tag, v) VALUES ('explain', 1)",
        "primary",
        after=f"SELECT count(*) > 0 FROM {T} WHERE tag = 'explain'",
    ),
    _c("copy_to", f"COPY (SELECT {_RIR}) TO STDOUT", "replica"),
    _c(
        "copy_from",
        f"COPY {T} (tag, v) FROM STDIN",
        "primary",
        after=f"SELECT count(*) > 0 FROM {T} WHERE tag = 'copy'",
    ),
    _c(
        "do",
        "DO $$BEGIN IF pg_is_in_recovery() THEN RAISE EXCEPTION 'DO ran on a replica'; "
        "END IF; END$$",
        "primary",
    ),
    _c("call", f"CALL {PROC}(NULL)", "primary"),
    _c("show", "SHOW server_version_num", "any"),
    _c(
        "set_then_select",
        (
            "SET application_name = 'rt-app'",
            f"SELECT current_setting('application_name') = 'rt-app', {_RIR}",
        ),
        "replica",
    ),
    _c("multi_read", f"SELECT 1; SELECT {_RIR}", "replica"),
    _c("multi_write_last", "SELECT 1; " + _INSERT_RET % "multi", "primary"),
    _c(
        "multi_write_first",
        f"INSERT INTO {T} (tag, v) VALUES ('multi', 2); SELECT {_RIR}",
        "primary",
    ),
    _c("hint_primary", f"/* pgrouter: primary */ SELECT {_RIR}", "primary"),
    _c("hint_primary_line", f"-- pgrouter: primary\nSELECT {_RIR}", "primary"),
    _c(
        "hint_primary_extended",
        f"/* pgrouter: primary */ SELECT {_RIR} WHERE %s::int = 1",
        "primary",
        params=(1,),
    ),
    _c("hint_not_leading", f"SELECT /* pgrouter: primary */ {_RIR}", "replica"),
    _c("hint_replica_read", f"/* pgrouter: replica */ SELECT {_RIR}", "replica"),
    _c("hint_replica_write", "/* pgrouter: replica */ " + _INSERT_RET % "hint", "primary"),
    _c(
        "hint_replica_nextval",
        f"/* pgrouter: replica */ SELECT nextval('{SEQ}'), {_RIR}",
        "primary",
    ),
    _c(
        "set_route_primary",
        ("SET pgrouter.route = primary", "SELECT 1", f"SELECT {_RIR}"),
        "primary",
    ),
    _c(
        "set_route_primary_extended",
        ("SET pgrouter.route = primary", f"SELECT {_RIR} WHERE %s::int = 1"),
        "primary",
        params=(1,),
    ),
    _c(
        "set_route_auto",
        (
            "SET pgrouter.route = primary",
            f"SELECT {_RIR}",
            "SET pgrouter.route = auto",
            f"SELECT {_RIR}",
        ),
        "replica",
    ),
    _c(
        "set_route_replica_write",
        ("SET pgrouter.route = replica", _INSERT_RET % "route"),
        "primary",
    ),
]


def run_statement(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] | None) -> Any:
    cur = conn.cursor()
    if sql.startswith("COPY") and sql.endswith("TO STDOUT"):
        with cur.copy(sql) as copy:
            data = b"".join(bytes(chunk) for chunk in copy)
        return {b"t\n": True, b"f\n": False}.get(data, data)
    if sql.startswith("COPY"):
        with cur.copy(sql) as copy:
            copy.write_row(("copy", 1))
        return None
    cur.execute(sql, params)
    return landing(cur)


# A read may stay on the primary for a moment (pgrouter re-reads pg_proc after DDL; a SET counts
# as a write for read-your-writes): a missed replica route is a cost, not a bug. So a statement
# expected on a replica is repeated on its connection for up to this long; a statement expected
# on the primary must never land on a replica, not even once.
REPLICA_PATIENCE = 1.5


def run_case(conn: psycopg.Connection[Any], case: Case) -> tuple[Any, int]:
    """The last statement's landing value, and how many times it ran."""
    result: Any = None
    for i, sql in enumerate(case.sql):
        params = case.params if i == len(case.sql) - 1 else None
        result = run_statement(conn, sql, params)
    runs = 1
    deadline = time.monotonic() + REPLICA_PATIENCE
    while case.lands == "replica" and result is False and time.monotonic() < deadline:
        time.sleep(0.05)
        result = run_statement(conn, case.sql[-1], case.params)
        runs += 1
    return result, runs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_statement_lands(
    case: Case, routed_proxy: ProxyProcess, cluster: Any, replica_logs: ReplicaLogs
) -> None:
    with connect(routed_proxy) as conn:
        try:
            result, runs = run_case(conn, case)
        except psycopg.Error as exc:
            pytest.fail(
                f"{case.sql!r} failed through the routed proxy: {exc.sqlstate} {exc}\n"
                f"--- replica write errors: {replica_logs.write_errors()}\n"
                f"--- proxy log:\n{log_tail(routed_proxy)}",
                pytrace=False,
            )
    if case.lands == "replica":
        assert result is True, (
            f"{case.sql!r} should run on a replica; still {result!r} after {runs} runs "
            f"over {REPLICA_PATIENCE}s"
        )
    elif case.lands == "primary":  # a value that is no boolean tells nothing (EXPLAIN)
        assert result is not True, f"{case.sql!r} ran on a replica; last value {result!r}"
    if case.after is not None:
        assert primary_sql(cluster, case.after) == "t", f"after {case.sql!r}: {case.after}"
    replica_logs.assert_no_writes(routed_proxy)


def test_function_created_through_the_proxy_is_learned(
    routed_proxy: ProxyProcess, cluster: Any, replica_logs: ReplicaLogs
) -> None:
    """DDL seen through the proxy refreshes the VOLATILE list: a new writer goes to the primary."""
    with connect(routed_proxy) as conn:
        conn.execute(
            f"CREATE FUNCTION {INS2}() RETURNS boolean LANGUAGE sql VOLATILE "
            f"AS $$ INSERT INTO {T} (tag, v) VALUES ('ins2', 1) RETURNING pg_is_in_recovery() $$"
        )
    cluster.wait_replicated()  # the function exists everywhere: a misroute is a 25006
    replica_logs.mark()
    for _ in range(3):
        with connect(routed_proxy) as conn:
            assert conn.execute(f"SELECT {INS2}()").fetchone() == (False,)
    replica_logs.assert_no_writes(routed_proxy)


# --------------------------------------------------------------------------------------------
# 2. Transactions
# --------------------------------------------------------------------------------------------

_WHERE = f"SELECT {_RIR}, inet_server_port(), pg_backend_pid()"

READ_ONLY_STARTS = {
    "begin_read_only": ("BEGIN READ ONLY",),
    "start_transaction_read_only": ("START TRANSACTION READ ONLY",),
    "begin_repeatable_read_read_only": ("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",),
    "set_transaction_read_only": ("BEGIN", "SET TRANSACTION READ ONLY"),
}


def _read_only_transaction(
    conn: psycopg.Connection[Any], start: Sequence[str]
) -> list[tuple[Any, ...] | None]:
    for sql in start:
        conn.execute(sql)
    seen = [conn.execute(_WHERE).fetchone() for _ in range(5)]
    seen += [conn.execute(_WHERE + " WHERE %s::int = 1", (1,)).fetchone() for _ in range(2)]
    conn.execute("COMMIT")
    return seen


def _check_read_only_transactions(
    proxy: ProxyProcess, start: Sequence[str], session: Sequence[str] = ()
) -> None:
    """Repeat the transaction (on one connection) until it ran on a replica; every run must
    stay on one backend."""
    attempts = []
    deadline = time.monotonic() + REPLICA_PATIENCE
    with connect(proxy) as conn:
        for sql in session:
            conn.execute(sql)
        while True:
            seen = _read_only_transaction(conn, start)
            attempts.append(seen)
            assert len({row[1:] for row in seen if row}) == 1, f"{start}: split: {seen}"
            if all(row is not None and row[0] is True for row in seen):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    pytest.fail(
        f"{[*session, *start]}: a READ ONLY transaction never ran on a replica in "
        f"{len(attempts)} tries: {attempts[-1]}",
        pytrace=False,
    )


@pytest.mark.parametrize("start", list(READ_ONLY_STARTS.values()), ids=list(READ_ONLY_STARTS))
def test_read_only_transaction_on_one_replica(
    start: tuple[str, ...], routed_proxy: ProxyProcess
) -> None:
    _check_read_only_transactions(routed_proxy, start)


def test_default_transaction_read_only_session(proxy_factory: Any, objects: None) -> None:
    """A session with default_transaction_read_only = on: its transactions may use a replica,
    and the setting never leaks to another client sharing the servers."""
    proxy = proxy_factory(deep_merge(routed_config(), {"databases": {"appdb": {"pool_size": 1}}}))
    wait_replica_reads(proxy)
    try:
        _check_read_only_transactions(
            proxy, ("BEGIN",), session=("SET default_transaction_read_only = on",)
        )
    finally:
        with connect(proxy) as conn:  # another client, on the same (only) primary server
            conn.execute("BEGIN")
            row = conn.execute(
                f"INSERT INTO {T} (tag, v) VALUES ('after-dtro', 1) RETURNING {_RIR}, "
                "current_setting('default_transaction_read_only')"
            ).fetchone()
            conn.execute("COMMIT")
            assert row == (False, "off"), row
            row = conn.execute(
                f"INSERT INTO {T} (tag, v) VALUES ('after-dtro', 2) RETURNING {_RIR}"
            ).fetchone()
            assert row == (False,), row


def test_serializable_read_only_transaction_works(routed_proxy: ProxyProcess) -> None:
    """A replica refuses SERIALIZABLE ("cannot use serializable mode in a hot standby"): such a
    READ ONLY transaction must still work (on the primary)."""
    with connect(routed_proxy) as conn:
        conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY")
        try:
            rows = [conn.execute(_WHERE).fetchone() for _ in range(3)]
        except psycopg.Error as exc:
            pytest.fail(f"SERIALIZABLE READ ONLY failed: {exc.sqlstate} {exc}", pytrace=False)
        conn.execute("COMMIT")
    assert len(set(rows)) == 1, rows


READ_WRITE_STARTS = {
    "begin": ("BEGIN",),
    "start_transaction": ("START TRANSACTION",),
    "begin_read_write": ("BEGIN READ WRITE",),
    "begin_repeatable_read": ("BEGIN ISOLATION LEVEL REPEATABLE READ",),
    "begin_then_lock": ("BEGIN", f"LOCK TABLE {T} IN SHARE MODE"),
}


@pytest.mark.parametrize("start", READ_WRITE_STARTS.values(), ids=READ_WRITE_STARTS.keys())
def test_read_write_transaction_on_primary(
    start: tuple[str, ...], routed_proxy: ProxyProcess, replica_logs: ReplicaLogs
) -> None:
    """An explicit read-write transaction that starts with a SELECT runs on the primary,
    on one backend, and can write after its reads."""
    with connect(routed_proxy) as conn:
        for sql in start:
            conn.execute(sql)
        seen = [conn.execute(_WHERE).fetchone() for _ in range(4)]
        seen.append(
            conn.execute(
                f"INSERT INTO {T} (tag, v) VALUES ('txn', 1) "
                f"RETURNING {_RIR}, inet_server_port(), pg_backend_pid()"
            ).fetchone()
        )
        conn.execute("COMMIT")
    assert all(row is not None and row[0] is False for row in seen), (
        f"{start}: a read-write transaction must run on the primary: {seen}"
    )
    assert len({row[1:] for row in seen if row}) == 1, f"{start}: split over backends: {seen}"
    replica_logs.assert_no_writes(routed_proxy)


def test_psycopg_transactions(routed_proxy: ProxyProcess) -> None:
    """psycopg's own transactions: read_only=True -> a replica, default -> the primary."""
    with connect(routed_proxy, autocommit=False) as conn:
        conn.read_only = True
        on_replica = 0
        deadline = time.monotonic() + REPLICA_PATIENCE
        while on_replica < 2:  # two transactions on a replica, each on one backend
            rows = [conn.execute(_WHERE).fetchone() for _ in range(3)]
            rows.append(conn.execute(_WHERE + " WHERE %s::int = 1", (1,)).fetchone())
            conn.commit()
            assert len({r[1:] for r in rows if r}) == 1, rows
            if all(r is not None and r[0] is True for r in rows):
                on_replica += 1
            else:
                assert time.monotonic() < deadline, f"read_only=True stays on the primary: {rows}"
                time.sleep(0.05)
    with connect(routed_proxy, autocommit=False) as conn:
        rows = [conn.execute(_WHERE).fetchone() for _ in range(3)]
        rows.append(conn.execute(_WHERE + " WHERE %s::int = 1", (1,)).fetchone())
        conn.commit()
        assert all(r is not None and r[0] is False for r in rows), rows
        assert len({r[1:] for r in rows if r}) == 1, rows


def test_pipeline_read_then_write(routed_proxy: ProxyProcess, replica_logs: ReplicaLogs) -> None:
    """A psycopg pipeline (one implicit transaction up to its Sync) that starts with a read and
    then writes: the write must work, and both run on one backend."""
    with connect(routed_proxy) as conn:
        try:
            with conn.pipeline():
                c1 = conn.execute(f"SELECT {_RIR}, inet_server_port() WHERE %s::int = 1", (1,))
                c2 = conn.execute(
                    f"INSERT INTO {T} (tag, v) VALUES ('pipe', %s) "
                    f"RETURNING {_RIR}, inet_server_port()",
                    (1,),
                )
            first, second = c1.fetchone(), c2.fetchone()
        except psycopg.Error as exc:
            pytest.fail(
                f"pipeline SELECT then INSERT failed: {exc.sqlstate} {exc}\n"
                f"--- replica write errors: {replica_logs.write_errors()}",
                pytrace=False,
            )
    assert second is not None and second[0] is False
    assert first == second, f"one implicit transaction ran on two servers: {first} {second}"


# --------------------------------------------------------------------------------------------
# 3. Read-your-writes and monotonic reads
# --------------------------------------------------------------------------------------------


def _insert_then_count(
    conn: psycopg.Connection[Any], tag: str, i: int, pause: float = 0.0
) -> tuple[int, bool, int]:
    """INSERT, optionally wait, then count this tag's rows (and say where the count ran)."""
    if i % 2:  # alternate the extended and the simple protocol
        conn.execute(f"INSERT INTO {T} (tag, v) VALUES (%s, %s)", (tag, i))
        time.sleep(pause)
        sql = f"SELECT count(*), {_RIR}, inet_server_port() FROM {T} WHERE tag = %s"
        row = conn.execute(sql, (tag,)).fetchone()
    else:
        conn.execute(f"INSERT INTO {T} (tag, v) VALUES ('{tag}', {i})")
        time.sleep(pause)
        sql = f"SELECT count(*), {_RIR}, inet_server_port() FROM {T} WHERE tag = '{tag}'"
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


# Pause between the INSERT and the SELECT of each round: mostly none; a few milliseconds (a
# replica may already have part of the WAL, the primary's async commit may not be written yet);
# sometimes long enough for the undelayed replica to replay the write and be chosen.
_RYW_PAUSES = (0.0, 0.003, 0.0, 0.006)
_RYW_LONG_PAUSE = 0.12


def test_read_your_writes_connection_scope(proxy_factory: Any, cluster: Any, objects: None) -> None:
    """With one replica 2 s behind, 1000 INSERT-then-SELECT rounds on one connection each see
    their own row, and stay fast (reads do not wait for the delayed replica)."""
    proxy = start_routed(proxy_factory)  # read_your_writes: lsn (the default)
    tag = f"ryw-{uuid.uuid4().hex[:8]}"
    misses, ports = [], Counter[int]()
    rounds = 1000
    with delayed(cluster, [cluster.replicas[0]]):
        started = time.monotonic()
        with connect(proxy) as conn:
            for i in range(rounds):
                pause = _RYW_LONG_PAUSE if i % 20 == 19 else _RYW_PAUSES[i % len(_RYW_PAUSES)]
                count, _, port = _insert_then_count(conn, tag, i, pause)
                ports[port] += 1
                if count != i + 1:
                    misses.append((i, pause, count, port))
        elapsed = time.monotonic() - started
    assert not misses, (
        f"{len(misses)}/{rounds} reads missed the row just written "
        f"(round, pause, count, port): {misses[:10]}; landings {named(cluster, ports)}"
        f"\n--- proxy log:\n{log_tail(proxy)}"
    )
    assert elapsed < 60, f"{rounds} rounds took {elapsed:.1f}s (landings {named(cluster, ports)})"
    print(f"read-your-writes: {rounds} rounds in {elapsed:.1f}s, landings {named(cluster, ports)}")


def test_read_your_writes_off_can_miss(proxy_factory: Any, cluster: Any, objects: None) -> None:
    """Control: without read-your-writes a delayed replica shows stale data (the test can fail)."""
    proxy = start_routed(proxy_factory, read_your_writes="off")
    tag = f"off-{uuid.uuid4().hex[:8]}"
    misses = 0
    with delayed(cluster, [cluster.replicas[0]]), connect(proxy) as conn:
        for i in range(20):
            count, _, _ = _insert_then_count(conn, tag, i)
            misses += count != i + 1
    assert misses > 0, "read_your_writes: off never read stale data from the delayed replica"


def test_read_your_writes_user_address_scope(
    proxy_factory: Any, cluster: Any, objects: None
) -> None:
    """user_address scope: a new connection per request still reads what the last one wrote."""
    proxy = start_routed(proxy_factory, read_your_writes_scope="user_address")
    tag = f"ua-{uuid.uuid4().hex[:8]}"
    misses, ports = [], Counter[int]()
    rounds = 1000
    started = time.monotonic()
    with delayed(cluster, [cluster.replicas[0]]):
        for i in range(rounds):
            with connect(proxy) as conn:
                conn.execute(f"INSERT INTO {T} (tag, v) VALUES (%s, %s)", (tag, i))
            with connect(proxy) as conn:
                sql = f"SELECT count(*), inet_server_port() FROM {T} WHERE tag = %s"
                row = conn.execute(sql, (tag,)).fetchone()
            assert row is not None
            ports[row[1]] += 1
            if row[0] != i + 1:
                misses.append((i, *row))
    elapsed = time.monotonic() - started
    assert not misses, f"new connections missed earlier writes (round, count, port): {misses[:10]}"
    print(f"user_address: {rounds} rounds in {elapsed:.1f}s, landings {named(cluster, ports)}")


def test_read_your_writes_duration(proxy_factory: Any, cluster: Any, objects: None) -> None:
    """read_your_writes: 2s -> after a write, reads stay on the primary for 2 s, then replicas."""
    proxy = start_routed(proxy_factory, read_your_writes="2s")
    tag = f"dur-{uuid.uuid4().hex[:8]}"
    sql = f"SELECT count(*), {_RIR} FROM {T} WHERE tag = %s"
    with connect(proxy) as conn:
        conn.execute(f"INSERT INTO {T} (tag, v) VALUES (%s, 1)", (tag,))
        wrote = time.monotonic()
        early = [conn.execute(sql, (tag,)).fetchone()]
        cluster.wait_replicated()  # replicas have the row now, the window still holds
        early.append(conn.execute(sql, (tag,)).fetchone())
        in_window = time.monotonic() - wrote < 1.8
        time.sleep(max(0.0, wrote + 2.4 - time.monotonic()))
        late = conn.execute(sql, (tag,)).fetchone()
    if in_window:
        assert early == [(1, False), (1, False)], f"reads within 2 s of a write: {early}"
    else:
        assert early[0] == (1, False), early
    assert late == (1, True), f"2.4 s after the write reads should use a replica again: {late}"


def test_monotonic_reads(proxy_factory: Any, cluster: Any, objects: None) -> None:
    """A reader never sees a counter (incremented on the primary) go backwards, although one
    replica is 2 s behind the other."""
    proxy = start_routed(proxy_factory)
    stop = threading.Event()
    writer_errors: list[BaseException] = []

    def writer() -> None:
        try:
            with psycopg.connect(cluster.primary.dsn("appdb"), autocommit=True) as w:
                while not stop.is_set():
                    w.execute(f"UPDATE {C} SET n = n + 1 WHERE id = 1")
                    time.sleep(0.01)
        except BaseException as exc:  # reported by the test
            writer_errors.append(exc)

    seen: list[tuple[int, int]] = []
    with delayed(cluster, [cluster.replicas[0]]):
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        try:
            time.sleep(1.0)
            with connect(proxy) as conn:
                deadline = time.monotonic() + 2.5
                while time.monotonic() < deadline:
                    row = conn.execute(f"SELECT n, inet_server_port() FROM {C} WHERE id = 1")
                    n, port = row.fetchone() or (None, None)
                    seen.append((n, port))
                    time.sleep(0.005)
            # The trap was set: the delayed replica really is behind the other one.
            stale, fresh = (
                int(r.sql(f"SELECT n FROM {C} WHERE id = 1", dbname="appdb"))
                for r in cluster.replicas
            )
        finally:
            stop.set()
            thread.join(10)
    assert not writer_errors, writer_errors
    back = [(seen[i - 1], seen[i]) for i in range(1, len(seen)) if seen[i][0] < seen[i - 1][0]]
    ports = Counter(p for _, p in seen)
    assert not back, (
        f"{len(back)} reads went backwards ((n, port) before -> after): {back[:5]}; "
        f"landings {named(cluster, ports)}"
    )
    assert seen and seen[-1][0] > seen[0][0], f"the counter never moved: {seen[:3]}"
    assert stale < fresh, f"replica0 is not behind replica1 ({stale} vs {fresh}): no trap"
    print(f"monotonic reads: {len(seen)} reads, landings {named(cluster, ports)}")


# --------------------------------------------------------------------------------------------
# 4. Spread over the replicas
# --------------------------------------------------------------------------------------------


def _spread(proxy: ProxyProcess, reads: int) -> Counter[int]:
    ports: Counter[int] = Counter()
    with connect(proxy) as conn:
        for _ in range(reads):
            row = conn.execute("SELECT inet_server_port()").fetchone()
            assert row is not None
            ports[row[0]] += 1
    return ports


@pytest.mark.parametrize(
    "weights,reads", [((1, 1), 400), ((1, 3), 1000)], ids=["equal", "weights_1_3"]
)
def test_reads_spread_by_weight(
    weights: tuple[int, int], reads: int, proxy_factory: Any, cluster: Any
) -> None:
    replicas = [
        {"host": r.host, "port": r.port, "weight": w}
        for r, w in zip(cluster.replicas, weights, strict=True)
    ]
    proxy = start_routed(proxy_factory, replicas=replicas)
    ports = _spread(proxy, reads)
    total = sum(weights)
    for replica, weight in zip(cluster.replicas, weights, strict=True):
        want = reads * weight / total
        got = ports[replica.port]
        assert abs(got - want) <= 0.2 * want, (
            f"{replica.name} (weight {weight}) got {got}/{reads} reads, want {want:.0f} ± 20%: "
            f"{named(cluster, ports)}"
        )


def test_reads_primary_and_any(proxy_factory: Any, cluster: Any) -> None:
    """reads: primary keeps every read on the primary; reads: any uses all three servers."""
    proxy = proxy_factory(routed_config(reads="primary"))
    time.sleep(0.5)
    assert set(_spread(proxy, 50)) == {cluster.primary.port}
    proxy = proxy_factory(routed_config(reads="any"))
    wait_replica_reads(proxy)
    ports = _spread(proxy, 300)
    assert set(ports) == {cluster.primary.port, *(r.port for r in cluster.replicas)}, named(
        cluster, ports
    )


# --------------------------------------------------------------------------------------------
# 5. Misroute guard, 6. no write on a replica, 7. no replica qualifies
# --------------------------------------------------------------------------------------------


_VIEW_READS = {
    "simple": (f"SELECT n FROM {V}", None),
    "extended": (f"SELECT n FROM {V} WHERE %s::int = 1", (1,)),
}


@pytest.mark.parametrize("protocol", _VIEW_READS)
def test_misroute_guard_view_hiding_a_writer(
    protocol: str, routed_proxy: ProxyProcess, cluster: Any, replica_logs: ReplicaLogs
) -> None:
    """SELECT n FROM v looks read-only but calls nextval: the replica's 25006 is retried on the
    primary and the user sees only the rows. Each try on a fresh connection, replicas caught up
    (no read-your-writes state keeps it on the primary); the replicas' logs prove it reached one."""
    sql, params = _VIEW_READS[protocol]
    values = []
    for _ in range(4):
        cluster.wait_replicated()
        with connect(routed_proxy) as conn:
            values.append(
                _view_value(routed_proxy, conn, sql, params, f"{protocol}, after {values}")
            )
    _check_view_values(values, replica_logs)
    # Logged once per fingerprint, not once per retry.
    logged = [
        line
        for line in routed_proxy.log_text().splitlines()
        if V in line and ("$1" in line) == (protocol == "extended")
    ]
    assert len(logged) == 1, f"{len(logged)} log lines for this fingerprint: {logged}"


def test_misroute_guard_with_a_named_prepared_statement(
    routed_proxy: ProxyProcess, cluster: Any, replica_logs: ReplicaLogs
) -> None:
    """The same view through a named prepared statement (psycopg, prepare_threshold=0): each
    run of the statement that a replica refuses runs again on the primary, which gets the
    statement prepared first; the user sees only the rows."""
    sql = f"SELECT n FROM {V} WHERE %s::int = 2"
    values = []
    cluster.wait_replicated()
    with connect(routed_proxy, prepare_threshold=0) as conn:
        for _ in range(5):
            values.append(_view_value(routed_proxy, conn, sql, (2,), f"prepared, after {values}"))
    _check_view_values(values, replica_logs)


def _view_value(
    proxy: ProxyProcess, conn: psycopg.Connection[Any], sql: str, params: Any, how: str
) -> Any:
    """The view's value; a failure shows the statement, how it ran and the proxy's log."""
    try:
        row = conn.execute(sql, params).fetchone()
    except psycopg.Error as exc:
        pytest.fail(
            f"{sql!r} ({how}) failed: {exc.sqlstate} {exc}\n--- proxy log:\n{log_tail(proxy)}",
            pytrace=False,
        )
    assert row is not None
    return row[0]


def _check_view_values(values: list[Any], replica_logs: ReplicaLogs) -> None:
    """Each run took a new sequence value (on the primary), and a replica refused at least once."""
    assert values == sorted(set(values)), f"nextval values not increasing: {values}"
    if replica_logs.available:
        assert replica_logs.write_errors(), "the view never reached a replica: guard not exercised"


def test_mixed_workload_never_writes_on_a_replica(
    routed_proxy: ProxyProcess, replica_logs: ReplicaLogs
) -> None:
    tag = f"mix-{uuid.uuid4().hex[:8]}"
    ops: list[tuple[str, tuple[Any, ...] | None]] = [
        (f"INSERT INTO {T} (tag, v) VALUES (%s, 1)", (tag,)),
        (f"SELECT count(*) FROM {T} WHERE tag = %s", (tag,)),
        (f"UPDATE {T} SET v = v + 1 WHERE tag = %s", (tag,)),
        (f"SELECT nextval('{SEQ}')", None),
        (f"SELECT {_RIR}", None),
        (f"SELECT {INS}()", None),
        (f"SELECT v FROM {T} WHERE tag = %s LIMIT 1 FOR UPDATE", (tag,)),
        (
            f"WITH u AS (UPDATE {T} SET v = v WHERE tag = %s RETURNING 1) SELECT count(*) FROM u",
            (tag,),
        ),
        (f"SELECT max(v) FROM {T} WHERE tag = %s", (tag,)),
        (f"SELECT 1; UPDATE {T} SET v = v WHERE false", None),
        (f"DELETE FROM {T} WHERE tag = %s AND v > 1000000", (tag,)),
    ]
    errors: list[str] = []

    def worker(n: int) -> None:
        try:
            with connect(routed_proxy) as conn:
                for i in range(70):
                    sql, params = ops[(i + n) % len(ops)]
                    if n == 3 and i % 7 == 0:  # explicit transactions too
                        with conn.transaction():
                            conn.execute(f"INSERT INTO {T} (tag, v) VALUES (%s, 2)", (tag,))
                            conn.execute(f"SELECT count(*) FROM {T} WHERE tag = %s", (tag,))
                    try:
                        conn.execute(sql, params)
                    except psycopg.Error as exc:
                        errors.append(f"{sql!r}: {exc.sqlstate} {exc}")
        except psycopg.Error as exc:
            errors.append(f"worker {n}: {exc.sqlstate} {exc}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, (
        f"{len(errors)} errors: {errors[:10]}\n--- proxy log:\n{log_tail(routed_proxy)}"
    )
    replica_logs.assert_no_writes(routed_proxy)


def test_no_replica_qualifies_reads_go_to_primary(
    proxy_factory: Any, cluster: Any, objects: None
) -> None:
    proxy = start_routed(proxy_factory)
    tag = f"paused-{uuid.uuid4().hex[:8]}"
    with replay_paused(cluster), connect(proxy) as conn:
        conn.execute(f"INSERT INTO {T} (tag, v) VALUES (%s, 1)", (tag,))
        rows = []
        for _ in range(5):
            rows.append(
                conn.execute(f"SELECT count(*), {_RIR} FROM {T} WHERE tag = %s", (tag,)).fetchone()
            )
            time.sleep(0.1)
    assert rows == [(1, False)] * 5, f"reads with both replicas paused after a write: {rows}"


def test_function_lists(proxy_factory: Any, cluster: Any, objects: None) -> None:
    """routing.read_only_functions lets a VOLATILE function that only reads use replicas;
    routing.writing_functions keeps a function that looks harmless on the primary."""
    volatile = f"rt_vol_{_SUFFIX}"
    primary_sql(
        cluster,
        f"CREATE OR REPLACE FUNCTION {volatile}() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1'",
    )
    cluster.wait_replicated()
    proxy = start_routed(proxy_factory, read_only_functions=[volatile], writing_functions=["abs"])
    with connect(proxy) as conn:
        deadline = time.monotonic() + 10
        while conn.execute(f"SELECT {volatile}(), {_RIR}").fetchone() != (1, True):
            assert time.monotonic() < deadline, "an allowed VOLATILE function never used a replica"
            time.sleep(0.05)
        for _ in range(10):
            assert conn.execute(f"SELECT abs(-1), {_RIR}").fetchone() == (1, False)


def test_time_lag_limit(proxy_factory: Any, cluster: Any, objects: None) -> None:
    """max_replica_lag as a duration: a replica whose replay is delayed beyond it takes no
    reads while the primary writes, shows its lag in SHOW BACKENDS, and rejoins once it caught
    up."""
    proxy = proxy_factory(routed_config(max_replica_lag="1s"), admin={"users": [APP_USER]})
    wait_replica_reads(proxy)
    slow, fast = cluster.replicas
    with delayed(cluster, [slow], "3s"), connect(proxy) as writer:
        ports: list[int] = []
        lags: list[float] = []
        start = time.monotonic()
        while time.monotonic() - start < 4.0:
            writer.execute(f"INSERT INTO {T} (tag, v) VALUES ('lag', 1)")
            if time.monotonic() - start > 1.5:  # beyond the 1s limit by now
                with connect(proxy) as reader:  # fresh: no monotonic-read position
                    row = reader.execute("SELECT inet_server_port()").fetchone()
                assert row is not None
                ports.append(row[0])
                with psycopg.connect(proxy.dsn(dbname="pgrouter"), autocommit=True) as admin:
                    for r in admin.execute("SHOW BACKENDS").fetchall():
                        if r[0] == "appdb" and int(r[2]) == slow.port:
                            lags.append(float(r[6]))
            time.sleep(0.1)
        assert ports and slow.port not in ports, f"the delayed replica served reads: {ports}"
        assert fast.port in ports, ports
        assert max(lags) > 1.0, lags
    deadline = time.monotonic() + 15
    with connect(proxy) as conn:
        while True:
            row = conn.execute("SELECT inet_server_port()").fetchone()
            if row is not None and row[0] == slow.port:
                break
            assert time.monotonic() < deadline, "the replica never rejoined the read set"
            time.sleep(0.05)


def test_hosts_without_roles_find_the_primary(
    proxy_factory: Any, cluster: Any, objects: None
) -> None:
    """`hosts:` lists the backends without roles, a replica first: writes still reach the
    primary and reads the replicas, as the health checks tell them apart."""
    hosts = [address(r) for r in cluster.replicas] + [address(cluster.primary)]
    proxy = proxy_factory(
        {
            "databases": {
                "appdb": {
                    "hosts": hosts,
                    "primary": DELETE,
                    "replicas": DELETE,
                    "routing": {"reads": "replicas"},
                }
            }
        }
    )
    tag = f"hosts-{uuid.uuid4().hex[:8]}"
    with connect(proxy) as conn:
        deadline = time.monotonic() + 10
        while True:
            try:
                row = conn.execute(_INSERT_RET % tag).fetchone()
                break
            except psycopg.errors.ReadOnlySqlTransaction:
                assert time.monotonic() < deadline, "writes never reached the primary"
                time.sleep(0.05)
        assert row == (False,)
        deadline = time.monotonic() + 10
        while conn.execute(f"SELECT {_RIR}").fetchone() != (True,):
            assert time.monotonic() < deadline, "reads never reached a replica"
            time.sleep(0.05)
        for i in range(5):
            assert conn.execute(_INSERT_RET % f"{tag}-{i}").fetchone() == (False,)


def test_reload_reaches_connected_clients(proxy_factory: Any, cluster: Any) -> None:
    """A reload that changes `routing` takes effect on connections already open, both ways,
    and the backend monitors keep their verdicts (no new "up" transitions)."""
    proxy = proxy_factory(deep_merge(routed_config(reads="primary"), {"log": {"level": "info"}}))
    where = "SELECT pg_is_in_recovery()"

    def ups() -> int:
        return proxy.log_text().count('"state": "up"') + proxy.log_text().count("state=up")

    with connect(proxy) as conn:
        assert conn.execute(where).fetchone() == (False,)
        wait_for(lambda: ups() == 1 + len(cluster.replicas), timeout=15)
        proxy.reload(deep_merge(proxy.config, routed_config(reads="replicas")))
        wait_for(lambda: conn.execute(where).fetchone() == (True,), timeout=15)
        proxy.reload(deep_merge(proxy.config, routed_config(reads="primary")))
        wait_for(lambda: conn.execute(where).fetchone() == (False,), timeout=15)
        assert all(conn.execute(where).fetchone() == (False,) for _ in range(20))
    assert ups() == 1 + len(cluster.replicas), f"monitors restarted:\n{log_tail(proxy)}"
