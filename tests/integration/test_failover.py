"""Failover on a cluster of the test's own (the shared one is never promoted): a replica
promoted after the primary stopped takes the writes through the same proxy and the same client
connections; a replica promoted while the primary lives fences the database's writes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from router.cluster import LocalCluster
from tests.support import (
    APP_PASSWORD,
    APP_USER,
    ProxyProcess,
    base_topology,
    deep_merge,
    free_port,
    start_proxy,
    wait_for,
)
from tests.write_load import WriteLoad, wait_writable

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def own_cluster() -> Iterator[LocalCluster]:
    """A primary and one replica, with the test user and appdb; stopped at the end."""
    cluster = LocalCluster(replicas=1).start()
    try:
        cluster.create_user(APP_USER, APP_PASSWORD)
        cluster.create_database("appdb", owner=APP_USER)
        cluster.wait_replicated()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def proxy(own_cluster: LocalCluster, tmp_path: Path) -> Iterator[ProxyProcess]:
    topology = base_topology(own_cluster, free_port())
    topology["databases"] = {"appdb": topology["databases"]["appdb"]}
    # Writes refused during a split brain wait failover_timeout first: keep it short here.
    topology = deep_merge(topology, {"admin": {"users": [APP_USER]}, "failover_timeout": "1s"})
    proxy = start_proxy(topology, tmp_path, name="failover")
    yield proxy
    proxy.stop()


def connect(proxy: ProxyProcess) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10)


def in_recovery(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    assert row is not None
    return bool(row[0])


def wait_for_write(conn: psycopg.Connection[Any], sql: str, timeout: float) -> list[str]:
    """Run `sql` until it succeeds; the errors seen meanwhile. The connection must survive."""
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute(sql)
            return errors
        except psycopg.Error as exc:
            assert not conn.closed, f"the client connection was closed: {exc!r}"
            errors.append(f"{exc.sqlstate}: {exc}")
            if time.monotonic() > deadline:
                pytest.fail(f"writes did not resume within {timeout}s: {errors[-3:]}")
            time.sleep(0.05)


def backends(proxy: ProxyProcess) -> list[tuple[Any, ...]]:
    with psycopg.connect(proxy.dsn(dbname="pgrouter"), autocommit=True) as admin:
        return admin.execute("SHOW BACKENDS").fetchall()


def wait_monitored(proxy: ProxyProcess) -> None:
    deadline = time.monotonic() + 10
    while any(row[4] != "up" for row in backends(proxy)):
        assert time.monotonic() < deadline, backends(proxy)
        time.sleep(0.1)


def test_writes_follow_a_promotion(own_cluster: LocalCluster, proxy: ProxyProcess) -> None:
    old, new = own_cluster.primary, own_cluster.replicas[0]
    table = f"fo_{uuid.uuid4().hex[:8]}"
    writer, idle = connect(proxy), connect(proxy)
    try:
        writer.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        writer.execute(f"INSERT INTO {table} VALUES (1)")
        assert idle.execute("SELECT 1").fetchone() == (1,)
        wait_monitored(proxy)
        own_cluster.wait_replicated()

        old.stop("immediate")
        new.promote()
        promoted = time.monotonic()
        wait_for_write(writer, f"INSERT INTO {table} VALUES (2)", timeout=10)
        resumed = time.monotonic() - promoted
        assert resumed < 3.0, f"writes resumed {resumed:.2f}s after the promotion"
        assert not in_recovery(writer)

        # The client that sat idle through the failover writes at once, on the new primary.
        idle.execute(f"INSERT INTO {table} VALUES (3)")
        assert idle.execute(f"SELECT array_agg(id ORDER BY id) FROM {table}").fetchone() == (
            [1, 2, 3],
        )
    finally:
        writer.close()
        idle.close()
    # A new client too; the proxy counted one failover and says so.
    with connect(proxy) as fresh:
        fresh.execute(f"INSERT INTO {table} VALUES (4)")
    assert new.sql(f"SELECT count(*) FROM {table}", dbname="appdb") == "4"
    roles = {(row[2], row[3], row[4]) for row in backends(proxy)}
    assert (str(new.port), "primary", "up") in roles, roles
    assert (str(old.port), "primary", "down") in roles, roles
    log = proxy.log_text()
    assert log.count("primary changed") == 1, log
    assert proxy.returncode is None


def test_two_primaries_refuse_writes(own_cluster: LocalCluster, proxy: ProxyProcess) -> None:
    old, new = own_cluster.primary, own_cluster.replicas[0]
    table = f"sb_{uuid.uuid4().hex[:8]}"
    with connect(proxy) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        wait_monitored(proxy)
        own_cluster.wait_replicated()

        new.promote()  # the old primary is still up: two claim to be primary
        deadline = time.monotonic() + 5
        while True:
            try:
                conn.execute(f"INSERT INTO {table} VALUES (1)")
            except psycopg.Error as exc:
                assert exc.sqlstate == "08006", repr(exc)
                assert "more than one primary" in str(exc), repr(exc)
                break
            conn.execute(f"DELETE FROM {table}")
            assert time.monotonic() < deadline, "writes were never refused"
            time.sleep(0.05)
        assert not conn.closed
        assert "split brain" in proxy.log_text()

        old.stop("immediate")  # exactly one remains
        wait_for_write(conn, f"INSERT INTO {table} VALUES (2)", timeout=10)
        assert not in_recovery(conn)
    assert new.sql(f"SELECT count(*) FROM {table} WHERE id = 2", dbname="appdb") == "1"


def test_writes_resume_after_a_promotion_under_load(
    own_cluster: LocalCluster, proxy: ProxyProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """The primary is killed under a steady write load and the synchronous standby promoted:
    how long writes stop through pgrouter, and no acknowledged write lost."""
    old, new = own_cluster.primary, own_cluster.replicas[0]
    # Synchronous replication: every acknowledged commit is on the standby that is promoted.
    old.set_config("synchronous_commit", "on")
    old.set_config("synchronous_standby_names", new.name)
    deadline = time.monotonic() + 10
    while old.sql("SELECT sync_state FROM pg_stat_replication") != "sync":
        assert time.monotonic() < deadline, "the standby did not become synchronous"
        time.sleep(0.05)
    table = f"load_{uuid.uuid4().hex[:8]}"
    with connect(proxy) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, retries int NOT NULL DEFAULT 0)")
    wait_monitored(proxy)

    load = WriteLoad(proxy.dsn(), table).start()
    try:
        load.wait_acks(100)
        killed = time.monotonic()
        old.kill()
        promotion = threading.Thread(target=new.promote)
        promotion.start()
        promoted, _ = wait_writable(
            [(new.host, new.port)], lambda host, port: new.dsn(), timeout=30
        )
        promotion.join()
        wait_for(lambda: load.first_ack(killed, new.port) is not None, timeout=30)
        load.wait_acks(100)
    finally:
        load.stop()
    first = load.first_ack(killed, new.port)
    assert first is not None
    kill_to_write, promote_to_write = first.at - killed, first.at - promoted
    with capsys.disabled():
        print(
            f"\n[pg_ctl promote failover] primary killed; writes through pgrouter resumed "
            f"{kill_to_write:.2f}s after the kill, {promote_to_write:.3f}s after the promoted "
            f"replica accepted writes; {len(load.acks)} writes acknowledged, "
            f"{len(load.errors)} failed attempts retried"
        )
    assert promote_to_write < 3.0, f"writes resumed {promote_to_write:.2f}s after the promotion"

    present = set(map(int, new.sql(f"SELECT id FROM {table}", dbname="appdb").split()))
    lost = sorted({a.id for a in load.acks} - present)
    assert not lost, f"{len(lost)} acknowledged writes lost: {lost[:20]}"
