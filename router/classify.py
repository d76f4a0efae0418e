"""Statement classification: may this SQL text run on a replica?

Correctness first: a statement is ``read_only`` only when PostgreSQL's own grammar (pglast) proves
it reads and nothing else. Anything unknown, unparsable or merely *possibly* writing is not
read-only and goes to the primary: a wrong replica route is a bug, a missed one only a cost.

Hot path: results are cached per exact statement text (LRU), so the parser runs once per distinct
text. On a miss we use ``parse_sql_json`` + ``json.loads`` rather than ``pglast.parse_sql``: the
same PostgreSQL parse tree, about five times cheaper, because no Python AST objects are built.
The tree is walked generically (every dict and list), so no node type can hide a function call.

Pure module: no I/O, no asyncio, no logging, no imports from the rest of pgrouter.
"""

from __future__ import annotations

import enum
import json
import re
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Final

from pglast import ast as _ast
from pglast.parser import ParseError, parse_sql_json, scan

__all__ = [
    "BUILTIN_WRITERS",
    "VOLATILE_FUNCTIONS_SQL",
    "Classifier",
    "Target",
    "Verdict",
    "strip_hint",
]


class Target(enum.Enum):
    """Where a statement may go."""

    PRIMARY = "primary"
    REPLICA = "replica"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The classifier's answer for one SQL text (shared between callers: it is immutable).

    ``reason`` is short and machine-friendly (a metrics label): ``select``, ``values``, ``show``,
    ``explain``, ``copy_to``, ``multi_statement``, ``hint_replica`` when read-only; otherwise
    e.g. ``write``, ``ddl``, ``parse_error``, ``locking_clause``, ``select_into``,
    ``writing_cte``, ``writing_function:<name>``, ``volatile_function:<name>``,
    ``transaction_control``, ``set``, ``set_route``, ``set_route_invalid``,
    ``multi_statement_write``, ``hint_primary``, ``empty``, ``too_long``, ``copy_from``,
    ``copy_to_file``, ``lock``, ``do``, ``call``, ``listen``, ``prepare``, ``execute``,
    ``cursor``, ``maintenance``, ``internal_error``, ``utility``. ``hint`` is recorded whatever
    the verdict; a replica hint never makes a statement read-only.

    ``sets_route`` is set for ``SET pgrouter.route`` (answered by the proxy, never sent to a
    server): ``Target.PRIMARY``, ``Target.REPLICA`` or ``"auto"`` (also for ``RESET`` / ``TO
    DEFAULT``). With reason ``set_route_invalid`` it holds the unrecognised value (a string the
    caller must reject with an error).
    """

    read_only: bool
    reason: str
    hint: Target | None = None
    begins: bool = False
    read_only_txn: bool = False
    default_access: bool = False  # BEGIN without READ ONLY/WRITE: the session default decides
    ends: bool = False
    writes_catalog: bool = False
    sets_route: Target | str | None = None


# Functions that write, take node-local locks, change session state or otherwise must not run on
# a replica. Generous on purpose: a missing name is a misroute, an extra one only a cost.
BUILTIN_WRITERS: Final[frozenset[str]] = frozenset(
    {
        # sequences (currval/lastval are session-local: they must run where nextval ran)
        "nextval",
        "setval",
        "currval",
        "lastval",
        # advisory locks: local to one server, so taking them on a replica breaks exclusion
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_advisory_unlock",
        "pg_advisory_unlock_shared",
        "pg_advisory_unlock_all",
        "pg_advisory_xact_lock",
        "pg_advisory_xact_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
        "pg_try_advisory_xact_lock",
        "pg_try_advisory_xact_lock_shared",
        # notifications and session settings disguised as SELECT
        "pg_notify",
        "set_config",
        "setseed",
        # large objects (descriptors are transaction-local; lo_get is the read-only one)
        "lo_creat",
        "lo_create",
        "lo_import",
        "lo_export",
        "lo_unlink",
        "lo_put",
        "lo_from_bytea",
        "lo_truncate",
        "lo_truncate64",
        "lo_open",
        "lo_close",
        "lo_lseek",
        "lo_lseek64",
        "lo_tell",
        "lo_tell64",
        "lowrite",
        "loread",
        "lo_write",
        "lo_read",
        # transaction ids and snapshots (assigning an xid fails during recovery)
        "txid_current",
        "txid_current_if_assigned",
        "pg_current_xact_id",
        "pg_current_xact_id_if_assigned",
        "pg_export_snapshot",
        # WAL and backup control (error during recovery)
        "pg_switch_wal",
        "pg_switch_xlog",
        "pg_create_restore_point",
        "pg_start_backup",
        "pg_stop_backup",
        "pg_backup_start",
        "pg_backup_stop",
        "pg_current_wal_lsn",
        "pg_current_wal_insert_lsn",
        "pg_current_wal_flush_lsn",
        "pg_current_xlog_location",
        "pg_current_xlog_insert_location",
        "pg_current_xlog_flush_location",
        "pg_walfile_name",
        "pg_walfile_name_offset",
        "pg_log_standby_snapshot",
        "pg_logical_emit_message",
        "pg_promote",
        "pg_wal_replay_pause",
        "pg_wal_replay_resume",
        # replication slots and origins
        "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot",
        "pg_copy_physical_replication_slot",
        "pg_copy_logical_replication_slot",
        "pg_drop_replication_slot",
        "pg_replication_slot_advance",
        "pg_sync_replication_slots",
        "pg_logical_slot_get_changes",
        "pg_logical_slot_get_binary_changes",
        "pg_logical_slot_peek_changes",
        "pg_logical_slot_peek_binary_changes",
        "pg_replication_origin_create",
        "pg_replication_origin_drop",
        "pg_replication_origin_advance",
        "pg_replication_origin_session_setup",
        "pg_replication_origin_session_reset",
        "pg_replication_origin_xact_setup",
        "pg_replication_origin_xact_reset",
        # server administration (node-local effects)
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_rotate_logfile_old",
        "pg_log_backend_memory_contexts",
        "pg_import_system_collations",
        "pg_extension_config_dump",
        "pg_nextoid",
        "pg_stop_making_pinned_objects",
        "brin_summarize_new_values",
        "brin_summarize_range",
        "brin_desummarize_range",
        "gin_clean_pending_list",
        # statistics resets
        "pg_stat_reset",
        "pg_stat_reset_shared",
        "pg_stat_reset_slru",
        "pg_stat_reset_single_table_counters",
        "pg_stat_reset_single_function_counters",
        "pg_stat_reset_replication_slot",
        "pg_stat_reset_subscription_stats",
        "pg_stat_reset_backend_stats",
        "pg_stat_statements_reset",
        # run an arbitrary query string (could be DML) or read a session-local cursor
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "ts_stat",
        # remote writes and session-bound connections
        "dblink",
        "dblink_exec",
        "dblink_open",
        "dblink_fetch",
        "dblink_close",
        "dblink_connect",
        "dblink_connect_u",
        "dblink_disconnect",
        "dblink_send_query",
        "dblink_get_result",
        "dblink_cancel_query",
        "postgres_fdw_disconnect",
        "postgres_fdw_disconnect_all",
    }
)

# Run per database (on the primary) to learn user-defined VOLATILE functions, and operators backed
# by one. Returns one lower-case ``name`` column holding both ``schema.name`` and bare ``name``.
# Trigger functions and procedures are skipped: they cannot be called from a query.
VOLATILE_FUNCTIONS_SQL: Final[str] = """\
SELECT lower(v.name) AS name
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
CROSS JOIN LATERAL (VALUES (p.proname::text), (n.nspname || '.' || p.proname)) AS v(name)
WHERE p.provolatile = 'v'
  AND p.prokind <> 'p'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND p.prorettype NOT IN ('pg_catalog.trigger'::pg_catalog.regtype,
                           'pg_catalog.event_trigger'::pg_catalog.regtype)
