"""Shared helpers for the protocol/ unit tests: independent framing, stream strategies, chunking.

The framing here is written from the PostgreSQL protocol documentation, not imported from
`protocol`, so the tests do not check the code against itself.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator, Sequence

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# One settings profile for every property test: modest, deterministic-enough and fast.
FAST = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Message = tuple[int, bytes]


def frame(kind: int | bytes, body: bytes = b"") -> bytes:
    """A typed message: type byte, int32 length including itself, body."""
    if isinstance(kind, int):
        kind = bytes([kind])
    return kind + struct.pack("!I", len(body) + 4) + body


def untyped(body: bytes) -> bytes:
    """An untyped (startup-phase) packet: int32 length including itself, body."""
    return struct.pack("!I", len(body) + 4) + body


def join(messages: Sequence[Message]) -> bytes:
    return b"".join(frame(k, b) for k, b in messages)


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """Split `data` at the given offsets (any order, duplicates give empty chunks)."""
    points = [0, *sorted(min(max(c, 0), len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def chunk_offsets(chunks: Sequence[bytes]) -> Iterator[tuple[int, bytes]]:
    """(global offset of the chunk's first byte, chunk) for each chunk."""
    offset = 0
    for chunk in chunks:
        yield offset, chunk
        offset += len(chunk)


# ---- strategies -------------------------------------------------------------------------------

small_bodies = st.binary(max_size=64)


@st.composite
def large_bodies(draw: st.DrawFn, min_size: int = 1_000, max_size: int = 70_000) -> bytes:
    """A large-ish body, cheap to generate: a random head, a long fill, a random tail."""
    head = draw(st.binary(max_size=16))
    fill = bytes([draw(st.integers(0, 255))]) * draw(st.integers(min_size, max_size))
    tail = draw(st.binary(max_size=16))
    return head + fill + tail


def bodies(allow_large: bool = True) -> st.SearchStrategy[bytes]:
    if not allow_large:
        return st.one_of(st.just(b""), small_bodies)
    return st.one_of(st.just(b""), small_bodies, large_bodies())


def typed_messages(
    allow_large: bool = True, max_messages: int = 20
) -> st.SearchStrategy[list[Message]]:
    """Random (type, body) lists; any type byte, bodies empty / small / large-ish."""
    return st.lists(
        st.tuples(st.integers(0, 255), bodies(allow_large)),
        max_size=max_messages,
    )


@st.composite
def stream_and_cuts(
    draw: st.DrawFn, messages: st.SearchStrategy[list[Message]], max_cuts: int = 30
) -> tuple[list[Message], bytes, list[int]]:
    """Messages, their concatenated frames, and random cut points into that stream."""
    msgs = draw(messages)
    data = join(msgs)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=max_cuts))
    return msgs, data, cuts


# Backend (server -> client) messages for the scanner.
READY_NEEDLE = b"Z\x00\x00\x00\x05I"  # a whole ReadyForQuery, hidden inside other bodies
NON_SPECIAL_BACKEND = [k for k in b"123ACDEGHIKNRTVWcdnpstv" if k not in b"ZS"]


def _param_body(name: str, value: str) -> bytes:
    return name.encode() + b"\0" + value.encode() + b"\0"


_cstr_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), max_size=20)

# Bodies made of things that look like message headers: a scanner that peeks inside bodies
# instead of skipping them by length would miscount.
EMBEDDED = [
    READY_NEEDLE,
    b"Z",
    b"S\x00\x00\x00\x08ab",
    b"Q\x00\x00\x00\x05\0",
    b"X\x00\x00\x00\x04",
    b"\0",
    b"\xff\xff\xff\xff",
]
tricky_bodies = st.lists(st.sampled_from(EMBEDDED), max_size=6).map(b"".join)

ready_messages = st.sampled_from(b"ITE").map(lambda s: (ord("Z"), bytes([s])))
param_messages = st.builds(_param_body, _cstr_text, _cstr_text).map(lambda b: (ord("S"), b))
needle_rows = tricky_bodies.map(lambda b: (ord("D"), b))


def backend_messages(allow_large: bool = True) -> st.SearchStrategy[list[Message]]:
    other = st.tuples(st.sampled_from(NON_SPECIAL_BACKEND), bodies(allow_large))
    return st.lists(
        st.one_of(ready_messages, param_messages, needle_rows, other),
        max_size=25,
    )


# Frontend (client -> server) messages for the scanner; 'X' only where a test puts it.
FRONTEND_TYPES = [k for k in b"BCDEFHPQSdcfp" if k != ord("X")]


def frontend_messages(allow_large: bool = True) -> st.SearchStrategy[list[Message]]:
    return st.lists(
        st.tuples(
            st.sampled_from(FRONTEND_TYPES),
            st.one_of(bodies(allow_large), tricky_bodies),
        ),
        max_size=25,
    )
