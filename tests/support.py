"""Helpers for the test suite: topology dicts, free ports and pgrouter child processes.

The proxy always runs as a real child process (``python -m router --config FILE``), exactly as
users run it, so tests exercise the CLI, config loading, signals and shutdown too.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import psycopg
import pytest
import yaml

from router.cluster import conninfo

REPO_ROOT = Path(__file__).resolve().parent.parent

APP_USER, APP_PASSWORD = "app", "app-secret"
MD5_USER, MD5_PASSWORD = "md5user", "md5-secret"
DATABASES = ("appdb", "otherdb")


class _Delete:
    """Marker: deep_merge(base, {"key": DELETE}) removes "key" (None is a real YAML value)."""

    def __repr__(self) -> str:
        return "DELETE"


DELETE: Any = _Delete()


class NodeLike(Protocol):
    host: str
    port: int


class ClusterLike(Protocol):
    @property
    def primary(self) -> NodeLike: ...

    @property
    def replicas(self) -> Sequence[NodeLike]: ...


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind port 0 and ask)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge override into a copy of base: mappings recursively, everything else replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def address(node: NodeLike) -> str:
    """A node as a topology server string ("host:port", brackets for IPv6)."""
    host = f"[{node.host}]" if ":" in node.host else node.host
    return f"{host}:{node.port}"


def base_topology(cluster: ClusterLike, listen_port: int) -> dict[str, Any]:
    """The default proxy topology for tests: both test databases on the test cluster, reads on
    the primary (routing tests turn replica reads on explicitly)."""
    primary = address(cluster.primary)
    replicas = [address(r) for r in cluster.replicas]
    return {
        "listen": f"127.0.0.1:{listen_port}",
        "auth_type": "md5",
        "users": {
            APP_USER: {"password": APP_PASSWORD},
            MD5_USER: {"password": MD5_PASSWORD},
        },
        "databases": {
            db: {"primary": primary, "replicas": list(replicas), "routing": {"reads": "primary"}}
            for db in DATABASES
        },
    }


def _listen_address(listen: object) -> tuple[str, int]:
    first = listen[0] if isinstance(listen, list) else listen
    if not isinstance(first, str):
        raise ValueError(f"cannot read the listen address from {listen!r}")
    host, _, port = first.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


class ProxyProcess:
    """A pgrouter child process started by the proxy_factory fixture."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        config: dict[str, Any],
        config_path: Path,
        log_path: Path,
    ) -> None:
        self.proc = proc
        self.config = config
        self.config_path = config_path
        self.log_path = log_path
        self.host, self.port = _listen_address(config["listen"])
        self.pid = proc.pid

    def __repr__(self) -> str:
        return f"<ProxyProcess pid={self.pid} {self.host}:{self.port}>"

    def dsn(
        self,
        dbname: str = "appdb",
        user: str = APP_USER,
        password: str | None = APP_PASSWORD,
        **kw: str,
    ) -> str:
        """libpq keyword/value string for connecting through the proxy."""
        return conninfo(
            host=self.host, port=self.port, dbname=dbname, user=user, password=password, **kw
        )

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        return stop_process(self.proc, sig, timeout)

    def rss_kb(self) -> int:
        """Resident memory of the proxy process, from /proc/PID/status (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def reload(self, config: dict[str, Any]) -> None:
        """Rewrite the topology file and send SIGHUP."""
        self.config = config
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc.send_signal(signal.SIGHUP)


class ProxyStartError(Exception):
    """The proxy exited or did not listen in time; the message carries its log."""


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_proxy(
    config: dict[str, Any],
    directory: Path,
    *,
    name: str = "proxy",
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 15.0,
) -> ProxyProcess:
    """Write config as YAML, run `python -m router --config FILE`, wait until it listens."""
    config_path = directory / f"{name}.yaml"
    log_path = directory / f"{name}.log"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", "--config", str(config_path), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=REPO_ROOT,
        )
    proxy = ProxyProcess(proc, config, config_path, log_path)
    deadline = time.monotonic() + timeout
    while not _accepts(proxy.host, proxy.port):
        code = proc.poll()
        if code is not None:
            raise ProxyStartError(
                f"pgrouter exited with code {code} before listening on "
                f"{proxy.host}:{proxy.port}\n--- {log_path}:\n{proxy.log_text()}"
            )
        if time.monotonic() > deadline:
            proxy.stop(signal.SIGKILL)
            raise ProxyStartError(
                f"pgrouter did not listen on {proxy.host}:{proxy.port} within {timeout:.0f}s"
                f"\n--- {log_path}:\n{proxy.log_text()}"
            )
        time.sleep(0.05)
    return proxy


def log_tail(proxy: ProxyProcess, lines: int = 40) -> str:
    return "\n".join(proxy.log_text().splitlines()[-lines:])


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10
) -> int:
    """Send `sig`, wait up to `timeout`, then SIGKILL; the exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def wait_replica_reads(proxy: ProxyProcess, timeout: float = 15.0) -> None:
    """Until a plain read on appdb through a fresh connection runs on a replica: the backend
    monitors have reported (and a few rounds more, so that every replica is known)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(
                proxy.dsn("appdb"), autocommit=True, prepare_threshold=None, connect_timeout=10
            ) as conn:
                last = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if last == (True,):
                time.sleep(0.3)
                return
        except psycopg.Error as exc:
            last = exc
        time.sleep(0.1)
    pytest.fail(
        f"reads on appdb never reached a replica within {timeout:.0f}s (last: {last!r})"
        f"\n--- proxy log:\n{log_tail(proxy)}",
        pytrace=False,
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `predicate` every 0.1 s until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


class BackgroundQuery:
    """`sql` running on `conn` in a thread, for a test that cancels it or cuts it off:
    `outcome` ends up holding "finished" or the exception the query raised."""

    def __init__(self, conn: Any, sql: str) -> None:
        self.conn, self.sql = conn, sql
        self.outcome: list[Any] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.conn.execute(self.sql)
            self.outcome.append("finished")
        except Exception as exc:
            self.outcome.append(exc)

    def join(self, timeout: float) -> list[Any]:
        self.thread.join(timeout)
        return self.outcome
