"""TLS through the real proxy process with real drivers, against certificates made here.

Clients: psycopg (libpq) with sslmode require / verify-full, psql, asyncpg with an SSLContext;
client_tls modes disable / allow / require, client certificates checked against `ca`, a cancel
over TLS, bytes stuffed after an SSLRequest, and a reload that swaps the certificate. PostgreSQL
17 direct TLS (no SSLRequest, ALPN `postgresql`): through the wheel's libpq (psycopg.pq.version()
>= 17) with sslnegotiation=direct, and through Python's ssl module over a raw protocol client
(ALPN missing or wrong, client certificates, a cancel, a slow reader of a big result). Servers:
a PostgreSQL with ssl on, reached with server_tls modes prefer / require / verify-full, and
require refused by a server without TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import select
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import psycopg
import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from router.direct_tls import TLS_HANDSHAKE_RECORD, alpn_ok, start_tls_after
from tests.integration.test_bad_input import (
    RawClient,
    cancel_packet,
    query_message,
    raw,
    rows,
    startup_packet,
)
from tests.support import APP_PASSWORD, APP_USER, ProxyProcess, free_port, wait_for
from tests.tls_certs import Certs, make_certs

pytestmark = pytest.mark.timeout(120)

ProxyFactory = Callable[..., ProxyProcess]
REQUIRE_MESSAGE = "pgrouter requires TLS (client_tls.mode: require)"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def client_tls(certs: Certs, mode: str = "require", *, ca: bool = False) -> dict[str, Any]:
    tls = {"mode": mode, "cert": str(certs.server_cert), "key": str(certs.server_key)}
    if ca:
        tls["ca"] = str(certs.ca)
    return {"client_tls": tls}


def connect(proxy: ProxyProcess, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(**kw), autocommit=True, connect_timeout=5)


def served_certificate(proxy: ProxyProcess) -> bytes:
    """The DER certificate the proxy presents after an SSLRequest."""
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
        sock.sendall(_SSL_REQUEST)
        assert sock.recv(1) == b"S"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(sock) as tls:
            cert = tls.getpeercert(binary_form=True)
            assert cert is not None
            return cert


_SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


# ---- client_tls ---------------------------------------------------------------------------------


def test_psycopg_require_and_verify_full(proxy_factory: ProxyFactory, certs: Certs) -> None:
    proxy = proxy_factory(client_tls(certs, "require"))
    with connect(proxy, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
    with connect(proxy, sslmode="verify-full", sslrootcert=str(certs.ca)) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)


def test_verify_full_rejects_a_certificate_from_another_ca(
    proxy_factory: ProxyFactory, certs: Certs, tmp_path: Path
) -> None:
    other = make_certs(tmp_path / "other", prefix="other-")
    proxy = proxy_factory(client_tls(certs, "require"))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(proxy, sslmode="verify-full", sslrootcert=str(other.ca))


def test_psql_over_tls(proxy_factory: ProxyFactory, certs: Certs) -> None:
    proxy = proxy_factory(client_tls(certs, "require"))
    env = dict(os.environ, PGPASSWORD=APP_PASSWORD, PGSSLMODE="require")
    out = subprocess.run(
        ["psql", "-X", "-h", proxy.host, "-p", str(proxy.port), "-U", APP_USER, "-d", "appdb",
         "-A", "-t", "-c", "SELECT 'over tls'", "-c", r"\conninfo"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "over tls" in out.stdout
    assert "SSL connection" in out.stdout


def test_asyncpg_with_an_ssl_context(proxy_factory: ProxyFactory, certs: Certs) -> None:
    proxy = proxy_factory(client_tls(certs, "require"))

    async def run() -> tuple[int, bool]:
        context = ssl.create_default_context(cafile=str(certs.ca))
        conn = await asyncpg.connect(
            host=proxy.host,
            port=proxy.port,
            user=APP_USER,
            password=APP_PASSWORD,
            database="appdb",
            ssl=context,
        )
        try:
            value = await conn.fetchval("SELECT 7 * 6")
            used = conn._transport.get_extra_info("sslcontext") is not None
            return value, used
        finally:
            await conn.close()

    assert asyncio.run(run()) == (42, True)


def test_require_refuses_a_client_without_tls(proxy_factory: ProxyFactory, certs: Certs) -> None:
    proxy = proxy_factory(client_tls(certs, "require"))
    with pytest.raises(psycopg.OperationalError, match=r"requires TLS \(client_tls.mode"):
        connect(proxy, sslmode="disable")
    with raw(proxy) as client:
        client.send(startup_packet({"user": APP_USER, "database": "appdb"}))
        error = client.error()
        assert (error["C"], error["M"]) == ("28000", REQUIRE_MESSAGE)


def test_allow_accepts_both(proxy_factory: ProxyFactory, certs: Certs) -> None:
    """Both kinds of client, and SHOW CLIENTS tells them apart in its tls column."""
    proxy = proxy_factory({**client_tls(certs, "allow"), "admin": {"users": [APP_USER]}})
    with connect(proxy, sslmode="disable") as plain, connect(proxy, sslmode="require") as tls:
        assert not plain.pgconn.ssl_in_use and tls.pgconn.ssl_in_use
        assert plain.execute("SELECT 1").fetchone() == tls.execute("SELECT 1").fetchone() == (1,)
        with connect(proxy, dbname="pgrouter", sslmode="disable") as admin:
            cur = admin.execute("SHOW CLIENTS")
            names = [c.name for c in cur.description or []]
            shown = {str(row[names.index("port")]): row[names.index("tls")] for row in cur}
        assert shown[local_port(plain)] == "", shown
        assert shown[local_port(tls)].startswith("TLSv1."), shown


def local_port(conn: psycopg.Connection[Any]) -> str:
    """The client side's port of a connection: SHOW CLIENTS's port column."""
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        return str(sock.getsockname()[1])


def test_disable_answers_no(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory()
    with connect(proxy, sslmode="prefer") as conn:
        assert not conn.pgconn.ssl_in_use
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        connect(proxy, sslmode="require")


def test_client_certificates_checked_against_ca(proxy_factory: ProxyFactory, certs: Certs) -> None:
    proxy = proxy_factory(client_tls(certs, "require", ca=True))
    with pytest.raises(psycopg.OperationalError):
        connect(proxy, sslmode="require")  # no client certificate
    with connect(
        proxy,
        sslmode="verify-full",
        sslrootcert=str(certs.ca),
        sslcert=str(certs.client_cert),
        sslkey=str(certs.client_key),
    ) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_data_stuffed_after_ssl_request_is_refused(
    proxy_factory: ProxyFactory, certs: Certs
) -> None:
    proxy = proxy_factory(client_tls(certs, "allow"))
    with raw(proxy) as client:
        client.send(_SSL_REQUEST + startup_packet({"user": APP_USER, "database": "appdb"}))
        error = client.error()
        assert error["C"] == "08P01"
        assert "unencrypted data after SSL request" in error["M"]
    with connect(proxy, sslmode="require") as conn:  # the proxy carries on
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cancel_over_tls(proxy_factory: ProxyFactory, certs: Certs) -> None:
    proxy = proxy_factory(client_tls(certs, "require"))
    with connect(proxy, sslmode="require") as conn:
        cancel_a_sleep(conn)  # the cancel connection uses TLS
        assert conn.execute("SELECT 1").fetchone() == (1,)


def cancel_a_sleep(conn: psycopg.Connection[Any]) -> None:
    """A running pg_sleep cancelled through a second connection made like `conn`."""
    timer = threading.Timer(0.5, conn.cancel_safe)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
    finally:
        timer.cancel()
    assert time.monotonic() - started < 10


def test_reload_serves_the_new_certificate(
    proxy_factory: ProxyFactory, certs: Certs, tmp_path: Path
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.crt", "server.key"):
        shutil.copy(certs.directory / name, live / name)
    tls = {"mode": "require", "cert": str(live / "server.crt"), "key": str(live / "server.key")}
    proxy = proxy_factory({"client_tls": tls})
    assert served_certificate(proxy) == der(certs.server_cert)
    other = make_certs(tmp_path / "other", prefix="other-")
    shutil.copy(other.server_cert, live / "server.crt")
    shutil.copy(other.server_key, live / "server.key")
    with connect(proxy, sslmode="require") as kept:  # still the old certificate
        proxy.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while served_certificate(proxy) != der(other.server_cert):
            assert time.monotonic() < deadline, "the new certificate was not served"
            time.sleep(0.1)
        assert kept.execute("SELECT 1").fetchone() == (1,)
    with connect(proxy, sslmode="verify-full", sslrootcert=str(other.ca)) as conn:
        assert conn.pgconn.ssl_in_use


# ---- direct TLS (PostgreSQL 17 sslnegotiation=direct) --------------------------------------------

ALPN_MESSAGE = 'direct TLS connection without ALPN protocol "postgresql"'
direct_libpq = pytest.mark.skipif(
    psycopg.pq.version() < 170000, reason="this libpq has no sslnegotiation=direct"
)


def direct(
    proxy: ProxyProcess,
    certs: Certs | None = None,
    *,
    alpn: tuple[str, ...] = ("postgresql",),
    client_cert: bool = False,
    timeout: float = 10.0,
) -> RawClient:
    """A raw protocol client that opens TLS at once, as libpq 17's sslnegotiation=direct
    does (the server certificate checked against `certs.ca` when given)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if certs is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(certs.ca)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    if client_cert:
        assert certs is not None
        context.load_cert_chain(certs.client_cert, certs.client_key)
    client = raw(proxy, timeout)
    try:
        client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
    except BaseException:
        client.close()
        raise
    return client


