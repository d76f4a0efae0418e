"""The admin console's query engine: SHOW commands and PAUSE/RESUME/RELOAD/SHUTDOWN.

Sans-IO: `AdminConsole.execute` takes the text of one simple Query and returns the complete
backend response (row sets, CommandComplete, ErrorResponse, ReadyForQuery). Everything is
read from the proxy's plain counters and lists at the moment a command runs; nothing here
is called from the data path.

The SHOW commands answer with PgBouncer's column names and order, so the tools written for
PgBouncer (psql habits, pgbouncer_exporter, scripts) work against pgrouter. Where pgrouter
has no such concept the column holds 0, an empty string or NULL. Differences that matter:

- SHOW POOLS has one row per (database, user), summed over the backends (primary and
  replicas) that pgrouter pools separately; `SHOW SERVERS`, `SHOW BACKENDS` and the metrics
  have the per-backend detail.
- The `avg_*` columns are averages since the proxy started, not over PgBouncer's 60 s
  stats_period. Times are PgBouncer's: a transaction from the server being linked to it (or,
  on a server the client keeps, from its first message) to ReadyForQuery 'I'; a query from
  forwarding to the ReadyForQuery that leaves nothing outstanding, so pipelined queries count
  the time the server was busy, not each query's own.
- Several commands may be sent in one Query, separated by ';' (PgBouncer takes one).
- SHOW STATS and SHOW DATABASES end with a few extra columns under the names of older
  PgBouncer releases (`total_requests`, `reserve_pool`, ...) for the pgbouncer_exporter
  releases that still read them; clients that read columns by position are unaffected.

The module also holds the snapshot helpers (`pool_states`, `database_totals`, ...) that the
Prometheus collector (`router.metrics`) reads, so both report the same numbers.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from pools.monitor import format_lsn
from protocol import errors as e
from protocol import messages as m
from router import __version__
from router.config import ADMIN_DATABASES, Admin, Config, LogConfig, format_address

if TYPE_CHECKING:
    from pools.pool import Pool
    from router.proxy import Proxy

log = structlog.get_logger("pgrouter.admin")

VERSION = f"pgrouter {__version__}"
EMPTY_QUERY_RESPONSE = m.message(b"I")

# ---- column lists (PgBouncer's names and order) ------------------------------------------------

POOLS_COLUMNS = (
    "database", "user",
    "cl_active", "cl_waiting", "cl_active_cancel_req", "cl_waiting_cancel_req",
    "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle", "sv_used", "sv_tested",
    "sv_login",
    "maxwait", "maxwait_us", "pool_mode", "load_balance_hosts",
)  # fmt: skip
_STAT_NAMES = (
    "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
    "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count",
    "bind_count", "client_login_count",
)  # fmt: skip
# Appended after PgBouncer's current columns: the names PgBouncer used before 1.8, which older
# pgbouncer_exporter releases (Debian's prometheus-pgbouncer-exporter 1.7) read by name.
# SHOW STATS: total_requests = total_query_count, avg_req = avg_query_count,
# avg_query = avg_query_time. SHOW DATABASES: reserve_pool = reserve_pool_size.
STATS_LEGACY_COLUMNS = ("total_requests", "avg_req", "avg_query")
DATABASES_LEGACY_COLUMNS = ("reserve_pool",)
STATS_COLUMNS = (
    "database",
    "total_server_assignment_count", "total_xact_count", "total_query_count",
    "total_received", "total_sent", "total_xact_time", "total_query_time", "total_wait_time",
    "total_client_parse_count", "total_server_parse_count", "total_bind_count",
    "total_client_login_count",
    "avg_server_assignment_count", "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent",
    "avg_xact_time", "avg_query_time", "avg_wait_time", "avg_client_parse_count",
    "avg_server_parse_count", "avg_bind_count", "avg_client_login_count",
    *STATS_LEGACY_COLUMNS,
)  # fmt: skip
STATS_TOTALS_COLUMNS = ("database", *_STAT_NAMES)
STATS_AVERAGES_COLUMNS = ("database", *_STAT_NAMES)
SOCKET_COLUMNS = (
    "type", "user", "database", "replication", "state", "addr", "port",
    "local_addr", "local_port", "connect_time", "request_time", "wait", "wait_us",
    "close_needed", "ptr", "link", "remote_pid", "tls", "application_name",
    "prepared_statements", "id",
)  # fmt: skip
DATABASES_COLUMNS = (
    "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
    "reserve_pool_size", "server_lifetime", "pool_mode", "load_balance_hosts",
    "max_connections", "current_connections", "max_client_connections",
    "current_client_connections", "paused", "disabled",
    *DATABASES_LEGACY_COLUMNS,
)  # fmt: skip
USERS_COLUMNS = (
    "name", "pool_size", "reserve_pool_size", "pool_mode", "max_user_connections",
    "current_connections", "max_user_client_connections", "current_client_connections",
)  # fmt: skip
LISTS_ROWS = (
    "databases", "users", "pools", "free_clients", "used_clients", "login_clients",
    "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries", "dns_pending",
)  # fmt: skip
CONFIG_COLUMNS = ("key", "value", "default", "changeable")
ROUTES_COLUMNS = ("database", "target", "reason", "transactions")
PINS_COLUMNS = ("reason", "pinned", "total")
BACKENDS_COLUMNS = (
    "database", "host", "port", "role", "state", "byte_lag", "time_lag", "replay_lsn",
    "last_check",
)  # fmt: skip

HELP_TEXT = (
    "\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION"
    "\n\tSHOW LISTS|BACKENDS|ROUTES|PINS"
    "\n\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS"
    "\n\tRELOAD"
    "\n\tPAUSE [<db>]"
    "\n\tRESUME [<db>]"
    "\n\tSHUTDOWN"
)

# Session parameters some clients query or set; answered without touching anything.
_FAKE_PARAMETERS = {
    "client_encoding": "UTF8",
    "default_transaction_isolation": "read committed",
    "standard_conforming_strings": "on",
    "datestyle": "ISO, MDY",
    "timezone": "UTC",
}

# ---- parsing -------------------------------------------------------------------------------

_WORD = r'"(?:[^"]|"")+"|[^\s";]+'
_COMMAND = re.compile(rf"\s*([A-Za-z_]+)(?:\s+({_WORD}))?\s*", re.S)
_SET = re.compile(r"\s*set\s+(\w+)\s*(?:=|\s+to\s+)\s*(.+?)\s*", re.S | re.I)


def split_statements(sql: str) -> list[str]:
    """The ';'-separated statements of a query, quotes respected, empty ones dropped."""
    parts: list[str] = []
    start = 0
    quote = ""
    for i, ch in enumerate(sql):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            parts.append(sql[start:i])
            start = i + 1
    parts.append(sql[start:])
    return [p.strip() for p in parts if p.strip()]


def _unquote(word: str) -> str:
    if len(word) >= 2 and word[0] == word[-1] == '"':
        return word[1:-1].replace('""', '"')
    return word


class AdminError(Exception):
    """A command failed: answered with an ErrorResponse, the rest of the query skipped."""

    def __init__(self, sqlstate: str, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail


class _SyntaxError(Exception):
    """The statement is not a command we know (worded by `AdminConsole._run`)."""


# ---- snapshots of the proxy's state (shared with router.metrics) ---------------------------------


@dataclass(slots=True)
class PoolCounts:
    """Client and server counts of one pool, or summed over several."""

    cl_active: int = 0  # logged-in clients not waiting for a server
    cl_waiting: int = 0
    sv_active: int = 0  # servers linked to a client
    sv_tested: int = 0  # taken from the pool but not linked (running a reset query)
    sv_idle: int = 0
    sv_login: int = 0  # connections being opened
    maxwait: float = 0.0  # seconds the oldest waiting client has waited

    @property
    def servers(self) -> int:
        return self.sv_active + self.sv_tested + self.sv_idle + self.sv_login

    def add(self, other: PoolCounts) -> None:
        self.cl_active += other.cl_active
        self.cl_waiting += other.cl_waiting
        self.sv_active += other.sv_active
        self.sv_tested += other.sv_tested
        self.sv_idle += other.sv_idle
        self.sv_login += other.sv_login
        self.maxwait = max(self.maxwait, other.maxwait)


@dataclass(slots=True, kw_only=True)
class PoolState(PoolCounts):
    """One pool's counts at one instant."""

    pool: Pool


