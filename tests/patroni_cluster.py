"""A throwaway Patroni cluster for the HA tests: one etcd and three Patroni members with their
PostgreSQL servers, all on loopback, in a temporary directory.

Uses the machine's `etcd` and `patroni` (Debian: etcd-server, patroni; deploy/bootstrap.sh
installs them). As root everything runs as the `postgres` OS user, since PostgreSQL refuses
root. Tuned for fast, safe failover: `loop_wait` 1 s, `synchronous_mode` on (an acknowledged
commit is on the synchronous standby, the only member Patroni promotes),
`primary_start_timeout` 0 (a crashed leader fails over instead of restarting) and pg_rewind
(the crashed leader rejoins as a replica, so the next test finds three healthy members).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import yaml

from router.cluster import (
    ClusterError,
    _children,
    _free_ports,
    _pid_alive,
    _tail,
    conninfo,
    find_pg_bindir,
)

HOST = "127.0.0.1"
START_TIMEOUT = 90.0


def missing_tools() -> list[str]:
    """The programs this cluster needs that the machine lacks."""
    return [tool for tool in ("etcd", "patroni") if shutil.which(tool) is None]


class Member:
    """One Patroni member: its agent process, REST API and PostgreSQL server."""

    def __init__(self, cluster: PatroniTestCluster, name: str, pg_port: int, api_port: int):
        self.cluster = cluster
        self.name = name
        self.host = HOST
        self.port = pg_port
        self.api_port = api_port
        self.dir = cluster.base_dir / name
        self.datadir = self.dir / "data"
        self.log_path = self.dir / "patroni.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<Member {self.name} pg={self.port} api={self.api_port}>"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    def dsn(self, dbname: str = "postgres", **params: object) -> str:
        c = self.cluster
        return conninfo(
            host=HOST,
            port=self.port,
            dbname=dbname,
            user=c.superuser,
            password=c.password,
            connect_timeout=5,
            **params,
        )

    def sql(self, query: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            cur = conn.execute(query)
            return cur.fetchall() if cur.description else []

    def api(self, path: str) -> tuple[int, Any]:
        """GET the member's REST API: (status, JSON body)."""
        try:
            with urllib.request.urlopen(self.api_url + path, timeout=5) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def kill_postgres(self) -> None:
        """SIGKILL the postmaster and its children: PostgreSQL crashes, Patroni lives on."""
        pid = self.postmaster_pid()
        if pid is None:
            raise ClusterError(f"{self.name}: no postmaster.pid")
        victims = [pid, *_children(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)

    def start(self) -> None:
        self.proc = self.cluster._popen(["patroni", str(self.dir / "patroni.yml")], self.log_path)

    def terminate(self) -> None:
        """Ask the agent to stop (it stops PostgreSQL first); `wait_stopped` finishes."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float = 30) -> None:
        """Wait for the agent; SIGKILL it and any PostgreSQL left behind past `timeout`."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        pid = self.postmaster_pid()
        if pid is not None and _pid_alive(pid):
            with contextlib.suppress(ClusterError):
                self.kill_postgres()

    def tail(self) -> str:
        lines = [line for line in _tail(self.log_path, 200).splitlines() if "no action" not in line]
        return f"--- {self.name} ({self.log_path}):\n" + "\n".join(lines[-40:])


class PatroniTestCluster:
    """etcd + three Patroni members; `start()` returns once the leader has two streaming
    replicas, one of them synchronous."""

    def __init__(self, members: int = 3, superuser: str = "postgres") -> None:
        self.superuser = superuser
        self.password = os.urandom(12).hex()
        self.scope = f"pgrouter-{os.urandom(4).hex()}"
        self.base_dir = Path(tempfile.mkdtemp(prefix="pgrouter-patroni-"))
        self.uid: int | None = None
        self.gid: int | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
            self.env["HOME"] = pw.pw_dir
            os.chown(self.base_dir, self.uid, self.gid)
        ports = _free_ports(2 * members + 2, HOST)
        self.etcd_port, self.etcd_peer_port = ports[-2:]
        self.members = [
            Member(self, f"m{i}", ports[2 * i], ports[2 * i + 1]) for i in range(members)
        ]
        self.etcd: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PatroniTestCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _popen(self, args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        with log_path.open("wb") as log:
            if self.uid is not None and self.gid is not None:
                os.chown(log_path, self.uid, self.gid)
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.base_dir,
                user=self.uid,
                group=self.gid,
                extra_groups=[] if self.uid is not None else None,
                start_new_session=True,
            )

    def _mkdir(self, path: Path) -> None:
        path.mkdir(mode=0o700)
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> PatroniTestCluster:
        try:
            self._start_etcd()
            bindir = find_pg_bindir()
            for member in self.members:
                self._mkdir(member.dir)
                (member.dir / "patroni.yml").write_text(
                    yaml.safe_dump(self._member_config(member, bindir), sort_keys=False)
                )
            for member in self.members:
                member.start()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_etcd(self) -> None:
        data = self.base_dir / "etcd"
        self._mkdir(data)
        client = f"http://{HOST}:{self.etcd_port}"
        peer = f"http://{HOST}:{self.etcd_peer_port}"
        self.etcd = self._popen(
            [
                "etcd",
                "--name=etcd0",
                f"--data-dir={data}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=etcd0={peer}",
                f"--initial-cluster-token={self.scope}",
                "--initial-cluster-state=new",
            ],
            self.base_dir / "etcd.log",
        )
        deadline = time.monotonic() + 30
        while True:
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(f"{client}/health", timeout=2) as response,
            ):
                if json.loads(response.read()).get("health") == "true":
                    return
            if self.etcd.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"etcd did not start:\n{_tail(self.base_dir / 'etcd.log')}")
            time.sleep(0.1)

    def _member_config(self, member: Member, bindir: Path) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "name": member.name,
            "log": {"level": "INFO"},
            "restapi": {
                "listen": f"{HOST}:{member.api_port}",
                "connect_address": f"{HOST}:{member.api_port}",
            },
            "etcd3": {"hosts": f"{HOST}:{self.etcd_port}"},
            "bootstrap": {
                "dcs": {
                    "ttl": 10,
                    "loop_wait": 1,
                    "retry_timeout": 3,
                    "maximum_lag_on_failover": 16 * 1024 * 1024,
                    "synchronous_mode": True,
                    "primary_start_timeout": 0,
                    "postgresql": {
                        "use_pg_rewind": True,  # the crashed leader rejoins
                        "parameters": {
                            "max_connections": 100,
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "wal_keep_size": "128MB",
                            "fsync": "off",
                            "wal_writer_delay": "10ms",
                            "wal_log_hints": "on",  # for pg_rewind
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "no-sync"],
            },
            "postgresql": {
                "listen": f"{HOST}:{member.port}",
                "connect_address": f"{HOST}:{member.port}",
                "data_dir": str(member.datadir),
                "bin_dir": str(bindir),
                "pgpass": str(member.dir / "pgpass"),
                "authentication": {
                    "superuser": {"username": self.superuser, "password": self.password},
                    "replication": {"username": "replicator", "password": self.password},
                },
                "parameters": {"unix_socket_directories": str(member.dir)},
                "pg_hba": [
                    "local all all trust",
                    "local replication all trust",
                    f"host all all {HOST}/32 md5",
                    f"host replication all {HOST}/32 md5",
                ],
            },
        }

    def leader(self) -> Member | None:
        """The member whose REST API answers /primary with 200, if exactly one does."""
        leaders = []
        for member in self.members:
            with contextlib.suppress(OSError, ValueError):
                if member.api("/primary")[0] == 200:
                    leaders.append(member)
        return leaders[0] if len(leaders) == 1 else None

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> Member:
        """Until a leader streams to every other member and Patroni has made one of them its
        synchronous standby (only then can it fail over without losing a commit)."""
        deadline = time.monotonic() + timeout
        last = "no leader yet"
        while time.monotonic() < deadline:
            for member in self.members:
                if member.proc is not None and member.proc.poll() is not None:
                    raise ClusterError(f"patroni {member.name} exited\n{member.tail()}")
            leader = self.leader()
            if leader is not None:
                try:
                    rows = leader.sql(
                        "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'"
                    )
                    roles = sorted(m["role"] for m in leader.api("/cluster")[1]["members"])
                except (psycopg.Error, OSError, ValueError, KeyError) as exc:
                    last = str(exc)
                else:
                    streaming = sorted(row[0] for row in rows)
                    if (
                        len(streaming) == len(self.members) - 1
                        and "sync" in streaming
                        and "sync_standby" in roles
                    ):
                        return leader
                    last = f"leader {leader.name}, replication {streaming}, roles {roles}"
            time.sleep(0.2)
        raise ClusterError(
            f"Patroni cluster not healthy after {timeout:.0f}s: {last}\n{self.logs()}"
        )

    def logs(self) -> str:
        """The end of every member's log, for failure messages."""
        return "\n".join(m.tail() for m in self.members)

    def stop(self) -> None:
        """Stop every member, then etcd; remove the directory. Idempotent."""
        for member in self.members:
            member.terminate()
        for member in self.members:
            member.wait_stopped()
        if self.etcd is not None and self.etcd.poll() is None:
            self.etcd.terminate()
            try:
                self.etcd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.etcd.kill()
                self.etcd.wait()
        shutil.rmtree(self.base_dir, ignore_errors=True)
