"""Header-only walkers for the forwarding path.

The proxy forwards every chunk as it arrives; these scanners only follow message
boundaries across chunks so that it knows where transactions end. Bodies are skipped
by length and never copied, except the few bytes of the messages that matter
(ReadyForQuery's status, ParameterStatus), which are small.
"""

from __future__ import annotations

import struct

from protocol.errors import ProtocolViolation

#: The length word at an offset, as a 1-tuple: half the cost of int.from_bytes on a slice.
LENGTH_AT = struct.Struct("!I").unpack_from

_Z = ord("Z")
_S = ord("S")
_E = ord("E")
_KEPT = frozenset((_S, _E))  # bodies the owner reads: ParameterStatus, ErrorResponse
_Q = ord("Q")
_F = ord("F")
_X = ord("X")
_P = ord("P")
_ANSWERED = frozenset((_Q, _S, _F))  # each gets one ReadyForQuery


class BackendScanner:
    """Follows server -> client messages; counts ReadyForQuery.

    `status` is the transaction status byte of the last ReadyForQuery (b'I'[0], 'T', 'E').
    `params` collects ParameterStatus bodies and `errors` ErrorResponse bodies, which the owner
    drains when it cares.
    """

    __slots__ = ("_need", "_partial", "errors", "params", "status")

    def __init__(self) -> None:
        self._need = 0  # body bytes still to skip from the previous chunk
        self._partial = b""  # an unfinished header, or an unfinished body we must read
        self.status = 73  # 'I'
        self.params: list[bytes] = []
        self.errors: list[bytes] = []

    def feed(self, data: bytes) -> int:
        """Walk one chunk; return how many ReadyForQuery messages ended in it."""
        n = len(data)
        need = self._need
        if need:
            if need >= n:
                self._need = need - n
                return 0
            self._need = 0
            pos = need
        else:
            pos = 0
        if self._partial:
            data = self._partial + data[pos:]
            self._partial = b""
            n = len(data)
            pos = 0
        ready = 0
        length_at = LENGTH_AT
        while pos + 5 <= n:
            kind = data[pos]
            end = pos + 1 + length_at(data, pos + 1)[0]
            if end < pos + 5:
                raise ProtocolViolation("server sent an invalid message length")
            if kind == _Z:
                if end != pos + 6:
                    raise ProtocolViolation("server sent a ReadyForQuery of the wrong length")
                if end > n:
                    break
                self.status = data[pos + 5]
                ready += 1
            elif kind in _KEPT:
                if end > n:
                    break
                (self.params if kind == _S else self.errors).append(data[pos + 5 : end])
            pos = end
        if pos > n:
            self._need = pos - n
        elif pos < n:
            self._partial = data[pos:]
        return ready

    @property
    def at_boundary(self) -> bool:
        return not self._need and not self._partial


class FrontendScanner:
    """Follows client -> server messages; counts the ones the server answers with ReadyForQuery.

    Query, Sync and FunctionCall each get exactly one ReadyForQuery. A Terminate stops the
    walk and sets `terminated`; `terminated_at` is its offset in the chunk, so the caller can
    keep it from a pooled server (negative when its header began in an earlier chunk, which
    was already forwarded). Messages over `max_size` are protocol violations. With `watch` set it
    also notes the first Parse of a named statement, where prepared-statement tracking starts.
    """

    __slots__ = (
        "_need",
        "_partial",
        "max_size",
        "named_at",
        "named_end",
        "named_syncs",
        "terminated",
        "terminated_at",
        "watch",
    )

    def __init__(self, max_size: int) -> None:
        self._need = 0
        self._partial = b""
        self.max_size = max_size
        self.terminated = False
        self.terminated_at = 0
        # The first Parse of a named statement, once `watch` is set: its offset and end in
        # the chunk (the offset is negative when its header began in an earlier chunk), and
        # the ReadyForQuery-producing messages before it in the chunk. named_end stays 0
        # until one is seen; watching then stops.
        self.watch = False
        self.named_at = 0
        self.named_end = 0
        self.named_syncs = 0

    def feed(self, data: bytes) -> int:
        n = len(data)
        need = self._need
        if need:
            if need >= n:
                self._need = need - n
                return 0
            self._need = 0
            pos = need
        else:
            pos = 0
        if self._partial:
            # Rare: a header split across chunks. Re-walk from the saved header; the offset
            # of a Terminate found here is shifted back into this chunk's coordinates.
            shift = len(self._partial)
            data = self._partial + data[pos:]
            self._partial = b""
            n = len(data)
            pos = 0
        else:
            shift = 0
        syncs = 0
        max_size = self.max_size
        length_at = LENGTH_AT
        while pos + 5 <= n:
            kind = data[pos]
            length = length_at(data, pos + 1)[0]
            if length < 4:
                raise ProtocolViolation(f"invalid message length {length}")
            if length > max_size:
                raise ProtocolViolation(
                    f"message of {length} bytes exceeds max_packet_size ({max_size})"
                )
            if kind in _ANSWERED:
                syncs += 1
            elif kind == _X:
                self.terminated = True
                self.terminated_at = pos - shift
                return syncs
            elif kind == _P and self.watch and (pos + 5 >= n or data[pos + 5]):
                self.watch = False
                self.named_at = pos - shift
                self.named_end = pos - shift + 1 + length
                self.named_syncs = syncs
            pos += 1 + length
        if pos > n:
            self._need = pos - n
        elif pos < n:
            self._partial = data[pos:]
        return syncs

    @property
    def at_boundary(self) -> bool:
        return not self._need and not self._partial
