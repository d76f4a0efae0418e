"""router/admin.py: the admin console's answers, decoded from the bytes it returns.

A real Proxy built from a parsed topology, real pools from `proxy.pool_for`, real client
sessions (with a stand-in transport) and stand-in server connections: no PostgreSQL, no
sockets. Column lists are PgBouncer's, written out here from its documentation/source.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import router
from pools.pool import PoolError
from protocol.errors import parse_error_fields
from protocol.framing import MessageReader
from router.admin import AdminConsole
from router.client import ClientSession, State
from router.config import load_config, parse_config
from router.proxy import Proxy

# ---- PgBouncer's column lists -----------------------------------------------------------------

POOLS = [
    "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req",
    "cl_waiting_cancel_req", "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle",
    "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us", "pool_mode",
    "load_balance_hosts",
]  # fmt: skip
STATS = [
    "database", "total_server_assignment_count", "total_xact_count", "total_query_count",
    "total_received", "total_sent", "total_xact_time", "total_query_time", "total_wait_time",
    "total_client_parse_count", "total_server_parse_count", "total_bind_count",
    "total_client_login_count", "avg_server_assignment_count", "avg_xact_count",
    "avg_query_count", "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time",
    "avg_wait_time", "avg_client_parse_count", "avg_server_parse_count", "avg_bind_count",
    "avg_client_login_count",
    "total_requests", "avg_req", "avg_query",  # appended: names before PgBouncer 1.8
]  # fmt: skip
STATS_LEGACY = 3  # the appended columns of SHOW STATS, not in SHOW TOTALS
STATS_HALF = [
    "database", "server_assignment_count", "xact_count", "query_count", "bytes_received",
    "bytes_sent", "xact_time", "query_time", "wait_time", "client_parse_count",
    "server_parse_count", "bind_count", "client_login_count",
]  # fmt: skip
SOCKETS = [
    "type", "user", "database", "replication", "state", "addr", "port", "local_addr",
    "local_port", "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr",
    "link", "remote_pid", "tls", "application_name", "prepared_statements", "id",
]  # fmt: skip
DATABASES = [
    "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
    "reserve_pool_size", "server_lifetime", "pool_mode", "load_balance_hosts",
    "max_connections", "current_connections", "max_client_connections",
    "current_client_connections", "paused", "disabled",
    "reserve_pool",  # appended: the older name of reserve_pool_size
]  # fmt: skip
USERS = [
    "name", "pool_size", "reserve_pool_size", "pool_mode", "max_user_connections",
    "current_connections", "max_user_client_connections", "current_client_connections",
]  # fmt: skip
LISTS = [
    "databases", "users", "pools", "free_clients", "used_clients", "login_clients",
    "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries", "dns_pending",
]  # fmt: skip
BACKENDS = [
    "database", "host", "port", "role", "state", "byte_lag", "time_lag", "replay_lsn",
    "last_check",
]  # fmt: skip

TOPOLOGY: dict[str, Any] = {
    "users": {"app": {"password": "app-secret"}, "report": {"password": "report-secret"}},
    "admin": {"users": ["postgres"]},
    "databases": {
        "appdb": {
            "primary": "10.0.0.1:5432",
            "replicas": ["10.0.0.2:5432", {"host": "10.0.0.3", "port": 5433}],
        },
        "sessions": {"primary": "10.0.1.1:6543", "pool_mode": "session", "pool_size": 7},
    },
}


# ---- decoding (independent of protocol.messages) -----------------------------------------------


@dataclass
class Result:
    """One command's answer: columns, rows, tag; or an error / notice."""

    columns: list[str] = field(default_factory=list)
    rows: list[list[str | None]] = field(default_factory=list)
    tag: str | None = None
    error: dict[str, str] | None = None
    notices: list[dict[str, str]] = field(default_factory=list)
    empty: bool = False

    def dicts(self) -> list[dict[str, str | None]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def column(self, name: str) -> list[str | None]:
        i = self.columns.index(name)
        return [row[i] for row in self.rows]


def _row_description(body: bytes) -> list[str]:
    (count,) = struct.unpack_from("!H", body)
    pos = 2
    names = []
    for _ in range(count):
        end = body.index(b"\0", pos)
        names.append(body[pos:end].decode())
        _table, _col, type_oid, _size, _mod, fmt = struct.unpack_from("!IHIhih", body, end + 1)
        assert type_oid == 25 and fmt == 0  # text columns in text format
        pos = end + 1 + 18
    assert pos == len(body)
    return names


def _data_row(body: bytes) -> list[str | None]:
    (count,) = struct.unpack_from("!H", body)
    pos = 2
    values: list[str | None] = []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos : pos + length].decode())
            pos += length
    assert pos == len(body)
    return values