UNION
SELECT lower(v.name)
FROM pg_catalog.pg_operator o
JOIN pg_catalog.pg_proc p ON p.oid = o.oprcode
JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
CROSS JOIN LATERAL (VALUES (o.oprname::text), (n.nspname || '.' || o.oprname)) AS v(name)
WHERE p.provolatile = 'v'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')"""

_HINT_RE: Final = re.compile(
    r"\A\s*(?:"
    r"/\*\s*pgrouter\s*:\s*(primary|replica)\s*\*/"
    r"|--[ \t]*pgrouter[ \t]*:[ \t]*(primary|replica)[ \t]*(?:\r\n|\r|\n|\Z)"
    r")",
    re.IGNORECASE,
)


def strip_hint(sql: str) -> tuple[Target | None, str]:
    """Split a leading ``/* pgrouter: primary|replica */`` (or ``-- pgrouter: ...`` line) hint.

    Only a hint before anything else counts, so a comment inside the statement (or a string
    literal that looks like one) never changes routing. Returns ``(hint, rest_of_text)``.
    """
    m = _HINT_RE.match(sql)
    if m is None:
        return None, sql
    word = (m.group(1) or m.group(2)).lower()
    return (Target.PRIMARY if word == "primary" else Target.REPLICA), sql[m.end() :]


