"""Statement classifier (router/classify.py): pure, no PostgreSQL needed.

Correctness first: every case that must reach the primary is listed explicitly; a statement is
read-only only when the parse tree proves it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import ast, parse_sql, visitors

from router.classify import (
    BUILTIN_WRITERS,
    VOLATILE_FUNCTIONS_SQL,
    Classifier,
    Target,
    Verdict,
    strip_hint,
)

VOLATILE = {"myfunc", "public.myfunc", "app.audit", "audit", "###", "public.###"}


@pytest.fixture
def clf() -> Classifier:
    c = Classifier()
    c.set_volatile_functions(VOLATILE)
    return c


# --- read-only: may go to a replica --------------------------------------------------------------

READ_ONLY = [
    ("SELECT 1", "select"),
    ("select abalance from pgbench_accounts where aid = 42", "select"),
    ("SELECT * FROM t WHERE id = $1", "select"),
    ("TABLE t", "select"),
    ("VALUES (1), (2)", "values"),
    ("SELECT 1 UNION ALL SELECT 2 EXCEPT SELECT 3", "select"),
    ("WITH x AS (SELECT 1 AS a) SELECT * FROM x", "select"),
    (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) TABLE r",
        "select",
    ),
    ("SELECT now(), random(), gen_random_uuid(), clock_timestamp(), pg_sleep(0)", "select"),
    ("SELECT count(*) FILTER (WHERE x > 1) OVER (PARTITION BY y) FROM t", "select"),
    ("SELECT * FROM generate_series(1, 10) g, LATERAL (SELECT g * 2) x", "select"),
    ("SELECT lo_get(1234)", "select"),
    ("SELECT pg_is_in_recovery(), inet_server_port(), current_setting('x')", "select"),
    ("SELECT 'nextval(1)', $$pg_advisory_lock$$, 'FOR UPDATE'", "select"),
    ("SELECT nextval FROM t", "select"),  # a column, not a call: a function needs an argument
    ("SELECT t.a, s.b FROM t JOIN s USING (id)", "select"),
    ("SELECT 1 -- pgrouter: primary", "select"),
    ("SELECT 1 /* pgrouter: primary */", "select"),
    ("SHOW search_path", "show"),
    ("SHOW ALL", "show"),
    ("EXPLAIN SELECT 1", "explain"),
    ("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM t", "explain"),
    ("EXPLAIN ANALYZE SELECT * FROM t", "explain"),
    ("COPY t TO STDOUT", "copy_to"),
    ("COPY t (a, b) TO STDOUT WITH (FORMAT csv)", "copy_to"),
    ("COPY (SELECT * FROM t WHERE a > 1) TO STDOUT", "copy_to"),
    ("SELECT 1; SELECT 2", "multi_statement"),
    ("SELECT 1; SHOW x; VALUES (1);", "multi_statement"),
    ("  \n\tSELECT 1  ;  ", "select"),
]


@pytest.mark.parametrize(("sql", "reason"), READ_ONLY)
def test_read_only(clf: Classifier, sql: str, reason: str) -> None:
    v = clf.classify(sql)
    assert (v.read_only, v.reason) == (True, reason), v
    assert v == Verdict(True, reason), "no flag may be set on a plain read"


# --- not read-only: must go to the primary -------------------------------------------------------

NOT_READ_ONLY = [
    # writing functions, anywhere in the tree
    ("SELECT nextval('s')", "writing_function:nextval"),
    ("SELECT pg_catalog.nextval('s')", "writing_function:pg_catalog.nextval"),
    ("SELECT NEXTVAL('s')", "writing_function:nextval"),
    ("SELECT * FROM t WHERE id = (SELECT nextval('s'))", "writing_function:nextval"),
    ("SELECT currval('s')", "writing_function:currval"),
    ("SELECT setval('s', 1)", "writing_function:setval"),
    ("SELECT pg_advisory_lock(1)", "writing_function:pg_advisory_lock"),
    ("SELECT pg_try_advisory_xact_lock(1, 2)", "writing_function:pg_try_advisory_xact_lock"),
    ("SELECT pg_advisory_unlock_all()", "writing_function:pg_advisory_unlock_all"),
    ("SELECT set_config('a', 'b', false)", "writing_function:set_config"),
    ("SELECT pg_notify('c', 'x')", "writing_function:pg_notify"),
    ("SELECT lo_import('/x')", "writing_function:lo_import"),
    ("SELECT lo_unlink(42)", "writing_function:lo_unlink"),
    ("SELECT lo_from_bytea(0, 'x')", "writing_function:lo_from_bytea"),
    ("SELECT txid_current()", "writing_function:txid_current"),
    ("SELECT pg_current_xact_id()", "writing_function:pg_current_xact_id"),
    ("SELECT pg_switch_wal()", "writing_function:pg_switch_wal"),
    ("SELECT pg_current_wal_lsn()", "writing_function:pg_current_wal_lsn"),
    ("SELECT pg_terminate_backend(1)", "writing_function:pg_terminate_backend"),
    ("SELECT pg_stat_reset()", "writing_function:pg_stat_reset"),
    ("SELECT dblink_exec('c', 'DELETE FROM t')", "writing_function:dblink_exec"),
    ("SELECT * FROM dblink('c', 'SELECT 1') AS x(a int)", "writing_function:dblink"),
    (
        "SELECT query_to_xml('DELETE FROM t RETURNING 1', true, false, '')",
        "writing_function:query_to_xml",
    ),
    (
        "SELECT * FROM pg_create_logical_replication_slot('s', 'pgoutput')",
        "writing_function:pg_create_logical_replication_slot",
    ),
    # ... in every clause the generic walk must reach
    ("SELECT a FROM t ORDER BY nextval('s')", "writing_function:nextval"),
    ("SELECT a FROM t LIMIT (SELECT nextval('s'))", "writing_function:nextval"),
    ("SELECT a FROM t GROUP BY a HAVING max(nextval('s')) > 0", "writing_function:nextval"),
    ("SELECT count(*) FILTER (WHERE nextval('s') > 1) FROM t", "writing_function:nextval"),
    ("SELECT CASE WHEN a THEN nextval('s') END FROM t", "writing_function:nextval"),
    ("SELECT COALESCE(a, nextval('s')::int) FROM t", "writing_function:nextval"),
    ("SELECT ARRAY[nextval('s')]", "writing_function:nextval"),
    (
        "SELECT * FROM t WHERE EXISTS (SELECT 1 WHERE pg_try_advisory_lock(1))",
        "writing_function:pg_try_advisory_lock",
    ),
    ("SELECT * FROM t WHERE a IN (SELECT setval('s', 5))", "writing_function:setval"),
    (
        "SELECT * FROM t JOIN LATERAL (SELECT pg_advisory_lock(t.id)) x ON true",
        "writing_function:pg_advisory_lock",
    ),
    ("SELECT * FROM nextval('s')", "writing_function:nextval"),
    ("SELECT * FROM ROWS FROM (generate_series(1, 2), nextval('s'))", "writing_function:nextval"),
    ("WITH x AS (SELECT nextval('s')) SELECT * FROM x", "writing_function:nextval"),
    ("SELECT 1 UNION SELECT nextval('s')", "writing_function:nextval"),
    ("VALUES (nextval('s'))", "writing_function:nextval"),
    ("SELECT ('s'::regclass).nextval", "writing_function:nextval"),  # attribute notation
    ("SELECT (1::bigint).pg_advisory_lock", "writing_function:pg_advisory_lock"),
    # learned VOLATILE user functions (bare, qualified, attribute notation, operators)
    ("SELECT myfunc()", "volatile_function:myfunc"),
    ("SELECT public.myfunc()", "volatile_function:public.myfunc"),
    ("SELECT other.myfunc()", "volatile_function:other.myfunc"),  # bare name learned: cautious
    ("SELECT MyFunc()", "volatile_function:myfunc"),
    ('SELECT "MyFunc"()', "volatile_function:myfunc"),
    ("SELECT app.audit(1)", "volatile_function:app.audit"),
    ("SELECT * FROM t WHERE a = ANY (SELECT myfunc())", "volatile_function:myfunc"),
    ("SELECT t.myfunc FROM t", "volatile_function:myfunc"),
    ("SELECT (t).myfunc FROM t", "volatile_function:myfunc"),
    ("SELECT 1 ### 2", "volatile_function:###"),
    ("SELECT 1 OPERATOR(public.###) 2", "volatile_function:public.###"),
    # row locks, INTO, data-modifying CTEs
    ("SELECT * FROM t FOR UPDATE", "locking_clause"),
    ("SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED", "locking_clause"),
    ("SELECT * FROM t FOR SHARE OF t", "locking_clause"),
    ("SELECT * FROM t FOR KEY SHARE NOWAIT", "locking_clause"),
    ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", "locking_clause"),
    ("WITH l AS (SELECT * FROM t FOR UPDATE) SELECT * FROM l", "locking_clause"),
    ("SELECT * INTO x FROM t", "select_into"),
    ("SELECT * INTO TEMP x FROM t", "select_into"),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "writing_cte"),
    ("WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i", "writing_cte"),
    ("WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT 1", "writing_cte"),
    (
        "WITH a AS (SELECT 1), b AS (WITH c AS (DELETE FROM t RETURNING 1) SELECT * FROM c) "
        "SELECT * FROM b",
        "writing_cte",
    ),
    (
        "WITH m AS (MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE RETURNING t.*) "
        "SELECT * FROM m",
        "writing_cte",
    ),
    # DML
    ("INSERT INTO t VALUES (1)", "write"),
    ("UPDATE t SET a = 1", "write"),
    ("DELETE FROM t", "write"),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "write"),
    ("TRUNCATE t", "write"),
    ("REFRESH MATERIALIZED VIEW mv", "write"),
    ("EXPLAIN ANALYZE INSERT INTO t VALUES (1)", "write"),
    ("EXPLAIN (ANALYZE) DELETE FROM t", "write"),
    ("EXPLAIN ANALYZE SELECT nextval('s')", "writing_function:nextval"),
    ("EXPLAIN UPDATE t SET a = 1", "write"),  # follows the explained statement
    ("EXPLAIN EXECUTE p(1)", "execute"),  # the prepared statement lives on one backend
    # COPY
    ("COPY t FROM STDIN", "copy_from"),
    ("COPY t (a) FROM STDIN WITH (FORMAT binary)", "copy_from"),
    ("COPY t TO '/tmp/t.csv'", "copy_to_file"),
    ("COPY t TO PROGRAM 'gzip > /tmp/t.gz'", "copy_to_file"),
    ("COPY (SELECT nextval('s')) TO STDOUT", "writing_function:nextval"),
    ("COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT", "write"),
    ("COPY (SELECT * FROM t FOR UPDATE) TO STDOUT", "locking_clause"),
    # utility and session state
    ("DO $$ BEGIN PERFORM 1; END $$", "do"),
    ("CALL p()", "call"),
    ("LOCK t", "lock"),
    ("LOCK TABLE t IN ACCESS SHARE MODE", "lock"),
    ("LISTEN c", "listen"),
    ("UNLISTEN *", "unlisten"),
    ("NOTIFY c, 'x'", "notify"),
    ("SET search_path = app", "set"),
    ("SET LOCAL statement_timeout = 0", "set"),
    ("RESET ALL", "set"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "set"),
    ("DISCARD ALL", "discard"),
    ("DEALLOCATE ALL", "deallocate"),
    ("PREPARE p AS SELECT 1", "prepare"),
    ("EXECUTE p", "execute"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "cursor"),
    ("FETCH 10 FROM c", "cursor"),
    ("CLOSE c", "cursor"),
    ("VACUUM t", "maintenance"),
    ("ANALYZE t", "maintenance"),
    ("CHECKPOINT", "maintenance"),
    ("REINDEX TABLE t", "maintenance"),
    ("LOAD 'auto_explain'", "utility"),
    ("SET CONSTRAINTS ALL DEFERRED", "utility"),
    # multi-statement
    ("SELECT 1; DELETE FROM t", "multi_statement_write"),
    ("DELETE FROM t; SELECT 1", "multi_statement_write"),
    ("SELECT 1; SELECT nextval('s')", "multi_statement_write"),
    ("BEGIN; SELECT 1; COMMIT", "multi_statement_write"),
    ("SELECT 1; SET pgrouter.route = replica", "multi_statement_write"),
    # garbage and nothing
    ("SELEC 1", "parse_error"),
    ("SELECT (1", "parse_error"),
    ("SELECT 1; SELEC 2", "parse_error"),
    ("SELECT 'unterminated", "parse_error"),
    ("", "empty"),
    ("   \n ", "empty"),
    (";", "empty"),
    (";;", "empty"),
    ("/* only a comment */", "empty"),
    ("-- only a comment", "empty"),
]


@pytest.mark.parametrize(("sql", "reason"), NOT_READ_ONLY)
def test_not_read_only(clf: Classifier, sql: str, reason: str) -> None:
    v = clf.classify(sql)
    assert (v.read_only, v.reason) == (False, reason), v


@pytest.mark.parametrize("name", sorted(BUILTIN_WRITERS))
def test_every_builtin_writer_is_caught(name: str) -> None:
    c = Classifier()
    for sql in (
        f"SELECT {name}(1)",
        f"SELECT pg_catalog.{name}(1)",
        f"SELECT * FROM t WHERE a = (SELECT {name}(1))",
        f"WITH x AS (SELECT {name}(1)) SELECT * FROM x",
    ):
        assert not c.classify(sql).read_only, sql


# --- DDL ----------------------------------------------------------------------------------------

DDL = [
    "CREATE TABLE t (a int)",
    "CREATE TEMP TABLE t (a int)",
    "CREATE TABLE t2 AS SELECT * FROM t",
    "CREATE MATERIALIZED VIEW mv AS SELECT 1",
    "CREATE VIEW v AS SELECT 1",
    "CREATE INDEX ON t (a)",
    "ALTER TABLE t ADD COLUMN b int",
    "DROP TABLE t",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1'",
    "ALTER FUNCTION f() STABLE",
    "DROP FUNCTION f()",
    "CREATE PROCEDURE p() LANGUAGE sql AS 'SELECT 1'",
    "DROP PROCEDURE p()",
    "CREATE EXTENSION dblink",
    "ALTER EXTENSION dblink UPDATE",
    "CREATE SCHEMA app",
    "DROP SCHEMA app CASCADE",
    "ALTER FUNCTION f() RENAME TO g",
    "ALTER FUNCTION f() SET SCHEMA app",
    "CREATE OPERATOR ### (FUNCTION = f, LEFTARG = int, RIGHTARG = int)",
    "CREATE TYPE pair AS (a int, b int)",
    "COMMENT ON TABLE t IS 'x'",
    "GRANT SELECT ON t TO app",
    "REVOKE SELECT ON t FROM app",
    "CREATE RULE r AS ON INSERT TO t DO INSTEAD NOTHING",
    "CREATE SEQUENCE s",
    "ALTER SYSTEM SET work_mem = '8MB'",
]


@pytest.mark.parametrize("sql", DDL)
def test_ddl_writes_catalog(clf: Classifier, sql: str) -> None:
    v = clf.classify(sql)
    assert not v.read_only
    assert v.writes_catalog, v


@pytest.mark.parametrize(
    "sql",
    ["SELECT 1", "INSERT INTO t VALUES (1)", "SET x = 1", "BEGIN", "CALL p()", "VACUUM t"],
)
def test_non_ddl_does_not_write_catalog(clf: Classifier, sql: str) -> None:
    assert not clf.classify(sql).writes_catalog


@pytest.mark.parametrize(
    "sql",
    [
        "DO $$BEGIN EXECUTE 'DROP FUNCTION f()'; END$$",
        "EXPLAIN ANALYZE CREATE TABLE t2 AS SELECT 1",
        "SELECT 1; CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "/* pgrouter: primary */ DROP FUNCTION f()",
    ],
)
def test_catalog_writes_through_wrappers(clf: Classifier, sql: str) -> None:
    v = clf.classify(sql)
    assert not v.read_only
    assert v.writes_catalog, v


# --- transactions -------------------------------------------------------------------------------

TRANSACTIONS = [
    # sql, begins, read_only_txn, ends
    ("BEGIN", True, False, False),
    ("begin transaction", True, False, False),
    ("BEGIN WORK", True, False, False),
    ("START TRANSACTION", True, False, False),
    ("BEGIN READ ONLY", True, True, False),
    ("BEGIN TRANSACTION READ ONLY", True, True, False),
    ("START TRANSACTION READ ONLY", True, True, False),
    ("BEGIN READ WRITE", True, False, False),
    ("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", True, True, False),
    ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", True, True, False),
    ("BEGIN READ ONLY, ISOLATION LEVEL READ COMMITTED, NOT DEFERRABLE", True, True, False),
    # SERIALIZABLE is not available on a hot standby: not replica-safe even when READ ONLY
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", True, False, False),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE", True, False, False),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", True, False, False),
    ("COMMIT", False, False, True),
    ("COMMIT AND CHAIN", False, False, True),
    ("END", False, False, True),
    ("END TRANSACTION", False, False, True),
    ("ROLLBACK", False, False, True),
    ("ABORT", False, False, True),
    ("PREPARE TRANSACTION 'x'", False, False, True),
    ("COMMIT PREPARED 'x'", False, False, False),
    ("ROLLBACK PREPARED 'x'", False, False, False),
    ("SAVEPOINT a", False, False, False),
    ("RELEASE SAVEPOINT a", False, False, False),
    ("ROLLBACK TO SAVEPOINT a", False, False, False),
]


@pytest.mark.parametrize(("sql", "begins", "read_only_txn", "ends"), TRANSACTIONS)
def test_transaction_control(
    clf: Classifier, sql: str, begins: bool, read_only_txn: bool, ends: bool
) -> None:
    v = clf.classify(sql)
    assert not v.read_only, "transaction control is the caller's job, never a replica read"
    assert v.reason == "transaction_control"
    assert (v.begins, v.read_only_txn, v.ends) == (begins, read_only_txn, ends), v


@pytest.mark.parametrize(
    ("sql", "read_only_txn"),
    [
        ("SET TRANSACTION READ ONLY", True),
        ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", True),
        ("SET TRANSACTION READ WRITE", False),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE READ ONLY", False),
        ("SET transaction_read_only = on", True),
        ("SET transaction_read_only TO true", True),
        ("SET transaction_read_only = off", False),
        ("SET default_transaction_read_only = on", False),  # session default: tracked as a SET
    ],
)
def test_set_transaction(clf: Classifier, sql: str, read_only_txn: bool) -> None:
    v = clf.classify(sql)
    assert (v.read_only, v.reason, v.begins, v.ends) == (False, "set", False, False)
    assert v.read_only_txn is read_only_txn


def test_multi_statement_flags(clf: Classifier) -> None:
    v = clf.classify("BEGIN READ ONLY; SELECT 1; COMMIT")
    assert (v.read_only, v.reason) == (False, "multi_statement_write")
    assert v.begins and v.ends
    assert not v.read_only_txn  # keep it simple: only a lone BEGIN READ ONLY qualifies


# --- SET pgrouter.route -------------------------------------------------------------------------

ROUTES = [
    ("SET pgrouter.route = replica", Target.REPLICA),
    ("SET pgrouter.route = primary", Target.PRIMARY),
    ("SET pgrouter.route = auto", "auto"),
    ("SET pgrouter.route TO replica", Target.REPLICA),
    ("SET pgrouter.route TO 'primary'", Target.PRIMARY),
    ("set PGROUTER.ROUTE = 'REPLICA'", Target.REPLICA),
    ('SET "pgrouter.route" = "replica"', Target.REPLICA),
    ("SET SESSION pgrouter.route = replica", Target.REPLICA),
    ("SET pgrouter.route TO DEFAULT", "auto"),
    ("RESET pgrouter.route", "auto"),
    ("  SET pgrouter.route = auto ;", "auto"),
    # PRIMARY is a reserved word: PostgreSQL's grammar rejects it unquoted, the proxy does not
    ("SET pgrouter.route TO primary", Target.PRIMARY),
    ("SET pgrouter.route = primary;", Target.PRIMARY),
    ('/* c */ set local "pgrouter.route" to PRIMARY -- why', Target.PRIMARY),
    ("SET SESSION PgRouter . Route = primary ;;", Target.PRIMARY),
]


@pytest.mark.parametrize(("sql", "route"), ROUTES)
def test_set_route(clf: Classifier, sql: str, route: Target | str) -> None:
    v = clf.classify(sql)
    assert (v.read_only, v.reason, v.sets_route) == (False, "set_route", route), v


@pytest.mark.parametrize(
    ("sql", "value"),
    [("SET pgrouter.route = sideways", "sideways"), ("SET pgrouter.route = 1", "1")],
)
def test_set_route_invalid(clf: Classifier, sql: str, value: str) -> None:
    v = clf.classify(sql)
    assert (v.read_only, v.reason, v.sets_route) == (False, "set_route_invalid", value)


@pytest.mark.parametrize(
    "sql",
    [
        "SET pgrouter.route = primary; SELECT 1",
        "SET pgrouter.other = primary",
        "SET pgrouter.route = primary key",
        "SELECT pgrouter.route = primary",
        "RESET pgrouter.route = primary",
    ],
)
def test_unquoted_primary_fallback_is_narrow(clf: Classifier, sql: str) -> None:
    v = clf.classify(sql)
    assert (v.read_only, v.reason, v.sets_route) == (False, "parse_error", None)


def test_other_settings_do_not_set_route(clf: Classifier) -> None:
    assert clf.classify("SET pgrouter.other = replica").sets_route is None
    assert clf.classify("SET application_name = 'replica'").sets_route is None
    assert clf.classify("SELECT set_config('pgrouter.route', 'replica', false)").sets_route is None


# --- hints --------------------------------------------------------------------------------------

STRIP = [
    ("/* pgrouter: replica */ SELECT 1", Target.REPLICA, " SELECT 1"),
    ("/* pgrouter: primary */ SELECT 1", Target.PRIMARY, " SELECT 1"),
    ("/*pgrouter:replica*/SELECT 1", Target.REPLICA, "SELECT 1"),
    ("  \n/*   PgRouter :  REPLICA   */\nSELECT 1", Target.REPLICA, "\nSELECT 1"),
    ("/* PGROUTER: Primary */SELECT 1", Target.PRIMARY, "SELECT 1"),
    ("-- pgrouter: replica\nSELECT 1", Target.REPLICA, "SELECT 1"),
    ("--pgrouter:PRIMARY\r\nSELECT 1", Target.PRIMARY, "SELECT 1"),
    ("-- pgrouter: replica", Target.REPLICA, ""),
    # not hints
    ("SELECT 1 /* pgrouter: replica */", None, None),
    ("SELECT /* pgrouter: replica */ 1", None, None),
    ("/* app */ /* pgrouter: replica */ SELECT 1", None, None),
    ("/* pgrouter: replicas */ SELECT 1", None, None),
    ("/* pgrouter: replica, please */ SELECT 1", None, None),
    ("/* pgrouter replica */ SELECT 1", None, None),
    ("-- pgrouter: replica please\nSELECT 1", None, None),
    ("SELECT '/* pgrouter: replica */'", None, None),
]


@pytest.mark.parametrize(("sql", "hint", "rest"), STRIP)
def test_strip_hint(sql: str, hint: Target | None, rest: str | None) -> None:
    assert strip_hint(sql) == (hint, sql if rest is None else rest)


def test_replica_hint_on_a_read(clf: Classifier) -> None:
    v = clf.classify("/* pgrouter: replica */ SELECT * FROM t")
    assert (v.read_only, v.reason, v.hint) == (True, "hint_replica", Target.REPLICA)
    v = clf.classify("-- PGROUTER: REPLICA\nSHOW x")
    assert (v.read_only, v.reason, v.hint) == (True, "hint_replica", Target.REPLICA)


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("/* pgrouter: replica */ INSERT INTO t VALUES (1)", "write"),
        ("/* pgrouter: replica */ SELECT nextval('s')", "writing_function:nextval"),
        ("/* pgrouter: replica */ SELECT myfunc()", "volatile_function:myfunc"),
        ("/* pgrouter: replica */ SELECT * FROM t FOR UPDATE", "locking_clause"),
        ("/* pgrouter: replica */ SELEC 1", "parse_error"),
        ("-- pgrouter: replica\nSELECT 1; DELETE FROM t", "multi_statement_write"),
        ("/* pgrouter: replica */", "empty"),
    ],
)
def test_replica_hint_never_overrides_a_write(clf: Classifier, sql: str, reason: str) -> None:
    v = clf.classify(sql)
    assert (v.read_only, v.reason, v.hint) == (False, reason, Target.REPLICA), v


@pytest.mark.parametrize(
    "sql",
    [
        "/* pgrouter: primary */ SELECT 1",
        "/* PgRouter:Primary */ TABLE t",
        "-- pgrouter: primary\nSHOW x",
        "/* pgrouter: primary */ DELETE FROM t",
        "/* pgrouter: primary */ SELEC 1",
    ],
)
def test_primary_hint(clf: Classifier, sql: str) -> None:
    v = clf.classify(sql)
    assert (v.read_only, v.reason, v.hint) == (False, "hint_primary", Target.PRIMARY), v


def test_primary_hint_keeps_transaction_flags(clf: Classifier) -> None:
    v = clf.classify("/* pgrouter: primary */ BEGIN READ ONLY")
    assert (v.reason, v.begins, v.read_only_txn) == ("hint_primary", True, True)


def test_hint_not_at_start_is_ignored(clf: Classifier) -> None:
    v = clf.classify("SELECT 1 /* pgrouter: primary */")
    assert (v.read_only, v.hint) == (True, None)
    v = clf.classify("INSERT INTO t VALUES (1) -- pgrouter: replica")
    assert (v.read_only, v.reason, v.hint) == (False, "write", None)


# --- learned volatile functions, allow and deny -------------------------------------------------


def test_volatile_functions_learned_later() -> None:
    c = Classifier()
    assert c.classify("SELECT myfunc()").read_only  # unknown yet: a STABLE/IMMUTABLE function
    c.set_volatile_functions(["MyFunc", "Public.MyFunc"])
    assert c.volatile_functions == frozenset({"myfunc", "public.myfunc"})
    v = c.classify("SELECT myfunc()")
    assert (v.read_only, v.reason) == (False, "volatile_function:myfunc")
    v = c.classify("SELECT public.myfunc()")
    assert (v.read_only, v.reason) == (False, "volatile_function:public.myfunc")
    c.set_volatile_functions([])
    assert c.classify("SELECT myfunc()").read_only


def test_qualified_only_volatile_name() -> None:
    c = Classifier()
    c.set_volatile_functions(["app.bump"])
    assert not c.classify("SELECT app.bump()").read_only
    assert not c.classify("SELECT x.app.bump()").read_only  # catalog.schema.name
    assert c.classify("SELECT other.bump()").read_only


def test_allow_list_exempts_writers_and_volatile() -> None:
    c = Classifier(allow=frozenset({"nextval", "MyFunc", "app.audit"}))
    c.set_volatile_functions(VOLATILE)
    assert c.classify("SELECT nextval('s')").read_only
    assert c.classify("SELECT pg_catalog.nextval('s')").read_only
    assert c.classify("SELECT myfunc(), public.myfunc()").read_only
    assert c.classify("SELECT app.audit(1)").read_only
    # a schema-qualified entry allows only the qualified call: a bare call may resolve elsewhere
    v = c.classify("SELECT audit(1)")
    assert (v.read_only, v.reason) == (False, "volatile_function:audit")
    # allow exempts functions, never row locks or writes
    assert not c.classify("SELECT nextval('s') FROM t FOR UPDATE").read_only
    assert not c.classify("WITH d AS (DELETE FROM t RETURNING 1) SELECT nextval('s')").read_only


def test_deny_list_marks_writers_and_wins_over_allow() -> None:
    c = Classifier(deny=frozenset({"refresh_cache", "app.touch", "now"}), allow=frozenset({"now"}))
    v = c.classify("SELECT refresh_cache()")
    assert (v.read_only, v.reason) == (False, "writing_function:refresh_cache")
    assert not c.classify("SELECT * FROM t WHERE x = app.touch(1)").read_only
    assert c.classify("SELECT touch(1)").read_only
    v = c.classify("SELECT now()")
    assert (v.read_only, v.reason) == (False, "writing_function:now")


def test_custom_writer_set_replaces_builtins() -> None:
    c = Classifier(writing_functions=frozenset({"Bump"}))
    assert c.classify("SELECT nextval('s')").read_only
    assert not c.classify("SELECT bump()").read_only


def test_builtin_writers_cover_the_required_families() -> None:
    required = {
        "nextval", "setval", "pg_advisory_lock", "pg_advisory_lock_shared",
        "pg_try_advisory_lock", "pg_advisory_xact_lock", "pg_notify", "set_config", "lo_create",
        "lo_creat", "lo_import", "lo_unlink", "lo_put", "lo_from_bytea", "lo_truncate",
        "lo_write", "lowrite", "txid_current", "txid_current_if_assigned", "pg_current_xact_id",
        "pg_current_xact_id_if_assigned", "pg_switch_wal", "pg_create_restore_point",
        "pg_start_backup", "pg_backup_start", "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot", "pg_drop_replication_slot", "pg_terminate_backend",
        "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "dblink_exec", "dblink",
        "pg_stat_reset",
    }  # fmt: skip
    assert required <= BUILTIN_WRITERS
    assert all(name == name.lower() for name in BUILTIN_WRITERS)
    # read-only functions the integration tests and users rely on stay off the list
    harmless = {"pg_is_in_recovery", "inet_server_port", "lo_get", "now", "random", "pg_sleep"}
    assert not harmless & BUILTIN_WRITERS


def test_volatile_functions_sql_is_a_read_only_query() -> None:
    v = Classifier().classify(VOLATILE_FUNCTIONS_SQL)
    assert (v.read_only, v.reason) == (True, "select")
    for needle in ("provolatile = 'v'", "pg_catalog", "information_schema", "pg_operator"):
        assert needle in VOLATILE_FUNCTIONS_SQL


# --- cache --------------------------------------------------------------------------------------


def test_cache_hits_and_misses() -> None:
    c = Classifier()
    assert (c.hits, c.misses, c.cached, c.parse_seconds) == (0, 0, 0, 0.0)
    first = c.classify("SELECT 1")
    assert (c.hits, c.misses) == (0, 1)
    assert c.parse_seconds > 0
    assert c.classify("SELECT 1") is first
    assert c.classify("SELECT 1") is first
    assert (c.hits, c.misses, c.cached) == (2, 1, 1)
    c.classify("SELECT  1")  # keyed by the exact text
    assert (c.hits, c.misses, c.cached) == (2, 2, 2)
    c.classify("SELEC 1")  # parse errors are cached too
    c.classify("SELEC 1")
    assert (c.hits, c.misses) == (3, 3)


def test_cache_is_lru() -> None:
    c = Classifier(cache_size=2)
    c.classify("SELECT a")
    c.classify("SELECT b")
    c.classify("SELECT a")  # refresh: SELECT b is now the oldest
    c.classify("SELECT c")  # evicts SELECT b
    assert c.cached == 2
    misses = c.misses
    c.classify("SELECT a")
    c.classify("SELECT c")
    assert c.misses == misses
    c.classify("SELECT b")
    assert c.misses == misses + 1


def test_texts_differing_only_in_numbers_share_a_verdict() -> None:
    c = Classifier()
    for aid in (1, 22, 333, 4.5):
        assert c.classify(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}").read_only
    assert c.misses == 1


def test_digits_in_names_never_share_a_verdict() -> None:
    """f1 and f2 are different functions: one may write, the other not."""
    c = Classifier()
    c.set_volatile_functions({"f1"})
    assert not c.classify("SELECT f1()").read_only
    assert c.classify("SELECT f2()").read_only
    assert not c.classify('SELECT "f1"()').read_only
    assert c.classify('SELECT "f2"()').read_only
    assert not c.classify("SELECT t.f1 FROM t").read_only  # attribute notation: f1(t)
    assert c.classify("SELECT t.f2 FROM t").read_only


def test_cache_size_zero_disables_caching() -> None:
    c = Classifier(cache_size=0)
    c.classify("SELECT 1")
    c.classify("SELECT 1")
    assert (c.hits, c.misses, c.cached) == (0, 2, 0)


def test_cache_byte_budget() -> None:
    c = Classifier(max_cache_bytes=16 * 200)  # one entry may hold at most 200 characters
    long_sql = "SELECT " + ", ".join(["1"] * 100)  # > 200 characters: never cached
    c.classify(long_sql)
    c.classify(long_sql)
    assert (c.misses, c.cached) == (2, 0)
    for i in range(100):
        c.classify(f"SELECT {i} AS padding_padding_padding")
    assert sum(len(f"SELECT {i} AS padding_padding_padding") for i in range(100)) > 16 * 200
    assert 0 < c.cached < 100


def test_set_volatile_functions_clears_the_cache_only_on_change() -> None:
    c = Classifier()
    assert c.classify("SELECT myfunc()").read_only
    c.set_volatile_functions({"myfunc"})
    assert c.cached == 0
    assert not c.classify("SELECT myfunc()").read_only
    misses = c.misses
    c.set_volatile_functions(["MYFUNC"])  # same set: the cache survives
    assert c.cached == 1
    c.classify("SELECT myfunc()")
    assert c.misses == misses
    hits = c.hits
    c.clear_cache()
    assert (c.cached, c.hits) == (0, hits)  # counters stay monotonic


def test_too_long_is_not_parsed_or_cached() -> None:
    c = Classifier(max_parse_length=100)
    sql = "SELECT " + ", ".join(["1"] * 100)
    v = c.classify(sql)
    assert (v.read_only, v.reason) == (False, "too_long")
    assert c.cached == 0
    v = c.classify("/* pgrouter: primary */ " + sql)
    assert (v.reason, v.hint) == ("hint_primary", Target.PRIMARY)
    assert c.cached == 0
    assert Classifier(max_parse_length=None).classify(sql).read_only


def test_verdict_is_immutable() -> None:
    v = Classifier().classify("SELECT 1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.read_only = False  # type: ignore[misc]


# --- robustness ---------------------------------------------------------------------------------

_SQL_BITS = st.sampled_from(
    [
        "SELECT", "INSERT", "DELETE", "WITH", "x", "AS", "(", ")", ";", "FROM", "t", "FOR",
        "UPDATE", "nextval", "'s'", "1", ",", "/*", "*/", "--", "\n", "$$", "INTO", "VALUES",
        "pgrouter:", "replica", "BEGIN", "READ", "ONLY", "COPY", "TO", "STDOUT", "EXPLAIN", ".",
    ]
)  # fmt: skip
_READ_KINDS = frozenset(
    {"select", "values", "show", "explain", "copy_to", "multi_statement", "hint_replica"}
)
_READ_STATEMENTS = (ast.SelectStmt, ast.VariableShowStmt, ast.ExplainStmt, ast.CopyStmt)


class _Oracle(visitors.Visitor):
    """An independent second opinion: pglast's own AST objects and visitor, not our JSON walk."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def visit(self, ancestors: Any, node: Any) -> None:
        if isinstance(node, ast.FuncCall):
            name = node.funcname[-1].sval.lower() if node.funcname else ""
            if name in BUILTIN_WRITERS:
                self.problems.append("writer")
        elif isinstance(node, ast.SelectStmt):
            if node.lockingClause or node.intoClause:
                self.problems.append("lock/into")
        elif isinstance(node, ast.CopyStmt):
            if node.is_from or node.filename:
                self.problems.append("copy")
        elif isinstance(node, (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)):
            self.problems.append("dml")


