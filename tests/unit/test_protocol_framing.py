"""protocol.framing: MessageReader (typed messages) and StartupReader (untyped first packets)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import messages as m
from protocol.errors import ProtocolViolation
from protocol.framing import DEFAULT_MAX_MESSAGE, MessageReader, StartupReader
from tests.unit.protocol_helpers import (
    FAST,
    Message,
    bytewise,
    frame,
    join,
    split_at,
    stream_and_cuts,
    typed_messages,
    untyped,
)

SSL = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
GSSENC = b"\x00\x00\x00\x08\x04\xd2\x16\x30"


def read_all(reader: MessageReader, chunks: list[bytes]) -> list[Message]:
    out: list[Message] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (msg := reader.next()) is not None:
            out.append(msg)
    return out


# ---- MessageReader: any chunking yields the same messages ------------------------------------


@FAST
@given(stream_and_cuts(typed_messages()))
def test_reader_whole_and_random_chunks_agree(case: tuple[list[Message], bytes, list[int]]) -> None:
    msgs, data, cuts = case
    whole = read_all(MessageReader(), [data])
    chunked = read_all(MessageReader(), split_at(data, cuts))
    assert whole == msgs
    assert chunked == msgs


@FAST
@given(typed_messages(allow_large=False, max_messages=12))
def test_reader_one_byte_at_a_time(msgs: list[Message]) -> None:
    data = join(msgs)
    reader = MessageReader()
    assert read_all(reader, bytewise(data)) == msgs
    assert read_all(MessageReader(), [data]) == msgs
    assert reader.take_rest() == b""


@FAST
@given(stream_and_cuts(typed_messages(max_messages=8)), st.binary(max_size=20))
def test_reader_take_rest_returns_unconsumed_bytes(
    case: tuple[list[Message], bytes, list[int]], tail: bytes
) -> None:
    """After reading k messages, take_rest is exactly the bytes after them (whole or partial)."""
    msgs, data, cuts = case
    # The tail is cut short of a complete message so the reader cannot consume it.
    partial = frame(b"D", b"x" * 100)[: min(len(tail), 50)]
    reader = MessageReader()
    for chunk in split_at(data + partial, cuts):
        reader.feed(chunk)
    keep = len(msgs) // 2
    for expected in msgs[:keep]:
        assert reader.next() == expected
    assert reader.take_rest() == join(msgs[keep:]) + partial
    assert reader.take_rest() == b""
    assert reader.next() is None


def test_reader_iterator_protocol_and_partial() -> None:
    reader = MessageReader()
    reader.feed(frame(b"Q", b"SELECT 1\0") + frame(b"S") + b"P\x00\x00")
    assert list(reader) == [(ord("Q"), b"SELECT 1\0"), (ord("S"), b"")]
    assert reader.next() is None
    reader.feed(b"\x00\x06ab")
    assert list(reader) == [(ord("P"), b"ab")]
    assert reader.take_rest() == b""


def test_reader_needs_whole_header_and_body() -> None:
    reader = MessageReader()
    msg = frame(b"D", b"hello")
    for i in range(len(msg)):
        reader.feed(msg[i : i + 1])
        if i < len(msg) - 1:
            assert reader.next() is None
    assert reader.next() == (ord("D"), b"hello")


def test_reader_empty_body_and_zero_type_byte() -> None:
    reader = MessageReader()
    reader.feed(b"\x00\x00\x00\x00\x04" + b"X\x00\x00\x00\x04")
    assert list(reader) == [(0, b""), (ord("X"), b"")]


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_reader_length_below_4_raises(length: int) -> None:
    reader = MessageReader()
    reader.feed(b"Q" + struct.pack("!I", length))
    with pytest.raises(ProtocolViolation):
        reader.next()


def test_reader_bad_length_after_good_messages_raises_only_when_reached() -> None:
    reader = MessageReader()
    reader.feed(frame(b"Q", b"a\0") + b"Q\x00\x00\x00\x02")
    assert reader.next() == (ord("Q"), b"a\0")
    with pytest.raises(ProtocolViolation):
        reader.next()


def test_reader_max_size_boundary() -> None:
    reader = MessageReader(max_size=100)
    ok = frame(b"D", b"x" * 96)  # length word = 100
    reader.feed(ok)
    assert reader.next() == (ord("D"), b"x" * 96)
    # Over the limit: raised from the header alone, before the body could be buffered.
    reader.feed(b"D" + struct.pack("!I", 101))
    with pytest.raises(ProtocolViolation):
        reader.next()


def test_reader_huge_length_raises_from_header_with_default_limit() -> None:
    reader = MessageReader()
    assert reader.max_size == DEFAULT_MAX_MESSAGE
    reader.feed(b"Q" + struct.pack("!I", DEFAULT_MAX_MESSAGE + 1))
    with pytest.raises(ProtocolViolation):
        reader.next()
    reader = MessageReader()
    reader.feed(b"Q\xff\xff\xff\xff")
    with pytest.raises(ProtocolViolation):
        reader.next()


@FAST
@given(st.integers(0, 3), st.binary(max_size=5))
def test_reader_invalid_length_raises_for_any_split(length: int, extra: bytes) -> None:
    data = frame(b"S") + b"Q" + struct.pack("!I", length) + extra
    for chunks in (bytewise(data), [data]):
        reader = MessageReader()
        with pytest.raises(ProtocolViolation):
            read_all(reader, chunks)


# ---- StartupReader -----------------------------------------------------------------------------


def startup_body(params: list[tuple[str, str]], code: int = m.PROTOCOL_3_0) -> bytes:
    return (
        struct.pack("!I", code)
        + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params)
        + b"\0"
    )


def read_packets(chunks: list[bytes]) -> list[m.StartupPacket]:
    reader = StartupReader()
    out: list[m.StartupPacket] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (pkt := reader.next()) is not None:
            out.append(pkt)
    return out


def test_startup_ssl_request() -> None:
    reader = StartupReader()
    reader.feed(SSL)
    pkt = reader.next()
    assert pkt is not None
    assert pkt.code == m.SSL_REQUEST == 80877103
    assert (pkt.major, pkt.minor) == (1234, 5679)
    assert pkt.params == {}
    assert pkt.cancel_key is None
    assert reader.pending == 0


def test_startup_gssenc_request() -> None:
    reader = StartupReader()
    reader.feed(GSSENC)
    pkt = reader.next()
    assert pkt is not None
    assert pkt.code == m.GSSENC_REQUEST == 80877104
    assert (pkt.major, pkt.minor) == (1234, 5680)


def test_startup_cancel_request() -> None:
    raw = b"\x00\x00\x00\x10\x04\xd2\x16\x2e" + struct.pack("!II", 4242, 0xDEADBEEF)
    reader = StartupReader()
    reader.feed(raw)
    pkt = reader.next()
    assert pkt is not None
    assert pkt.code == m.CANCEL_REQUEST == 80877102
    assert pkt.cancel_key == (4242, 0xDEADBEEF)
    assert pkt.params == {}


def test_startup_message_params_and_protocol_options() -> None:
    body = startup_body(
        [
            ("user", "alice"),
            ("database", "appdb"),
            ("_pq_.compression", "on"),
            ("application_name", "psql"),
            ("options", "-c search_path=x"),
            ("_pq_.other", ""),
        ],
        code=(3 << 16) | 2,
    )
    pkt = m.parse_startup_body(body)
    assert (pkt.major, pkt.minor) == (3, 2)
    assert pkt.code == 196610
    assert pkt.params == {
        "user": "alice",
        "database": "appdb",
        "application_name": "psql",
        "options": "-c search_path=x",
    }
    assert pkt.protocol_options == ["_pq_.compression", "_pq_.other"]
    assert pkt.cancel_key is None


def test_startup_minimal_and_empty_value() -> None:
    pkt = m.parse_startup_body(startup_body([]))
    assert (pkt.major, pkt.minor, pkt.params, pkt.protocol_options) == (3, 0, {}, [])
    pkt = m.parse_startup_body(startup_body([("user", "bob"), ("database", "")]))
    assert pkt.params == {"user": "bob", "database": ""}


def test_startup_unsupported_major_version_is_returned_for_the_caller() -> None:
    pkt = m.parse_startup_body(startup_body([("user", "x")], code=2 << 16))
    assert (pkt.major, pkt.minor) == (2, 0)
    assert pkt.params == {}


def test_startup_sequence_ssl_then_startup_any_split() -> None:
    startup = untyped(startup_body([("user", "u"), ("database", "d")]))
    data = SSL + startup + b"Q\x00\x00"
    for chunks in ([data], bytewise(data), split_at(data, [3, 9, 20])):
        reader = StartupReader()
        pkts: list[m.StartupPacket] = []
        for chunk in chunks:
            reader.feed(chunk)
            while (pkt := reader.next()) is not None:
                pkts.append(pkt)
        assert [p.code for p in pkts] == [m.SSL_REQUEST, m.PROTOCOL_3_0]
        assert pkts[1].params == {"user": "u", "database": "d"}
        assert reader.pending == 3
        assert reader.take_rest() == b"Q\x00\x00"
        assert reader.pending == 0


_names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\0"),
    min_size=1,
    max_size=12,
).filter(lambda s: not s.startswith("_pq_."))
_values = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), max_size=30)


@FAST
@given(st.dictionaries(_names, _values, max_size=8), st.integers(0, 5), st.data())
def test_startup_params_round_trip_any_split(
    params: dict[str, str], minor: int, data: st.DataObject
) -> None:
    raw = SSL + untyped(startup_body(list(params.items()), code=(3 << 16) | minor))
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=10))
    for chunks in ([raw], split_at(raw, cuts)):
        pkts = read_packets(chunks)
        assert [p.code for p in pkts] == [m.SSL_REQUEST, (3 << 16) | minor]
        assert pkts[1].params == params
        assert pkts[1].minor == minor


@FAST
@given(st.dictionaries(_names, _values, max_size=6))
def test_startup_message_builder_round_trips(params: dict[str, str]) -> None:
    raw = m.startup_message(params)
    (length,) = struct.unpack_from("!I", raw)
    assert length == len(raw)
    pkt = m.parse_startup_body(raw[4:])
    assert pkt.code == m.PROTOCOL_3_0
    assert pkt.params == params
    assert read_packets([raw])[0].params == params


@pytest.mark.parametrize("length", [0, 1, 4, 7])
def test_startup_length_below_8_raises(length: int) -> None:
    reader = StartupReader()
    reader.feed(struct.pack("!I", length))
    with pytest.raises(ProtocolViolation):
        reader.next()


def test_startup_length_limit_is_10000() -> None:
    # Exactly 10000 bytes is accepted (PostgreSQL's MAX_STARTUP_PACKET_LENGTH).
    overhead = len(startup_body([("user", "u"), ("options", "")])) + 4
    filler = "v" * (10000 - overhead)
    body = startup_body([("user", "u"), ("options", filler)])
    assert len(body) + 4 == 10000 == m.MAX_STARTUP_PACKET
    pkts = read_packets([untyped(body)])
    assert pkts[0].params["options"] == filler
    # One more byte is refused, from the length word alone.
    reader = StartupReader()
    reader.feed(struct.pack("!I", 10001))
    with pytest.raises(ProtocolViolation):
        reader.next()
    reader = StartupReader()
    reader.feed(b"\xff\xff\xff\xff")
    with pytest.raises(ProtocolViolation):
        reader.next()


def test_startup_waits_for_whole_packet() -> None:
    raw = untyped(startup_body([("user", "u")]))
    reader = StartupReader()
    reader.feed(raw[:-1])
    assert reader.next() is None
    assert reader.pending == len(raw) - 1
    reader.feed(raw[-1:])
    assert reader.next() is not None
    assert reader.next() is None


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(struct.pack("!I", m.PROTOCOL_3_0) + b"user\0bob", id="no-terminator"),
        pytest.param(struct.pack("!I", m.PROTOCOL_3_0) + b"user\0bob\0", id="no-final-nul"),
        pytest.param(struct.pack("!I", m.PROTOCOL_3_0) + b"user\0\0", id="odd-strings"),
        pytest.param(struct.pack("!I", m.PROTOCOL_3_0) + b"user\0bob\0db\0\0", id="odd-3"),
        pytest.param(struct.pack("!I", m.PROTOCOL_3_0) + b"\0\0", id="empty-name-then-nul"),
        pytest.param(struct.pack("!I", m.SSL_REQUEST) + b"\0\0\0\0", id="ssl-too-long"),
        pytest.param(struct.pack("!I", m.GSSENC_REQUEST) + b"x", id="gss-too-long"),
        pytest.param(struct.pack("!III", m.CANCEL_REQUEST, 1, 2) + b"x", id="cancel-too-long"),
        pytest.param(struct.pack("!II", m.CANCEL_REQUEST, 1), id="cancel-too-short"),
        pytest.param(b"\0\3\0", id="body-under-4"),
    ],
)
def test_startup_malformed_body_raises(body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        m.parse_startup_body(body)
    if len(body) + 4 >= 8:
        reader = StartupReader()
        reader.feed(untyped(body))
        with pytest.raises(ProtocolViolation):
            reader.next()


def test_startup_empty_name_before_end_raises() -> None:
    body = struct.pack("!I", m.PROTOCOL_3_0) + b"user\0bob\0\0\0database\0db\0\0"
    with pytest.raises(ProtocolViolation):
        m.parse_startup_body(body)