# --- node-type tables (keys of libpg_query's JSON tree) -------------------------------------------

_DML: Final = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "TruncateStmt"})
_DDL_EXTRA: Final = frozenset(
    {
        "CommentStmt",
        "CompositeTypeStmt",
        "DefineStmt",
        "GrantRoleStmt",
        "GrantStmt",
        "ImportForeignSchemaStmt",
        "IndexStmt",
        "ReassignOwnedStmt",
        "RenameStmt",
        "ReplicaIdentityStmt",
        "RuleStmt",
        "SecLabelStmt",
        "ViewStmt",
    }
)
_UTILITY_REASONS: Final[dict[str, str]] = {
    "CallStmt": "call",
    "LockStmt": "lock",
    "ListenStmt": "listen",
    "UnlistenStmt": "unlisten",
    "NotifyStmt": "notify",
    "DiscardStmt": "discard",
    "DeallocateStmt": "deallocate",
    "PrepareStmt": "prepare",
    "ExecuteStmt": "execute",
    "DeclareCursorStmt": "cursor",
    "FetchStmt": "cursor",
    "ClosePortalStmt": "cursor",
    "VacuumStmt": "maintenance",
    "ClusterStmt": "maintenance",
    "ReindexStmt": "maintenance",
    "CheckPointStmt": "maintenance",
    "RefreshMatViewStmt": "write",
    "LoadStmt": "utility",
    "ConstraintsSetStmt": "utility",
}
_TXN_BEGIN: Final = frozenset({"TRANS_STMT_BEGIN", "TRANS_STMT_START"})
_TXN_END: Final = frozenset({"TRANS_STMT_COMMIT", "TRANS_STMT_ROLLBACK", "TRANS_STMT_PREPARE"})
_TRUE_WORDS: Final = frozenset({"on", "true", "yes", "1", "t", "y"})
_ROUTE_GUC: Final = "pgrouter.route"
_ROUTE_VALUES: Final[dict[str, Target | str]] = {
    "primary": Target.PRIMARY,
    "replica": Target.REPLICA,
    "auto": "auto",
}

# How the generic walk of a read query treats each JSON key. Keys are node type names
# (``{"FuncCall": {...}}``) or field names; both tables come from pglast's own node definitions,
# so the walk stays exhaustive across parser versions (an unknown key is simply descended into).
_K_PLAIN, _K_LEAF, _K_STMT, _K_FUNC, _K_COLREF, _K_INDIRECTION, _K_OPERATOR = range(7)
_K_LOCKING, _K_INTO = 7, 8


