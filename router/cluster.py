"""A throwaway local PostgreSQL primary + N streaming replicas.

Used by ``pgrouter demo``, the test suite and the benchmark: real PostgreSQL, never a mock.
Built on the server binaries found on the machine (``initdb``, ``pg_ctl``, ``pg_basebackup``,
``psql``). When running as root the servers run as the ``postgres`` OS user, because
PostgreSQL refuses to run as root. Standard library only: the ``router`` package must not
depend on dev packages.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import hmac
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from base64 import b64encode
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "ClusterError",
    "LocalCluster",
    "Node",
    "conninfo",
    "find_pg_bindir",
    "md5_verifier",
    "scram_verifier",
]

_REQUIRED = ("initdb", "pg_ctl", "pg_basebackup", "psql", "postgres")
_INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup, postgres, psql) not found. "
    "Install them: Debian/Ubuntu `apt-get install postgresql postgresql-contrib`, "
    "Fedora/RHEL `dnf install postgresql-server postgresql-contrib`, "
    "macOS `brew install postgresql@16`; or set PG_BINDIR to the directory holding initdb."
)
_START_TIMEOUT = 30.0
_GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class ClusterError(Exception):
    """The local cluster could not be created, started, queried or stopped."""


def _has_initdb(path: Path) -> bool:
    return (path / "initdb").is_file() and os.access(path / "initdb", os.X_OK)


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: sort "9.6" < "15" < "16" numerically.
    parts = re.findall(r"\d+", path.parent.name)
    return tuple(int(p) for p in parts) or (0,)


def find_pg_bindir() -> Path:
    """Locate the PostgreSQL server binaries (newest wins when several are installed)."""
    env = os.environ.get("PG_BINDIR")
    if env:
        path = Path(env)
        if not _has_initdb(path):
            raise ClusterError(f"PG_BINDIR={env} has no initdb. {_INSTALL_HINT}")
        return path
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out and _has_initdb(Path(out)):
                return Path(out)
    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if _has_initdb(p)]
    if candidates:
        return max(candidates, key=_version_key)
    for path in (Path("/usr/local/bin"), Path("/usr/local/pgsql/bin")):
        if _has_initdb(path):
            return path
    raise ClusterError(_INSTALL_HINT)


def _free_ports(count: int, host: str) -> list[int]:
    """Pick distinct free TCP ports (all sockets held open together so none repeats)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _conninfo_value(value: str) -> str:
    """Quote a libpq keyword/value string value when needed."""
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def conninfo(**params: object) -> str:
    """Build a libpq keyword/value connection string, skipping None values."""
    return " ".join(
        f"{key}={_conninfo_value(str(value))}" for key, value in params.items() if value is not None
    )


def md5_verifier(user: str, password: str) -> str:
    """PostgreSQL's md5 password verifier: 'md5' + md5(password || username)."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """A SCRAM-SHA-256 verifier as PostgreSQL stores it (RFC 5803 format).

    Computed here so the plaintext password never reaches the server, whose log would show it
    if the statement failed.
    """
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    return (
        f"SCRAM-SHA-256${iterations}:{b64encode(salt).decode()}"
        f"${b64encode(stored_key).decode()}:{b64encode(server_key).decode()}"
    )


def _pid_alive(pid: int) -> bool:
    """True if pid runs and is not a zombie (PID 1 here may never reap orphans)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    """Direct children of pid, read from /proc (the postmaster's backends)."""
    kids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            kids.append(int(entry.name))
    return kids


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class _Runner:
    """Runs server-side binaries, as `postgres` when we are root (PostgreSQL refuses root)."""

    def __init__(self, bindir: Path, password: str) -> None:
        self.bindir = bindir
        self.password = password
        self.as_root = os.geteuid() == 0
        self.uid: int | None = None
        self.gid: int | None = None
        home = os.environ.get("HOME", "/")
        if self.as_root:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise ClusterError(
                    "running as root but the OS user `postgres` does not exist; PostgreSQL "
                    "refuses to run as root. Install the postgresql package (it creates the "
                    "user) or `useradd --system postgres`."
                ) from None
            self.uid, self.gid, home = pw.pw_uid, pw.pw_gid, pw.pw_dir
        # Drop inherited PG* variables: PGHOST/PGPORT/PGSERVICE etc. would redirect our tools.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", PGCONNECT_TIMEOUT="10", PGSSLMODE="disable")
        self.client_env = {**env, "PGPASSWORD": password}
        self.server_env = {**env, "HOME": home}

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def popen(
        self, args: Sequence[str], *, cwd: Path, with_password: bool = False
    ) -> subprocess.Popen[str]:
        """Start a server-side tool (as postgres when root); output captured, stdin closed."""
        env = self.server_env
        if with_password:
            env = {**env, "PGPASSWORD": self.password}
        return subprocess.Popen(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            user=self.uid,
            group=self.gid,
            extra_groups=[] if self.as_root else None,
        )

    def run(
        self, args: Sequence[str], *, cwd: Path, timeout: float = 60, with_password: bool = False
    ) -> str:
        proc = self.popen(args, cwd=cwd, with_password=with_password)
        return self.finish(proc, args[0], timeout)

    @staticmethod
    def finish(proc: subprocess.Popen[str], what: str, timeout: float = 60) -> str:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise ClusterError(f"{what} timed out after {timeout:.0f}s:\n{out}") from None
        if proc.returncode != 0:
            raise ClusterError(f"{what} failed (exit {proc.returncode}):\n{out.strip()}")
        return out


