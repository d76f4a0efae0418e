"""``workers: N``: a supervisor process and N worker processes on the same listening ports.

The supervisor binds, for every ``listen`` address, one SO_REUSEPORT socket per worker and
keeps them all open; worker i accepts on socket i. The kernel spreads new connections evenly
over the sockets, and since the supervisor holds every socket, connections arriving for a worker
being restarted wait in its queue instead of being refused. The supervisor serves ``admin.http``
itself from the workers' merged metrics, restarts a worker that dies, passes SIGHUP, SIGTERM
and SIGINT on, and answers takeovers on ``handover_socket`` with all the sockets it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any

import structlog
import uvloop

from router import peers
from router.cli import WORKER_ENV
from router.config import Config
from router.handover import CancelKey, HandoverServer, Inherited, Label, Takeover
from router.http import answer, start_http_server
from router.merge import merge_metrics
from router.worker import WorkerSpec

log = structlog.get_logger("pgrouter.supervisor")

RESTART_DELAY = 1.0  # after a worker that crashed, before starting it again
START_TIMEOUT = 60.0  # for every worker to answer, before a takeover completes
KILL_GRACE = 10.0  # beyond shutdown_timeout, before a worker that does not exit is killed
BACKLOG = 2048


def run_supervisor(config: Config, handed: Takeover | None) -> int:
    return uvloop.run(Supervisor(config, handed).run())


def bind_reuseport(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` listening sockets on every address of (host, port), sharing it by
    SO_REUSEPORT; in groups of `count` per address, as `assign` expects."""
    infos = socket.getaddrinfo(
        None if host in ("*", "") else host,
        port,
        type=socket.SOCK_STREAM,
        flags=socket.AI_PASSIVE,
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            for _ in range(count):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(BACKLOG)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def assign(sockets: list[socket.socket], count: int) -> list[list[socket.socket]]:
    """Which sockets each of `count` workers accepts on: socket j goes to worker j % count,
    and with fewer sockets than workers (handed over by a process with fewer workers)
    worker i shares socket i % len(sockets)."""
    shares: list[list[socket.socket]] = [[] for _ in range(count)]
    for j, sock in enumerate(sockets):
        shares[j % count].append(sock)
    for i in range(len(sockets), count):
        shares[i].append(sockets[i % len(sockets)])
    return shares


class Supervisor:
    def __init__(self, config: Config, handed: Takeover | None) -> None:
        self.config = config
        self.handed = handed
        self.count = config.workers
        self.directory = ""
        self.channels: list[socket.socket] = []
        self.paths: list[str] = []
        self.listening: list[tuple[Label, socket.socket]] = []
        self.shares: list[list[tuple[Label, socket.socket]]] = []
        self.procs: list[asyncio.subprocess.Process | None] = [None] * self.count
        self.http: asyncio.Server | None = None
        self.stopping = False
        self._stopped: asyncio.Future[int] | None = None  # its result: unused
        self._timeout = config.shutdown_timeout
        self._tasks: set[asyncio.Task[bytes | None]] = set()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        self.directory = tempfile.mkdtemp(prefix="pgrouter-")
        try:
            return await self._run(loop)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def _run(self, loop: asyncio.AbstractEventLoop) -> int:
        inherited = self.handed.sockets if self.handed is not None else {}
        try:
            self._listen(inherited)
        except OSError as exc:
            log.error("cannot start", error=str(exc))
            return 1
        for i in range(self.count):
            path = peers.peer_path(self.directory, i)
            self.paths.append(path)
            self.channels.append(peers.listening_socket(path))
        own = peers.listening_socket(self._channel_path())
        channel = await peers.serve(own, self._answer)
        if self.config.admin.http is not None:
            host, port = self.config.admin.http
            http = inherited.pop(("http", host, port), None)
            self.http = await start_http_server(
                self._respond, host, port, http[0] if http else None
            )
        for label, unused in inherited.items():
            log.info("closing a listener no longer configured", address=f"{label[1]}:{label[2]}")
            for sock in unused:
                sock.close()
        watchers = [loop.create_task(self._keep_running(i)) for i in range(self.count)]
        loop.add_signal_handler(signal.SIGTERM, self.stop, self.config.shutdown_timeout)
        loop.add_signal_handler(signal.SIGINT, self.stop, 0.0)
        loop.add_signal_handler(signal.SIGHUP, self._signal_workers, signal.SIGHUP)
        answers = await peers.ask_all(self.paths, {"op": "ready"}, timeout=START_TIMEOUT)
        if self.handed is not None and not all(answers):
            log.error("workers did not start; the running process keeps serving")
            self.stop(0.0)
            await asyncio.gather(*watchers)
            return 1
        log.info("workers serving", workers=self.count)
        handover: HandoverServer | None = None
        if self.config.handover_socket is not None:
            handover = HandoverServer(
                self.config.handover_socket,
                self._handover_sockets,
                lambda: self.stop(self.config.shutdown_timeout),
                self._cancel,
            )
            await handover.start()
        if self.handed is not None:
            await self.handed.ready()
        assert self._stopped is not None
        await self._stopped
        if handover is not None:
            handover.close()
        if self.http is not None:
            self.http.close()
        for sock in self.channels:
            sock.close()
        await asyncio.gather(*watchers)
        channel.close()
        return 0

    def _listen(self, inherited: Inherited) -> None:
        """The listening sockets of every address, and each worker's share of them."""
        self.shares = [[] for _ in range(self.count)]
        for host, port in self.config.listen:
            label: Label = ("listen", host, port)
            sockets = inherited.pop(label, None) or bind_reuseport(host, port, self.count)
            self.listening += [(label, sock) for sock in sockets]
            for i, share in enumerate(assign(sockets, self.count)):
                self.shares[i] += [(label, sock) for sock in share]
            log.info("listening", address=f"{host}:{port}", sockets=len(sockets))

    def stop(self, timeout: float) -> None:
        """Drain every worker for up to `timeout` (0: at once), then exit."""
        if self.stopping:
            return
        self.stopping = True
        self._timeout = timeout
        log.info("shutting down", timeout=timeout)
        self._signal_workers(signal.SIGTERM if timeout > 0 else signal.SIGINT)
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(0)

    def _signal_workers(self, sig: int) -> None:
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    # ---- workers ------------------------------------------------------------------------------

    async def _keep_running(self, index: int) -> None:
        """Run worker `index`, and again whenever it dies, until the supervisor stops."""
        while not self.stopping:
            started = time.monotonic()
            try:
                proc = await self._spawn(index)
            except OSError as exc:
                log.error("cannot start a worker", worker=index, error=str(exc))
                await asyncio.sleep(RESTART_DELAY)
                continue
            self.procs[index] = proc
            if self.stopping:  # stopped while it started
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM if self._timeout > 0 else signal.SIGINT)
            code = await self._wait(proc)
            if self.stopping:
                return
            log.warning("worker exited; starting it again", worker=index, code=code)
            if time.monotonic() - started < RESTART_DELAY:
                await asyncio.sleep(RESTART_DELAY)

    async def _wait(self, proc: asyncio.subprocess.Process) -> int:
        """Its exit code; once stopping, it is killed after shutdown_timeout and a grace."""
        code = asyncio.ensure_future(proc.wait())
        assert self._stopped is not None
        await asyncio.wait([code, self._stopped], return_when=asyncio.FIRST_COMPLETED)
        if not code.done():
            try:
                await asyncio.wait_for(asyncio.shield(code), self._timeout + KILL_GRACE)
            except TimeoutError:
                log.error("worker did not stop; killing it", pid=proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        return await code

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        share = self.shares[index]
        spec = WorkerSpec(
            index=index,
            count=self.count,
            channels=tuple(self.paths),
            channel_fd=self.channels[index].fileno(),
            sockets=tuple((label, sock.fileno()) for label, sock in share),
            supervisor=os.getpid(),
            supervisor_channel=self._channel_path(),
        )
        assert self.config.source is not None
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router",
            "--config",
            self.config.source,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, WORKER_ENV: spec.encode()},
            pass_fds=[spec.channel_fd, *(fd for _, fd in spec.sockets)],
        )

    # ---- what the workers answer together -------------------------------------------------------

    async def _respond(self, method: str, target: str) -> bytes:
        path = target.split("?", 1)[0]
        metrics = b""
        ready = (True, "ready")
        if path == "/metrics" and method in ("GET", "HEAD"):
            answers = await peers.ask_all(self.paths, {"op": "metrics"})
            metrics = merge_metrics([a for a in answers if a])
        elif path == "/readyz" and method in ("GET", "HEAD"):
            ready = await self._readiness()
        return answer(method, target, lambda: metrics, lambda: ready)

    async def _readiness(self) -> tuple[bool, str]:
        """Ready when every worker is."""
        for i, reply in enumerate(await peers.ask_all(self.paths, {"op": "ready"}, timeout=2)):
            if not reply:
                return False, f"worker {i} not answering"
            ready, reason = json.loads(reply)
            if not ready:
                return False, reason
        return True, "ready"

    def _channel_path(self) -> str:
        return os.path.join(self.directory, "supervisor.sock")

    async def _answer(self, request: dict[str, Any]) -> bytes:
        """The workers' requests: a cancel key none of them issued goes to the process we
        took over from, while it drains."""
        if request.get("op") == "cancel" and self.handed is not None:
            pid, secret = request["key"]
            self.handed.forward_cancel((int(pid), int(secret)))
        return b"ok"

    def _handover_sockets(self) -> list[tuple[Label, int]]:
        if self.stopping:
            return []
        items = [(label, sock.fileno()) for label, sock in self.listening]
        if self.http is not None and self.config.admin.http is not None:
            host, port = self.config.admin.http
            items += [(("http", host, port), sock.fileno()) for sock in self.http.sockets]
        return items

    def _cancel(self, key: CancelKey) -> None:
        """A cancel request the successor passes on: to the worker that issued the key."""
        path = self.paths[key[0] % self.count]
        task = asyncio.get_running_loop().create_task(
            peers.ask(path, {"op": "cancel", "key": list(key)})
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