def _state_name(client: Any) -> str:
    state = getattr(client, "state", None)
    return getattr(state, "name", "")


def pool_states(proxy: Proxy, now: float | None = None) -> list[PoolState]:
    """Every pool (in creation order) with its client and server counts."""
    now = time.monotonic() if now is None else now
    states: dict[int, PoolState] = {}
    for pool in proxy.pools.values():
        st = PoolState(pool=pool)
        for server in pool.active:
            if server.client is None:
                st.sv_tested += 1
            else:
                st.sv_active += 1
        st.sv_idle = len(pool.idle)
        st.sv_login = pool.connecting
        if pool.waiters:
            start = pool._wait_start.get(pool.waiters[0])
            if start is not None:
                st.maxwait = max(0.0, now - start)
        states[id(pool)] = st
    for client in proxy.clients:
        if client.pool is None or _state_name(client) == "CLOSED":
            continue
        counts = states.get(id(client.pool))
        if counts is None:
            continue
        if client.waiting:
            counts.cl_waiting += 1
        else:
            counts.cl_active += 1
    return list(states.values())


def pool_groups(states: Iterable[PoolState]) -> dict[tuple[str, str], PoolCounts]:
    """Counts per (database, user), summed over backends, as SHOW POOLS reports them.

    Closed pools that hold no server any more are left out.
    """
    groups: dict[tuple[str, str], PoolCounts] = {}
    for st in states:
        pool = st.pool
        if pool.closed and not st.servers:
            continue
        key = (pool.key.database, pool.key.user)
        group = groups.get(key)
        if group is None:
            group = groups[key] = PoolCounts()
        group.add(st)
    return groups


