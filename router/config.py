"""YAML topology -> frozen, typed configuration objects.

Everything the proxy needs to know about listeners, pools, users and the database topology is
validated here, once, before anything listens. Validation collects *all* problems and reports
each as ``yaml.path: problem`` so an operator can fix a file in one pass. Unknown keys are
errors (a typo must not silently fall back to a default), and secrets never appear in errors.

Pure Python + PyYAML; no asyncio, no imports from the rest of pgrouter.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import math
import os
import re
import ssl
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

__all__ = [
    "ADMIN_DATABASES",
    "AUTH_RULE_METHODS",
    "AUTH_TYPES",
    "CLIENT_TLS_MODES",
    "DEFAULT_AUTH_QUERY",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "POOL_MODES",
    "READ_YOUR_WRITES_SCOPES",
    "ROUTING_READS",
    "SERVER_TLS_MODES",
    "Admin",
    "AuthRule",
    "ClientTLS",
    "Config",
    "ConfigError",
    "Database",
    "Endpoint",
    "LogConfig",
    "Routing",
    "ServerTLS",
    "User",
    "check_main",
    "format_address",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]

POOL_MODES = ("session", "transaction", "statement")
AUTH_TYPES = ("scram-sha-256", "md5", "trust", "plain")
#: Methods of an auth_rules entry; "password" (PostgreSQL's name) and "plain" are the same.
AUTH_RULE_METHODS = ("scram-sha-256", "md5", "password", "trust", "reject")
ROUTING_READS = ("replicas", "primary", "any")
READ_YOUR_WRITES_SCOPES = ("connection", "user_address")
LAGGING_REPLICAS = ("primary", "least_lagged")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("console", "json")
CLIENT_TLS_MODES = ("disable", "allow", "require")
#: libpq's sslmode values (allow is left out: it only matters to a client that retries).
SERVER_TLS_MODES = ("disable", "prefer", "require", "verify-ca", "verify-full")
#: The ALPN protocol name PostgreSQL 17 uses for TLS connections.
ALPN_POSTGRESQL = "postgresql"
#: Virtual database names served by the admin console; no real database may use them.
ADMIN_DATABASES = ("pgrouter", "pgbouncer")

DEFAULT_LISTEN: tuple[tuple[str, int], ...] = (("127.0.0.1", 6432),)
DEFAULT_LISTEN_PORT = 6432
DEFAULT_SERVER_PORT = 5432
DEFAULT_PATRONI_PORT = 8008  # Patroni's REST API
DEFAULT_MAX_REPLICA_LAG_BYTES = 1024 * 1024
SCRAM_PREFIX = "SCRAM-SHA-256$"

#: PostgreSQL's verifier of a login role, NULL once its password expired. pg_shadow lists only
#: roles that may log in; schema-qualified so a search_path cannot substitute another table.
DEFAULT_AUTH_QUERY = (
    "SELECT usename, CASE WHEN valuntil < pg_catalog.now() THEN NULL ELSE passwd END "
    "FROM pg_catalog.pg_shadow WHERE usename = $1"
)
_AUTH_QUERY_PARAM = re.compile(r"\$1(?!\d)")

DURATION_HINT = "must be a duration like 250ms, 5s, 1h"
SIZE_HINT = "must be a size like 16MB"


class ConfigError(Exception):
    """Every problem found in a topology file, each as ``yaml.path: problem``.

    Raised once with all errors so the operator sees the whole list, not just the first.
    """

    errors: list[str]

    def __init__(self, errors: str | Iterable[str]) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


# --------------------------------------------------------------------------------------------
# Durations and sizes
# --------------------------------------------------------------------------------------------

_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")

_DURATION_UNITS: dict[str, Fraction] = {
    "": Fraction(1),
    "us": Fraction(1, 1_000_000),
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "sec": Fraction(1),
    "secs": Fraction(1),
    "second": Fraction(1),
    "seconds": Fraction(1),
    "m": Fraction(60),
    "min": Fraction(60),
    "mins": Fraction(60),
    "minute": Fraction(60),
    "minutes": Fraction(60),
    "h": Fraction(3600),
    "hr": Fraction(3600),
    "hour": Fraction(3600),
    "hours": Fraction(3600),
    "d": Fraction(86400),
    "day": Fraction(86400),
    "days": Fraction(86400),
}

# Size units always carry a "B": a bare "m" would be ambiguous with minutes where a value may
# be either (max_replica_lag). Units are binary (1kB = 1024), as in PostgreSQL.
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1024,
    "kib": 1024,
    "mb": 1024**2,
    "mib": 1024**2,
    "gb": 1024**3,
    "gib": 1024**3,
    "tb": 1024**4,
    "tib": 1024**4,
}


def parse_duration(value: object) -> float:
    """Seconds from ``"250ms"``, ``"5s"``, ``"2m"``, ``"1h"``, ``"1d"`` or a plain number.

    Raises ValueError for anything else, including negatives, NaN/infinity and booleans
    (YAML turns ``yes``/``off`` into booleans, which are never a duration).
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"not a duration: {value!r}")
        return seconds
    if isinstance(value, str):
        match = _NUMBER_UNIT.match(value)
        if match:
            unit = _DURATION_UNITS.get(match.group(2).lower())
            if unit is not None:
                return float(Fraction(match.group(1)) * unit)
    raise ValueError(f"not a duration: {value!r}")


def parse_size(value: object) -> int:
    """Bytes from ``"16MB"``, ``"1kB"``, ``"512"``, ``1024`` (binary units: 1kB = 1024).

    Fractions are fine as long as they come out to whole bytes (``"1.5kB"``). Raises
    ValueError for anything else, including negatives and booleans.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"not a size: {value!r}")
        return value
    if isinstance(value, float):
        if not value.is_integer() or value < 0:
            raise ValueError(f"not a size: {value!r}")
        return int(value)
    if isinstance(value, str):
        match = _NUMBER_UNIT.match(value)
        if match:
            unit = _SIZE_UNITS.get(match.group(2).lower())
            if unit is not None:
                size = Fraction(match.group(1)) * unit
                if size.denominator == 1:
                    return int(size)
    raise ValueError(f"not a size: {value!r}")


# --------------------------------------------------------------------------------------------
# Configuration objects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One PostgreSQL server; ``weight`` biases replica selection (1..1000). ``patroni`` is
    the member's Patroni REST API (``http://host:port``), which then decides the leader."""

    host: str
    port: int = DEFAULT_SERVER_PORT
    weight: int = 1
    patroni: str | None = None

    @property
    def address(self) -> str:
        """``host:port`` for logs and the admin console (IPv6 hosts in brackets)."""
        return format_address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class Routing:
    """Per-database read routing policy.

    ``read_your_writes`` is ``"lsn"`` (reads after a write go only to replicas that replayed
    it), ``"off"``, or ``"duration"`` (stick to the primary for ``read_your_writes_window``
    seconds after a write). Replica lag is limited in bytes or in seconds, never both; both
    None means no lag limit.
    """

    reads: str = "replicas"
    read_your_writes: str = "lsn"
    read_your_writes_window: float = 0.0
    read_your_writes_scope: str = "connection"
    max_replica_lag_bytes: int | None = DEFAULT_MAX_REPLICA_LAG_BYTES
    max_replica_lag_seconds: float | None = None
    # When every replica is beyond max_replica_lag: "primary" takes the reads, or
    # "least_lagged" sends them to the replica closest to the primary.
    lagging_replicas: str = "primary"
    # Function names (bare, or schema.name) the classifier takes as read-only although they
    # are VOLATILE, and as writers although they are not; writers win.
    read_only_functions: frozenset[str] = frozenset()
    writing_functions: frozenset[str] = frozenset()
    classifier_cache_size: int = 10000  # statement texts whose verdict is kept