def _walk_table() -> dict[str, int]:
    """Map every node type and field name pglast knows to how ``_scan_read`` treats it."""
    table: dict[str, int] = {}
    for name in dir(_ast):
        cls = getattr(_ast, name)
        slots = getattr(cls, "__slots__", None)
        if isinstance(cls, type) and issubclass(cls, _ast.Node) and isinstance(slots, dict):
            table[name] = _K_STMT if name.endswith("Stmt") and name != "SelectStmt" else _K_PLAIN
            for field in slots:
                table.setdefault(field, _K_PLAIN)
    table.update(
        {
            # leaves: nothing below them can call a function
            "String": _K_LEAF,
            "A_Const": _K_LEAF,
            "A_Star": _K_LEAF,
            "ParamRef": _K_LEAF,
            "Integer": _K_LEAF,
            "Float": _K_LEAF,
            "Boolean": _K_LEAF,
            "BitString": _K_LEAF,
            "RangeVar": _K_LEAF,
            "location": _K_LEAF,
            "SelectStmt": _K_PLAIN,
            "FuncCall": _K_FUNC,
            "ColumnRef": _K_COLREF,  # t.f is f(t): attribute notation calls a function
            "A_Indirection": _K_INDIRECTION,  # (expr).f likewise
            "A_Expr": _K_OPERATOR,  # operators run functions (user-defined ones may be volatile)
            "SubLink": _K_OPERATOR,
            "SortBy": _K_OPERATOR,
            "lockingClause": _K_LOCKING,
            "LockingClause": _K_LOCKING,
            "intoClause": _K_INTO,
            "IntoClause": _K_INTO,
        }
    )
    return table


_WALK_KEYS: Final[dict[str, int]] = _walk_table()
_OPERATOR_FIELDS: Final = ("name", "operName", "useOp")

# Shared verdicts for the common fixed outcomes.
_EMPTY: Final = Verdict(False, "empty")
_PARSE_ERROR: Final = Verdict(False, "parse_error")
_TOO_LONG: Final = Verdict(False, "too_long")
_INTERNAL_ERROR: Final = Verdict(False, "internal_error")
_SELECT: Final = Verdict(True, "select")
_VALUES: Final = Verdict(True, "values")
_SHOW: Final = Verdict(True, "show")
_EXPLAIN: Final = Verdict(True, "explain")
_COPY_TO: Final = Verdict(True, "copy_to")
_SET: Final = Verdict(False, "set")
_WRITE: Final = Verdict(False, "write")
_DDL: Final = Verdict(False, "ddl", writes_catalog=True)


def _names(items: Any) -> list[str]:
    """The ``sval`` of each ``String`` node in a name list (``[schema, name]``, operators...)."""
    out: list[str] = []
    if type(items) is list:
        for item in items:
            if type(item) is dict:
                s = item.get("String")
                if s is not None:
                    out.append(str(s.get("sval", "")).lower())
    return out


def _const_text(node: Any) -> str | None:
    """Text of an ``A_Const`` (string, integer, boolean; omitted fields mean zero/false)."""
    if type(node) is not dict:
        return None
    const = node.get("A_Const")
    if type(const) is not dict:
        return None
    if "sval" in const:
        return str(const["sval"].get("sval", ""))
    if "ival" in const:
        return str(const["ival"].get("ival", 0))
    if "boolval" in const:
        return "true" if const["boolval"].get("boolval", False) else "false"
    return None


def _txn_read_only(options: Any) -> bool:
    """True when transaction options say READ ONLY and nothing makes a replica refuse it.

    SERIALIZABLE is not available on a hot standby, so a SERIALIZABLE READ ONLY transaction is
    reported as not replica-safe.
    """
    read_only = False
    if type(options) is not list:
        return False
    for item in options:
        elem = item.get("DefElem") if type(item) is dict else None
        if type(elem) is not dict:
            return False
        name = elem.get("defname")
        value = (_const_text(elem.get("arg")) or "").lower()
        if name == "transaction_read_only":
            read_only = value in _TRUE_WORDS
            if not read_only:
                return False
        elif name == "transaction_isolation" and value == "serializable":
            return False
    return read_only


