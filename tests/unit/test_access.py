"""router/access.py and router/auth_query.py, and the login decisions the proxy makes with
them: which auth_rules entry applies, the 28000 refusals, the per-user / per-database client
limits, and the secrets auth_query found.

Real Proxy and ClientSession objects from a parsed topology; the client's transport is a
stand-in that records what the proxy writes. No sockets, no PostgreSQL.
"""

from __future__ import annotations

import asyncio
import struct
from ipaddress import ip_address
from typing import Any

import pytest

from protocol.auth import ClientAuth, Md5Hash
from protocol.errors import parse_error_fields
from protocol.framing import MessageReader
from router.access import ClientLimits, choose_rule, peer_address, rule_refusal
from router.auth_query import AuthQuery, auth_query_sql
from router.client import ClientSession, State
from router.config import AuthRule, parse_config
from router.proxy import Proxy

VERIFIER = (
    "SCRAM-SHA-256$4096:cGdyb3V0ZXItZXhhbXBsZQ==$"
    "lObD0XJIQx4HuuNbwAnDkU5TqNBZf7BLAEQXQg3HK6A=:i0zuVNtDx9YzKyuWQIdq6wNP9WZt9ZpyXe9Aam+p15c="
)
TOPOLOGY: dict[str, Any] = {
    "users": {
        "app": {"password": "app-secret"},
        "report": {"password": "report-secret", "max_client_connections": 1},
        "scram_only": {"password": VERIFIER},
    },
    "admin": {"users": ["app"]},
    "databases": {
        "appdb": {"primary": "10.0.0.1:5432"},
        "otherdb": {"primary": "10.0.0.1:5432", "max_db_client_connections": 2},
    },
}
RULES: list[dict[str, Any]] = [
    {"database": "pgrouter", "address": "127.0.0.1/32", "method": "scram-sha-256"},
    {"database": ["pgrouter", "pgbouncer"], "method": "reject"},
    {"user": "scram_only", "method": "md5"},
    {"user": "report", "address": ["10.0.0.0/8", "fd00::/8"], "method": "md5"},
    {"user": "report", "method": "reject"},
    {"database": "otherdb", "address": "192.0.2.0/24", "method": "password"},
    {"address": ["192.0.2.0/24", "::1/128"], "method": "scram-sha-256"},
]
AUTH_SASL, AUTH_MD5, AUTH_CLEARTEXT = 10, 5, 3


# ---- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peername", "expected"),
    [
        (("10.1.2.3", 5000), "10.1.2.3"),
        (("::1", 5000, 0, 0), "::1"),
        (("::ffff:10.1.2.3", 5000, 0, 0), "10.1.2.3"),  # IPv4 client on a dual-stack socket
        (("fe80::1%lo", 5000, 0, 1), "fe80::1%lo"),
        ("/tmp/.s.PGSQL.6432", None),
        ("", None),
        (None, None),
        (("not-an-ip", 1), None),
        ((), None),
    ],
)
def test_peer_address(peername: object, expected: str | None) -> None:
    address = peer_address(peername)
    assert (None if address is None else str(address)) == expected


def test_first_matching_rule_wins() -> None:
    rules = parse_config({**TOPOLOGY, "auth_rules": RULES}, env={}).auth_rules
    assert rules is not None

    def method(database: str, user: str, address: str | None) -> str | None:
        rule = choose_rule(rules, database, user, None if address is None else ip_address(address))
        return None if rule is None else rule.method

    assert method("pgrouter", "app", "127.0.0.1") == "scram-sha-256"
    assert method("pgrouter", "app", "192.0.2.1") == "reject"
    assert method("pgbouncer", "app", "127.0.0.1") == "reject"
    assert method("appdb", "scram_only", "203.0.113.9") == "md5"
    assert method("appdb", "report", "10.9.9.9") == "md5"
    assert method("appdb", "report", "fd00::7") == "md5"
    assert method("appdb", "report", "192.0.2.1") == "reject"
    assert method("otherdb", "app", "192.0.2.1") == "plain"
    assert method("appdb", "app", "192.0.2.1") == "scram-sha-256"
    assert method("appdb", "app", "::1") == "scram-sha-256"
    assert method("appdb", "app", "::ffff:192.0.2.1") is None  # callers pass peer_address()
    assert method("appdb", "app", "203.0.113.9") is None
    assert method("appdb", "app", None) is None  # not an IP client: only address-less rules


