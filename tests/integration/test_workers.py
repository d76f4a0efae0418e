"""`workers: N`: N processes accept on one port with a share of every pool each; cancel
requests, metrics, the admin console, signals and takeovers work as with one process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.integration.test_handover import Load, logins
from tests.support import (
    MD5_PASSWORD,
    MD5_USER,
    REPO_ROOT,
    BackgroundQuery,
    ProxyProcess,
    free_port,
    start_proxy,
    wait_for,
)

pytestmark = pytest.mark.timeout(180)

ProxyFactory = Callable[..., ProxyProcess]


def start(proxy_factory: ProxyFactory, **overrides: Any) -> ProxyProcess:
    """workers: 2 with the admin HTTP endpoint; waits until both workers serve."""
    config = {
        "workers": 2,
        "admin": {"users": ["app"], "http": f"127.0.0.1:{free_port()}"},
        "log": {"level": "info"},
    }
    proxy = proxy_factory(config, **overrides)
    wait_for(lambda: "workers serving" in proxy.log_text(), timeout=60)
    return proxy


def metrics(proxy: ProxyProcess) -> str:
    host, _, port = proxy.config["admin"]["http"].rpartition(":")
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=20) as answer:
        return str(answer.read().decode())


def sample(text: str, metric: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text (0 when absent)."""
    for line in text.splitlines():
        match = re.match(r"^(\w+)(\{.*\})? (\S+)$", line)
        if match is None or match.group(1) != metric:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return 0.0


def admin(proxy: ProxyProcess, sql: str) -> list[dict[str, Any]]:
    with psycopg.connect(proxy.dsn("pgrouter"), autocommit=True, connect_timeout=20) as conn:
        cur = conn.execute(sql)
        if cur.description is None:
            return []
        names = [d.name for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def md5_dsn(proxy: ProxyProcess) -> str:
    return proxy.dsn("otherdb", user=MD5_USER, password=MD5_PASSWORD)


def server_connections(cluster: Any) -> int:
    """md5user's connections on the primary: only pools use that user (monitors log in as
    app)."""
    with psycopg.connect(cluster.primary.dsn("postgres"), autocommit=True) as su:
        row = su.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (MD5_USER,)
        ).fetchone()
        assert row is not None
        return int(row[0])


def workers_serving(proxy: ProxyProcess) -> set[str]:
    return set(re.findall(r"client login .* worker=(\d)", proxy.log_text()))


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def test_pools_are_split_between_workers(cluster: Any, proxy_factory: ProxyFactory) -> None:
    """pool_size 3 over 2 workers: shares of 2 and 1; under load the servers never exceed 3."""
    proxy = start(proxy_factory, pool_size=3)
    stop = threading.Event()
    failures: list[str] = []

    def client() -> None:
        try:
            with psycopg.connect(md5_dsn(proxy), autocommit=True, connect_timeout=20) as conn:
                while not stop.is_set():
                    conn.execute("SELECT pg_sleep(0.02)")
        except Exception as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(12)]
    for thread in threads:
        thread.start()
    highest = 0
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        highest = max(highest, server_connections(cluster))
        time.sleep(0.05)
    pools = admin(proxy, "SHOW POOLS")
    text = metrics(proxy)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert failures == []
    print(f"\nmost server connections seen: {highest} (pool_size 3, 2 workers)")
    assert highest <= 3
    assert workers_serving(proxy) == {"0", "1"}
    row = next(r for r in pools if (r["database"], r["user"]) == ("otherdb", MD5_USER))
    assert int(row["cl_active"]) + int(row["cl_waiting"]) == 12
    assert int(row["sv_active"]) + int(row["sv_idle"]) + int(row["sv_login"]) <= 3
    assert sample(text, "pgrouter_pool_size", database="otherdb", user=MD5_USER) == 3
    assert sample(text, "pgrouter_clients_connected") >= 12