def _default_access(options: Any) -> bool:
    """True when transaction options leave the access mode (and serializable) to the session."""
    if not options:
        return True
    if type(options) is not list:
        return False
    for item in options:
        elem = item.get("DefElem") if type(item) is dict else None
        if type(elem) is not dict or elem.get("defname") == "transaction_read_only":
            return False
        value = (_const_text(elem.get("arg")) or "").lower()
        if elem.get("defname") == "transaction_isolation" and value == "serializable":
            return False
    return True


_SET_SCOPE_TOKENS: Final = frozenset({"SESSION", "LOCAL"})
_COMMENT_TOKENS: Final = frozenset({"C_COMMENT", "SQL_COMMENT"})


def _unquoted_primary_route(sql: str) -> Verdict | None:
    """Recognise ``SET pgrouter.route = primary`` (or ``TO``), which PostgreSQL cannot parse.

    PRIMARY is a reserved word, so the grammar rejects it unquoted; the proxy answers this SET
    itself, so we accept it, matched on PostgreSQL's own tokens (comments skipped).
    """
    try:
        tokens = [t for t in scan(sql) if t.name not in _COMMENT_TOKENS]
    except Exception:
        return None
    while tokens and tokens[-1].name == "ASCII_59":  # trailing semicolons
        tokens.pop()
    if len(tokens) < 4 or tokens[0].name != "SET" or tokens[-1].name != "PRIMARY":
        return None
    if tokens[-2].name not in ("ASCII_61", "TO"):
        return None
    middle = tokens[1:-2]
    if middle and middle[0].name in _SET_SCOPE_TOKENS:
        middle = middle[1:]
    name = []
    for t in middle:
        text = sql[t.start : t.end + 1]
        if t.name == "IDENT":
            name.append(text[1:-1] if text.startswith('"') else text)
        elif t.name == "ASCII_46":
            name.append(".")
        else:
            return None
    if "".join(name).lower() != _ROUTE_GUC:
        return None
    return Verdict(False, "set_route", sets_route=Target.PRIMARY)


# No `$` in the classes: texts with one are not normalised at all (see below), and every
# character class less makes the substitution faster.
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])")


def normalize_numbers(sql: str) -> str:
    """The text with standalone numeric literals replaced by 0, for the cache key.

    Texts with quoted identifiers or dollar signs (a digit there can be part of a name or a
    tag) and texts naming pgrouter (hints, SET pgrouter.route, whose values are kept) are
    returned unchanged.
    """
    if '"' in sql or "$" in sql or "pgrouter" in sql.lower():
        return sql
    return _NUMBER.sub("0", sql)