@dataclass(frozen=True, slots=True)
class Database:
    """A client-visible database with its servers; pool settings already inherited."""

    name: str
    dbname: str
    primary: Endpoint
    replicas: tuple[Endpoint, ...]
    pool_mode: str
    pool_size: int
    min_pool_size: int
    server_reset_query: str
    routing: Routing
    max_db_client_connections: int = 0  # 0: unlimited
    #: How long primary-bound transactions wait for a primary while there is none usable.
    failover_timeout: float = 10.0

    @property
    def backends(self) -> tuple[Endpoint, ...]:
        """The primary followed by the replicas."""
        return (self.primary, *self.replicas)


@dataclass(frozen=True, slots=True)
class User:
    """A client-facing user; the same credentials log in to the servers.

    At most one of ``password`` (cleartext) and ``scram_verifier`` is set; neither is set only
    for users of ``auth_type: trust``. ``repr`` hides both so a logged object leaks nothing.
    ``max_client_connections`` None means the top-level ``max_user_client_connections``.
    """

    name: str
    password: str | None = field(default=None, repr=False)
    scram_verifier: str | None = field(default=None, repr=False)
    max_client_connections: int | None = None


IPNetwork = IPv4Network | IPv6Network


@dataclass(frozen=True, slots=True)
class AuthRule:
    """One ``auth_rules`` entry, like a pg_hba.conf line: the method for the clients it matches.

    A matcher that is None matches everything (``all``). ``method`` is scram-sha-256, md5,
    plain (written ``password`` or ``plain``), trust or reject. ``index`` is the rule's position
    in the file, for logs.
    """

    method: str
    databases: frozenset[str] | None = None
    users: frozenset[str] | None = None
    networks: tuple[IPNetwork, ...] | None = None
    index: int = 0

    def matches(self, database: str, user: str, address: IPv4Address | IPv6Address | None) -> bool:
        """Does the rule cover this login? ``address`` None (not an IP client) matches only a
        rule without an address."""
        if self.databases is not None and database not in self.databases:
            return False
        if self.users is not None and user not in self.users:
            return False
        if self.networks is None:
            return True
        return address is not None and any(address in net for net in self.networks)


@dataclass(frozen=True, slots=True)
class Admin:
    """Who may use the admin console, and where the HTTP endpoints listen (None: off)."""

    users: tuple[str, ...] = ()
    http: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Log level and renderer (``console`` for humans, ``json`` for collectors), and whether
    client logins and disconnections are logged (one line each)."""

    level: str = "info"
    format: str = "console"
    connections: bool = True


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """TLS between clients and pgrouter.

    ``mode`` is disable (SSLRequest answered 'N'), allow (TLS for clients that ask) or require
    (clients that do not ask are refused). ``ca`` set: clients must present a certificate it
    signed. ``context`` is built from the files when the topology is loaded (and reloaded), so
    a connection never reads them.
    """

    mode: str = "disable"
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """TLS between pgrouter and the servers, with libpq's sslmode meanings.

    ``context`` is None for disable, and for prefer/require without ``ca`` (then the server's
    certificate is not checked, as in libpq).
    """

    mode: str = "prefer"
    ca: str | None = None
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated topology. Mappings are read-only and keep the file's order."""

    listen: tuple[tuple[str, int], ...] = DEFAULT_LISTEN
    pool_mode: str = "transaction"
    pool_size: int = 20
    min_pool_size: int = 0
    max_client_conn: int = 10000
    max_prepared_statements: int = 200
    server_idle_timeout: float = 3600.0
    server_lifetime: float = 3600.0
    server_connect_timeout: float = 5.0
    query_wait_timeout: float = 120.0
    client_login_timeout: float = 15.0
    shutdown_timeout: float = 30.0
    #: A Unix socket where the running process hands its listening sockets to a successor
    #: started with ``--takeover`` (None: no handover).
    handover_socket: str | None = None
    workers: int = 1  # processes accepting on the same listeners, each with a share of the pools
    max_packet_size: int = 256 * 1024 * 1024
    server_reset_query: str = "DISCARD ALL"
    auth_type: str = "scram-sha-256"
    #: None: ``auth_type`` for every client; otherwise the first matching rule decides.
    auth_rules: tuple[AuthRule, ...] | None = None
    max_user_client_connections: int = 0  # 0: unlimited
    max_db_client_connections: int = 0
    #: auth_query: users not in `users` are looked up on the servers as this user (None: off).
    auth_user: str | None = None
    auth_query: str = DEFAULT_AUTH_QUERY
    auth_dbname: str | None = None  # where auth_query runs (None: the client's database)
    auth_query_ttl: float = 60.0  # how long a looked-up secret (or its absence) is reused
    #: The backend monitors: one check per backend every interval (each bounded by timeout);
    #: `health_check_fall` failed checks in a row take a backend down, `health_check_rise`
    #: good ones bring it back.
    health_check_interval: float = 0.1
    health_check_timeout: float = 1.0
    health_check_fall: int = 3
    health_check_rise: int = 2
    #: Primary-bound transactions wait this long for a primary while the database has none
    #: usable (down, in recovery, two claiming); 0: refused at once. Per-database override.
    failover_timeout: float = 10.0
    users: Mapping[str, User] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    admin: Admin = field(default_factory=Admin)
    log: LogConfig = field(default_factory=LogConfig)
    client_tls: ClientTLS = field(default_factory=ClientTLS)
    server_tls: ServerTLS = field(default_factory=ServerTLS)
    databases: Mapping[str, Database] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    source: str | None = None

    def user_client_limit(self, user: str) -> tuple[int, str]:
        """(the most clients `user` may have logged in, 0: unlimited; the setting it comes
        from): its own users.NAME.max_client_connections, else the top level's."""
        entry = self.users.get(user)
        if entry is not None and entry.max_client_connections is not None:
            return entry.max_client_connections, "max_client_connections"
        return self.max_user_client_connections, "max_user_client_connections"


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------

