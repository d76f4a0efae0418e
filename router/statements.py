"""Named prepared statements in transaction mode: one client's names, every server's own.

Drivers prepare a statement once (asyncpg's `__asyncpg_stmt_1__`, psycopg's `_pg3_0`, pgbench's
`P_0`) and bind it in later transactions, which may run on any server connection of any
backend. Each distinct Parse body (text and parameter types) gets one pgrouter name; a server
connection remembers which of them it holds (LRU, `max_prepared_statements`). The client's
messages are rewritten on their way out: its names become ours, and a Bind or Describe of a
statement the server lacks is preceded by our own Parse.

Some rewrites change what the server answers, so those replies are changed back: the
ParseComplete of our own Parse and the CloseComplete of our own Close (an evicted statement,
or an older copy re-parsed for a client's Parse) are swallowed, and a duplicate name is turned
into a failing Describe whose error becomes PostgreSQL's 42P05. Replies are aligned with the
messages that caused them by counting, per batch (the messages up to a Sync, Query or
FunctionCall), the message that ends each reply. Only batches with such a rewrite, or spanning
several client chunks (a Flush before the Sync), are followed message by message; every other
reply is forwarded untouched.

A failed or skipped (after an earlier error in the batch) Parse is undone on both sides, as the
server did not create the statement.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

from protocol import errors as e
from protocol import messages as m

if TYPE_CHECKING:
    from pools.server import ServerConnection

_P, _B, _D, _C, _E, _S, _Q, _F, _Z = b"PBDCESQFZ"
_BOUNDARY = frozenset((_S, _Q, _F))  # each answered by one ReadyForQuery
_ASYNC = frozenset(b"NSA")  # notices, parameter changes, notifications: anywhere
# The message that ends the reply to each frontend message (an ErrorResponse ends any).
_ENDS = {
    _P: frozenset(b"1"),
    _B: frozenset(b"2"),
    _C: frozenset(b"3"),
    _D: frozenset(b"Tn"),
    _E: frozenset(b"CIs"),
}
_ABSENT = b"pgrouter\x01absent"  # a name no statement or portal has
PARSE_COMPLETE = b"1\x00\x00\x00\x04"

# Statements that may change session state: SET/RESET/DISCARD/LISTEN/... at the start of a
# statement, or temporary objects, set_config and advisory locks anywhere. A false positive
# costs one state check at the end of the transaction; a miss leaves that state untracked
# (state changed inside a DO block or a procedure is not seen). Every test runs on lower-cased
# bytes, cheapest first: most queries stop at the first one.
_MAYBE_STATE = re.compile(
    rb"set|listen|temp|prepare|deallocate|declare|discard|advisory|close|drop"
)
_STATEMENT_START = re.compile(
    rb"\s*(?:(?:--[^\n]*\n|/\*.*?\*/)\s*)*"
    rb"(?:set|reset|discard|listen|unlisten|prepare|deallocate|declare|close|drop)\b",
    re.S,
)
_TEMPORARY = re.compile(rb"\btemp(?:orary)?\b")


def _touches(low: bytes | bytearray, start: int) -> bool:
    """`low`: lower-cased SQL beginning at `start`."""
    if _MAYBE_STATE.search(low, start) is None:
        return False
    if b"set_config" in low or b"advisory_" in low:
        return True
    if b"temp" in low and _TEMPORARY.search(low, start) is not None:
        return True
    at = start - 1  # each statement starts at the beginning or after a semicolon
    while True:
        if _STATEMENT_START.match(low, at + 1) is not None:
            return True
        at = low.find(b";", at + 1)
        if at < 0:
            return False


def text_touches_state(text: bytes) -> bool:
    """Whether SQL text may change session state."""
    return _touches(text.lower(), 0)


def query_touches_state(chunk: bytes | bytearray) -> bool:
    """Whether a chunk starting with a Query or Parse message may change session state."""
    low = chunk.lower()
    return _touches(low, 5 if chunk[0] == 81 else low.find(0, 5) + 1)


# Custom (dotted) setting names, which pg_settings does not list: read back by name.
_CUSTOM_SETTING = re.compile(
    rb"(?:\b(?:set|reset)\s+(?:session\s+)?|\bset_config\s*\(\s*')([a-z_][\w$]*\.[\w$.]+)", re.I
)
_DEALLOCATE = re.compile(
    rb'\A\s*deallocate\s+(?:prepare\s+)?("(?:[^"]|"")+"|[^\s;"]+)\s*;?\s*\Z', re.I | re.S
)
_DISCARD_ALL = re.compile(rb"\A\s*discard\s+all\s*;?\s*\Z", re.I)


def custom_settings(text: bytes | bytearray) -> list[str]:
    """Dotted setting names (myapp.tenant) a statement sets or resets."""
    return [m.group(1).decode("utf-8", "replace").lower() for m in _CUSTOM_SETTING.finditer(text)]


def _message(kind: int, body: bytes) -> bytes:
    return m.message(bytes((kind,)), body)


def _renamed(data: bytes, pos: int, end: int, name_at: int, name_end: int, name: bytes) -> bytes:
    """The Bind at data[pos:end] with the statement name at data[name_at:name_end] replaced."""
    size = end - pos - 1 + len(name) - (name_end - name_at)
    return b"".join(
        (b"B", size.to_bytes(4, "big"), data[pos + 5 : name_at], name, data[name_end:end])
    )


_FAILING_DESCRIBE = _message(_D, b"S" + _ABSENT + b"\x00")  # a statement nobody has: 26000


class Statement:
    """One distinct Parse body, shared by every client that prepares it."""

    __slots__ = ("body", "name", "parse", "sql", "touches", "valid")

    def __init__(self, name: bytes, body: bytes) -> None:
        self.name = name
        self.valid = False  # a server accepted it once
        self.body = body  # the text, its NUL and the parameter types
        self.parse = _message(_P, name + b"\x00" + body)
        text = body[: body.index(0)]
        self.sql = text.decode("utf-8", "replace")
        self.touches = text_touches_state(text)


class StatementRegistry:
    """Parse bodies to statements, for the whole process; names are never reused."""

    __slots__ = ("_by_body", "_next", "limit")

    def __init__(self, limit: int = 100_000) -> None:
        self._by_body: dict[bytes, Statement] = {}
        self._next = 0
        self.limit = limit

    def get(self, body: bytes) -> Statement:
        statement = self._by_body.get(body)
        if statement is None:
            if len(self._by_body) >= self.limit:
                self._by_body.clear()  # clients keep theirs; a new Parse gets a new name
            self._next += 1
            statement = Statement(b"pgrouter_%x" % self._next, body)
            self._by_body[body] = statement
        return statement

    def known(self, body: bytes) -> Statement | None:
        return self._by_body.get(body)

    def renew(self, old: Statement) -> Statement:
        """The text's statement under a new name: copies prepared before a schema change
        are left to eviction, and every server prepares the new one afresh."""
        current = self._by_body.get(old.body)
        if current is None or current is old:
            self._next += 1
            current = Statement(b"pgrouter_%x" % self._next, old.body)
            current.valid = old.valid
            self._by_body[old.body] = current
        return current

    def __len__(self) -> int:
        return len(self._by_body)


# What to do with the reply that ends a step.
_FORWARD, _SWALLOW, _REPLACE = 0, 1, 2


class _Step:
    """A message sent in a followed batch, what to do with its reply, and what to undo if
    the server did not run it."""

    __slots__ = (
        "action",
        "client",
        "evicted",
        "forgot",
        "kind",
        "name",
        "replaces",
        "reply",
        "statement",
    )

    def __init__(
        self,
        kind: int,
        action: int = _FORWARD,
        reply: bytes = b"",
        statement: Statement | None = None,
        client: Statement | None = None,
        name: bytes = b"",
        evicted: bytes = b"",
        replaces: bool = False,
        forgot: Statement | None = None,
    ) -> None:
        self.kind = kind
        self.action = action
        self.reply = reply  # the replacement of the reply (or of its error, for a Describe)
        self.statement = statement  # prepared on the server by this message
        self.client = client  # the client's name `name` now refers to it
        self.name = name
        self.evicted = evicted  # the server name this Close removes
        self.replaces = replaces  # a fresh Parse after closing the server's older copy
        self.forgot = forgot  # the client's Close made `name` forget it


class _Batch:
    """The messages up to one ReadyForQuery, followed because a reply needs changing."""

    __slots__ = ("failed", "index", "pos", "server", "steps")

    def __init__(self, index: int, server: ServerConnection, steps: list[_Step | int]) -> None:
        self.index = index  # counted per client: the index-th ReadyForQuery ends it
        self.server = server
        self.steps = steps  # a bare int: a frontend kind forwarded unchanged
        self.pos = 0  # the step whose reply is arriving
        self.failed = False


class ClientStatements:
    """One client's prepared statements and the rewriting of its stream.

    `feed` rewrites client bytes for the server they are written to; `replies` fixes that
    server's replies. `sent` and `answered` count ReadyForQuery-producing messages, so each
    followed batch finds its replies in the stream.
    """

    __slots__ = (
        "_batch",
        "_carry",
        "_emit",
        "_hdr",
        "_need",
        "_partial",
        "_reply_need",
        "_steps",
        "answered",
        "batches",
        "custom",
        "max_prepared",
        "names",
        "registry",
        "sent",
        "skip",
        "touched",
        "walking",
    )  # fmt: skip

    def __init__(
        self, registry: StatementRegistry, max_prepared: int, in_flight: int, custom: set[str]
    ) -> None:
        self.registry = registry
        self.max_prepared = max_prepared
        self.names: dict[bytes, Statement] = {}
        self.sent = in_flight  # ReadyForQuery-producing messages sent before we started
        self.answered = 0
        self.skip = 0  # bytes of the next feed that precede the first message to rewrite
        self.touched = False  # a statement that may change session state was sent
        self.custom = custom  # dotted setting names seen in SET/RESET/set_config
        self.batches: deque[_Batch] = deque()  # followed batches still in flight
        self.walking = False  # following server replies message by message
        self._steps: list[_Step | int] = []  # the open batch
        self._batch: _Batch | None = None  # the open batch, when followed
        self._partial = b""  # an incomplete client message held back
        self._need = 0  # client bytes still to pass of a message already forwarded
        self._reply_need = 0  # reply bytes still to pass (or drop) of the current message
        self._emit = True  # forward (True) or drop the rest of the current reply message
        self._hdr = b""  # an incomplete reply header, held back unless _carry
        self._carry = False  # that header was forwarded before we followed replies

    def parse_here(self, buf: bytearray) -> bytes | None:
        """The answer to a lone Parse + Sync outside a transaction (libpq's PQprepare) of a
        text some server already accepted: the name is recorded and the statement prepared
        where it is first used, so a client does not wait for a server just to prepare
        (pgbench blocks on it while its other clients hold servers). None: not that case."""
        end = 1 + int.from_bytes(buf[1:5], "big")
        if end + 5 != len(buf):
            return None
        name_end = buf.index(0, 5)
        if name_end == 5:
            return None  # the unnamed statement lives on a server
        name = bytes(buf[5:name_end])
        statement = self.registry.known(bytes(buf[name_end + 1 : end]))
        if statement is None or not statement.valid:
            return None
        if name in self.names:
            message = f'prepared statement "{name.decode("utf-8", "replace")}" already exists'
            return e.error_response("42P05", message) + m.READY_IDLE
        self.names[name] = statement
        return PARSE_COMPLETE + m.READY_IDLE

    def bound(self, buf: bytes | bytearray) -> Statement | None:
        """The statement a batch starting with a Bind binds, if it is one of ours."""
        if buf[0] != _B:
            return None
        return self._bound(bytes(buf), 0, 1 + int.from_bytes(buf[1:5], "big"))[0]

    def renew(self, old: Statement) -> None:
        """`old` went stale on a server: this client's names move to a fresh copy."""
        new = self.registry.renew(old)
        for name, statement in self.names.items():
            if statement is old:
                self.names[name] = new

    def reset(self) -> None:
        """Nothing is in flight any more (the client's pending work was dropped)."""
        self.batches.clear()
        self._steps = []
        self._batch = None
        self._partial = b""
        self._need = self.skip = 0
        self.sent = self.answered
        self.walking = False

    # ---- client -> server -------------------------------------------------------------------

    def feed(self, data: bytes, server: ServerConnection) -> bytes:
        """Rewrite complete messages for `server`. An incomplete Parse, Bind, Describe, Close
        or Query waits for the rest; other messages stream through."""
        if data[:1] == b"B" and not (self.skip or self._need or self._partial or self._steps):
            # The usual chunk: one execution of a prepared statement the server holds.
            bind_end = 1 + int.from_bytes(data[1:5], "big")
            if data[bind_end:] in _EXECUTE_TAILS:
                statement, name_at, name_end = self._bound(data, 0, bind_end)
                if (
                    statement is not None
                    and not statement.touches
                    and statement.name in server.prepared
                ):
                    server.prepared.move_to_end(statement.name)
                    self.sent += 1
                    return (
                        _renamed(data, 0, bind_end, name_at, name_end, statement.name)
                        + (data[bind_end:])
                    )
        out: list[bytes] = []
        pos, n = 0, len(data)
        if self.skip:
            pos = min(self.skip, n)
            self.skip -= pos
        if self._need and pos < n:
            take = min(self._need, n - pos)
            self._need -= take
            pos += take
        if pos:
            out.append(data[:pos])
        if self._partial:
            data = self._partial + data[pos:]
            self._partial = b""
            pos, n = 0, len(data)
        start = pos
        while pos + 5 <= n:
            kind = data[pos]
            end = pos + 1 + int.from_bytes(data[pos + 1 : pos + 5], "big")
            if kind == _B and end <= n:
                statement, name_at, name_end = self._bound(data, pos, end)
                if statement is not None:  # else unnamed or unknown: the server's own answer
                    prefix = self._ensure(statement, server)
                    if statement.touches:
                        self._touch(statement.body)
                    out.append(data[start:pos])
                    out.append(prefix)
                    out.append(_renamed(data, pos, end, name_at, name_end, statement.name))
                    start = end
                self._steps.append(_B)
            elif kind == _D and end <= n and data[pos + 5] == 80:  # Describe portal
                self._steps.append(_D)
            elif kind in _REWRITTEN:
                if end > n:
                    break  # wait for the whole message
                replaced = self._rewrite(kind, data[pos + 5 : end], server)
                if replaced is not None:
                    out.append(data[start:pos])
                    out.append(replaced)
                    start = end
            elif kind in _STEPPED:
                self._steps.append(kind)
            if kind in _BOUNDARY:
                self._boundary()
            if end > n:  # a long message streams through
                self._need = end - n
                pos = n
                break
            pos = end
        if start == 0 and pos == n:  # nothing rewritten or held back
            result = data if not out else b"".join(out) + data
        else:
            out.append(data[start:pos])
            if pos < n:
                self._partial = data[pos:]
            result = b"".join(out)
        if self._steps and self._batch is None:  # spans chunks: its replies may start now
            self._follow(server)
        return result

    def _boundary(self) -> None:
        """A Sync, Query or FunctionCall: the batch is sent."""
        if self._batch is None:
            self._steps.clear()
        else:  # its steps now belong to the followed batch
            self._batch = None
            self._steps = []
        self.sent += 1

    def _bound(self, data: bytes, pos: int, end: int) -> tuple[Statement | None, int, int]:
        """The statement the Bind at data[pos:end] names (None: unnamed, not ours, or a
        malformed message the server will refuse), and where the name is."""
        name_at = data.find(0, pos + 5, end) + 1
        name_end = data.find(0, name_at, end) if name_at else -1
        if name_end <= name_at:
            return None, name_at, name_end
        return self.names.get(data[name_at:name_end]), name_at, name_end

    def _act(self, step: _Step, server: ServerConnection) -> None:
        """A step whose reply needs changing: follow the open batch."""
        self._steps.append(step)
        if self._batch is None:
            self._follow(server)

    def _follow(self, server: ServerConnection) -> None:
        batch = self._batch = _Batch(self.sent, server, self._steps)
        self.batches.append(batch)
        if not self.walking:
            # Start where the reply stream is now, which may be inside a message.
            self.walking = True
            scanner = server.scanner
            partial = scanner._partial
            self._reply_need = scanner._need
            self._emit = True
            self._hdr = b""
            self._carry = False
            if len(partial) >= 5:
                self._count(partial[0])
                self._reply_need = 1 + int.from_bytes(partial[1:5], "big") - len(partial)
            elif partial:
                self._hdr = partial
                self._carry = True

    def _rewrite(self, kind: int, body: bytes, server: ServerConnection) -> bytes | None:
        """The replacement for one message (None: unchanged); records its step."""
        if kind == _Q:
            replaced = self._query(body[:-1], server)
            self._steps.append(_Q)
            return replaced
        if kind == _P:
            return self._parse(body, server)
        target = body[:1]
        name = body[1:-1]
        if kind == _D:
            statement = self.names.get(name) if target == b"S" else None
            if statement is None:
                self._steps.append(_D)
                return None
            prefix = self._ensure(statement, server)
            self._steps.append(_D)
            return prefix + _message(_D, b"S" + statement.name + b"\x00")
        # Close: forget the name; the server never had it, so it answers CloseComplete. (Kept
        # for the undo: skipped after an earlier error, the Close never happened.)
        forgotten = self.names.pop(name, None) if target == b"S" and name else None
        if forgotten is None:
            self._steps.append(_C)
        else:
            self._act(_Step(_C, forgot=forgotten, name=name), server)
        return None

    def _parse(self, body: bytes, server: ServerConnection) -> bytes | None:
        name_end = body.index(0)
        name = body[:name_end]
        text_and_types = body[name_end + 1 :]
        prefix = b""
        text_end = text_and_types.index(0)
        rewritten = self._session_text(text_and_types[:text_end], server)
        if rewritten is not None:
            prefix, text = rewritten
            text_and_types = text + text_and_types[text_end:]
        if not name:
            self._steps.append(_P)
            if rewritten is None:
                return None
            return prefix + _message(_P, b"\x00" + text_and_types)
        if name in self.names:
            message = f'prepared statement "{name.decode("utf-8", "replace")}" already exists'
            error = e.error_response("42P05", message)
            self._act(_Step(_D, _REPLACE, reply=error), server)
            return _FAILING_DESCRIBE
        statement = self.registry.get(text_and_types)
        self.names[name] = statement
        prepared = server.prepared
        if statement.name in prepared:
            # The client's Parse analyses the text afresh, as PostgreSQL would: the server's
            # copy may predate a schema change ("cached plan must not change result type").
            prepared.move_to_end(statement.name)
            self._act(_Step(_C, _SWALLOW), server)
            step = _Step(_P, statement=statement, client=statement, name=name, replaces=True)
            self._act(step, server)
            return prefix + _message(_C, b"S" + statement.name + b"\x00") + statement.parse
        prefix += self._evict(prepared, server)
        prepared[statement.name] = None
        self._act(_Step(_P, statement=statement, client=statement, name=name), server)
        return prefix + statement.parse if prefix else statement.parse

    def _ensure(self, statement: Statement, server: ServerConnection) -> bytes:
        """Our Parse of `statement` when `server` lacks it (its ParseComplete swallowed)."""
        prepared = server.prepared
        if statement.name in prepared:
            prepared.move_to_end(statement.name)
            return b""
        evictions = self._evict(prepared, server)
        prepared[statement.name] = None
        self._act(_Step(_P, _SWALLOW, statement=statement), server)
        return evictions + statement.parse

    def _evict(self, prepared: OrderedDict[bytes, None], server: ServerConnection) -> bytes:
        out = b""
        while len(prepared) >= self.max_prepared:
            name, _ = prepared.popitem(last=False)
            self._act(_Step(_C, _SWALLOW, evicted=name), server)
            out += _message(_C, b"S" + name + b"\x00")
        return out

    def _query(self, text: bytes, server: ServerConnection) -> bytes | None:
        rewritten = self._session_text(text, server)
        if rewritten is None:
            return None
        prefix, text = rewritten
        return prefix + _message(_Q, text + b"\x00")

    def _session_text(self, text: bytes, server: ServerConnection) -> tuple[bytes, bytes] | None:
        """Note statements that may change session state. DEALLOCATE and DISCARD ALL also
        apply to protocol-level statements: a DEALLOCATE of one is rewritten to our name
        (returned with what must precede it), the others are forgotten."""
        if not text_touches_state(text):
            return None
        self._touch(text)
        if _DISCARD_ALL.match(text):
            self.names.clear()
            server.prepared.clear()
            return None
        match = _DEALLOCATE.match(text)
        if match is None:
            return None
        token = match.group(1)
        if token[:1] == b'"':
            name = token[1:-1].replace(b'""', b'"')
        elif token.lower() == b"all":
            self.names.clear()
            server.prepared.clear()
            return None
        else:
            name = token.lower()
        statement = self.names.pop(name, None)
        if statement is None:
            return None  # SQL-level, or unknown: the server's own answer
        prefix = self._ensure(statement, server)
        server.prepared.pop(statement.name, None)
        return prefix, b"DEALLOCATE " + statement.name

    def _touch(self, text: bytes) -> None:
        self.touched = True
        self.custom.update(custom_settings(text))

    # ---- server -> client -------------------------------------------------------------------

    def replies(self, data: bytes, count: int) -> bytes:
        """The server's chunk as the client must see it; `count` ReadyForQuery in it."""
        if not self.walking:
            self.answered += count
            return data
        out: list[bytes] = []
        pos, n = 0, len(data)
        while pos < n:
            need = self._reply_need
            if need:
                take = min(need, n - pos)
                if self._emit:
                    out.append(data[pos : pos + take])
                self._reply_need = need - take
                pos += take
                continue
            if self._hdr or pos + 5 > n:
                piece = data[pos : pos + 5 - len(self._hdr)]
                pos += len(piece)
                header = self._hdr + piece
                if self._carry:
                    out.append(piece)
                if len(header) < 5:
                    self._hdr = header
                    break
                self._hdr = b""
                carried, self._carry = self._carry, False
            else:
                header = data[pos : pos + 5]
                pos += 5
                carried = False
            reply = self._count(header[0])
            if reply is None or carried:
                if not carried:
                    out.append(header)
                self._emit = True
            else:
                if reply:
                    out.append(reply)
                self._emit = False
            self._reply_need = int.from_bytes(header[1:5], "big") - 4
        if not self.batches and not self._reply_need and not self._hdr:
            self.walking = False
        return b"".join(out)

    def _count(self, kind: int) -> bytes | None:
        """Account for one reply message: None to forward it, b"" to drop it, or what the
        client gets instead."""
        if kind in _ASYNC:
            return None
        batch = self.batches[0] if self.batches else None
        if batch is None or batch.index != self.answered:
            if kind == _Z:
                self.answered += 1
            return None
        if kind == _Z:
            self.answered += 1
            self.batches.popleft()
            if batch.failed:  # the failed step and everything after it never ran: undone
                steps = batch.steps[batch.pos :]  # last first, so each undo sees the state
                for i in range(len(steps) - 1, -1, -1):  # its own step had left
                    self._undo(steps[i], batch.server, skipped=i > 0)
            return None
        if batch.failed or batch.pos >= len(batch.steps):
            return None
        step = batch.steps[batch.pos]
        kind_sent = step if isinstance(step, int) else step.kind
        if kind_sent in _BOUNDARY:
            return None  # everything up to the ReadyForQuery
        if kind == 69:  # ErrorResponse: the server skips the rest of the batch
            batch.failed = True
            if isinstance(step, _Step) and step.action == _REPLACE and step.kind == _D:
                return step.reply  # the duplicate name's error
            return None
        if kind not in _ENDS[kind_sent]:
            return None  # rows, ParameterDescription, COPY...
        batch.pos += 1
        if isinstance(step, int):
            return None
        if step.statement is not None:
            step.statement.valid = True
        if step.action == _FORWARD:
            return None
        return b"" if step.action == _SWALLOW else step.reply

    def _undo(self, step: _Step | int, server: ServerConnection, skipped: bool) -> None:
        if isinstance(step, int):
            return
        if step.statement is not None and not (skipped and step.replaces):
            server.prepared.pop(step.statement.name, None)  # (a skipped one kept the old copy)
        if step.client is not None and self.names.get(step.name) is step.client:
            del self.names[step.name]
        if step.evicted:
            server.prepared[step.evicted] = None
        if step.forgot is not None and step.name not in self.names:
            self.names[step.name] = step.forgot


_REWRITTEN = frozenset((_P, _B, _D, _C, _Q))
# What follows a Bind in the usual chunk: (Describe portal,) Execute all rows, Sync.
_EXECUTE_TAILS = frozenset(
    (
        b"D\x00\x00\x00\x06P\x00E\x00\x00\x00\x09\x00\x00\x00\x00\x00S\x00\x00\x00\x04",
        b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00S\x00\x00\x00\x04",
    )
)
_STEPPED = frozenset((_E, _S, _F))  # other messages with a reply of their own


def reconcile(prepared: OrderedDict[bytes, None], on_server: list[str]) -> None:
    """Make a server's statement list match what it reports (after DEALLOCATE, DISCARD)."""
    actual = {name.encode() for name in on_server}
    for name in [name for name in prepared if name not in actual]:
        del prepared[name]
    for name in actual:
        if name not in prepared:
            prepared[name] = None
