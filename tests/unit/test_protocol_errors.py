"""protocol.errors: ErrorResponse / NoticeResponse builders, field parsing, SQLSTATEs."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import errors as e
from protocol.framing import MessageReader
from tests.unit.protocol_helpers import FAST


def unframe(raw: bytes) -> tuple[int, bytes]:
    """Check the framing length independently and return (type, body)."""
    assert len(raw) >= 5
    (length,) = struct.unpack_from("!I", raw, 1)
    assert length == len(raw) - 1
    reader = MessageReader()
    reader.feed(raw)
    msg = reader.next()
    assert msg is not None
    assert reader.take_rest() == b""
    return msg


def test_error_response_exact_bytes() -> None:
    assert e.error_response("08P01", "bad") == (
        b"E\x00\x00\x00\x1fSERROR\x00VERROR\x00C08P01\x00Mbad\x00\x00"
    )
    assert e.fatal("28P01", "no", hint="h") == (
        b"E\x00\x00\x00\x21SFATAL\x00VFATAL\x00C28P01\x00Mno\x00Hh\x00\x00"
    )
    assert e.notice_response("hi") == (
        b"N\x00\x00\x00\x20SNOTICE\x00VNOTICE\x00C00000\x00Mhi\x00\x00"
    )


def test_error_response_fields() -> None:
    kind, body = unframe(
        e.error_response(e.SYNTAX_ERROR, "syntax error at or near", detail="d", hint="h")
    )
    assert kind == ord("E")
    assert body.endswith(b"\0\0")
    assert e.parse_error_fields(body) == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "42601",
        "M": "syntax error at or near",
        "D": "d",
        "H": "h",
    }


def test_fatal_fields() -> None:
    kind, body = unframe(e.fatal(e.TOO_MANY_CONNECTIONS, "too many clients", detail="x"))
    assert kind == ord("E")
    assert e.parse_error_fields(body) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "53300",
        "M": "too many clients",
        "D": "x",
    }


def test_notice_response_fields() -> None:
    kind, body = unframe(e.notice_response("pool is paused", severity="WARNING", sqlstate="01000"))
    assert kind == ord("N")
    assert e.parse_error_fields(body) == {
        "S": "WARNING",
        "V": "WARNING",
        "C": "01000",
        "M": "pool is paused",
    }
    assert e.parse_error_fields(unframe(e.notice_response("x"))[1])["C"] == "00000"


def test_empty_detail_and_hint_are_omitted() -> None:
    body = unframe(e.error_response("XX000", "m", detail="", hint=""))[1]
    assert set(e.parse_error_fields(body)) == {"S", "V", "C", "M"}


def test_parse_error_fields_of_a_real_server_error() -> None:
    # As PostgreSQL 15 sends it (field order and extra fields P, F, L, R).
    body = (
        b'SERROR\0VERROR\0C42P01\0Mrelation "nope" does not exist\0P15\0'
        b"Fparse_relation.c\0L1392\0RparserOpenTable\0\0"
    )
    fields = e.parse_error_fields(body)
    assert fields["C"] == "42P01"
    assert fields["M"] == 'relation "nope" does not exist'
    assert fields["P"] == "15"
    assert fields["R"] == "parserOpenTable"
    assert e.parse_error_fields(b"\0") == {}
    assert e.parse_error_fields(b"") == {}
    assert e.parse_error_fields(b"M\xff\0\0") == {"M": "\ufffd"}
    assert e.parse_error_fields(b"D\0\0") == {"D": ""}


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"))
_sqlstates = st.from_regex(r"[0-9A-Z]{5}", fullmatch=True)
_optional = st.one_of(st.none(), _text)


@FAST
@given(_sqlstates, _text, st.sampled_from(["ERROR", "FATAL", "PANIC"]), _optional, _optional)
def test_error_response_round_trips(
    sqlstate: str, message: str, severity: str, detail: str | None, hint: str | None
) -> None:
    kind, body = unframe(
        e.error_response(sqlstate, message, severity=severity, detail=detail, hint=hint)
    )
    assert kind == ord("E")
    expected = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    if detail:
        expected["D"] = detail
    if hint:
        expected["H"] = hint
    assert e.parse_error_fields(body) == expected


@FAST
@given(_sqlstates, _text, _optional, _optional)
def test_fatal_round_trips(
    sqlstate: str, message: str, detail: str | None, hint: str | None
) -> None:
    assert e.fatal(sqlstate, message, detail=detail, hint=hint) == e.error_response(
        sqlstate, message, severity="FATAL", detail=detail, hint=hint
    )
    fields = e.parse_error_fields(unframe(e.fatal(sqlstate, message, detail=detail, hint=hint))[1])
    assert (fields["S"], fields["V"], fields["C"], fields["M"]) == (
        "FATAL",
        "FATAL",
        sqlstate,
        message,
    )


@FAST
@given(_text, st.sampled_from(["NOTICE", "WARNING", "INFO", "LOG", "DEBUG"]), _sqlstates)
def test_notice_response_round_trips(message: str, severity: str, sqlstate: str) -> None:
    kind, body = unframe(e.notice_response(message, severity=severity, sqlstate=sqlstate))
    assert kind == ord("N")
    assert e.parse_error_fields(body) == {
        "S": severity,
        "V": severity,
        "C": sqlstate,
        "M": message,
    }


def test_protocol_violation_sqlstate() -> None:
    assert e.ProtocolViolation.sqlstate == "08P01" == e.PROTOCOL_VIOLATION
    assert issubclass(e.ProtocolViolation, Exception)
    assert e.ProtocolViolation("x").sqlstate == "08P01"


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("PROTOCOL_VIOLATION", "08P01"),
        ("CONNECTION_FAILURE", "08006"),
        ("CONNECTION_EXCEPTION", "08000"),
        ("CANNOT_CONNECT_NOW", "57P03"),
        ("ADMIN_SHUTDOWN", "57P01"),
        ("QUERY_CANCELED", "57014"),
        ("INVALID_CATALOG_NAME", "3D000"),
        ("INVALID_AUTHORIZATION", "28000"),
        ("INVALID_PASSWORD", "28P01"),
        ("TOO_MANY_CONNECTIONS", "53300"),
        ("FEATURE_NOT_SUPPORTED", "0A000"),
        ("INSUFFICIENT_PRIVILEGE", "42501"),
        ("SYNTAX_ERROR", "42601"),
        ("INTERNAL_ERROR", "XX000"),
        ("READ_ONLY_TRANSACTION", "25006"),
        ("SERIALIZATION_FAILURE", "40001"),
    ],
)
def test_sqlstates_match_postgresql(name: str, code: str) -> None:
    # Values from PostgreSQL's src/backend/utils/errcodes.txt.
    assert getattr(e, name) == code
    assert re.fullmatch(r"[0-9A-Z]{5}", code)
