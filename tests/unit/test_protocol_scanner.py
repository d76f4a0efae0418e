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
    READY_NEEDLE,
    Message,
    backend_messages,
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