@settings(max_examples=400, deadline=None)
@given(st.lists(_SQL_BITS, max_size=14).map(" ".join) | st.text(max_size=60))
def test_never_raises_and_reads_only_when_proven(sql: str) -> None:
    v = Classifier().classify(sql)
    assert isinstance(v, Verdict)
    if not v.read_only:
        return
    assert v.reason in _READ_KINDS
    assert not (v.begins or v.ends or v.writes_catalog or v.sets_route)
    stmts = parse_sql(sql)
    assert stmts
    assert all(isinstance(raw.stmt, _READ_STATEMENTS) for raw in stmts)
    oracle = _Oracle()
    oracle(stmts)
    assert oracle.problems == [], sql


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT nextval('s')",
        "SELECT * FROM t WHERE id = (SELECT nextval('s'))",
        "SELECT * FROM t JOIN LATERAL (SELECT pg_advisory_lock(t.id)) x ON true",
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        "SELECT * INTO x FROM t",
        "SELECT 1 FROM t FOR UPDATE",
        "COPY t FROM STDIN",
    ],
)
def test_oracle_flags_known_writes(sql: str) -> None:
    """Keeps the oracle honest: it must flag the writes it claims to understand."""
    oracle = _Oracle()
    oracle(parse_sql(sql))
    assert oracle.problems, sql


@pytest.mark.parametrize(
    ("sql", "default_access"),
    [
        ("BEGIN", True),
        ("START TRANSACTION", True),
        ("BEGIN ISOLATION LEVEL REPEATABLE READ", True),
        ("BEGIN READ WRITE", False),
        ("BEGIN READ ONLY", False),
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", False),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY", False),
        ("COMMIT", False),
        ("SELECT 1", False),
    ],
)
def test_begin_leaves_access_mode_to_the_session(
    clf: Classifier, sql: str, default_access: bool
) -> None:
    """Only a BEGIN naming neither an access mode nor SERIALIZABLE follows the session's
    default_transaction_read_only."""
    assert clf.classify(sql).default_access is default_access
