"""Topology loading and validation (router/config.py): no network, no PostgreSQL."""

from __future__ import annotations

import copy
import dataclasses
import ssl
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import (
    DEFAULT_AUTH_QUERY,
    Admin,
    AuthRule,
    ClientTLS,
    Config,
    ConfigError,
    Endpoint,
    LogConfig,
    Routing,
    ServerTLS,
    User,
    check_main,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
EXAMPLE_ENV = {"PGROUTER_REPORTING_PASSWORD": "reporting-secret"}
VERIFIER = (
    "SCRAM-SHA-256$4096:cGdyb3V0ZXItZXhhbXBsZQ==$"
    "lObD0XJIQx4HuuNbwAnDkU5TqNBZf7BLAEQXQg3HK6A=:i0zuVNtDx9YzKyuWQIdq6wNP9WZt9ZpyXe9Aam+p15c="
)
MINIMAL: dict[str, Any] = {
    "users": {"app": {"password": "pw"}},
    "databases": {"appdb": {"primary": "10.0.0.1:5432"}},
}


def config_with(**changes: Any) -> dict[str, Any]:
    """MINIMAL with top-level keys replaced (None values delete the key)."""
    data = copy.deepcopy(MINIMAL)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def db_with(**keys: Any) -> dict[str, Any]:
    """MINIMAL whose only database `appdb` has these keys (plus primary unless given)."""
    database = {"primary": "10.0.0.1:5432", **keys}
    return config_with(databases={"appdb": database})


def errors_of(data: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env or {})
    return info.value.errors


# --------------------------------------------------------------------------------------------
# Example files
# --------------------------------------------------------------------------------------------


def test_full_example_parses() -> None:
    config = load_config(EXAMPLES / "topology.yaml", env=EXAMPLE_ENV)
    assert config.source == str(EXAMPLES / "topology.yaml")
    assert config.listen == (("127.0.0.1", 6432),)
    assert config.query_wait_timeout == 120.0
    assert config.max_packet_size == 256 * 1024 * 1024
    assert config.admin == Admin(users=("postgres",), http=("127.0.0.1", 9930))
    assert config.log == LogConfig()
    assert config.users["app"].password == "change-me"
    assert config.users["reporting"].password == "reporting-secret"
    assert config.users["postgres"] == User("postgres", None, VERIFIER)
    assert config.users["reporting"].max_client_connections == 50
    assert config.users["app"].max_client_connections is None
    assert config.auth_rules == (
        AuthRule(
            "scram-sha-256",
            frozenset({"pgrouter", "pgbouncer"}),
            None,
            (ip_network("127.0.0.1/32"), ip_network("::1/128")),
            0,
        ),
        AuthRule("reject", frozenset({"pgrouter", "pgbouncer"}), None, None, 1),
        AuthRule("md5", None, frozenset({"reporting"}), (ip_network("10.0.0.0/8"),), 2),
        AuthRule("scram-sha-256", index=3),
    )

    assert list(config.databases) == ["appdb", "billing", "appdb_session", "orders"]
    appdb = config.databases["appdb"]
    assert appdb.primary == Endpoint("10.0.0.1", 5432)
    assert appdb.replicas == (Endpoint("10.0.0.2"), Endpoint("10.0.0.3", 5432, 2))
    assert appdb.routing == Routing()
    billing = config.databases["billing"]
    assert billing.dbname == "billing"
    assert billing.primary.address == "billing-db.internal:5432"
    session = config.databases["appdb_session"]
    assert session.dbname == "appdb"
    assert session.replicas[1].address == "[fd00::3]:5432"
    assert (session.pool_mode, session.pool_size, session.server_reset_query) == ("session", 5, "")
    assert session.routing == Routing(
        reads="any",
        read_your_writes="duration",
        read_your_writes_window=2.0,
        max_replica_lag_bytes=None,
        max_replica_lag_seconds=10.0,
    )
    orders = config.databases["orders"]
    assert orders.primary == Endpoint("10.0.1.1", 5432, 1, "http://10.0.1.1:8008")
    assert [e.patroni for e in orders.replicas] == ["http://10.0.1.2:8008", "http://10.0.1.3:8008"]


def test_full_example_states_the_defaults() -> None:
    """The example documents every top-level key with its default value."""
    config = load_config(EXAMPLES / "topology.yaml", env=EXAMPLE_ENV)
    defaults = Config()
    for f in dataclasses.fields(Config):
        if f.name not in ("users", "admin", "databases", "source", "auth_rules"):
            assert getattr(config, f.name) == getattr(defaults, f.name), f.name
    data = yaml.safe_load((EXAMPLES / "topology.yaml").read_text())
    missing = {f.name for f in dataclasses.fields(Config)} - set(data) - {"source"}
    assert not missing


def test_minimal_example_parses() -> None:
    config = load_config(EXAMPLES / "minimal.yaml", env={"PGROUTER_APP_PASSWORD": "x"})
    assert list(config.databases) == ["appdb"]
    assert list(config.users) == ["app"]


# --------------------------------------------------------------------------------------------
# Defaults and inheritance
# --------------------------------------------------------------------------------------------


def test_defaults() -> None:
    config = parse_config({"databases": {"appdb": {"primary": "db1"}}}, env={})
    defaults = Config()
    assert config.listen == (("127.0.0.1", 6432),)
    for name in (
        "pool_mode",
        "pool_size",
        "min_pool_size",
        "max_client_conn",
        "server_idle_timeout",
        "server_lifetime",
        "server_connect_timeout",
        "query_wait_timeout",
        "client_login_timeout",
        "shutdown_timeout",
        "max_packet_size",
        "server_reset_query",
        "auth_type",
        "auth_rules",
        "max_user_client_connections",
        "max_db_client_connections",
        "auth_user",
        "auth_query",
        "auth_dbname",
        "auth_query_ttl",
        "admin",
        "log",
    ):
        assert getattr(config, name) == getattr(defaults, name), name
    assert config.auth_rules is None
    assert (config.max_user_client_connections, config.max_db_client_connections) == (0, 0)
    assert (config.auth_user, config.auth_dbname, config.auth_query_ttl) == (None, None, 60.0)
    assert config.auth_query == DEFAULT_AUTH_QUERY
    assert "pg_catalog.pg_shadow" in DEFAULT_AUTH_QUERY
    assert dict(config.users) == {}
    assert config.source is None
    db = config.databases["appdb"]
    assert db.name == db.dbname == "appdb"
    assert db.primary == Endpoint("db1", 5432, 1)
    assert db.replicas == ()
    assert (db.pool_mode, db.pool_size, db.min_pool_size) == ("transaction", 20, 0)
    assert db.server_reset_query == "DISCARD ALL"
    assert db.routing == Routing(max_replica_lag_bytes=1024 * 1024)
    assert db.max_db_client_connections == 0


def test_per_database_inheritance_and_overrides() -> None:
    data = {
        "pool_mode": "session",
        "pool_size": 7,
        "min_pool_size": 2,
        "server_reset_query": "RESET ALL",
        "databases": {
            "inherits": {"primary": "a"},
            "overrides": {
                "primary": "b",
                "pool_mode": "statement",
                "pool_size": 3,
                "min_pool_size": 1,
                "server_reset_query": None,
            },
        },
    }
    config = parse_config(data, env={})
    inherits, overrides = config.databases["inherits"], config.databases["overrides"]
    assert (inherits.pool_mode, inherits.pool_size, inherits.min_pool_size) == ("session", 7, 2)
    assert inherits.server_reset_query == "RESET ALL"
    assert (overrides.pool_mode, overrides.pool_size, overrides.min_pool_size) == (
        "statement",
        3,
        1,
    )
    assert overrides.server_reset_query == ""


def test_objects_are_frozen_and_hashable() -> None:
    config = parse_config(MINIMAL, env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.pool_size = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.databases["x"] = config.databases["appdb"]  # type: ignore[index]
    assert hash(config) == hash(parse_config(MINIMAL, env={}))
    assert hash(config.databases["appdb"])


def test_user_repr_hides_secrets() -> None:
    config = parse_config(config_with(users={"a": {"password": "hunter2"}}), env={})
    assert "hunter2" not in repr(config)
    assert "hunter2" not in repr(config.users["a"])


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("0.0.0.0:7000", (("0.0.0.0", 7000),)),
        ("localhost", (("localhost", 6432),)),
        ("[::1]:6433", (("::1", 6433),)),
        ("[::]", (("::", 6432),)),
        (["127.0.0.1:1", "[::1]:2"], (("127.0.0.1", 1), ("::1", 2))),
    ],
)
def test_listen_forms(listen: object, expected: tuple[tuple[str, int], ...]) -> None:
    assert parse_config(config_with(listen=listen), env={}).listen == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("db", Endpoint("db", 5432)),
        ("db:6000", Endpoint("db", 6000)),
        ("[fd00::1]:6000", Endpoint("fd00::1", 6000)),
        ("[fd00::1]", Endpoint("fd00::1", 5432)),
        ("fd00::1", Endpoint("fd00::1", 5432)),
        ({"host": "db"}, Endpoint("db", 5432, 1)),
        ({"host": "db", "port": 1, "weight": 1000}, Endpoint("db", 1, 1000)),
        ({"host": "[::1]", "port": 5433}, Endpoint("::1", 5433)),
    ],
)
def test_endpoint_forms(value: object, expected: Endpoint) -> None:
    config = parse_config(db_with(primary=value), env={})
    assert config.databases["appdb"].primary == expected


