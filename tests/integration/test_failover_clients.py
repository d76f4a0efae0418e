"""Clients during a failover, on clusters of the tests' own (the shared one is never stopped):
writes wait for a primary up to failover_timeout and then fail naming the database, reads
keep flowing from replicas meanwhile, an autocommit read whose replica dies is run again
elsewhere without the client noticing, and a pool connection that sees its server shut down
takes the backend down without waiting for the health checks' `fall`.

Timing figures (printed; run with -s to see them) are asserted with bounds that hold on a
busy machine, not the figures themselves.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from router.cluster import LocalCluster, Node
from tests.support import (
    APP_PASSWORD,
    APP_USER,
    ProxyProcess,
    base_topology,
    deep_merge,
    free_port,
    start_proxy,
)

pytestmark = pytest.mark.timeout(240)


def make_cluster(replicas: int) -> LocalCluster:
    cluster = LocalCluster(replicas=replicas).start()
    cluster.create_user(APP_USER, APP_PASSWORD)
    cluster.create_database("appdb", owner=APP_USER)
    cluster.wait_replicated()
    return cluster


@pytest.fixture(scope="module")
def shared() -> Iterator[LocalCluster]:
    """A primary and two replicas for the tests that stop a node and start it again."""
    cluster = make_cluster(replicas=2)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def healthy(shared: LocalCluster) -> Iterator[LocalCluster]:
    """`shared` with every node running and streaming, before and after the test."""
    restore(shared)
    yield shared
    restore(shared)


def restore(cluster: LocalCluster) -> None:
    for node in cluster.nodes:
        node.start()
    cluster.wait_streaming()


def start(cluster: LocalCluster, tmp_path: Path, **overrides: Any) -> ProxyProcess:
    """pgrouter in front of `cluster`'s appdb, reads on replicas, `app` an admin."""
    topology = base_topology(cluster, free_port())
    topology["databases"] = {"appdb": topology["databases"]["appdb"]}
    topology = deep_merge(
        topology,
        {
            "admin": {"users": [APP_USER]},
            "databases": {"appdb": {"routing": {"reads": "replicas"}}},
            "log": {"connections": False},
        },
    )
    return start_proxy(deep_merge(topology, overrides), tmp_path, name="clients")


def connect(proxy: ProxyProcess, prepare_threshold: int | None = None) -> psycopg.Connection[Any]:
    """prepare_threshold=0: every statement a named prepared statement."""
    return psycopg.connect(
        proxy.dsn(), autocommit=True, connect_timeout=10, prepare_threshold=prepare_threshold
    )


def admin(proxy: ProxyProcess, command: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(proxy.dsn(dbname="pgrouter"), autocommit=True) as conn:
        return conn.execute(command).fetchall()


def state(proxy: ProxyProcess, node: Node) -> str:
    """The node's state in SHOW BACKENDS: up, down or unknown."""
    for row in admin(proxy, "SHOW BACKENDS"):
        if int(row[2]) == node.port:
            return str(row[4])
    raise AssertionError(f"{node} is not in SHOW BACKENDS")


def wait_state(proxy: ProxyProcess, node: Node, wanted: str, timeout: float = 15) -> float:
    """Seconds until SHOW BACKENDS shows `node` in state `wanted`."""
    began = time.monotonic()
    while state(proxy, node) != wanted:
        assert time.monotonic() - began < timeout, f"{node} not {wanted} after {timeout}s"
        time.sleep(0.01)
    return time.monotonic() - began


def wait_all_up(proxy: ProxyProcess, cluster: LocalCluster) -> None:
    """Every backend up, and reads on replicas (the router has read the function list, which
    DDL makes it read again from the primary)."""
    for node in cluster.nodes:
        wait_state(proxy, node, "up")
    replicas = {r.port for r in cluster.replicas}
    deadline = time.monotonic() + 15
    with connect(proxy) as conn:
        while served_by(conn) not in replicas:
            assert time.monotonic() < deadline, "reads never went to a replica"
            time.sleep(0.05)


def lost_retries(proxy: ProxyProcess) -> int:
    rows = admin(proxy, "SHOW ROUTES")
    return sum(int(row[3]) for row in rows if row[2] == "server_lost_retried")


def served_by(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT inet_server_port()").fetchone()
    assert row is not None
    return int(row[0])


class Background:
    """Run one statement on `conn` in a thread; the outcome and when it came."""

    def __init__(self, conn: psycopg.Connection[Any], sql: str) -> None:
        self.error: psycopg.Error | None = None
        self.done_at: float | None = None
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(conn, sql), daemon=True)
        self._thread.start()

    def _run(self, conn: psycopg.Connection[Any], sql: str) -> None:
        try:
            conn.execute(sql)
        except psycopg.Error as exc:
            self.error = exc
        self.done_at = time.monotonic()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"still waiting after {timeout}s"

    @property
    def waiting(self) -> bool:
        return self._thread.is_alive()


class Writable:
    """When `node` first says it is out of recovery, polled directly every few ms."""

    def __init__(self, node: Node) -> None:
        self.at: float | None = None
        self._conn = psycopg.connect(node.dsn(), autocommit=True)
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        with self._conn as conn:
            while conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,):
                time.sleep(0.002)
            self.at = time.monotonic()