def run(console: AdminConsole, sql: str) -> list[Result]:
    """Execute and split the answer per command; checks it ends with exactly one Z 'I'."""
    reader = MessageReader()
    reader.feed(console.execute(sql))
    messages = list(reader)
    assert reader.take_rest() == b""
    assert messages[-1] == (ord("Z"), b"I")
    results: list[Result] = []
    current = Result()
    for kind, body in messages[:-1]:
        assert kind != ord("Z")
        if kind == ord("T"):
            current.columns = _row_description(body)
        elif kind == ord("D"):
            row = _data_row(body)
            assert len(row) == len(current.columns)
            current.rows.append(row)
        elif kind == ord("N"):
            current.notices.append(parse_error_fields(body))
        elif kind == ord("C"):
            current.tag = body.rstrip(b"\0").decode()
            results.append(current)
            current = Result()
        elif kind == ord("E"):
            current.error = parse_error_fields(body)
            results.append(current)
            current = Result()
        elif kind == ord("I"):
            assert body == b""
            current.empty = True
            results.append(current)
            current = Result()
        else:
            raise AssertionError(f"unexpected message {chr(kind)}")
    assert current == Result()  # nothing dangling before ReadyForQuery
    return results


def one(console: AdminConsole, sql: str) -> Result:
    results = run(console, sql)
    assert len(results) == 1
    return results[0]


# ---- stand-ins ----------------------------------------------------------------------------------


class FakeTransport:
    """Just enough of an asyncio transport for what a session reports about itself."""

    def __init__(self, peer: tuple[str, int], local: tuple[str, int]) -> None:
        self._extra = {"peername": peer, "sockname": local}
        self.written: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class FakeTLS:
    """What the tls column reads of an ssl.SSLObject."""

    def version(self) -> str:
        return "TLSv1.3"

    def cipher(self) -> tuple[str, str, int]:
        return ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)


@dataclass(eq=False)
class FakeServer:
    """The attributes of pools.server.ServerConnection the console reads."""

    host: str
    port: int
    backend_key: tuple[int, int]
    client: Any = None
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False
    retired: bool = False
    parameters: dict[str, str] = field(default_factory=dict)
    transport: Any = None


def make_proxy(topology: dict[str, Any] | None = None) -> Proxy:
    return Proxy(parse_config(topology or TOPOLOGY, env={}))


def add_client(
    proxy: Proxy,
    *,
    user: str = "app",
    database: str | None = "appdb",
    state: State = State.READY,
    port: int = 40000,
    app: str = "",
) -> ClientSession:
    client = ClientSession(proxy)
    client.transport = FakeTransport(("192.0.2.10", port), ("127.0.0.1", 6432))  # type: ignore[assignment]
    client.connected_at = time.monotonic() - 1.0
    client.state = state
    client.user = user
    if database is not None:
        db = proxy.config.databases[database]
        client.database = db
        if state is State.READY:
            client.pool = proxy.pool_for(db, user)
    if app:
        client.settings = {"application_name": app}
    proxy.clients.add(client)
    return client


def link(client: ClientSession, server: FakeServer) -> None:
    assert client.pool is not None
    client.pool.active.add(server)  # type: ignore[arg-type]
    client.server = server  # type: ignore[assignment]
    server.client = client