def test_endpoint_address() -> None:
    assert Endpoint("db", 6000).address == "db:6000"
    assert Endpoint("::1").address == "[::1]:5432"


@pytest.mark.parametrize(
    ("routing", "expected"),
    [
        ({}, Routing()),
        (None, Routing()),
        ({"reads": "primary"}, Routing(reads="primary")),
        ({"read_your_writes": False}, Routing(read_your_writes="off")),  # YAML `off`
        ({"read_your_writes": "off"}, Routing(read_your_writes="off")),
        ({"read_your_writes": "lsn"}, Routing(read_your_writes="lsn")),
        (
            {"read_your_writes": "500ms"},
            Routing(read_your_writes="duration", read_your_writes_window=0.5),
        ),
        ({"read_your_writes": 3}, Routing(read_your_writes="duration", read_your_writes_window=3)),
        (
            {"read_your_writes_scope": "user_address"},
            Routing(read_your_writes_scope="user_address"),
        ),
        ({"max_replica_lag": "16MB"}, Routing(max_replica_lag_bytes=16 * 1024 * 1024)),
        ({"max_replica_lag": 4096}, Routing(max_replica_lag_bytes=4096)),
        ({"max_replica_lag": "4096"}, Routing(max_replica_lag_bytes=4096)),
        (
            {"max_replica_lag": "5s"},
            Routing(max_replica_lag_bytes=None, max_replica_lag_seconds=5.0),
        ),
        (
            {"max_replica_lag": "2m"},
            Routing(max_replica_lag_bytes=None, max_replica_lag_seconds=120.0),
        ),
        ({"max_replica_lag": "off"}, Routing(max_replica_lag_bytes=None)),
        ({"max_replica_lag": None}, Routing(max_replica_lag_bytes=None)),
        (
            {"read_only_functions": ["Report_Total", "app.now_ish"], "writing_functions": []},
            Routing(read_only_functions=frozenset({"report_total", "app.now_ish"})),
        ),
        (
            {"writing_functions": ["audit_read"]},
            Routing(writing_functions=frozenset({"audit_read"})),
        ),
        ({"classifier_cache_size": 0}, Routing(classifier_cache_size=0)),
    ],
)
def test_routing(routing: object, expected: Routing) -> None:
    config = parse_config(db_with(routing=routing), env={})
    assert config.databases["appdb"].routing == expected


# --------------------------------------------------------------------------------------------
# Durations and sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("100us", 0.0001),
        (" 10 s ", 10.0),
        ("30", 30.0),
        ("0", 0.0),
        ("5min", 300.0),
        ("2S", 2.0),
        (0, 0.0),
        (7, 7.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "abc",
        "5x",
        "-1s",
        "s",
        "1h30m",
        "1e3",
        "5 5s",
        -1,
        -0.5,
        True,
        False,
        None,
        [1],
        float("nan"),
        float("inf"),
    ],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("16MB", 16 * 1024**2),
        ("1kB", 1024),
        ("1KB", 1024),
        ("1KiB", 1024),
        ("512", 512),
        ("512B", 512),
        ("2GB", 2 * 1024**3),
        ("1TB", 1024**4),
        ("1.5kB", 1536),
        ("0", 0),
        (1024, 1024),
        (2048.0, 2048),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size
    assert isinstance(parse_size(value), int)