def test_refusal_wording() -> None:
    v4 = ip_address("10.1.2.3")
    assert rule_refusal(AuthRule("md5"), "appdb", "app", v4) is None
    assert rule_refusal(AuthRule("trust"), "appdb", "app", v4) is None
    assert rule_refusal(None, "appdb", "app", v4) == (
        'no pgrouter auth_rules entry for host "10.1.2.3", user "app", database "appdb"'
    )
    assert rule_refusal(AuthRule("reject"), "appdb", "app", ip_address("::1")) == (
        'pgrouter auth_rules rejects connection for host "::1", user "app", database "appdb"'
    )
    assert rule_refusal(None, "d", "u", None) == (
        'no pgrouter auth_rules entry for host "[local]", user "u", database "d"'
    )


def test_client_limits_count_and_release() -> None:
    limits = ClientLimits()
    a, b, c, d = object(), object(), object(), object()
    user_limit = (2, "max_user_client_connections")
    assert limits.admit(a, "app", "appdb", user_limit, 0) is None
    assert limits.admit(a, "app", "appdb", user_limit, 0) is None  # counted once
    assert limits.admit(b, "app", "otherdb", user_limit, 0) is None
    assert limits.admit(c, "app", "appdb", user_limit, 0) == (
        'no more connections allowed for user "app" (max_user_client_connections)'
    )
    assert limits.admit(c, "other", "appdb", (0, "x"), 1) == (
        'no more connections allowed for database "appdb" (max_db_client_connections)'
    )
    # The database limit is checked first, as PostgreSQL does.
    assert limits.admit(c, "app", "appdb", user_limit, 1) == (
        'no more connections allowed for database "appdb" (max_db_client_connections)'
    )
    assert limits.per_user == {"app": 2}
    assert limits.per_database == {"appdb": 1, "otherdb": 1}
    limits.release(a)
    limits.release(a)  # twice: no effect
    limits.release(d)  # never admitted: no effect
    assert limits.per_user == {"app": 1}
    assert limits.per_database == {"otherdb": 1}
    assert limits.admit(c, "app", "appdb", user_limit, 1) is None
    limits.release(b)
    limits.release(c)
    assert limits.per_user == limits.per_database == {}


# ---- the login path through a real ClientSession -------------------------------------------------


class FakeTransport:
    """Records writes; the peer address is what the rules see."""

    def __init__(self, peer: object) -> None:
        self.peer = peer
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def startup(params: dict[str, str]) -> bytes:
    body = struct.pack("!I", 3 << 16)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def login(proxy: Proxy, user: str, database: str, peer: object) -> tuple[ClientSession, Any]:
    """Connect and send a startup packet; (session, first reply as (kind, body))."""
    client = ClientSession(proxy)
    transport = FakeTransport(peer)
    client.connection_made(transport)  # type: ignore[arg-type]
    client.data_received(startup({"user": user, "database": database}))
    reader = MessageReader()
    reader.feed(bytes(transport.written))
    messages = list(reader)
    assert messages, "no reply to the startup packet"
    return client, messages[0]


def auth_request(reply: tuple[int, bytes]) -> int:
    kind, body = reply
    assert kind == ord("R"), parse_error_fields(body)
    return int(struct.unpack_from("!I", body)[0])


def refusal(reply: tuple[int, bytes]) -> tuple[str, str]:
    kind, body = reply
    assert kind == ord("E"), reply
    fields = parse_error_fields(body)
    assert fields["S"] == "FATAL"
    return fields["C"], fields["M"]


@pytest.fixture
def proxy() -> Proxy:
    return Proxy(parse_config({**TOPOLOGY, "auth_rules": RULES}, env={}))


def test_rules_choose_the_method(proxy: Proxy) -> None:
    lan = ("192.0.2.7", 40000)
    assert auth_request(login(proxy, "app", "appdb", lan)[1]) == AUTH_SASL
    assert auth_request(login(proxy, "app", "otherdb", lan)[1]) == AUTH_CLEARTEXT
    assert auth_request(login(proxy, "report", "appdb", ("10.3.3.3", 1))[1]) == AUTH_MD5
    assert auth_request(login(proxy, "app", "appdb", ("::1", 1, 0, 0))[1]) == AUTH_SASL
    # An IPv4 client on a dual-stack listener matches the IPv4 rules.
    assert auth_request(login(proxy, "app", "appdb", ("::ffff:192.0.2.7", 1, 0, 0))[1]) == 10
    # md5 for a user known only by a SCRAM verifier: SCRAM instead.
    assert auth_request(login(proxy, "scram_only", "appdb", ("203.0.113.1", 1))[1]) == AUTH_SASL
    # Unknown users are asked like known ones (the rules decide, not the users list).
    assert auth_request(login(proxy, "ghost", "otherdb", lan)[1]) == AUTH_CLEARTEXT


