"""Server-side failures: killed backends, unreachable or refusing servers, bad server passwords,
and cancel requests that must not cancel.

What is asserted is what clients see: the error (SQLSTATE and text) for the one client that
was hit, and business as usual for everybody else, including clients that arrive afterwards.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from tests.integration.test_bad_input import (
    RawClient,
    asyncpg_error,
    cancel_packet,
    query_message,
    rows,
    typed,
)
from tests.support import APP_USER, ProxyProcess, free_port

pytestmark = pytest.mark.timeout(60)

ProxyFactory = Callable[..., ProxyProcess]


def superuser(cluster: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(cluster.primary.dsn(), autocommit=True, connect_timeout=5)


def terminate(cluster: Any, pid: int) -> None:
    """pg_terminate_backend(pid) on the primary, then wait until the backend is gone."""
    with superuser(cluster) as su:
        assert su.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone() == (True,)
        deadline = time.monotonic() + 5
        while su.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone():
            assert time.monotonic() < deadline, f"backend {pid} did not exit"
            time.sleep(0.02)


def server_pids(cluster: Any, dbname: str = "appdb") -> set[int]:
    with superuser(cluster) as su:
        cur = su.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND usename = %s",
            [dbname, APP_USER],
        )
        return {pid for (pid,) in cur.fetchall()}


@pytest.fixture
def table(cluster: Any) -> Iterator[str]:
    name = f"failures_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(
        cluster.primary.dsn("appdb", "app", "app-secret"), autocommit=True
    ) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
    yield name
    with psycopg.connect(
        cluster.primary.dsn("appdb", "app", "app-secret"), autocommit=True
    ) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


# ---- a server dies ------------------------------------------------------------------------------


def test_backend_killed_mid_transaction(
    cluster: Any, proxy_factory: ProxyFactory, table: str
) -> None:
    proxy = proxy_factory(pool_size=2)
    victim = psycopg.connect(proxy.dsn(), connect_timeout=5)
    other = psycopg.connect(proxy.dsn(), connect_timeout=5)
    try:
        other.execute(f"INSERT INTO {table} VALUES (1)")  # other's transaction is open
        victim.execute(f"INSERT INTO {table} VALUES (2)")
        row = victim.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        killed = row[0]

        terminate(cluster, killed)

        with pytest.raises(psycopg.OperationalError) as info:
            victim.execute("SELECT 1")
        err = info.value
        text = str(err)
        assert err.sqlstate in ("57P01", "08006") or "server connection lost" in text, repr(err)
        assert victim.closed, "the client whose server died was not disconnected"

        # The other client's transaction, on the same pool, is untouched.
        other.execute(f"INSERT INTO {table} VALUES (3)")
        other.commit()
    finally:
        victim.close()
        other.close()

    # New clients work, on a replacement server (pool_size 2 is not eaten by the dead one).
    for _ in range(3):
        with psycopg.connect(proxy.dsn(), connect_timeout=5) as conn:
            conn.execute("BEGIN")
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None and row[0] != killed
            conn.execute(f"INSERT INTO {table} VALUES (10 + %s)", [_])
    ids = committed_ids(cluster, table)
    assert ids == [1, 3, 10, 11, 12], "the killed transaction's row or a commit went wrong"
    assert proxy.returncode is None


def test_backend_killed_during_a_running_query(cluster: Any, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(pool_size=2)
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5) as conn:
        marker = f"victim_{uuid.uuid4().hex[:8]}"
        result: list[Any] = []

        def run() -> None:
            try:
                result.append(conn.execute(f"SELECT pg_sleep(10), '{marker}'").fetchone())
            except Exception as exc:
                result.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        pid = None
        deadline = time.monotonic() + 5
        with superuser(cluster) as su:
            while pid is None and time.monotonic() < deadline:
                found = su.execute(
                    "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND pid <> "
                    "pg_backend_pid()",
                    [f"%'{marker}'%"],
                ).fetchone()
                pid = found[0] if found else None
                time.sleep(0.05)
        assert pid is not None, "the query never reached the server"
        start = time.monotonic()
        terminate(cluster, pid)
        worker.join(10)
        assert time.monotonic() - start < 3, "the client was not told promptly"
        assert len(result) == 1 and isinstance(result[0], psycopg.OperationalError), result
        assert conn.closed
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5) as fresh:
        row = fresh.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None and row[0] != pid
    assert proxy.returncode is None


def test_killed_idle_server_is_not_handed_out(cluster: Any, proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(pool_size=1)
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        first = row[0]
        assert first in server_pids(cluster)

        terminate(cluster, first)  # the only server of the pool, idle in the pool
        time.sleep(0.2)

        # The very next transaction must work: no retry.
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None and row[0] != first
        second = row[0]

        # Same again, with a different client, inside an explicit transaction.
        terminate(cluster, second)
        time.sleep(0.2)
        with psycopg.connect(proxy.dsn(), connect_timeout=5) as fresh:
            fresh.execute("BEGIN")
            row = fresh.execute("SELECT pg_backend_pid()").fetchone()
            assert row is not None and row[0] not in (first, second)
    assert proxy.returncode is None


@pytest.mark.parametrize("leave", ["hang_up", "half_message", "terminate"])
def test_client_vanishing_mid_transaction_rolls_back(
    cluster: Any, proxy_factory: ProxyFactory, table: str, leave: str
) -> None:
    """The server a client leaves inside a transaction is never handed to the next client."""
    proxy = proxy_factory(pool_size=1)
    with RawClient(proxy.host, proxy.port) as client:
        client.login()
        assert client.query("BEGIN")[-1] == (b"Z", b"T")
        assert client.query(f"INSERT INTO {table} VALUES (1)")[-1] == (b"Z", b"T")
        if leave == "half_message":
            client.send(b"Q\x00\x00\x00\x40SELECT")  # a Query header and a few bytes
        elif leave == "terminate":
            client.send(b"X\x00\x00\x00\x04")
    # pool_size 1: the next client gets the replacement of that very server.
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            f"SELECT count(*), current_setting('transaction_isolation') FROM {table}"
        ).fetchone()
        assert row == (0, "read committed"), row
        conn.execute(f"INSERT INTO {table} VALUES (2)")
    assert committed_ids(cluster, table) == [2]


def committed_ids(cluster: Any, table: str) -> list[int]:
    with psycopg.connect(cluster.primary.dsn("appdb"), autocommit=True) as su:
        return [r[0] for r in su.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()]


# ---- a server cannot be reached -----------------------------------------------------------------


# Longer than any wait below allows, short enough that the bug costs seconds, not minutes.
QUERY_WAIT = "5s"
FAST = 2.5  # seconds: a refused connection or a refused login is known at once


def test_refused_primary_fails_fast_and_names_the_server(proxy_factory: ProxyFactory) -> None:
    dead = free_port()
    proxy = proxy_factory(
        {"databases": {"deaddb": {"primary": f"127.0.0.1:{dead}", "replicas": []}}},
        query_wait_timeout=QUERY_WAIT,
        server_connect_timeout="5s",
    )
    for _ in range(2):  # the second attempt must not hang on state left by the first
        start = time.monotonic()
        err = asyncpg_error(proxy, database="deaddb", timeout=10)
        elapsed = time.monotonic() - start
        assert elapsed < FAST, f"took {elapsed:.1f}s: the client waited for a timeout ({err!r})"
        assert err.sqlstate == "08006", repr(err)
        assert f"127.0.0.1:{dead}" in str(err), repr(err)

    start = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(dbname="deaddb"), connect_timeout=10).close()
    assert time.monotonic() - start < FAST
    assert f"127.0.0.1:{dead}" in str(info.value)

    assert proxy.returncode is None
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5) as ok:
        assert ok.execute("SELECT 1").fetchone() == (1,)


class Relay:
    """A TCP forwarder standing in for a server that can be switched off and on again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Stop listening (connections are refused) and cut every relayed connection."""
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None
        with self.lock:
            for conn in self.conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


def test_primary_going_away_after_login(cluster: Any, proxy_factory: ProxyFactory) -> None:
    """Logged-in client, server becomes unreachable: an error once failover_timeout (1 s here)
    is over, the client stays; the server comes back: the same client works again."""
    relay = Relay((cluster.primary.host, cluster.primary.port))
    relay.start()
    proxy = proxy_factory(
        {"databases": {"flaky": {"primary": f"127.0.0.1:{relay.port}", "dbname": "appdb"}}},
        query_wait_timeout=QUERY_WAIT,
        failover_timeout="1s",
    )
    try:
        with psycopg.connect(proxy.dsn(dbname="flaky"), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            relay.stop()
            time.sleep(0.3)
            start = time.monotonic()
            with pytest.raises(psycopg.Error) as info:
                conn.execute("SELECT 2")
            elapsed = time.monotonic() - start
            err = info.value
            assert elapsed < FAST, f"took {elapsed:.1f}s: waited for query_wait_timeout ({err!r})"
            assert err.sqlstate is not None and err.sqlstate.startswith("08"), repr(err)
            assert f"127.0.0.1:{relay.port}" in str(err), repr(err)
            assert not conn.closed, "a failed server connect should not cost the client its login"

            relay.start()
            assert conn.execute("SELECT 3").fetchone() == (3,)
    finally:
        relay.stop()
    assert proxy.returncode is None


def test_wrong_server_password_gives_the_servers_28P01(proxy_factory: ProxyFactory) -> None:
    # The proxy accepts the client (it knows this password), the server does not.
    proxy = proxy_factory(
        users={APP_USER: {"password": "proxy-only-password"}}, query_wait_timeout=QUERY_WAIT
    )
    start = time.monotonic()
    err = asyncpg_error(proxy, password="proxy-only-password", timeout=10)
    elapsed = time.monotonic() - start
    assert err.sqlstate == "28P01", repr(err)
    assert 'password authentication failed for user "app"' in str(err), repr(err)
    assert elapsed < FAST, f"took {elapsed:.1f}s"
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(password="proxy-only-password"), connect_timeout=10).close()
    assert 'password authentication failed for user "app"' in str(info.value)
    assert proxy.returncode is None
    # Other users of the same proxy are unaffected.
    with psycopg.connect(proxy.dsn(user="md5user", password="md5-secret"), connect_timeout=5) as ok:
        assert ok.execute("SELECT current_user").fetchone() == ("md5user",)


# ---- cancel requests ----------------------------------------------------------------------------


def send_cancel(proxy: ProxyProcess, pid: int, secret: int) -> None:
    with RawClient(proxy.host, proxy.port) as c:
        c.send(cancel_packet(pid, secret))
        assert c.closed_within(3.0)


def test_cancel_with_a_wrong_secret_does_not_cancel(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory()
    with RawClient(proxy.host, proxy.port) as client:
        client.login()
        assert client.key is not None
        pid, secret = client.key

        start = time.monotonic()
        client.send(b"Q" + (len(b"SELECT pg_sleep(2), 'done'\0") + 4).to_bytes(4, "big"))
        client.send(b"SELECT pg_sleep(2), 'done'\0")
        time.sleep(0.5)
        send_cancel(proxy, pid, secret ^ 0xFFFFFFFF)  # right pid, wrong secret
        send_cancel(proxy, pid ^ 0x5A5A5A5, secret)  # unknown pid
        reply = client.until(b"Z")
        assert [k for k, _ in reply if k == b"E"] == [], reply
        assert rows(reply) == [["", "done"]]
        assert time.monotonic() - start >= 1.9

        # Control: the right key does cancel, so the test above can tell the difference.
        start = time.monotonic()
        client.send(b"Q" + (len(b"SELECT pg_sleep(10)\0") + 4).to_bytes(4, "big"))
        client.send(b"SELECT pg_sleep(10)\0")
        time.sleep(0.5)
        send_cancel(proxy, pid, secret)
        reply = client.until(b"Z")
        errors = [k for k, _ in reply if k == b"E"]
        assert errors, "the right cancel key did not cancel the query"
        assert time.monotonic() - start < 5


def test_cancel_with_psycopg_pid_and_wrong_secret(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory()
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5) as conn:
        pid = conn.info.backend_pid
        result: list[Any] = []

        def run() -> None:
            try:
                result.append(conn.execute("SELECT pg_sleep(2), 'done'").fetchone())
            except Exception as exc:
                result.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.5)
        for secret in (0, 1, 0xFFFFFFFF):  # the real secret is random: all three wrong
            send_cancel(proxy, pid, secret)
        worker.join(10)
        assert result == [("", "done")], result
        # And psycopg's own cancel (with the real secret) still works.
        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.5)
        conn.cancel()
        worker.join(10)
        assert isinstance(result[-1], psycopg.errors.QueryCanceled), result


def test_query_then_terminate_in_one_packet_never_leaks_a_reply(proxy_factory: Any) -> None:
    """A client that sends a query and Terminate together leaves a reply in flight: that
    server must not go to the next client, who would read the stale reply as its own."""
    proxy = proxy_factory(
        {"pool_size": 1, "auth_type": "md5", "databases": {"appdb": {"pool_mode": "session"}}}
    )
    with RawClient(proxy.host, proxy.port) as client:
        client.login()
        client.query("SELECT 1")  # session mode: the server stays linked, idle
        client.send(query_message("SELECT 'stale', pg_sleep(0.3)") + typed(b"X"))
    with psycopg.connect(proxy.dsn(), prepare_threshold=None, autocommit=True) as conn:
        for i in range(3):
            assert conn.execute("SELECT %s::int", [i]).fetchone() == (i,)
