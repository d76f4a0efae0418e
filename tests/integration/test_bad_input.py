"""Bad input from clients: protocol violations, odd startup packets, refused logins.

Each case asserts what the misbehaving client sees (the SQLSTATE of the ErrorResponse, the
connection being closed) and that nobody else notices: a client connected before keeps its
transaction, and the proxy process is still alive and serving afterwards.

The raw-socket helper here (`RawClient`) speaks the v3 protocol from the documentation,
independently of `protocol/`, so the proxy is not checked against its own codecs.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
import scramp

from tests.support import APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER, ProxyProcess

pytestmark = pytest.mark.timeout(60)

ProxyFactory = Callable[..., ProxyProcess]

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
_I32 = struct.Struct("!I")

Message = tuple[bytes, bytes]  # (type byte, body)


# ---- raw protocol helper ------------------------------------------------------------------------


def untyped(body: bytes) -> bytes:
    """A startup-phase packet: int32 length (including itself), then the body."""
    return _I32.pack(len(body) + 4) + body


def typed(kind: bytes, body: bytes = b"") -> bytes:
    return kind + _I32.pack(len(body) + 4) + body


def startup_packet(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    pairs = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
    return untyped(_I32.pack(version) + pairs + b"\0")


def cancel_packet(pid: int, secret: int) -> bytes:
    return untyped(struct.pack("!III", CANCEL_REQUEST, pid, secret))


def query_message(sql: str) -> bytes:
    return typed(b"Q", sql.encode() + b"\0")


def error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse body -> {field code: value}."""
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def md5_response(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"


class RawClient:
    """A blocking socket speaking just enough of the protocol to misbehave precisely."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.eof = False
        self.key: tuple[int, int] | None = None  # BackendKeyData (pid, secret)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        """Read one chunk into the buffer; False at end of stream (or reset)."""
        if self.eof:
            return False
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def read_byte(self) -> bytes:
        while not self.buf:
            if not self._fill():
                raise AssertionError("connection closed while waiting for a single byte")
        out, self.buf = self.buf[:1], self.buf[1:]
        return out

    def message(self) -> Message | None:
        """The next typed message, or None when the proxy closed the connection."""
        while len(self.buf) < 5:
            if not self._fill():
                return None
        (length,) = _I32.unpack_from(self.buf, 1)
        while len(self.buf) < 1 + length:
            if not self._fill():
                return None
        msg = (self.buf[:1], self.buf[5 : 1 + length])
        self.buf = self.buf[1 + length :]
        return msg

    def until(self, kinds: bytes) -> list[Message]:
        """Messages up to and including the first whose type is in `kinds`."""
        out: list[Message] = []
        while True:
            msg = self.message()
            if msg is None:
                raise AssertionError(f"connection closed before any of {kinds!r}; got {out!r}")
            out.append(msg)
            if msg[0] in kinds:
                return out

    def error(self) -> dict[str, str]:
        """Read until an ErrorResponse and return its fields."""
        return error_fields(self.until(b"E")[-1][1])

    def closed_within(self, timeout: float) -> bool:
        """True if the proxy closes the connection within `timeout` (remaining bytes ignored)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self._fill():
                    return True
        except TimeoutError:
            return False
        return False

    def login(
        self,
        user: str = APP_USER,
        password: str = APP_PASSWORD,
        database: str = "appdb",
        version: int = PROTOCOL_3_0,
        extra: dict[str, str] | None = None,
        send_startup: bool = True,
    ) -> list[Message]:
        """Startup + cleartext/md5/SCRAM authentication; every message up to ReadyForQuery."""
        if send_startup:
            params = {"user": user, "database": database, **(extra or {})}
            self.send(startup_packet(params, version))
        seen: list[Message] = []
        scram: scramp.ScramClient | None = None
        while True:
            msg = self.message()
            if msg is None:
                raise AssertionError(f"connection closed during login; got {seen!r}")
            seen.append(msg)
            kind, body = msg
            if kind == b"E":
                raise AssertionError(f"login refused: {error_fields(body)}")
            if kind == b"R":
                (code,) = _I32.unpack_from(body)
                if code == 3:
                    self.send(typed(b"p", password.encode() + b"\0"))
                elif code == 5:
                    self.send(typed(b"p", md5_response(user, password, body[4:8])))
                elif code == 10:  # SASL, with scramp (not the proxy's own SCRAM code)
                    scram = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
                    first = scram.get_client_first().encode()
                    self.send(typed(b"p", b"SCRAM-SHA-256\0" + _I32.pack(len(first)) + first))
                elif code == 11 and scram is not None:
                    scram.set_server_first(body[4:].decode())
                    self.send(typed(b"p", scram.get_client_final().encode()))
                elif code == 12 and scram is not None:
                    scram.set_server_final(body[4:].decode())
                elif code != 0:
                    raise AssertionError(f"authentication request {code} not handled by the test")
            elif kind == b"K":
                self.key = struct.unpack("!II", body)
            elif kind == b"Z":
                return seen

    def query(self, sql: str) -> list[Message]:
        self.send(query_message(sql))
        return self.until(b"Z")


def rows(messages: list[Message]) -> list[list[str | None]]:
    """The DataRow values (text format) among `messages`."""
    out: list[list[str | None]] = []
    for kind, body in messages:
        if kind != b"D":
            continue
        (count,) = struct.unpack_from("!H", body)
        pos = 2
        values: list[str | None] = []
        for _ in range(count):
            (n,) = struct.unpack_from("!i", body, pos)
            pos += 4
            if n < 0:
                values.append(None)
            else:
                values.append(body[pos : pos + n].decode())
                pos += n
        out.append(values)
    return out


def raw(proxy: ProxyProcess, timeout: float = 5.0) -> RawClient:
    return RawClient(proxy.host, proxy.port, timeout)


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def proxy(proxy_factory: ProxyFactory) -> ProxyProcess:
    """The proxy for bad-input tests: a 64kB message limit and a small pool."""
    return proxy_factory(max_packet_size="64kB", pool_size=2)


class Bystander:
    """A well-behaved client, inside a transaction for the whole test."""

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.conn = psycopg.connect(proxy.dsn(), connect_timeout=5)
        # Non-autocommit: this opens a transaction, so the client holds a server throughout.
        assert self.conn.execute("SELECT 1").fetchone() == (1,)

    def check(self) -> None:
        """Still in the same transaction and working; the proxy process is alive."""
        assert self.proxy.returncode is None, self.proxy.log_text()
        cur = self.conn.execute("SELECT 2, now() = statement_timestamp()")
        row = cur.fetchone()
        assert row is not None and row[0] == 2
        assert row[1] is False, "the bystander's transaction did not survive"
        self.conn.commit()
        with psycopg.connect(self.proxy.dsn(), connect_timeout=5, autocommit=True) as fresh:
            assert fresh.execute("SELECT 3").fetchone() == (3,)


@pytest.fixture
def bystander(proxy: ProxyProcess) -> Iterator[Bystander]:
    b = Bystander(proxy)
    yield b
    b.conn.close()


def assert_violation(client: RawClient, sqlstate: str = "08P01") -> dict[str, str]:
    fields = client.error()
    assert fields.get("C") == sqlstate, fields
    assert fields.get("S") == "FATAL", fields
    assert client.closed_within(3.0), "the proxy kept the connection open after the error"
    return fields


# ---- startup-phase violations -------------------------------------------------------------------


def test_startup_packet_over_10000_bytes_is_rejected(
    proxy: ProxyProcess, bystander: Bystander
) -> None:
    packet = startup_packet(
        {"user": APP_USER, "database": "appdb", "application_name": "x" * 10050}
    )
    assert len(packet) > 10000
    with raw(proxy) as client:
        client.send(packet)
        assert_violation(client)
    bystander.check()


def test_startup_packet_just_under_the_limit_is_accepted(proxy: ProxyProcess) -> None:
    extra = {"application_name": "a" * 9500}
    assert 9500 < len(startup_packet({"user": APP_USER, "database": "appdb", **extra})) < 10000
    with raw(proxy) as client:
        seen = client.login(extra=extra)
        assert seen[-1][0] == b"Z"


@pytest.mark.parametrize("length", [0, 4, 7])
def test_startup_length_below_8_is_rejected(
    proxy: ProxyProcess, bystander: Bystander, length: int
) -> None:
    with raw(proxy) as client:
        client.send(_I32.pack(length) + _I32.pack(PROTOCOL_3_0))
        assert_violation(client)
    bystander.check()


def test_http_request_to_the_postgres_port_is_rejected(
    proxy: ProxyProcess, bystander: Bystander
) -> None:
    with raw(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert_violation(client)
    bystander.check()


def test_truncated_startup_then_hang_up_leaves_others_alone(
    proxy: ProxyProcess, bystander: Bystander
) -> None:
    packet = startup_packet({"user": APP_USER, "database": "appdb"})
    for cut in (1, 3, 6, len(packet) - 1):
        with raw(proxy) as client:
            client.send(packet[:cut])
    bystander.check()


def test_unsupported_protocol_2_gets_0A000(proxy: ProxyProcess, bystander: Bystander) -> None:
    # The protocol 2.0 startup packet: length 296, version 2.0, fixed-width fields.
    body = _I32.pack(2 << 16) + b"appdb".ljust(64, b"\0") + b"app".ljust(32, b"\0")
    body += b"\0" * (64 + 64 + 64)
    packet = untyped(body)
    assert len(packet) == 296
    with raw(proxy) as client:
        client.send(packet)
        fields = assert_violation(client, "0A000")
        assert "protocol" in fields.get("M", ""), fields
    bystander.check()


def test_no_user_name_gets_28000(proxy: ProxyProcess, bystander: Bystander) -> None:
    with raw(proxy) as client:
        client.send(startup_packet({"database": "appdb"}))
        fields = assert_violation(client, "28000")
        assert "user name" in fields.get("M", ""), fields
    bystander.check()


# ---- encryption requests and protocol negotiation -----------------------------------------------


@pytest.mark.parametrize("code", [SSL_REQUEST, GSSENC_REQUEST], ids=["ssl", "gssenc"])
def test_encryption_request_is_refused_then_login_works(proxy: ProxyProcess, code: int) -> None:
    with raw(proxy) as client:
        client.send(untyped(_I32.pack(code)))
        assert client.read_byte() == b"N"
        client.login()
        assert rows(client.query("SELECT 40 + 2")) == [["42"]]


def test_ssl_then_gssenc_requests_on_one_connection(proxy: ProxyProcess) -> None:
    with raw(proxy) as client:
        client.send(untyped(_I32.pack(GSSENC_REQUEST)))
        assert client.read_byte() == b"N"
        client.send(untyped(_I32.pack(SSL_REQUEST)))
        assert client.read_byte() == b"N"
        client.login()
        assert rows(client.query("SELECT 'ok'")) == [["ok"]]


def negotiate(messages: list[Message]) -> tuple[int, list[str]]:
    found = [body for kind, body in messages if kind == b"v"]
    assert len(found) == 1, f"expected one NegotiateProtocolVersion, got {messages!r}"
    newest, count = struct.unpack_from("!II", found[0])
    names = [s.decode() for s in found[0][8:].split(b"\0")[:-1]]
    assert len(names) == count, found[0]
    return newest, names


def test_protocol_3_1_gets_negotiate_protocol_version(proxy: ProxyProcess) -> None:
    with raw(proxy) as client:
        seen = client.login(version=(3 << 16) | 1)
        assert negotiate(seen) == (0, [])
        assert rows(client.query("SELECT 1")) == [["1"]]


def test_pq_options_are_reported_unrecognised(proxy: ProxyProcess) -> None:
    with raw(proxy) as client:
        seen = client.login(extra={"_pq_.foo": "1", "_pq_.bar": "x"})
        newest, names = negotiate(seen)
        assert newest == 0
        assert sorted(names) == ["_pq_.bar", "_pq_.foo"]
        assert rows(client.query("SELECT 1")) == [["1"]]


def test_plain_3_0_startup_gets_no_negotiation(proxy: ProxyProcess) -> None:
    with raw(proxy) as client:
        seen = client.login()
        assert [kind for kind, _ in seen if kind == b"v"] == []


# ---- violations after login ---------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 3])
def test_message_length_below_4_is_rejected(
    proxy: ProxyProcess, bystander: Bystander, length: int
) -> None:
    with raw(proxy) as client:
        client.login()
        client.send(b"Q" + _I32.pack(length))
        assert_violation(client)
    bystander.check()


def test_message_length_below_4_inside_a_transaction(
    proxy: ProxyProcess, bystander: Bystander
) -> None:
    with raw(proxy) as client:
        client.login()
        assert client.query("BEGIN")[-1] == (b"Z", b"T")
        client.send(b"Q" + _I32.pack(2))
        assert_violation(client)
    bystander.check()


def test_message_over_max_packet_size_is_rejected(
    proxy: ProxyProcess, bystander: Bystander
) -> None:
    with raw(proxy) as client:
        client.login()
        client.send(b"Q" + _I32.pack(70 * 1024) + b"SELECT '" + b"x" * 200)
        fields = assert_violation(client)
        assert "max_packet_size" in fields.get("M", ""), fields
    bystander.check()


def test_message_over_max_packet_size_inside_a_transaction(
    proxy: ProxyProcess, bystander: Bystander
) -> None:
    with raw(proxy) as client:
        client.login()
        assert client.query("BEGIN")[-1] == (b"Z", b"T")
        client.send(b"Q" + _I32.pack(1 << 20) + b"SELECT '" + b"x" * 200)
        assert_violation(client)
    bystander.check()
    # pool_size is 2: the bystander's and the discarded one; the pool must have replaced it.
    for _ in range(3):
        with psycopg.connect(proxy.dsn(), connect_timeout=5) as conn:
            conn.execute("BEGIN")
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_driver_query_over_max_packet_size(proxy: ProxyProcess, bystander: Bystander) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5) as conn:
        # Under the limit: fine.
        row = conn.execute("SELECT length(%s)", ["x" * 60_000]).fetchone()
        assert row == (60_000,)
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("SELECT length(%s)", ["x" * 100_000])
        assert info.value.sqlstate == "08P01", info.value
        assert conn.closed
    bystander.check()


def test_garbage_after_login_is_rejected(proxy: ProxyProcess, bystander: Bystander) -> None:
    with raw(proxy) as client:
        client.login()
        client.send(b"\xff" * 64)
        assert_violation(client)
    bystander.check()


def test_unknown_message_type_after_login(proxy: ProxyProcess, bystander: Bystander) -> None:
    """A well-framed message of an unknown type: the server's 08P01 reaches the client."""
    with raw(proxy) as client:
        client.login()
        client.send(typed(b"\x01", b"abcd"))
        assert_violation(client)
    bystander.check()


def test_wrong_message_during_authentication(proxy: ProxyProcess, bystander: Bystander) -> None:
    with raw(proxy) as client:
        client.send(startup_packet({"user": APP_USER, "database": "appdb"}))
        request = client.until(b"R")[-1]
        assert _I32.unpack_from(request[1])[0] in (3, 5, 10)
        client.send(query_message("SELECT 1"))  # a Query instead of a PasswordMessage
        assert_violation(client)
    bystander.check()


# ---- refused logins through a real driver -------------------------------------------------------


def connect_error(dsn: str, **kw: Any) -> psycopg.OperationalError:
    """The error psycopg (libpq) raises; libpq gives no SQLSTATE for login errors."""
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn, connect_timeout=5, **kw).close()
    return info.value