# ---- writes wait for a primary ------------------------------------------------------------------


@pytest.fixture
def promotable() -> Iterator[LocalCluster]:
    """A primary and one replica that the test promotes: thrown away afterwards."""
    cluster = make_cluster(replicas=1)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_write_waits_for_a_promotion(promotable: LocalCluster, tmp_path: Path) -> None:
    old, new = promotable.primary, promotable.replicas[0]
    proxy = start(promotable, tmp_path, failover_timeout="30s")
    table = f"wait_{uuid.uuid4().hex[:8]}"
    writer, reader = connect(proxy), connect(proxy)
    try:
        writer.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        writer.execute(f"INSERT INTO {table} VALUES (1)")
        wait_all_up(proxy, promotable)
        promotable.wait_replicated()

        old.stop("fast")  # the writer's connection sits idle meanwhile
        wait_state(proxy, old, "down")
        write = Background(writer, f"INSERT INTO {table} VALUES (2)")
        time.sleep(1.0)
        assert write.waiting, f"the write did not wait for a primary: {write.error!r}"
        # Reads keep flowing from the replica during the outage, on another connection.
        for _ in range(20):
            assert served_by(reader) == new.port

        writable = Writable(new)
        new.promote()
        write.join(timeout=20)
        assert write.error is None, repr(write.error)
        assert write.done_at is not None and writable.at is not None
        resumed = write.done_at - writable.at
        waited = write.done_at - write.started_at
        print(
            f"\nthe waiting write went through {resumed * 1000:.0f} ms after the promoted "
            f"replica first accepted a write directly (it waited {waited:.1f}s in all)"
        )
        assert resumed < 3.0, f"the write went through {resumed:.2f}s after the promotion"
        assert not writer.closed and not reader.closed
        assert served_by(writer) in (new.port,)  # reads: the new primary is the only backend
        assert new.sql(f"SELECT array_agg(id ORDER BY id) FROM {table}", dbname="appdb") == (
            "{1,2}"
        )
    finally:
        writer.close()
        reader.close()
    log = proxy.log_text()
    assert "no primary: writes wait" in log and "primary changed" in log, log
    proxy.stop()


def test_write_fails_after_failover_timeout_and_reads_go_on(
    healthy: LocalCluster, tmp_path: Path
) -> None:
    primary = healthy.primary
    proxy = start(healthy, tmp_path, failover_timeout="2s")
    table = f"nowait_{uuid.uuid4().hex[:8]}"
    conn = connect(proxy)
    try:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        wait_all_up(proxy, healthy)
        healthy.wait_replicated()

        primary.stop("immediate")
        wait_state(proxy, primary, "down")
        began = time.monotonic()
        with pytest.raises(psycopg.Error) as info:
            conn.execute(f"INSERT INTO {table} VALUES (1)")
        waited = time.monotonic() - began
        err = info.value
        print(f"\nthe write failed after {waited:.2f}s (failover_timeout 2s)")
        assert err.sqlstate == "08006", repr(err)
        assert 'database "appdb" has no primary' in str(err), repr(err)
        assert f"{primary.host}:{primary.port}" in str(err), repr(err)
        assert "failover_timeout" in str(err), repr(err)
        assert 1.9 <= waited < 6.0, f"failed after {waited:.2f}s"

        # The same connection goes on reading from the replicas.
        replicas = {r.port for r in healthy.replicas}
        assert not conn.closed
        for _ in range(20):
            assert served_by(conn) in replicas

        # The old primary comes back: a write that is waiting goes through, on the same
        # connection, without an error.
        write = Background(conn, f"INSERT INTO {table} VALUES (2)")
        time.sleep(0.3)
        primary.start()
        write.join(timeout=20)
        assert write.error is None, repr(write.error)
        assert "primary back" in proxy.log_text()
    finally:
        conn.close()
    assert primary.sql(f"SELECT count(*) FROM {table}", dbname="appdb") == "1"
    proxy.stop()