T = TypeVar("T")
_MISSING: Any = object()

_TOP_KEYS = (
    "listen",
    "pool_mode",
    "pool_size",
    "min_pool_size",
    "max_client_conn",
    "max_prepared_statements",
    "server_idle_timeout",
    "server_lifetime",
    "server_connect_timeout",
    "query_wait_timeout",
    "client_login_timeout",
    "shutdown_timeout",
    "handover_socket",
    "workers",
    "max_packet_size",
    "server_reset_query",
    "auth_type",
    "auth_rules",
    "max_user_client_connections",
    "max_db_client_connections",
    "auth_user",
    "auth_query",
    "auth_dbname",
    "auth_query_ttl",
    "health_check_interval",
    "health_check_timeout",
    "health_check_fall",
    "health_check_rise",
    "failover_timeout",
    "users",
    "admin",
    "log",
    "client_tls",
    "server_tls",
    "databases",
)
_DATABASE_KEYS = (
    "dbname",
    "primary",
    "replicas",
    "hosts",
    "pool_mode",
    "pool_size",
    "min_pool_size",
    "server_reset_query",
    "max_db_client_connections",
    "failover_timeout",
    "routing",
)
_ROUTING_KEYS = (
    "reads",
    "read_your_writes",
    "read_your_writes_scope",
    "max_replica_lag",
    "lagging_replicas",
    "read_only_functions",
    "writing_functions",
    "classifier_cache_size",
)
_FUNCTION_NAME = re.compile(r"(?:[a-z_][a-z0-9_$]*\.)?[a-z_][a-z0-9_$]*\Z")
_ENDPOINT_KEYS = ("host", "port", "weight", "patroni")
_USER_KEYS = ("password", "password_env", "max_client_connections")
_RULE_KEYS = ("method", "database", "user", "address")
_ADMIN_KEYS = ("users", "http")
_LOG_KEYS = ("level", "format", "connections")
_CLIENT_TLS_KEYS = ("mode", "cert", "key", "ca")
_SERVER_TLS_KEYS = ("mode", "ca")
_MIN_PACKET_SIZE = 1024
_MAX_UNIX_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
MAX_WORKERS = 64


def format_address(host: str, port: int) -> str:
    """``host:port``, bracketing IPv6 literals so the port stays unambiguous."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    return {int: "integer", float: "number", str: "string"}.get(type(value), type(value).__name__)


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


class _Checker:
    """Collects errors while building objects, so one pass reports every problem."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, path: str, problem: str) -> None:
        self.errors.append(f"{path}: {problem}")

    def mapping(self, path: str, value: object, allowed: tuple[str, ...]) -> dict[str, Any]:
        """The value as a dict (null -> empty), with unknown keys reported."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.error(path, f"must be a mapping, got {_type_name(value)}")
            return {}
        result: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str) or key not in allowed:
                hint = ""
                if isinstance(key, str):
                    close = difflib.get_close_matches(key, allowed, n=1)
                    if close:
                        hint = f" (did you mean {close[0]!r}?)"
                if not hint:
                    hint = f" (expected one of: {', '.join(allowed)})"
                self.error(_join(path, key), f"unknown key{hint}")
                continue
            result[key] = item
        return result

    def integer(
        self,
        path: str,
        value: object,
        default: int,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"must be an integer, got {_type_name(value)}")
            return default
        if minimum is not None and maximum is not None:
            if not minimum <= value <= maximum:
                self.error(path, f"must be {minimum}..{maximum}")
                return default
        elif minimum is not None and value < minimum:
            self.error(path, f"must be >= {minimum}")
            return default
        return value

    def boolean(self, path: str, value: object, default: bool) -> bool:
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.error(path, f"must be true or false, got {_type_name(value)}")
            return default
        return value

    def string(self, path: str, value: object, default: str, *, non_empty: bool = False) -> str:
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self.error(path, f"must be a string, got {_type_name(value)}")
            return default
        if non_empty and not value.strip():
            self.error(path, "must be a non-empty string")
            return default
        return value

    def choice(self, path: str, value: object, default: str, allowed: tuple[str, ...]) -> str:
        if value is _MISSING:
            return default
        if not isinstance(value, str) or value not in allowed:
            self.error(path, f"must be one of {', '.join(allowed)} (got {_show(value)})")
            return default
        return value

    def duration(self, path: str, value: object, default: float, *, positive: bool) -> float:
        return self._parsed(path, value, default, parse_duration, DURATION_HINT, positive)

    def size(self, path: str, value: object, default: int, *, positive: bool) -> int:
        return self._parsed(path, value, default, parse_size, SIZE_HINT, positive)

    def _parsed(
        self,
        path: str,
        value: object,
        default: T,
        parse: Callable[[object], T],
        hint: str,
        positive: bool,
    ) -> T:
        if value is _MISSING:
            return default
        try:
            result = parse(value)
        except ValueError:
            self.error(path, f"{hint} (got {_show(value)})")
            return default
        if positive and not result:
            self.error(path, "must be greater than 0")
            return default
        return result


def _show(value: object) -> str:
    """A short rendering of a non-secret value for an error message."""
    if isinstance(value, str | int | float | bool) or value is None:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return _type_name(value)


def _split_host_port(text: str, default_port: int | None) -> tuple[str, int]:
    """Parse ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``; ValueError says what's wrong.

    A bare IPv6 literal (``::1``, more than one colon, no brackets) is a host without a port.
    """
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("missing ']' after an IPv6 address (expected [ipv6]:port)")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError("expected ':port' after ']' (expected [ipv6]:port)")
        port_text: str | None = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if not host or any(ch.isspace() for ch in host):
        raise ValueError("host must be a non-empty name or address without spaces")
    if port_text is None:
        if default_port is None:
            raise ValueError("port is required")
        return host, default_port
    if not port_text.isdigit():
        raise ValueError("port must be an integer")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError("port must be 1..65535")
    return host, port


def _address(
    ck: _Checker, path: str, value: object, default_port: int | None
) -> tuple[str, int] | None:
    """A listen/HTTP address; None (with an error recorded) when invalid."""
    if not isinstance(value, str):
        ck.error(path, f'must be a "host:port" string, got {_type_name(value)}')
        return None
    try:
        return _split_host_port(value, default_port)
    except ValueError as exc:
        ck.error(path, str(exc))
        return None


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _listen(ck: _Checker, value: object) -> tuple[tuple[str, int], ...]:
    if value is _MISSING:
        return DEFAULT_LISTEN
    items: list[tuple[str, object]]
    if isinstance(value, list):
        if not value:
            ck.error("listen", "must list at least one host:port")
            return DEFAULT_LISTEN
        items = [(f"listen[{i}]", item) for i, item in enumerate(value)]
    else:
        items = [("listen", value)]
    result: list[tuple[str, int]] = []
    for path, item in items:
        address = _address(ck, path, item, DEFAULT_LISTEN_PORT)
        if address is None:
            continue
        if address in result:
            ck.error(path, f"duplicate address {format_address(*address)}")
            continue
        result.append(address)
    return tuple(result) or DEFAULT_LISTEN


def _endpoint(ck: _Checker, path: str, value: object) -> Endpoint | None:
    if isinstance(value, str):
        try:
            host, port = _split_host_port(value, DEFAULT_SERVER_PORT)
        except ValueError as exc:
            ck.error(path, str(exc))
            return None
        return Endpoint(host, port)
    if not isinstance(value, Mapping):
        ck.error(
            path,
            'must be "host:port" or a mapping {host, port, weight, patroni}, '
            f"got {_type_name(value)}",
        )
        return None
    data = ck.mapping(path, value, _ENDPOINT_KEYS)
    ok = True
    host = data.get("host", _MISSING)
    if host is _MISSING:
        ck.error(_join(path, "host"), "required")
        ok = False
    elif not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host):
        ck.error(_join(path, "host"), "must be a non-empty host name or address")
        ok = False
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    errors_before = len(ck.errors)
    port = ck.integer(
        _join(path, "port"), data.get("port", _MISSING), DEFAULT_SERVER_PORT, 1, 65535
    )
    weight = ck.integer(_join(path, "weight"), data.get("weight", _MISSING), 1, 1, 1000)
    patroni = data.get("patroni")
    if patroni is not None:
        try:
            patroni = _patroni_url(patroni)
        except ValueError as exc:
            ck.error(_join(path, "patroni"), str(exc))
    if not ok or len(ck.errors) != errors_before:
        return None
    return Endpoint(str(host), port, weight, patroni)


def _patroni_url(value: object) -> str:
    """``http://host[:port][/]`` -> ``http://host:port`` (Patroni's default port 8008)."""
    if not isinstance(value, str):
        raise ValueError(f'must be a URL like "http://10.0.0.1:8008", got {_type_name(value)}')
    parts = urlsplit(value.strip())
    if parts.scheme != "http":
        raise ValueError(f"must be an http:// URL of the member's Patroni REST API (got {value!r})")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"must be http://host:port only, without path or credentials ({value!r})")
    try:
        host, port = _split_host_port(parts.netloc, DEFAULT_PATRONI_PORT)
    except ValueError as exc:
        raise ValueError(f"{exc} ({value!r})") from None
    return f"http://{format_address(host, port)}"