class Node:
    """One PostgreSQL server of a LocalCluster (the primary or a streaming replica)."""

    def __init__(self, cluster: LocalCluster, name: str, port: int, node_dir: Path) -> None:
        self._cluster = cluster
        self.name = name
        self.host = cluster.host
        self.port = port
        self.node_dir = node_dir
        self.datadir = node_dir / "data"
        self.log_path = node_dir / "postgres.log"

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.host}:{self.port}>"

    # -- process control -------------------------------------------------------------------

    def _pg_ctl(self, *args: str, timeout: float = 60) -> str:
        return self._cluster._require_runner().run(
            ["pg_ctl", "-D", str(self.datadir), *args], cwd=self.node_dir, timeout=timeout
        )

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.datadir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    @property
    def running(self) -> bool:
        pid = self._postmaster_pid()
        return pid is not None and _pid_alive(pid)

    def _start_args(self, wait: bool) -> list[str]:
        return [
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.log_path),
            *(["-w", "-t", str(int(_START_TIMEOUT))] if wait else ["-W"]),
            "start",
        ]

    def start(self, wait: bool = True) -> None:
        """pg_ctl start; with wait, return once the server accepts connections."""
        if self.running:
            return
        runner = self._cluster._require_runner()
        try:
            runner.run(self._start_args(wait), cwd=self.node_dir, timeout=_START_TIMEOUT + 10)
        except ClusterError as exc:
            raise ClusterError(
                f"{self.name}: {exc}\n--- {self.log_path}:\n{self._tail()}"
            ) from None
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = _START_TIMEOUT) -> None:
        """Poll until the server answers a query (a standby answers once consistent)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                self.sql("SELECT 1", timeout=5)
                return
            except ClusterError as exc:
                last = str(exc)
            if self._postmaster_pid() is not None and not self.running:
                break  # the postmaster died: no point waiting
            time.sleep(0.05)
        raise ClusterError(
            f"{self.name} does not accept connections: {last}\n--- {self.log_path}:\n{self._tail()}"
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; escalate to immediate, then SIGKILL, so nothing is left behind."""
        if not self.running:
            return
        modes = [mode] if mode == "immediate" else [mode, "immediate"]
        for m in modes:
            with contextlib.suppress(ClusterError):
                self._pg_ctl("-m", m, "-w", "-t", "20", "stop", timeout=30)
            if not self.running:
                return
        self.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends: a crash, as after power loss."""
        pid = self._postmaster_pid()
        if pid is None or not _pid_alive(pid):
            return
        victims = [pid, *_children(pid)]
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_pid_alive(v) for v in victims):
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name}: processes {victims} survived SIGKILL")
            time.sleep(0.02)
        # The dead postmaster may linger as a zombie until PID 1 reaps it; PostgreSQL's own
        # stale-lock check (kill(pid, 0)) would take it for alive and refuse to start.
        # Nothing of it runs any more, so its lock files are stale: remove them.
        sock = self._cluster.base_dir / f".s.PGSQL.{self.port}"
        for lock in (self.datadir / "postmaster.pid", sock.with_name(sock.name + ".lock"), sock):
            lock.unlink(missing_ok=True)

    def promote(self) -> None:
        """Promote a standby and wait until it leaves recovery."""
        self._pg_ctl("-w", "-t", "30", "promote", timeout=40)
        deadline = time.monotonic() + 30
        while self.sql("SELECT pg_is_in_recovery()") != "f":
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name} still in recovery after promote")
            time.sleep(0.05)

    # -- SQL -------------------------------------------------------------------------------

    def sql(self, query: str, dbname: str = "postgres", timeout: float = 60) -> str:
        """Run SQL through psql as the superuser over TCP; return stdout stripped.

        The query goes on stdin, so several statements run one by one (CREATE DATABASE can't
        run in a multi-statement Query message) and nothing shows in the process list.
        """
        c = self._cluster
        args = [
            str(c._require_runner().bindir / "psql"),
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            c.superuser,
            "-d",
            dbname,
            "-f",
            "-",
        ]
        try:
            proc = subprocess.run(
                args,
                input=query,
                capture_output=True,
                text=True,
                env=c._require_runner().client_env,
                timeout=timeout,
                cwd=c.base_dir,
            )
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{self.name}: psql timed out after {timeout:.0f}s") from None
        if proc.returncode != 0:
            raise ClusterError(f"{self.name}: psql failed: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def dsn(
        self, dbname: str = "postgres", user: str | None = None, password: str | None = None
    ) -> str:
        """libpq keyword/value string; defaults to the superuser and its password."""
        if user is None:
            user = self._cluster.superuser
            if password is None:
                password = self._cluster.password
        return conninfo(host=self.host, port=self.port, dbname=dbname, user=user, password=password)

    def set_config(self, name: str, value: str) -> None:
        """ALTER SYSTEM SET + reload (works on standbys too, e.g. recovery_min_apply_delay)."""
        if not _GUC_NAME.match(name):
            raise ClusterError(f"bad setting name {name!r}")
        self.sql(f"ALTER SYSTEM SET {name} = {_quote_literal(value)};\nSELECT pg_reload_conf();")

    def _tail(self) -> str:
        return _tail(self.log_path)


class LocalCluster:
    """A primary and `replicas` streaming hot standbys on free ports in a temporary directory.

    Tuned for speed, not durability (fsync off): it exists for demos, tests and benchmarks.
    """

    def __init__(
        self,
        replicas: int = 2,
        base_dir: str | Path | None = None,
        host: str = "127.0.0.1",
        superuser: str = "postgres",
        password: str | None = None,
        settings: Mapping[str, str] | None = None,
        hba: Sequence[str] = (),
    ) -> None:
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        self.superuser = superuser
        self.password = password if password is not None else secrets.token_urlsafe(24)
        self.host = host
        self.settings = dict(settings or {})
        self.hba = list(hba)
        self._n_replicas = replicas
        self._base_dir_arg = Path(base_dir) if base_dir is not None else None
        self._owns_base_dir = False
        self._started = False
        self._runner: _Runner | None = None
        self.base_dir = Path()
        self._primary: Node | None = None
        self.replicas: list[Node] = []
        self.nodes: list[Node] = []

    @property
    def primary(self) -> Node:
        if self._primary is None:
            raise ClusterError("cluster not started")
        return self._primary

    def __repr__(self) -> str:
        return f"<LocalCluster {', '.join(f'{n.name}={n.port}' for n in self.nodes)}>"

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        """initdb the primary, clone the replicas, start all; return once all are streaming."""
        if self._started:
            return self
        bindir = find_pg_bindir()
        self._runner = runner = _Runner(bindir, self.password)
        if self._base_dir_arg is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="pgrouter-cluster-"))
            self._owns_base_dir = True
        else:
            self.base_dir = self._base_dir_arg.resolve()
            self._owns_base_dir = not self.base_dir.exists()
            self.base_dir.mkdir(parents=True, exist_ok=True)
        runner.chown(self.base_dir)
        self._started = True
        atexit.register(self.stop)
        ports = _free_ports(self._n_replicas + 1, self.host)
        self._primary = Node(self, "primary", ports[0], self.base_dir / "primary")
        self.replicas = [
            Node(self, f"replica{i}", ports[i], self.base_dir / f"replica{i}")
            for i in range(1, self._n_replicas + 1)
        ]
        self.nodes = [self.primary, *self.replicas]
        try:
            for node in self.nodes:
                node.node_dir.mkdir()
                runner.chown(node.node_dir)
            self._init_primary()
            self.primary.start()
            self._clone_replicas()
            # Start the replicas in parallel; pg_ctl -w notices a postmaster that dies early.
            procs = [
                (n, runner.popen(n._start_args(wait=True), cwd=n.node_dir)) for n in self.replicas
            ]
            for node, proc in procs:
                try:
                    runner.finish(proc, f"pg_ctl start {node.name}", timeout=_START_TIMEOUT + 10)
                except ClusterError as exc:
                    raise ClusterError(f"{exc}\n--- {node.log_path}:\n{node._tail()}") from None
            for node in self.replicas:
                node.wait_ready()
            self.wait_streaming()
        except BaseException:
            self.stop()
            raise
        return self

    def _init_primary(self) -> None:
        runner = self._require_runner()
        node = self.primary
        pwfile = self.base_dir / ".pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.password + "\n")
            runner.chown(pwfile)
            runner.run(
                [
                    "initdb",
                    "-D",
                    str(node.datadir),
                    "-U",
                    self.superuser,
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                    "--no-instructions",
                ],
                cwd=node.node_dir,
                timeout=120,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        hba = [
            "# pgrouter test cluster; md5 accepts both md5 and SCRAM verifiers",
            *self.hba,
            "local all all trust",
            "local replication all trust",
            "host all all 127.0.0.1/32 md5",
            "host all all ::1/128 md5",
            "host replication all 127.0.0.1/32 md5",
            "host replication all ::1/128 md5",
        ]
        (node.datadir / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        conf: dict[str, str] = {
            "listen_addresses": self.host,
            "port": str(node.port),
            "unix_socket_directories": str(self.base_dir),
            "max_connections": "400",
            "wal_level": "replica",
            "max_wal_senders": "10",
            "hot_standby": "on",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "wal_keep_size": "256MB",
            # Async commits reach the replicas once the WAL writer flushes: keep that short.
            "wal_writer_delay": "10ms",
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            **self.settings,
        }
        with (node.datadir / "postgresql.conf").open("a") as f:
            f.write("\n# --- pgrouter LocalCluster ---\n")
            for key, value in conf.items():
                f.write(f"{key} = {_quote_literal(str(value))}\n")

    def _clone_replicas(self) -> None:
        """pg_basebackup every replica in parallel (-R writes standby.signal + conninfo)."""
        runner = self._require_runner()
        procs = []
        for node in self.replicas:
            source = conninfo(
                host=self.host,
                port=self.primary.port,
                user=self.superuser,
                application_name=node.name,
            )
            args = [
                "pg_basebackup",
                "-d",
                source,
                "-D",
                str(node.datadir),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ]
            procs.append((node, runner.popen(args, cwd=node.node_dir, with_password=True)))
        for node, proc in procs:
            try:
                runner.finish(proc, f"pg_basebackup for {node.name}", timeout=120)
            except ClusterError as exc:
                raise ClusterError(f"{exc}\n--- primary log:\n{self.primary._tail()}") from None
            with (node.datadir / "postgresql.conf").open("a") as f:
                f.write(f"\n# --- {node.name} ---\nport = {node.port}\n")

    def wait_streaming(self, timeout: float = _START_TIMEOUT) -> None:
        """Until pg_stat_replication on the primary shows every running replica streaming."""
        want = {n.name for n in self.replicas if n.running}
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while True:
            out = self.primary.sql(
                "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
            )
            seen = set(out.split()) if out else set()
            if want <= seen:
                return
            if time.monotonic() > deadline:
                missing = sorted(want - seen)
                logs = "\n".join(
                    f"--- {n.name} ({n.log_path}):\n{n._tail()}"
                    for n in self.replicas
                    if n.name in missing
                )
                raise ClusterError(
                    f"replicas not streaming after {timeout:.0f}s: {', '.join(missing)}\n{logs}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop every node and remove the base dir if we created it. Idempotent."""
        if not self._started:
            return
        self._started = False
        atexit.unregister(self.stop)
        errors: list[str] = []
        for node in reversed(self.nodes):
            try:
                node.stop()
            except ClusterError as exc:
                errors.append(str(exc))
                with contextlib.suppress(ClusterError):
                    node.kill()
        if self._owns_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        if errors:
            raise ClusterError("; ".join(errors))

    def _require_runner(self) -> _Runner:
        if self._runner is None:
            raise ClusterError("cluster not started")
        return self._runner

    # -- helpers ---------------------------------------------------------------------------

    def wait_replicated(self, timeout: float = 10.0) -> None:
        """Until every running replica has replayed the primary's current WAL position."""
        target = self.primary.sql("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + timeout
        pending = [n for n in self.replicas if n.running]
        while pending:
            pending = [
                n
                for n in pending
                if n.sql(f"SELECT coalesce(pg_last_wal_replay_lsn() >= '{target}', false)") != "t"
            ]
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(n.name for n in pending)
                raise ClusterError(f"{names} did not replay {target} within {timeout:.0f}s")
            time.sleep(0.02)

    def create_user(
        self, name: str, password: str | None = None, *, md5: bool = False, superuser: bool = False
    ) -> None:
        """CREATE ROLE ... LOGIN; the verifier is computed here so no plaintext is logged."""
        parts = [f"CREATE ROLE {_quote_ident(name)} LOGIN"]
        if superuser:
            parts.append("SUPERUSER")
        if password is not None:
            verifier = md5_verifier(name, password) if md5 else scram_verifier(password)
            parts.append(f"PASSWORD {_quote_literal(verifier)}")
        self.primary.sql(" ".join(parts) + ";")

    def create_database(self, name: str, owner: str | None = None) -> None:
        """CREATE DATABASE (owned by `owner` when given)."""
        stmt = f"CREATE DATABASE {_quote_ident(name)}"
        if owner is not None:
            stmt += f" OWNER {_quote_ident(owner)}"
        self.primary.sql(stmt + ";")