def wait(client: ClientSession, seconds: float) -> None:
    """Queue the client in its (paused, so it opens nothing) pool as waiting since `seconds`."""
    pool = client.pool
    assert pool is not None
    was_paused = pool.paused
    pool.paused = True
    client.waiting = True
    assert pool.acquire(client) is None
    pool._wait_start[client] = time.monotonic() - seconds
    pool.paused = was_paused


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    yield make_proxy()


@pytest.fixture
def console(proxy: Proxy) -> AdminConsole:
    return AdminConsole(proxy)


# ---- every SHOW: PgBouncer's columns --------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "columns"),
    [
        ("SHOW POOLS", POOLS),
        ("SHOW STATS", STATS),
        ("SHOW STATS_TOTALS", STATS_HALF),
        ("SHOW STATS_AVERAGES", STATS_HALF),
        ("SHOW TOTALS", ["name", "value"]),
        ("SHOW CLIENTS", SOCKETS),
        ("SHOW SERVERS", SOCKETS),
        ("SHOW DATABASES", DATABASES),
        ("SHOW USERS", USERS),
        ("SHOW LISTS", ["list", "items"]),
        ("SHOW CONFIG", ["key", "value", "default", "changeable"]),
        ("SHOW VERSION", ["version"]),
        ("SHOW BACKENDS", BACKENDS),
    ],
)
def test_show_columns_and_tag(console: AdminConsole, command: str, columns: list[str]) -> None:
    result = one(console, command)
    assert result.error is None
    assert result.columns == columns
    assert result.tag == "SHOW"


# What Debian's prometheus-pgbouncer-exporter 1.7 (collectors.py) reads by name; its
# SHOW STATS and SHOW DATABASES keys include names of PgBouncer before 1.8.
EXPORTER_READS = {
    "SHOW STATS": {"database", "total_requests", "total_received", "total_sent",
                   "total_query_time"},
    "SHOW POOLS": {"database", "user", "cl_active", "cl_waiting"},
    "SHOW DATABASES": {"database", "pool_size", "reserve_pool"},
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(EXPORTER_READS))
def test_columns_pgbouncer_exporter_reads(console: AdminConsole, command: str) -> None:
    columns = one(console, command).columns
    assert EXPORTER_READS[command] <= set(columns)
    assert len(set(columns)) == len(columns)


def test_show_pools_sums_backends_per_database_and_user(proxy: Proxy) -> None:
    appdb = proxy.config.databases["appdb"]
    primary = proxy.pool_for(appdb, "app")
    replica = proxy.pool_for(appdb, "app", appdb.replicas[0])
    # Clients: two linked, one idle, one waiting 2.5 s, one still logging in (not counted).
    c1, c2 = add_client(proxy, port=1), add_client(proxy, port=2)
    link(c1, FakeServer("10.0.0.1", 5432, (101, 1)))
    link(c2, FakeServer("10.0.0.1", 5432, (102, 1)))
    add_client(proxy, port=3)
    wait(add_client(proxy, port=4), 2.5)
    add_client(proxy, state=State.AUTH, port=5)
    primary.idle.append(FakeServer("10.0.0.1", 5432, (103, 1)))  # type: ignore[arg-type]
    primary.active.add(FakeServer("10.0.0.1", 5432, (104, 1)))  # type: ignore[arg-type]  # reset
    replica.idle.extend([FakeServer("10.0.0.2", 5432, (201, 1)) for _ in range(2)])  # type: ignore[misc]
    replica.connecting = 1
    proxy.pool_for(proxy.config.databases["sessions"], "report")

    rows = {(r["database"], r["user"]): r for r in one(AdminConsole(proxy), "SHOW POOLS").dicts()}
    assert set(rows) == {("appdb", "app"), ("sessions", "report")}
    app = rows["appdb", "app"]
    assert app["cl_active"] == "3"
    assert app["cl_waiting"] == "1"
    assert app["sv_active"] == "2"
    assert app["sv_idle"] == "3"  # 1 on the primary + 2 on the replica
    assert app["sv_tested"] == "1"
    assert app["sv_login"] == "1"
    assert app["maxwait"] == "2"
    assert 500_000 <= int(app["maxwait_us"] or 0) < 600_000
    assert app["pool_mode"] == "transaction"
    assert app["load_balance_hosts"] is None
    for name in ("cl_active_cancel_req", "cl_waiting_cancel_req", "sv_active_cancel",
                 "sv_being_canceled", "sv_used"):  # fmt: skip
        assert app[name] == "0"
    report = rows["sessions", "report"]
    assert report["pool_mode"] == "session"
    assert report["cl_active"] == report["sv_idle"] == report["maxwait"] == "0"