def _replica_lag(value: object) -> tuple[int | None, float | None] | None:
    """(bytes, None) or (None, seconds); a plain number means bytes. None when invalid."""
    try:
        return parse_size(value), None
    except ValueError:
        pass
    if isinstance(value, str):
        try:
            return None, parse_duration(value)
        except ValueError:
            pass
    return None


def _routing(ck: _Checker, path: str, value: object) -> Routing:
    data = ck.mapping(path, value, _ROUTING_KEYS)
    reads = ck.choice(_join(path, "reads"), data.get("reads", _MISSING), "replicas", ROUTING_READS)
    scope = ck.choice(
        _join(path, "read_your_writes_scope"),
        data.get("read_your_writes_scope", _MISSING),
        "connection",
        READ_YOUR_WRITES_SCOPES,
    )

    ryw, window = "lsn", 0.0
    raw = data.get("read_your_writes", _MISSING)
    # YAML 1.1 reads an unquoted `off` as False (and `on` as True).
    if raw is False or raw == "off":
        ryw = "off"
    elif raw is _MISSING or raw is True or raw == "lsn":
        ryw = "lsn"
    else:
        try:
            window = parse_duration(raw)
        except ValueError:
            window = 0.0
        if window > 0:
            ryw = "duration"
        else:
            ck.error(
                _join(path, "read_your_writes"),
                f"must be lsn, off or a duration like 5s (got {_show(raw)})",
            )
            window = 0.0

    lag_bytes: int | None = DEFAULT_MAX_REPLICA_LAG_BYTES
    lag_seconds: float | None = None
    lag = data.get("max_replica_lag", _MISSING)
    if lag is None or lag is False or lag == "off":
        lag_bytes = None
    elif lag is not _MISSING:
        parsed = _replica_lag(lag)
        if parsed is None:
            ck.error(
                _join(path, "max_replica_lag"),
                f"must be a size like 1MB or a duration like 5s (got {_show(lag)})",
            )
        else:
            lag_bytes, lag_seconds = parsed
    lagging = ck.choice(
        _join(path, "lagging_replicas"),
        data.get("lagging_replicas", _MISSING),
        "primary",
        LAGGING_REPLICAS,
    )
    return Routing(
        reads=reads,
        read_your_writes=ryw,
        read_your_writes_window=window,
        read_your_writes_scope=scope,
        max_replica_lag_bytes=lag_bytes,
        max_replica_lag_seconds=lag_seconds,
        lagging_replicas=lagging,
        read_only_functions=_function_names(ck, _join(path, "read_only_functions"), data),
        writing_functions=_function_names(ck, _join(path, "writing_functions"), data),
        classifier_cache_size=ck.integer(
            _join(path, "classifier_cache_size"),
            data.get("classifier_cache_size", _MISSING),
            10000,
            0,
            10_000_000,
        ),
    )


def _function_names(ck: _Checker, path: str, data: Mapping[str, Any]) -> frozenset[str]:
    """A list of function names, lower-cased: `name` or `schema.name`."""
    value = data.get(path.rpartition(".")[2], _MISSING)
    if value is _MISSING or value is None:
        return frozenset()
    if not isinstance(value, list):
        ck.error(path, f"must be a list of function names, got {_type_name(value)}")
        return frozenset()
    names = set()
    for i, item in enumerate(value):
        name = item.strip().lower() if isinstance(item, str) else ""
        if not _FUNCTION_NAME.match(name):
            ck.error(f"{path}[{i}]", f"must be a function name, f or schema.f (got {_show(item)})")
            continue
        names.add(name)
    return frozenset(names)