def test_cancel_reaches_the_worker_serving_the_client(proxy_factory: ProxyFactory) -> None:
    """Each cancel request is a new connection, landing on either worker."""
    proxy = start(proxy_factory)
    tries = 16
    slowest = 0.0
    for _ in range(tries):
        with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=20) as conn:
            sleeper = BackgroundQuery(conn, "SELECT pg_sleep(10)")
            time.sleep(0.2)
            start_at = time.monotonic()
            conn.cancel()
            outcome = sleeper.join(15)
            slowest = max(slowest, time.monotonic() - start_at)
            assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled)
    print(f"\n{tries} cancels, slowest {slowest * 1000:.0f} ms")
    assert slowest < 8
    assert sample(metrics(proxy), "pgrouter_cancel_requests_total") == tries


def test_metrics_and_admin_views_add_up_over_workers(proxy_factory: ProxyFactory) -> None:
    proxy = start(proxy_factory)
    sessions = 10
    for _ in range(sessions):
        with psycopg.connect(md5_dsn(proxy), autocommit=True, connect_timeout=20) as conn:
            conn.execute("SELECT 1")
    held = [psycopg.connect(md5_dsn(proxy), autocommit=True, connect_timeout=20) for _ in range(6)]
    try:
        text = metrics(proxy)
        pools = admin(proxy, "SHOW POOLS")
        totals = admin(proxy, "SHOW STATS_TOTALS")
        clients = admin(proxy, "SHOW CLIENTS")
        lists = {r["list"]: r["items"] for r in admin(proxy, "SHOW LISTS")}
    finally:
        for conn in held:
            conn.close()
    assert workers_serving(proxy) == {"0", "1"}
    logins_metric = sample(text, "pgrouter_pool_logins_total", database="otherdb", user=MD5_USER)
    assert logins_metric == sessions + 6
    row = next(r for r in totals if r["database"] == "otherdb")
    assert int(row["client_login_count"]) == sessions + 6
    assert int(row["xact_count"]) >= sessions
    pool = next(r for r in pools if (r["database"], r["user"]) == ("otherdb", MD5_USER))
    assert int(pool["cl_active"]) == 6
    assert sum(1 for c in clients if c["database"] == "otherdb") == 6
    assert int(lists["used_clients"]) == 6 + 1  # and the admin session
    assert int(lists["databases"]) == 2
    assert sample(text, "pgrouter_clients_connected") == 6  # the scrape is not a client
    assert sample(text, "pgbouncer_databases_pool_size", name="otherdb") == 20


def test_pause_and_resume_reach_every_worker(proxy_factory: ProxyFactory) -> None:
    proxy = start(proxy_factory)
    conns = [psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=20) for _ in range(8)]
    done: list[float] = []
    try:
        with psycopg.connect(proxy.dsn("pgrouter"), autocommit=True) as console:
            console.execute("PAUSE appdb")
            start_at = time.monotonic()

            def query(conn: psycopg.Connection[Any]) -> None:
                conn.execute("SELECT 1")
                done.append(time.monotonic() - start_at)

            threads = [threading.Thread(target=query, args=(c,)) for c in conns]
            for thread in threads:
                thread.start()
            time.sleep(1.5)
            assert done == [], "a worker ran a transaction while paused"
            console.execute("RESUME appdb")
            for thread in threads:
                thread.join(20)
        assert len(done) == len(conns)
        assert workers_serving(proxy) == {"0", "1"}
    finally:
        for conn in conns:
            conn.close()


def test_reload_reaches_every_worker(proxy_factory: ProxyFactory) -> None:
    proxy = start(proxy_factory)

    def reloads() -> set[str]:
        return set(re.findall(r"configuration reloaded .* worker=(\d)", proxy.log_text()))

    proxy.reload({**proxy.config})  # SIGHUP to the supervisor
    wait_for(lambda: reloads() == {"0", "1"}, timeout=20)
    before = proxy.log_text().count("configuration reloaded")
    admin(proxy, "RELOAD")
    wait_for(lambda: proxy.log_text().count("configuration reloaded") == before + 2, timeout=20)


