"""The command line as users run it: `python -m router check|--config|--help`, and signals.

Exit codes, what is printed, whether anything listens, and how a running proxy stops: at once
when idle, after the last transaction when a client is inside one, at shutdown_timeout at most.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.support import REPO_ROOT, ProxyProcess, free_port, wait_for

pytestmark = pytest.mark.timeout(60)

ProxyFactory = Callable[..., ProxyProcess]


def run_router(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def good_topology(port: int) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{port}",
        "auth_type": "md5",
        "users": {"app": {"password": "app-secret"}},
        "databases": {
            "appdb": {
                "primary": "127.0.0.1:5432",
                "replicas": ["127.0.0.1:5433", {"host": "127.0.0.1", "port": 5434}],
            }
        },
    }


BAD_PATHS = (
    "pool_sizee",
    "databases.appdb.primary",
    "databases.appdb.replicas[1].port",
    "databases.appdb.routing.bogus",
)


def bad_topology(port: int) -> dict[str, Any]:
    topology = good_topology(port)
    topology["pool_sizee"] = 3  # unknown key
    appdb = topology["databases"]["appdb"]
    appdb["primary"] = "127.0.0.1:70000"  # bad port
    appdb["replicas"][1]["port"] = 0  # bad port
    appdb["routing"] = {"reads": "replicas", "bogus": True}  # unknown nested key
    return topology


def write(tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- check / help / bad configuration -----------------------------------------------------------


def test_help() -> None:
    result = run_router("--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert "--config" in result.stdout
    for command in ("check", "demo"):
        assert command in result.stdout


def test_check_accepts_a_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, "good.yaml", good_topology(free_port()))
    result = run_router("check", "--config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_check_names_every_error_by_its_yaml_path(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", bad_topology(free_port()))
    result = run_router("check", "--config", str(path))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "OK" not in result.stdout
    for yaml_path in BAD_PATHS:
        assert f"{yaml_path}:" in output, f"{yaml_path} not named in:\n{output}"
    assert "65535" in output  # the problem, not only where it is


def test_check_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run_router("check", "--config", str(missing))
    assert result.returncode != 0
    assert str(missing) in result.stdout + result.stderr


def test_run_without_config_is_refused() -> None:
    result = run_router()
    assert result.returncode != 0
    assert "--config" in result.stderr


def test_bad_file_exits_non_zero_without_listening(tmp_path: Path) -> None:
    port = free_port()
    path = write(tmp_path, "bad.yaml", bad_topology(port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    listened = False
    deadline = time.monotonic() + 15
    while proc.poll() is None and time.monotonic() < deadline:
        listened = listened or accepts(port)
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    stdout, stderr = proc.communicate(timeout=5)
    assert proc.returncode not in (None, 0), "a bad topology did not stop the proxy"
    assert not listened and not accepts(port), "the proxy listened with a bad topology"
    for yaml_path in BAD_PATHS:
        assert f"{yaml_path}:" in stdout + stderr, f"{yaml_path} not named in:\n{stderr}"


# ---- signals ------------------------------------------------------------------------------------


@pytest.fixture
def table(cluster: Any) -> Iterator[str]:
    name = f"cli_{uuid.uuid4().hex[:10]}"
    dsn = cluster.primary.dsn("appdb", "app", "app-secret")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def committed_ids(cluster: Any, table: str) -> list[int]:
    with psycopg.connect(cluster.primary.dsn("appdb"), autocommit=True) as su:
        return [r[0] for r in su.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()]


def test_sigterm_with_an_idle_client_exits_0_promptly(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(shutdown_timeout="20s")
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        start = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        code = proxy.proc.wait(timeout=10)
        elapsed = time.monotonic() - start
        assert code == 0, proxy.log_text()
        assert elapsed < 2, f"an idle proxy took {elapsed:.1f}s to stop"
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert not accepts(proxy.port)


def test_sigterm_lets_an_open_transaction_commit(
    cluster: Any, proxy_factory: ProxyFactory, table: str
) -> None:
    proxy = proxy_factory(shutdown_timeout="20s")
    with psycopg.connect(proxy.dsn(), connect_timeout=5) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")  # a transaction is open
        proxy.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proxy.returncode is None, "the proxy did not wait for the open transaction"
        assert not accepts(proxy.port), "a draining proxy still accepts new clients"
        conn.execute(f"INSERT INTO {table} VALUES (2)")
        conn.commit()
        start = time.monotonic()
        code = proxy.proc.wait(timeout=10)
        assert code == 0, proxy.log_text()
        assert time.monotonic() - start < 2, "the proxy lingered after the last commit"
    assert committed_ids(cluster, table) == [1, 2]


def test_sigterm_gives_up_at_shutdown_timeout(
    cluster: Any, proxy_factory: ProxyFactory, table: str
) -> None:
    proxy = proxy_factory(shutdown_timeout="1s")
    with psycopg.connect(proxy.dsn(), connect_timeout=5) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")  # and never commits
        start = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        code = proxy.proc.wait(timeout=10)
        elapsed = time.monotonic() - start
        assert code == 0, proxy.log_text()
        assert 0.8 <= elapsed < 3, f"stopped after {elapsed:.1f}s with shutdown_timeout 1s"
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    time.sleep(0.3)  # the server connection was closed: its transaction rolled back
    assert committed_ids(cluster, table) == []


def test_sigterm_while_a_query_runs_returns_its_result(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(shutdown_timeout="20s")
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=5) as conn:
        result: list[Any] = []

        def run() -> None:
            try:
                result.append(conn.execute("SELECT pg_sleep(1), 'done'").fetchone())
            except Exception as exc:
                result.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.3)
        proxy.proc.send_signal(signal.SIGTERM)
        worker.join(10)
        assert result == [("", "done")], result
        assert proxy.proc.wait(timeout=5) == 0


def test_connection_events_and_log_level_on_reload(proxy_factory: Any) -> None:
    """One line per client login and disconnection at level info; a reload to warning silences
    them, and log.connections: false turns them off."""
    proxy = proxy_factory({"log": {"level": "info"}})

    def session(application_name: str) -> None:
        with psycopg.connect(proxy.dsn(application_name=application_name), autocommit=True) as c:
            c.execute("SELECT 1")

    def lines(event: str) -> int:
        return sum(event in line for line in proxy.log_text().splitlines())

    session("first")
    wait_for(lambda: lines("client closed") == 1)
    assert lines("client login") == 1
    proxy.reload({**proxy.config, "log": {"level": "warning"}})
    wait_for(lambda: "log level changed" in proxy.log_text())
    session("second")
    proxy.reload({**proxy.config, "log": {"level": "info", "connections": False}})
    session("third")
    proxy.reload({**proxy.config, "log": {"level": "info"}})
    time.sleep(0.5)
    session("fourth")
    wait_for(lambda: lines("client closed") == 2)
    assert lines("client login") == 2
    assert "app-secret" not in proxy.log_text()
