"""ErrorResponse / NoticeResponse builders and the SQLSTATEs pgrouter itself raises."""

from __future__ import annotations

import struct

# SQLSTATEs used by the proxy (see PostgreSQL's errcodes.txt).
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
CONNECTION_EXCEPTION = "08000"
CANNOT_CONNECT_NOW = "57P03"
ADMIN_SHUTDOWN = "57P01"
QUERY_CANCELED = "57014"
INVALID_CATALOG_NAME = "3D000"
INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"
TOO_MANY_CONNECTIONS = "53300"
FEATURE_NOT_SUPPORTED = "0A000"
INSUFFICIENT_PRIVILEGE = "42501"
SYNTAX_ERROR = "42601"
INTERNAL_ERROR = "XX000"
READ_ONLY_TRANSACTION = "25006"
SERIALIZATION_FAILURE = "40001"


class ProtocolViolation(Exception):
    """The peer broke the framing rules; the connection cannot continue."""

    sqlstate = PROTOCOL_VIOLATION


def _fields(
    severity: str, sqlstate: str, message: str, detail: str | None, hint: str | None
) -> bytes:
    parts = [
        b"S", severity.encode(), b"\0",
        b"V", severity.encode(), b"\0",
        b"C", sqlstate.encode(), b"\0",
        b"M", message.encode(), b"\0",
    ]  # fmt: skip
    if detail:
        parts += [b"D", detail.encode(), b"\0"]
    if hint:
        parts += [b"H", hint.encode(), b"\0"]
    parts.append(b"\0")
    return b"".join(parts)


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """An ErrorResponse ('E'); severity FATAL tells the client the connection is ending."""
    return _message(b"E", _fields(severity, sqlstate, message, detail, hint))


def fatal(
    sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None
) -> bytes:
    return error_response(sqlstate, message, severity="FATAL", detail=detail, hint=hint)


def notice_response(message: str, *, severity: str = "NOTICE", sqlstate: str = "00000") -> bytes:
    """A NoticeResponse ('N'); legal at any time, so it can carry proxy warnings."""
    return _message(b"N", _fields(severity, sqlstate, message, None, None))


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Decode the fields of an ErrorResponse/NoticeResponse body, keyed by field code."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        end = body.index(b"\0", pos + 1)
        fields[chr(body[pos])] = body[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return fields