@dataclass(slots=True)
class Totals:
    """Counters of the pools of one database, summed (wait_time in seconds, *_ns in ns)."""

    server_assignment_count: int = 0
    xact_count: int = 0
    query_count: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    wait_time: float = 0.0
    wait_count: int = 0
    login_count: int = 0
    xact_time_ns: int = 0
    query_time_ns: int = 0

    def add(self, pool: Pool) -> None:
        self.server_assignment_count += pool.assignment_count
        self.xact_count += pool.xact_count
        self.query_count += pool.query_count
        self.bytes_received += pool.bytes_received
        self.bytes_sent += pool.bytes_sent
        self.wait_time += pool.wait_time
        self.wait_count += pool.wait_count
        self.login_count += pool.login_count
        self.xact_time_ns += pool.xact_time_ns
        self.query_time_ns += pool.query_time_ns

    @property
    def xact_time(self) -> float:
        """Seconds, as the exporter's metrics want them."""
        return self.xact_time_ns / 1e9

    @property
    def query_time(self) -> float:
        return self.query_time_ns / 1e9


def database_names(proxy: Proxy) -> list[str]:
    """Configured databases in file order, then any that only old pools still name."""
    names = list(proxy.config.databases)
    seen = set(names)
    for key in proxy.pools:
        if key.database not in seen:
            seen.add(key.database)
            names.append(key.database)
    return names


def database_totals(proxy: Proxy) -> dict[str, Totals]:
    """Per-database sums over all pools (every backend and user) of that database."""
    totals = {name: Totals() for name in database_names(proxy)}
    for key, pool in proxy.pools.items():
        totals[key.database].add(pool)
    return totals


def is_paused(proxy: Proxy, database: str) -> bool:
    """PAUSE holds the database (by name or as part of PAUSE for all)."""
    paused = getattr(proxy, "paused", None)
    if isinstance(paused, set | frozenset):
        return "*" in paused or database in paused
    pools = [p for k, p in proxy.pools.items() if k.database == database and not p.closed]
    return bool(pools) and all(p.paused for p in pools)


def pool_mode(config: Config, database: str) -> str:
    db = config.databases.get(database)
    return db.pool_mode if db is not None else config.pool_mode


def _wall(monotonic: float, now_mono: float, now_wall: float) -> str:
    """A monotonic timestamp as PgBouncer prints times: ``2024-05-01 12:00:00 UTC``."""
    when = now_wall - (now_mono - monotonic)
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def _split_peer(peer: str) -> tuple[str, str | None]:
    host, sep, port = peer.rpartition(":")
    if not sep or not port.isdigit():
        return peer, None
    return host.strip("[]"), port


def _peer(client: Any) -> str:
    try:
        return str(client.peer)
    except Exception:  # no transport (yet)
        return ""


def _tls(obj: Any) -> str:
    """PgBouncer's tls column: protocol/cipher of an encrypted connection, else empty."""
    transport = getattr(obj, "transport", None)
    try:
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    except Exception:  # a closed transport may refuse
        return ""
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()}/{cipher[0]}" if cipher else str(ssl_object.version() or "")


