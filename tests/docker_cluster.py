"""The test cluster from Docker (testcontainers): postgres:16 primary + streaming replicas.

Selected with PGROUTER_TEST_BACKEND=docker for machines without local PostgreSQL binaries. It
offers the part of router.cluster.LocalCluster the tests use (no kill/start/promote of single
nodes). testcontainers is imported lazily so the default backend never needs it or Docker.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from typing import Any

from router.cluster import ClusterError, conninfo, md5_verifier, scram_verifier

IMAGE = "postgres:16"
SERVER_FLAGS = [
    "-c", "wal_level=replica", "-c", "max_wal_senders=10", "-c", "max_connections=400",
    "-c", "hot_standby=on", "-c", "fsync=off", "-c", "synchronous_commit=off",
    "-c", "full_page_writes=off", "-c", "wal_keep_size=256MB", "-c", "wal_writer_delay=10ms",
]  # fmt: skip

# Runs as root in a replica container: clone the primary as postgres, then become the server.
REPLICA_SCRIPT = """
set -eu
mkdir -p "$PGDATA" && chown postgres:postgres "$PGDATA" && chmod 0700 "$PGDATA"
until gosu postgres pg_basebackup -d "host=primary user=$SU application_name=$NAME" \\
        -D "$PGDATA" -R -X stream -c fast; do
    rm -rf "${PGDATA:?}"/*; sleep 1
done
exec gosu postgres postgres "$@"
"""

PSQL_SCRIPT = 'printf "%s" "$Q" | psql -XAtq -v ON_ERROR_STOP=1 -h 127.0.0.1 -U "$SU" -d "$DB" -f -'


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class DockerNode:
    """One container; SQL runs through psql inside it (no local client binaries needed)."""

    def __init__(self, cluster: DockerCluster, name: str, container: Any) -> None:
        self._cluster = cluster
        self.name = name
        self.container = container
        self.host: str = container.get_container_host_ip()
        self.port = int(container.get_exposed_port(5432))

    def __repr__(self) -> str:
        return f"<DockerNode {self.name} {self.host}:{self.port}>"

    def sql(self, query: str, dbname: str = "postgres") -> str:
        """Like Node.sql: psql -XAtq -v ON_ERROR_STOP=1, the query on stdin."""
        c = self._cluster
        code, (out, err) = self.container.get_wrapped_container().exec_run(
            ["sh", "-c", PSQL_SCRIPT],
            environment={"Q": query, "SU": c.superuser, "DB": dbname, "PGPASSWORD": c.password},
            demux=True,
        )
        if code != 0:
            raise ClusterError(f"{self.name}: psql failed: {(err or b'').decode().strip()}")
        return (out or b"").decode().strip()

    def dsn(
        self, dbname: str = "postgres", user: str | None = None, password: str | None = None
    ) -> str:
        if user is None:
            user, password = self._cluster.superuser, password or self._cluster.password
        return conninfo(host=self.host, port=self.port, dbname=dbname, user=user, password=password)


class DockerCluster:
    """A primary and `replicas` hot standbys in containers on a private Docker network."""

    def __init__(self, replicas: int = 2, superuser: str = "postgres", password: str | None = None):
        self.superuser = superuser
        self.password = password or secrets.token_urlsafe(24)
        self._n_replicas = replicas
        self._network: Any = None
        self._containers: list[Any] = []
        self.replicas: list[DockerNode] = []
        self.nodes: list[DockerNode] = []
        self.primary: DockerNode

    def start(self) -> DockerCluster:
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.network import Network

        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # older testcontainers layout
            from testcontainers.postgres import PostgresContainer

        self._network = Network().create()
        try:
            primary = (
                PostgresContainer(
                    IMAGE,
                    username=self.superuser,
                    password=self.password,
                    dbname="postgres",
                    driver=None,
                )
                .with_env("POSTGRES_HOST_AUTH_METHOD", "md5")  # accepts md5 and SCRAM verifiers
                .with_command(["postgres", *SERVER_FLAGS])
                .with_network(self._network)
                .with_network_aliases("primary")
            )
            self._containers.append(primary.start())
            self.primary = DockerNode(self, "primary", primary)
            # The image's pg_hba.conf has no replication line for the network.
            primary.get_wrapped_container().exec_run(
                ["sh", "-c", 'echo "host replication all all md5" >> "$PGDATA/pg_hba.conf"']
            )
            self.primary.sql("SELECT pg_reload_conf()")
            for i in range(1, self._n_replicas + 1):
                name = f"replica{i}"
                replica = (
                    DockerContainer(IMAGE)
                    .with_env("PGPASSWORD", self.password)
                    .with_env("SU", self.superuser)
                    .with_env("NAME", name)
                    .with_exposed_ports(5432)
                    .with_network(self._network)
                    .with_command(["bash", "-c", REPLICA_SCRIPT, "replica", *SERVER_FLAGS])
                )
                self._containers.append(replica.start())
                self.replicas.append(DockerNode(self, name, replica))
            self.nodes = [self.primary, *self.replicas]
            self._wait(
                lambda: all(self._answers(n) for n in self.replicas), "replicas to accept queries"
            )
            self._wait(self._all_streaming, "replicas to stream")
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self, node: DockerNode) -> bool:
        try:
            return node.sql("SELECT 1") == "1"
        except ClusterError:
            return False

    def _all_streaming(self) -> bool:
        out = self.primary.sql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
        return int(out) >= len(self.replicas)

    @staticmethod
    def _wait(condition: Any, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Remove every container and the network. Idempotent."""
        for container in reversed(self._containers):
            with contextlib.suppress(Exception):  # already gone: nothing to clean up
                container.stop()
        self._containers.clear()
        if self._network is not None:
            try:
                self._network.remove()
            finally:
                self._network = None

    def __enter__(self) -> DockerCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_replicated(self, timeout: float = 10.0) -> None:
        target = self.primary.sql("SELECT pg_current_wal_lsn()")
        check = f"SELECT coalesce(pg_last_wal_replay_lsn() >= '{target}', false)"
        self._wait(
            lambda: all(r.sql(check) == "t" for r in self.replicas), f"replay of {target}", timeout
        )

    def create_user(
        self, name: str, password: str | None = None, *, md5: bool = False, superuser: bool = False
    ) -> None:
        stmt = f"CREATE ROLE {_quote_ident(name)} LOGIN"
        if superuser:
            stmt += " SUPERUSER"
        if password is not None:
            verifier = md5_verifier(name, password) if md5 else scram_verifier(password)
            stmt += f" PASSWORD '{verifier}'"
        self.primary.sql(stmt + ";")

    def create_database(self, name: str, owner: str | None = None) -> None:
        stmt = f"CREATE DATABASE {_quote_ident(name)}"
        if owner is not None:
            stmt += f" OWNER {_quote_ident(owner)}"
        self.primary.sql(stmt + ";")
