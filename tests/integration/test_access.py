"""Access rules and client limits through the real proxy process and real drivers.

auth_rules: the method chosen per user, database and client address (first match wins), the
28000 refusals (no entry, reject), the admin console matched by its name, rules swapped by a
reload. Limits: max_user_client_connections, max_db_client_connections (also per database)
and users.NAME.max_client_connections refuse the next login with 53300 while everyone else
carries on, and a slot frees when a client leaves.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from router.cluster import conninfo
from tests.integration.test_bad_input import (
    asyncpg_error,
    connect_error,
    raw,
    startup_packet,
)
from tests.support import (
    APP_PASSWORD,
    APP_USER,
    MD5_PASSWORD,
    MD5_USER,
    ProxyProcess,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

ProxyFactory = Callable[..., ProxyProcess]
AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL = 0, 3, 5, 10


def first_auth_request(proxy: ProxyProcess, user: str, database: str) -> int:
    """The authentication request the proxy answers a startup packet with."""
    with raw(proxy) as client:
        client.send(startup_packet({"user": user, "database": database}))
        kind, body = client.until(b"RE")[-1]
        assert kind == b"R", body
        return int(struct.unpack_from("!I", body)[0])


def asyncpg_refusal(host: str, port: int, database: str = "appdb") -> asyncpg.PostgresError:
    """The error asyncpg (which reports the SQLSTATE) gets logging in as app at host:port."""

    async def attempt() -> None:
        conn = await asyncpg.connect(
            host=host, port=port, user=APP_USER, password=APP_PASSWORD, database=database
        )
        await conn.close()

    with pytest.raises(asyncpg.PostgresError) as info:
        asyncio.run(attempt())
    return info.value


def psql(proxy: ProxyProcess, sql: str, dbname: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PGPASSWORD=APP_PASSWORD, PGSSLMODE="disable")
    return subprocess.run(
        ["psql", "-X", "-h", proxy.host, "-p", str(proxy.port), "-U", APP_USER, "-d", dbname,
         "-A", "-t", "-c", sql],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def connect(proxy: ProxyProcess, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(**kw), autocommit=True, connect_timeout=5)


def connect_soon(proxy: ProxyProcess, timeout: float = 3.0, **kw: Any) -> psycopg.Connection[Any]:
    """Connect, retrying while the proxy has not yet seen a departed client's socket close."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect(proxy, **kw)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture
def closing() -> Iterator[list[psycopg.Connection[Any]]]:
    """Connections closed at the end of the test, whatever happens."""
    conns: list[psycopg.Connection[Any]] = []
    yield conns
    for conn in conns:
        conn.close()


# ---- auth_rules ---------------------------------------------------------------------------------


