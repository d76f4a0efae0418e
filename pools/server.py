"""One server connection: login, then bytes forwarded to whichever client is linked.

The connection scans only message headers (`protocol.scanner`) to count ReadyForQuery. It
can also run a hidden query (client settings before a transaction, the session-mode reset)
whose replies are read in full and never reach the client; the rest of the stream is still
forwarded untouched.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol, cast

import structlog

from protocol import messages as m
from protocol.auth import LoginError, ServerLogin, ServerSecret
from protocol.errors import ProtocolViolation, parse_error_fields
from protocol.framing import MessageReader
from protocol.scanner import BackendScanner

_I32 = struct.Struct("!I")
log = structlog.get_logger("pgrouter.server")
WRITE_HIGH_WATER = 256 * 1024
HiddenDone = Callable[[list[dict[str, str]], list[list[str | None]]], None]


#: server_tls modes under which a server without TLS is refused (libpq's sslmode meanings).
TLS_REQUIRED = frozenset({"require", "verify-ca", "verify-full"})


class TLSOptions(Protocol):
    """How to use TLS with the servers (router.config.ServerTLS): ``mode`` is libpq's sslmode;
    ``context`` None means encrypted without checking the certificate (prefer, require)."""

    @property
    def mode(self) -> str: ...
    @property
    def context(self) -> ssl.SSLContext | None: ...


_UNVERIFIED: ssl.SSLContext | None = None


def _unverified_context() -> ssl.SSLContext:
    """Encryption without a certificate check: libpq's prefer and require without a root CA."""
    global _UNVERIFIED
    if _UNVERIFIED is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["postgresql"])
        _UNVERIFIED = context
    return _UNVERIFIED


class ServerClient(Protocol):
    """What a server connection needs from the client session it is linked to."""

    transport: asyncio.Transport

    def server_ready(self, data: bytes, count: int) -> None: ...
    def server_data(self, data: bytes) -> None: ...
    def server_lost(self, server: ServerConnection, reason: str) -> None: ...


