"""protocol.scanner: header-only walkers of the forwarding path, under arbitrary chunking."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ProtocolViolation
from protocol.scanner import BackendScanner, FrontendScanner
from tests.unit.protocol_helpers import (
    FAST,
    FRONTEND_TYPES,
    READY_NEEDLE,
    Message,
    backend_messages,
    bodies,
    bytewise,
    chunk_offsets,
    frame,
    frontend_messages,
    join,
    split_at,
    stream_and_cuts,
)

Z, S, Q, F, X = (ord(c) for c in "ZSQFX")
TERMINATE = b"X\x00\x00\x00\x04"


def boundaries(msgs: list[Message]) -> set[int]:
    """Offsets at which a message starts or the stream ends."""
    out = {0}
    offset = 0
    for _, body in msgs:
        offset += 5 + len(body)
        out.add(offset)
    return out


def ready_ends(msgs: list[Message]) -> list[tuple[int, int]]:
    """(offset just past the message, status byte) for every ReadyForQuery."""
    out = []
    offset = 0
    for kind, body in msgs:
        offset += 5 + len(body)
        if kind == Z:
            out.append((offset, body[0]))
    return out


# ---- BackendScanner ----------------------------------------------------------------------------


def check_backend(msgs: list[Message], chunks: list[bytes]) -> None:
    scanner = BackendScanner()
    bounds = boundaries(msgs)
    readies = ready_ends(msgs)
    total = 0
    for start, chunk in chunk_offsets(chunks):
        got = scanner.feed(chunk)
        end = start + len(chunk)
        # Each ReadyForQuery is reported by the chunk holding its last byte, and the status is
        # that of the last one completed so far.
        assert got == sum(1 for off, _ in readies if start < off <= end)
        done = [status for off, status in readies if off <= end]
        assert scanner.status == (done[-1] if done else ord("I"))
        assert scanner.at_boundary == (end in bounds)
        total += got
    assert total == sum(1 for kind, _ in msgs if kind == Z)
    assert scanner.params == [body for kind, body in msgs if kind == S]
    assert scanner.at_boundary


@FAST
@given(stream_and_cuts(backend_messages()))
def test_backend_any_split(case: tuple[list[Message], bytes, list[int]]) -> None:
    msgs, data, cuts = case
    check_backend(msgs, [data])
    check_backend(msgs, split_at(data, cuts))


@FAST
@given(backend_messages(allow_large=False))
def test_backend_one_byte_at_a_time(msgs: list[Message]) -> None:
    check_backend(msgs, bytewise(join(msgs)))


def test_backend_ready_inside_datarow_not_counted() -> None:
    row = frame(b"D", b"\x00\x01" + struct.pack("!I", 6) + READY_NEEDLE)
    data = row + frame(b"C", b"SELECT 1\0") + frame(b"Z", b"T")
    for chunks in ([data], bytewise(data), split_at(data, [7, 8, 12])):
        scanner = BackendScanner()
        assert sum(scanner.feed(c) for c in chunks) == 1
        assert scanner.status == ord("T")
        assert scanner.at_boundary


def test_backend_large_body_skipped_across_chunks() -> None:
    body = READY_NEEDLE * 20_000
    data = frame(b"D", body) + frame(b"Z", b"E")
    scanner = BackendScanner()
    assert scanner.feed(data[:10]) == 0
    assert not scanner.at_boundary
    assert scanner.feed(data[10:50_000]) == 0
    assert scanner.feed(data[50_000:-3]) == 0
    assert not scanner.at_boundary
    assert scanner.feed(data[-3:]) == 1
    assert scanner.status == ord("E")
    assert scanner.at_boundary


def test_backend_parameter_status_split_everywhere() -> None:
    msgs = [
        (S, b"client_encoding\0UTF8\0"),
        (S, b"TimeZone\0Europe/Paris\0"),
        (Z, b"I"),
        (S, b"application_name\0\0"),
    ]
    data = join(msgs)
    for cut in range(len(data) + 1):
        scanner = BackendScanner()
        assert scanner.feed(data[:cut]) + scanner.feed(data[cut:]) == 1
        assert scanner.params == [b for k, b in msgs if k == S]


def test_backend_initial_state_and_empty_feed() -> None:
    scanner = BackendScanner()
    assert scanner.status == ord("I")
    assert scanner.params == []
    assert scanner.at_boundary
    assert scanner.feed(b"") == 0
    assert scanner.at_boundary


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_backend_length_below_4_raises(length: int) -> None:
    scanner = BackendScanner()
    with pytest.raises(ProtocolViolation):
        scanner.feed(frame(b"C", b"x\0") + b"D" + struct.pack("!I", length) + b"\0" * 8)


def test_backend_short_ready_for_query_at_chunk_end_raises_protocol_violation() -> None:
    scanner = BackendScanner()
    with pytest.raises(ProtocolViolation):
        scanner.feed(b"Z\x00\x00\x00\x04")


def test_backend_short_ready_for_query_mid_chunk_raises_protocol_violation() -> None:
    scanner = BackendScanner()
    with pytest.raises(ProtocolViolation):
        scanner.feed(b"Z\x00\x00\x00\x04" + frame(b"C", b"SELECT 1\0"))


# ---- FrontendScanner ---------------------------------------------------------------------------

ANSWERED = {Q, S, F}


@FAST
@given(stream_and_cuts(frontend_messages()))
def test_frontend_counts_query_sync_functioncall_any_split(
    case: tuple[list[Message], bytes, list[int]],
) -> None:
    msgs, data, cuts = case
    expected = sum(1 for kind, _ in msgs if kind in ANSWERED)
    bounds = boundaries(msgs)
    for chunks in ([data], split_at(data, cuts)):
        scanner = FrontendScanner(max_size=1 << 20)
        total = 0
        for start, chunk in chunk_offsets(chunks):
            total += scanner.feed(chunk)
            assert scanner.at_boundary == (start + len(chunk) in bounds)
        assert total == expected
        assert not scanner.terminated
        assert scanner.at_boundary


@FAST
@given(frontend_messages(allow_large=False))
def test_frontend_one_byte_at_a_time(msgs: list[Message]) -> None:
    scanner = FrontendScanner(max_size=1 << 20)
    assert sum(scanner.feed(c) for c in bytewise(join(msgs))) == sum(
        1 for kind, _ in msgs if kind in ANSWERED
    )
    assert scanner.at_boundary
    assert not scanner.terminated


@FAST
@given(
    frontend_messages(allow_large=True),
    frontend_messages(allow_large=False),
    st.data(),
)
def test_frontend_terminate_offset(
    before: list[Message], after: list[Message], data: st.DataObject
) -> None:
    prefix = join(before)
    stream = prefix + TERMINATE + join(after)
    x_at = len(prefix)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    scanner = FrontendScanner(max_size=1 << 20)
    total = 0
    for start, chunk in chunk_offsets(split_at(stream, cuts)):
        total += scanner.feed(chunk)
        if scanner.terminated:
            # The walk stops in the chunk that completes the X header; the offset is relative to
            # that chunk, negative when the header began in an earlier chunk.
            assert start <= x_at + 4 < start + len(chunk)
            assert scanner.terminated_at == x_at - start
            assert (scanner.terminated_at < 0) == (x_at < start)
            break
    else:
        pytest.fail("Terminate not seen")
    assert total == sum(1 for kind, _ in before if kind in ANSWERED)


def test_frontend_terminate_in_same_chunk() -> None:
    q = frame(b"Q", b"SELECT 1\0")
    scanner = FrontendScanner(max_size=1000)
    assert scanner.feed(q + frame(b"S") + TERMINATE + q) == 2
    assert scanner.terminated
    assert scanner.terminated_at == len(q) + 5


def test_frontend_terminate_header_split() -> None:
    q = frame(b"Q", b"SELECT 1\0")
    for split in range(1, 5):
        scanner = FrontendScanner(max_size=1000)
        assert scanner.feed(q + TERMINATE[:split]) == 1
        assert not scanner.terminated
        assert scanner.feed(TERMINATE[split:]) == 0
        assert scanner.terminated
        assert scanner.terminated_at == -split
    # Split over three chunks.
    scanner = FrontendScanner(max_size=1000)
    scanner.feed(b"X")
    scanner.feed(b"\x00\x00")
    assert not scanner.terminated
    scanner.feed(b"\x00\x04" + q)
    assert scanner.terminated
    assert scanner.terminated_at == -3


def test_frontend_terminate_after_skipped_body() -> None:
    q = frame(b"Q", b"x" * 100)
    scanner = FrontendScanner(max_size=1000)
    assert scanner.feed(q[:10]) == 1
    assert scanner.feed(q[10:] + TERMINATE) == 0
    assert scanner.terminated
    assert scanner.terminated_at == len(q) - 10


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_frontend_length_below_4_raises(length: int) -> None:
    data = frame(b"S") + b"P" + struct.pack("!I", length)
    for chunks in ([data], bytewise(data)):
        scanner = FrontendScanner(max_size=1000)
        with pytest.raises(ProtocolViolation):
            for chunk in chunks:
                scanner.feed(chunk)


def test_frontend_max_size() -> None:
    ok = frame(b"Q", b"x" * 96)  # length word 100
    scanner = FrontendScanner(max_size=100)
    assert scanner.feed(ok) == 1
    # Refused from the header alone, whatever the split.
    bad = b"Q" + struct.pack("!I", 101)
    for chunks in ([bad], bytewise(bad), [ok + bad[:3], bad[3:]]):
        scanner = FrontendScanner(max_size=100)
        with pytest.raises(ProtocolViolation):
            for chunk in chunks:
                scanner.feed(chunk)


@FAST
@given(st.integers(101, 0xFFFFFFFF), frontend_messages(allow_large=False), st.data())
def test_frontend_oversize_after_valid_messages_raises(
    length: int, msgs: list[Message], data: st.DataObject
) -> None:
    msgs = [(k, b[:90]) for k, b in msgs]
    stream = join(msgs) + b"B" + struct.pack("!I", length) + b"\0" * 3
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    scanner = FrontendScanner(max_size=100)
    with pytest.raises(ProtocolViolation):
        for chunk in split_at(stream, cuts):
            scanner.feed(chunk)


# ---- FrontendScanner.watch: the first Parse of a named statement --------------------------------

P = ord("P")


def parse_msg(name: bytes, text: bytes = b"SELECT 1") -> bytes:
    return frame(b"P", name + b"\0" + text + b"\0\0\0")


def watching(max_size: int = 1 << 20) -> FrontendScanner:
    scanner = FrontendScanner(max_size)
    scanner.watch = True
    return scanner


def test_frontend_watch_notes_first_named_parse() -> None:
    q = frame(b"Q", b"SELECT 1\0")
    unnamed = parse_msg(b"")
    first, second = parse_msg(b"s1"), parse_msg(b"s2")
    data = q + frame(b"S") + unnamed + first + second + frame(b"S")
    scanner = watching()
    assert scanner.feed(data) == 3
    at = len(q) + 5 + len(unnamed)
    assert (scanner.named_at, scanner.named_end, scanner.named_syncs) == (
        at,
        at + len(first),
        2,
    )
    assert not scanner.watch  # later ones are not noted
    scanner.feed(parse_msg(b"s3"))
    assert scanner.named_at == at


def test_frontend_watch_off_notes_nothing() -> None:
    scanner = FrontendScanner(max_size=1000)
    assert not scanner.watch
    scanner.feed(parse_msg(b"s1") + frame(b"S"))
    assert (scanner.named_at, scanner.named_end, scanner.named_syncs) == (0, 0, 0)


def test_frontend_watch_counts_syncs_in_its_chunk_only() -> None:
    scanner = watching()
    assert scanner.feed(frame(b"S") + frame(b"S")) == 2
    assert scanner.named_end == 0
    assert scanner.watch
    assert scanner.feed(frame(b"Q", b"x\0") + parse_msg(b"s1")) == 1
    assert scanner.named_syncs == 1
    assert scanner.named_at == 7


def test_frontend_watch_parse_header_split() -> None:
    message = parse_msg(b"s1")
    for split in range(1, 5):
        scanner = watching()
        scanner.feed(frame(b"S") + message[:split])
        assert scanner.named_end == 0
        scanner.feed(message[split:] + frame(b"S"))
        # The Parse began in the earlier chunk: a negative offset, its end in this chunk.
        assert scanner.named_at == -split
        assert scanner.named_end == len(message) - split
        assert scanner.named_syncs == 0


def test_frontend_watch_parse_body_in_later_chunks() -> None:
    message = parse_msg(b"s1", b"SELECT " + b"x" * 100)
    scanner = watching()
    scanner.feed(message[:10])
    # Noted from its header: the end lies beyond this chunk.
    assert (scanner.named_at, scanner.named_end) == (0, len(message))


def test_frontend_watch_after_a_skipped_body() -> None:
    long_query = frame(b"Q", b"x" * 100)
    scanner = watching()
    assert scanner.feed(long_query[:20]) == 1
    message = parse_msg(b"s1")
    scanner.feed(long_query[20:] + message)
    assert scanner.named_at == len(long_query) - 20
    assert scanner.named_syncs == 0


def test_frontend_watch_unnamed_parse_at_chunk_end_counts_as_named() -> None:
    """Its name byte not yet seen, an unnamed Parse whose header ends the chunk is taken
    for a named one (tracking then starts early, which is harmless)."""
    message = parse_msg(b"")
    scanner = watching()
    scanner.feed(message[:5])
    assert (scanner.named_at, scanner.named_end) == (0, len(message))
    scanner = watching()
    scanner.feed(message)
    assert scanner.named_end == 0
    assert scanner.watch


parse_messages = st.sampled_from([b"", b"s1", b"__asyncpg_stmt_1__"]).map(
    lambda name: (P, parse_msg(name)[5:])
)


def with_parses(allow_large: bool) -> st.SearchStrategy[list[Message]]:
    return st.lists(
        st.one_of(
            st.tuples(st.sampled_from(FRONTEND_TYPES), bodies(allow_large)),
            parse_messages,
            st.sampled_from([(S, b""), (Q, b"SELECT 1\0")]),
        ),
        max_size=20,
    )


def expected_named(
    msgs: list[Message], data: bytes, chunks: list[bytes]
) -> tuple[int, int, int, int] | None:
    """(offset, end, Query/Sync/FunctionCall before it, start of the chunk completing its
    header) of the first Parse the scanner takes for a named one: its name byte is not NUL,
    or is not in the chunk completing its header."""
    ends = []
    offset = 0
    for chunk in chunks:
        offset += len(chunk)
        ends.append((offset - len(chunk), offset))
    pos = syncs = 0
    for kind, body in msgs:
        if kind == P:
            header_end = pos + 5
            start, end = next((s, e) for s, e in ends if s < header_end <= e)
            if header_end == end or data[header_end] != 0:
                return pos, pos + 5 + len(body), syncs, start
        elif kind in ANSWERED:
            syncs += 1
        pos += 5 + len(body)
    return None


@FAST
@given(with_parses(allow_large=True), st.data())
def test_frontend_watch_any_split(msgs: list[Message], data: st.DataObject) -> None:
    stream = join(msgs)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    chunks = split_at(stream, cuts)
    if data.draw(st.booleans()):
        chunks = [c for c in chunks if c] or [b""]
    expected = expected_named(msgs, stream, chunks)
    scanner = watching()
    before = 0
    noted: tuple[int, int, int, int] | None = None
    for start, chunk in chunk_offsets(chunks):
        counted = scanner.feed(chunk)
        if noted is None and scanner.named_end:
            assert not scanner.watch
            noted = (
                start + scanner.named_at,
                start + scanner.named_end,
                before + scanner.named_syncs,
                start,
            )
        before += counted
    if expected is None:
        assert noted is None
        assert scanner.watch
    else:
        assert noted == expected
