"""Patroni decides the leader: a real three-member Patroni cluster with etcd on loopback
(tests/patroni_cluster.py), pgrouter in front of it with `patroni:` on every member.

The failover test is the one that matters to users: under a steady write load through
pgrouter the leader's PostgreSQL is killed; Patroni fails over to the synchronous standby and
the writes must resume through the same pgrouter within a bound, with every acknowledged write
present afterwards. Its figures are printed.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.patroni_cluster import Member, PatroniTestCluster, missing_tools
from tests.support import (
    APP_PASSWORD,
    APP_USER,
    DELETE,
    ProxyProcess,
    free_port,
    start_proxy,
    wait_for,
)
from tests.write_load import WriteLoad, wait_writable

pytestmark = pytest.mark.timeout(240)

NO_WAIT = "-c statement_timeout=2000"  # direct probes never hang on a commit
RESUME_BOUND = 3.0  # seconds from the new leader accepting writes to pgrouter's first write


@pytest.fixture(scope="module")
def patroni() -> Iterator[PatroniTestCluster]:
    missing = missing_tools()
    if missing:
        hint = "apt-get install patroni etcd-server (deploy/bootstrap.sh does it as root)"
        if os.geteuid() == 0:
            pytest.fail(f"{', '.join(missing)} not installed: {hint}")
        pytest.skip(f"{', '.join(missing)} not installed and not root: {hint}")
    with PatroniTestCluster() as cluster:
        leader = cluster.leader()
        assert leader is not None
        leader.sql(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'")
        leader.sql(f"CREATE DATABASE appdb OWNER {APP_USER}")
        yield cluster


def topology(members: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "auth_type": "md5",
        "users": {APP_USER: {"password": APP_PASSWORD}},
        "admin": {"users": [APP_USER]},
        "databases": {"appdb": {"hosts": members, "routing": {"reads": "primary"}}},
    }


@pytest.fixture
def proxy(patroni: PatroniTestCluster, tmp_path: Path) -> Iterator[ProxyProcess]:
    members = [{"host": m.host, "port": m.port, "patroni": m.api_url} for m in patroni.members]
    proxy = start_proxy(topology(members), tmp_path, name="patroni")
    yield proxy
    proxy.stop()


def backends(proxy: ProxyProcess) -> dict[int, tuple[str, str]]:
    """port -> (role, state) from SHOW BACKENDS."""
    with psycopg.connect(proxy.dsn(dbname="pgrouter"), autocommit=True) as admin:
        return {int(r[2]): (r[3], r[4]) for r in admin.execute("SHOW BACKENDS").fetchall()}


def write_port(proxy: ProxyProcess, table: str, value: int) -> int:
    """Insert through pgrouter; the port of the server that committed it."""
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        row = conn.execute(
            f"INSERT INTO {table} (id) VALUES (%s) RETURNING inet_server_port()", (value,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def wait_settled(proxy: ProxyProcess, primary: tuple[str, int]) -> None:
    """Until every backend is monitored and writes go to `primary`. The first listed host
    is only a guess: a client logging in while the first checks move the writes away from it
    may be refused (57P03), which is not what these tests are about."""
    wait_for(lambda: all(state == "up" for _, state in backends(proxy).values()), timeout=30)
    first = proxy.config["databases"]["appdb"]["hosts"][0]
    if (first["host"], first["port"]) != primary:
        wait_for(lambda: f"new={primary[0]}:{primary[1]}" in proxy.log_text(), timeout=10)


def create_table(proxy: ProxyProcess, leader: Member) -> str:
    wait_settled(proxy, (leader.host, leader.port))
    table = f"ha_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, retries int NOT NULL DEFAULT 0)")
    assert write_port(proxy, table, 0) == leader.port
    return table


def test_writes_follow_a_patroni_failover(
    patroni: PatroniTestCluster, proxy: ProxyProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    old = patroni.wait_healthy()
    table = create_table(proxy, old)
    survivors = [(m.host, m.port) for m in patroni.members if m is not old]
    by_port = {m.port: m for m in patroni.members}
    load = WriteLoad(proxy.dsn(), table).start()
    try:
        load.wait_acks(100)
        killed = time.monotonic()
        old.kill_postgres()
        try:
            promoted, (_, new_port) = wait_writable(
                survivors, lambda _, port: by_port[port].dsn(options=NO_WAIT), timeout=60
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{patroni.logs()}") from None
        wait_for(lambda: load.first_ack(killed, new_port) is not None, timeout=30)
        load.wait_acks(100)
    finally:
        load.stop()
    first = load.first_ack(killed, new_port)
    assert first is not None
    kill_to_write, promote_to_write = first.at - killed, first.at - promoted
    with capsys.disabled():
        print(
            f"\n[patroni failover] leader {old.name} killed; writes through pgrouter resumed "
            f"{kill_to_write:.2f}s after the kill, {promote_to_write:.3f}s after the new "
            f"leader accepted writes; {len(load.acks)} writes acknowledged, "
            f"{len(load.errors)} failed attempts retried"
        )
    assert promote_to_write < RESUME_BOUND, f"writes resumed {promote_to_write:.2f}s late"
    assert kill_to_write < 30, f"writes resumed {kill_to_write:.2f}s after the kill"

    # Every acknowledged write is on the new leader (synchronous_mode: nothing acknowledged
    # lives only on the dead one), and pgrouter reads them back from it.
    new = next(m for m in patroni.members if m.port == new_port)
    present = {row[0] for row in new.sql(f"SELECT id FROM {table}", dbname="appdb")}
    lost = sorted({a.id for a in load.acks} - present)
    assert not lost, f"{len(lost)} acknowledged writes lost: {lost[:20]}"
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*), inet_server_port() FROM {table}").fetchone()
    assert row == (len(present), new_port)
    log = proxy.log_text()
    assert "primary changed" in log and "by=patroni" in log, log[-3000:]
    assert "split brain" not in log


def test_a_member_promoted_behind_patronis_back_takes_no_writes(
    patroni: PatroniTestCluster, proxy: ProxyProcess
) -> None:
    """Two servers out of recovery: without Patroni pgrouter would refuse writes (split
    brain); with it, the lock holder keeps them and the rogue member takes none."""
    leader = patroni.wait_healthy()
    table = create_table(proxy, leader)
    rogue = next(m for m in patroni.members if m is not leader)
    pause(leader, True)  # maintenance mode: Patroni leaves the rogue member alone
    try:
        rogue.sql("SELECT pg_promote()")
        wait_for(lambda: backends(proxy)[rogue.port] == ("primary", "up"), timeout=10)
        ports = {write_port(proxy, table, i) for i in range(1, 21)}
        assert ports == {leader.port}
    finally:
        pause(leader, False)
    log = proxy.log_text()
    assert "split brain" not in log
    assert f"new={rogue.host}:{rogue.port}" not in log


def pause(member: Member, on: bool) -> None:
    """Patroni's maintenance mode on or off (PATCH /config), once every member knows."""
    request = urllib.request.Request(
        member.api_url + "/config",
        data=json.dumps({"pause": on}).encode(),
        method="PATCH",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10):
        pass
    patroni = member.cluster
    wait_for(
        lambda: all(bool(m.api("/patroni")[1].get("pause")) == on for m in patroni.members),
        timeout=15,
    )


def test_unreachable_patroni_falls_back_to_pg_is_in_recovery(
    cluster: Any, proxy_factory: Any
) -> None:
    """No member's REST API answers: the primary is found by pg_is_in_recovery(), and the
    log says so once."""
    members = [
        {"host": n.host, "port": n.port, "patroni": f"http://127.0.0.1:{free_port()}"}
        for n in (*cluster.replicas, cluster.primary)  # the primary last: found, not guessed
    ]
    proxy = proxy_factory(
        databases={"appdb": {"primary": DELETE, "replicas": DELETE, "hosts": members}},
        admin={"users": [APP_USER]},
    )
    wait_settled(proxy, (cluster.primary.host, cluster.primary.port))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
    assert row == (cluster.primary.port, False)
    time.sleep(1)  # ten more failed rounds of probes
    log = proxy.log_text()
    assert log.count("Patroni unreachable") == 1, log
    assert "by=pg_is_in_recovery" in log, log
