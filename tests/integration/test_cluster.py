"""The test harness itself: if the cluster is wrong, every integration test result is noise."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest


def test_primary_is_not_in_recovery(cluster: Any) -> None:
    assert cluster.primary.sql("SELECT pg_is_in_recovery()") == "f"


def test_replicas_are_streaming_hot_standbys(cluster: Any) -> None:
    assert len(cluster.replicas) == 2
    for replica in cluster.replicas:
        assert replica.sql("SELECT pg_is_in_recovery()") == "t"
        assert replica.sql("SELECT status FROM pg_stat_wal_receiver") == "streaming"
    streaming = cluster.primary.sql(
        "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
    ).split()
    assert sorted(streaming) == sorted(r.name for r in cluster.replicas)


def test_rows_written_on_the_primary_reach_every_replica(cluster: Any) -> None:
    table = f"harness_{uuid.uuid4().hex[:8]}"
    cluster.primary.sql(
        f"CREATE TABLE {table} (id int PRIMARY KEY, v text);\n"
        f"INSERT INTO {table} VALUES (1, 'replicated');",
        dbname="appdb",
    )
    try:
        cluster.wait_replicated()
        for replica in cluster.replicas:
            assert (
                replica.sql(f"SELECT v FROM {table} WHERE id = 1", dbname="appdb") == "replicated"
            )
    finally:
        cluster.primary.sql(f"DROP TABLE {table}", dbname="appdb")


def test_test_users_and_databases_exist(cluster: Any) -> None:
    roles = cluster.primary.sql(
        "SELECT rolname || ':' || left(rolpassword, 3) FROM pg_authid "
        "WHERE rolname IN ('app', 'md5user') ORDER BY 1"
    ).split()
    assert roles == ["app:SCR", "md5user:md5"]
    owners = (
        cluster.replicas[0]
        .sql(
            "SELECT datname || ':' || pg_get_userbyid(datdba) FROM pg_database "
            "WHERE datname IN ('appdb', 'otherdb') ORDER BY 1"
        )
        .split()
    )
    assert owners == ["appdb:app", "otherdb:app"]


def test_create_user_md5_stores_an_md5_verifier(cluster: Any) -> None:
    name = f"u_{uuid.uuid4().hex[:8]}"
    cluster.create_user(name, "pw", md5=True)
    try:
        stored = cluster.primary.sql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{name}'")
        assert stored.startswith("md5") and len(stored) == 35
    finally:
        cluster.primary.sql(f'DROP ROLE "{name}"')


def test_dsn_logs_in_with_the_test_users(cluster: Any) -> None:
    psycopg = pytest.importorskip("psycopg")
    for user, password in (("app", "app-secret"), ("md5user", "md5-secret")):
        for node in cluster.nodes:
            with psycopg.connect(node.dsn("appdb", user, password)) as conn:
                assert conn.execute("SELECT current_user").fetchone() == (user,)


def test_replica_survives_kill_and_restart(cluster: Any) -> None:
    replica = cluster.replicas[-1]
    if not hasattr(replica, "kill"):
        pytest.skip("this backend cannot crash single nodes")
    replica.kill()
    assert not replica.running
    replica.start()
    assert replica.running
    deadline = time.monotonic() + 30
    while replica.sql("SELECT status FROM pg_stat_wal_receiver") != "streaming":
        assert time.monotonic() < deadline, "replica did not resume streaming"
        time.sleep(0.05)
    cluster.primary.sql("CREATE TABLE harness_after_crash (x int); DROP TABLE harness_after_crash")
    cluster.wait_replicated()