def _sockname(obj: Any) -> tuple[str | None, str | None]:
    transport = getattr(obj, "transport", None)
    if transport is None:
        return None, None
    try:
        name = transport.get_extra_info("sockname")
    except Exception:  # a closed transport may refuse
        return None, None
    if isinstance(name, tuple) and len(name) >= 2:
        return str(name[0]), str(name[1])
    return (str(name), None) if name else (None, None)


def _ptr(obj: object) -> str:
    return f"0x{id(obj):x}"


def _us(seconds: float) -> int:
    return int(seconds * 1_000_000)


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _rows(columns: Iterable[str], rows: Iterable[Iterable[object]]) -> bytes:
    """RowDescription, DataRows and CommandComplete SHOW for text columns."""
    out = [m.row_description(list(columns))]
    out += [m.data_row([_text(v) for v in row]) for row in rows]
    out.append(m.command_complete("SHOW"))
    return b"".join(out)


def _notice(message: str, detail: str = "") -> bytes:
    """A NoticeResponse, with a DETAIL field when given (SHOW HELP puts its text there)."""
    fields = [b"SNOTICE\0VNOTICE\0C00000\0M", message.encode(), b"\0"]
    if detail:
        fields += [b"D", detail.encode(), b"\0"]
    return m.message(b"N", b"".join([*fields, b"\0"]))


# ---- the console -------------------------------------------------------------------------------


