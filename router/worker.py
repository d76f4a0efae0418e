"""One worker process of ``workers: N``: a whole proxy with its share of every pool.

The supervisor starts ``python -m router --config PATH`` with PGROUTER_WORKER describing the
worker (its index, the listening sockets it inherits, the internal channel). The worker answers
the other processes on its channel (router.peers): its metrics, admin answers, readiness, and
cancel requests that reached another worker. Its admin console gathers from all workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import uvloop

from protocol import errors as e
from protocol import messages as m
from router import peers
from router.admin import _COMMAND, AdminConsole, split_statements
from router.config import Config
from router.handover import CancelKey, Inherited, Label
from router.http import readiness
from router.logs import bind_process, setup_logging
from router.merge import RULES, merge_results, parse_result, render_result
from router.metrics import render
from router.proxy import Proxy

log = structlog.get_logger("pgrouter.worker")

PAUSE_POLL = 0.05
SUPERVISOR_POLL = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    count: int
    channels: tuple[str, ...]  # every worker's channel path, by index
    channel_fd: int  # this worker's, bound and listening
    sockets: tuple[tuple[Label, int], ...]  # the listening sockets it serves
    supervisor: int  # pid
    supervisor_channel: str  # where keys no worker issued go (a predecessor's clients)

    def encode(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "count": self.count,
                "channels": self.channels,
                "channel_fd": self.channel_fd,
                "sockets": [[*label, fd] for label, fd in self.sockets],
                "supervisor": self.supervisor,
                "supervisor_channel": self.supervisor_channel,
            }
        )

    @classmethod
    def decode(cls, text: str) -> WorkerSpec:
        data = json.loads(text)
        return cls(
            index=int(data["index"]),
            count=int(data["count"]),
            channels=tuple(data["channels"]),
            channel_fd=int(data["channel_fd"]),
            sockets=tuple(((k, h, int(p)), int(fd)) for k, h, p, fd in data["sockets"]),
            supervisor=int(data["supervisor"]),
            supervisor_channel=str(data["supervisor_channel"]),
        )

    @property
    def peers(self) -> list[str]:
        return [p for i, p in enumerate(self.channels) if i != self.index]


def run_worker(config: Config, spec: WorkerSpec) -> int:
    setup_logging(config.log.level, config.log.format)
    bind_process(worker=spec.index)
    return uvloop.run(_serve(config, spec))


async def _serve(config: Config, spec: WorkerSpec) -> int:
    proxy = Proxy(config, worker=(spec.index, spec.count))
    inherited: Inherited = {}
    for label, fd in spec.sockets:
        inherited.setdefault(label, []).append(socket.socket(fileno=fd))
    await proxy.start(inherited)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[float] = loop.create_future()

    def finish(timeout: float) -> None:
        if not stop.done():
            stop.set_result(timeout)

    worker = Worker(proxy, spec)
    channel = await peers.serve(socket.socket(fileno=spec.channel_fd), worker.answer)
    proxy.cancel_elsewhere = worker.forward_cancel
    proxy.console_factory = lambda: WorkersConsole(proxy, spec.peers)
    proxy.on_shutdown_request = lambda: os.kill(spec.supervisor, signal.SIGTERM)
    loop.add_signal_handler(signal.SIGTERM, finish, config.shutdown_timeout)
    loop.add_signal_handler(signal.SIGINT, finish, 0.0)
    loop.add_signal_handler(signal.SIGHUP, proxy.reload_from_file)
    orphan = loop.create_task(_watch_supervisor(spec.supervisor, finish, config.shutdown_timeout))
    timeout = await stop
    orphan.cancel()
    log.info("shutting down", timeout=timeout)
    await proxy.shutdown(timeout)
    channel.close()
    return 0


async def _watch_supervisor(pid: int, finish: Callable[[float], None], timeout: float) -> None:
    """A worker whose supervisor died (SIGKILL) drains and exits rather than serve alone."""
    while os.getppid() == pid:
        await asyncio.sleep(SUPERVISOR_POLL)
    log.error("supervisor gone; shutting down")
    finish(timeout)


class Worker:
    """Answers the internal channel for one worker's proxy."""

    def __init__(self, proxy: Proxy, spec: WorkerSpec) -> None:
        self.proxy = proxy
        self.spec = spec
        self._tasks: set[asyncio.Task[Any]] = set()

    def forward_cancel(self, key: CancelKey) -> None:
        """A key another worker issued: hand the request to it. One that looks like ours
        (but nobody here has it) may be a key of the process we took over from."""
        index = key[0] % self.spec.count
        if index == self.spec.index:
            self._send(self.spec.supervisor_channel, key)
        else:
            self._send(self.spec.channels[index], key)

    def _send(self, path: str, key: CancelKey) -> None:
        request = {"op": "cancel", "key": list(key)}
        task = asyncio.get_running_loop().create_task(peers.ask(path, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def answer(self, request: dict[str, Any]) -> bytes:
        proxy = self.proxy
        op = request.get("op")
        database = request.get("database")
        if op == "metrics":
            return render(proxy)
        if op == "admin":
            return AdminConsole(proxy).execute(str(request["sql"]))
        if op == "ready":
            return json.dumps(readiness(proxy)).encode()
        if op == "cancel":
            pid, secret = request["key"]
            key = (int(pid), int(secret))
            if not proxy.cancel(key, forwarded=True):
                self._send(self.spec.supervisor_channel, key)
        elif op == "pause":
            if not proxy.is_paused(database or "*"):
                proxy.pause(database)
        elif op == "resume":
            proxy.resume(database)
        elif op == "reload":
            return json.dumps(proxy.reload_from_file()).encode()
        elif op == "running":
            name = database or "*"
            running = proxy.transactions_running(name) if proxy.is_paused(name) else 0
            return str(running).encode()
        return b"ok"


class WorkersConsole(AdminConsole):
    """The admin console of one worker that answers for all of them: SHOW commands are
    merged from every worker's answer, PAUSE, RESUME and RELOAD reach every worker."""

    def __init__(self, proxy: Proxy, others: list[str]) -> None:
        super().__init__(proxy)
        self.others = others

    def execute(self, sql: str) -> bytes:
        statements = split_statements(sql)
        if not any(_gathered(s) for s in statements):
            return super().execute(sql)
        self.deferred = asyncio.ensure_future(self._execute(statements))
        return b""

    async def _execute(self, statements: list[str]) -> bytes:
        out = []
        for statement in statements:
            local = super().execute(statement)[: -len(m.READY_IDLE)]
            self.pausing = None  # PAUSE waits for every worker below
            gathered = _gathered(statement)
            if gathered is None or local[:1] == b"E":
                out.append(local)
                if local[:1] == b"E":
                    break
                continue
            verb, arg = gathered
            out.append(await self._everywhere(verb, arg, statement, local))
            if out[-1][:1] == b"E":
                break
        out.append(m.READY_IDLE)
        return b"".join(out)

    async def _everywhere(self, verb: str, arg: str, statement: str, local: bytes) -> bytes:
        if verb == "show":
            answers = await peers.ask_all(self.others, {"op": "admin", "sql": statement})
            results = [parse_result(a) for a in (local, *answers) if a is not None]
            if results[0] is None:
                return local
            mergeable = [r for r in results if r is not None]
            return render_result(merge_results(RULES[arg], mergeable))
        database = arg or None
        if verb == "reload":
            for answer in await peers.ask_all(self.others, {"op": "reload"}):
                errors = json.loads(answer) if answer else ["a worker did not answer"]
                if errors:
                    detail = "\n".join(errors) if len(errors) > 1 else None
                    return e.error_response("F0000", f"RELOAD failed: {errors[0]}", detail=detail)
            return local
        await peers.ask_all(self.others, {"op": verb, "database": database})
        if verb == "pause":
            await self._wait_paused(database or "*")
        return local

    async def _wait_paused(self, database: str) -> None:
        """PAUSE answers once no worker runs a transaction of the paused databases."""
        while self.proxy.is_paused(database):
            running = self.proxy.transactions_running(database)
            for answer in await peers.ask_all(self.others, {"op": "running", "database": database}):
                running += int(answer or 0)
            if not running:
                return
            await asyncio.sleep(PAUSE_POLL)


def _gathered(statement: str) -> tuple[str, str] | None:
    """("show", what) for a SHOW that is merged, or (verb, database) for PAUSE, RESUME and
    RELOAD; None for what one worker answers alone."""
    match = _COMMAND.fullmatch(statement)
    if match is None:
        return None
    verb, arg = match.group(1).lower(), (match.group(2) or "").strip('"')
    if verb in ("show", "select"):
        return ("show", arg.lower()) if arg.lower() in RULES else None
    if verb in ("pause", "resume", "reload"):
        return verb, arg
    return None
