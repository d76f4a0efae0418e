"""auth_query against the real pg_authid: users who are not in the topology log in with the
SCRAM verifier or md5 hash a SECURITY DEFINER function returns to the auth user, and reach
the servers with SCRAM pass-through or the md5 hash. Unknown users and wrong passwords get the
same 28P01; answers are cached for auth_query_ttl; a failing lookup refuses only that login.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from router.cluster import scram_verifier
from tests.support import APP_PASSWORD, APP_USER, ProxyProcess

pytestmark = pytest.mark.timeout(90)

ProxyFactory = Callable[..., ProxyProcess]
SCHEMA = "pgrouter_auth"
LOOKUP = f"SELECT * FROM {SCHEMA}.lookup($1)"
SCRAM_PASSWORD, MD5_PASSWORD = "aq-scram-secret", "aq-md5-secret"


class Roles:
    """Login roles created for one test (names unique per test), dropped afterwards."""

    def __init__(self, cluster: Any) -> None:
        suffix = uuid.uuid4().hex[:8]
        self.cluster = cluster
        self.scram = f"aq_scram_{suffix}"
        self.md5 = f"aq_md5_{suffix}"
        cluster.create_user(self.scram, SCRAM_PASSWORD)
        cluster.create_user(self.md5, MD5_PASSWORD, md5=True)

    def alter_password(self, name: str, password: str) -> None:
        with psycopg.connect(self.cluster.primary.dsn(), autocommit=True) as conn:
            # A verifier, not the password: the server log never sees the plaintext.
            conn.execute(f"ALTER ROLE \"{name}\" PASSWORD '{scram_verifier(password)}'")

    def drop(self) -> None:
        with psycopg.connect(self.cluster.primary.dsn(), autocommit=True) as conn:
            for name in (self.scram, self.md5):
                conn.execute(f'DROP ROLE IF EXISTS "{name}"')


@pytest.fixture(scope="module")
def lookup_function(cluster: Any) -> Iterator[None]:
    """The auth user (app) may run a SECURITY DEFINER function over pg_authid, nothing more."""
    sql = f"""
        CREATE SCHEMA IF NOT EXISTS {SCHEMA};
        CREATE OR REPLACE FUNCTION {SCHEMA}.lookup(name text, OUT usename text, OUT passwd text)
        RETURNS SETOF record LANGUAGE sql SECURITY DEFINER
        SET search_path = pg_catalog, pg_temp
        AS $$
            SELECT rolname::text,
                   CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END
            FROM pg_authid WHERE rolname = name AND rolcanlogin
        $$;
        REVOKE ALL ON FUNCTION {SCHEMA}.lookup(text) FROM PUBLIC;
        GRANT USAGE ON SCHEMA {SCHEMA} TO {APP_USER};
        GRANT EXECUTE ON FUNCTION {SCHEMA}.lookup(text) TO {APP_USER};
    """
    with psycopg.connect(cluster.primary.dsn(dbname="appdb"), autocommit=True) as conn:
        conn.execute(sql)
    yield
    with psycopg.connect(cluster.primary.dsn(dbname="appdb"), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {SCHEMA} CASCADE")


@pytest.fixture
def roles(cluster: Any, lookup_function: None) -> Iterator[Roles]:
    r = Roles(cluster)
    try:
        yield r
    finally:
        r.drop()


def auth_query_proxy(proxy_factory: ProxyFactory, **overrides: Any) -> ProxyProcess:
    config: dict[str, Any] = {
        "auth_type": "scram-sha-256",
        "auth_user": APP_USER,
        "auth_query": LOOKUP,
        "auth_dbname": "appdb",
    }
    return proxy_factory({**config, **overrides})


def connect(proxy: ProxyProcess, user: str, password: str, dbname: str = "appdb") -> Any:
    return psycopg.connect(
        proxy.dsn(dbname=dbname, user=user, password=password), autocommit=True, connect_timeout=5
    )


def refusal(proxy: ProxyProcess, user: str, password: str) -> asyncpg.PostgresError:
    async def attempt() -> None:
        conn = await asyncpg.connect(
            host=proxy.host,
            port=proxy.port,
            user=user,
            password=password,
            database="appdb",
            timeout=10,
        )
        await conn.close()

    with pytest.raises(asyncpg.PostgresError) as info:
        asyncio.run(attempt())
    return info.value


def test_scram_user_from_pg_authid(proxy_factory: ProxyFactory, roles: Roles) -> None:
    """SCRAM against the looked-up verifier, then SCRAM pass-through to the servers (which
    ask this role for SCRAM), on both databases."""
    proxy = auth_query_proxy(proxy_factory)
    for dbname in ("appdb", "otherdb"):
        with connect(proxy, roles.scram, SCRAM_PASSWORD, dbname) as conn:
            row = conn.execute("SELECT current_user, current_database()").fetchone()
            assert row == (roles.scram, dbname)
    for user, password in ((roles.scram, "wrong"), ("aq_nobody", SCRAM_PASSWORD)):
        err = refusal(proxy, user, password)
        assert err.sqlstate == "28P01", repr(err)
        assert f'password authentication failed for user "{user}"' in str(err)
    # The auth user itself still logs in with its topology password.
    with connect(proxy, APP_USER, APP_PASSWORD) as app:
        assert app.execute("SELECT 1").fetchone() == (1,)
    assert proxy.returncode is None


def test_md5_user_and_md5_method(proxy_factory: ProxyFactory, roles: Roles) -> None:
    """auth_type md5: the md5 hash checks the client and logs in to the server; a user whose
    secret is a SCRAM verifier is asked for SCRAM instead, as PostgreSQL does."""
    proxy = auth_query_proxy(proxy_factory, auth_type="md5")
    with connect(proxy, roles.md5, MD5_PASSWORD) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (roles.md5,)
    with connect(proxy, roles.scram, SCRAM_PASSWORD) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (roles.scram,)
    err = refusal(proxy, roles.md5, "wrong")
    assert err.sqlstate == "28P01", repr(err)
    assert f'password authentication failed for user "{roles.md5}"' in str(err)


def test_answers_are_cached_for_the_ttl(proxy_factory: ProxyFactory, roles: Roles) -> None:
    proxy = auth_query_proxy(proxy_factory, auth_query_ttl="3s")
    with connect(proxy, roles.scram, SCRAM_PASSWORD) as conn:
        conn.execute("SELECT 1")
    roles.alter_password(roles.scram, "changed-secret")
    changed_at = time.monotonic()
    # Within the TTL the old verifier is still the one pgrouter knows.
    with connect(proxy, roles.scram, SCRAM_PASSWORD) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert time.monotonic() - changed_at < 3, "too slow to observe the cache"
    time.sleep(max(0.0, 3.2 - (time.monotonic() - changed_at)))
    assert refusal(proxy, roles.scram, SCRAM_PASSWORD).sqlstate == "28P01"
    with connect(proxy, roles.scram, "changed-secret") as conn:
        assert conn.execute("SELECT current_user").fetchone() == (roles.scram,)


@pytest.mark.parametrize("name", ["o'brien", "x\\", "' OR true --", 'we"ird'])
def test_odd_user_names_are_quoted(
    proxy_factory: ProxyFactory, lookup_function: None, name: str
) -> None:
    """Quotes and backslashes in a user name never break (or change) the query: such a user
    is simply not found."""
    proxy = auth_query_proxy(proxy_factory)
    err = refusal(proxy, name, "pw")
    assert err.sqlstate == "28P01", repr(err)
    assert proxy.returncode is None


def test_a_failing_lookup_refuses_only_that_login(
    proxy_factory: ProxyFactory, roles: Roles
) -> None:
    proxy = auth_query_proxy(proxy_factory, auth_query=f"SELECT * FROM {SCHEMA}.nosuch($1)")
    err = refusal(proxy, roles.scram, SCRAM_PASSWORD)
    assert err.sqlstate == "08006", repr(err)
    assert "auth_query failed" in str(err)
    with connect(proxy, APP_USER, APP_PASSWORD) as app:
        assert app.execute("SELECT 1").fetchone() == (1,)
    assert "auth_query failed" in proxy.log_text()
    assert SCRAM_PASSWORD not in proxy.log_text()
    assert proxy.returncode is None


def test_a_topology_user_with_only_a_verifier_reaches_the_servers(
    proxy_factory: ProxyFactory, roles: Roles
) -> None:
    """SCRAM pass-through without auth_query: the topology holds the role's verifier (copied
    from pg_authid), and the keys of the client's SCRAM login log in to the servers."""
    with psycopg.connect(roles.cluster.primary.dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (roles.scram,)
        ).fetchone()
    assert row is not None and row[0].startswith("SCRAM-SHA-256$")
    proxy = proxy_factory(auth_type="scram-sha-256", users={roles.scram: {"password": row[0]}})
    for _ in range(2):  # the second login finds the pool already logged in
        with connect(proxy, roles.scram, SCRAM_PASSWORD) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (roles.scram,)
    err = refusal(proxy, roles.scram, "wrong")
    assert err.sqlstate == "28P01", repr(err)