def _database(ck: _Checker, path: str, name: str, value: object, top: Config) -> Database | None:
    errors_before = len(ck.errors)
    data = ck.mapping(path, value, _DATABASE_KEYS)
    dbname = ck.string(_join(path, "dbname"), data.get("dbname", _MISSING), name, non_empty=True)

    primary: Endpoint | None = None
    hosts = data.get("hosts")
    if hosts is not None:
        # Roles found by the health checks: the first host is only the starting guess.
        if "primary" in data or "replicas" in data:
            ck.error(_join(path, "hosts"), "list either hosts or primary/replicas, not both")
        elif not isinstance(hosts, list) or not hosts:
            ck.error(_join(path, "hosts"), "must be a non-empty list of host:port")
        else:
            primary = _endpoint(ck, f"{_join(path, 'hosts')}[0]", hosts[0])
            data = {**data, "replicas": hosts[1:]}
    elif data.get("primary") is None:
        ck.error(_join(path, "primary"), "required (or hosts, to find the roles)")
    else:
        primary = _endpoint(ck, _join(path, "primary"), data["primary"])

    replicas: list[Endpoint] = []
    raw_replicas = data.get("replicas")
    if raw_replicas is not None and not isinstance(raw_replicas, list):
        ck.error(_join(path, "replicas"), f"must be a list, got {_type_name(raw_replicas)}")
    else:
        listed = "replicas" if hosts is None else "hosts"
        seen: dict[tuple[str, int], str] = {}
        if primary is not None:
            seen[(primary.host, primary.port)] = "primary" if hosts is None else "hosts[0]"
        for i, item in enumerate(raw_replicas or ()):
            at = i if hosts is None else i + 1
            item_path = f"{_join(path, listed)}[{at}]"
            endpoint = _endpoint(ck, item_path, item)
            if endpoint is None:
                continue
            key = (endpoint.host, endpoint.port)
            if key in seen:
                ck.error(item_path, f"{endpoint.address} is already listed as {seen[key]}")
                continue
            seen[key] = f"{listed}[{at}]"
            replicas.append(endpoint)
        named = [e for e in (primary, *replicas) if e is not None and e.patroni]
        if named and len(named) != len(seen):
            ck.error(
                _join(path, listed),
                "patroni: name the Patroni REST API of every member or of none (Patroni "
                "decides the leader only among members it knows)",
            )

    pool_mode = ck.choice(
        _join(path, "pool_mode"), data.get("pool_mode", _MISSING), top.pool_mode, POOL_MODES
    )
    pool_size = ck.integer(
        _join(path, "pool_size"), data.get("pool_size", _MISSING), top.pool_size, 1
    )
    min_pool_size = ck.integer(
        _join(path, "min_pool_size"), data.get("min_pool_size", _MISSING), top.min_pool_size, 0
    )
    if min_pool_size > pool_size and ("pool_size" in data or "min_pool_size" in data):
        if "min_pool_size" in data:
            ck.error(_join(path, "min_pool_size"), f"must be <= pool_size ({pool_size})")
        else:
            ck.error(
                _join(path, "pool_size"),
                f"must be >= min_pool_size ({min_pool_size}, inherited from the top level)",
            )
    reset = data.get("server_reset_query", _MISSING)
    server_reset_query = ck.string(
        _join(path, "server_reset_query"),
        "" if reset is None else reset,
        top.server_reset_query,
    )
    max_clients = ck.integer(
        _join(path, "max_db_client_connections"),
        data.get("max_db_client_connections", _MISSING),
        top.max_db_client_connections,
        0,
    )
    failover_timeout = ck.duration(
        _join(path, "failover_timeout"),
        data.get("failover_timeout", _MISSING),
        top.failover_timeout,
        positive=False,
    )
    routing = _routing(ck, _join(path, "routing"), data.get("routing"))
    if primary is None or len(ck.errors) != errors_before:
        return None
    return Database(
        name=name,
        dbname=dbname,
        primary=primary,
        replicas=tuple(replicas),
        pool_mode=pool_mode,
        pool_size=pool_size,
        min_pool_size=min_pool_size,
        server_reset_query=server_reset_query,
        routing=routing,
        max_db_client_connections=max_clients,
        failover_timeout=failover_timeout,
    )


def _databases(ck: _Checker, value: object, top: Config) -> dict[str, Database]:
    if value is _MISSING or value is None:
        ck.error("databases", "required (at least one database)")
        return {}
    if not isinstance(value, Mapping):
        ck.error("databases", f"must be a mapping of database names, got {_type_name(value)}")
        return {}
    if not value:
        ck.error("databases", "must contain at least one database")
        return {}
    result: dict[str, Database] = {}
    for name, item in value.items():
        path = _join("databases", name)
        if not isinstance(name, str) or not name.strip():
            ck.error(path, "database name must be a non-empty string")
            continue
        if name in ADMIN_DATABASES:
            ck.error(path, f"the name {name!r} is reserved for the admin console")
            continue
        database = _database(ck, path, name, item, top)
        if database is not None:
            result[name] = database
    return result


def _valid_scram_verifier(text: str) -> bool:
    """``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` as PostgreSQL stores it."""
    try:
        head, keys = text[len(SCRAM_PREFIX) :].split("$")
        iterations, salt = head.split(":")
        stored_key, server_key = keys.split(":")
        if not iterations.isdigit() or int(iterations) < 1:
            return False
        base64.b64decode(salt, validate=True)
        decoded = [base64.b64decode(k, validate=True) for k in (stored_key, server_key)]
    except (ValueError, binascii.Error):
        return False
    return bool(salt) and all(len(k) == 32 for k in decoded)


def _secret(ck: _Checker, path: str, value: str, auth_type: str) -> tuple[str | None, str | None]:
    """(password, verifier) from a secret; errors never include the secret itself."""
    if not value:
        ck.error(path, "must not be empty")
        return None, None
    if value.startswith(SCRAM_PREFIX):
        if not _valid_scram_verifier(value):
            ck.error(
                path,
                "malformed SCRAM verifier (expected "
                "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)",
            )
            return None, None
        if auth_type == "md5":
            ck.error(path, "a SCRAM verifier cannot be used with auth_type md5")
            return None, None
        return None, value
    return value, None


