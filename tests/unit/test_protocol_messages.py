"""protocol.messages: exact wire bytes of the builders, and the parsers the proxy relies on."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import messages as m
from protocol.errors import ProtocolViolation
from protocol.framing import MessageReader, StartupReader
from tests.unit.protocol_helpers import FAST, frame

# ---- exact bytes, written by hand from the protocol documentation ------------------------------


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        pytest.param(m.AUTHENTICATION_OK, b"R\x00\x00\x00\x08\x00\x00\x00\x00", id="auth-ok"),
        pytest.param(m.authentication(m.AUTH_OK), b"R\x00\x00\x00\x08\x00\x00\x00\x00", id="ok2"),
        pytest.param(
            m.authentication(m.AUTH_CLEARTEXT), b"R\x00\x00\x00\x08\x00\x00\x00\x03", id="clear"
        ),
        pytest.param(
            m.authentication(m.AUTH_MD5, b"\x01\x02\x03\x04"),
            b"R\x00\x00\x00\x0c\x00\x00\x00\x05\x01\x02\x03\x04",
            id="md5",
        ),
        pytest.param(
            m.authentication_sasl(["SCRAM-SHA-256"]),
            b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00",
            id="sasl",
        ),
        pytest.param(
            m.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]),
            b"R\x00\x00\x00\x2a\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00",
            id="sasl-2",
        ),
        pytest.param(
            m.authentication(m.AUTH_SASL_CONTINUE, b"r=x"),
            b"R\x00\x00\x00\x0b\x00\x00\x00\x0br=x",
            id="sasl-continue",
        ),
        pytest.param(
            m.authentication(m.AUTH_SASL_FINAL, b"v=y"),
            b"R\x00\x00\x00\x0b\x00\x00\x00\x0cv=y",
            id="sasl-final",
        ),
        pytest.param(m.ready_for_query(), b"Z\x00\x00\x00\x05I", id="rfq-idle"),
        pytest.param(m.ready_for_query(b"T"), b"Z\x00\x00\x00\x05T", id="rfq-tx"),
        pytest.param(m.ready_for_query(b"E"), b"Z\x00\x00\x00\x05E", id="rfq-failed"),
        pytest.param(
            m.parameter_status("client_encoding", "UTF8"),
            b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00",
            id="param-status",
        ),
        pytest.param(
            m.parameter_status("application_name", ""),
            b"S\x00\x00\x00\x16application_name\x00\x00",
            id="param-status-empty",
        ),
        pytest.param(
            m.backend_key_data(1234, 5678),
            b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\x00\x00\x16\x2e",
            id="backend-key",
        ),
        pytest.param(
            m.backend_key_data(0x7FFFFFFF, 0xFFFFFFFF),
            b"K\x00\x00\x00\x0c\x7f\xff\xff\xff\xff\xff\xff\xff",
            id="backend-key-max",
        ),
        pytest.param(
            m.negotiate_protocol_version(0, ["_pq_.foo"]),
            b"v\x00\x00\x00\x15\x00\x00\x00\x00\x00\x00\x00\x01_pq_.foo\x00",
            id="negotiate-1",
        ),
        pytest.param(
            m.negotiate_protocol_version(2, []),
            b"v\x00\x00\x00\x0c\x00\x00\x00\x02\x00\x00\x00\x00",
            id="negotiate-0",
        ),
        pytest.param(
            m.negotiate_protocol_version(0, ["_pq_.a", "_pq_.bc"]),
            b"v\x00\x00\x00\x1b\x00\x00\x00\x00\x00\x00\x00\x02_pq_.a\x00_pq_.bc\x00",
            id="negotiate-2",
        ),
        pytest.param(
            m.command_complete("SELECT 1"), b"C\x00\x00\x00\x0dSELECT 1\x00", id="command-complete"
        ),
        pytest.param(m.query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\x00", id="query"),
        pytest.param(m.query(""), b"Q\x00\x00\x00\x05\x00", id="query-empty"),
        pytest.param(m.query("é"), b"Q\x00\x00\x00\x07\xc3\xa9\x00", id="query-utf8"),
        pytest.param(
            m.cancel_request(1234, 5678),
            b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x04\xd2\x00\x00\x16\x2e",
            id="cancel",
        ),
        pytest.param(
            m.startup_message({"user": "postgres", "database": "db"}),
            b"\x00\x00\x00\x23\x00\x03\x00\x00user\x00postgres\x00database\x00db\x00\x00",
            id="startup",
        ),
        pytest.param(m.startup_message({}), b"\x00\x00\x00\x09\x00\x03\x00\x00\x00", id="start0"),
        pytest.param(m.password_message(b"secret\0"), b"p\x00\x00\x00\x0bsecret\x00", id="pw"),
        pytest.param(
            m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"),
            b"p\x00\x00\x00\x21SCRAM-SHA-256\x00\x00\x00\x00\x0bn,,n=,r=abc",
            id="sasl-initial",
        ),
        pytest.param(m.TERMINATE, b"X\x00\x00\x00\x04", id="terminate"),
        pytest.param(m.SYNC, b"S\x00\x00\x00\x04", id="sync"),
        pytest.param(
            m.row_description(["a"]),
            b"T\x00\x00\x00\x1a\x00\x01a\x00"
            b"\x00\x00\x00\x00"  # table oid
            b"\x00\x00"  # column number
            b"\x00\x00\x00\x19"  # type oid 25 (text)
            b"\xff\xff"  # typlen -1
            b"\xff\xff\xff\xff"  # typmod -1
            b"\x00\x00",  # text format
            id="row-description",
        ),
        pytest.param(m.row_description([]), b"T\x00\x00\x00\x06\x00\x00", id="row-desc-empty"),
        pytest.param(
            m.data_row(["ab", None, ""]),
            b"D\x00\x00\x00\x14\x00\x03\x00\x00\x00\x02ab\xff\xff\xff\xff\x00\x00\x00\x00",
            id="data-row",
        ),
    ],
)
def test_exact_bytes(built: bytes, expected: bytes) -> None:
    assert built == expected


def test_protocol_constants() -> None:
    assert m.PROTOCOL_3_0 == 0x00030000
    assert m.SSL_REQUEST == (1234 << 16) | 5679
    assert m.GSSENC_REQUEST == (1234 << 16) | 5680
    assert m.CANCEL_REQUEST == (1234 << 16) | 5678
    assert m.MAX_STARTUP_PACKET == 10000
    assert (m.AUTH_OK, m.AUTH_CLEARTEXT, m.AUTH_MD5) == (0, 3, 5)
    assert (m.AUTH_SASL, m.AUTH_SASL_CONTINUE, m.AUTH_SASL_FINAL) == (10, 11, 12)


@FAST
@given(st.binary(min_size=1, max_size=1), st.binary(max_size=300))
def test_message_frames_like_the_protocol(kind: bytes, body: bytes) -> None:
    assert m.message(kind, body) == frame(kind, body)


@FAST
@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_cancel_request_round_trips(pid: int, secret: int) -> None:
    reader = StartupReader()
    reader.feed(m.cancel_request(pid, secret))
    pkt = reader.next()
    assert pkt is not None
    assert pkt.code == m.CANCEL_REQUEST
    assert pkt.cancel_key == (pid, secret)
    assert reader.pending == 0


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"))


@FAST
@given(
    st.dictionaries(
        _text.filter(lambda k: k != "" and not k.startswith("_pq_.")), _text, max_size=6
    )
)
def test_startup_message_round_trips(params: dict[str, str]) -> None:
    pkt = m.parse_startup_body(m.startup_message(params)[4:])
    assert pkt.code == m.PROTOCOL_3_0
    assert (pkt.major, pkt.minor) == (3, 0)
    assert pkt.params == params
    assert pkt.protocol_options == []


def test_startup_message_keeps_parameter_order() -> None:
    raw = m.startup_message({"user": "u", "database": "d", "application_name": "a"})
    assert list(m.parse_startup_body(raw[4:]).params) == ["user", "database", "application_name"]


@FAST
@given(_text, _text)
def test_parameter_status_round_trips(name: str, value: str) -> None:
    reader = MessageReader()
    reader.feed(m.parameter_status(name, value))
    kind, body = reader.next() or (0, b"")
    assert kind == ord("S")
    assert m.parse_parameter_status(body) == (name, value)


@FAST
@given(st.lists(st.one_of(st.none(), _text), max_size=8))
def test_data_row_decodes(values: list[str | None]) -> None:
    reader = MessageReader()
    reader.feed(m.data_row(values))
    kind, body = reader.next() or (0, b"")
    assert kind == ord("D")
    (count,) = struct.unpack_from("!H", body)
    pos = 2
    got: list[str | None] = []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            got.append(None)
        else:
            got.append(body[pos : pos + length].decode())
            pos += length
    assert pos == len(body)
    assert got == values


def test_authentication_sasl_mechanisms_split_back() -> None:
    body = m.authentication_sasl(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])[5:]
    assert struct.unpack_from("!I", body) == (m.AUTH_SASL,)
    assert m.split_cstrings(body[4:]) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", ""]
    assert m.split_cstrings(body[4:-1]) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]


def test_split_cstrings() -> None:
    assert m.split_cstrings(b"") == []
    assert m.split_cstrings(b"a\0") == ["a"]
    assert m.split_cstrings(b"a\0\0") == ["a", ""]
    assert m.split_cstrings(b"a\0b") == ["a"]  # an unterminated tail is dropped
    assert m.split_cstrings(b"\xff\0") == ["\ufffd"]


def test_parse_parameter_status() -> None:
    assert m.parse_parameter_status(b"TimeZone\0Europe/Paris\0") == ("TimeZone", "Europe/Paris")
    assert m.parse_parameter_status(b"application_name\0\0") == ("application_name", "")


def test_startup_packet_properties() -> None:
    pkt = m.StartupPacket((3 << 16) | 7)
    assert (pkt.major, pkt.minor) == (3, 7)
    assert pkt.params == {} and pkt.protocol_options == [] and pkt.cancel_key is None
    # Defaults are not shared between instances.
    pkt.params["x"] = "y"
    assert m.StartupPacket(m.PROTOCOL_3_0).params == {}


# ---- parse_options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("", {}),
        ("   ", {}),
        ("-c a=b -c c=d", {"a": "b", "c": "d"}),
        ("-ca=b", {"a": "b"}),
        ("--a=b", {"a": "b"}),
        ("-ca=b --c=d -c e=f", {"a": "b", "c": "d", "e": "f"}),
        ("  -c\ta=b \n --c=d  ", {"a": "b", "c": "d"}),
        ("-c search_path=my\\ schema", {"search_path": "my schema"}),
        ("-c search_path=a\\ b\\ c", {"search_path": "a b c"}),
        ("-c a=x\\\\y", {"a": "x\\y"}),
        ("-c a=x\\\\ -c b=y", {"a": "x\\", "b": "y"}),
        ("-c a=b=c", {"a": "b=c"}),
        ("-c a=", {"a": ""}),
        ("--statement-timeout=5s", {"statement_timeout": "5s"}),
        ("-c DateStyle=ISO", {"datestyle": "ISO"}),
        ("-c a=1 -c a=2", {"a": "2"}),
        ("-c geqo=off --application_name=my\\ app", {"geqo": "off", "application_name": "my app"}),
    ],
)
def test_parse_options(options: str, expected: dict[str, str]) -> None:
    assert m.parse_options(options) == expected


@pytest.mark.parametrize(
    "options",
    ["junk", "a=b", "-c", "-c a", "-c =b", "--=x", "--a", "-x a=b", "-B 100", "-c a=b junk", "-"],
)
def test_parse_options_rejects_junk(options: str) -> None:
    with pytest.raises(ValueError):
        m.parse_options(options)


def _escape(s: str) -> str:
    return "".join("\\" + ch if ch == "\\" or ch.isspace() else ch for ch in s)


_opt_names = st.from_regex(r"[a-z][a-z0-9_.]{0,15}", fullmatch=True)
_opt_values = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), max_size=20)


@FAST
@given(st.dictionaries(_opt_names, _opt_values, max_size=5), st.data())
def test_parse_options_round_trips_escaped_values(
    settings: dict[str, str], data: st.DataObject
) -> None:
    words = []
    for name, value in settings.items():
        style = data.draw(st.sampled_from(["-c ", "-c", "--"]))
        words.append(f"{style}{_escape(name)}={_escape(value)}")
    assert m.parse_options(" ".join(words)) == settings


def test_parse_data_row_round_trip_and_malformed_rows() -> None:
    assert m.parse_data_row(m.data_row(["a", None, ""])[5:]) == ["a", None, ""]
    with pytest.raises(ProtocolViolation):
        m.parse_data_row(b"\x00\x01\x00\x00\x00\x09abc")  # a column longer than the row
    with pytest.raises(ProtocolViolation):
        m.parse_data_row(b"\x00\x02\x00\x00\x00\x01a")  # a missing column
