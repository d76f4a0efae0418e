"""Builders and parsers for the messages the proxy itself produces or must read.

Bodies that are only forwarded never pass through here: see `scanner` for the hot path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from protocol.errors import ProtocolViolation

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
MAX_STARTUP_PACKET = 10000

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_I32 = struct.Struct("!I")
_I32I32 = struct.Struct("!II")


def message(kind: bytes, body: bytes = b"") -> bytes:
    """Frame one typed message: type byte, int32 length (including itself), body."""
    return kind + _I32.pack(len(body) + 4) + body


def cstr(value: str) -> bytes:
    return value.encode() + b"\0"


# ---- backend messages the proxy synthesises -------------------------------------------------


def authentication(code: int, payload: bytes = b"") -> bytes:
    return message(b"R", _I32.pack(code) + payload)


AUTHENTICATION_OK = authentication(AUTH_OK)


def authentication_sasl(mechanisms: list[str]) -> bytes:
    return authentication(AUTH_SASL, b"".join(cstr(m) for m in mechanisms) + b"\0")


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", _I32I32.pack(pid, secret))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


READY_IDLE = ready_for_query(b"I")


def command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


def negotiate_protocol_version(newest_minor: int, unrecognized: list[str]) -> bytes:
    body = _I32I32.pack(newest_minor, len(unrecognized)) + b"".join(cstr(o) for o in unrecognized)
    return message(b"v", body)


def row_description(names: list[str]) -> bytes:
    """A RowDescription of text columns (the admin console answers only in text)."""
    parts = [struct.pack("!H", len(names))]
    for name in names:
        parts.append(cstr(name) + struct.pack("!IHIhih", 0, 0, 25, -1, -1, 0))
    return message(b"T", b"".join(parts))


def data_row(values: list[str | None]) -> bytes:
    parts = [struct.pack("!H", len(values))]
    for v in values:
        if v is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            raw = v.encode()
            parts.append(_I32.pack(len(raw)) + raw)
    return message(b"D", b"".join(parts))


# ---- frontend messages the proxy sends to servers ---------------------------------------------


def startup_message(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def password_message(payload: bytes) -> bytes:
    return message(b"p", payload)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


def cancel_request(pid: int, secret: int) -> bytes:
    return _I32.pack(16) + _I32.pack(CANCEL_REQUEST) + _I32I32.pack(pid, secret)


#: The untyped packet asking a server for TLS (answered 'S' or 'N').
SSL_REQUEST_PACKET = _I32.pack(8) + _I32.pack(SSL_REQUEST)
TERMINATE = message(b"X")
SYNC = message(b"S")


# ---- parsers ----------------------------------------------------------------------------------


def split_cstrings(body: bytes) -> list[str]:
    """Split a run of NUL-terminated strings (the trailing terminator is ignored). Decoded in
    one piece: no UTF-8 sequence contains a NUL byte, so the result is the same."""
    return body.decode("utf-8", "replace").split("\0")[:-1]


def parse_data_row(body: bytes) -> list[str | None]:
    """Decode a text-format DataRow body (NULL as None)."""
    try:
        (count,) = struct.unpack_from("!H", body)
        values: list[str | None] = []
        pos = 2
        for _ in range(count):
            (length,) = struct.unpack_from("!i", body, pos)
            pos += 4
            if length < 0:
                values.append(None)
            elif pos + length > len(body):
                raise ProtocolViolation("DataRow column runs past the message")
            else:
                values.append(body[pos : pos + length].decode("utf-8", "replace"))
                pos += length
    except struct.error as exc:
        raise ProtocolViolation(f"malformed DataRow: {exc}") from exc
    return values


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, value, _ = body.split(b"\0", 2)
    return name.decode(), value.decode("utf-8", "replace")


@dataclass(slots=True)
class StartupPacket:
    """An untyped first packet: a startup message, or an SSL/GSS/cancel request."""

    code: int
    params: dict[str, str] = field(default_factory=dict)
    protocol_options: list[str] = field(default_factory=list)  # `_pq_.` names, answered unknown
    cancel_key: tuple[int, int] | None = None

    @property
    def major(self) -> int:
        return self.code >> 16

    @property
    def minor(self) -> int:
        return self.code & 0xFFFF


def parse_startup_body(body: bytes) -> StartupPacket:
    """Decode the body (after the length word) of an untyped packet."""
    if len(body) < 4:
        raise ProtocolViolation("invalid startup packet layout: too short")
    (code,) = _I32.unpack_from(body)
    if code == CANCEL_REQUEST:
        if len(body) != 12:
            raise ProtocolViolation("invalid length of cancel request packet")
        return StartupPacket(code, cancel_key=_I32I32.unpack_from(body, 4))
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        if len(body) != 4:
            raise ProtocolViolation("invalid length of encryption request packet")
        return StartupPacket(code)
    if code >> 16 != 3:
        return StartupPacket(code)
    rest = body[4:]
    if not rest.endswith(b"\0"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    strings = split_cstrings(rest[:-1])
    names = strings[::2]
    if "" in names:  # an empty name ends the list: PostgreSQL wants nothing after it
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    if len(strings) % 2:
        raise ProtocolViolation("invalid startup packet layout: odd number of strings")
    params = dict(zip(names, strings[1::2], strict=True))
    options = [name for name in names if name.startswith("_pq_.")]
    for name in options:
        params.pop(name, None)
    return StartupPacket(code, params, options)


def parse_options(options: str) -> dict[str, str]:
    """Extract `-c name=value` / `--name=value` settings from a startup `options` string.

    Backslash escapes a space or backslash, as in libpq's PGOPTIONS.
    """
    words: list[str] = []
    cur: list[str] = []
    escape = False
    for ch in options:
        if escape:
            cur.append(ch)
            escape = False
        elif ch == "\\":
            escape = True
        elif ch.isspace():
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    settings: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            word, i = words[i + 1], i + 1
        elif word.startswith(("-c", "--")):
            word = word[2:]
        else:
            raise ValueError(f"unsupported startup option {word!r}")
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise ValueError(f"invalid startup option {word!r}: expected name=value")
        settings[name.replace("-", "_").lower()] = value
        i += 1
    return settings