def _users(
    ck: _Checker,
    value: object,
    env: Mapping[str, str],
    auth_type: str,
    rules: tuple[AuthRule, ...] | None,
) -> dict[str, User]:
    """With auth_rules, an md5 rule checks a verifier-only user with SCRAM (as PostgreSQL does),
    and a user may go without a password only if some rule trusts."""
    if rules is not None:
        # Only the two checks below look at auth_type: "trust" when a rule trusts, else a
        # method that accepts a verifier.
        trusted = any(rule.method == "trust" for rule in rules)
        auth_type = "trust" if trusted else "scram-sha-256"
    if value is _MISSING or value is None:
        return {}
    if not isinstance(value, Mapping):
        ck.error("users", f"must be a mapping of user names, got {_type_name(value)}")
        return {}
    result: dict[str, User] = {}
    for name, item in value.items():
        path = _join("users", name)
        if not isinstance(name, str) or not name.strip():
            ck.error(path, "user name must be a non-empty string")
            continue
        if item is not None and not isinstance(item, Mapping):
            # Never echo the value: it is most likely a password written in the wrong place.
            ck.error(path, f"must be a mapping like {{password: ...}}, got {_type_name(item)}")
            continue
        data = ck.mapping(path, item, _USER_KEYS)
        password: str | None = None
        verifier: str | None = None
        if "password" in data and "password_env" in data:
            ck.error(path, "set only one of password and password_env")
        elif "password" in data:
            raw = data["password"]
            if not isinstance(raw, str):
                ck.error(
                    _join(path, "password"),
                    f"must be a string (quote it in YAML), got {_type_name(raw)}",
                )
            else:
                password, verifier = _secret(ck, _join(path, "password"), raw, auth_type)
        elif "password_env" in data:
            var = data["password_env"]
            env_path = _join(path, "password_env")
            if not isinstance(var, str) or not var.strip():
                ck.error(env_path, "must be the name of an environment variable")
            elif var not in env:
                ck.error(env_path, f"environment variable {var} is not set")
            elif not env[var]:
                ck.error(env_path, f"environment variable {var} is empty")
            else:
                password, verifier = _secret(ck, env_path, env[var], auth_type)
        elif rules is not None and auth_type != "trust":
            ck.error(path, "needs password or password_env (no auth_rules entry is trust)")
        elif auth_type != "trust":
            ck.error(path, f"needs password or password_env (auth_type is {auth_type})")
        max_clients = None
        if "max_client_connections" in data:
            max_clients = ck.integer(
                _join(path, "max_client_connections"), data["max_client_connections"], 0, 0
            )
        result[name] = User(
            name=name,
            password=password,
            scram_verifier=verifier,
            max_client_connections=max_clients,
        )
    return result


_RULE_HINT = "{method: ..., database: ..., user: ..., address: ...}"
_CIDR_HINT = "must be an address in CIDR notation like 10.0.0.0/8 or ::1/128, or all"


def _rule_names(
    ck: _Checker, path: str, value: object, what: str, known: set[str] | None = None
) -> frozenset[str] | None:
    """A name, a list of names, or ``all`` (also when absent): None stands for all. Names
    outside ``known`` (when given) are errors."""
    if value is _MISSING or value == "all":
        return None
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        ck.error(path, f"must list at least one {what} name (or be all)")
        return None
    names: set[str] = set()
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]" if isinstance(value, list) else path
        if not isinstance(item, str) or not item.strip():
            ck.error(
                item_path, f"must be a {what} name, a list of names, or all (got {_show(item)})"
            )
        elif item == "all":
            return None
        elif known is not None and item not in known:
            close = difflib.get_close_matches(item, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            ck.error(item_path, f"no {what} {item!r} in {what}s{hint}")
        else:
            names.add(item)
    return frozenset(names)


def _rule_network(text: str) -> IPNetwork:
    """A CIDR block, or a single address (/32, /128); ValueError says what is wrong."""
    if text == "local":
        raise ValueError(
            "pgrouter listens only on TCP, so no client is local "
            "(use 127.0.0.1/32 or ::1/128 for clients on this host)"
        )
    try:
        if "/" not in text:
            return ip_network(ip_address(text))
        return ip_network(text)
    except ValueError:
        pass
    try:
        loose = ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{_CIDR_HINT} (got {_show(text)})") from None
    raise ValueError(f"{text} has host bits set (did you mean {loose}?)")


def _rule_networks(ck: _Checker, path: str, value: object) -> tuple[IPNetwork, ...] | None:
    if value is _MISSING or value == "all":
        return None
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        ck.error(path, "must list at least one address (or be all)")
        return None
    networks: list[IPNetwork] = []
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]" if isinstance(value, list) else path
        if item == "all":
            return None
        if not isinstance(item, str):
            ck.error(item_path, f"{_CIDR_HINT} (got {_show(item)})")
            continue
        try:
            networks.append(_rule_network(item.strip()))
        except ValueError as exc:
            ck.error(item_path, str(exc))
    return tuple(networks)


def _auth_rules(
    ck: _Checker, value: object, databases: Iterable[str] | None
) -> tuple[AuthRule, ...] | None:
    """``auth_rules``: None when absent (auth_type for everyone). ``databases`` are the names
    of the topology's databases (None when that section is itself invalid): a rule naming any
    other database (but the admin console's) is a typo that would never match."""
    if value is _MISSING or value is None:
        return None
    if not isinstance(value, list):
        ck.error(
            "auth_rules", f"must be a list of rules like {_RULE_HINT}, got {_type_name(value)}"
        )
        return None
    if not value:
        ck.error(
            "auth_rules",
            "must list at least one rule (leave auth_rules out to use auth_type for every client)",
        )
        return None
    known = None if databases is None else {*databases, *ADMIN_DATABASES}
    rules: list[AuthRule] = []
    for i, item in enumerate(value):
        path = f"auth_rules[{i}]"
        if not isinstance(item, Mapping):
            ck.error(path, f"must be a mapping like {_RULE_HINT}, got {_type_name(item)}")
            continue
        errors_before = len(ck.errors)
        data = ck.mapping(path, item, _RULE_KEYS)
        method = "reject"
        if "method" not in data:
            ck.error(_join(path, "method"), f"required: one of {', '.join(AUTH_RULE_METHODS)}")
        else:
            raw = "password" if data["method"] == "plain" else data["method"]
            method = ck.choice(_join(path, "method"), raw, method, AUTH_RULE_METHODS)
        names = _rule_names(
            ck, _join(path, "database"), data.get("database", _MISSING), "database", known
        )
        users = _rule_names(ck, _join(path, "user"), data.get("user", _MISSING), "user")
        networks = _rule_networks(ck, _join(path, "address"), data.get("address", _MISSING))
        if len(ck.errors) == errors_before:
            method = "plain" if method == "password" else method
            rules.append(AuthRule(method, names, users, networks, i))
    return tuple(rules)