def clients_connected(http_port: int) -> tuple[float, float]:
    """(pgrouter_clients_connected, pgrouter_clients_logging_in) from /metrics."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    values = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in ("pgrouter_clients_connected", "pgrouter_clients_logging_in")
    }
    return values["pgrouter_clients_connected"], values["pgrouter_clients_logging_in"]


def test_direct_tls_login_and_query(proxy_factory: ProxyFactory, certs: Certs) -> None:
    proxy = proxy_factory(client_tls(certs, "require"), auth_type="scram-sha-256")
    with direct(proxy, certs) as client:
        assert client.sock.selected_alpn_protocol() == "postgresql"  # type: ignore[attr-defined]
        client.login()  # SCRAM, over TLS from the first byte
        assert rows(client.query("SELECT 40 + 2, current_user")) == [["42", APP_USER]]
        assert rows(client.query("SELECT ssl FROM pg_stat_ssl LIMIT 0")) == []


def test_direct_tls_in_allow_mode(proxy_factory: ProxyFactory, certs: Certs) -> None:
    proxy = proxy_factory(client_tls(certs, "allow"))
    with direct(proxy, certs) as client:
        client.login()  # md5
        assert rows(client.query("SELECT 'direct'")) == [["direct"]]
    with connect(proxy, sslmode="disable") as conn:  # plain text still served
        assert conn.execute("SELECT 1").fetchone() == (1,)


@direct_libpq
def test_libpq_sslnegotiation_direct(proxy_factory: ProxyFactory, certs: Certs) -> None:
    proxy = proxy_factory(client_tls(certs, "require"), auth_type="scram-sha-256")
    opts = {"sslmode": "verify-full", "sslrootcert": str(certs.ca), "sslnegotiation": "direct"}
    with connect(proxy, **opts) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 40 + 2").fetchone() == (42,)
        cancel_a_sleep(conn)  # the cancel goes over direct TLS too
        assert conn.execute("SELECT 'after'").fetchone() == ("after",)


@pytest.mark.parametrize("alpn", [(), ("http/1.1",)], ids=["no-alpn", "other-alpn"])
def test_direct_tls_without_alpn_postgresql_is_refused(
    proxy_factory: ProxyFactory, certs: Certs, alpn: tuple[str, ...]
) -> None:
    proxy = proxy_factory(client_tls(certs, "require"))
    with direct(proxy, certs, alpn=alpn) as client:
        assert client.sock.selected_alpn_protocol() is None  # type: ignore[attr-defined]
        client.send(startup_packet({"user": APP_USER, "database": "appdb"}))
        error = client.error()
        assert (error["C"], error["M"]) == ("08P01", ALPN_MESSAGE)
        assert client.closed_within(5)
    with direct(proxy, certs) as client:  # the proxy carries on
        client.login()


def test_direct_tls_checks_client_certificates(proxy_factory: ProxyFactory, certs: Certs) -> None:
    proxy = proxy_factory(client_tls(certs, "require", ca=True))
    with direct(proxy, certs) as client:  # TLS 1.3: the client's side of the handshake ends first
        client.send(startup_packet({"user": APP_USER, "database": "appdb"}))
        try:
            answer = client.message()
        except ssl.SSLError as exc:  # an alert, if it got out before the close
            answer = (b"!", str(exc).encode())
        assert answer is None or answer[0] == b"!", answer
    wait_for(lambda: "peer did not return a certificate" in proxy.log_text(), timeout=10)
    with direct(proxy, certs, client_cert=True) as client:
        client.login()
        assert rows(client.query("SELECT 'with a certificate'")) == [["with a certificate"]]


def test_direct_tls_refused_when_tls_is_disabled(proxy_factory: ProxyFactory, certs: Certs) -> None:
    proxy = proxy_factory()  # client_tls.mode: disable
    with pytest.raises(ssl.SSLError, match="handshake failure"):
        direct(proxy).close()
    if psycopg.pq.version() >= 170000:
        with pytest.raises(psycopg.OperationalError, match="handshake failure"):
            connect(proxy, sslmode="require", sslnegotiation="direct")
    assert "direct TLS refused (client_tls.mode: disable)" in proxy.log_text()
    with connect(proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cancel_request_over_direct_tls(proxy_factory: ProxyFactory, certs: Certs) -> None:
    proxy = proxy_factory(client_tls(certs, "require"))
    with direct(proxy, certs, timeout=30) as client:
        client.login()
        assert client.key is not None
        started = time.monotonic()
        client.send(query_message("SELECT pg_sleep(20)"))
        time.sleep(0.5)  # the query reaches the server; a cancel before it would be lost
        with direct(proxy, certs) as canceller:
            canceller.send(cancel_packet(*client.key))
            assert canceller.closed_within(5)
        error = client.error()
        assert error["C"] == "57014", error
        assert time.monotonic() - started < 15
        client.until(b"Z")
        assert rows(client.query("SELECT 'after'")) == [["after"]]


def test_direct_tls_slow_reader_and_disconnects(proxy_factory: ProxyFactory, certs: Certs) -> None:
    """A big result to a client that reads slowly: the TLS layer pushes back to the server
    (the proxy's memory stays flat); then clients that leave in every way are forgotten."""
    http_port = free_port()
    proxy = proxy_factory(
        client_tls(certs, "require"), admin={"users": [APP_USER], "http": f"127.0.0.1:{http_port}"}
    )
    count, width = 40_000, 1000  # 40 MB
    with direct(proxy, certs) as warm:
        warm.login()
        assert len(rows(warm.query(f"SELECT repeat('x', {width}) FROM generate_series(1, 2000)")))
    before = max(proxy.rss_kb() for _ in range(3))
    peak = before
    with direct(proxy, certs, timeout=60) as client:
        client.login()
        client.send(query_message(f"SELECT repeat('x', {width}) FROM generate_series(1, {count})"))
        received = 0
        while (msg := client.message()) is not None and msg[0] != b"Z":
            if msg[0] == b"D":
                received += 1
                if received % 2000 == 0:
                    time.sleep(0.05)  # one second of stalls in all
                    peak = max(peak, proxy.rss_kb())
        assert received == count
        assert rows(client.query("SELECT 'after'")) == [["after"]]
    growth = peak - before
    assert growth <= 10 * 1024, f"proxy RSS grew by {growth} kB ({before} -> {peak})"

    gone: list[RawClient] = []
    for leave in ("terminate", "close_notify", "reset", "mid-handshake"):
        if leave == "mid-handshake":
            sock = socket.create_connection((proxy.host, proxy.port), timeout=5)
            sock.sendall(b"\x16\x03\x01\x00\x05")  # a record header, then silence
            time.sleep(0.2)
            sock.close()
            continue
        client = direct(proxy, certs)
        client.login()
        if leave == "terminate":
            client.send(b"X\x00\x00\x00\x04")
            assert client.closed_within(5)
            client.close()
        elif leave == "close_notify":
            client.sock = client.sock.unwrap()  # type: ignore[attr-defined]
            client.close()
        else:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            client.close()
        gone.append(client)
    wait_for(lambda: clients_connected(http_port) == (0, 0), timeout=15)


class _Echo(asyncio.Protocol):
    """Starts TLS on the first bytes as the client session does, then echoes, pausing its
    reading while the TLS transport's write buffer is over its high-water mark."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.raw: asyncio.Transport | None = None
        self.tls: asyncio.Transport | None = None
        self.early = bytearray()  # decrypted before start_tls_after returned
        self.pauses = 0
        self.peak_buffer = 0
        self.alpn: bool | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)
            self.peak_buffer = max(self.peak_buffer, self.tls.get_write_buffer_size())
        elif self.alpn is None and not self.early and data[0] == TLS_HANDSHAKE_RECORD:
            assert self.raw is not None
            self.alpn = False
            self.raw.pause_reading()
            asyncio.get_running_loop().create_task(self._start(data))
        else:
            self.early += data

    async def _start(self, hello: bytes) -> None:
        assert self.raw is not None
        tls = await start_tls_after(self.raw, self, self.context, hello)
        tls.set_write_buffer_limits(high=64 * 1024)
        self.alpn = alpn_ok(tls)
        self.tls = tls
        if self.early:
            self.data_received(bytes(self.early))

    def pause_writing(self) -> None:
        self.pauses += 1
        assert self.tls is not None
        self.tls.pause_reading()

    def resume_writing(self) -> None:
        assert self.tls is not None
        self.tls.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_start_tls_after_flow_control_and_close(certs: Certs, loop_kind: str) -> None:
    """The direct-TLS handshake on its own, on both event loops: ALPN seen, 8 MB echoed to a
    client that reads slowly with the server's write buffer kept near its limit, close_notify
    reaching connection_lost."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certs.server_cert, certs.server_key)
    server_context.set_alpn_protocols(["postgresql"])
    client_context = ssl.create_default_context(cafile=str(certs.ca))
    client_context.set_alpn_protocols(["postgresql"])
    payload = os.urandom(8 * 1024 * 1024)
    received = bytearray()

    def client(port: int) -> None:
        """Writes fast and reads slowly, in one thread: an SSL socket must not be used from
        two threads at once (OpenSSL's state is not shared safely; recv then sees a false
        end of stream)."""
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            tls = client_context.wrap_socket(sock, server_hostname="localhost")
            tls.setblocking(False)
            sent = 0
            deadline = time.monotonic() + 60
            while len(received) < len(payload):
                assert time.monotonic() < deadline, f"echoed {len(received)} bytes only"
                writing = [tls] if sent < len(payload) else []
                readable, writable, _ = select.select([tls], writing, [], 1)
                with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    if writable:
                        sent += tls.send(payload[sent : sent + 64 * 1024])
                    if readable or tls.pending():
                        chunk = tls.recv(256 * 1024)  # one TLS record (16 kB) at most
                        assert chunk, "closed early"
                        received.extend(chunk)
                        time.sleep(0.001)  # a slow reader
            tls.setblocking(True)
            tls.unwrap()  # close_notify

    async def run() -> _Echo:
        protocols: list[_Echo] = []

        def factory() -> _Echo:
            protocols.append(_Echo(server_context))
            return protocols[-1]

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await asyncio.wait_for(asyncio.to_thread(client, port), 90)
            await asyncio.wait_for(protocols[0].lost, 30)
        finally:
            server.close()
        return protocols[0]

    echo = uvloop.run(run()) if loop_kind == "uvloop" else asyncio.run(run())
    print(f"\n{loop_kind}: {echo.pauses} pauses, peak TLS write buffer {echo.peak_buffer} bytes")
    assert echo.alpn is True
    assert bytes(received) == payload
    assert echo.pauses > 0  # the slow reader made the TLS transport push back
    assert echo.peak_buffer < 2 * 1024 * 1024, echo.peak_buffer
    assert echo.lost.result() is None


# ---- server_tls ---------------------------------------------------------------------------------

SSL_OF_BACKEND = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


@pytest.fixture(scope="module")
def tls_cluster(certs: Certs) -> Iterator[Any]:
    """A primary with ssl on, serving certs.server_cert (for localhost and 127.0.0.1)."""
    from router.cluster import LocalCluster

    # The server reads its key as the postgres OS user (when the tests run as root), and
    # refuses a key others can read: a directory of its own, the key 0600.
    directory = Path(tempfile.mkdtemp(prefix="pgrouter-tls-"))
    cert, key = directory / "server.crt", directory / "server.key"
    shutil.copy(certs.server_cert, cert)
    shutil.copy(certs.server_key, key)
    key.chmod(0o600)
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        for path in (directory, cert, key):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    cluster = LocalCluster(
        replicas=0, settings={"ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)}
    )
    try:
        cluster.start()
        cluster.create_user(APP_USER, APP_PASSWORD)
        cluster.create_database("appdb", owner=APP_USER)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def on(cluster: Any, server_tls: dict[str, str] | None = None) -> dict[str, Any]:
    """A topology override: appdb served by `cluster`'s primary alone."""
    primary = cluster.primary
    override: dict[str, Any] = {
        "databases": {"appdb": {"primary": f"{primary.host}:{primary.port}", "replicas": []}}
    }
    if server_tls is not None:
        override["server_tls"] = server_tls
    return override


def backend_ssl(proxy: ProxyProcess) -> bool:
    with connect(proxy) as conn:
        row = conn.execute(SSL_OF_BACKEND).fetchone()
        assert row is not None
        return bool(row[0])


def test_server_tls_prefer_is_the_default(proxy_factory: ProxyFactory, tls_cluster: Any) -> None:
    assert backend_ssl(proxy_factory(on(tls_cluster)))


def test_server_tls_modes_against_a_tls_server(
    proxy_factory: ProxyFactory, tls_cluster: Any, certs: Certs
) -> None:
    assert not backend_ssl(proxy_factory(on(tls_cluster, {"mode": "disable"})))
    assert backend_ssl(proxy_factory(on(tls_cluster, {"mode": "require"})))
    verify = {"mode": "verify-full", "ca": str(certs.ca)}
    assert backend_ssl(proxy_factory(on(tls_cluster, verify)))


def test_server_tls_verify_full_refuses_a_certificate_from_another_ca(
    proxy_factory: ProxyFactory, tls_cluster: Any, tmp_path: Path
) -> None:
    other = make_certs(tmp_path / "other", prefix="other-")
    proxy = proxy_factory(on(tls_cluster, {"mode": "verify-ca", "ca": str(other.ca)}))
    with pytest.raises(psycopg.OperationalError) as info:  # the first login needs a server
        connect(proxy)
    assert "certificate verify failed" in str(info.value)


def test_server_tls_require_against_a_server_without_tls(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(server_tls={"mode": "require"})  # the shared cluster has ssl off
    with pytest.raises(psycopg.OperationalError) as info:  # the first login needs a server
        connect(proxy)
    assert "does not support TLS (server_tls.mode: require)" in str(info.value)