@pytest.mark.parametrize(
    "value",
    ["", "MB", "16M", "5m", "1.3B", "-1kB", "16 MBs", -1, 1.5, True, None, {}],
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


def test_durations_and_sizes_in_config() -> None:
    config = parse_config(
        config_with(query_wait_timeout="250ms", server_lifetime=90, max_packet_size="1MB"),
        env={},
    )
    assert config.query_wait_timeout == 0.25
    assert config.server_lifetime == 90.0
    assert config.max_packet_size == 1024 * 1024


# --------------------------------------------------------------------------------------------
# Validation errors: each names the YAML path
# --------------------------------------------------------------------------------------------

ERROR_CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown top-level key with hint",
        config_with(pool_sise=5),
        "pool_sise: unknown key (did you mean 'pool_size'?)",
    ),
    (
        "unknown database key with hint",
        db_with(replica=["a"]),
        "databases.appdb.replica: unknown key (did you mean 'replicas'?)",
    ),
    (
        "unknown key without a close match",
        db_with(routing={"zzz": 1}),
        "databases.appdb.routing.zzz: unknown key (expected one of: reads, read_your_writes, "
        "read_your_writes_scope, max_replica_lag, lagging_replicas, read_only_functions, "
        "writing_functions, classifier_cache_size)",
    ),
    (
        "unknown endpoint key",
        db_with(replicas=[{"host": "a", "wieght": 2}]),
        "databases.appdb.replicas[0].wieght: unknown key (did you mean 'weight'?)",
    ),
    ("unknown user key", config_with(users={"u": {"pasword": "x"}}), "users.u.pasword: "),
    ("unknown admin key", config_with(admin={"user": ["a"]}), "admin.user: unknown key"),
    ("unknown log key", config_with(log={"lvl": "info"}), "log.lvl: unknown key"),
    ("databases missing", config_with(databases=None), "databases: required"),
    (
        "databases empty",
        config_with(databases={}),
        "databases: must contain at least one database",
    ),
    ("databases not a mapping", config_with(databases=["a"]), "databases: must be a mapping"),
    ("primary null", db_with(primary=None), "databases.appdb.primary: required"),
    (
        "primary missing",
        config_with(databases={"appdb": {"dbname": "x"}}),
        "databases.appdb.primary: required",
    ),
    (
        "database null",
        config_with(databases={"appdb": None}),
        "databases.appdb.primary: required",
    ),
    (
        "port out of range (mapping)",
        db_with(replicas=["a:5432", {"host": "b", "port": 70000}]),
        "databases.appdb.replicas[1].port: must be 1..65535",
    ),
    (
        "port zero (mapping)",
        db_with(primary={"host": "b", "port": 0}),
        "databases.appdb.primary.port: must be 1..65535",
    ),
    (
        "port out of range (string)",
        db_with(replicas=["a:70000"]),
        "databases.appdb.replicas[0]: port must be 1..65535",
    ),
    ("port not a number (string)", db_with(primary="a:x"), "databases.appdb.primary: port must"),
    (
        "port not an integer (mapping)",
        db_with(primary={"host": "a", "port": "5432"}),
        "databases.appdb.primary.port: must be an integer, got string",
    ),
    (
        "weight out of range",
        db_with(replicas=[{"host": "a", "weight": 0}]),
        "databases.appdb.replicas[0].weight: must be 1..1000",
    ),
    (
        "weight too large",
        db_with(replicas=[{"host": "a", "weight": 1001}]),
        "databases.appdb.replicas[0].weight: must be 1..1000",
    ),
    ("endpoint host missing", db_with(primary={"port": 1}), "databases.appdb.primary.host: req"),
    ("endpoint host empty", db_with(primary=""), "databases.appdb.primary: host must be"),
    ("endpoint wrong type", db_with(primary=5432), "databases.appdb.primary: must be"),
    ("ipv6 without ]", db_with(primary="[::1:5432"), "databases.appdb.primary: missing ']'"),
    (
        "replica same as primary",
        db_with(replicas=["10.0.0.1"]),
        "databases.appdb.replicas[0]: 10.0.0.1:5432 is already listed as primary",
    ),
    (
        "replicas not a list",
        db_with(replicas="a"),
        "databases.appdb.replicas: must be a list, got string",
    ),
    (
        "pool_mode",
        config_with(pool_mode="tx"),
        "pool_mode: must be one of session, transaction, statement (got 'tx')",
    ),
    (
        "per-database pool_mode",
        db_with(pool_mode="none"),
        "databases.appdb.pool_mode: must be one of session, transaction, statement",
    ),
    (
        "auth_type",
        config_with(auth_type="password"),
        "auth_type: must be one of scram-sha-256, md5, trust, plain (got 'password')",
    ),
    (
        "routing.reads",
        db_with(routing={"reads": "replica"}),
        "databases.appdb.routing.reads: must be one of replicas, primary, any (got 'replica')",
    ),
    (
        "routing.classifier_cache_size",
        db_with(routing={"classifier_cache_size": -1}),
        "databases.appdb.routing.classifier_cache_size: must be 0..10000000",
    ),
    (
        "routing.read_only_functions",
        db_with(routing={"read_only_functions": "f"}),
        "databases.appdb.routing.read_only_functions: must be a list of function names",
    ),
    (
        "routing.writing_functions entry",
        db_with(routing={"writing_functions": ["ok", "not a name"]}),
        "databases.appdb.routing.writing_functions[1]: must be a function name, f or schema.f "
        "(got 'not a name')",
    ),
    (
        "routing.read_your_writes_scope",
        db_with(routing={"read_your_writes_scope": "user"}),
        "databases.appdb.routing.read_your_writes_scope: must be one of connection, "
        "user_address (got 'user')",
    ),
    (
        "routing.read_your_writes",
        db_with(routing={"read_your_writes": "always"}),
        "databases.appdb.routing.read_your_writes: must be lsn, off or a duration like 5s",
    ),
    (
        "routing.read_your_writes zero",
        db_with(routing={"read_your_writes": "0s"}),
        "databases.appdb.routing.read_your_writes: must be lsn, off or a duration",
    ),
    (
        "routing.max_replica_lag",
        db_with(routing={"max_replica_lag": "lots"}),
        "databases.appdb.routing.max_replica_lag: must be a size like 1MB or a duration like 5s",
    ),
    (
        "routing not a mapping",
        db_with(routing="replicas"),
        "databases.appdb.routing: must be a mapping, got string",
    ),
    (
        "log.level",
        config_with(log={"level": "verbose"}),
        "log.level: must be one of debug, info, warning, error (got 'verbose')",
    ),
    (
        "log.format",
        config_with(log={"format": "xml"}),
        "log.format: must be one of console, json (got 'xml')",
    ),
    ("pool_size bool", config_with(pool_size=True), "pool_size: must be an integer, got boolean"),
    ("pool_size string", config_with(pool_size="20"), "pool_size: must be an integer, got string"),
    ("pool_size zero", config_with(pool_size=0), "pool_size: must be >= 1"),
    ("pool_size float", config_with(pool_size=2.0), "pool_size: must be an integer, got number"),
    ("per-db pool_size", db_with(pool_size=0), "databases.appdb.pool_size: must be >= 1"),
    ("min_pool_size negative", config_with(min_pool_size=-1), "min_pool_size: must be >= 0"),
    (
        "min_pool_size above pool_size",
        config_with(pool_size=2, min_pool_size=3),
        "min_pool_size: must be <= pool_size (2)",
    ),
    (
        "per-db min_pool_size above pool_size",
        db_with(pool_size=2, min_pool_size=3),
        "databases.appdb.min_pool_size: must be <= pool_size (2)",
    ),
    (
        "per-db pool_size below inherited min_pool_size",
        {**db_with(pool_size=2), "min_pool_size": 5, "pool_size": 10},
        "databases.appdb.pool_size: must be >= min_pool_size (5, inherited from the top level)",
    ),
    ("max_client_conn", config_with(max_client_conn=0), "max_client_conn: must be >= 1"),
    (
        "duration junk",
        config_with(query_wait_timeout="soon"),
        "query_wait_timeout: must be a duration like 250ms, 5s, 1h (got 'soon')",
    ),
    (
        "duration negative",
        config_with(server_lifetime=-5),
        "server_lifetime: must be a duration like 250ms, 5s, 1h",
    ),
    (
        "duration zero",
        config_with(server_connect_timeout="0s"),
        "server_connect_timeout: must be greater than 0",
    ),
    (
        "size junk",
        config_with(max_packet_size="big"),
        "max_packet_size: must be a size like 16MB (got 'big')",
    ),
    ("size too small", config_with(max_packet_size=100), "max_packet_size: must be at least 1kB"),
    (
        "server_reset_query type",
        config_with(server_reset_query=5),
        "server_reset_query: must be a string, got integer",
    ),
    ("reserved pgrouter", config_with(databases={"pgrouter": {"primary": "a"}}), "databases.pgr"),
    (
        "reserved pgbouncer",
        config_with(databases={"pgbouncer": {"primary": "a"}}),
        "databases.pgbouncer: the name 'pgbouncer' is reserved for the admin console",
    ),
    (
        "database name empty",
        config_with(databases={"": {"primary": "a"}}),
        "databases.: database name must be a non-empty string",
    ),
    (
        "database name not a string",
        config_with(databases={5: {"primary": "a"}}),
        "databases.5: database name must be a non-empty string",
    ),
    ("dbname empty", db_with(dbname=""), "databases.appdb.dbname: must be a non-empty string"),
    (
        "user name empty",
        config_with(users={"": {"password": "x"}}),
        "users.: user name must be a non-empty string",
    ),
    (
        "user without a password",
        config_with(users={"u": {}}),
        "users.u: needs password or password_env (auth_type is scram-sha-256)",
    ),
    (
        "user with both",
        config_with(users={"u": {"password": "x", "password_env": "X"}}),
        "users.u: set only one of password and password_env",
    ),
    (
        "user password not a string",
        config_with(users={"u": {"password": 1234}}),
        "users.u.password: must be a string (quote it in YAML), got integer",
    ),
    ("user password empty", config_with(users={"u": {"password": ""}}), "users.u.password: must "),
    (
        "user not a mapping",
        config_with(users={"u": "pw"}),
        "users.u: must be a mapping like {password: ...}, got string",
    ),
    ("users not a mapping", config_with(users=["u"]), "users: must be a mapping"),
    (
        "malformed verifier",
        config_with(users={"u": {"password": "SCRAM-SHA-256$4096:abc"}}),
        "users.u.password: malformed SCRAM verifier",
    ),
    (
        "verifier with md5",
        config_with(auth_type="md5", users={"u": {"password": VERIFIER}}),
        "users.u.password: a SCRAM verifier cannot be used with auth_type md5",
    ),
    (
        "admin.users not a list",
        config_with(admin={"users": "postgres"}),
        "admin.users: must be a list of user names, got string",
    ),
    (
        "admin.users item",
        config_with(admin={"users": ["postgres", 5]}),
        "admin.users[1]: must be a non-empty string",
    ),
    ("admin.http no port", config_with(admin={"http": "127.0.0.1"}), "admin.http: port is requ"),
    (
        "admin.http bad port",
        config_with(admin={"http": "127.0.0.1:99999"}),
        "admin.http: port must be 1..65535",
    ),
    ("admin.http int", config_with(admin={"http": 9930}), 'admin.http: must be a "host:port"'),
    ("admin not a mapping", config_with(admin=["x"]), "admin: must be a mapping, got list"),
    ("listen bad port", config_with(listen="h:0"), "listen: port must be 1..65535"),
    ("listen list item", config_with(listen=["h:1", "h:x"]), "listen[1]: port must be an integ"),
    ("listen empty list", config_with(listen=[]), "listen: must list at least one host:port"),
    ("listen duplicate", config_with(listen=["h:1", "h:1"]), "listen[1]: duplicate address h:1"),
    ("listen int", config_with(listen=6432), 'listen: must be a "host:port" string, got integer'),
    (
        "max_user_client_connections negative",
        config_with(max_user_client_connections=-1),
        "max_user_client_connections: must be >= 0",
    ),
    (
        "max_db_client_connections string",
        config_with(max_db_client_connections="10"),
        "max_db_client_connections: must be an integer, got string",
    ),
    (
        "per-db max_db_client_connections",
        db_with(max_db_client_connections=-3),
        "databases.appdb.max_db_client_connections: must be >= 0",
    ),
    (
        "per-user max_client_connections",
        config_with(users={"u": {"password": "x", "max_client_connections": True}}),
        "users.u.max_client_connections: must be an integer, got boolean",
    ),
    (
        "per-user max_user_client_connections",
        config_with(users={"u": {"password": "x", "max_user_client_connections": 1}}),
        "users.u.max_user_client_connections: unknown key (did you mean 'max_client_connections'?)",
    ),
    ("auth_user unknown", config_with(auth_user="nobody"), "auth_user: 'nobody' must be one of"),
    ("auth_user not a name", config_with(auth_user=["app"]), "auth_user: must be a user name"),
    (
        "auth_user with a verifier",
        config_with(auth_user="u", users={"u": {"password": VERIFIER}}),
        "auth_user: users.u needs a cleartext password: auth_query logs in to the servers",
    ),
    (
        "auth_query without auth_user",
        config_with(auth_query="SELECT 1, passwd FROM t WHERE u = $1"),
        "auth_query: needs auth_user (the user that runs the query)",
    ),
    (
        "auth_dbname without auth_user",
        config_with(auth_dbname="appdb"),
        "auth_dbname: needs auth_user",
    ),
    (
        "auth_query without $1",
        config_with(auth_user="app", auth_query="SELECT usename, passwd FROM pg_shadow"),
        "auth_query: must contain $1 where the user name goes",
    ),
    (
        "auth_query with $12 only",
        config_with(auth_user="app", auth_query="SELECT $12"),
        "auth_query: must contain $1",
    ),
    ("auth_query empty", config_with(auth_user="app", auth_query=" "), "auth_query: must be a non"),
    (
        "auth_dbname unknown",
        config_with(auth_user="app", auth_dbname="apdb"),
        "auth_dbname: no database 'apdb' in databases (did you mean 'appdb'?)",
    ),
    (
        "auth_query_ttl",
        config_with(auth_query_ttl="often"),
        "auth_query_ttl: must be a duration like 250ms, 5s, 1h (got 'often')",
    ),
    (
        "auth_rules not a list",
        config_with(auth_rules={"method": "md5"}),
        "auth_rules: must be a list of rules",
    ),
    ("auth_rules empty", config_with(auth_rules=[]), "auth_rules: must list at least one rule"),
    (
        "auth_rules item not a mapping",
        config_with(auth_rules=["host all all 0.0.0.0/0 md5"]),
        "auth_rules[0]: must be a mapping like {method: ..., database: ..., user: ..., "
        "address: ...}, got string",
    ),
    (
        "auth_rules unknown method",
        config_with(auth_rules=[{"method": "md5"}, {"method": "peer"}]),
        "auth_rules[1].method: must be one of scram-sha-256, md5, password, trust, reject "
        "(got 'peer')",
    ),
    (
        "auth_rules method missing",
        config_with(auth_rules=[{"address": "10.0.0.0/8"}]),
        "auth_rules[0].method: required: one of scram-sha-256, md5, password, trust, reject",
    ),
    (
        "auth_rules unknown key",
        config_with(auth_rules=[{"method": "md5", "users": "app"}]),
        "auth_rules[0].users: unknown key (did you mean 'user'?)",
    ),
    (
        "auth_rules host key",
        config_with(auth_rules=[{"method": "md5", "host": "10.0.0.0/8"}]),
        "auth_rules[0].host: unknown key (expected one of: method, database, user, address)",
    ),
    (
        "auth_rules bad CIDR",
        config_with(auth_rules=[{"method": "md5", "address": "10.0.0.0/33"}]),
        "auth_rules[0].address: must be an address in CIDR notation like 10.0.0.0/8 or "
        "::1/128, or all (got '10.0.0.0/33')",
    ),
    (
        "auth_rules host name",
        config_with(auth_rules=[{"method": "md5", "address": ["::1/128", "db.example"]}]),
        "auth_rules[0].address[1]: must be an address in CIDR notation",
    ),
    (
        "auth_rules host bits",
        config_with(auth_rules=[{"method": "md5", "address": "10.1.2.3/8"}]),
        "auth_rules[0].address: 10.1.2.3/8 has host bits set (did you mean 10.0.0.0/8?)",
    ),
    (
        "auth_rules ipv6 host bits",
        config_with(auth_rules=[{"method": "md5", "address": "fd00::1/64"}]),
        "auth_rules[0].address: fd00::1/64 has host bits set (did you mean fd00::/64?)",
    ),
    (
        "auth_rules address number",
        config_with(auth_rules=[{"method": "md5", "address": 10}]),
        "auth_rules[0].address: must be an address in CIDR notation",
    ),
    (
        "auth_rules local",
        config_with(auth_rules=[{"method": "trust", "address": "local"}]),
        "auth_rules[0].address: pgrouter listens only on TCP, so no client is local",
    ),
    (
        "auth_rules empty address list",
        config_with(auth_rules=[{"method": "md5", "address": []}]),
        "auth_rules[0].address: must list at least one address (or be all)",
    ),
    (
        "auth_rules unknown database",
        config_with(auth_rules=[{"method": "md5", "database": ["pgrouter", "apdb"]}]),
        "auth_rules[0].database[1]: no database 'apdb' in databases (did you mean 'appdb'?)",
    ),
    (
        "auth_rules database not a name",
        config_with(auth_rules=[{"method": "md5", "database": None}]),
        "auth_rules[0].database: must be a database name, a list of names, or all (got None)",
    ),
    (
        "auth_rules user not a name",
        config_with(auth_rules=[{"method": "md5", "user": ["app", 7]}]),
        "auth_rules[0].user[1]: must be a user name, a list of names, or all (got 7)",
    ),
    (
        "auth_rules empty user list",
        config_with(auth_rules=[{"method": "md5", "user": []}]),
        "auth_rules[0].user: must list at least one user name (or be all)",
    ),
    (
        "auth_rules without trust need passwords",
        config_with(auth_rules=[{"method": "md5"}], users={"u": {}}),
        "users.u: needs password or password_env (no auth_rules entry is trust)",
    ),
]