class Classifier:
    """LRU-cached statement classifier for one database.

    ``writing_functions`` are known writers (bare, lower-case names); ``set_volatile_functions``
    adds the database's user-defined VOLATILE functions (learned with ``VOLATILE_FUNCTIONS_SQL``).
    ``allow`` exempts names from both; ``deny`` marks extra writers and wins over ``allow``. A
    name matches by its bare form or by ``schema.name`` as written in the statement, so to allow
    unqualified calls list the bare name (a ``schema.name`` entry allows only qualified calls).

    Texts longer than ``max_parse_length`` characters (``None``: no limit) are not parsed at all
    (reason ``too_long``, not cached): huge batch INSERTs would otherwise stall the event loop.
    The cache holds at most ``cache_size`` texts and ``max_cache_bytes`` characters of them (one
    text at most 1/16 of that), so unique multi-kilobyte statements cannot exhaust memory.

    One instance per database: the learned VOLATILE set is per database.

    ``hits``, ``misses`` and ``parse_seconds`` are plain counters for a metrics collector.
    """

    __slots__ = (
        "_allow",
        "_cache",
        "_cache_chars",
        "_deny",
        "_max_cache_bytes",
        "_max_entry",
        "_max_parse_length",
        "_suspects",
        "_volatile",
        "_writers",
        "cache_size",
        "hits",
        "misses",
        "parse_seconds",
    )

    def __init__(
        self,
        cache_size: int = 10000,
        writing_functions: frozenset[str] = BUILTIN_WRITERS,
        allow: frozenset[str] = frozenset(),
        deny: frozenset[str] = frozenset(),
        *,
        max_parse_length: int | None = 65536,
        max_cache_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.cache_size = max(0, cache_size)
        self._writers = frozenset(n.lower() for n in writing_functions)
        self._allow = frozenset(n.lower() for n in allow)
        self._deny = frozenset(n.lower() for n in deny)
        self._volatile: frozenset[str] = frozenset()
        self._suspects = self._writers | self._deny
        self._max_parse_length = max_parse_length
        self._max_cache_bytes = max_cache_bytes
        # One text may use at most 1/16 of the budget, so a burst of big ones cannot flush all.
        self._max_entry = max_cache_bytes // 16
        self._cache: OrderedDict[str, Verdict] = OrderedDict()
        self._cache_chars = 0
        self.hits = 0
        self.misses = 0
        self.parse_seconds = 0.0

    # --- public API --------------------------------------------------------------------------

    def classify(self, sql: str) -> Verdict:
        """Classify one simple-Query or Parse text; the parser runs only on a cache miss.

        Texts that differ only in numbers (simple-protocol clients inline their values)
        share one entry: a number's value never changes a statement's verdict.
        """
        cache = self._cache
        verdict = cache.get(sql)
        if verdict is not None:
            cache.move_to_end(sql)
            self.hits += 1
            return verdict
        key = normalize_numbers(sql)
        if key != sql:
            verdict = cache.get(key)
            if verdict is not None:
                cache.move_to_end(key)
                self.hits += 1
                return verdict
        return self._miss(sql, key)

    def set_volatile_functions(self, names: Iterable[str]) -> None:
        """Replace the learned VOLATILE function names (``name`` and ``schema.name``).

        Cached verdicts may depend on them, so the cache is cleared -- but only when the set
        actually changed, so periodic refreshes that learn nothing new cost nothing.
        """
        volatile = frozenset(n.lower() for n in names)
        if volatile != self._volatile:
            self._volatile = volatile
            self._suspects = self._writers | self._deny | volatile
            self.clear_cache()

    @property
    def volatile_functions(self) -> frozenset[str]:
        """The learned VOLATILE names currently in effect."""
        return self._volatile

    def clear_cache(self) -> None:
        """Forget every cached verdict (counters are kept: they are monotonic for Prometheus)."""
        self._cache.clear()
        self._cache_chars = 0

    @property
    def cached(self) -> int:
        """Number of cached texts (a gauge for metrics)."""
        return len(self._cache)

    # --- miss path ---------------------------------------------------------------------------

    def _miss(self, sql: str, key: str) -> Verdict:
        self.misses += 1
        start = time.perf_counter()
        verdict = self._classify_uncached(sql)
        self.parse_seconds += time.perf_counter() - start
        size = len(key)
        limit = self._max_parse_length
        if self.cache_size and size <= self._max_entry and (limit is None or size <= limit):
            cache = self._cache
            cache[key] = verdict
            self._cache_chars += size
            while len(cache) > self.cache_size or self._cache_chars > self._max_cache_bytes:
                old, _ = cache.popitem(last=False)
                self._cache_chars -= len(old)
        return verdict

    def _classify_uncached(self, sql: str) -> Verdict:
        """Parse and classify; never raises (an internal failure is a primary route)."""
        hint, _ = strip_hint(sql)
        limit = self._max_parse_length
        if limit is not None and len(sql) > limit:
            base = _TOO_LONG
        else:
            try:
                tree = json.loads(parse_sql_json(sql))
                base = self._classify_statements(tree.get("stmts") or [])
            except ParseError:
                base = _unquoted_primary_route(sql) or _PARSE_ERROR
            except Exception:  # a classifier bug must not break the session: go to the primary
                base = _INTERNAL_ERROR
        if hint is None:
            return base
        if hint is Target.PRIMARY:
            return replace(base, read_only=False, reason="hint_primary", hint=hint)
        # A replica hint never makes anything read-only (a VOLATILE user function counts as a
        # writer: list it in ``allow`` instead); a write keeps its own reason.
        if base.read_only:
            return replace(base, reason="hint_replica", hint=hint)
        return replace(base, hint=hint)

    def _classify_statements(self, stmts: list[Any]) -> Verdict:
        if not stmts:
            return _EMPTY
        if len(stmts) == 1:
            return self._classify_node(stmts[0].get("stmt"))
        parts = [self._classify_node(raw.get("stmt")) for raw in stmts]
        read_only = all(p.read_only for p in parts)
        return Verdict(
            read_only=read_only,
            reason="multi_statement" if read_only else "multi_statement_write",
            begins=any(p.begins for p in parts),
            ends=any(p.ends for p in parts),
            writes_catalog=any(p.writes_catalog for p in parts),
        )

    def _classify_node(self, node: Any) -> Verdict:
        """Classify one statement node ``{"NodeType": {...fields}}``."""
        if type(node) is not dict or len(node) != 1:
            return _INTERNAL_ERROR
        ((kind, body),) = node.items()
        if type(body) is not dict:
            return _INTERNAL_ERROR
        if kind == "SelectStmt":
            problem = self._scan_read(body)
            if problem is not None:
                return Verdict(False, problem)
            return _VALUES if "valuesLists" in body and "targetList" not in body else _SELECT
        if kind == "VariableShowStmt":
            return _SHOW
        if kind == "ExplainStmt":
            # Plain EXPLAIN runs nothing, but EXPLAIN EXECUTE needs the session's prepared
            # statement and EXPLAIN ANALYZE executes: follow the explained statement's route.
            inner = self._classify_node(body.get("query"))
            if inner.read_only:
                return _EXPLAIN
            return Verdict(False, inner.reason, writes_catalog=inner.writes_catalog)
        if kind == "TransactionStmt":
            txn = body.get("kind")
            if txn in _TXN_BEGIN:
                options = body.get("options")
                return Verdict(
                    False,
                    "transaction_control",
                    begins=True,
                    read_only_txn=_txn_read_only(options),
                    default_access=_default_access(options),
                )
            return Verdict(False, "transaction_control", ends=txn in _TXN_END)
        if kind == "VariableSetStmt":
            return self._classify_set(body)
        if kind == "CopyStmt":
            return self._classify_copy(body)
        if kind in _DML:
            return _WRITE
        if kind == "DoStmt":  # arbitrary code, often a migration creating functions
            return Verdict(False, "do", writes_catalog=True)
        if kind.startswith(("Create", "Alter", "Drop")) or kind in _DDL_EXTRA:
            return _DDL
        return Verdict(False, _UTILITY_REASONS.get(kind, "utility"))

    def _classify_set(self, body: dict[str, Any]) -> Verdict:
        name = str(body.get("name", "")).lower()
        setkind = body.get("kind")
        if name == _ROUTE_GUC:
            if setkind in ("VAR_SET_DEFAULT", "VAR_RESET"):
                return Verdict(False, "set_route", sets_route="auto")
            args = body.get("args") or []
            value = _const_text(args[0]) if len(args) == 1 else None
            route = _ROUTE_VALUES.get((value or "").strip().lower())
            if route is None:
                return Verdict(False, "set_route_invalid", sets_route=value or "")
            return Verdict(False, "set_route", sets_route=route)
        if setkind == "VAR_SET_MULTI" and name == "transaction":
            return Verdict(False, "set", read_only_txn=_txn_read_only(body.get("args")))
        if setkind == "VAR_SET_VALUE" and name == "transaction_read_only":
            args = body.get("args") or []
            value = _const_text(args[0]) if len(args) == 1 else None
            return Verdict(False, "set", read_only_txn=(value or "").lower() in _TRUE_WORDS)
        return _SET

    def _classify_copy(self, body: dict[str, Any]) -> Verdict:
        if body.get("is_from"):
            return Verdict(False, "copy_from")
        if body.get("filename") or body.get("is_program"):
            return Verdict(False, "copy_to_file")  # writes a file / runs a program on the server
        query = body.get("query")
        if query is not None:
            inner = self._classify_node(query)
            if not inner.read_only:
                return Verdict(False, inner.reason, writes_catalog=inner.writes_catalog)
        elif "relation" not in body:
            return Verdict(False, "utility")
        return _COPY_TO

    def _scan_read(self, root: dict[str, Any]) -> str | None:
        """Walk a whole SELECT tree; return why it is not read-only, or None if it is.

        Generic over every dict and list, so subqueries, CTEs, FROM functions, LATERAL, WHERE,
        ORDER BY, LIMIT... are all covered without naming them.
        """
        stack: list[Any] = [root]
        pop = stack.pop
        push = stack.append
        walk_keys = _WALK_KEYS
        while stack:
            item = pop()
            if type(item) is list:
                for x in item:
                    if type(x) is dict or type(x) is list:
                        push(x)
                continue
            for key, value in item.items():
                what = walk_keys.get(key)
                if what == _K_PLAIN:
                    if type(value) is dict or type(value) is list:
                        push(value)
                    continue
                if what == _K_LEAF:
                    continue
                if what is None:  # a node type this pglast does not know: be careful
                    if key[:1].isupper() and key.endswith("Stmt"):
                        return "writing_cte"
                    if type(value) is dict or type(value) is list:
                        push(value)
                    continue
                if what == _K_STMT:
                    return "writing_cte"  # INSERT/UPDATE/DELETE/MERGE inside WITH
                if what == _K_LOCKING:
                    if value:
                        return "locking_clause"
                    continue
                if what == _K_INTO:
                    if value:
                        return "select_into"
                    continue
                if type(value) is not dict:
                    continue
                problem = self._check(what, value)
                if problem is not None:
                    return problem
                if what != _K_COLREF:  # a ColumnRef holds only names
                    push(value)
        return None

    def _check(self, what: int, value: dict[str, Any]) -> str | None:
        """Check the names a FuncCall, ColumnRef, A_Indirection or operator node may call."""
        if what == _K_FUNC:
            return self._function_problem(_names(value.get("funcname")))
        if what == _K_COLREF:
            fields = value.get("fields")
            if type(fields) is list and len(fields) >= 2:
                return self._function_problem(_names(fields[-1:]))
            return None
        if what == _K_INDIRECTION:
            for name in _names(value.get("indirection")):
                problem = self._function_problem([name])
                if problem is not None:
                    return problem
            return None
        for field in _OPERATOR_FIELDS:  # _K_OPERATOR
            names = value.get(field)
            if names is not None:
                return self._function_problem(_names(names))
        return None

    def _function_problem(self, parts: list[str]) -> str | None:
        """Why calling ``parts`` (``[..., schema, name]``) is not read-only, or None."""
        if not parts:
            return None
        bare = parts[-1]
        suspects = self._suspects
        qualified = f"{parts[-2]}.{bare}" if len(parts) >= 2 else bare
        if bare not in suspects and qualified not in suspects:
            return None  # the common case: an ordinary function, column or operator
        if bare in self._deny or qualified in self._deny:
            return "writing_function:" + qualified
        if bare in self._allow or qualified in self._allow:
            return None
        if bare in self._writers or qualified in self._writers:
            return "writing_function:" + qualified
        if bare in self._volatile or qualified in self._volatile:
            return "volatile_function:" + qualified
        return None