def test_show_stats_sums_the_pools_of_each_database(proxy: Proxy) -> None:
    appdb = proxy.config.databases["appdb"]
    a = proxy.pool_for(appdb, "app")
    b = proxy.pool_for(appdb, "report", appdb.replicas[1])
    for pool, n in ((a, 1), (b, 10)):
        pool.assignment_count = 3 * n
        pool.xact_count = 5 * n
        pool.query_count = 7 * n
        pool.bytes_received = 100 * n
        pool.bytes_sent = 1000 * n
        pool.wait_time = 0.25 * n
        pool.login_count = 2 * n
    console = AdminConsole(proxy)

    stats = {r["database"]: r for r in one(console, "show stats").dicts()}
    assert list(stats) == ["appdb", "sessions"]  # every configured database, in file order
    s = stats["appdb"]
    assert s["total_server_assignment_count"] == "33"
    assert s["total_xact_count"] == "55"
    assert s["total_query_count"] == "77"
    assert s["total_received"] == "1100"
    assert s["total_sent"] == "11000"
    assert s["total_wait_time"] == "2750000"  # microseconds
    assert s["total_client_login_count"] == "22"
    assert s["total_xact_time"] == s["total_query_time"] == s["total_bind_count"] == "0"
    assert s["avg_wait_time"] == str(2_750_000 // 33)  # per server assignment
    assert s["total_requests"] == s["total_query_count"]
    assert (s["avg_req"], s["avg_query"]) == (s["avg_query_count"], s["avg_query_time"])
    assert all(v == "0" for k, v in stats["sessions"].items() if k != "database")

    totals = one(console, "SHOW STATS_TOTALS").dicts()
    assert totals[0] == {
        "database": "appdb", "server_assignment_count": "33", "xact_count": "55",
        "query_count": "77", "bytes_received": "1100", "bytes_sent": "11000",
        "xact_time": "0", "query_time": "0", "wait_time": "2750000",
        "client_parse_count": "0", "server_parse_count": "0", "bind_count": "0",
        "client_login_count": "22",
    }  # fmt: skip
    averages = one(console, "SHOW STATS_AVERAGES").dicts()
    assert averages[0]["database"] == "appdb"
    assert averages[0]["wait_time"] == str(2_750_000 // 33)

    total_rows = {row[0]: row[1] for row in one(console, "SHOW TOTALS").rows}
    assert list(total_rows) == STATS[1:-STATS_LEGACY]
    assert total_rows["total_xact_count"] == "55"
    assert total_rows["total_wait_time"] == "2750000"


def test_show_clients(proxy: Proxy) -> None:
    active = add_client(proxy, port=1001, app="billing")
    server = FakeServer("10.0.0.1", 5432, (4242, 7))
    link(active, server)
    idle = add_client(proxy, user="report", database="sessions", port=1002)
    idle.transport._extra["ssl_object"] = FakeTLS()  # type: ignore[attr-defined]
    waiting = add_client(proxy, port=1003)
    wait(waiting, 3.25)
    login = add_client(proxy, state=State.AUTH, port=1004)
    admin = add_client(proxy, user="postgres", database=None, state=State.ADMIN, port=1005)
    add_client(proxy, state=State.CLOSED, port=1006)

    rows = {r["port"]: r for r in one(AdminConsole(proxy), "SHOW CLIENTS").dicts()}
    assert set(rows) == {"1001", "1002", "1003", "1004", "1005"}
    a = rows["1001"]
    assert (a["type"], a["user"], a["database"], a["state"]) == ("C", "app", "appdb", "active")
    assert (a["addr"], a["local_addr"], a["local_port"]) == ("192.0.2.10", "127.0.0.1", "6432")
    assert a["replication"] == "none"
    assert a["application_name"] == "billing"
    assert a["ptr"] == f"0x{id(active):x}"
    assert a["link"] == f"0x{id(server):x}"
    assert a["id"] == str(id(active))
    assert a["tls"] == ""
    assert rows["1002"]["tls"] == "TLSv1.3/TLS_AES_256_GCM_SHA384"
    assert a["connect_time"] is not None and a["connect_time"].endswith(" UTC")
    assert a["wait"] == a["wait_us"] == "0"
    assert (rows["1002"]["state"], rows["1002"]["database"]) == ("idle", "sessions")
    assert rows["1002"]["link"] == ""
    w = rows["1003"]
    assert (w["state"], w["wait"]) == ("waiting", "3")
    assert 200_000 <= int(w["wait_us"] or 0) < 300_000
    assert rows["1004"]["state"] == "login"
    assert (rows["1005"]["database"], rows["1005"]["state"]) == ("pgrouter", "active")
    assert login.pool is None and admin.pool is None and idle.server is None


def test_show_servers(proxy: Proxy) -> None:
    appdb = proxy.config.databases["appdb"]
    client = add_client(proxy)
    active = FakeServer("10.0.0.1", 5432, (5001, 1), parameters={"application_name": "x"})
    link(client, active)
    pool = proxy.pool_for(appdb, "app")
    resetting = FakeServer("10.0.0.1", 5432, (5002, 1), retired=True)
    pool.active.add(resetting)  # type: ignore[arg-type]
    replica = proxy.pool_for(appdb, "app", appdb.replicas[1])
    idle = FakeServer("10.0.0.3", 5433, (5003, 1))
    idle.transport = FakeTransport(("10.0.0.3", 5433), ("10.9.9.9", 50000))
    replica.idle.append(idle)  # type: ignore[arg-type]

    rows = {r["remote_pid"]: r for r in one(AdminConsole(proxy), "SHOW SERVERS").dicts()}
    assert set(rows) == {"5001", "5002", "5003"}
    a = rows["5001"]
    assert (a["type"], a["user"], a["database"], a["state"]) == ("S", "app", "appdb", "active")
    assert (a["addr"], a["port"]) == ("10.0.0.1", "5432")
    assert a["link"] == f"0x{id(client):x}"
    assert a["ptr"] == f"0x{id(active):x}"
    assert a["application_name"] == "x"
    assert a["close_needed"] == "0"
    assert (rows["5002"]["state"], rows["5002"]["close_needed"]) == ("tested", "1")
    i = rows["5003"]
    assert (i["state"], i["addr"], i["port"]) == ("idle", "10.0.0.3", "5433")
    assert (i["local_addr"], i["local_port"]) == ("10.9.9.9", "50000")
    assert i["link"] == ""


def test_show_databases_users_lists(proxy: Proxy) -> None:
    appdb = proxy.config.databases["appdb"]
    c = add_client(proxy)
    link(c, FakeServer("10.0.0.1", 5432, (1, 1)))
    add_client(proxy, user="report")
    proxy.pool_for(appdb, "app", appdb.replicas[0]).connecting = 2
    add_client(proxy, state=State.STARTUP, database=None, user="")
    console = AdminConsole(proxy)

    dbs = {r["name"]: r for r in one(console, "SHOW DATABASES").dicts()}
    assert dbs["appdb"] == {
        "name": "appdb", "host": "10.0.0.1", "port": "5432", "database": "appdb",
        "force_user": None, "pool_size": "20", "min_pool_size": "0", "reserve_pool_size": "0",
        "server_lifetime": "3600", "pool_mode": "transaction", "load_balance_hosts": None,
        "max_connections": "0", "current_connections": "3", "max_client_connections": "0",
        "current_client_connections": "2", "paused": "0", "disabled": "0",
        "reserve_pool": "0",
    }  # fmt: skip
    assert (dbs["sessions"]["port"], dbs["sessions"]["pool_size"]) == ("6543", "7")
    assert dbs["sessions"]["pool_mode"] == "session"

    users = {r["name"]: r for r in one(console, "SHOW USERS").dicts()}
    assert list(users) == ["app", "report", "postgres"]
    assert users["app"]["current_connections"] == "3"
    assert users["app"]["current_client_connections"] == "1"
    assert users["report"]["current_client_connections"] == "1"
    assert users["postgres"]["current_connections"] == "0"

    lists = one(console, "SHOW LISTS")
    assert [r[0] for r in lists.rows] == LISTS
    items = {row[0]: row[1] for row in lists.rows}
    assert (items["databases"], items["users"], items["pools"]) == ("2", "3", "3")
    assert (items["used_clients"], items["login_clients"], items["used_servers"]) == ("3", "1", "1")


def test_show_databases_and_users_report_the_client_limits() -> None:
    topology = {
        **TOPOLOGY,
        "max_user_client_connections": 4,
        "max_db_client_connections": 9,
        "users": {**TOPOLOGY["users"], "report": {"password": "r", "max_client_connections": 2}},
        "databases": {
            **TOPOLOGY["databases"],
            "sessions": {**TOPOLOGY["databases"]["sessions"], "max_db_client_connections": 0},
        },
        "auth_rules": [{"method": "md5"}, {"method": "reject"}],
    }
    console = AdminConsole(make_proxy(topology))
    dbs = {r["name"]: r for r in one(console, "SHOW DATABASES").dicts()}
    assert dbs["appdb"]["max_client_connections"] == "9"
    assert dbs["sessions"]["max_client_connections"] == "0"
    users = {r["name"]: r for r in one(console, "SHOW USERS").dicts()}
    assert users["app"]["max_user_client_connections"] == "4"
    assert users["report"]["max_user_client_connections"] == "2"
    assert users["postgres"]["max_user_client_connections"] == "4"
    config = {r[0]: r for r in one(console, "SHOW CONFIG").rows}
    assert config["max_user_client_connections"] == ["max_user_client_connections", "4", "0", "yes"]
    assert config["max_db_client_connections"][1:3] == ["9", "0"]
    assert config["auth_rules"][1] == "2 rules"


def test_show_config_version_help(console: AdminConsole) -> None:
    config = one(console, "SHOW CONFIG")
    rows = {r[0]: r for r in config.rows}
    assert rows["pool_mode"] == ["pool_mode", "transaction", "transaction", "yes"]
    assert rows["max_client_conn"][1] == "10000"  # read by pgbouncer_exporter as a number
    assert rows["listen"][3] == "no"
    assert rows["admin.users"][1] == "postgres"
    assert rows["auth_rules"][1] == ""  # none: auth_type for everyone
    assert rows["max_user_client_connections"][1:3] == ["0", "0"]
    assert all(v is not None and "secret" not in v for r in config.rows for v in r)

    version = one(console, "show version")
    assert version.rows == [[f"pgrouter {router.__version__}"]]

    help_ = one(console, "SHOW HELP")
    assert help_.tag == "SHOW" and help_.columns == []
    assert help_.notices[0]["M"] == "Console usage"
    assert "SHOW HELP|CONFIG|DATABASES" in help_.notices[0]["D"]


def test_show_backends(proxy: Proxy) -> None:
    appdb = proxy.config.databases["appdb"]
    replica = proxy.pool_for(appdb, "app", appdb.replicas[0])
    replica.last_error = PoolError("08006", "refused")
    rows = one(AdminConsole(proxy), "SHOW BACKENDS").rows
    # Not yet checked by a monitor: the topology's role; "down" only when its pools failed.
    assert rows == [
        ["appdb", "10.0.0.1", "5432", "primary", "unknown", None, None, None, None],
        ["appdb", "10.0.0.2", "5432", "replica", "down", None, None, None, None],
        ["appdb", "10.0.0.3", "5433", "replica", "unknown", None, None, None, None],
        ["sessions", "10.0.1.1", "6543", "primary", "unknown", None, None, None, None],
    ]


# ---- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql", ["show pools", "SHOW POOLS;", "  Show\tPools ;  ", "show pools;;", "\nSHOW POOLS\n"]
)
def test_case_whitespace_and_semicolons(console: AdminConsole, sql: str) -> None:
    result = one(console, sql)
    assert (result.columns, result.tag) == (POOLS, "SHOW")


@pytest.mark.parametrize("sql", ["", "   ", ";", " ; ;\n"])
def test_empty_query(console: AdminConsole, sql: str) -> None:
    assert one(console, sql).empty


def test_several_commands_in_one_query(console: AdminConsole) -> None:
    results = run(console, "SHOW VERSION; show lists;SHOW USERS")
    assert [r.columns[0] for r in results] == ["version", "list", "name"]
    assert [r.tag for r in results] == ["SHOW"] * 3


def test_unknown_command_is_a_syntax_error_and_stops_the_query(console: AdminConsole) -> None:
    results = run(console, "SHOW VERSION; SHOW NOPE; SHOW LISTS")
    assert len(results) == 2
    assert results[0].columns == ["version"]
    error = results[1].error
    assert error is not None
    assert (error["S"], error["C"]) == ("ERROR", "42601")
    assert error["M"] == "invalid command 'SHOW NOPE', use SHOW HELP;"


@pytest.mark.parametrize(
    "sql", ["SHOW", "DROP TABLE x", "SHOW POOLS extra", "select 1", "RELOAD now", "SHUTDOWN x"]
)
def test_syntax_errors(console: AdminConsole, sql: str) -> None:
    error = one(console, sql).error
    assert error is not None and error["C"] == "42601"


def test_select_is_show_and_fake_parameters(console: AdminConsole) -> None:
    assert one(console, "SELECT VERSION").columns == ["version"]
    encoding = one(console, "SHOW client_encoding")
    assert (encoding.columns, encoding.rows) == (["client_encoding"], [["UTF8"]])
    result = one(console, "SET client_encoding = 'UTF8'")
    assert result.tag == "SET" and result.notices[0]["M"] == "SET ignored"
    error = one(console, "SET pool_size = 5").error
    assert error is not None and error["C"] == "0A000"


# ---- PAUSE / RESUME / RELOAD / SHUTDOWN ------------------------------------------------------


def test_pause_and_resume_one_database(proxy: Proxy) -> None:
    appdb = proxy.config.databases["appdb"]
    pool = proxy.pool_for(appdb, "app")
    other = proxy.pool_for(proxy.config.databases["sessions"], "app")
    console = AdminConsole(proxy)

    assert one(console, "PAUSE appdb").tag == "PAUSE"
    assert pool.paused and not other.paused
    paused = {r["name"]: r["paused"] for r in one(console, "SHOW DATABASES").dicts()}
    assert paused == {"appdb": "1", "sessions": "0"}

    assert one(console, 'resume "appdb"').tag == "RESUME"
    assert not pool.paused
    error = one(console, "RESUME appdb").error
    assert error is not None and error["M"] == "database appdb is not paused"


def test_pause_all(proxy: Proxy) -> None:
    pool = proxy.pool_for(proxy.config.databases["sessions"], "report")
    console = AdminConsole(proxy)
    error = one(console, "RESUME").error
    assert error is not None and error["M"] == "pooler is not paused/suspended"
    assert one(console, "pause").tag == "PAUSE"
    assert pool.paused
    error = one(console, "PAUSE").error
    assert error is not None and error["M"] == "already suspended/paused"
    assert one(console, "RESUME").tag == "RESUME"
    assert not pool.paused


@pytest.mark.parametrize(
    ("sql", "sqlstate", "message"),
    [
        ("PAUSE nodb", "3D000", "no such database: nodb"),
        ("RESUME nodb", "3D000", "no such database: nodb"),
        ("PAUSE pgrouter", "0A000", "cannot pause admin db: pgrouter"),
        ("SHUTDOWN WAIT_FOR_CLIENTS", "0A000", "SHUTDOWN WAIT_FOR_CLIENTS is not supported"),
    ],
)
def test_command_errors(console: AdminConsole, sql: str, sqlstate: str, message: str) -> None:
    error = one(console, sql).error
    assert error is not None
    assert (error["C"], error["M"]) == (sqlstate, message)


def test_reload_from_file(tmp_path: Path) -> None:
    path = tmp_path / "pgrouter.yaml"
    path.write_text(yaml.safe_dump(TOPOLOGY))
    proxy = Proxy(load_config(path, env={}))
    console = AdminConsole(proxy)
    changed = {**TOPOLOGY, "pool_size": 3}
    path.write_text(yaml.safe_dump(changed))
    assert one(console, "RELOAD").tag == "RELOAD"
    assert proxy.config.pool_size == 3

    path.write_text(yaml.safe_dump({**TOPOLOGY, "pool_size": 0, "pool_mode": "nope"}))
    error = one(console, "reload;").error
    assert error is not None
    assert error["C"] == "F0000"
    assert error["M"].startswith("RELOAD failed: ")
    assert "pool_size" in error["D"] and "pool_mode" in error["D"]
    assert proxy.config.pool_size == 3  # the running configuration stays


def test_reload_without_a_file(console: AdminConsole) -> None:
    error = one(console, "RELOAD").error
    assert error is not None and error["C"] == "F0000"


def test_shutdown_calls_the_proxy(proxy: Proxy) -> None:
    calls: list[str] = []
    proxy.on_shutdown_request = lambda: calls.append("shutdown")
    assert one(AdminConsole(proxy), "SHUTDOWN").tag == "SHUTDOWN"
    assert calls == ["shutdown"]


class RefusingProxy(Proxy):
    """A proxy whose PAUSE refuses, as a real one may for a state it cannot enter."""

    def pause(self, database: str | None = None) -> None:
        raise ValueError("cannot pause while shutting down")


def test_refusal_from_the_proxy_becomes_an_error() -> None:
    console = AdminConsole(RefusingProxy(parse_config(TOPOLOGY, env={})))
    error = one(console, "PAUSE").error
    assert error is not None
    assert (error["C"], error["M"]) == ("55000", "cannot pause while shutting down")


class BareProxy:
    """The state a proxy had before the admin commands existed (no pause/resume/...)."""

    def __init__(self) -> None:
        real = make_proxy()
        self.config = real.config
        self.pools = real.pools
        self.clients = real.clients
        self.listeners: list[Any] = []
        self.started = real.started
        self.auth_failures = 0
        self.cancel_requests = 0


@pytest.mark.parametrize("command", ["PAUSE", "RESUME", "RELOAD", "SHUTDOWN"])
def test_missing_proxy_methods_answer_not_supported(command: str) -> None:
    console = AdminConsole(BareProxy())  # type: ignore[arg-type]
    error = one(console, command).error
    assert error is not None
    assert (error["C"], error["M"]) == ("0A000", f"{command} is not supported yet")
    assert one(console, "SHOW POOLS").tag == "SHOW"  # the rest still works


def test_an_internal_failure_is_an_error_not_an_exception() -> None:
    broken = BareProxy()
    broken.pools = None  # type: ignore[assignment]
    error = one(AdminConsole(broken), "SHOW POOLS").error  # type: ignore[arg-type]
    assert error is not None and error["C"] == "XX000"