def test_a_dead_worker_is_started_again(proxy_factory: ProxyFactory) -> None:
    proxy = start(proxy_factory)
    old = children(proxy.pid)
    assert len(old) == 2
    os.kill(old[0], signal.SIGKILL)
    wait_for(lambda: "worker exited; starting it again" in proxy.log_text(), timeout=20)
    wait_for(lambda: len(set(children(proxy.pid)) - set(old)) == 1, timeout=30)
    for _ in range(20):  # the restarted worker's socket was kept: connections wait, then work
        with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=30) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert proxy.returncode is None


def test_sigterm_drains_every_worker(proxy_factory: ProxyFactory) -> None:
    proxy = start(proxy_factory, shutdown_timeout="20s")
    conns = [psycopg.connect(proxy.dsn(), connect_timeout=20) for _ in range(6)]
    for conn in conns:
        conn.execute("SELECT 1")  # a transaction is open on each
    workers = children(proxy.pid)
    proxy.proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert proxy.returncode is None, "the proxy did not wait for the open transactions"
    for conn in conns:
        conn.commit()
        conn.close()
    assert proxy.proc.wait(timeout=20) == 0
    for pid in workers:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        )


def test_takeover_with_workers_under_load(proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    """The supervisor hands all its sockets over; the new one's workers serve on them."""
    old = start(proxy_factory, handover_socket=str(tmp_path / "handover.sock"))
    load = Load(old.dsn())
    with load:
        wait_for(lambda: load.ok >= 20, timeout=30)
        new = start_proxy(old.config, tmp_path, name="successor", args=["--takeover"])
        try:
            old.proc.wait(timeout=60)
            served_before = load.ok
            wait_for(lambda: load.ok >= served_before + 20, timeout=30)
        except BaseException:
            new.stop()
            raise
    try:
        assert new.returncode is None
        assert logins(new) > 0 and logins(old) > 0
        assert "workers serving" in new.log_text()
        # the admin HTTP socket was handed over too: the new supervisor answers on it
        assert sample(metrics(new), "pgrouter_pool_logins_total", database="appdb", user="app") > 0
    finally:
        new.stop(timeout=30)
    print(f"\nrequests: {load.ok}, slowest connect+SELECT: {load.slowest * 1000:.0f} ms")
    assert load.failures == [], load.failures[:5]
    assert old.returncode == 0


def test_a_successor_that_cannot_listen_leaves_the_old_one_serving(
    proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    """The new supervisor cannot bind an added address (taken by another program): it exits
    1 before saying ready, and the old process never stops accepting."""
    old = proxy_factory(handover_socket=str(tmp_path / "handover.sock"))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        config = {**old.config, "workers": 2, "listen": [old.config["listen"], f"127.0.0.1:{busy}"]}
        path = tmp_path / "successor.yaml"
        path.write_text(yaml.safe_dump(config))
        result = subprocess.run(
            [sys.executable, "-m", "router", "--config", str(path), "--takeover"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
        )
    assert result.returncode == 1, result.stderr
    assert "cannot start" in result.stderr
    wait_for(lambda: "takeover abandoned by the successor" in old.log_text(), timeout=20)
    assert old.returncode is None
    with psycopg.connect(old.dsn(), autocommit=True, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_workers_stop_when_the_supervisor_is_killed(proxy_factory: ProxyFactory) -> None:
    proxy = start(proxy_factory)
    workers = children(proxy.pid)
    proxy.proc.kill()
    proxy.proc.wait(timeout=10)

    def gone(pid: int) -> bool:
        try:
            return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        except FileNotFoundError:
            return True

    wait_for(lambda: all(gone(pid) for pid in workers), timeout=20)


def test_min_pool_size_is_split_between_workers(cluster: Any, proxy_factory: ProxyFactory) -> None:
    """min_pool_size 3 over 2 workers: 2 + 1 idle servers per pool, 3 in all, not 6."""
    start(proxy_factory, pool_size=4, min_pool_size=3)
    wait_for(lambda: server_connections(cluster) == 3 * 2, timeout=30)  # appdb and otherdb
    time.sleep(2)  # the janitors ran a few times: still no more than that
    assert server_connections(cluster) == 3 * 2