class ServerConnection(asyncio.Protocol):
    """A logged-in PostgreSQL connection owned by a pool."""

    __slots__ = (
        "__weakref__",
        "_hidden",
        "_hidden_done",
        "_hidden_errors",
        "_hidden_left",
        "_hidden_rows",
        "backend_key",
        "broken",
        "client",
        "closed",
        "created",
        "error_counts",
        "host",
        "last_used",
        "login",
        "login_done",
        "on_lost",
        "parameters",
        "port",
        "prepared",
        "reading_paused",
        "retired",
        "scanner",
        "settings",
        "ssl_answer",
        "transport",
    )  # fmt: skip

    def __init__(
        self, host: str, port: int, login: ServerLogin, *, ssl_request: bool = False
    ) -> None:
        self.host = host
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.login = login
        loop = asyncio.get_running_loop()
        self.login_done: asyncio.Future[None] = loop.create_future()
        # The server's one-byte answer to our SSLRequest (None: the startup packet goes first).
        self.ssl_answer: asyncio.Future[bytes] | None = (
            loop.create_future() if ssl_request else None
        )
        self.scanner = BackendScanner()
        self.client: ServerClient | None = None
        self.parameters: dict[str, str] = {}
        self.backend_key = (0, 0)
        self.settings: dict[str, str] = {}  # session settings applied for clients (lower-case)
        self.prepared: OrderedDict[bytes, None] = OrderedDict()  # our statement names, LRU
        self.error_counts: dict[str, int] = {}  # errors sent to clients, by SQLSTATE class
        self.created = time.monotonic()
        self.last_used = self.created
        self.closed = False
        self.broken = False  # the server (or the network) closed it, not us
        self.retired = False  # past server_lifetime: closed instead of reused
        self.reading_paused = False
        self.on_lost: Callable[[ServerConnection], None] | None = None  # the owning pool's hook
        self._hidden: MessageReader | None = None  # reading replies of a hidden query
        self._hidden_rows: list[list[str | None]] = []
        self._hidden_errors: list[dict[str, str]] = []
        self._hidden_done: HiddenDone | None = None
        self._hidden_left = 0  # hidden queries still to be answered

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self.ssl_answer is not None:
            transport.write(m.SSL_REQUEST_PACKET)
        else:
            transport.write(self.login.startup())

    def data_received(self, data: bytes) -> None:
        try:
            if self._hidden is not None or self.ssl_answer is not None:
                data = self._before_forwarding(data)
                if not data:
                    return
            client = self.client
            if client is None and not self.login.done:
                self._read_login(data)
                return
            scanner = self.scanner
            ready = scanner.feed(data)
            if scanner.params:
                self._take_parameters()
            if scanner.errors:
                self._count_errors()
            if client is None:  # an idle server's notice or parameter change
                return
            if ready:
                client.server_ready(data, ready)  # it forwards the data and may release us
            else:
                client.server_data(data)
        except ProtocolViolation as exc:  # a broken server: never reuse it
            log.warning("server protocol violation", server=repr(self), error=str(exc))
            if self.transport is not None:
                self.transport.abort()  # connection_lost tells the linked client

    def _before_forwarding(self, data: bytes) -> bytes:
        """The answer to our SSLRequest, or a hidden query's replies: what is left of `data`
        for the forwarding path."""
        answer = self.ssl_answer
        if answer is not None:
            if answer.done():  # more bytes before the TLS handshake: nobody reads them
                return b""
            if len(data) > 1:
                # Bytes after the answer would be taken as if they came over TLS
                # (CVE-2021-23214): a server (or someone in between) doing that is refused.
                answer.set_exception(
                    LoginError("08P01", "received unencrypted data after SSL response")
                )
                if self.transport is not None:
                    self.transport.abort()
            else:
                answer.set_result(data)
            return b""
        return self._read_hidden(data)

    def _take_parameters(self) -> None:
        """Keep the server's reported values (canonical forms) current."""
        for body in self.scanner.params:
            name, value = m.parse_parameter_status(body)
            self.parameters[name] = value
        self.scanner.params.clear()

    def _count_errors(self) -> None:
        counts = self.error_counts
        for body in self.scanner.errors:
            sqlstate_class = parse_error_fields(body).get("C", "XX")[:2]
            counts[sqlstate_class] = counts.get(sqlstate_class, 0) + 1
        self.scanner.errors.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = not self.closed
        self.closed = True
        reason = str(exc) if exc else "server closed the connection"
        if not self.login_done.done():
            self.login_done.set_exception(ConnectionError(reason))
        if self.ssl_answer is not None and not self.ssl_answer.done():
            self.ssl_answer.set_exception(ConnectionError(reason))
        client = self.client
        if client is not None:
            client.server_lost(self, reason)
        done, self._hidden_done = self._hidden_done, None
        if done is not None:  # a hidden query will never be answered
            done([{"C": "08006", "M": reason}], [])
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        client = self.client
        if client is not None:
            client.transport.pause_reading()

    def resume_writing(self) -> None:
        client = self.client
        if client is not None:
            client.transport.resume_reading()

    # ---- login ------------------------------------------------------------------------------

    def _read_login(self, data: bytes) -> None:
        try:
            reply = self.login.feed(data)
        except (LoginError, ProtocolViolation) as exc:
            if not self.login_done.done():
                self.login_done.set_exception(exc)
            self.close()
            return
        assert self.transport is not None
        if reply:
            self.transport.write(reply)
        if self.login.done:
            self.parameters = self.login.parameters
            self.backend_key = self.login.backend_key
            rest = self.login.reader.take_rest()
            if rest:
                self.scanner.feed(rest)
            self.login_done.set_result(None)

    # ---- hidden queries -----------------------------------------------------------------------

    def run_hidden(self, sql: str | list[str], done: HiddenDone | None = None) -> None:
        """Send simple queries (each its own transaction) whose replies are swallowed;
        `done(errors, rows)` at the last one's ReadyForQuery.

        ParameterStatus replies still go to a linked client, since they describe the session
        it is using.
        """
        assert self.transport is not None and self._hidden is None
        self._hidden = MessageReader(1 << 20)
        self._hidden_errors = []
        self._hidden_rows = []
        self._hidden_done = done
        queries = [sql] if isinstance(sql, str) else sql
        self._hidden_left = len(queries)
        self.transport.write(b"".join(m.query(q) for q in queries))

    async def query(self, sql: str) -> list[list[str | None]]:
        """Rows of a simple query on an unlinked connection (health and LSN checks)."""
        result: asyncio.Future[list[list[str | None]]] = asyncio.get_running_loop().create_future()

        def done(errors: list[dict[str, str]], rows: list[list[str | None]]) -> None:
            if result.done():
                return
            if errors:
                result.set_exception(
                    LoginError(errors[0].get("C", "XX000"), errors[0].get("M", ""))
                )
            else:
                result.set_result(rows)

        self.run_hidden(sql, done)
        return await result

    def _read_hidden(self, data: bytes) -> bytes:
        reader = self._hidden
        assert reader is not None
        reader.feed(data)
        while (msg := reader.next()) is not None:
            kind, body = msg
            if kind == 90 and self._hidden_left > 1:  # 'Z' of one of several
                self._hidden_left -= 1
            elif kind == 90:
                self._hidden = None
                self.scanner.status = body[0]
                rest = reader.take_rest()
                done, self._hidden_done = self._hidden_done, None
                if done is not None:
                    done(self._hidden_errors, self._hidden_rows)
                return rest
            if kind == 68:  # 'D'
                self._hidden_rows.append(m.parse_data_row(body))
            elif kind == 69:  # 'E'
                self._hidden_errors.append(parse_error_fields(body))
            elif kind == 83:  # 'S'
                name, value = m.parse_parameter_status(body)
                self.parameters[name] = value
                if self.client is not None:
                    self.client.transport.write(m.message(b"S", body))
        return b""

    # ---- linking ----------------------------------------------------------------------------

    def unlink(self) -> None:
        self.client = None
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def pause_reading(self) -> None:
        """The linked client cannot take more: stop reading from the server."""
        if self.transport is not None and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close politely (Terminate) unless the socket is already gone."""
        if self.closed:
            return
        self.closed = True
        self.client = None
        if self.transport is not None:
            if not self.transport.is_closing():
                self.transport.write(m.TERMINATE)
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.client = None
        if self.transport is not None:
            self.transport.abort()

    @property
    def clean(self) -> bool:
        """Between transactions and safe to hand to another client."""
        return (
            not self.closed
            and self.scanner.status == 73
            and self.scanner.at_boundary
            and self._hidden is None
        )

    def __repr__(self) -> str:
        return f"<ServerConnection {self.host}:{self.port} pid={self.backend_key[0]}>"


async def open_server(
    host: str,
    port: int,
    user: str,
    password: ServerSecret,
    params: dict[str, str],
    timeout: float,
    tls: TLSOptions | None = None,
) -> ServerConnection:
    """Connect (with TLS as `tls` says) and log in; raises LoginError, OSError (ssl.SSLError
    for a failed handshake) or TimeoutError."""
    loop = asyncio.get_running_loop()
    login = ServerLogin(user, password, params)
    conn: ServerConnection | None = None
    mode = "disable" if tls is None else tls.mode
    try:
        async with asyncio.timeout(timeout):
            _, proto = await loop.create_connection(
                lambda: ServerConnection(host, port, login, ssl_request=mode != "disable"),
                host,
                port,
            )
            conn = proto
            if conn.ssl_answer is not None:
                assert tls is not None
                await _negotiate_tls(conn, host, port, tls)
            await conn.login_done
    except BaseException:
        if conn is not None:
            conn.login_done.cancel()  # nobody waits for it any more
            conn.abort()
        raise
    return conn


async def _negotiate_tls(conn: ServerConnection, host: str, port: int, tls: TLSOptions) -> None:
    """After our SSLRequest: TLS on 'S'; on 'N' plain text unless the mode requires TLS.
    Then the startup packet."""
    assert conn.ssl_answer is not None and conn.transport is not None
    answer = await conn.ssl_answer
    conn.ssl_answer = None  # the hot path only checks for None from here on
    if answer == b"S":
        context = tls.context or _unverified_context()
        transport = await asyncio.get_running_loop().start_tls(
            conn.transport, conn, context, server_hostname=host
        )
        if transport is None:
            raise ConnectionError("TLS handshake did not complete")
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        conn.transport = transport
    elif answer != b"N":  # 'E': a server from before protocol 3 reports an error
        raise LoginError("08P01", f"server {host}:{port} answered the SSLRequest with {answer!r}")
    elif tls.mode in TLS_REQUIRED:
        raise LoginError(
            "08006", f"server {host}:{port} does not support TLS (server_tls.mode: {tls.mode})"
        )
    conn.transport.write(conn.login.startup())


async def send_cancel(host: str, port: int, key: tuple[int, int], timeout: float = 5.0) -> None:
    """Deliver a CancelRequest on a fresh connection, as the protocol requires."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(m.cancel_request(*key))
            await writer.drain()
            await reader.read(1)  # the server closes the connection when done
        finally:
            writer.close()