def test_admin_console_is_matched_by_its_name(proxy: Proxy) -> None:
    assert auth_request(login(proxy, "app", "pgrouter", ("127.0.0.1", 1))[1]) == AUTH_SASL
    for database, peer in (("pgrouter", ("192.0.2.7", 1)), ("pgbouncer", ("127.0.0.1", 1))):
        assert refusal(login(proxy, "app", database, peer)[1]) == (
            "28000",
            f'pgrouter auth_rules rejects connection for host "{peer[0]}", user "app", '
            f'database "{database}"',
        )


def test_no_matching_rule_is_refused_with_28000(proxy: Proxy) -> None:
    client, reply = login(proxy, "app", "appdb", ("203.0.113.9", 1))
    assert refusal(reply) == (
        "28000",
        'no pgrouter auth_rules entry for host "203.0.113.9", user "app", database "appdb"',
    )
    assert client.state is State.CLOSED
    assert client not in proxy.clients
    # Refused before the database is looked up: an unknown one gets the same answer.
    assert refusal(login(proxy, "app", "nosuch", ("203.0.113.9", 1))[1]) == (
        "28000",
        'no pgrouter auth_rules entry for host "203.0.113.9", user "app", database "nosuch"',
    )
    # A client that is not an IP client matches only rules without an address.
    assert refusal(login(proxy, "app", "appdb", "")[1])[1].startswith(
        'no pgrouter auth_rules entry for host "[local]"'
    )
    assert proxy.login_refusals == 3


def test_reject_rule(proxy: Proxy) -> None:
    assert refusal(login(proxy, "report", "appdb", ("192.0.2.7", 1))[1]) == (
        "28000",
        'pgrouter auth_rules rejects connection for host "192.0.2.7", user "report", '
        'database "appdb"',
    )


def test_without_rules_auth_type_applies_to_everyone() -> None:
    proxy = Proxy(parse_config({**TOPOLOGY, "auth_type": "plain"}, env={}))
    for peer in (("203.0.113.9", 1), ("::1", 1, 0, 0), ""):
        for database in ("appdb", "pgrouter"):
            assert auth_request(login(proxy, "app", database, peer)[1]) == AUTH_CLEARTEXT
    assert refusal(login(proxy, "app", "nosuch", ("203.0.113.9", 1))[1])[0] == "3D000"


def test_reload_swaps_the_rules(proxy: Proxy) -> None:
    peer = ("203.0.113.9", 1)
    assert refusal(login(proxy, "app", "appdb", peer)[1])[0] == "28000"
    proxy.reload(parse_config({**TOPOLOGY, "auth_rules": [{"method": "md5"}]}, env={}))
    assert auth_request(login(proxy, "app", "appdb", peer)[1]) == AUTH_MD5
    proxy.reload(parse_config(TOPOLOGY, env={}))
    assert auth_request(login(proxy, "app", "appdb", peer)[1]) == AUTH_SASL


# ---- limits through Proxy.admit ------------------------------------------------------------------


def logged_in(proxy: Proxy, user: str, database: str) -> ClientSession:
    """A client past authentication, as _authenticated sees it."""
    client = ClientSession(proxy)
    client.connection_made(FakeTransport(("192.0.2.7", 1)))  # type: ignore[arg-type]
    client.user = user
    client.database = proxy.config.databases[database]
    return client


