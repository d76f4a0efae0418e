"""Zero-downtime restart: `pgrouter --takeover` takes the listening sockets over from the
running process through handover_socket; the old one drains and exits.

The load is connect-per-request through psycopg from several threads for the whole test, so any
moment where the port refuses or drops connections shows up as a failed request.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from router.handover import take_over
from tests.support import REPO_ROOT, BackgroundQuery, ProxyProcess, start_proxy, wait_for

pytestmark = pytest.mark.timeout(120)

ProxyFactory = Callable[..., ProxyProcess]
THREADS = 4


class Load:
    """Threads doing connect - SELECT - disconnect in a loop; every failure is kept."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.ok = 0
        self.failures: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(THREADS)]

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=20) as conn:
                    assert conn.execute("SELECT 1").fetchone() == (1,)
            except Exception as exc:
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.monotonic() - start
            with self._lock:
                self.ok += 1
                self.slowest = max(self.slowest, elapsed)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def logins(proxy: ProxyProcess) -> int:
    return proxy.log_text().count("client login")


@pytest.fixture
def handover_path(tmp_path: Path) -> str:
    return str(tmp_path / "handover.sock")


@contextmanager
def successor(
    proxy: ProxyProcess, tmp_path: Path, config: dict[str, Any] | None = None
) -> Iterator[ProxyProcess]:
    """`pgrouter --takeover` with `proxy`'s topology (or `config`), stopped at the end."""
    new = start_proxy(config or proxy.config, tmp_path, name="successor", args=["--takeover"])
    try:
        yield new
    finally:
        new.stop(signal.SIGTERM, timeout=20)


def test_takeover_under_connect_per_request_load(
    proxy_factory: ProxyFactory, tmp_path: Path, handover_path: str
) -> None:
    old = proxy_factory(handover_socket=handover_path, log={"level": "info"})
    load = Load(old.dsn())
    with load:
        wait_for(lambda: load.ok >= 20, timeout=30)
        new = start_proxy(old.config, tmp_path, name="successor", args=["--takeover"])
        old.proc.wait(timeout=60)  # drained and gone
        served_before = load.ok
        wait_for(lambda: load.ok >= served_before + 20, timeout=30)
    try:
        assert new.returncode is None
        assert logins(new) > 0
    finally:
        new.stop()
    print(f"\nrequests: {load.ok}, slowest connect+SELECT: {load.slowest * 1000:.0f} ms")
    assert load.failures == [], load.failures[:5]
    assert old.returncode == 0, old.log_text()
    assert logins(old) > 0
    assert "successor serving; draining" in old.log_text()
    assert "inherited=True" in new.log_text()


def test_the_successor_hands_over_again(
    proxy_factory: ProxyFactory, tmp_path: Path, handover_path: str
) -> None:
    """The successor answers on handover_socket too: a second deploy works the same way."""
    first = proxy_factory(handover_socket=handover_path)
    second = start_proxy(first.config, tmp_path, name="second", args=["--takeover"])
    try:
        first.proc.wait(timeout=30)
        with successor(second, tmp_path) as third:
            second.proc.wait(timeout=30)
            assert second.returncode == 0
            with psycopg.connect(third.dsn(), autocommit=True, connect_timeout=10) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        second.stop()


def test_takeover_with_nobody_running_listens_afresh(
    proxy_factory: ProxyFactory, handover_path: str
) -> None:
    proxy = proxy_factory(handover_socket=handover_path, args=["--takeover"])
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert "no pgrouter to take over from; listening afresh" in proxy.log_text()
    assert Path(handover_path).exists()  # and the next deploy can take over from it


def test_takeover_needs_a_handover_socket(proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    running = proxy_factory()
    path = tmp_path / "no-handover.yaml"
    path.write_text(running.config_path.read_text())
    result = subprocess.run(
        [sys.executable, "-m", "router", "--config", str(path), "--takeover"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 2
    assert "--takeover needs handover_socket" in result.stderr


def test_a_successor_with_a_bad_file_leaves_the_old_one_serving(
    proxy_factory: ProxyFactory, tmp_path: Path, handover_path: str
) -> None:
    old = proxy_factory(handover_socket=handover_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(old.config_path.read_text() + "pool_sizee: 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "router", "--config", str(bad), "--takeover"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 1
    assert "pool_sizee: unknown key" in result.stderr
    time.sleep(0.5)
    assert old.returncode is None
    with psycopg.connect(old.dsn(), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_successor_that_dies_before_serving_leaves_the_old_one_serving(
    proxy_factory: ProxyFactory, tmp_path: Path, handover_path: str
) -> None:
    """It received the sockets, then went away without saying `ready`."""
    old = proxy_factory(handover_socket=handover_path)
    handed = take_over(handover_path)
    assert handed is not None and handed.pid == old.pid
    assert ("listen", old.host, old.port) in handed.sockets
    handed.close()
    wait_for(lambda: "takeover abandoned by the successor; still serving" in old.log_text())
    assert old.returncode is None
    with psycopg.connect(old.dsn(), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with successor(old, tmp_path):  # a later deploy still works
        old.proc.wait(timeout=30)


@pytest.mark.parametrize(("old_workers", "new_workers"), [(1, 1), (1, 2), (2, 1)])
def test_cancel_reaches_a_query_running_on_the_draining_process(
    proxy_factory: ProxyFactory,
    tmp_path: Path,
    handover_path: str,
    old_workers: int,
    new_workers: int,
) -> None:
    """The cancel request's connection lands on the successor, which passes the key on
    (through its workers and supervisor, and the old supervisor to the old worker)."""
    old = proxy_factory(handover_socket=handover_path, shutdown_timeout="60s", workers=old_workers)
    if old_workers > 1:
        wait_for(lambda: "workers serving" in old.log_text(), timeout=60)
    with psycopg.connect(old.dsn(), autocommit=True, connect_timeout=10) as conn:
        sleeper = BackgroundQuery(conn, "SELECT pg_sleep(30)")
        time.sleep(0.5)
        with successor(old, tmp_path, {**old.config, "workers": new_workers}) as new:
            wait_for(lambda: "successor serving; draining" in old.log_text(), timeout=60)
            start = time.monotonic()
            conn.cancel()
            outcome = sleeper.join(20)
            elapsed = time.monotonic() - start
            assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled)
            assert elapsed < 10, f"the cancel took {elapsed:.1f}s"
            old.proc.wait(timeout=30)
            assert new.returncode is None