def test_rules_choose_the_method_per_user_and_database(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(
        auth_rules=[
            {"user": MD5_USER, "method": "md5"},
            {"database": "otherdb", "user": APP_USER, "method": "trust"},
            {"database": "appdb", "address": "127.0.0.0/8", "method": "scram-sha-256"},
            {"database": "otherdb", "method": "password"},
        ],
    )
    assert first_auth_request(proxy, APP_USER, "appdb") == AUTH_SASL
    assert first_auth_request(proxy, MD5_USER, "appdb") == AUTH_MD5
    assert first_auth_request(proxy, MD5_USER, "otherdb") == AUTH_MD5  # the first match wins
    assert first_auth_request(proxy, APP_USER, "otherdb") == AUTH_OK
    assert first_auth_request(proxy, "ghost", "otherdb") == AUTH_CLEARTEXT

    with connect(proxy, user=APP_USER, password=APP_PASSWORD) as scram:  # real SCRAM
        assert scram.execute("SELECT current_user").fetchone() == (APP_USER,)
    with connect(proxy, user=MD5_USER, password=MD5_PASSWORD) as md5:
        assert md5.execute("SELECT current_user").fetchone() == (MD5_USER,)
    with connect(proxy, dbname="otherdb", password=None) as trusted:
        assert trusted.execute("SELECT current_database()").fetchone() == ("otherdb",)
    err = asyncpg_error(proxy, password="not-the-password")
    assert err.sqlstate == "28P01", repr(err)
    assert f'password authentication failed for user "{APP_USER}"' in str(err)
    err = asyncpg_error(proxy, user="ghost", password="x", database="otherdb")
    assert err.sqlstate == "28P01", repr(err)
    assert 'password authentication failed for user "ghost"' in str(err)
    assert proxy.returncode is None


def test_a_rule_rejects_an_address(proxy_factory: ProxyFactory) -> None:
    """IPv6 loopback clients are rejected, IPv4 loopback clients log in; the process and a
    connected client carry on."""
    port = free_port()
    proxy = proxy_factory(
        listen=[f"127.0.0.1:{port}", f"[::1]:{port}"],
        auth_rules=[
            {"address": "::1/128", "method": "reject"},
            {"address": ["127.0.0.1/32", "10.0.0.0/8"], "method": "md5"},
        ],
    )
    with connect(proxy) as bystander:
        bystander.execute("SELECT 1")
        message = f'pgrouter auth_rules rejects connection for host "::1", user "{APP_USER}"'
        err = asyncpg_refusal("::1", proxy.port)
        assert err.sqlstate == "28000", repr(err)
        assert f'{message}, database "appdb"' in str(err)
        perr = connect_error(
            conninfo(host="::1", port=proxy.port, dbname="appdb", user=APP_USER, password="x")
        )
        assert message in str(perr)
        assert bystander.execute("SELECT 2").fetchone() == (2,)
    with connect(proxy) as again:
        assert again.execute("SELECT 3").fetchone() == (3,)
    assert proxy.returncode is None


def test_no_matching_rule_is_refused(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(
        auth_rules=[
            {"address": "10.0.0.0/8", "method": "md5"},
            {"user": MD5_USER, "address": "127.0.0.1/32", "method": "md5"},
        ]
    )
    err = asyncpg_error(proxy)
    assert err.sqlstate == "28000", repr(err)
    assert (
        f'no pgrouter auth_rules entry for host "127.0.0.1", user "{APP_USER}", '
        'database "appdb"' in str(err)
    )
    # Decided before the database is looked up: a client without an entry learns nothing.
    err = asyncpg_error(proxy, database="nosuch")
    assert err.sqlstate == "28000", repr(err)
    assert "no pgrouter auth_rules entry" in str(connect_error(proxy.dsn(dbname="nosuch")))
    with connect(proxy, user=MD5_USER, password=MD5_PASSWORD) as ok:
        assert ok.execute("SELECT 1").fetchone() == (1,)


def test_the_admin_console_is_matched_by_its_name(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(
        admin={"users": [APP_USER]},
        auth_rules=[
            {"database": "pgbouncer", "method": "reject"},
            {"database": ["pgrouter", "appdb"], "address": "127.0.0.1", "method": "scram-sha-256"},
        ],
    )
    out = psql(proxy, "SHOW VERSION", "pgrouter")  # the rule asks for SCRAM: psql does it
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("pgrouter")
    err = asyncpg_error(proxy, database="pgbouncer")
    assert err.sqlstate == "28000", repr(err)
    assert "auth_rules rejects connection" in str(err)
    err = asyncpg_error(proxy, database="otherdb")
    assert err.sqlstate == "28000", repr(err)
    assert "no pgrouter auth_rules entry" in str(err)


def test_a_reload_swaps_the_rules(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(auth_rules=[{"method": "md5"}])
    with connect(proxy) as held:
        proxy.reload(
            {
                **proxy.config,
                "auth_rules": [
                    {"database": "appdb", "method": "reject"},
                    {"method": "scram-sha-256"},
                ],
            }
        )
        wait_for(lambda: first_auth_request_or_error(proxy, "appdb") == "28000")
        assert first_auth_request(proxy, APP_USER, "otherdb") == AUTH_SASL
        assert held.execute("SELECT 1").fetchone() == (1,)  # connected clients stay

        proxy.reload({k: v for k, v in proxy.config.items() if k != "auth_rules"})
        wait_for(lambda: first_auth_request_or_error(proxy, "appdb") == AUTH_MD5)  # auth_type
        assert held.execute("SELECT 2").fetchone() == (2,)
    assert proxy.returncode is None


def first_auth_request_or_error(proxy: ProxyProcess, database: str) -> int | str:
    """The authentication request code, or the SQLSTATE of a refusal."""
    with raw(proxy) as client:
        client.send(startup_packet({"user": APP_USER, "database": database}))
        kind, body = client.until(b"RE")[-1]
        if kind == b"E":
            fields = dict((p[:1].decode(), p[1:].decode()) for p in body.split(b"\0") if p)
            return fields["C"]
        return int(struct.unpack_from("!I", body)[0])


# ---- client limits ------------------------------------------------------------------------------


def test_user_client_limit(
    proxy_factory: ProxyFactory, closing: list[psycopg.Connection[Any]]
) -> None:
    proxy = proxy_factory(max_user_client_connections=2, admin={"users": [APP_USER]})
    closing += [connect(proxy), connect(proxy, dbname="otherdb")]
    message = f'no more connections allowed for user "{APP_USER}" (max_user_client_connections)'
    err = asyncpg_error(proxy)
    assert err.sqlstate == "53300", repr(err)
    assert message in str(err)
    assert message in str(connect_error(proxy.dsn(dbname="otherdb")))
    # A wrong password is refused as such and takes no slot.
    assert asyncpg_error(proxy, password="wrong").sqlstate == "28P01"
    # Other users, the admin console and the connected clients are not affected.
    with connect(proxy, user=MD5_USER, password=MD5_PASSWORD) as other:
        assert other.execute("SELECT 1").fetchone() == (1,)
    out = psql(proxy, "SHOW VERSION", "pgrouter")
    assert out.returncode == 0, out.stderr
    for conn in closing:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # A client leaving frees its slot.
    closing.pop(0).close()
    closing.append(connect_soon(proxy))
    assert closing[-1].execute("SELECT current_user").fetchone() == (APP_USER,)
    assert asyncpg_error(proxy).sqlstate == "53300"
    assert proxy.returncode is None


def test_database_client_limit(
    proxy_factory: ProxyFactory, closing: list[psycopg.Connection[Any]]
) -> None:
    """A per-database override; the other database has none (top level: unlimited)."""
    proxy = proxy_factory(databases={"appdb": {"max_db_client_connections": 2}})
    closing += [connect(proxy), connect(proxy, user=MD5_USER, password=MD5_PASSWORD)]
    message = 'no more connections allowed for database "appdb" (max_db_client_connections)'
    err = asyncpg_error(proxy)
    assert err.sqlstate == "53300", repr(err)
    assert message in str(err)
    assert message in str(connect_error(proxy.dsn(user=MD5_USER, password=MD5_PASSWORD)))
    others = [connect(proxy, dbname="otherdb") for _ in range(3)]
    closing += others
    for conn in closing:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    closing.pop(1).close()
    closing.append(connect_soon(proxy))
    assert closing[-1].execute("SELECT current_database()").fetchone() == ("appdb",)
    assert asyncpg_error(proxy).sqlstate == "53300"


def test_top_level_database_limit_and_per_user_override(
    proxy_factory: ProxyFactory, closing: list[psycopg.Connection[Any]]
) -> None:
    proxy = proxy_factory(
        max_db_client_connections=3,
        max_user_client_connections=1,
        users={APP_USER: {"max_client_connections": 0}},  # unlimited for app
    )
    closing += [connect(proxy, user=MD5_USER, password=MD5_PASSWORD)]
    err = asyncpg_error(proxy, user=MD5_USER, password=MD5_PASSWORD, database="otherdb")
    assert err.sqlstate == "53300", repr(err)
    assert f'for user "{MD5_USER}" (max_user_client_connections)' in str(err)
    closing += [connect(proxy), connect(proxy)]  # appdb: 3 clients, its limit
    err = asyncpg_error(proxy)
    assert err.sqlstate == "53300", repr(err)
    assert 'for database "appdb" (max_db_client_connections)' in str(err)
    closing += [connect(proxy, dbname="otherdb") for _ in range(3)]
    assert asyncpg_error(proxy, database="otherdb").sqlstate == "53300"


def test_per_user_override_names_its_setting(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(users={MD5_USER: {"max_client_connections": 1}})
    with connect(proxy, user=MD5_USER, password=MD5_PASSWORD) as first:
        err = asyncpg_error(proxy, user=MD5_USER, password=MD5_PASSWORD)
        assert err.sqlstate == "53300", repr(err)
        assert f'no more connections allowed for user "{MD5_USER}" (max_client_connections)' in (
            str(err)
        )
        with connect(proxy) as app:  # no limit for the others
            assert app.execute("SELECT 1").fetchone() == (1,)
        assert first.execute("SELECT 1").fetchone() == (1,)
    with connect_soon(proxy, user=MD5_USER, password=MD5_PASSWORD) as again:
        assert again.execute("SELECT 1").fetchone() == (1,)
