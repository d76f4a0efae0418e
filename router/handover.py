"""Zero-downtime restart: the running process hands its listening sockets to a successor.

The running process listens on ``handover_socket`` (a Unix socket). A successor started with
``--takeover`` connects and sends ``takeover``; the running one answers with one message
carrying its listening sockets (SCM_RIGHTS) and a JSON line naming each of them, and keeps
accepting. The successor serves on the very same sockets, then sends ``ready``; only then does
the old process stop accepting and drain. The sockets stay open throughout, so the kernel never
refuses a connection: it queues them on the shared socket for whichever process accepts first.

While the old process drains, the connection stays open: the successor passes it the cancel
requests for keys it does not know (``cancel PID SECRET``), which are the old process's clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable

import structlog

log = structlog.get_logger("pgrouter.handover")

#: What a handed-over socket is for: ("listen" | "http", host, port) as in the topology.
Label = tuple[str, str, int]
Inherited = dict[Label, list[socket.socket]]
CancelKey = tuple[int, int]

MAX_FDS = 1024
TIMEOUT = 30.0  # for each step of a takeover
#: How long the running process waits for its successor to serve: beyond the successor's own
#: limit for starting its workers, so only a successor that died is given up on.
READY_TIMEOUT = 120.0


class HandoverError(Exception):
    """The running process refused or failed the takeover."""


# ---- the successor ------------------------------------------------------------------------------


class Takeover:
    """The successor's side, after it received the sockets."""

    def __init__(self, conn: socket.socket, pid: int, sockets: Inherited) -> None:
        self.conn = conn
        self.pid = pid  # the predecessor's
        self.sockets = sockets

    async def ready(self) -> None:
        """Tell the predecessor to stop accepting and drain: we serve on the sockets now
        (if it died meanwhile, we serve all the same)."""
        self.conn.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_sendall(self.conn, b"ready\n")
        except OSError as exc:
            log.warning("the process taken over from is gone", error=str(exc))

    def forward_cancel(self, key: CancelKey) -> None:
        """A cancel request for a key we do not know: maybe a client of the predecessor."""
        with contextlib.suppress(OSError):  # it exited meanwhile, or its buffer is full
            self.conn.send(f"cancel {key[0]} {key[1]}\n".encode())

    def close(self) -> None:
        self.conn.close()
        for group in self.sockets.values():
            for sock in group:
                sock.close()


def take_over(path: str, timeout: float = TIMEOUT) -> Takeover | None:
    """Receive the listening sockets of the process serving `path`; None when nobody does."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    try:
        conn.sendall(f"takeover {os.getpid()}\n".encode())
        data, fds, _, _ = socket.recv_fds(conn, 65536, MAX_FDS)
        while not data.endswith(b"\n"):
            more = conn.recv(65536)
            if not more:
                break
            data += more
    except OSError as exc:
        conn.close()
        raise HandoverError(f"{path}: {exc}") from None
    sockets = [socket.socket(fileno=fd) for fd in fds]
    try:
        header = json.loads(data)
        if "error" in header:
            raise HandoverError(f"the running process refused: {header['error']}")
        labels = [tuple(label) for label in header["sockets"]]
        if len(labels) != len(sockets):
            raise HandoverError(f"got {len(sockets)} sockets for {len(labels)} names")
    except (ValueError, KeyError, TypeError, HandoverError) as exc:
        conn.close()
        for sock in sockets:
            sock.close()
        if isinstance(exc, HandoverError):
            raise
        raise HandoverError(f"malformed answer from the running process: {exc}") from None
    inherited: Inherited = {}
    for label, sock in zip(labels, sockets, strict=True):
        inherited.setdefault((str(label[0]), str(label[1]), int(label[2])), []).append(sock)
    return Takeover(conn, int(header["pid"]), inherited)


# ---- the running process ------------------------------------------------------------------------


class HandoverServer:
    """Answers takeovers on `path`.

    offer: the sockets to hand over, by label (empty while shutting down); handed_over: the
    successor is ready (the caller drains); cancel: a cancel request the successor forwards.
    """

    def __init__(
        self,
        path: str,
        offer: Callable[[], list[tuple[Label, int]]],
        handed_over: Callable[[], None],
        cancel: Callable[[CancelKey], object],
    ) -> None:
        self.path = path
        self.offer = offer
        self.handed_over = handed_over
        self.cancel = cancel
        self._sock: socket.socket | None = None
        self._inode = 0
        self._busy = False
        self._task: asyncio.Task[None] | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on `path`, atomically replacing whatever is there (a predecessor's socket
        or a stale file): bind a temporary name, then rename it over `path`."""
        temp = f"{self.path}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(temp)
            os.chmod(temp, 0o600)
            sock.listen(8)
            os.rename(temp, self.path)
        except OSError:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        sock.setblocking(False)
        self._sock = sock
        self._inode = os.stat(self.path).st_ino
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())
        log.info("handover socket listening", path=self.path)

    def close(self) -> None:
        """Stop answering takeovers; remove the path unless a successor owns it now."""
        if self._task is not None:
            self._task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            task = loop.create_task(self._session(conn))
            self._sessions.add(task)
            task.add_done_callback(self._sessions.discard)

    async def _session(self, conn: socket.socket) -> None:
        reader = _Lines(conn)
        try:
            request = await asyncio.wait_for(reader.line(), TIMEOUT)
            if request is None or not request.startswith("takeover"):
                return
            successor = request.partition(" ")[2]
            if self._busy:
                await self._refuse(conn, "another takeover is in progress")
                return
            items = self.offer()
            if not items:
                await self._refuse(conn, "not listening (shutting down)")
                return
            self._busy = True
            try:
                header = {"pid": os.getpid(), "sockets": [label for label, _ in items]}
                socket.send_fds(conn, [json.dumps(header).encode() + b"\n"], [f for _, f in items])
                log.info("sockets handed over; waiting for the successor", successor=successor)
                answer = await asyncio.wait_for(reader.line(), READY_TIMEOUT)
            finally:
                self._busy = False
            if answer is None or not answer.startswith("ready"):
                log.warning("takeover abandoned by the successor; still serving")
                return
            log.info("successor serving; draining", successor=successor)
            self.close()  # the successor answers takeovers from now on
            self.handed_over()
            while (line := await reader.line()) is not None:  # until the successor exits
                self._forwarded(line)
        except (OSError, TimeoutError) as exc:
            log.warning("takeover failed; still serving", error=str(exc) or type(exc).__name__)
        finally:
            conn.close()

    def _forwarded(self, line: str) -> None:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "cancel":
            with contextlib.suppress(ValueError):
                self.cancel((int(parts[1]), int(parts[2])))

    @staticmethod
    async def _refuse(conn: socket.socket, reason: str) -> None:
        data = json.dumps({"pid": os.getpid(), "error": reason}).encode() + b"\n"
        await asyncio.get_running_loop().sock_sendall(conn, data)


class _Lines:
    """Newline-terminated text lines from a non-blocking socket."""

    def __init__(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self.conn = conn
        self.buffer = b""

    async def line(self) -> str | None:
        """The next line, or None at end of stream."""
        loop = asyncio.get_running_loop()
        while b"\n" not in self.buffer:
            data = await loop.sock_recv(self.conn, 4096)
            if not data:
                return None
            self.buffer += data
            if len(self.buffer) > 65536:
                raise OSError("line too long")
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode(errors="replace").strip()