# ---- reads whose server dies --------------------------------------------------------------------


@pytest.mark.parametrize("prepare_threshold", [None, 0], ids=["unnamed", "prepared"])
def test_replica_killed_mid_read_load(
    healthy: LocalCluster, tmp_path: Path, prepare_threshold: int | None
) -> None:
    """Autocommit reads in flight on a replica that dies run again elsewhere: no client sees
    an error, whether they use the unnamed statement or named prepared statements. Half the
    readers run a read that takes a while, so some are certainly in flight (their answer not
    started) when the replica goes."""
    victim = healthy.replicas[0]
    proxy = start(healthy, tmp_path, pool_size=20)
    stop = threading.Event()
    errors: list[str] = []
    counts = [0] * 8

    def reader(i: int) -> None:
        sql = "SELECT pg_sleep(0.3), 1" if i % 2 else "SELECT 1"
        try:
            with connect(proxy, prepare_threshold) as conn:
                while not stop.is_set():
                    try:
                        conn.execute(sql).fetchall()
                        counts[i] += 1
                    except psycopg.Error as exc:
                        errors.append(f"{exc.sqlstate}: {exc}")
                        if conn.closed:
                            return
        except psycopg.Error as exc:
            errors.append(f"connect: {exc}")

    wait_all_up(proxy, healthy)
    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    before = sum(counts)
    victim.stop("immediate")
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    after = sum(counts)
    retried = lost_retries(proxy)
    print(f"\n{after} reads, {after - before} after the kill, {retried} run again elsewhere")
    assert not errors, errors[:5]
    assert after - before > 20, "reads did not go on after the replica died"
    assert retried >= 1, "no read was in flight on the replica when it died"
    assert state(proxy, victim) == "down"
    proxy.stop()


# ---- what pool connections see counts at once ---------------------------------------------------


def test_shutdown_seen_by_a_pool_connection_takes_the_backend_down_at_once(
    healthy: LocalCluster, tmp_path: Path
) -> None:
    """Checks every 5 s with fall 3: the health checks alone would need seconds. The pool's
    idle connections to the replica get its shutdown FATAL (57P01) and the monitor checks at
    once."""
    victim = healthy.replicas[0]
    proxy = start(
        healthy,
        tmp_path,
        health_check_interval="5s",
        health_check_fall=3,
        health_check_rise=1,
        min_pool_size=2,
    )
    wait_all_up(proxy, healthy)
    deadline = time.monotonic() + 15
    while not any(
        int(row[6]) == victim.port for row in admin(proxy, "SHOW SERVERS")
    ):  # port: column 7
        assert time.monotonic() < deadline, "no pool connection to the replica"
        time.sleep(0.1)
    time.sleep(0.5)  # past the check that followed min_pool_size's connections

    stopped = time.monotonic()
    victim.stop("fast")
    wait_state(proxy, victim, "down", timeout=20)
    down_after = time.monotonic() - stopped
    print(f"\nreplica marked down {down_after * 1000:.0f} ms after pg_ctl stop -m fast")
    assert down_after < 3.0, f"down only after {down_after:.2f}s (interval 5s, fall 3)"
    proxy.stop()


def test_one_terminated_session_does_not_take_a_server_down(
    healthy: LocalCluster, tmp_path: Path
) -> None:
    """pg_terminate_backend ends one pool connection (57P01): the monitor checks the server,
    which still accepts connections, so it stays up and the next transaction just works."""
    primary = healthy.primary
    proxy = start(healthy, tmp_path, health_check_fall=1, health_check_rise=5)
    conn = connect(proxy)
    sql = "SELECT pg_backend_pid() /* pgrouter: primary */"
    try:
        wait_all_up(proxy, healthy)
        row = conn.execute(sql).fetchone()
        assert row is not None
        with psycopg.connect(primary.dsn(), autocommit=True) as su:
            su.execute("SELECT pg_terminate_backend(%s)", [row[0]])
        time.sleep(1.0)  # many checks: rise 5 would keep a downed backend down past this
        assert state(proxy, primary) == "up"
        again = conn.execute(sql).fetchone()
        assert again is not None and again[0] != row[0]
    finally:
        conn.close()
    assert "state=down" not in proxy.log_text(), proxy.log_text()
    proxy.stop()