def asyncpg_error(
    proxy: ProxyProcess,
    *,
    user: str = APP_USER,
    password: str = APP_PASSWORD,
    database: str = "appdb",
    timeout: float = 5,
    **kw: Any,
) -> asyncpg.PostgresError:
    """The login error asyncpg raises, which carries the SQLSTATE of the FATAL message."""

    async def attempt() -> None:
        conn = await asyncpg.connect(
            host=proxy.host,
            port=proxy.port,
            user=user,
            password=password,
            database=database,
            timeout=timeout,
            **kw,
        )
        await conn.close()

    with pytest.raises(asyncpg.PostgresError) as info:
        asyncio.run(attempt())
    return info.value


def assert_login_refused(proxy: ProxyProcess, sqlstate: str, message: str, **kw: Any) -> None:
    """Both drivers show the refusal: asyncpg with its SQLSTATE, psycopg with the message."""
    err = asyncpg_error(proxy, **kw)
    assert err.sqlstate == sqlstate, repr(err)
    assert message in str(err), repr(err)
    libpq_kw = {"dbname" if k == "database" else k: v for k, v in kw.items()}
    perr = connect_error(proxy.dsn(**libpq_kw))
    assert message in str(perr), perr


def test_unknown_database_gets_3D000(proxy: ProxyProcess, bystander: Bystander) -> None:
    assert_login_refused(proxy, "3D000", 'database "nosuch" does not exist', database="nosuch")
    bystander.check()


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256"])
def test_wrong_password_and_unknown_user_get_the_same_28P01(
    proxy_factory: ProxyFactory, auth_type: str
) -> None:
    proxy = proxy_factory(auth_type=auth_type)
    for user, password in ((APP_USER, APP_PASSWORD), (MD5_USER, MD5_PASSWORD)):
        with psycopg.connect(proxy.dsn(user=user, password=password), connect_timeout=5) as ok:
            assert ok.execute("SELECT current_user").fetchone() == (user,)
    for user in (APP_USER, MD5_USER, "ghost"):
        assert_login_refused(
            proxy,
            "28P01",
            f'password authentication failed for user "{user}"',
            user=user,
            password="not-the-password",
        )
    assert proxy.returncode is None