@pytest.mark.parametrize(
    ("data", "expected"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_validation_errors(data: dict[str, Any], expected: str) -> None:
    errors = errors_of(data)
    assert any(e.startswith(expected) for e in errors), errors


def test_exact_error_lines() -> None:
    assert errors_of(db_with(replicas=["a", {"host": "b", "port": 0}])) == [
        "databases.appdb.replicas[1].port: must be 1..65535"
    ]
    assert errors_of(db_with(replica=[])) == [
        "databases.appdb.replica: unknown key (did you mean 'replicas'?)"
    ]


def test_all_errors_are_collected() -> None:
    data = {
        "pool_mode": "bogus",
        "pool_size": 0,
        "log": {"level": "loud"},
        "users": {"u": {}},
        "databases": {
            "a": {"replicas": ["x:0"]},
            "b": {"primary": "y", "routing": {"reads": "nowhere"}},
            "pgrouter": {"primary": "z"},
        },
    }
    assert errors_of(data) == [
        "pool_size: must be >= 1",
        "pool_mode: must be one of session, transaction, statement (got 'bogus')",
        "users.u: needs password or password_env (auth_type is scram-sha-256)",
        "log.level: must be one of debug, info, warning, error (got 'loud')",
        "databases.a.primary: required (or hosts, to find the roles)",
        "databases.a.replicas[0]: port must be 1..65535",
        "databases.b.routing.reads: must be one of replicas, primary, any (got 'nowhere')",
        "databases.pgrouter: the name 'pgrouter' is reserved for the admin console",
    ]


# --------------------------------------------------------------------------------------------
# auth_rules and client limits
# --------------------------------------------------------------------------------------------


def test_auth_rules_forms() -> None:
    rules = [
        {"method": "md5", "database": "appdb", "user": ["app", "report"], "address": "10.0.0.0/8"},
        {"method": "password", "database": ["appdb", "pgbouncer"], "address": ["::1/128", "::1"]},
        {"method": "plain", "user": "all", "address": "192.168.1.7"},
        {"method": "trust", "database": ["appdb", "all"], "address": ["all"]},
        {"method": "reject"},
    ]
    config = parse_config(config_with(auth_rules=rules, users={"u": {}}), env={})
    assert config.auth_rules == (
        AuthRule(
            "md5",
            frozenset({"appdb"}),
            frozenset({"app", "report"}),
            (ip_network("10.0.0.0/8"),),
            0,
        ),
        AuthRule(
            "plain",
            frozenset({"appdb", "pgbouncer"}),
            None,
            (ip_network("::1/128"), ip_network("::1/128")),
            1,
        ),
        AuthRule("plain", None, None, (ip_network("192.168.1.7/32"),), 2),
        AuthRule("trust", None, None, None, 3),
        AuthRule("reject", index=4),
    )
    assert config.users["u"] == User("u", None, None)  # a trust rule exists
    assert config.auth_type == "scram-sha-256"  # still parsed, unused while rules exist


def test_auth_rules_null_is_absent() -> None:
    assert parse_config(config_with(auth_rules=None), env={}).auth_rules is None
    data = config_with()
    data["auth_rules"] = None
    assert parse_config(data, env={}).auth_rules is None


def test_auth_rules_allow_a_verifier_under_md5() -> None:
    """An md5 rule checks a verifier-only user with SCRAM (PostgreSQL's behaviour), so the
    auth_type check does not apply."""
    data = config_with(
        auth_type="md5", auth_rules=[{"method": "md5"}], users={"u": {"password": VERIFIER}}
    )
    assert parse_config(data, env={}).users["u"].scram_verifier == VERIFIER


def test_auth_rules_skip_the_database_check_when_databases_are_invalid() -> None:
    errors = errors_of(config_with(auth_rules=[{"method": "md5", "database": "x"}], databases=[]))
    assert errors == ["databases: must be a mapping of database names, got list"]


def test_auth_rules_errors_are_all_collected() -> None:
    rules = [
        {"method": "md6", "address": ["10.0.0.1/8", "x"], "database": ["apdb", 3], "foo": 1},
        "x",
        {},
    ]
    assert errors_of(config_with(auth_rules=rules)) == [
        "auth_rules[0].foo: unknown key (expected one of: method, database, user, address)",
        "auth_rules[0].method: must be one of scram-sha-256, md5, password, trust, reject "
        "(got 'md6')",
        "auth_rules[0].database[0]: no database 'apdb' in databases (did you mean 'appdb'?)",
        "auth_rules[0].database[1]: must be a database name, a list of names, or all (got 3)",
        "auth_rules[0].address[0]: 10.0.0.1/8 has host bits set (did you mean 10.0.0.0/8?)",
        "auth_rules[0].address[1]: must be an address in CIDR notation like 10.0.0.0/8 or "
        "::1/128, or all (got 'x')",
        "auth_rules[1]: must be a mapping like {method: ..., database: ..., user: ..., "
        "address: ...}, got string",
        "auth_rules[2].method: required: one of scram-sha-256, md5, password, trust, reject",
    ]


@pytest.mark.parametrize(
    ("rule", "database", "user", "address", "expected"),
    [
        (AuthRule("md5"), "appdb", "app", None, True),
        (AuthRule("md5"), "appdb", "app", "10.1.1.1", True),
        (AuthRule("md5", databases=frozenset({"appdb"})), "otherdb", "app", "10.1.1.1", False),
        (AuthRule("md5", users=frozenset({"app", "b"})), "appdb", "b", "10.1.1.1", True),
        (AuthRule("md5", users=frozenset({"app"})), "appdb", "App", "10.1.1.1", False),
        (AuthRule("md5", networks=(ip_network("10.0.0.0/8"),)), "x", "y", "10.1.1.1", True),
        (AuthRule("md5", networks=(ip_network("10.0.0.0/8"),)), "x", "y", "11.0.0.1", False),
        (AuthRule("md5", networks=(ip_network("10.0.0.0/8"),)), "x", "y", "::1", False),
        (AuthRule("md5", networks=(ip_network("10.0.0.0/8"),)), "x", "y", None, False),
        (AuthRule("md5", networks=(ip_network("::1/128"),)), "x", "y", "::1", True),
        (
            AuthRule("md5", networks=(ip_network("::1/128"), ip_network("fd00::/8"))),
            "x",
            "y",
            "fd12::5",
            True,
        ),
    ],
)
def test_auth_rule_matches(
    rule: AuthRule, database: str, user: str, address: str | None, expected: bool
) -> None:
    addr = None if address is None else ip_address(address)
    assert rule.matches(database, user, addr) is expected


def test_client_limits_and_inheritance() -> None:
    data = {
        "max_user_client_connections": 10,
        "max_db_client_connections": 20,
        "users": {
            "a": {"password": "x"},
            "b": {"password": "x", "max_client_connections": 3},
            "c": {"password": "x", "max_client_connections": 0},
        },
        "databases": {
            "inherits": {"primary": "a"},
            "overrides": {"primary": "b", "max_db_client_connections": 5},
            "unlimited": {"primary": "c", "max_db_client_connections": 0},
        },
    }
    config = parse_config(data, env={})
    assert (config.max_user_client_connections, config.max_db_client_connections) == (10, 20)
    assert [u.max_client_connections for u in config.users.values()] == [None, 3, 0]
    assert [d.max_db_client_connections for d in config.databases.values()] == [20, 5, 0]


def test_auth_query_settings() -> None:
    data = config_with(
        auth_user="app",
        auth_query="SELECT * FROM pgrouter.lookup($1)",
        auth_dbname="appdb",
        auth_query_ttl="0s",
    )
    config = parse_config(data, env={})
    assert config.auth_user == "app"
    assert config.auth_query == "SELECT * FROM pgrouter.lookup($1)"
    assert (config.auth_dbname, config.auth_query_ttl) == ("appdb", 0.0)
    config = parse_config(config_with(auth_user="app", auth_dbname=None), env={})
    assert (config.auth_query, config.auth_dbname) == (DEFAULT_AUTH_QUERY, None)


def test_top_level_must_be_a_mapping() -> None:
    assert errors_of(["databases"]) == ["(top level): must be a mapping, got list"]
    assert errors_of("text") == ["(top level): must be a mapping, got string"]
    assert errors_of(None) == ["databases: required (at least one database)"]


def test_config_error_str_joins_lines() -> None:
    exc = ConfigError(["a: x", "b: y"])
    assert str(exc) == "a: x\nb: y"
    assert exc.errors == ["a: x", "b: y"]
    assert ConfigError("one: problem").errors == ["one: problem"]


# --------------------------------------------------------------------------------------------
# Users and secrets
# --------------------------------------------------------------------------------------------


def test_password_forms() -> None:
    data = config_with(
        users={
            "clear": {"password": "pw1"},
            "verifier": {"password": VERIFIER},
            "from_env": {"password_env": "APP_PW"},
            "env_verifier": {"password_env": "APP_VERIFIER"},
        }
    )
    config = parse_config(data, env={"APP_PW": "pw2", "APP_VERIFIER": VERIFIER})
    assert config.users["clear"] == User("clear", "pw1", None)
    assert config.users["verifier"] == User("verifier", None, VERIFIER)
    assert config.users["from_env"] == User("from_env", "pw2", None)
    assert config.users["env_verifier"] == User("env_verifier", None, VERIFIER)


def test_password_env_defaults_to_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGROUTER_TEST_PW", "from-os")
    config = parse_config(config_with(users={"u": {"password_env": "PGROUTER_TEST_PW"}}))
    assert config.users["u"].password == "from-os"


def test_password_env_missing_or_empty() -> None:
    data = config_with(users={"u": {"password_env": "APP_PW"}})
    assert errors_of(data, env={}) == [
        "users.u.password_env: environment variable APP_PW is not set"
    ]
    assert errors_of(data, env={"APP_PW": ""}) == [
        "users.u.password_env: environment variable APP_PW is empty"
    ]


@pytest.mark.parametrize("user", [{}, None])
def test_empty_user_with_trust(user: object) -> None:
    config = parse_config(config_with(auth_type="trust", users={"u": user}), env={})
    assert config.users["u"] == User("u", None, None)


SECRET = "Sup3r-Secret-Value"


@pytest.mark.parametrize(
    ("users", "env", "auth_type"),
    [
        ({"u": {"password": SECRET, "password_env": "X"}}, {}, "scram-sha-256"),
        ({"u": {"password": SECRET, "bogus": 1}}, {}, "scram-sha-256"),
        ({"u": SECRET}, {}, "scram-sha-256"),
        ({"u": {"password": f"SCRAM-SHA-256${SECRET}"}}, {}, "scram-sha-256"),
        ({"u": {"password_env": "X"}}, {"X": f"SCRAM-SHA-256${SECRET}"}, "scram-sha-256"),
        ({"u": {"password": VERIFIER}, "v": {"password": SECRET}}, {}, "md5"),
        ({"u": {"password": [SECRET]}}, {}, "scram-sha-256"),
        ({"u": {"password": {"x": SECRET}}}, {}, "scram-sha-256"),
    ],
)
def test_secrets_never_in_errors(
    users: dict[str, Any], env: dict[str, str], auth_type: str
) -> None:
    data = config_with(users=users, auth_type=auth_type, pool_size=0)
    errors = errors_of(data, env=env)
    text = "\n".join(errors)
    assert SECRET not in text
    assert "lObD0XJIQx4Huu" not in text  # nor the verifier
    assert any(e.startswith("users.") for e in errors), errors


def test_yaml_syntax_error_hides_line_content(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f'users:\n  app: {{password: "{SECRET}}}\ndatabases: [\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert SECRET not in str(info.value)
    assert str(info.value).startswith(f"{path}:")
    assert "YAML syntax error" in str(info.value)


# --------------------------------------------------------------------------------------------
# Files and `pgrouter check`
# --------------------------------------------------------------------------------------------


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [f"{path}: file not found"]


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.errors[0].startswith(f"{tmp_path}: cannot read")


def test_load_config_yaml_error_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("databases:\n  appdb:\n    primary: [a\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [error] = info.value.errors
    assert error.startswith(f"{path}:4:1: YAML syntax error: ")


def test_load_config_rejects_duplicate_keys(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("databases:\n  appdb: {primary: a}\n  appdb: {primary: b}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [f"{path}:3:3: YAML syntax error: duplicate key 'appdb'"]


def test_load_config_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == ["databases: required (at least one database)"]


def test_yaml_off_and_anchors(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(
        "auth_type: trust\n"
        "databases:\n"
        "  a: &db {primary: 'h:1', routing: {read_your_writes: off}}\n"
        "  b: *db\n"
        "  c:\n"
        "    <<: *db\n"
        "    dbname: other\n"
        "    primary: 'h:2'\n"
    )
    config = load_config(path, env={})
    assert config.databases["a"].routing.read_your_writes == "off"
    assert config.databases["b"].primary == Endpoint("h", 1)
    assert config.databases["c"].dbname == "other"
    assert config.databases["c"].primary == Endpoint("h", 2)


def test_check_main_ok(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert check_main(str(path)) == 0
    out, err = capsys.readouterr()
    assert out == f"OK: 1 databases, 1 users ({path})\n"
    assert err == ""


def test_check_main_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(db_with(pool_size=0, replicas=[{"host": "b", "port": 0}])))
    assert check_main(str(path)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "databases.appdb.replicas[0].port: must be 1..65535",
        "databases.appdb.pool_size: must be >= 1",
    ]


def test_check_main_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert check_main(str(tmp_path / "missing.yaml")) == 1
    assert "file not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# client_tls and server_tls
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.tls_certs import make_certs

    return make_certs(tmp_path_factory.mktemp("certs"))


def test_tls_defaults() -> None:
    config = parse_config(MINIMAL, env={})
    assert config.client_tls == ClientTLS(mode="disable")
    assert config.client_tls.context is None
    assert config.server_tls == ServerTLS(mode="prefer")
    assert config.server_tls.context is None  # prefer without ca: nothing to verify


def test_client_tls_builds_a_context(certs: Any) -> None:
    tls = {"mode": "require", "cert": str(certs.server_cert), "key": str(certs.server_key)}
    config = parse_config(config_with(client_tls=tls), env={})
    assert config.client_tls.mode == "require"
    assert config.client_tls.cert == str(certs.server_cert)
    context = config.client_tls.context
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_NONE
    with_ca = parse_config(config_with(client_tls={**tls, "ca": str(certs.ca)}), env={})
    assert with_ca.client_tls.context is not None
    assert with_ca.client_tls.context.verify_mode == ssl.CERT_REQUIRED


def test_client_tls_relative_paths_are_next_to_the_topology(certs: Any) -> None:
    path = certs.directory / "topology.yaml"
    data = config_with(client_tls={"mode": "allow", "cert": "server.crt", "key": "server.key"})
    path.write_text(yaml.safe_dump(data))
    config = load_config(path, env={})
    assert config.client_tls.cert == str(certs.directory / "server.crt")
    assert config.client_tls.context is not None


def test_client_tls_errors(certs: Any, tmp_path: Path) -> None:
    assert errors_of(config_with(client_tls={"mode": "require"})) == [
        "client_tls.cert: required when client_tls.mode is require",
        "client_tls.key: required when client_tls.mode is require",
    ]
    assert errors_of(config_with(client_tls={"mode": "on", "kye": "x"})) == [
        "client_tls.kye: unknown key (did you mean 'key'?)",
        "client_tls.mode: must be one of disable, allow, require (got 'on')",
    ]
    missing = tmp_path / "missing.crt"
    assert errors_of(
        config_with(
            client_tls={"mode": "allow", "cert": str(missing), "key": str(certs.server_key)}
        )
    ) == [f"client_tls.cert: file not found: {missing}"]
    assert errors_of(
        config_with(
            client_tls={"mode": "allow", "cert": str(tmp_path), "key": str(certs.server_key)}
        )
    ) == [f"client_tls.cert: is a directory, not a file: {tmp_path}"]
    mismatch = {"mode": "allow", "cert": str(certs.server_cert), "key": str(certs.client_key)}
    assert errors_of(config_with(client_tls=mismatch)) == [
        "client_tls.key: cannot use the certificate and key: "
        "the key does not belong to the certificate"
    ]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    tls = {"mode": "allow", "cert": str(certs.server_cert), "key": str(certs.server_key)}
    errors = errors_of(config_with(client_tls={**tls, "ca": str(garbage)}))
    assert len(errors) == 1 and errors[0].startswith("client_tls.ca: cannot load CA certificates")


def test_client_tls_disable_needs_no_files() -> None:
    config = parse_config(config_with(client_tls={"mode": "disable"}), env={})
    assert config.client_tls.context is None


def test_server_tls_modes(certs: Any) -> None:
    for mode in ("disable", "prefer", "require"):
        config = parse_config(config_with(server_tls={"mode": mode}), env={})
        assert config.server_tls == ServerTLS(mode=mode)
        assert config.server_tls.context is None
    full = parse_config(
        config_with(server_tls={"mode": "verify-full", "ca": str(certs.ca)}), env={}
    ).server_tls
    assert full.context is not None and full.context.check_hostname
    assert full.context.verify_mode == ssl.CERT_REQUIRED
    verify_ca = parse_config(
        config_with(server_tls={"mode": "verify-ca", "ca": str(certs.ca)}), env={}
    ).server_tls
    assert verify_ca.context is not None and not verify_ca.context.check_hostname
    assert verify_ca.context.verify_mode == ssl.CERT_REQUIRED
    # require with a CA checks the chain, as libpq does with a root certificate
    require = parse_config(
        config_with(server_tls={"mode": "require", "ca": str(certs.ca)}), env={}
    ).server_tls
    assert require.context is not None and require.context.verify_mode == ssl.CERT_REQUIRED


def test_server_tls_errors(tmp_path: Path) -> None:
    assert errors_of(config_with(server_tls={"mode": "allow"})) == [
        "server_tls.mode: must be one of disable, prefer, require, verify-ca, verify-full "
        "(got 'allow')"
    ]
    assert errors_of(config_with(server_tls={"mode": "require", "ca": str(tmp_path / "x")})) == [
        f"server_tls.ca: file not found: {tmp_path / 'x'}"
    ]
    assert errors_of(config_with(server_tls={"mode": "require", "ca": 5})) == [
        "server_tls.ca: must be a file path, got 5"
    ]


def test_hosts_without_roles() -> None:
    """hosts: the roles are found by the health checks; the first host is the starting guess."""
    data = config_with()
    data["databases"] = {"appdb": {"hosts": ["10.0.0.2:5432", "10.0.0.1", "[::1]:5433"]}}
    database = parse_config(data).databases["appdb"]
    assert database.primary == Endpoint("10.0.0.2", 5432)
    assert database.replicas == (Endpoint("10.0.0.1", 5432), Endpoint("::1", 5433))


@pytest.mark.parametrize(
    ("hosts_db", "message"),
    [
        ({"hosts": []}, "databases.appdb.hosts: must be a non-empty list of host:port"),
        (
            {"hosts": ["a:1"], "primary": "a:2"},
            "databases.appdb.hosts: list either hosts or primary/replicas, not both",
        ),
        ({"hosts": ["a:1", "a:1"]}, "databases.appdb.hosts[1]: a:1 is already listed as hosts[0]"),
    ],
)
def test_hosts_errors(hosts_db: dict[str, Any], message: str) -> None:
    data = config_with()
    data["databases"] = {"appdb": hosts_db}
    assert message in errors_of(data)


def test_failover_timeout_defaults_inherits_and_overrides() -> None:
    assert parse_config(MINIMAL, env={}).databases["appdb"].failover_timeout == 10.0
    data = config_with(
        failover_timeout="2s",
        databases={
            "appdb": {"primary": "10.0.0.1:5432"},
            "batch": {"primary": "10.0.0.1:5432", "failover_timeout": 0},
        },
    )
    config = parse_config(data, env={})
    assert config.failover_timeout == 2.0
    assert config.databases["appdb"].failover_timeout == 2.0
    assert config.databases["batch"].failover_timeout == 0.0


def test_failover_timeout_errors_name_the_path() -> None:
    assert errors_of(config_with(failover_timeout="soon")) == [
        "failover_timeout: "
        + errors_of(config_with(query_wait_timeout="soon"))[0].split(": ", 1)[1]
    ]
    assert errors_of(db_with(failover_timeout=-1))[0].startswith(
        "databases.appdb.failover_timeout: "
    )


# --------------------------------------------------------------------------------------------
# Restart and processes
# --------------------------------------------------------------------------------------------


def test_handover_socket_is_taken_from_the_topology_files_directory(tmp_path: Path) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(config_with(handover_socket="handover.sock")))
    assert load_config(path).handover_socket == str(tmp_path / "handover.sock")
    assert parse_config(MINIMAL).handover_socket is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("/no/such/dir/h.sock", "directory not found: /no/such/dir"),
        ("/tmp/" + "x" * 120, "too long for a Unix socket path"),
        ("", "must be a file path"),
        (5, "must be a file path"),
    ],
)
def test_handover_socket_errors(value: object, problem: str) -> None:
    errors = errors_of(config_with(handover_socket=value))
    assert len(errors) == 1 and errors[0].startswith("handover_socket: "), errors
    assert problem in errors[0]


def test_workers_default_and_bounds() -> None:
    assert parse_config(MINIMAL).workers == 1
    assert parse_config(config_with(workers=4)).workers == 4
    assert errors_of(config_with(workers=0))[0].startswith("workers: ")
    assert errors_of(config_with(workers=65))[0].startswith("workers: ")


def test_every_worker_needs_a_server_connection_of_each_pool() -> None:
    errors = errors_of(
        config_with(workers=3, databases={"appdb": {"primary": "h:1", "pool_size": 2}})
    )
    assert errors == [
        "databases.appdb.pool_size: 2 is less than workers (3): each worker needs at least "
        "one server connection of every pool"
    ]


def test_patroni_members() -> None:
    """A member may name its Patroni REST API; the URL is normalized (default port 8008)."""
    data = config_with()
    data["databases"] = {
        "appdb": {
            "hosts": [
                {"host": "10.0.0.1", "patroni": "http://10.0.0.1:8008/"},
                {"host": "10.0.0.2", "port": 5433, "weight": 2, "patroni": "http://pg2"},
                {"host": "::1", "patroni": "http://[::1]:9000"},
            ]
        },
        "otherdb": {"primary": "a", "replicas": [{"host": "b"}]},
    }
    config = parse_config(data)
    assert config.databases["appdb"].backends == (
        Endpoint("10.0.0.1", 5432, 1, "http://10.0.0.1:8008"),
        Endpoint("10.0.0.2", 5433, 2, "http://pg2:8008"),
        Endpoint("::1", 5432, 1, "http://[::1]:9000"),
    )
    assert all(e.patroni is None for e in config.databases["otherdb"].backends)


@pytest.mark.parametrize(
    ("patroni", "message"),
    [
        ("https://a:8008", "must be an http:// URL of the member's Patroni REST API"),
        ("a:8008", "must be an http:// URL of the member's Patroni REST API"),
        ("http://a:8008/primary", "must be http://host:port only, without path or credentials"),
        ("http://u:p@a:8008", "must be http://host:port only, without path or credentials"),
        ("http://a:0", "port must be 1..65535"),
        ("http://", "host must be a non-empty name or address"),
        (8008, 'must be a URL like "http://10.0.0.1:8008", got integer'),
    ],
)
def test_patroni_errors(patroni: object, message: str) -> None:
    data = config_with()
    data["databases"] = {"appdb": {"hosts": [{"host": "a", "patroni": patroni}]}}
    errors = errors_of(data)
    assert len(errors) == 1 and errors[0].startswith("databases.appdb.hosts[0].patroni: ")
    assert message in errors[0], errors


def test_patroni_for_every_member_or_none() -> None:
    data = config_with()
    data["databases"] = {
        "appdb": {"primary": {"host": "a", "patroni": "http://a"}, "replicas": ["b"]}
    }
    assert errors_of(data) == [
        "databases.appdb.replicas: patroni: name the Patroni REST API of every member or of "
        "none (Patroni decides the leader only among members it knows)"
    ]