def test_admit_applies_the_user_and_database_limits() -> None:
    proxy = Proxy(parse_config({**TOPOLOGY, "max_user_client_connections": 3}, env={}))
    first = logged_in(proxy, "report", "appdb")
    assert proxy.admit(first) is None
    assert proxy.admit(logged_in(proxy, "report", "appdb")) == (
        'no more connections allowed for user "report" (max_client_connections)'
    )
    apps = [logged_in(proxy, "app", "appdb") for _ in range(4)]
    assert [proxy.admit(c) for c in apps[:3]] == [None] * 3
    assert proxy.admit(apps[3]) == (
        'no more connections allowed for user "app" (max_user_client_connections)'
    )
    # otherdb allows 2; unknown users (not in `users`) get the top-level user limit.
    others = [logged_in(proxy, f"u{i}", "otherdb") for i in range(3)]
    assert [proxy.admit(c) for c in others] == [
        None,
        None,
        'no more connections allowed for database "otherdb" (max_db_client_connections)',
    ]
    assert proxy.login_refusals == 3
    # Leaving frees the slot (client_gone runs when a session closes).
    first.close()
    assert proxy.admit(logged_in(proxy, "report", "appdb")) is None
    others[0].close()
    assert proxy.admit(others[2]) is None
    # A reload changes the limits for the next logins; connected clients keep counting.
    proxy.reload(parse_config({**TOPOLOGY, "max_user_client_connections": 5}, env={}))
    assert proxy.admit(apps[3]) is None
    assert proxy.admit(logged_in(proxy, "app", "appdb")) is None
    assert proxy.admit(logged_in(proxy, "app", "appdb")) is not None


# ---- auth_query (the lookups themselves run against real servers: integration tests) -----------

MD5_SECRET = "md5" + "0123456789abcdef" * 2


def test_auth_query_sql_quotes_the_user_name() -> None:
    query = "SELECT * FROM f($1) WHERE $1 <> '' AND $10 = $1"
    assert (
        auth_query_sql(query, "app") == "SELECT * FROM f('app') WHERE 'app' <> '' AND $10 = 'app'"
    )
    assert auth_query_sql("SELECT $1", "o'brien") == "SELECT 'o''brien'"
    assert auth_query_sql("SELECT $1", "' OR 1=1 --") == "SELECT ''' OR 1=1 --'"
    # Backslashes: an E'' literal, the same string whatever standard_conforming_strings is.
    assert auth_query_sql("SELECT $1", "a\\'b") == "SELECT E'a\\\\''b'"
    assert auth_query_sql("SELECT $1", "\\") == "SELECT E'\\\\'"


def test_auth_query_cache_expires() -> None:
    cache = AuthQuery()
    key = ("10.0.0.1", 5432, "u")
    assert cache.cached(key) == (False, None)
    cache._cache[key] = (100.0, None)  # "no such user" is an answer too
    assert cache.cached(key, now=99.0) == (True, None)
    assert cache.cached(key, now=100.0) == (False, None)
    assert cache.cached(key, now=50.0) == (False, None)  # expired entries are dropped
    cache._cache[key] = (100.0, MD5_SECRET)
    cache.clear()
    assert cache.cached(key, now=0.0) == (False, None)


AQ_TOPOLOGY = {**TOPOLOGY, "auth_user": "app"}


def cached_secret(proxy: Proxy, user: str, secret: str | None) -> None:
    primary = proxy.config.databases["appdb"].primary
    proxy.auth_query._cache[(primary.host, primary.port, user)] = (float("inf"), secret)


def test_client_auth_uses_looked_up_secrets() -> None:
    proxy = Proxy(parse_config(AQ_TOPOLOGY, env={}))
    cached_secret(proxy, "v", VERIFIER)
    cached_secret(proxy, "h", MD5_SECRET)
    cached_secret(proxy, "c", "cleartext-pw")
    cached_secret(proxy, "bad", "SCRAM-SHA-256$junk")
    cached_secret(proxy, "none", None)
    clients = {u: logged_in(proxy, u, "appdb") for u in ("v", "h", "c", "bad", "none")}

    def auth(user: str, method: str = "md5") -> Any:
        result = proxy.client_auth(clients[user], user, method)
        assert result is not None, "a cached secret needs no lookup"
        return result

    v = auth("v")  # md5 for a SCRAM verifier: SCRAM, as PostgreSQL does
    assert (v.method, v.scram_info is not None, v.password) == ("scram-sha-256", True, None)
    h = auth("h")
    assert (h.method, h.md5_hash, h.password) == ("md5", MD5_SECRET, None)
    assert auth("h", "scram-sha-256").md5_hash == MD5_SECRET  # fails later, as a wrong password
    assert auth("c").password == "cleartext-pw"
    assert auth("c", "scram-sha-256").scram_info is not None
    for unknown in ("bad", "none"):  # random secrets, as for users nobody knows
        a = auth(unknown)
        assert a.method == "md5" and a.password and a.md5_hash is None
    assert auth("none", "trust").method == "trust"
    # Topology users never need a lookup.
    assert proxy.client_auth(logged_in(proxy, "app", "appdb"), "app", "md5").password == (  # type: ignore[union-attr]
        "app-secret"
    )