def test_unknown_user_is_asked_for_a_password_like_a_known_one(proxy: ProxyProcess) -> None:
    """The first reply does not reveal whether the user exists."""
    requests = []
    for user in (APP_USER, "ghost"):
        with raw(proxy) as client:
            client.send(startup_packet({"user": user, "database": "appdb"}))
            kind, body = client.until(b"RE")[-1]
            assert kind == b"R", error_fields(body)
            requests.append(_I32.unpack_from(body)[0])
    assert requests[0] == requests[1] != 0


def test_max_client_conn_refuses_the_sixth_client(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(max_client_conn=5)
    conns = [psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5) for _ in range(5)]
    try:
        err = asyncpg_error(proxy)
        assert err.sqlstate == "53300", repr(err)
        assert "connections" in str(connect_error(proxy.dsn()))
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        conns.pop().close()
        deadline = time.monotonic() + 3
        while True:  # the slot frees as soon as the proxy sees the socket close
            try:
                conns.append(psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5))
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert conns[-1].execute("SELECT 1").fetchone() == (1,)
    finally:
        for conn in conns:
            conn.close()


def test_silent_client_is_dropped_after_client_login_timeout(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(client_login_timeout="1s")
    with psycopg.connect(proxy.dsn(), connect_timeout=5) as early:
        with raw(proxy) as silent, raw(proxy) as stalled:
            start = time.monotonic()
            stalled.send(startup_packet({"user": APP_USER, "database": "appdb"}))
            assert stalled.until(b"R")  # asked for a password, never answers
            assert silent.closed_within(2.5), "a silent client was not disconnected"
            assert time.monotonic() - start >= 0.8
            assert stalled.closed_within(1.0), "a client stuck in authentication stayed"
        # Logged-in clients are not subject to the login timeout.
        time.sleep(0.3)
        assert early.execute("SELECT 1").fetchone() == (1,)
        early.commit()
    assert proxy.returncode is None


@pytest.mark.parametrize("value", ["database", "true"])
def test_replication_connection_is_refused(
    proxy: ProxyProcess, bystander: Bystander, value: str
) -> None:
    err = asyncpg_error(proxy, server_settings={"replication": value})
    assert err.sqlstate == "0A000", repr(err)
    assert "replication" in str(err)
    assert "replication" in str(connect_error(proxy.dsn(), replication=value))
    bystander.check()