def _admin(ck: _Checker, value: object) -> Admin:
    data = ck.mapping("admin", value, _ADMIN_KEYS)
    users: list[str] = []
    raw_users = data.get("users")
    if raw_users is not None and not isinstance(raw_users, list):
        ck.error("admin.users", f"must be a list of user names, got {_type_name(raw_users)}")
    else:
        for i, item in enumerate(raw_users or ()):
            if not isinstance(item, str) or not item.strip():
                ck.error(f"admin.users[{i}]", "must be a non-empty string")
            elif item not in users:
                users.append(item)
    http: tuple[str, int] | None = None
    if data.get("http") is not None:
        http = _address(ck, "admin.http", data["http"], None)
    return Admin(users=tuple(users), http=http)


def _log(ck: _Checker, value: object) -> LogConfig:
    data = ck.mapping("log", value, _LOG_KEYS)
    level = data.get("level", _MISSING)
    if isinstance(level, str):
        level = level.lower()
    return LogConfig(
        level=ck.choice("log.level", level, "info", LOG_LEVELS),
        format=ck.choice("log.format", data.get("format", _MISSING), "console", LOG_FORMATS),
        connections=ck.boolean("log.connections", data.get("connections", _MISSING), True),
    )


def _tls_file(ck: _Checker, path: str, value: object, base: str) -> str | None:
    """A certificate or key file: relative names are taken from the topology file's
    directory; the file must exist and be readable now."""
    if value is _MISSING or value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        ck.error(path, f"must be a file path, got {_show(value)}")
        return None
    name = os.path.join(base, os.path.expanduser(value))
    try:
        with open(name, "rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        ck.error(path, f"file not found: {name}")
        return None
    except IsADirectoryError:
        ck.error(path, f"is a directory, not a file: {name}")
        return None
    except OSError as exc:
        ck.error(path, f"cannot read {name}: {exc.strerror or exc}")
        return None
    return name


def _socket_path(ck: _Checker, value: object, base: str) -> str | None:
    """handover_socket: a Unix socket path (relative to the topology file's directory)."""
    if value is _MISSING or value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        ck.error("handover_socket", f"must be a file path, got {_show(value)}")
        return None
    name = os.path.join(base, os.path.expanduser(value))
    if len(os.fsencode(name)) > _MAX_UNIX_PATH:
        ck.error("handover_socket", f"too long for a Unix socket path: {name}")
        return None
    if not os.path.isdir(os.path.dirname(name)):
        ck.error("handover_socket", f"directory not found: {os.path.dirname(name)}")
        return None
    return name


def _check_worker_shares(ck: _Checker, workers: int, databases: Mapping[str, Database]) -> None:
    """Every worker needs at least one server connection of each pool: the pools are split
    between the workers so that their total stays within pool_size."""
    if workers == 1:
        return
    for name, database in databases.items():
        if database.pool_size < workers:
            ck.error(
                _join(_join("databases", name), "pool_size"),
                f"{database.pool_size} is less than workers ({workers}): each worker "
                "needs at least one server connection of every pool",
            )


def _no_password() -> str:
    raise ValueError("encrypted private keys are not supported")


def _client_tls(ck: _Checker, value: object, base: str) -> ClientTLS:
    data = ck.mapping("client_tls", value, _CLIENT_TLS_KEYS)
    mode = ck.choice("client_tls.mode", data.get("mode", _MISSING), "disable", CLIENT_TLS_MODES)
    files = {
        key: _tls_file(ck, f"client_tls.{key}", data.get(key, _MISSING), base)
        for key in ("cert", "key", "ca")
    }
    if mode == "disable":
        return ClientTLS(mode, files["cert"], files["key"], files["ca"])
    for name in ("cert", "key"):
        if name not in data:
            ck.error(f"client_tls.{name}", f"required when client_tls.mode is {mode}")
    cert, key, ca = files["cert"], files["key"], files["ca"]
    if cert is None or key is None or ("ca" in data and ca is None):
        return ClientTLS(mode, cert, key, ca)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ALPN_POSTGRESQL])
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, ValueError, OSError) as exc:
        ck.error("client_tls.key", f"cannot use the certificate and key: {_ssl_reason(exc)}")
        return ClientTLS(mode, cert, key, ca)
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as exc:
            ck.error("client_tls.ca", f"cannot load CA certificates: {_ssl_reason(exc)}")
            return ClientTLS(mode, cert, key, ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return ClientTLS(mode, cert, key, ca, context)


def _server_tls(ck: _Checker, value: object, base: str) -> ServerTLS:
    data = ck.mapping("server_tls", value, _SERVER_TLS_KEYS)
    mode = ck.choice("server_tls.mode", data.get("mode", _MISSING), "prefer", SERVER_TLS_MODES)
    ca = _tls_file(ck, "server_tls.ca", data.get("ca", _MISSING), base)
    if mode == "disable" or (ca is None and "ca" in data):
        return ServerTLS(mode, ca)
    if ca is None and mode in ("prefer", "require"):
        return ServerTLS(mode)  # encrypted, the server's certificate unchecked (libpq's way)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ALPN_POSTGRESQL])
    context.check_hostname = mode == "verify-full"
    context.verify_mode = ssl.CERT_REQUIRED  # with ca, require checks the chain (as libpq)
    try:
        if ca is None:
            context.load_default_certs()
        else:
            context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        ck.error("server_tls.ca", f"cannot load CA certificates: {_ssl_reason(exc)}")
        return ServerTLS(mode, ca)
    return ServerTLS(mode, ca, context)


def _ssl_reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "KEY_VALUES_MISMATCH":
            return "the key does not belong to the certificate"
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _auth_lookup(
    ck: _Checker,
    get: Callable[[str], Any],
    users: Mapping[str, User],
    databases: Mapping[str, Database],
    databases_ok: bool,
) -> tuple[str | None, str, str | None]:
    """(auth_user, auth_query, auth_dbname), checked against the users and databases."""
    user = get("auth_user")
    user = None if user is _MISSING else user
    query = ck.string("auth_query", get("auth_query"), DEFAULT_AUTH_QUERY, non_empty=True)
    dbname = get("auth_dbname")
    dbname = None if dbname is _MISSING else dbname
    if user is not None and (not isinstance(user, str) or not user.strip()):
        ck.error("auth_user", f"must be a user name, got {_show(user)}")
        user = None
    elif user is not None:
        entry = users.get(user)
        if entry is None:
            ck.error("auth_user", f"{user!r} must be one of the users (with a cleartext password)")
        elif entry.password is None:
            ck.error(
                "auth_user",
                f"users.{user} needs a cleartext password: auth_query logs in to the servers "
                "with it",
            )
    elif query != DEFAULT_AUTH_QUERY or dbname is not None:
        key = "auth_query" if query != DEFAULT_AUTH_QUERY else "auth_dbname"
        ck.error(key, "needs auth_user (the user that runs the query)")
    if not _AUTH_QUERY_PARAM.search(query):
        ck.error("auth_query", "must contain $1 where the user name goes")
    if dbname is not None:
        if not isinstance(dbname, str) or not dbname.strip():
            ck.error("auth_dbname", f"must be a database name, got {_show(dbname)}")
            dbname = None
        elif databases_ok and dbname not in databases:
            close = difflib.get_close_matches(dbname, list(databases), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            ck.error("auth_dbname", f"no database {dbname!r} in databases{hint}")
    return user, query, dbname


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def parse_config(
    data: object, env: Mapping[str, str] | None = None, source: str | None = None
) -> Config:
    """Validate already-loaded YAML data; raise ConfigError listing every problem.

    ``env`` resolves ``password_env`` (default: ``os.environ``); tests pass a fake mapping.
    """
    env = os.environ if env is None else env
    ck = _Checker()
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"(top level): must be a mapping, got {_type_name(data)}"])
    top = ck.mapping("", data, _TOP_KEYS)
    defaults = Config()

    def get(key: str) -> Any:
        return top.get(key, _MISSING)

    pool_size = ck.integer("pool_size", get("pool_size"), defaults.pool_size, 1)
    min_pool_size = ck.integer("min_pool_size", get("min_pool_size"), defaults.min_pool_size, 0)
    if min_pool_size > pool_size:
        ck.error("min_pool_size", f"must be <= pool_size ({pool_size})")
        min_pool_size = min(defaults.min_pool_size, pool_size)

    def duration(key: str, *, positive: bool) -> float:
        default: float = getattr(defaults, key)
        return ck.duration(key, get(key), default, positive=positive)

    max_packet_size = ck.size(
        "max_packet_size", get("max_packet_size"), defaults.max_packet_size, positive=True
    )
    if max_packet_size < _MIN_PACKET_SIZE:
        ck.error("max_packet_size", "must be at least 1kB")
        max_packet_size = defaults.max_packet_size
    reset = get("server_reset_query")
    auth_type = ck.choice("auth_type", get("auth_type"), defaults.auth_type, AUTH_TYPES)
    raw_databases = get("databases")
    auth_rules = _auth_rules(
        ck,
        get("auth_rules"),
        [k for k in raw_databases if isinstance(k, str)]
        if isinstance(raw_databases, Mapping)
        else None,
    )

    def limit(key: str) -> int:
        return ck.integer(key, get(key), 0, 0)

    base_dir = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
    base = Config(
        listen=_listen(ck, get("listen")),
        pool_mode=ck.choice("pool_mode", get("pool_mode"), defaults.pool_mode, POOL_MODES),
        pool_size=pool_size,
        min_pool_size=min_pool_size,
        max_client_conn=ck.integer(
            "max_client_conn", get("max_client_conn"), defaults.max_client_conn, 1
        ),
        max_prepared_statements=ck.integer(
            "max_prepared_statements",
            get("max_prepared_statements"),
            defaults.max_prepared_statements,
            0,
        ),
        server_idle_timeout=duration("server_idle_timeout", positive=True),
        server_lifetime=duration("server_lifetime", positive=True),
        server_connect_timeout=duration("server_connect_timeout", positive=True),
        query_wait_timeout=duration("query_wait_timeout", positive=True),
        client_login_timeout=duration("client_login_timeout", positive=True),
        shutdown_timeout=duration("shutdown_timeout", positive=False),
        handover_socket=_socket_path(ck, get("handover_socket"), base_dir),
        workers=ck.integer("workers", get("workers"), defaults.workers, 1, MAX_WORKERS),
        max_packet_size=max_packet_size,
        server_reset_query=ck.string(
            "server_reset_query", "" if reset is None else reset, defaults.server_reset_query
        ),
        auth_type=auth_type,
        auth_rules=auth_rules,
        max_user_client_connections=limit("max_user_client_connections"),
        max_db_client_connections=limit("max_db_client_connections"),
        health_check_interval=duration("health_check_interval", positive=True),
        health_check_timeout=duration("health_check_timeout", positive=True),
        health_check_fall=ck.integer(
            "health_check_fall", get("health_check_fall"), defaults.health_check_fall, 1
        ),
        health_check_rise=ck.integer(
            "health_check_rise", get("health_check_rise"), defaults.health_check_rise, 1
        ),
        failover_timeout=duration("failover_timeout", positive=False),
        source=source,
    )
    users = _users(ck, get("users"), env, auth_type, auth_rules)
    admin = _admin(ck, top.get("admin"))
    log = _log(ck, top.get("log"))
    client_tls = _client_tls(ck, top.get("client_tls"), base_dir)
    server_tls = _server_tls(ck, top.get("server_tls"), base_dir)
    errors_before = len(ck.errors)
    databases = _databases(ck, get("databases"), base)
    auth_user, auth_query, auth_dbname = _auth_lookup(
        ck, get, users, databases, len(ck.errors) == errors_before
    )
    auth_query_ttl = ck.duration(
        "auth_query_ttl", get("auth_query_ttl"), defaults.auth_query_ttl, positive=False
    )
    _check_worker_shares(ck, base.workers, databases)
    if ck.errors:
        raise ConfigError(ck.errors)
    return dataclasses.replace(
        base,
        auth_user=auth_user,
        auth_query=auth_query,
        auth_dbname=auth_dbname,
        auth_query_ttl=auth_query_ttl,
        users=MappingProxyType(users),
        admin=admin,
        log=log,
        client_tls=client_tls,
        server_tls=server_tls,
        databases=MappingProxyType(databases),
    )


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` keys may legitimately be overridden
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key; let the normal constructor report it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {_show(key)}", key_node.start_mark
            )
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a topology file; I/O and YAML syntax errors become ConfigError."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError([f"{name}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{name}: cannot read: {reason}"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        # Only the position and the parser's description: the offending line (which could hold
        # a password) is deliberately left out.
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError([f"{where}: YAML syntax error: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{name}: YAML error: {type(exc).__name__}"]) from None
    return parse_config(data, env=env, source=name)


def check_main(path: str) -> int:
    """``pgrouter check --config PATH``: 0 and a summary if valid, else 1 and every error."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    print(f"OK: {len(config.databases)} databases, {len(config.users)} users ({path})")
    return 0
