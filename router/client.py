"""One client connection: login, then transactions bound to pooled server connections.

The state machine: STARTUP (untyped packets) -> AUTH (password exchange) -> WELCOME
(waiting for the pool's cached server parameters, normally instant) -> READY. In READY the
client is either linked to a server (bytes forwarded both ways, headers scanned) or idle
(its next transaction's first bytes are buffered while a server is acquired).

A server goes back to its pool only at ReadyForQuery 'I' with every Query/Sync/FunctionCall
answered and the client's stream at a message boundary (transaction mode), after every
such point (statement mode), or when the client leaves (session mode).
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
import secrets
import ssl
import time
from time import monotonic_ns
from typing import TYPE_CHECKING, cast

import structlog

from pools.pool import Pool
from pools.server import ServerConnection
from protocol import errors as e
from protocol import messages as m
from protocol.auth import AuthFailed, ClientAuth
from protocol.errors import ProtocolViolation
from protocol.framing import MessageReader, StartupReader
from protocol.scanner import LENGTH_AT, FrontendScanner
from router import __version__
from router.classify import Target
from router.config import ADMIN_DATABASES
from router.direct_tls import (
    HANDSHAKE_FAILURE_ALERT,
    TLS_HANDSHAKE_RECORD,
    alpn_ok,
    start_tls_after,
)
from router.routing import Reader, Router
from router.statements import (
    ClientStatements,
    Statement,
    custom_settings,
    query_touches_state,
    reconcile,
)

if TYPE_CHECKING:
    from router.admin import AdminConsole
    from router.config import Database
    from router.proxy import Proxy

log = structlog.get_logger("pgrouter.client")

# Startup parameters that are not session settings.
_NOT_SETTINGS = frozenset({"user", "database", "options", "replication"})
_COPY_MESSAGES = frozenset(b"dcf")  # CopyData, CopyDone, CopyFail
_SETTING_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.")
_I = 73  # 'I': idle, outside a transaction
_TLS_FIRST = -1  # nothing received yet: the first byte may open a direct TLS handshake
_TLS_HANDSHAKE = 1
_TLS_ON = 2
FATAL_LINGER = 1.0  # seconds a connection stays half-closed after a FATAL error
PAUSE_POLL = 0.05  # seconds between checks for the end of running transactions (PAUSE)
GUARD_LIMIT = 64 * 1024  # a replica reply held longer than this is forwarded as it is
_RETRY_SQLSTATES = frozenset({"25006", "40001"})  # read-only transaction, recovery conflict
_SHUTDOWN_SQLSTATES = frozenset({"57P01", "57P02"})  # the FATAL of a server going away
# A backend that cannot be reached, or is shutting down or starting up.
_LOST_SQLSTATES = frozenset({"08001", "08006", "57P01", "57P02", "57P03"})
# A prepared statement from before a schema change: prepared afresh and run again.
_STALE_MESSAGE = "cached plan must not change result type"
STALE_PLAN = "stale"


def _refusal(out: bytes | bytearray) -> str | None:
    """Walk a held reply: the SQLSTATE of a refusal, "" once results flow (or another error
    came), None while undecided."""
    pos, n = 0, len(out)
    while pos + 5 <= n:
        kind = out[pos]
        end = pos + 1 + LENGTH_AT(out, pos + 1)[0]
        if end > n:
            return None
        if kind == 69:  # ErrorResponse
            fields = e.parse_error_fields(bytes(out[pos + 5 : end]))
            code = fields.get("C", "")
            if code == "0A000" and fields.get("M", "").startswith(_STALE_MESSAGE):
                return STALE_PLAN
            return code if code in _RETRY_SQLSTATES or code in _SHUTDOWN_SQLSTATES else ""
        if kind not in _HELD_KINDS:
            return ""
        pos = end
    return None


# Before any result: RowDescription, notices, parameters, Parse/BindComplete,
# ParameterDescription, NoData.
_HELD_KINDS = frozenset(b"TNS12tn")
_SYNC = b"S\x00\x00\x00\x04"
_DESCRIBE_PORTAL = b"D\x00\x00\x00\x06P\x00"  # the unnamed portal's row description


def _ends_at_sync(buf: bytearray) -> bool:
    """One simple Query, or an extended-protocol batch closed by a Sync (the only one when
    a single reply is pending)."""
    if buf[0] == 81:
        return 1 + LENGTH_AT(buf, 1)[0] == len(buf)
    return buf.endswith(_SYNC)


def _statements(buf: bytearray, names: dict[bytes, Statement] | None) -> list[str] | None:
    """The SQL texts of the Query and Parse messages buffered for one server, and of the
    prepared statements (`names`) its Bind and Describe messages use; None while the first
    message is incomplete or an extended-protocol batch has no Sync/Flush yet (its later
    Parse messages could still be writes); [] when the batch names no SQL we know."""
    texts: list[str] = []
    pos, n = 0, len(buf)
    extended = n > 0 and buf[0] != 81
    while pos + 5 <= n:
        kind = buf[pos]
        end = pos + 1 + LENGTH_AT(buf, pos + 1)[0]
        if end > n:
            break
        if kind == 81:  # Query
            texts.append(bytes(buf[pos + 5 : end - 1]).decode("utf-8", "replace"))
        elif kind == 80:  # Parse: statement name, then the text
            name_end = buf.index(0, pos + 5)
            text_end = buf.index(0, name_end + 1)
            texts.append(bytes(buf[name_end + 1 : text_end]).decode("utf-8", "replace"))
        elif kind in (83, 72):  # Sync, Flush: the batch is complete
            return texts
        elif names is not None and (kind == 66 or (kind == 68 and buf[pos + 5] == 83)):
            # Bind, Describe statement: the text of a statement prepared earlier
            start = buf.index(0, pos + 5) + 1 if kind == 66 else pos + 6
            known = names.get(bytes(buf[start : buf.index(0, start)]))
            if known is not None:
                texts.append(known.sql)
            elif not texts:
                return []
        elif not texts and kind != 80:
            return []  # starts with Bind/Execute/...: a statement prepared earlier
        pos = end
    if pos == 0 or (extended and texts):
        return None
    return texts


class State(enum.Enum):
    STARTUP = 1
    AUTH = 2
    WELCOME = 3
    READY = 4
    ADMIN = 5  # logged in to the admin console
    CLOSED = 6


# Enum attribute lookups cost ~100 ns each on Python 3.11: the per-message paths use these.
_READY = State.READY
_CLOSED = State.CLOSED
_PRIMARY = Target.PRIMARY

UNKNOWN_SETTINGS = "\0unknown"
_TRUE_SETTINGS = frozenset({"on", "true", "yes", "1", "t", "y"})
_PLAIN_END = re.compile(
    r"\s*(?:commit|end|rollback|abort)(?:\s+(?:work|transaction))?\s*;?\s*\Z", re.I
)


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def settings_sql(current: dict[str, str], wanted: dict[str, str]) -> str:
    """One simple query moving a server session from `current` to `wanted` settings."""
    parts = []
    if UNKNOWN_SETTINGS in current:  # what the server has is not known: start from scratch
        parts.append("RESET ALL")
        current = {}
    changed = [(k, v) for k, v in wanted.items() if current.get(k) != v]
    if changed:
        calls = ", ".join(
            f"pg_catalog.set_config({quote_literal(k)}, {quote_literal(v)}, false)"
            for k, v in changed
        )
        parts.append(f"SELECT {calls}")
    parts += [f"RESET {k}" for k in current if k not in wanted]
    return ";".join(parts)


# Session state that cannot move to another server, in the order state_sql reports it.
PIN_REASONS = ("listen", "advisory_lock", "temp_table", "holdable_cursor", "role", "sql_prepare")


def state_sql(user: str, custom: set[str]) -> str:
    """One row: the session's settings (pg_settings cannot list dotted ones, so they are asked
    for by name), what pins it, and the protocol-level statements it holds."""
    if custom:
        names = ", ".join(quote_literal(name) for name in sorted(custom))
        custom_sql = (
            "(SELECT pg_catalog.json_object_agg(n, pg_catalog.current_setting(n, true))"
            f" FROM pg_catalog.unnest(ARRAY[{names}]) AS n)"
        )
    else:
        custom_sql = "'{}'"
    return (
        "SELECT (SELECT pg_catalog.json_object_agg(name, pg_catalog.current_setting(name))"
        " FROM pg_catalog.pg_settings WHERE source = 'session'),"
        f" {custom_sql},"
        " (SELECT count(*) FROM pg_catalog.pg_listening_channels()),"
        " (SELECT count(*) FROM pg_catalog.pg_locks"
        "  WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()),"
        " (SELECT count(*) FROM pg_catalog.pg_class"
        "  WHERE relnamespace = pg_catalog.pg_my_temp_schema()),"
        " (SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable),"
        f" current_user <> session_user OR session_user <> {quote_literal(user)},"
        " (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql),"
        " (SELECT pg_catalog.json_agg(name) FROM pg_catalog.pg_prepared_statements"
        "  WHERE NOT from_sql)"
    )


def canonical_encoding(value: str) -> str:
    """libpq and drivers send utf8, UTF-8, unicode...; servers report UTF8."""
    return (
        "UTF8" if value.upper().replace("-", "").replace("_", "") in ("UTF8", "UNICODE") else value
    )


class ClientSession(asyncio.Protocol):
    __slots__ = (
        "__weakref__",
        "_auth",
        "_canonical",
        "_console",
        "_custom",
        "_guard",
        "_guard_out",
        "_guard_retry",
        "_guard_sql",
        "_guard_stale",
        "_held_begin",
        "_query_start",
        "_reader",
        "_retried",
        "_server_transport",
        "_startup",
        "_tls",
        "_touched",
        "_txn_ddl",
        "_txn_writes",
        "_waiter",
        "_xact_start",
        "admin",
        "buffer",
        "checking",
        "connected_at",
        "database",
        "key",
        "paused",
        "pending",
        "pins",
        "pool",
        "primary_pool",
        "proxy",
        "reader",
        "route_override",
        "router",
        "scanner",
        "server",
        "session_mode",
        "settings",
        "startup_settings",
        "state",
        "statement_mode",
        "statements",
        "transport",
        "user",
        "waiting",
    )  # fmt: skip

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set at once
        self.state = State.STARTUP
        self.user = ""
        self.database: Database | None = None
        self.admin = False  # logging in to the admin console
        self._console: AdminConsole | None = None
        self.settings: dict[str, str] = {}  # wanted session settings, lower-case names
        self.startup_settings: dict[str, str] = {}  # what RESET returns to
        self.statements: ClientStatements | None = None  # named prepared statements, once used
        self._touched = False  # the transaction may have changed session state
        self._custom: set[str] = set()  # dotted setting names the client has set
        self.pins: frozenset[str] = frozenset()  # why the client keeps its server
        self.key = (0, 0)  # our BackendKeyData for this client
        self.pool: Pool | None = None  # the pool of the current (or last) transaction
        self.primary_pool: Pool | None = None
        self.router: Router | None = None  # None: everything goes to the primary
        self.reader = Reader()
        self.route_override: Target | None = None  # SET pgrouter.route
        self._txn_writes = True  # the transaction went to the primary as a possible write
        self._txn_ddl = False
        self._guard: bytes | None = None  # an autocommit read sent to a replica, for a retry
        self._guard_sql = ""  # the SQL of a guarded read on a replica ("" for other guards)
        self._guard_out = bytearray()  # the replica's reply, held until it is not a refusal
        self._guard_retry = False
        self._guard_stale: Statement | None = None  # the statement of a held Bind..Sync
        self._held_begin: str | None = None  # a BEGIN answered here, not yet sent
        self._retried = False  # this read already moved once after its server failed
        self.session_mode = False
        self.statement_mode = False
        self.server: ServerConnection | None = None
        self._server_transport: asyncio.Transport | None = None
        self.pending = 0  # Query/Sync/FunctionCall sent and not yet answered
        # monotonic_ns when the server started on the client's work (0: not busy), for the
        # pool's query and transaction times; read twice per transaction, never per message.
        self._query_start = 0
        self._xact_start = 0
        self.buffer = bytearray()  # bytes of a transaction waiting for a server
        self.waiting = False
        self.checking = False  # the server is being asked for its session state
        self._waiter: _FirstLogin | ClientSession = self
        self.paused = False  # our transport is over its write high-water mark
        self.scanner = FrontendScanner(proxy.config.max_packet_size)
        self._startup: StartupReader | None = StartupReader()
        self._reader: MessageReader | None = None
        self._auth: ClientAuth | None = None
        self._canonical = True  # False until reported settings were checked against a server
        self.connected_at = 0.0
        self._tls = _TLS_FIRST  # then 0: plain; _TLS_HANDSHAKE, _TLS_ON

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)
        self.connected_at = time.monotonic()
        self.proxy.client_connected(self)  # also starts the client_login_timeout clock

    def data_received(self, data: bytes) -> None:
        if self.state is _READY:
            try:
                answered = self.scanner.feed(data)
            except ProtocolViolation as exc:
                self.violation(str(exc))
                return
            self.pending += answered  # before a Terminate: what it follows is still owed
            if self.scanner.terminated:
                self._terminate(data)
                return
            self.pool.bytes_received += len(data)  # type: ignore[union-attr]  # set at login
            statements = self.statements
            transport = self._server_transport
            if statements is None:
                if self.scanner.named_end:
                    statements = self._track_statements(answered)
                elif (
                    (data[0] == 81 or data[0] == 80)
                    and (self.router is None or not self._routed_now(transport))
                    and query_touches_state(data)
                ):
                    self._touched = True
                    self._custom.update(custom_settings(data))
            if transport is not None:  # the forwarding path
                if not self._query_start:  # the server was waiting for the client
                    self._query_start = monotonic_ns()
                    if not self._xact_start:  # session mode, or pinned: the server stayed
                        self._xact_start = self._query_start
                if statements is not None:
                    data = statements.feed(data, self.server)  # type: ignore[arg-type]
                transport.write(data)
            else:
                self._queue(data)
        elif self.state is not _CLOSED:
            try:
                if self.state is State.ADMIN:
                    self._admin_data(data)
                else:
                    self._login_data(data)
            except ProtocolViolation as exc:
                self.violation(str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        self._shut()

    def pause_writing(self) -> None:
        self.paused = True
        if self.server is not None:
            self.server.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.server is not None:
            self.server.resume_reading()

    # ---- errors and closing -------------------------------------------------------------------

    def fatal(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        """Send a FATAL error and close; the process and other clients carry on."""
        if self.state is State.CLOSED:
            return
        self.proxy.count_error(sqlstate)
        transport = self.transport
        self._shut()
        if transport.is_closing():
            return
        self._last_words(transport, e.fatal(sqlstate, message, detail=detail))

    @staticmethod
    def _last_words(transport: asyncio.Transport, data: bytes) -> None:
        transport.write(data)
        # Closing with unread input makes the kernel send a reset, which can destroy the
        # error before the client reads it: half-close instead, drop what still arrives
        # (state CLOSED), and close for good shortly after.
        if transport.can_write_eof():
            transport.write_eof()
            asyncio.get_running_loop().call_later(FATAL_LINGER, transport.close)
        else:
            transport.close()

    def violation(self, message: str) -> None:
        log.info("protocol violation", client=self.peer, error=message)
        self.fatal(e.PROTOCOL_VIOLATION, message)

    def close(self) -> None:
        self._shut()
        self.transport.close()

    def _log_login(self) -> None:
        if self.proxy.config.log.connections:
            database = self.database.name if self.database is not None else "pgrouter"
            log.info("client login", client=self.peer, user=self.user, database=database)

    def _shut(self) -> None:
        """Give back or discard the server, leave the wait queue, forget the cancel key."""
        if self.state is State.CLOSED:
            return
        if self.state in (State.READY, State.ADMIN) and self.proxy.config.log.connections:
            log.info(
                "client closed",
                client=self.peer,
                user=self.user,
                seconds=round(time.monotonic() - self.connected_at, 3),
            )
        self.state = State.CLOSED
        server = self.server
        if self.pins:
            self.proxy.unpin(self.pins)
        if server is not None:
            self._unlink()
            assert self.pool is not None
            reusable = self.pending <= 0 and server.clean and self.scanner.at_boundary
            if self.pins or (self.touched and not self.session_mode):
                reusable = False  # state another client must not inherit
            if reusable:
                self.pool.release(server)
            else:
                self.pool.discard(server)
        if self.waiting and self.pool is not None:
            self.waiting = False
            self.pool.cancel_wait(self._waiter)
        self.proxy.client_gone(self)

    def _terminate(self, data: bytes) -> None:
        """The client said goodbye; forward what came before it to a linked server (an
        unlinked client's unanswered bytes are dropped), never the Terminate."""
        at = self.scanner.terminated_at
        if at > 0 and self._server_transport is not None:
            self._server_transport.write(data[:at])
        if at < 0:  # part of the Terminate already went to the server: it cannot be reused
            self.pending = 1
        self.close()

    @property
    def peer(self) -> str:
        """The client's address, formatted only when something is logged."""
        peer = self.transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")

    @property
    def peer_host(self) -> str:
        """The client's address without the port: whose read-your-writes state it shares."""
        peer = self.transport.get_extra_info("peername")
        return peer[0] if isinstance(peer, tuple) else str(peer)

    @property
    def logging_in(self) -> bool:
        return self.state in (State.STARTUP, State.AUTH, State.WELCOME)

    def login_timed_out(self) -> None:
        """Called by the proxy's janitor for a client still logging in after the timeout."""
        if self.logging_in:
            log.info("client login timeout", client=self.peer)
            if self._tls == _TLS_HANDSHAKE:  # no error can be sent in the middle of it
                self._shut()
                self.transport.abort()
                return
            self.fatal(e.PROTOCOL_VIOLATION, "client_login_timeout: login not finished in time")

    # ---- login ------------------------------------------------------------------------------

    def _login_data(self, data: bytes) -> None:
        if self.state is State.STARTUP:
            assert self._startup is not None
            if self._tls == _TLS_FIRST:
                if data[0] == TLS_HANDSHAKE_RECORD:
                    self._direct_tls(data)
                    return
                self._tls = 0
            self._startup.feed(data)
            if self._tls == _TLS_HANDSHAKE:
                return  # decrypted before start_tls returned: read once it has

            while self.state is State.STARTUP and (packet := self._startup.next()) is not None:
                self._startup_packet(packet)
            if self.state is not State.STARTUP and self._startup is not None:
                rest = self._startup.take_rest()
                self._startup = None
                if rest:
                    self._login_data(rest)
        elif self.state is State.AUTH:
            assert self._reader is not None
            if self._auth is None:
                raise ProtocolViolation("unexpected message before the authentication request")
            self._reader.feed(data)
            while self.state is State.AUTH and (msg := self._reader.next()) is not None:
                kind, body = msg
                if kind != ord("p"):
                    raise ProtocolViolation(f"expected a password message, got {chr(kind)!r}")
                self._password(body)
            if self.state is State.WELCOME or self.state is State.READY:
                rest = self._reader.take_rest()
                self._reader = None
                if rest:
                    self._login_data(rest)
        elif self.state is State.WELCOME:
            self.buffer += data  # pipelined before our ReadyForQuery: kept for later

    def _startup_packet(self, packet: m.StartupPacket) -> None:
        config = self.proxy.config
        if packet.code == m.CANCEL_REQUEST:
            assert packet.cancel_key is not None
            self.proxy.cancel(packet.cancel_key)
            self.close()
            return
        if packet.code == m.SSL_REQUEST:
            self._ssl_request()
            return
        if packet.code == m.GSSENC_REQUEST:
            self.transport.write(b"N")
            return
        if packet.major != 3:
            self.fatal(
                e.FEATURE_NOT_SUPPORTED,
                f"unsupported frontend protocol {packet.major}.{packet.minor}: "
                "server supports 3.0 to 3.0",
            )
            return
        if packet.minor > 0 or packet.protocol_options:
            self.transport.write(m.negotiate_protocol_version(0, packet.protocol_options))
        if not self._tls and config.client_tls.mode == "require":
            log.info("client without TLS refused", client=self.peer)
            self.fatal(e.INVALID_AUTHORIZATION, "pgrouter requires TLS (client_tls.mode: require)")
            return
        params = packet.params
        user = params.get("user", "")
        if not user:
            self.fatal(
                e.INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet"
            )
            return
        if "replication" in params and params["replication"].lower() not in ("false", "off", "0"):
            self.fatal(e.FEATURE_NOT_SUPPORTED, "replication connections are not supported")
            return
        self.user = user
        dbname = params.get("database") or user
        if self.proxy.client_count > config.max_client_conn:
            self.fatal(e.TOO_MANY_CONNECTIONS, "no more connections allowed (max_client_conn)")
            return
        method, refusal = self.proxy.auth_method(self, user, dbname)
        if refusal is not None:  # before anything about the database is revealed
            self.fatal(e.INVALID_AUTHORIZATION, refusal)
            return
        database = config.databases.get(dbname)
        self.admin = dbname in ADMIN_DATABASES
        if database is None and not self.admin:
            self.fatal(e.INVALID_CATALOG_NAME, f'database "{dbname}" does not exist')
            return
        self.database = database
        try:
            self.settings = self._wanted_settings(params)
        except ValueError as exc:
            self.fatal(e.PROTOCOL_VIOLATION, str(exc))
            return
        self._reader = MessageReader(m.MAX_STARTUP_PACKET)
        self.state = State.AUTH
        auth = self.proxy.client_auth(self, user, method)
        if auth is not None:  # else auth_query looks the user up and calls begin_auth
            self.begin_auth(auth)

    def _ssl_request(self) -> None:
        """SSLRequest: 'N', or 'S' and the TLS handshake on this connection."""
        context = self.proxy.config.client_tls.context
        if self._tls:
            raise ProtocolViolation("SSLRequest on a connection that already uses TLS")
        if context is None:
            self.transport.write(b"N")
            return
        assert self._startup is not None
        if self._startup.pending:
            # Bytes sent before the handshake would be taken as if they came over TLS
            # (CVE-2021-23222): refuse them, as PostgreSQL does.
            raise ProtocolViolation("received unencrypted data after SSL request")
        self._tls = _TLS_HANDSHAKE
        self.transport.write(b"S")
        self.transport.pause_reading()  # the ClientHello is for the TLS layer, not for us
        asyncio.get_running_loop().create_task(self._start_tls(context))

    def _direct_tls(self, hello: bytes) -> None:
        """PostgreSQL 17 direct TLS: the connection opened with a TLS ClientHello."""
        context = self.proxy.config.client_tls.context
        if context is None:  # the client waits for a TLS answer: an alert is the clear one
            log.info("direct TLS refused (client_tls.mode: disable)", client=self.peer)
            transport = self.transport
            self._shut()
            self._last_words(transport, HANDSHAKE_FAILURE_ALERT)
            return
        self._tls = _TLS_HANDSHAKE
        self.transport.pause_reading()  # the rest of the handshake is for the TLS layer
        asyncio.get_running_loop().create_task(self._start_tls(context, hello))

    async def _start_tls(self, context: ssl.SSLContext, hello: bytes | None = None) -> None:
        """The TLS handshake after our 'S', or (`hello` given) of a direct TLS connection."""
        raw = self.transport
        try:
            if hello is None:
                transport = await asyncio.get_running_loop().start_tls(
                    raw, self, context, server_side=True
                )
            else:
                transport = await start_tls_after(raw, self, context, hello)
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError) as exc:
            if self.state is not State.CLOSED:
                log.info(
                    "client TLS handshake failed",
                    client=self.peer,
                    error=str(exc) or type(exc).__name__,
                )
            self._shut()
            raw.abort()
            return
        if transport is None or self.state is State.CLOSED:
            if transport is not None:
                transport.abort()
            raw.abort()
            return
        self._tls = _TLS_ON
        transport.set_write_buffer_limits(high=256 * 1024)
        self.transport = transport
        if hello is not None and not alpn_ok(transport):
            log.info("direct TLS without ALPN postgresql refused", client=self.peer)
            self.fatal(
                e.PROTOCOL_VIOLATION,
                'direct TLS connection without ALPN protocol "postgresql"',
                detail="A client using sslnegotiation=direct must offer ALPN postgresql.",
            )
            return
        if self._startup is not None and self._startup.pending:
            try:
                self._login_data(b"")
            except ProtocolViolation as exc:
                self.violation(str(exc))

    def begin_auth(self, auth: ClientAuth) -> None:
        """The user's secrets are at hand: ask the client for its password."""
        if self.state is not State.AUTH:
            return  # gone (or cut at the login timeout) while auth_query ran
        self._auth = auth
        first = auth.start()
        if first:
            self.transport.write(first)
        if auth.done:
            self._authenticated()

    def _wanted_settings(self, params: dict[str, str]) -> dict[str, str]:
        settings = {k.lower(): v for k, v in params.items() if k not in _NOT_SETTINGS}
        if "options" in params:
            settings.update(m.parse_options(params["options"]))
        for name in settings:
            if not name or not set(name) <= _SETTING_NAME_CHARS:
                raise ValueError(f"invalid setting name {name!r} in startup packet")
        if "client_encoding" in settings:
            settings["client_encoding"] = canonical_encoding(settings["client_encoding"])
        return settings

    def _password(self, body: bytes) -> None:
        assert self._auth is not None
        try:
            reply = self._auth.feed(body)
        except AuthFailed as exc:
            self.proxy.auth_failures += 1
            log.info("authentication failed", client=self.peer, user=self.user, reason=str(exc))
            self.fatal(e.INVALID_PASSWORD, f'password authentication failed for user "{self.user}"')
            return
        if reply:
            self.transport.write(reply)
        if self._auth.done:
            self._authenticated()

    def _authenticated(self) -> None:
        auth, self._auth = self._auth, None
        if self.admin:
            self._admin_login()
            return
        assert self.database is not None
        refusal = self.proxy.admit(self)
        if refusal is not None:
            self.fatal(e.TOO_MANY_CONNECTIONS, refusal)
            return
        self.proxy.learn_server_secret(self.database, self.user, auth)
        self.state = State.WELCOME
        self.session_mode = self.database.pool_mode == "session"
        self.statement_mode = self.database.pool_mode == "statement"
        self.startup_settings = dict(self.settings)
        self.scanner.watch = not self.session_mode and self.proxy.config.max_prepared_statements > 0
        self.pool = self.primary_pool = self.proxy.primary_pool(self.database, self.user)
        if not self.session_mode:
            self.router = self.proxy.router_for(self.database)
            if self.router is not None:
                self.reader = self.router.reader_for(self.user, self.peer_host)
        self.key = self.proxy.register_cancel_key(self)
        self._welcome_from(self.pool)

    def _welcome_from(self, pool: Pool) -> None:
        """Welcome the client with `pool`'s server parameters, once a first server login of
        that pool has brought them."""
        self.pool = pool
        if pool.parameters is not None:
            self._welcome()
            return
        self.waiting = True
        first = self._waiter = _FirstLogin(self)
        server = pool.acquire(first)
        if server is not None:
            first.server_assigned(server)

    def _welcome(self) -> None:
        assert self.pool is not None and self.pool.parameters is not None
        self._canonical = not self.settings
        self.pool.login_count += 1
        welcome = self.pool.welcome(self.settings)
        self.transport.write(welcome + m.backend_key_data(*self.key) + m.READY_IDLE)
        self.state = State.READY
        self._log_login()
        if self.buffer:
            early = bytes(self.buffer)
            self.buffer.clear()
            self.data_received(early)

    # ---- admin console -------------------------------------------------------------------------

    def _admin_login(self) -> None:
        """Admin users get the console; everybody else is refused after authenticating, so
        the refusal reveals nothing a wrong password would not."""
        if self.user not in self.proxy.config.admin.users:
            log.info("admin console refused", client=self.peer, user=self.user)
            self.fatal(e.INSUFFICIENT_PRIVILEGE, "admin console is for admin users only")
            return
        self._console = self.proxy.admin_console()
        self._reader = MessageReader(self.proxy.config.max_packet_size)
        params = {
            "server_version": f"15.0 (pgrouter {__version__})",
            "server_encoding": "UTF8",
            "client_encoding": "UTF8",
            "DateStyle": "ISO, MDY",
            "integer_datetimes": "on",
            "standard_conforming_strings": "on",
            "application_name": self.settings.get("application_name", ""),
        }
        out = [m.AUTHENTICATION_OK]
        out += [m.parameter_status(k, v) for k, v in params.items()]
        out += [m.backend_key_data(*self.proxy.register_cancel_key(self)), m.READY_IDLE]
        self.transport.write(b"".join(out))
        self.state = State.ADMIN
        self._log_login()

    def _admin_data(self, data: bytes) -> None:
        assert self._reader is not None and self._console is not None
        self._reader.feed(data)
        console = self._console
        while (
            self.state is State.ADMIN
            and console.pausing is None
            and console.deferred is None
            and (msg := self._reader.next()) is not None
        ):
            kind, body = msg
            if kind == ord("Q"):
                reply = console.execute(body.rstrip(b"\0").decode())
                if console.deferred is not None:  # gathered from the other workers
                    console.deferred.add_done_callback(self._deferred_reply)
                elif console.pausing is not None:
                    self._pause_reply(reply)
                else:
                    self.transport.write(reply)
            elif kind == ord("X"):
                self.close()
            else:
                self.transport.write(
                    e.error_response(
                        e.FEATURE_NOT_SUPPORTED,
                        "the admin console supports only the simple query protocol",
                    )
                )
                if kind == ord("S"):
                    self.transport.write(m.READY_IDLE)

    def _deferred_reply(self, future: asyncio.Future[bytes]) -> None:
        console = self._console
        assert console is not None
        console.deferred = None
        if self.state is State.ADMIN:
            self.transport.write(future.result())
            self._admin_data(b"")

    def _pause_reply(self, reply: bytes) -> None:
        """PAUSE answers once no transaction of the paused databases is running (or they were
        resumed meanwhile); later commands of this console wait behind it."""
        console = self._console
        assert console is not None and console.pausing is not None
        database = console.pausing
        if (
            self.state is State.ADMIN
            and self.proxy.is_paused(database)
            and self.proxy.transactions_running(database)
        ):
            asyncio.get_running_loop().call_later(PAUSE_POLL, self._pause_reply, reply)
            return
        console.pausing = None
        if self.state is State.ADMIN:
            self.transport.write(reply)
            self._admin_data(b"")

    # ---- transactions -------------------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        """Bytes (already scanned) while no server is linked: get one, or buffer them."""
        if (
            self.router is not None
            or self.waiting
            or self.checking
            or self.buffer
            or data[0] in _COPY_MESSAGES
            or (data[0] == 80 and self.statements is not None)  # maybe answered here
        ):
            self.buffer += data
            if not self.waiting and not self.checking:
                self._begin()
            return
        if self.statements is not None:
            self._guard_against_stale(data)
        self._acquire(self.primary_pool, data)  # type: ignore[arg-type]  # set at login

    def _acquire(self, pool: Pool, data: bytes | None) -> None:
        """Ask `pool` for a server for `data` (None: the buffer)."""
        self.pool = pool
        self.waiting = True
        server = pool.acquire(self)
        if server is not None:
            self.server_assigned(server, data)
        elif self.waiting and data is not None:  # queued, not refused at once: keep the bytes
            self.buffer += data

    def _begin(self) -> None:
        """The client started a transaction: drop stale COPY messages, pick the backend,
        then get a server."""
        buf = self.buffer
        while buf:
            while len(buf) >= 5 and buf[0] in _COPY_MESSAGES:
                end = 1 + int.from_bytes(buf[1:5], "big")
                if len(buf) < end:
                    return  # wait for the rest of the stale message
                del buf[:end]
                self._dropped(end)
            if not buf:
                return
            if self.statements is not None and buf[0] == 80 and _ends_at_sync(buf):
                reply = self.statements.parse_here(buf)
                if reply is not None:
                    self._dropped(len(buf))
                    buf.clear()
                    self.pending -= 1
                    self.transport.write(reply)
                    return
            if self.router is None:
                target: Pool | bool = self.primary_pool  # type: ignore[assignment]
            else:
                target = self._route()
            if target is False:
                return  # the first message is not complete yet
            if target is True:
                continue  # answered here (SET pgrouter.route); look at what follows
            assert isinstance(target, Pool)
            if self.statements is not None:
                self._guard_against_stale(buf)
            self._acquire(target, None)
            return

    def _routed_now(self, transport: asyncio.Transport | None) -> bool:
        """The chunk starts a transaction the router decides on at once; `_route` looks for
        session state changes only in what is not provably read-only."""
        return transport is None and not (self.waiting or self.checking or self.buffer)

    def _touches_state(self, buf: bytearray) -> None:
        """A routed batch that goes to the primary: the session state check data_received
        left to `_route`."""
        if self.statements is None and (buf[0] == 81 or buf[0] == 80) and query_touches_state(buf):
            self._touched = True
            self._custom.update(custom_settings(buf))

    def _guard_against_stale(self, batch: bytes | bytearray) -> None:
        """One autocommit Bind..Sync of a prepared statement, whose client asks for the row
        description (so a new one is fine): its reply is held until it is clear the server's
        copy was not made stale by a schema change."""
        if self.pending == 1 and batch.endswith(_SYNC) and _DESCRIBE_PORTAL in batch:
            assert self.statements is not None
            self._guard_stale = self.statements.bound(batch)
            if self._guard_stale is not None:
                self._guard = bytes(batch)

    def _route(self) -> Pool | bool:
        """The pool for the transaction at the head of the buffer; False while its first
        message is incomplete, True when that message was answered here."""
        router = self.router
        assert router is not None and self.primary_pool is not None
        buf = self.buffer
        self._txn_writes = True
        self._guard, self._guard_sql = None, ""
        self._retried = False
        tracked = self.statements
        statements = _statements(buf, tracked.names if tracked is not None else None)
        if statements is None:
            return False  # wait for a whole message (and for a Sync or Flush after a Parse)
        if not statements:  # Bind of a statement prepared earlier, FunctionCall...: unknown
            router.to_primary += 1
            self._touches_state(buf)
            return self.primary_pool
        classify = router.classifier.classify
        first = classify(statements[0])
        rest = [classify(sql) for sql in statements[1:]] if len(statements) > 1 else None
        query = buf[0] == 81
        if first.sets_route is not None and query and rest is None:
            self._set_route(first.sets_route, 1 + LENGTH_AT(buf, 1)[0])
            return True
        # One Query, one statement:
        single = query and rest is None and 1 + LENGTH_AT(buf, 1)[0] == len(buf)
        held = self._held_begin
        if held is None:
            read_only_txn = first.read_only_txn or (
                first.default_access and self._read_only_default
            )
            if single and first.begins and not read_only_txn and not self.statement_mode:
                self._hold_begin(statements[0])
                return True
        elif single and _PLAIN_END.match(statements[0]):
            self._end_held(statements[0])
            return True
        if first.writes_catalog or (rest and any(v.writes_catalog for v in rest)):
            router.catalog_changed()
            self._txn_ddl = True
        # Everything buffered goes to one server: all of it must be provably read-only.
        if held is None:
            read = first.read_only or (first.begins and read_only_txn)
        else:  # BEGIN; SET TRANSACTION READ ONLY
            read = first.read_only_txn and first.reason == "set"
        if rest and read:
            read = all(v.read_only for v in rest)
        if not read or first.hint is _PRIMARY or self.route_override is _PRIMARY:
            router.to_primary += 1
            if not read:  # a provably read-only transaction changes no session state
                self._touches_state(buf)
            if first.reason == "set" and (not rest or all(v.reason == "set" for v in rest)):
                self._txn_writes = False  # writes nothing: later reads need not wait for it
            return self.primary_pool
        self._txn_writes = False
        pool = router.read_pool(self.reader, self.user)
        if pool is None:
            return self.primary_pool
        if held is None and self.pending == 1 and not first.begins and _ends_at_sync(buf):
            # Kept for a retry on the primary if the replica refuses, or elsewhere if it dies.
            self._guard = bytes(buf)
            self._guard_sql = statements[0]
        return pool

    def _hold_begin(self, sql: str) -> None:
        """A lone BEGIN: answered here and sent with the transaction's first statement, which
        decides where it runs (SET TRANSACTION READ ONLY: a replica)."""
        end = len(self.buffer)
        self.buffer.clear()
        self._dropped(end)
        self.pending -= 1
        self._held_begin = sql
        self.transport.write(m.command_complete("BEGIN") + m.ready_for_query(b"T"))

    def _end_held(self, sql: str) -> None:
        """COMMIT or ROLLBACK of a transaction that never reached a server."""
        end = len(self.buffer)
        self.buffer.clear()
        self._dropped(end)
        self.pending -= 1
        self._held_begin = None
        word = sql.split(None, 1)[0].lower().rstrip(";")
        tag = "ROLLBACK" if word in ("rollback", "abort") else "COMMIT"
        self.transport.write(m.command_complete(tag) + m.READY_IDLE)

    def _set_route(self, value: Target | str, end: int) -> None:
        """SET pgrouter.route = primary | replica | auto, answered without a server."""
        del self.buffer[:end]
        self._dropped(end)
        self.pending -= 1
        status = b"I" if self._held_begin is None else b"T"
        if value in (Target.PRIMARY, Target.REPLICA, "auto"):
            # "replica" is the default behaviour: reads may use replicas, writes never do.
            self.route_override = value if value is Target.PRIMARY else None
            self.transport.write(m.command_complete("SET") + m.ready_for_query(status))
        else:
            message = f'invalid value for parameter "pgrouter.route": "{value}"'
            self.transport.write(e.error_response("22023", message) + m.ready_for_query(status))

    def server_assigned(self, server: ServerConnection, data: bytes | None = None) -> None:
        """The pool's answer: link, bring the server's settings in line, send the bytes
        (`data`, or the buffer kept while waiting)."""
        self.waiting = False
        if self.state is _CLOSED:
            assert self.pool is not None
            self.pool.release(server, used=False)
            return
        self.server = server
        self._server_transport = server.transport
        server.client = self
        hidden: list[str] = []
        if server.settings != self.settings:
            hidden.append(settings_sql(server.settings, self.settings))
            server.settings = dict(self.settings)
            self._canonical = True  # the server reports the canonical values itself
        elif not self._canonical:
            self._report_canonical(server)
        if self._held_begin is not None:  # its reply was already given; after the settings,
            hidden.append(self._held_begin)  # in a transaction of its own: they may change it
            self._held_begin = None
        if hidden:
            server.run_hidden(hidden, lambda errors, _rows: self._settings_applied(server, errors))
        if self.paused:
            server.pause_reading()
        if data is None:
            data = bytes(self.buffer)
            self.buffer.clear()
        if data:  # (a pinned client may have sent nothing yet)
            self._xact_start = self._query_start = monotonic_ns()
        if self.statements is not None:
            data = self.statements.feed(data, server)
        server.transport.write(data)  # type: ignore[union-attr]  # connected

    def _report_canonical(self, server: ServerConnection) -> None:
        """Once per client: correct what the welcome reported (the client's raw spelling,
        e.g. DateStyle 'SQL,DMY') to the server's canonical values, which drivers parse."""
        self._canonical = True
        names = {name.lower(): name for name in server.parameters}
        out = []
        for setting, told in self.settings.items():
            name = names.get(setting)
            if name is not None and told != server.parameters[name]:
                out.append(m.parameter_status(name, server.parameters[name]))
        if out:
            self.transport.write(b"".join(out))

    def cancel_waiting(self) -> None:
        """A cancel for a client still queued for a server: its query never started."""
        if self.waiting and self.state is State.READY and self.pool is not None:
            self.pool.cancel_wait(self._waiter)
            self.server_unavailable(e.QUERY_CANCELED, "canceling statement due to user request")

    def primary_changed(self, pool: Pool) -> None:
        """The database's writes go elsewhere now (a failover, or refused while two backends
        claim to be primary): later transactions use `pool`, and one queued for the old
        primary moves over."""
        old, self.primary_pool = self.primary_pool, pool
        if old is None or not self.waiting or self.pool is not old:
            return
        waiter = self._waiter
        if waiter is self and self.state is State.READY:
            old.cancel_wait(self)
            self._acquire(pool, None)
        elif isinstance(waiter, _FirstLogin):  # logging in while pgrouter finds the primary
            old.cancel_wait(waiter)
            self.waiting = False
            self._waiter = self
            self._welcome_from(pool)

    def reconfigured(self, database: Database, router: Router | None, primary: Pool) -> None:
        """A reload changed this client's database: its next transaction follows the new
        backends and routing options (its pool mode stays what it logged in with)."""
        if self.state not in (State.READY, State.WELCOME):
            return  # logging in (the login finishes with the new configuration) or closed
        self.database = database
        if not self.session_mode:
            old, self.router = self.router, router
            if router is not None and old is None:  # reads may leave the primary from now on
                self.reader = router.reader_for(self.user, self.peer_host)
        self.primary_changed(primary)

    def _settings_applied(self, server: ServerConnection, errors: list[dict[str, str]]) -> None:
        if not errors:
            return
        server.settings = {UNKNOWN_SETTINGS: ""}  # re-applied in full next time
        for fields in errors:
            text = f"pgrouter could not apply a session setting: {fields.get('M', '?')}"
            self.transport.write(e.notice_response(text, severity="WARNING"))

    def server_unavailable(self, sqlstate: str, message: str) -> None:
        """No server could be had: fail this transaction, keep the client. A read bound for
        a backend that cannot be reached goes elsewhere once instead: nothing was sent yet."""
        self.waiting = False
        if self.state is State.CLOSED:
            return
        pool = self.pool
        if (
            sqlstate in _LOST_SQLSTATES
            and self.buffer
            and pool is not None
            and pool is not self.primary_pool
            and self._may_retry()
        ):
            self._acquire(self._read_elsewhere(pool.key.host, pool.key.port), None)
            return
        self.buffer.clear()
        if self.statements is not None:
            self.statements.reset()
        self.proxy.count_error(sqlstate)
        out = [e.error_response(sqlstate, message)]
        out += [m.ready_for_query()] * max(self.pending, 0)
        self.pending = 0
        self.transport.write(b"".join(out))

    def server_ready(self, data: bytes, count: int) -> None:
        """Forward a chunk that ended `count` queries; release the server if the transaction
        is over."""
        if self.statements is not None:
            data = self.statements.replies(data, count)
        if self._guard is not None:
            self._guarded_reply(data, count)
        else:
            self._ready(data, count)

    def _ready(self, data: bytes, count: int) -> None:
        server: ServerConnection = self.server  # type: ignore[assignment]  # linked
        idle = server.scanner.status == _I
        if not idle and self.statement_mode:
            # Hold back the ReadyForQuery that would tell the client a transaction is open.
            self.transport.write(data[:-6] if data[-6] == 90 else data)
            self.fatal(
                e.FEATURE_NOT_SUPPORTED, "transaction blocks not allowed in statement pooling mode"
            )
            return
        self.transport.write(data)
        pool: Pool = self.pool  # type: ignore[assignment]  # set at login
        pool.query_count += count
        pool.bytes_sent += len(data)
        self.pending -= count
        if self.pending <= 0 and self._query_start:  # as PgBouncer: busy time, not per query
            now = monotonic_ns()
            pool.query_time_ns += now - self._query_start
            self._query_start = 0
            if idle and self._xact_start:
                pool.xact_time_ns += now - self._xact_start
                self._xact_start = 0
        if self.pending > 0 or not idle or self.session_mode or not self.scanner.at_boundary:
            return
        self.pending = 0
        if self.router is not None and self._txn_writes:
            self.reader.wrote_at = time.monotonic()  # reads now wait for this write's LSN
            if self._txn_ddl:
                self._txn_ddl = False
                self.router.catalog_changed()  # committed: read pg_proc again
        statements = self.statements
        if self._touched or (statements is not None and statements.touched):  # self.touched
            self._check_state(server)
        elif not self.pins:
            self._unlink()
            pool.release(server)

    # ---- session state ------------------------------------------------------------------------

    @property
    def _read_only_default(self) -> bool:
        """The session's transactions are READ ONLY unless they say otherwise (and not
        SERIALIZABLE, which a hot standby refuses)."""
        settings = self.settings
        return (
            settings.get("default_transaction_read_only", "").lower() in _TRUE_SETTINGS
            and settings.get("default_transaction_isolation", "").lower() != "serializable"
        )

    @property
    def touched(self) -> bool:
        """Something sent since the last check may have changed session state."""
        return self._touched or (self.statements is not None and self.statements.touched)

    def _track_statements(self, answered: int) -> ClientStatements:
        """The client prepared a named statement: rewrite its stream from that Parse on."""
        scanner = self.scanner
        in_flight = self.pending - answered + scanner.named_syncs
        limit = self.proxy.config.max_prepared_statements
        statements = ClientStatements(self.proxy.statements, limit, in_flight, self._custom)
        statements.skip = scanner.named_at if scanner.named_at >= 0 else scanner.named_end
        if self._server_transport is None:
            statements.skip += len(self.buffer)
        statements.touched = self._touched
        self._touched = False
        self.statements = statements
        return statements

    def _dropped(self, count: int) -> None:
        """`count` bytes left the head of the buffer without reaching a server."""
        if self.statements is not None:
            self.statements.skip = max(0, self.statements.skip - count)

    def _check_state(self, server: ServerConnection) -> None:
        """After a transaction that may have changed session state: read the server's
        settings and what would pin the client before anyone else gets the server. The
        client's next transaction waits in the buffer until then: it may need those settings,
        or that server."""
        self._touched = False
        if self.statements is not None:
            self.statements.touched = False
        pool = self.pool
        assert pool is not None
        self._unlink()
        self.checking = True
        server.run_hidden(
            state_sql(self.user, self._custom),
            lambda errors, rows: self._state_read(server, pool, errors, rows),
        )

    def _state_read(
        self,
        server: ServerConnection,
        pool: Pool,
        errors: list[dict[str, str]],
        rows: list[list[str | None]],
    ) -> None:
        self.checking = False
        if self.state is State.CLOSED:
            pool.discard(server)
            return
        if errors or not rows:
            message = errors[0].get("M", "") if errors else "no row"
            log.warning("session state check failed", server=repr(server), error=message)
            pool.discard(server)
            if self.buffer:
                self._begin()
            return
        row = rows[0]
        session: dict[str, str] = {k.lower(): v for k, v in json.loads(row[0] or "{}").items()}
        for name, value in json.loads(row[1] or "{}").items():
            if value is not None:
                session[name] = value
        server.settings = dict(session)
        wanted = session
        for name, value in self.startup_settings.items():
            wanted.setdefault(name, value)  # RESET returns to what the client connected with
        self.settings = wanted
        reconcile(server.prepared, json.loads(row[8] or "[]"))
        held = zip(PIN_REASONS, row[2:8], strict=True)
        pins = frozenset(reason for reason, value in held if value not in ("0", "f"))
        if pins != self.pins:
            self.proxy.repin(self.pins, pins)
            self.pins = pins
        if pins:
            self.server_assigned(server)  # back to it, with the settings RESET brought back
            return
        pool.release(server)
        if self.buffer:
            self._begin()

    def server_data(self, data: bytes) -> None:
        """Forward a chunk from the server that ends no query (rows of a large result)."""
        if self.statements is not None:
            data = self.statements.replies(data, 0)
        if self._guard is not None:
            self._guarded_reply(data, 0)
            return
        self.transport.write(data)
        self.pool.bytes_sent += len(data)  # type: ignore[union-attr]  # set at login

    def _guarded_reply(self, data: bytes, count: int) -> None:
        """A replica's reply to an autocommit read, held until it is clearly not a refusal
        (25006 read-only, 40001 recovery conflict): a refusal is retried on the primary
        before the client has seen anything. A shutdown FATAL is held until the connection
        closes (see server_lost)."""
        if not self._guard_retry:
            out = self._guard_out
            if not out and (
                # BindComplete: not stale (a replica's read is held on: it may still die)
                (data[0] == 50 and self._guard_stale is not None and not self._guard_sql)
                or _refusal(data) == ""  # the usual case: results from the start
            ):
                self._guard = None
                self._unguarded(data, count)
                return
            out += data
            refusal = _refusal(out)
            if refusal == STALE_PLAN and self._guard_stale is None:
                refusal = ""  # no new row description asked for: the client must hear of it
            if refusal is None and not count and len(out) < GUARD_LIMIT:
                return  # undecided: keep holding
            if refusal in _SHUTDOWN_SQLSTATES:
                return  # the server is going away: losing its connection retries the read
            if not refusal or self.pending > max(count, 1):
                self._guard = None
                held = bytes(out)
                out.clear()
                self._unguarded(held, count)
                return
            self._guard_retry = True
            if refusal == STALE_PLAN:
                assert self.statements is not None and self._guard_stale is not None
                self.statements.renew(self._guard_stale)
            else:  # the statement is fine, the replica was not: the primary runs it
                assert self.router is not None
                self._guard_stale = None
                self.router.misrouted(self._guard_sql, refusal)
        if not count:
            return  # the rest of the refused reply is still coming
        query = self._guard
        assert query is not None
        self._guard = None
        self._guard_retry = False
        self._guard_out.clear()
        self.pending -= count
        server, pool = self.server, self.pool
        assert server is not None and pool is not None and self.primary_pool is not None
        self._unlink()
        pool.release(server)
        self.pending += 1  # the same query, once more
        if self._guard_stale is not None:  # prepared afresh, on any server of the same pool
            self._guard_stale = None
            self._acquire(pool, query)
            return
        self._txn_writes = True  # on the primary
        self._acquire(self.primary_pool, query)

    def _unguarded(self, data: bytes, count: int) -> None:
        self._guard_stale = None
        if count:
            self._ready(data, count)
        else:
            self.transport.write(data)
            self.pool.bytes_sent += len(data)  # type: ignore[union-attr]  # set at login

    def _unlink(self) -> None:
        server = self.server
        assert server is not None
        self.server = None
        self._server_transport = None
        server.unlink()

    def _may_retry(self) -> bool:
        """A transaction the router proved read-only, not moved yet: once more elsewhere."""
        if self._retried or self._txn_writes or self.router is None:
            return False
        if self.state is not State.READY:
            return False
        self._retried = True
        return True

    def _read_elsewhere(self, host: str, port: int) -> Pool:
        """Where a read goes when the backend at host:port failed it: the replica the router
        picks now (a down backend is skipped), or the primary."""
        router = self.router
        assert router is not None and self.database is not None and self.primary_pool is not None
        router.lost_retries += 1
        pool = router.read_pool(self.reader, self.user)
        if pool is None or (pool.key.host, pool.key.port) == (host, port):
            return self.primary_pool
        return pool

    def server_lost(self, server: ServerConnection, reason: str) -> None:
        """The server died under this client. An autocommit read whose reply the client has
        not seen (still guarded) runs once more elsewhere; otherwise the client gets FATAL
        08006 and is disconnected (its transaction's fate is unknown)."""
        if self.server is server:
            self._unlink()
            query = self._guard
            if (
                query is not None
                and self.pending == 1
                and self.scanner.at_boundary
                and self._may_retry()
            ):
                self._guard_out.clear()
                refused, self._guard_retry = self._guard_retry, False
                if self.statements is not None:
                    self.statements.reset()  # the lost server's replies will never come
                if refused:  # a replica refused it already: the primary answers
                    target = self.primary_pool
                else:
                    target = self._read_elsewhere(server.host, server.port)
                assert target is not None
                self._acquire(target, query)
                return
            self.pending = 0
        log.warning("server connection lost", client=self.peer, server=repr(server), reason=reason)
        self.fatal(
            e.CONNECTION_FAILURE,
            "server connection lost: the transaction was not completed",
            detail=reason,
        )


class _FirstLogin:
    """Waits for a pool's first server login so its welcome parameters are known."""

    __slots__ = ("session",)

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    def server_assigned(self, server: ServerConnection) -> None:
        session = self.session
        session.waiting = False
        session._waiter = session
        assert session.pool is not None
        session.pool.release(server, used=False)
        if session.state is State.WELCOME:
            session._welcome()

    def server_unavailable(self, sqlstate: str, message: str) -> None:
        self.session.waiting = False
        self.session._waiter = self.session
        self.session.fatal(sqlstate, message)


def new_cancel_key() -> tuple[int, int]:
    """A random (pid, secret) pair from one urandom call; the pid's sign bit stays clear, as
    some tools expect."""
    raw = int.from_bytes(secrets.token_bytes(8))
    return (raw >> 33) or 1, raw & 0xFFFFFFFF