def test_admin_console_logins_look_up_only_with_auth_dbname() -> None:
    proxy = Proxy(parse_config(AQ_TOPOLOGY, env={}))
    console = ClientSession(proxy)
    console.connection_made(FakeTransport(("192.0.2.7", 1)))  # type: ignore[arg-type]
    a = proxy.client_auth(console, "someone", "md5")  # no database, no auth_dbname: unknown
    assert a is not None and a.password and a.md5_hash is None
    proxy = Proxy(parse_config({**AQ_TOPOLOGY, "auth_dbname": "appdb"}, env={}))
    cached_secret(proxy, "someone", MD5_SECRET)
    console = ClientSession(proxy)
    console.connection_made(FakeTransport(("192.0.2.7", 1)))  # type: ignore[arg-type]
    a = proxy.client_auth(console, "someone", "md5")
    assert a is not None and a.md5_hash == MD5_SECRET


def test_learned_server_secrets_reach_the_pools() -> None:
    proxy = Proxy(parse_config(AQ_TOPOLOGY, env={}))
    appdb = proxy.config.databases["appdb"]
    pool = proxy.pool_for(appdb, "h")
    assert pool.password is None
    auth = ClientAuth("md5", "h", None, md5_hash=MD5_SECRET)
    proxy.learn_server_secret(appdb, "h", auth)
    assert isinstance(pool.password, Md5Hash) and pool.password == MD5_SECRET
    assert proxy.pool_for(appdb, "h", appdb.primary) is pool
    # A topology user with a cleartext password keeps it.
    proxy.learn_server_secret(appdb, "app", ClientAuth("md5", "app", None, md5_hash=MD5_SECRET))
    assert proxy.pool_for(appdb, "app").password == "app-secret"
    # A cleartext secret from auth_query logs in as it is; a topology verifier user's
    # pools learn nothing without a SCRAM exchange.
    proxy.learn_server_secret(appdb, "c", ClientAuth("md5", "c", "pw"))
    assert proxy.pool_for(appdb, "c").password == "pw"
    proxy.learn_server_secret(appdb, "scram_only", ClientAuth("plain", "scram_only", None))
    assert proxy.pool_for(appdb, "scram_only").password is None
    # Reloads keep what was learned.
    proxy.reload(parse_config(AQ_TOPOLOGY, env={}))
    assert pool.password == MD5_SECRET


def test_a_login_waiting_for_auth_query() -> None:
    """While the lookup runs the client has not been asked for anything: a password sent
    anyway is a protocol violation. A lookup that fails refuses the login with 08006."""
    topology = {**AQ_TOPOLOGY, "databases": {"appdb": {"primary": "127.0.0.1:1"}}}
    topology["users"] = {"app": {"password": "app-secret"}}

    async def scenario() -> tuple[bytes, bytes]:
        proxy = Proxy(parse_config(topology, env={}))
        early = ClientSession(proxy)
        early_transport = FakeTransport(("192.0.2.7", 1))
        early.connection_made(early_transport)  # type: ignore[arg-type]
        early.data_received(startup({"user": "ghost", "database": "appdb"}))
        assert early.state is State.AUTH and not early_transport.written
        early.data_received(b"p\x00\x00\x00\x08pw\x00\x00")
        patient = ClientSession(proxy)
        patient_transport = FakeTransport(("192.0.2.8", 1))
        patient.connection_made(patient_transport)  # type: ignore[arg-type]
        patient.data_received(startup({"user": "ghost", "database": "appdb"}))
        for _ in range(200):
            if patient.state is State.CLOSED:
                break
            await asyncio.sleep(0.01)
        assert proxy.auth_query.lookups == 1 and proxy.auth_query.failures == 1
        return bytes(early_transport.written), bytes(patient_transport.written)

    early, patient = asyncio.run(scenario())
    assert refusal(next(iter(reader_of(early)))) == (
        "08P01",
        "unexpected message before the authentication request",
    )
    assert refusal(next(iter(reader_of(patient)))) == (
        "08006",
        "could not look up the user (auth_query failed)",
    )


def reader_of(data: bytes) -> MessageReader:
    reader = MessageReader()
    reader.feed(data)
    return reader
