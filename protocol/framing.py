"""Incremental framing of whole messages, for the paths that must read bodies.

Used for logins, the admin console and replies the proxy swallows. The forwarding path
uses `scanner`, which never gathers bodies. Chunks may be split anywhere: one byte at a
time yields the same messages as the whole stream at once.
"""

from __future__ import annotations

import struct

from protocol.errors import ProtocolViolation
from protocol.messages import MAX_STARTUP_PACKET, StartupPacket, parse_startup_body

_I32 = struct.Struct("!I")
DEFAULT_MAX_MESSAGE = 256 * 1024 * 1024


class MessageReader:
    """Splits a byte stream into (type, body) pairs of typed messages."""

    __slots__ = ("_buf", "max_size")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self.max_size = max_size

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> tuple[int, bytes] | None:
        """The next complete message, or None until more bytes arrive."""
        buf = self._buf
        if len(buf) < 5:
            return None
        (length,) = _I32.unpack_from(buf, 1)
        if length < 4:
            raise ProtocolViolation(f"invalid message length {length}")
        if length > self.max_size:
            raise ProtocolViolation(
                f"message of {length} bytes exceeds the limit of {self.max_size}"
            )
        end = length + 1
        if len(buf) < end:
            return None
        kind = buf[0]
        body = bytes(buf[5:end])
        del buf[:end]
        return kind, body

    def __iter__(self) -> MessageReader:
        return self

    def __next__(self) -> tuple[int, bytes]:
        msg = self.next()
        if msg is None:
            raise StopIteration
        return msg

    def take_rest(self) -> bytes:
        """Everything buffered and not yet returned (handed to the forwarding path)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


class StartupReader:
    """Reads the untyped first packets of a client connection."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> StartupPacket | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        (length,) = _I32.unpack_from(buf)
        if length < 8:
            raise ProtocolViolation(f"invalid length of startup packet: {length}")
        if length > MAX_STARTUP_PACKET:
            raise ProtocolViolation(f"invalid length of startup packet: {length}")
        if len(buf) < length:
            return None
        body = bytes(buf[4:length])
        del buf[:length]
        return parse_startup_body(body)

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    @property
    def pending(self) -> int:
        return len(self._buf)