class AdminConsole:
    """Answers admin console queries for one proxy (one instance per admin session is fine)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.pausing: str | None = None  # set by PAUSE: the database ("*": all) to wait for
        self.deferred: asyncio.Future[bytes] | None = None  # an answer still being gathered
        self._commands: dict[str, Callable[[str], bytes]] = {
            "show": self._show,
            "select": self._show,  # PgBouncer treats SELECT like SHOW
            "pause": self._pause,
            "resume": self._resume,
            "reload": self._reload,
            "shutdown": self._shutdown,
        }
        self._shows: dict[str, Callable[[], bytes]] = {
            "pools": self.show_pools,
            "stats": self.show_stats,
            "stats_totals": self.show_stats_totals,
            "stats_averages": self.show_stats_averages,
            "totals": self.show_totals,
            "clients": self.show_clients,
            "servers": self.show_servers,
            "databases": self.show_databases,
            "users": self.show_users,
            "lists": self.show_lists,
            "config": self.show_config,
            "version": self.show_version,
            "help": self.show_help,
            "backends": self.show_backends,
            "routes": self.show_routes,
            "pins": self.show_pins,
        }

    def execute(self, sql: str) -> bytes:
        """The complete response to one simple Query, ending with ReadyForQuery 'I'."""
        statements = split_statements(sql)
        out: list[bytes] = [] if statements else [EMPTY_QUERY_RESPONSE]
        for statement in statements:
            try:
                out.append(self._run(statement))
            except AdminError as exc:
                out.append(e.error_response(exc.sqlstate, exc.message, detail=exc.detail))
                break
            except Exception as exc:  # a bug here must not end the admin session
                log.exception("admin command failed", command=statement)
                out.append(e.error_response(e.INTERNAL_ERROR, f"internal error: {exc}"))
                break
        out.append(m.ready_for_query())
        return b"".join(out)

    def _run(self, statement: str) -> bytes:
        try:
            match = _SET.fullmatch(statement)
            if match is not None:
                return self._set(match.group(1), match.group(2))
            match = _COMMAND.fullmatch(statement)
            if match is None:
                raise _SyntaxError
            handler = self._commands.get(match.group(1).lower())
            if handler is None:
                raise _SyntaxError
            return handler(_unquote(match.group(2) or ""))
        except _SyntaxError:
            raise AdminError(
                e.SYNTAX_ERROR, f"invalid command '{statement}', use SHOW HELP;"
            ) from None

    # ---- commands --------------------------------------------------------------------------

    def _show(self, arg: str) -> bytes:
        name = arg.lower()
        show = self._shows.get(name)
        if show is not None:
            return show()
        if name in _FAKE_PARAMETERS:
            return _rows([name], [[_FAKE_PARAMETERS[name]]])
        raise _SyntaxError

    def _set(self, key: str, value: str) -> bytes:
        if key.lower() in _FAKE_PARAMETERS:
            return _notice("SET ignored") + m.command_complete("SET")
        raise AdminError(
            e.FEATURE_NOT_SUPPORTED,
            f"SET {key} is not supported by the admin console",
            detail="Change the configuration file and run RELOAD.",
        )

    def _proxy_method(self, name: str, command: str) -> Callable[..., Any]:
        method = getattr(self.proxy, name, None)
        if not callable(method):
            raise AdminError(e.FEATURE_NOT_SUPPORTED, f"{command} is not supported yet")
        return method

    def _database_arg(self, arg: str, verb: str) -> str | None:
        if not arg:
            return None
        if arg in ADMIN_DATABASES:
            raise AdminError(e.FEATURE_NOT_SUPPORTED, f"cannot {verb} admin db: {arg}")
        if arg not in self.proxy.config.databases:
            raise AdminError(e.INVALID_CATALOG_NAME, f"no such database: {arg}")
        return arg

    def _paused_set(self) -> set[str] | frozenset[str] | None:
        paused = getattr(self.proxy, "paused", None)
        return paused if isinstance(paused, set | frozenset) else None

    def _pause(self, arg: str) -> bytes:
        pause = self._proxy_method("pause", "PAUSE")
        database = self._database_arg(arg, "pause")
        paused = self._paused_set()
        if paused is not None and "*" in paused:
            raise AdminError(_NOT_IN_STATE, "already suspended/paused")
        self._call(pause, database)
        self.pausing = database or "*"  # the reply waits until running transactions end
        return m.command_complete("PAUSE")

    def _resume(self, arg: str) -> bytes:
        resume = self._proxy_method("resume", "RESUME")
        database = self._database_arg(arg, "resume")
        paused = self._paused_set()
        if paused is not None:
            if database is None and not paused:
                raise AdminError(_NOT_IN_STATE, "pooler is not paused/suspended")
            if database is not None and database not in paused:
                raise AdminError(_NOT_IN_STATE, f"database {database} is not paused")
        self._call(resume, database)
        return m.command_complete("RESUME")

    def _reload(self, arg: str) -> bytes:
        if arg:
            raise _SyntaxError
        reload = self._proxy_method("reload_from_file", "RELOAD")
        errors = list(self._call(reload) or ())
        if errors:
            raise AdminError(
                _CONFIG_FILE_ERROR,
                f"RELOAD failed: {errors[0]}",
                detail="\n".join(str(x) for x in errors) if len(errors) > 1 else None,
            )
        return m.command_complete("RELOAD")

    def _shutdown(self, arg: str) -> bytes:
        if arg.upper() in ("WAIT_FOR_SERVERS", "WAIT_FOR_CLIENTS"):
            raise AdminError(e.FEATURE_NOT_SUPPORTED, f"SHUTDOWN {arg.upper()} is not supported")
        if arg:
            raise _SyntaxError
        shutdown = self._proxy_method("request_shutdown", "SHUTDOWN")
        self._call(shutdown)
        return m.command_complete("SHUTDOWN")

    @staticmethod
    def _call(method: Callable[..., Any], *args: Any) -> Any:
        """Run a proxy command; its refusals (ValueError, ...) become ErrorResponses."""
        try:
            return method(*args)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise AdminError(_NOT_IN_STATE, str(exc) or type(exc).__name__) from None

    # ---- SHOW ------------------------------------------------------------------------------

    def show_pools(self) -> bytes:
        """One row per (database, user), summed over the backends pooled for it."""
        config = self.proxy.config
        rows = []
        for (database, user), g in pool_groups(pool_states(self.proxy)).items():
            wait_us = _us(g.maxwait)
            rows.append(
                [database, user, g.cl_active, g.cl_waiting, 0, 0, g.sv_active, 0, 0, g.sv_idle,
                 0, g.sv_tested, g.sv_login, wait_us // 1_000_000, wait_us % 1_000_000,
                 pool_mode(config, database), None]
            )  # fmt: skip
        return _rows(POOLS_COLUMNS, rows)

    def _uptime(self) -> float:
        return max(1.0, time.time() - self.proxy.started)

    @staticmethod
    def _totals_row(t: Totals) -> list[int]:
        return [
            t.server_assignment_count, t.xact_count, t.query_count, t.bytes_received,
            t.bytes_sent, t.xact_time_ns // 1000, t.query_time_ns // 1000, _us(t.wait_time),
            0, 0, 0, t.login_count,
        ]  # fmt: skip

    def _averages_row(self, t: Totals, uptime: float) -> list[int]:
        def rate(count: float) -> int:
            return int(count / uptime)

        def per(ns: int, count: int) -> int:
            return ns // 1000 // count if count else 0

        wait = _us(t.wait_time) // t.server_assignment_count if t.server_assignment_count else 0
        return [
            rate(t.server_assignment_count), rate(t.xact_count), rate(t.query_count),
            rate(t.bytes_received), rate(t.bytes_sent), per(t.xact_time_ns, t.xact_count),
            per(t.query_time_ns, t.query_count), wait, 0, 0, 0, rate(t.login_count),
        ]  # fmt: skip

    def show_stats(self) -> bytes:
        uptime = self._uptime()
        rows = []
        for name, t in database_totals(self.proxy).items():
            totals, averages = self._totals_row(t), self._averages_row(t, uptime)
            # the legacy columns: total_query_count, avg_query_count, avg_query_time
            rows.append([name, *totals, *averages, totals[2], averages[2], averages[6]])
        return _rows(STATS_COLUMNS, rows)

    def show_stats_totals(self) -> bytes:
        rows = [[name, *self._totals_row(t)] for name, t in database_totals(self.proxy).items()]
        return _rows(STATS_TOTALS_COLUMNS, rows)

    def show_stats_averages(self) -> bytes:
        uptime = self._uptime()
        rows = [
            [name, *self._averages_row(t, uptime)]
            for name, t in database_totals(self.proxy).items()
        ]
        return _rows(STATS_AVERAGES_COLUMNS, rows)

    def show_totals(self) -> bytes:
        """SHOW STATS summed over all databases, one (name, value) row per column."""
        total = Totals()
        for pool in self.proxy.pools.values():
            total.add(pool)
        values = [*self._totals_row(total), *self._averages_row(total, self._uptime())]
        names = STATS_COLUMNS[1 : -len(STATS_LEGACY_COLUMNS)]
        return _rows(("name", "value"), zip(names, values, strict=True))

    def show_clients(self) -> bytes:
        now_mono, now_wall = time.monotonic(), time.time()
        clients = sorted(self.proxy.clients, key=lambda c: getattr(c, "connected_at", 0.0))
        rows = []
        for client in clients:
            state = _state_name(client)
            if state == "CLOSED":
                continue
            pool = client.pool
            server = client.server
            if state == "ADMIN":
                shown, database = "active", ADMIN_DATABASES[0]
            else:
                database = client.database.name if client.database is not None else "(nodb)"
                if client.waiting:
                    shown = "waiting"
                elif state in ("STARTUP", "AUTH", "WELCOME"):
                    shown = "login"
                else:
                    shown = "active" if server is not None else "idle"
            wait = 0.0
            if client.waiting and pool is not None:
                start = pool._wait_start.get(client)
                if start is not None:
                    wait = max(0.0, now_mono - start)
            wait_us = _us(wait)
            addr, port = _split_peer(_peer(client))
            local_addr, local_port = _sockname(client)
            connected = _wall(client.connected_at, now_mono, now_wall)
            settings = getattr(client, "settings", None) or {}
            rows.append(
                ["C", client.user or "(nouser)", database, "none", shown, addr, port,
                 local_addr, local_port, connected, connected,
                 wait_us // 1_000_000, wait_us % 1_000_000, 0, _ptr(client),
                 _ptr(server) if server is not None else "", 0, _tls(client),
                 settings.get("application_name", ""), 0, id(client)]
            )  # fmt: skip
        return _rows(SOCKET_COLUMNS, rows)

    def show_servers(self) -> bytes:
        now_mono, now_wall = time.monotonic(), time.time()
        rows = []
        for pool in self.proxy.pools.values():
            key = pool.key
            linked = [(s, "active" if s.client is not None else "tested") for s in pool.active]
            for server, state in [*linked, *((s, "idle") for s in pool.idle)]:
                local_addr, local_port = _sockname(server)
                client = server.client
                rows.append(
                    ["S", key.user, key.database, "none", state, server.host, server.port,
                     local_addr, local_port, _wall(server.created, now_mono, now_wall),
                     _wall(server.last_used, now_mono, now_wall), 0, 0,
                     1 if getattr(server, "retired", False) else 0, _ptr(server),
                     _ptr(client) if client is not None else "", server.backend_key[0],
                     _tls(server),
                     server.parameters.get("application_name", ""), 0, id(server)]
                )  # fmt: skip
        return _rows(SOCKET_COLUMNS, rows)

    def show_databases(self) -> bytes:
        proxy = self.proxy
        config = proxy.config
        servers: dict[str, int] = {}
        for key, pool in proxy.pools.items():
            if not pool.closed:
                servers[key.database] = servers.get(key.database, 0) + pool.size
        clients: dict[str, int] = {}
        for client in proxy.clients:
            if client.database is not None and _state_name(client) != "CLOSED":
                name = client.database.name
                clients[name] = clients.get(name, 0) + 1
        rows = []
        for name, db in config.databases.items():
            rows.append(
                [name, db.primary.host, db.primary.port, db.dbname, None, db.pool_size,
                 db.min_pool_size, 0, int(config.server_lifetime), db.pool_mode, None, 0,
                 servers.get(name, 0), db.max_db_client_connections, clients.get(name, 0),
                 is_paused(proxy, name), 0, 0]  # the last: reserve_pool (= reserve_pool_size)
            )  # fmt: skip
        return _rows(DATABASES_COLUMNS, rows)

    def show_users(self) -> bytes:
        proxy = self.proxy
        config = proxy.config
        names = list(config.users)
        names += [u for u in config.admin.users if u not in config.users]
        servers: dict[str, int] = {}
        for key, pool in proxy.pools.items():
            if not pool.closed:
                servers[key.user] = servers.get(key.user, 0) + pool.size
        clients: dict[str, int] = {}
        for client in proxy.clients:
            if client.user and _state_name(client) not in ("CLOSED", "STARTUP", "AUTH"):
                clients[client.user] = clients.get(client.user, 0) + 1
        rows = [
            [name, "", "", None, 0, servers.get(name, 0), config.user_client_limit(name)[0],
             clients.get(name, 0)]
            for name in names
        ]  # fmt: skip
        return _rows(USERS_COLUMNS, rows)

    def show_lists(self) -> bytes:
        proxy = self.proxy
        config = proxy.config
        users = set(config.users) | set(config.admin.users)
        clients = [c for c in proxy.clients if _state_name(c) != "CLOSED"]
        logging_in = sum(1 for c in clients if _state_name(c) in ("STARTUP", "AUTH", "WELCOME"))
        servers = sum(len(p.idle) + len(p.active) for p in proxy.pools.values())
        pools = sum(1 for p in proxy.pools.values() if not p.closed)
        values = [len(config.databases), len(users), pools, 0, len(clients), logging_in, 0,
                  servers, 0, 0, 0, 0]  # fmt: skip
        return _rows(("list", "items"), zip(LISTS_ROWS, values, strict=True))

    def show_config(self) -> bytes:
        return _rows(CONFIG_COLUMNS, config_rows(self.proxy.config))

    def show_version(self) -> bytes:
        return _rows(("version",), [[VERSION]])

    def show_help(self) -> bytes:
        return _notice("Console usage", HELP_TEXT) + m.command_complete("SHOW")

    def show_routes(self) -> bytes:
        """Transactions of each routed database by target and reason (since start)."""
        rows = []
        for name, router in self.proxy.routers.items():
            held = router.no_replica + router.ryw_fallbacks + router.catalog_waits
            counts = [
                ("replica", "read_only", router.to_replica),
                ("primary", "write_or_unproven", router.to_primary - held),
                ("primary", "no_replica_qualified", router.no_replica),
                ("primary", "read_your_writes", router.ryw_fallbacks),
                ("primary", "functions_not_yet_known", router.catalog_waits),
                ("primary", "replica_refused_retried", router.misroutes),
                ("any", "server_lost_retried", router.lost_retries),
            ]
            rows += [[name, target, reason, count] for target, reason, count in counts]
        return _rows(ROUTES_COLUMNS, rows)

    def show_pins(self) -> bytes:
        """Clients kept on their server by session state, by reason: now and since start."""
        proxy = self.proxy
        rows = [[reason, proxy.pinned[reason], proxy.pins_total[reason]] for reason in proxy.pinned]
        return _rows(PINS_COLUMNS, rows)

    def show_backends(self) -> bytes:
        """Every backend of every database: role and state as its monitor last saw them
        (the topology's role until then), byte and time lag behind the database's current
        primary, LSN."""
        proxy = self.proxy
        rows = []
        for name, db in proxy.config.databases.items():
            current = proxy.primary_endpoint(db)
            primary = proxy.monitors.get((current.host, current.port))
            for endpoint in db.backends:
                monitor = proxy.monitors.get((endpoint.host, endpoint.port))
                if monitor is None or monitor.up is None:
                    pools = [
                        p
                        for k, p in proxy.pools.items()
                        if k.database == name
                        and (k.host, k.port) == (endpoint.host, endpoint.port)
                        and not p.closed
                    ]
                    down = pools and all(pool_unreachable(p) for p in pools)
                    role = "primary" if endpoint == current else "replica"
                    rows.append(
                        [name, endpoint.host, endpoint.port, role, "down" if down else "unknown",
                         None, None, None, None]
                    )  # fmt: skip
                    continue
                lag = time_lag = None
                if monitor.in_recovery and monitor.lsn is not None and primary and primary.lsn:
                    lag = max(primary.lsn - monitor.lsn, 0)
                if monitor.in_recovery:
                    time_lag = f"{monitor.time_lag:.3f}"
                checked = (
                    datetime.fromtimestamp(monitor.checked_at, UTC).isoformat(timespec="seconds")
                    if monitor.checked_at
                    else None
                )
                rows.append(
                    [name, endpoint.host, endpoint.port, monitor.role or "unknown",
                     "up" if monitor.up else "down", lag, time_lag,
                     format_lsn(monitor.lsn) if monitor.lsn is not None else None, checked]
                )  # fmt: skip
        return _rows(BACKENDS_COLUMNS, rows)


_NOT_IN_STATE = "55000"  # object_not_in_prerequisite_state
_CONFIG_FILE_ERROR = "F0000"


def pool_unreachable(pool: Pool) -> bool:
    """The pool's last connection attempt failed and it has no server left."""
    return pool.last_error is not None and not pool.idle and not pool.active


def config_rows(config: Config) -> list[list[str]]:
    """SHOW CONFIG rows (key, value, default, changeable); secrets never appear."""
    d = Config()

    def dur(v: float) -> str:
        return f"{v:g}"

    def listen(addrs: Iterable[tuple[str, int]]) -> str:
        return ",".join(format_address(h, p) for h, p in addrs)

    def http(admin: Admin) -> str:
        return format_address(*admin.http) if admin.http else ""

    dl = LogConfig()
    items: list[tuple[str, str, str, bool]] = [
        ("config_file", config.source or "", "", False),
        ("listen", listen(config.listen), listen(d.listen), False),
        ("pool_mode", config.pool_mode, d.pool_mode, True),
        ("pool_size", str(config.pool_size), str(d.pool_size), True),
        ("min_pool_size", str(config.min_pool_size), str(d.min_pool_size), True),
        ("max_client_conn", str(config.max_client_conn), str(d.max_client_conn), True),
        ("max_prepared_statements", str(config.max_prepared_statements),
         str(d.max_prepared_statements), True),
        ("max_user_client_connections", str(config.max_user_client_connections),
         str(d.max_user_client_connections), True),
        ("max_db_client_connections", str(config.max_db_client_connections),
         str(d.max_db_client_connections), True),
        ("server_idle_timeout", dur(config.server_idle_timeout), dur(d.server_idle_timeout), True),
        ("server_lifetime", dur(config.server_lifetime), dur(d.server_lifetime), True),
        ("server_connect_timeout", dur(config.server_connect_timeout),
         dur(d.server_connect_timeout), True),
        ("query_wait_timeout", dur(config.query_wait_timeout), dur(d.query_wait_timeout), True),
        ("client_login_timeout", dur(config.client_login_timeout),
         dur(d.client_login_timeout), True),
        ("shutdown_timeout", dur(config.shutdown_timeout), dur(d.shutdown_timeout), True),
        ("max_packet_size", str(config.max_packet_size), str(d.max_packet_size), True),
        ("server_reset_query", config.server_reset_query, d.server_reset_query, True),
        ("auth_type", config.auth_type, d.auth_type, True),
        ("auth_rules", _rules_summary(config), "", True),
        ("auth_user", config.auth_user or "", "", True),
        ("auth_query", config.auth_query, d.auth_query, True),
        ("auth_dbname", config.auth_dbname or "", "", True),
        ("auth_query_ttl", dur(config.auth_query_ttl), dur(d.auth_query_ttl), True),
        ("admin.users", ",".join(config.admin.users), "", True),
        ("admin.http", http(config.admin), "", False),
        ("workers", str(config.workers), str(d.workers), False),
        ("handover_socket", config.handover_socket or "", "", False),
        ("log.level", config.log.level, dl.level, True),
        ("log.format", config.log.format, dl.format, False),
    ]  # fmt: skip
    return [[k, v, default, "yes" if changeable else "no"] for k, v, default, changeable in items]


def _rules_summary(config: Config) -> str:
    """How many auth_rules entries there are (their contents stay in the file)."""
    rules = config.auth_rules
    if rules is None:
        return ""
    return f"{len(rules)} rule" + ("" if len(rules) == 1 else "s")
