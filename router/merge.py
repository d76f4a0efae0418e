"""One view of several worker processes: their Prometheus texts and admin answers combined.

Counters and the gauges that count things (clients, servers, pool sizes) are summed; gauges
that describe a shared thing (a backend's health and lag, a pause, a start time, versions and
settings) are the same in every worker and taken once, as the largest value.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from protocol import messages as m

# ---- Prometheus text format -------------------------------------------------------------------

#: Gauges that are not additive over workers, by name (a prefix ends with "_").
SHARED_GAUGES = (
    "pgrouter_backend_",
    "pgrouter_database_fenced",
    "pgrouter_pool_paused",
    "pgrouter_pool_max_wait_seconds",
    "pgrouter_pool_longest_wait_seconds",
    "pgrouter_start_time_seconds",
    "pgrouter_build_info",
    "pgbouncer_up",
    "pgbouncer_version_info",
    "pgbouncer_config_",
    "pgbouncer_pools_client_maxwait_seconds",
    "pgbouncer_databases_pool_size",
    "pgbouncer_databases_reserve_pool",
    "pgbouncer_databases_max_connections",
    "pgbouncer_databases_paused",
    "pgbouncer_databases_disabled",
    "pgbouncer_databases",  # SHOW LISTS: configured databases and users
    "pgbouncer_users",
)
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\S+)?$")


def _shared(name: str, types: dict[str, str]) -> bool:
    family = name
    if types.get(family) is None:
        for suffix in ("_total", "_created", "_sum", "_count", "_bucket"):
            if name.endswith(suffix) and name[: -len(suffix)] in types:
                family = name[: -len(suffix)]
                break
    if types.get(family) != "gauge":
        return False
    return any(
        name == prefix or (prefix.endswith("_") and name.startswith(prefix))
        for prefix in SHARED_GAUGES
    )


def merge_metrics(texts: Sequence[bytes]) -> bytes:
    """The Prometheus texts of several workers as one: the first's order and help texts, each
    sample summed (or, for a shared gauge, the largest) over the workers that have it."""
    order: list[str] = []  # comment lines and sample keys, in first-seen order
    comments: set[str] = set()
    values: dict[str, float] = {}
    shared: dict[str, bool] = {}
    types: dict[str, str] = {}
    for text in texts:
        for line in text.decode().splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split()
                if len(parts) >= 4 and parts[1] == "TYPE":
                    types[parts[2]] = parts[3]
                if line not in comments:
                    comments.add(line)
                    order.append(line)
                continue
            match = _SAMPLE.match(line)
            if match is None:
                continue
            key = match.group(1) + (match.group(2) or "")
            value = float(match.group(3))
            if key not in values:
                order.append(key)
                values[key] = value
                shared[key] = _shared(match.group(1), types)
            elif shared[key]:
                values[key] = max(values[key], value)
            else:
                values[key] += value
    out = []
    for item in order:
        if item in values:
            out.append(f"{item} {_number(values[item])}")
        else:
            out.append(item)
    return ("\n".join(out) + "\n").encode()


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 2**53:
        return f"{int(value)}.0"
    return repr(value)


# ---- admin console answers ---------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """How the rows of one SHOW combine: rows with equal `key` columns are one row; in it
    `keep` columns come from the first worker, `maximum` ones are the largest, `mean` ones the
    mean over workers with a non-zero value, and the other whole numbers are summed. Without
    `key`, rows are listed one after the other. `only`: rows (by key) whose value is kept."""

    key: tuple[str, ...] = ()
    keep: frozenset[str] = field(default_factory=frozenset)
    maximum: frozenset[str] = field(default_factory=frozenset)
    mean: frozenset[str] = field(default_factory=frozenset)
    kept_rows: frozenset[str] = field(default_factory=frozenset)
    mean_rows: frozenset[str] = field(default_factory=frozenset)


_AVERAGE_TIMES = frozenset({"avg_xact_time", "avg_query_time", "avg_wait_time", "avg_query"})
_DATABASE_SETTINGS = frozenset(
    {"host", "port", "database", "force_user", "pool_size", "min_pool_size", "reserve_pool_size",
     "server_lifetime", "pool_mode", "load_balance_hosts", "max_connections",
     "max_client_connections", "paused", "disabled", "reserve_pool"}
)  # fmt: skip
_USER_SETTINGS = frozenset(
    {"pool_size", "reserve_pool_size", "pool_mode", "max_user_connections",
     "max_user_client_connections"}
)  # fmt: skip
RULES: dict[str, Rule] = {
    "pools": Rule(
        key=("database", "user"),
        keep=frozenset({"pool_mode", "load_balance_hosts"}),
        maximum=frozenset({"maxwait", "maxwait_us"}),
    ),
    "stats": Rule(key=("database",), mean=_AVERAGE_TIMES),
    "stats_totals": Rule(key=("database",)),
    "stats_averages": Rule(
        key=("database",), mean=frozenset({"xact_time", "query_time", "wait_time"})
    ),
    "totals": Rule(key=("name",), mean_rows=_AVERAGE_TIMES),
    "clients": Rule(),
    "servers": Rule(),
    "databases": Rule(key=("name",), keep=_DATABASE_SETTINGS),
    "users": Rule(key=("name",), keep=_USER_SETTINGS),
    "lists": Rule(key=("list",), kept_rows=frozenset({"databases", "users"})),
    "routes": Rule(key=("database", "target", "reason")),
    "pins": Rule(key=("reason",)),
}


@dataclass
class Result:
    """One SHOW answer taken apart: its columns and rows (text or NULL); anything else (a
    notice, an error) makes it unmergeable."""

    columns: list[str]
    rows: list[list[str | None]]


def parse_result(data: bytes) -> Result | None:
    """RowDescription, DataRows, CommandComplete (and ReadyForQuery) -> Result."""
    columns: list[str] | None = None
    rows: list[list[str | None]] = []
    pos = 0
    while pos + 5 <= len(data):
        kind = data[pos : pos + 1]
        (length,) = struct.unpack_from("!i", data, pos + 1)
        body = data[pos + 5 : pos + 1 + length]
        pos += 1 + length
        if kind == b"T":
            columns = []
            (count,) = struct.unpack_from("!h", body, 0)
            at = 2
            for _ in range(count):
                end = body.index(b"\0", at)
                columns.append(body[at:end].decode())
                at = end + 1 + 18
        elif kind == b"D":
            (count,) = struct.unpack_from("!h", body, 0)
            at = 2
            row: list[str | None] = []
            for _ in range(count):
                (size,) = struct.unpack_from("!i", body, at)
                at += 4
                if size < 0:
                    row.append(None)
                else:
                    row.append(body[at : at + size].decode())
                    at += size
            rows.append(row)
        elif kind not in (b"C", b"Z"):
            return None
    return None if columns is None else Result(columns, rows)


def render_result(result: Result) -> bytes:
    out = [m.row_description(result.columns)]
    out += [m.data_row(list(row)) for row in result.rows]
    out.append(m.command_complete("SHOW"))
    return b"".join(out)


def merge_results(rule: Rule, results: Iterable[Result]) -> Result:
    """Several workers' answers to one SHOW as one answer (the first one's columns)."""
    results = list(results)
    first = results[0]
    columns = first.columns
    if not rule.key:
        return Result(columns, [row for r in results if r.columns == columns for row in r.rows])
    key_at = [columns.index(c) for c in rule.key]
    merged: dict[tuple[str | None, ...], list[list[str | None]]] = {}
    for result in results:
        if result.columns != columns:
            continue
        for row in result.rows:
            merged.setdefault(tuple(row[i] for i in key_at), []).append(row)
    return Result(columns, [_combine(rule, columns, rows) for rows in merged.values()])


def _combine(rule: Rule, columns: list[str], rows: list[list[str | None]]) -> list[str | None]:
    out = list(rows[0])
    name = out[0] if out else None
    for i, column in enumerate(columns):
        if column in rule.key or column in rule.keep or name in rule.kept_rows:
            continue
        numbers = [_int(row[i]) for row in rows]
        if any(n is None for n in numbers):
            continue  # not a number: the first worker's value
        values = [n for n in numbers if n is not None]
        if column in rule.maximum:
            out[i] = str(max(values))
        elif column in rule.mean or name in rule.mean_rows:
            nonzero = [v for v in values if v]
            out[i] = str(sum(nonzero) // len(nonzero) if nonzero else 0)
        else:
            out[i] = str(sum(values))
    return out


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None
