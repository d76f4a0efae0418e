"""pgbench comparison of direct PostgreSQL, pgrouter and PgBouncer, side by side, in one run.

Usage: ``.venv/bin/python bench/run.py [--quick] [--only select-c100] [--targets ...]``.
The same run also compares pgrouter with itself (routing on vs off over 2 replicas, /metrics
scraped vs not), runs SCRAM connects against PgBouncer and micro-benchmarks the classifier.
See bench/README.md for what is measured and how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from router.cluster import ClusterError, LocalCluster, find_pg_bindir

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench's own modules, however run

from classifier import ClassifierBench, classifier_table, run_classifier_bench
from scrape import Scraper, get_metrics, routed_transactions

BENCH_USER = "bench"
BENCH_PASSWORD = "bench-secret"
BENCH_DB = "bench"
SCRAM_USER = "bench_scram"  # same password, stored as a SCRAM verifier (SCRAM runs only)
ROUTING_OFF_DB = "bench_routing_off"  # pgrouter-routed's names for the bench database
ROUTING_ON_DB = "bench_routing_on"
ROUTED_REPLICAS = 2
PGBOUNCER_OS_USER = "postgres"
HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
TARGETS = ("direct", "pgrouter", "pgbouncer")
PROXIES = ("pgrouter", "pgbouncer")
CLASSIFIER = "classifier"  # the in-process classifier micro-benchmark, selectable like a workload
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 20.0
IDLE_S = 2.0  # seconds each proxy is watched at rest after its warm-up
SCRAPE_COST_GETS = 20
# On top of LocalCluster's own settings (max_connections 400, fsync off): shared_buffers large
# enough to hold the scale-10 data set once prewarmed, so no target pays for cold reads.
CLUSTER_SETTINGS = {"shared_buffers": "512MB"}


class HarnessError(RuntimeError):
    """The benchmark harness itself could not run (cluster, pgbench init, ...)."""


class TargetError(RuntimeError):
    """One target could not be started or measured; the others still run."""


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Column:
    """One column of a workload's table: the endpoint pgbench runs against, and how.

    ``endpoint`` names a process (see ENDPOINT_KINDS); several columns may share one, e.g. two
    database entries of the same pgrouter, or the same pgrouter with and without scraping."""

    name: str
    endpoint: str
    dbname: str = BENCH_DB
    user: str = BENCH_USER
    scrape: bool = False  # GET the endpoint's /metrics every second during the run
    count_routes: bool = False  # read where pgrouter sent the transactions (its /metrics)


# Which --targets entry a process belongs to.
ENDPOINT_KINDS = {
    "direct": "direct",
    "pgrouter": "pgrouter",
    "pgbouncer": "pgbouncer",
    "pgrouter-routed": "pgrouter",  # 2 replicas; the bench database twice, routing off and on
    "pgrouter-scram": "pgrouter",  # auth_type scram-sha-256
    "pgbouncer-scram": "pgbouncer",  # auth_type = scram-sha-256
    "pgrouter-workers": "pgrouter",  # workers: 2
    "floor": "pgrouter",  # bench/floor.py: the floor under pgrouter, measured along with it
}
STANDARD = tuple(Column(t, t) for t in TARGETS)
ROUTED = (
    Column("routing-off", "pgrouter-routed", dbname=ROUTING_OFF_DB, count_routes=True),
    Column("routing-on", "pgrouter-routed", dbname=ROUTING_ON_DB, count_routes=True),
)
SCRAPED = (Column("pgrouter", "pgrouter"), Column("scraped", "pgrouter", scrape=True))
WORKERS = (Column("workers-1", "pgrouter"), Column("workers-2", "pgrouter-workers"))
FLOOR = (Column("floor", "floor"), Column("pgbouncer", "pgbouncer"))
FLOOR_COMPARE = ("floor", "pgbouncer")
SCRAM = (
    Column("pgrouter", "pgrouter-scram", user=SCRAM_USER),
    Column("pgbouncer", "pgbouncer-scram", user=SCRAM_USER),
)


@dataclass(frozen=True)
class Workload:
    """One pgbench invocation, run for the same duration against each of its columns."""

    name: str
    args: tuple[str, ...]
    writes: bool = False  # vacuum + truncate history before each run, as pgbench itself would
    columns: tuple[Column, ...] = STANDARD
    compare: tuple[str, str] = ("pgrouter", "pgbouncer")  # the ratio column: first/second
    default: bool = True  # in a plain run; the others need --all or --only
    interleave: bool = False  # self-comparison: run its two columns A B B A (see schedule)
    what: str = ""  # shown in the title when the columns are not the standard targets

    @property
    def description(self) -> str:
        text = "pgbench " + " ".join(self.args or ("(TPC-B-like)",))
        return f"{text}; {self.what}" if self.what else text


S_C10 = ("-S", "-c", "10", "-j", "2")
S_C100 = ("-S", "-c", "100", "-j", "2")
ROUTED_WHAT = "one pgrouter, 2 replicas, reads: primary vs replicas"
SCRAPED_WHAT = "pgrouter alone, then with /metrics scraped every second"
WORKERS_WHAT = "pgrouter with one process, then with workers: 2 (CPU of all its processes)"
FLOOR_WHAT = "bench/floor.py (a uvloop byte copier, a server per client) vs PgBouncer"
WORKLOADS = (
    Workload("select-c10", S_C10),
    Workload("select-c100", S_C100),
    Workload("select-prepared-c100", ("-S", "-M", "prepared", "-c", "100", "-j", "2")),
    Workload("select-connect", ("-S", "-C", "-c", "10", "-j", "2")),
    Workload("tpcb-c10", ("-c", "10", "-j", "2"), writes=True),
    Workload(
        "routed-select-c100",
        S_C100,
        columns=ROUTED,
        compare=("routing-on", "routing-off"),
        interleave=True,
        what=ROUTED_WHAT,
    ),
    Workload(
        "routed-select-c10",
        S_C10,
        columns=ROUTED,
        compare=("routing-on", "routing-off"),
        default=False,
        interleave=True,
        what=ROUTED_WHAT,
    ),
    Workload(
        "scraped-select-c100",
        S_C100,
        columns=SCRAPED,
        compare=("scraped", "pgrouter"),
        interleave=True,
        what=SCRAPED_WHAT,
    ),
    Workload(
        "scraped-select-c10",
        S_C10,
        columns=SCRAPED,
        compare=("scraped", "pgrouter"),
        default=False,
        interleave=True,
        what=SCRAPED_WHAT,
    ),
    Workload(
        "workers-select-c100",
        S_C100,
        columns=WORKERS,
        compare=("workers-2", "workers-1"),
        interleave=True,
        what=WORKERS_WHAT,
    ),
    Workload(
        "workers-select-connect",
        ("-S", "-C", "-c", "10", "-j", "2"),
        columns=WORKERS,
        compare=("workers-2", "workers-1"),
        default=False,
        interleave=True,
        what=WORKERS_WHAT,
    ),
    Workload("floor-select-c100", S_C100, columns=FLOOR, compare=FLOOR_COMPARE, what=FLOOR_WHAT),
    Workload(
        "scram-connect",
        ("-S", "-C", "-c", "10", "-j", "2"),
        columns=SCRAM,
        what="a new connection per transaction, SCRAM-SHA-256 client auth",
    ),
)


@dataclass
class Endpoint:
    """Where pgbench connects, and the proxy process to meter (None for direct)."""

    name: str
    host: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    metrics_url: str | None = None  # pgrouter's admin.http /metrics


@dataclass
class PgbenchResult:
    """The numbers pgbench prints at the end of a run."""

    tps: float
    tps_kind: str  # "without initial connection time" | "including reconnection times"
    transactions: int
    failed: int
    latency_ms: float | None


@dataclass
class RunResult:
    """One (workload, target) measurement; ``error`` is set when it could not be made."""

    workload: str
    target: str
    tps: float | None = None
    tps_kind: str | None = None
    transactions: int | None = None
    failed: int | None = None
    latency_ms: float | None = None
    proxy_cpu_s: float | None = None
    cpu_us_per_txn: float | None = None
    peak_rss_kb: int | None = None
    replica_share: float | None = None  # routed runs: transactions pgrouter sent to replicas
    scrapes: int | None = None  # scraped runs: /metrics GETs during the run
    scrape_ms: float | None = None  # their mean latency
    runs: int = 1  # pgbench runs merged into this result (2 when interleaved)
    error: str | None = None


@dataclass
class Check:
    """One of the issue's performance targets."""

    name: str
    status: str  # PASS | MISS | N/A
    detail: str


@dataclass
class Report:
    """Everything written to the JSON results file."""

    started: str
    options: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)
    workloads: list[dict[str, Any]] = field(default_factory=list)
    results: list[RunResult] = field(default_factory=list)
    ratios: dict[str, dict[str, float | None]] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    classifier: ClassifierBench | None = None
    idle_cpu_ms_per_s: dict[str, float] = field(default_factory=dict)  # each proxy at rest
    scrape_cpu_ms: dict[str, float] = field(default_factory=dict)  # pgrouter CPU per /metrics
    notes: list[str] = field(default_factory=list)
    finished: str | None = None


# --------------------------------------------------------------------------- small helpers


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout holds only the tables."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def command_output(cmd: Sequence[str]) -> str | None:
    """First line of a command's output, or None if it cannot run."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


# --------------------------------------------------------------------------- process metering


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(child) for child in task.read_text().split())
    return pids


def cpu_seconds(pid: int) -> float:
    """User+system CPU of a process tree, including already reaped children."""
    ticks = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14..17
            ticks += sum(int(f) for f in fields[11:15])
    return ticks / CLK_TCK


def run_time_ns(pid: int) -> int:
    """CPU time of a process tree's live threads in ns (schedstat): finer than the 10 ms
    ticks of /proc/PID/stat, for the short idle measurement."""
    total = 0
    for p in process_tree(pid):
        for task in Path(f"/proc/{p}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(task.read_text().split()[0])
    return total


def peak_rss_kb(pid: int) -> int | None:
    """Sum of VmHWM (peak resident set) over a process tree, in kB."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total or None


# --------------------------------------------------------------------------- processes


def wait_for_port(endpoint: Endpoint, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until ``endpoint`` accepts TCP connections; fail fast if its process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if endpoint.proc is not None and endpoint.proc.poll() is not None:
            raise TargetError(
                f"{endpoint.name} exited with code {endpoint.proc.returncode} at start-up:\n"
                + tail(endpoint.log)
            )
        with (
            contextlib.suppress(OSError),
            socket.create_connection((endpoint.host, endpoint.port), 0.5),
        ):
            return
        time.sleep(0.1)
    raise TargetError(f"{endpoint.name} did not listen on port {endpoint.port} in {timeout:.0f}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not exited in time."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def spawned(
    name: str, cmd: Sequence[str], port: int, log_path: Path, **popen_kw: Any
) -> Iterator[Endpoint]:
    """Run a proxy in its own process group and yield its endpoint once it listens."""
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **popen_kw,
        )
    endpoint = Endpoint(name, HOST, port, proc, log_path)
    try:
        wait_for_port(endpoint)
        yield endpoint
    finally:
        stop_process(proc)


# --------------------------------------------------------------------------- pgrouter


def bench_database(cluster: LocalCluster, replicas: int, **extra: Any) -> dict[str, Any]:
    """The bench database on the cluster, with its first `replicas` replicas."""
    database: dict[str, Any] = {"primary": f"{cluster.primary.host}:{cluster.primary.port}"}
    if replicas:
        database["replicas"] = [f"{r.host}:{r.port}" for r in cluster.replicas[:replicas]]
    return {**database, **extra}


def pgrouter_config(
    port: int, http_port: int, pool_size: int, databases: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """Topology for pgrouter: md5, transaction pooling, /metrics on `http_port` (only the
    scraped run reads it; an idle HTTP listener costs nothing)."""
    return {
        "listen": f"{HOST}:{port}",
        "pool_mode": "transaction",
        "pool_size": pool_size,
        "auth_type": "md5",
        "users": {BENCH_USER: {"password": BENCH_PASSWORD}},
        "databases": databases,
        "admin": {"http": f"{HOST}:{http_port}"},
        "log": {"connections": False},  # as PgBouncer runs here (log_connections = 0)
        **extra,
    }


def pgrouter_variant(
    name: str, cluster: LocalCluster, args: argparse.Namespace, port: int, http_port: int
) -> dict[str, Any]:
    """The topology of each pgrouter process the bench runs."""
    if name == "pgrouter-routed":  # routing off and on in one process: same monitors, same CPU
        databases = {
            ROUTING_OFF_DB: bench_database(
                cluster, ROUTED_REPLICAS, dbname=BENCH_DB, routing={"reads": "primary"}
            ),
            ROUTING_ON_DB: bench_database(
                cluster, ROUTED_REPLICAS, dbname=BENCH_DB, routing={"reads": "replicas"}
            ),
        }
        return pgrouter_config(port, http_port, args.pool_size, databases)
    if name == "pgrouter-scram":
        databases = {BENCH_DB: bench_database(cluster, 0)}
        return pgrouter_config(
            port,
            http_port,
            args.pool_size,
            databases,
            auth_type="scram-sha-256",
            users={SCRAM_USER: {"password": args.scram_verifier}},
        )
    databases = {BENCH_DB: bench_database(cluster, args.replicas)}
    if name == "pgrouter-workers":  # the pool split between the two: the same server budget
        return pgrouter_config(port, http_port, args.pool_size, databases, workers=2)
    return pgrouter_config(port, http_port, args.pool_size, databases)


@contextlib.contextmanager
def run_pgrouter(
    name: str, cluster: LocalCluster, args: argparse.Namespace, workdir: Path
) -> Iterator[Endpoint]:
    port, http_port = free_port(), free_port()
    config = workdir / f"{name}.yaml"
    topology = pgrouter_variant(name, cluster, args, port, http_port)
    config.write_text(yaml.safe_dump(topology, sort_keys=False))
    cmd = [sys.executable, "-m", "router", "--config", str(config)]
    log(f"starting {name} on port {port}")
    with spawned(name, cmd, port, workdir / f"{name}.log", cwd=REPO) as endpoint:
        endpoint.metrics_url = f"http://{HOST}:{http_port}/metrics"
        yield endpoint


@contextlib.contextmanager
def run_floor(cluster: LocalCluster, workdir: Path) -> Iterator[Endpoint]:
    port = free_port()
    primary = cluster.primary
    cmd = [sys.executable, str(REPO / "bench" / "floor.py"), str(port), primary.host]
    log(f"starting floor on port {port}")
    with spawned("floor", [*cmd, str(primary.port)], port, workdir / "floor.log") as endpoint:
        yield endpoint


# --------------------------------------------------------------------------- PgBouncer


def which_pgbouncer() -> str | None:
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/sbin")


def find_pgbouncer(install: bool, notes: list[str]) -> str | None:
    """Path of the pgbouncer binary, installing the Debian package if allowed and needed."""
    found = which_pgbouncer()
    if found or not install:
        if not found:
            notes.append("PgBouncer skipped: not installed and --no-install given")
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        notes.append("PgBouncer skipped: not installed (needs root and apt-get to install it)")
        return None
    log("installing pgbouncer with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "pgbouncer"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            notes.append(f"PgBouncer skipped: {' '.join(cmd)} timed out")
            return None
        if done.returncode != 0:
            notes.append(f"PgBouncer skipped: {' '.join(cmd)} failed: {done.stderr.strip()[-300:]}")
            return None
    return which_pgbouncer()


def pgbouncer_ini(
    port: int, cluster: LocalCluster, pool_size: int, auth_file: Path, auth_type: str = "md5"
) -> str:
    """pgbouncer.ini matching pgrouter's settings (same pool size, mode and auth)."""
    primary = cluster.primary
    return f"""\
[databases]
{BENCH_DB} = host={primary.host} port={primary.port} dbname={BENCH_DB}

[pgbouncer]
listen_addr = {HOST}
listen_port = {port}
unix_socket_dir =
auth_type = {auth_type}
auth_file = {auth_file}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 1000
log_connections = 0
log_disconnections = 0
"""


def md5_auth_line(user: str, password: str) -> str:
    digest = hashlib.md5((password + user).encode()).hexdigest()
    return auth_line(user, f"md5{digest}")


def auth_line(user: str, secret: str) -> str:
    """A userlist.txt line: the user and its md5 hash or SCRAM verifier."""
    return f'"{user}" "{secret}"\n'


def pgbouncer_run_as() -> dict[str, Any]:
    """Popen arguments that drop root (PgBouncer refuses to run as root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": PGBOUNCER_OS_USER, "group": PGBOUNCER_OS_USER, "extra_groups": []}


@contextlib.contextmanager
def run_pgbouncer(
    name: str, binary: str, cluster: LocalCluster, args: argparse.Namespace
) -> Iterator[Endpoint]:
    """Run PgBouncer from its own temp dir, owned by the OS user it runs as; `name`
    pgbouncer-scram authenticates clients with SCRAM (a verifier in its userlist, also used
    to log in to the server by SCRAM pass-through), pgbouncer with md5."""
    workdir = Path(tempfile.mkdtemp(prefix="pgrouter-bench-pgbouncer-"))
    try:
        port = free_port()
        auth_file = workdir / "userlist.txt"
        ini = workdir / "pgbouncer.ini"
        if name == "pgbouncer-scram":
            auth_type = "scram-sha-256"
            auth_file.write_text(auth_line(SCRAM_USER, args.scram_verifier))
        else:
            auth_type = "md5"
            auth_file.write_text(md5_auth_line(BENCH_USER, BENCH_PASSWORD))
        ini.write_text(pgbouncer_ini(port, cluster, args.pool_size, auth_file, auth_type))
        run_as = pgbouncer_run_as()
        if run_as:
            for path in (workdir, auth_file, ini):
                shutil.chown(path, run_as["user"], run_as["group"])
        log(f"starting {name} on port {port}")
        with spawned(name, [binary, str(ini)], port, workdir / "pgbouncer.log", **run_as) as ep:
            yield ep
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- pgbench

PGBENCH_PATTERNS = {
    "transactions": re.compile(r"number of transactions actually processed: (\d+)"),
    "failed": re.compile(r"number of failed transactions: (\d+)"),
    "latency": re.compile(r"latency average = ([\d.]+) ms"),
    "tps": re.compile(r"^tps = ([\d.]+) \(([^)]*)\)", re.MULTILINE),
}


def parse_pgbench(output: str) -> PgbenchResult:
    """Extract tps, transaction count, failures and mean latency from pgbench's report."""
    found = {key: rx.search(output) for key, rx in PGBENCH_PATTERNS.items()}
    tps, transactions = found["tps"], found["transactions"]
    if tps is None or transactions is None:
        raise TargetError("could not parse pgbench output:\n" + output[-800:])
    return PgbenchResult(
        tps=float(tps.group(1)),
        tps_kind=tps.group(2),
        transactions=int(transactions.group(1)),
        failed=int(found["failed"].group(1)) if found["failed"] else 0,
        latency_ms=float(found["latency"].group(1)) if found["latency"] else None,
    )


def pgbench_env() -> dict[str, str]:
    """libpq environment: no inherited PG* variables; the password never on a command line."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return {
        **inherited,
        "PGPASSWORD": BENCH_PASSWORD,
        "PGSSLMODE": "disable",
        "PGGSSENCMODE": "disable",
    }


def pgbench(
    bindir: Path,
    endpoint: Endpoint,
    args: Sequence[str],
    timeout: float,
    dbname: str = BENCH_DB,
    user: str = BENCH_USER,
) -> str:
    """Run pgbench against ``endpoint`` and return its stdout (raises TargetError on failure)."""
    cmd = [str(bindir / "pgbench"), "-h", endpoint.host, "-p", str(endpoint.port)]
    cmd += ["-U", user, *args, dbname]
    try:
        done = subprocess.run(
            cmd, env=pgbench_env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise TargetError(f"pgbench timed out after {timeout:.0f}s") from exc
    if done.returncode != 0:
        raise TargetError(f"pgbench exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return done.stdout


def prepare_writes(cluster: LocalCluster) -> None:
    """What pgbench does before a TPC-B run (we pass -n so proxies never see VACUUM)."""
    for statement in (
        "VACUUM pgbench_branches",
        "VACUUM pgbench_tellers",
        "TRUNCATE pgbench_history",
    ):
        cluster.primary.sql(statement, dbname=BENCH_DB)


def measure(
    bindir: Path, endpoint: Endpoint, workload: Workload, column: Column, duration: int
) -> RunResult:
    """One pgbench run against one column, metering the proxy's CPU around it (and, for the
    scraped column, scraping /metrics during it)."""
    result = RunResult(workload.name, column.name)
    pid = endpoint.proc.pid if endpoint.proc else None
    if endpoint.proc is not None and endpoint.proc.poll() is not None:
        raise TargetError(f"{endpoint.name} is no longer running:\n{tail(endpoint.log)}")
    routes_before = routes(endpoint, column)
    scraper = Scraper(endpoint.metrics_url) if column.scrape and endpoint.metrics_url else None
    cpu_before = cpu_seconds(pid) if pid else 0.0
    if scraper is not None:
        scraper.start()
    args = ["-n", "-T", str(duration), *workload.args]
    try:
        output = pgbench(
            bindir, endpoint, args, duration + 120, dbname=column.dbname, user=column.user
        )
    finally:
        if scraper is not None:
            scraper.stop()
    cpu_after = cpu_seconds(pid) if pid else 0.0
    if scraper is not None:
        result.scrapes, result.scrape_ms = scraper.scrapes, scraper.mean_ms
        if scraper.failures:
            raise TargetError(f"{scraper.failures} /metrics scrapes failed")
    if routes_before is not None:
        after = routes(endpoint, column) or {}
        delta = {k: after.get(k, 0.0) - routes_before.get(k, 0.0) for k in after}
        total = sum(delta.values())
        # routing off has no router and counts nothing: every read went to the primary
        result.replica_share = delta.get("replica", 0.0) / total if total else 0.0
    parsed = parse_pgbench(output)
    result.tps, result.tps_kind = parsed.tps, parsed.tps_kind
    result.transactions, result.failed = parsed.transactions, parsed.failed
    result.latency_ms = parsed.latency_ms
    if pid:
        result.proxy_cpu_s = cpu_after - cpu_before
        if parsed.transactions:
            result.cpu_us_per_txn = result.proxy_cpu_s * 1e6 / parsed.transactions
        result.peak_rss_kb = peak_rss_kb(pid)
    return result


def routes(endpoint: Endpoint, column: Column) -> dict[str, float] | None:
    """Transactions pgrouter routed for the column's database so far, by target."""
    if not column.count_routes or endpoint.metrics_url is None:
        return None
    try:
        return routed_transactions(endpoint.metrics_url, column.dbname)
    except OSError as exc:
        raise TargetError(f"could not read {endpoint.metrics_url}: {exc}") from exc


# --------------------------------------------------------------------------- cluster set-up


def prepare_cluster(cluster: LocalCluster, bindir: Path, scale: int) -> Endpoint:
    """Create the bench user and database, load pgbench data and prewarm it everywhere."""
    log("creating user and database, pgbench -i")
    cluster.create_user(BENCH_USER, BENCH_PASSWORD, md5=True)
    cluster.create_database(BENCH_DB, BENCH_USER)
    direct = Endpoint("direct", cluster.primary.host, cluster.primary.port)
    try:
        pgbench(bindir, direct, ["-i", "-q", "-s", str(scale)], timeout=600)
    except TargetError as exc:
        raise HarnessError(f"pgbench -i failed: {exc}") from exc
    prewarm(cluster)
    cluster.wait_replicated(timeout=120)  # replicas must have the data before reads go there
    return direct


def create_scram_user(cluster: LocalCluster) -> str:
    """The SCRAM runs' user (the bench password stored as a SCRAM verifier), allowed to read
    the pgbench tables; returns its verifier, which both proxies' user lists hold."""
    cluster.create_user(SCRAM_USER, BENCH_PASSWORD)
    cluster.primary.sql(
        f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {SCRAM_USER}", dbname=BENCH_DB
    )
    verifier = cluster.primary.sql(
        f"SELECT rolpassword FROM pg_authid WHERE rolname = '{SCRAM_USER}'"
    ).strip()
    if not verifier.startswith("SCRAM-SHA-256$"):
        raise HarnessError(f"{SCRAM_USER} has no SCRAM verifier")
    cluster.wait_replicated(timeout=120)
    return verifier


def prewarm(cluster: LocalCluster) -> None:
    """Load the data set into shared_buffers so the first target measured is not penalised."""
    try:
        cluster.primary.sql("CREATE EXTENSION IF NOT EXISTS pg_prewarm", dbname=BENCH_DB)
        cluster.wait_replicated(timeout=120)
        for node in [cluster.primary, *cluster.replicas]:
            for rel in ("pgbench_accounts", "pgbench_accounts_pkey"):
                node.sql(f"SELECT pg_prewarm('{rel}')", dbname=BENCH_DB)
    except ClusterError as exc:  # best effort: only the first target measured would suffer
        log(f"prewarm skipped: {exc}")


def machine_info(cluster: LocalCluster, bindir: Path) -> dict[str, Any]:
    """What the numbers depend on: cores, CPU, versions, commit."""
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        None,
    )
    versions = {}
    for dist in ("pgrouter", "uvloop"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return {
        "nproc": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),  # other load on the machine skews every number
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "postgresql": cluster.primary.sql("SHOW server_version"),
        "pgbench": command_output([str(bindir / "pgbench"), "--version"]),
        "pgbouncer": None,  # filled in when PgBouncer is found
        "packages": versions,
        "git_commit": command_output(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "git_dirty": bool(command_output(["git", "-C", str(REPO), "status", "--porcelain"])),
    }


# --------------------------------------------------------------------------- reporting


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def result_for(report: Report, workload: str, target: str) -> RunResult | None:
    return next((r for r in report.results if r.workload == workload and r.target == target), None)


def ratio_key(metric: str, compare: tuple[str, str]) -> str:
    """E.g. cpu_pgrouter_over_pgbouncer, tps_routing-on_over_routing-off."""
    return f"{metric}_{compare[0]}_over_{compare[1]}"


def compute_ratios(report: Report, workloads: Sequence[Workload]) -> None:
    for w in workloads:
        first, second = (result_for(report, w.name, c) for c in w.compare)
        if first is None or second is None:
            continue
        report.ratios[w.name] = {
            ratio_key("tps", w.compare): ratio(first.tps, second.tps),
            ratio_key("cpu", w.compare): ratio(first.cpu_us_per_txn, second.cpu_us_per_txn),
        }


def check(
    report: Report,
    name: str,
    workload: str,
    metric: str,
    passes: Callable[[float], bool],
    compare: tuple[str, str] = ("pgrouter", "pgbouncer"),
) -> Check:
    """A target on a ratio of two columns of `workload`; N/A when it was not measured."""
    value = report.ratios.get(workload, {}).get(ratio_key(metric, compare))
    if value is None:
        return Check(name, "N/A", f"needs {workload} measured on {' and '.join(compare)}")
    status = "PASS" if passes(value) else "MISS"
    return Check(name, status, f"{compare[0]}/{compare[1]} = {value:.2f}x")


def own_ratio_check(report: Report, name: str, workload: str, base: str, limit: float) -> Check:
    """pgrouter's CPU per transaction on `workload` against its own on `base`."""
    ours, own_base = result_for(report, workload, "pgrouter"), result_for(report, base, "pgrouter")
    if ours is None or own_base is None or not ours.cpu_us_per_txn or not own_base.cpu_us_per_txn:
        return Check(name, "N/A", f"needs {workload} and {base} measured on pgrouter")
    value = ours.cpu_us_per_txn / own_base.cpu_us_per_txn
    status = "PASS" if value <= limit else "MISS"
    return Check(name, status, f"{workload}/{base} = {value:.2f}x")


def classifier_check(report: Report) -> Check:
    name = "classifier: a cache hit costs <= 1 µs"
    c = report.classifier
    if c is None:
        return Check(name, "N/A", "needs the classifier run")
    status = "PASS" if c.hit_exact_ns <= 1000 else "MISS"
    detail = (
        f"exact text {c.hit_exact_ns / 1000:.2f} µs, numbers normalised "
        f"{c.hit_normalized_ns / 1000:.2f} µs; a miss {c.miss_pgbench_us:.0f} µs (pgbench) / "
        f"{c.miss_varied_us:.0f} µs (varied)"
    )
    return Check(name, status, detail)


ROUTED_COMPARE = ("routing-on", "routing-off")
SCRAPED_COMPARE = ("scraped", "pgrouter")


def compute_checks(report: Report) -> None:
    select_c100 = check(
        report,
        "select-c100: pgrouter CPU µs/txn <= 1.3x PgBouncer's",
        "select-c100",
        "cpu",
        lambda v: v <= 1.3,
    )
    floor = report.ratios.get("floor-select-c100", {}).get(ratio_key("cpu", FLOOR_COMPARE))
    if floor is not None:  # what no Python proxy gets below on this machine
        select_c100.detail += f" (bench/floor.py: floor/pgbouncer = {floor:.2f}x)"
    report.checks = [
        own_ratio_check(
            report,
            "select-prepared-c100: pgrouter CPU µs/txn <= 1.3x its own with -M simple",
            "select-prepared-c100",
            "select-c100",
            1.3,
        ),
        select_c100,
        check(
            report,
            "select-connect: pgrouter tps >= PgBouncer's",
            "select-connect",
            "tps",
            lambda v: v >= 1.0,
        ),
        check(
            report,
            "routed-select-c100: pgrouter CPU µs/txn with routing on <= 1.1x off",
            "routed-select-c100",
            "cpu",
            lambda v: v <= 1.1,
            ROUTED_COMPARE,
        ),
        classifier_check(report),
        check(
            report,
            "scraped-select-c100: CPU µs/txn with /metrics scraped every second <= 1.05x",
            "scraped-select-c100",
            "cpu",
            lambda v: v <= 1.05,
            SCRAPED_COMPARE,
        ),
        check(
            report,
            "scram-connect: pgrouter tps >= PgBouncer's (SCRAM client auth)",
            "scram-connect",
            "tps",
            lambda v: v >= 1.0,
        ),
    ]


@dataclass(frozen=True)
class Row:
    """One metric row of a workload table; ``ratio`` names the ratio metric shown (tps, cpu).
    Rows marked ``optional`` are shown only when some column has a value."""

    label: str
    value: Callable[[RunResult], float | None]
    spec: str
    ratio: str | None = None
    optional: bool = False


ROWS = (
    Row("tps", lambda r: r.tps, ".1f", "tps"),
    Row("proxy CPU µs/txn", lambda r: r.cpu_us_per_txn, ".1f", "cpu"),
    Row("latency ms", lambda r: r.latency_ms, ".3f"),
    Row("peak RSS MB", lambda r: r.peak_rss_kb / 1024 if r.peak_rss_kb else None, ".1f"),
    Row(
        "reads on replicas",
        lambda r: None if r.replica_share is None else 100 * r.replica_share,
        ".0f",
        optional=True,
    ),
    Row("/metrics GETs", lambda r: r.scrapes, "d", optional=True),
    Row("GET mean ms", lambda r: r.scrape_ms, ".1f", optional=True),
)


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def cell(result: RunResult | None, row: Row) -> str:
    if result is None:
        return "skipped"
    return "ERROR" if result.error else fmt(row.value(result), row.spec)


def first_line(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def workload_table(
    report: Report, workload: Workload, targets: Sequence[str], duration: int
) -> str:
    """One table: the workload's columns, metrics as rows, then the ratio of its two compared
    columns (pgrouter/pgbouncer for the standard ones)."""
    names = [c.name for c in selected_columns(workload, targets)]
    results = [result_for(report, workload.name, n) for n in names]
    ratios = report.ratios.get(workload.name)
    header = f"{'':<18}" + "".join(f"{n:>12}" for n in names)
    lines = [f"== {workload.name}: {workload.description}, {duration} s ==", header]
    if ratios is not None:
        lines[1] += f"{'/'.join(workload.compare):>24}"
    for row in ROWS:
        if row.optional and all(r is None or r.error or row.value(r) is None for r in results):
            continue
        line = f"{row.label:<18}" + "".join(f"{cell(r, row):>12}" for r in results)
        if ratios is not None and row.ratio:
            value = ratios.get(ratio_key(row.ratio, workload.compare))
            line += f"{fmt(value, '.2f', 'x'):>24}"
        lines.append(line)
    kinds = sorted({r.tps_kind for r in results if r and r.tps_kind})
    if kinds:
        lines.append(f"(tps {', '.join(kinds)})")
    lines += [f"  {r.target}: {first_line(r.error)}" for r in results if r and r.error]
    return "\n".join(lines)


def print_report(
    report: Report, workloads: Sequence[Workload], targets: Sequence[str], duration: int
) -> None:
    print()
    for w in workloads:
        print(workload_table(report, w, targets, duration))
        print()
    if report.classifier is not None:
        print(classifier_table(report.classifier))
        print()
    if report.idle_cpu_ms_per_s:
        idle = ", ".join(f"{k} {v:.2f}" for k, v in report.idle_cpu_ms_per_s.items())
        print(f"Idle CPU, ms per second (included in every CPU figure): {idle}")
        for name, ms in report.scrape_cpu_ms.items():
            print(f"One /metrics GET costs {name} {ms:.2f} ms of CPU (measured at rest)")
        print()
    print("Targets:")
    for c in report.checks:
        print(f"  {c.status:<5} {c.name} ({c.detail})")
    for note in report.notes:
        print(f"Note: {note}")


def write_report(report: Report, results_dir: Path) -> Path:
    """Write latest.json plus a timestamped copy; return the timestamped path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(report), indent=2) + "\n"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stamped = results_dir / f"bench-{stamp}.json"
    stamped.write_text(text)
    (results_dir / "latest.json").write_text(text)
    return stamped


# --------------------------------------------------------------------------- main flow


class Endpoints:
    """The processes pgbench runs against. Each is started when a workload first needs it
    (then warmed up) and stopped after the last workload that needs it, so an idle proxy
    never loads the machine while another is measured."""

    def __init__(
        self,
        args: argparse.Namespace,
        cluster: LocalCluster,
        direct: Endpoint,
        workdir: Path,
        report: Report,
        workloads: Sequence[Workload],
    ) -> None:
        self.args, self.cluster, self.workdir, self.report = args, cluster, workdir, report
        self.workloads = workloads
        self.running: dict[str, Endpoint] = {"direct": direct}
        self.errors: dict[str, str] = {}  # endpoint -> why it did not start
        self._stacks: dict[str, contextlib.ExitStack] = {}
        self._pgbouncer: str | None = None
        self._pgbouncer_looked = False

    def get(self, name: str) -> Endpoint | None:
        """The running endpoint, started now if needed; None if skipped or failed."""
        if name in self.running or name in self.errors:
            return self.running.get(name)
        starter = self._starter(name)
        if starter is None:
            return None
        stack = contextlib.ExitStack()
        try:
            endpoint = stack.enter_context(starter())
        except TargetError as exc:
            stack.close()
            self.errors[name] = str(exc)
            self.report.notes.append(f"{name} did not start: {exc}")
            return None
        self._stacks[name] = stack
        self.running[name] = endpoint
        self._warm_up(endpoint)
        self._idle_cpu(endpoint)
        return endpoint

    def done_with(self, index: int) -> None:
        """Stop the processes no workload after `workloads[index]` uses."""
        later = {c.endpoint for w in self.workloads[index + 1 :] for c in w.columns}
        for name in [n for n in self._stacks if n not in later]:
            log(f"stopping {name}")
            self._stacks.pop(name).close()
            del self.running[name]

    def close(self) -> None:
        for stack in self._stacks.values():
            stack.close()
        self._stacks.clear()

    def _starter(
        self, name: str
    ) -> Callable[[], contextlib.AbstractContextManager[Endpoint]] | None:
        """How to start one proxy, or None when it is skipped (a note says why)."""
        args, cluster = self.args, self.cluster
        if name == "floor":
            return lambda: run_floor(cluster, self.workdir)
        if ENDPOINT_KINDS[name] == "pgrouter":
            return lambda: run_pgrouter(name, cluster, args, self.workdir)
        if not self._pgbouncer_looked:
            self._pgbouncer_looked = True
            self._pgbouncer = find_pgbouncer(not args.no_install, self.report.notes)
            if self._pgbouncer is not None:
                self.report.machine["pgbouncer"] = command_output([self._pgbouncer, "--version"])
        binary = self._pgbouncer
        if binary is None:
            return None
        return lambda: run_pgbouncer(name, binary, cluster, args)

    def _idle_cpu(self, endpoint: Endpoint) -> None:
        """The process's own background work (health checks, timers), which every run's CPU
        figure includes: it matters where transactions are few, as with SCRAM connects."""
        assert endpoint.proc is not None
        before, start = run_time_ns(endpoint.proc.pid), time.monotonic()
        time.sleep(IDLE_S)
        spent_ms = (run_time_ns(endpoint.proc.pid) - before) / 1e6
        self.report.idle_cpu_ms_per_s[endpoint.name] = spent_ms / (time.monotonic() - start)
        if endpoint.metrics_url is not None and endpoint.name == "pgrouter":
            self._scrape_cost(endpoint)

    def _scrape_cost(self, endpoint: Endpoint) -> None:
        """What one /metrics GET costs the proxy, measured at rest (no pgbench noise): the
        scraped run's CPU difference should be about this much per second."""
        assert endpoint.proc is not None and endpoint.metrics_url is not None
        before, start = run_time_ns(endpoint.proc.pid), time.monotonic()
        with contextlib.suppress(OSError):
            for _ in range(SCRAPE_COST_GETS):
                get_metrics(endpoint.metrics_url)
            idle_ms = self.report.idle_cpu_ms_per_s[endpoint.name] * (time.monotonic() - start)
            spent_ms = (run_time_ns(endpoint.proc.pid) - before) / 1e6 - idle_ms
            self.report.scrape_cpu_ms[endpoint.name] = spent_ms / SCRAPE_COST_GETS

    def _warm_up(self, endpoint: Endpoint) -> None:
        """A short select-only run per database and user the endpoint will serve: fills
        pools and caches before measuring; a routed database until it routes to replicas."""
        seconds = self.args.warmup
        if seconds <= 0:
            return
        columns = {
            (c.dbname, c.user): c
            for w in self.workloads
            for c in w.columns
            if c.endpoint == endpoint.name
        }
        warm = ["-n", "-S", "-c", "10", "-j", "2", "-T", str(seconds)]
        for (dbname, user), column in columns.items():
            with contextlib.suppress(TargetError):
                pgbench(self.args.bindir, endpoint, warm, 60, dbname=dbname, user=user)
            if column.dbname == ROUTING_ON_DB:
                self._wait_for_replica_reads(endpoint, column)

    def _wait_for_replica_reads(self, endpoint: Endpoint, column: Column) -> None:
        """The replicas take reads once pgrouter's health checks have seen them."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(TargetError):
                if (routes(endpoint, column) or {}).get("replica"):
                    return
                pgbench(
                    self.args.bindir,
                    endpoint,
                    ["-n", "-S", "-c", "2", "-T", "1"],
                    60,
                    dbname=column.dbname,
                    user=column.user,
                )
        self.report.notes.append(f"{endpoint.name}: no read went to a replica during warm-up")


def selected_columns(workload: Workload, targets: Sequence[str]) -> list[Column]:
    """The workload's columns whose process kind is among --targets."""
    return [c for c in workload.columns if ENDPOINT_KINDS[c.endpoint] in targets]


def run_workloads(
    args: argparse.Namespace,
    cluster: LocalCluster,
    workloads: Sequence[Workload],
    endpoints: Endpoints,
    report: Report,
) -> None:
    for index, workload in enumerate(workloads):
        columns = selected_columns(workload, args.targets)
        parts: dict[str, list[tuple[RunResult, int]]] = {c.name: [] for c in columns}
        for column, duration in schedule(workload, columns, args.duration):
            endpoint = endpoints.get(column.endpoint)
            if column.endpoint in endpoints.errors:
                error = RunResult(workload.name, column.name, error="did not start")
                parts[column.name].append((error, duration))
                continue
            if endpoint is None:
                continue
            if workload.writes:
                prepare_writes(cluster)
            log(f"{workload.name} -> {column.name} ({duration} s)")
            try:
                result = measure(args.bindir, endpoint, workload, column, duration)
            except TargetError as exc:
                result = RunResult(workload.name, column.name, error=str(exc))
                log(f"{workload.name} -> {column.name}: {exc}")
            parts[column.name].append((result, duration))
        report.results += [merge(p) for p in parts.values() if p]
        endpoints.done_with(index)


def schedule(
    workload: Workload, columns: Sequence[Column], duration: int
) -> list[tuple[Column, int]]:
    """The runs of a workload in order. A self-comparison (its two columns are the same
    pgrouter) runs A B B A, each for half the time: a load that drifts during the run, as on a
    shared machine, then weighs on both columns alike."""
    if not workload.interleave or len(columns) != 2 or duration < 2:
        return [(c, duration) for c in columns]
    first, second = duration // 2, duration - duration // 2
    a, b = columns
    return [(a, first), (b, first), (b, second), (a, second)]


def merge(parts: Sequence[tuple[RunResult, int]]) -> RunResult:
    """One column's result from its runs (one, or two when interleaved); times weighted by
    duration, per-transaction figures by transactions."""
    if len(parts) == 1 or any(r.error for r, _ in parts):
        return next((r for r, _ in parts if r.error), parts[0][0])
    runs = [r for r, _ in parts]
    merged = RunResult(runs[0].workload, runs[0].target, tps_kind=runs[0].tps_kind)
    txns = [r.transactions or 0 for r in runs]
    merged.transactions, merged.failed = sum(txns), sum(r.failed or 0 for r in runs)
    merged.tps = sum((r.tps or 0.0) * d for r, d in parts) / sum(d for _, d in parts)

    def by_txn(values: list[float | None]) -> float | None:
        if any(v is None for v in values) or not merged.transactions:
            return None
        return sum(v * n for v, n in zip(values, txns, strict=True) if v is not None) / sum(txns)

    merged.latency_ms = by_txn([r.latency_ms for r in runs])
    merged.replica_share = by_txn([r.replica_share for r in runs])
    if all(r.proxy_cpu_s is not None for r in runs):
        merged.proxy_cpu_s = sum(r.proxy_cpu_s or 0.0 for r in runs)
        if merged.transactions:
            merged.cpu_us_per_txn = merged.proxy_cpu_s * 1e6 / merged.transactions
    rss = [r.peak_rss_kb for r in runs if r.peak_rss_kb is not None]
    merged.peak_rss_kb = max(rss) if rss else None
    if all(r.scrapes is not None for r in runs):
        merged.scrapes = sum(r.scrapes or 0 for r in runs)
        ms = sum((r.scrape_ms or 0.0) * (r.scrapes or 0) for r in runs)
        merged.scrape_ms = ms / merged.scrapes if merged.scrapes else None
    merged.runs = len(runs)
    return merged


def replicas_needed(args: argparse.Namespace, workloads: Sequence[Workload]) -> int:
    """--replicas, or the routed run's 2 when it is selected."""
    routed = any(
        c.endpoint == "pgrouter-routed"
        for w in workloads
        for c in selected_columns(w, args.targets)
    )
    return max(args.replicas, ROUTED_REPLICAS if routed else 0)


def run(args: argparse.Namespace, workloads: Sequence[Workload]) -> Report:
    """Start everything, measure every (workload, column) and return the report."""
    report = Report(started=now_iso(), options=options_dict(args))
    report.workloads = [
        {
            "name": w.name,
            "pgbench_args": list(w.args),
            "columns": [c.name for c in selected_columns(w, args.targets)],
            "compare": list(w.compare),
        }
        for w in workloads
    ]
    if args.classifier:
        log("classifier micro-benchmark")
        report.classifier = run_classifier_bench()
    if not workloads:
        report.finished = now_iso()
        compute_checks(report)
        return report
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgrouter-bench-")))
        replicas = replicas_needed(args, workloads)
        log(f"starting PostgreSQL (replicas={replicas})")
        cluster = LocalCluster(replicas=replicas, settings=CLUSTER_SETTINGS)
        stack.enter_context(cluster)
        direct = prepare_cluster(cluster, args.bindir, args.scale)
        args.scram_verifier = create_scram_user(cluster)
        report.machine = machine_info(cluster, args.bindir)
        if cluster.replicas and args.replicas and "pgbouncer" in args.targets:
            report.notes.append(
                "PgBouncer has no replica routing: it sends everything to the primary"
            )
        endpoints = Endpoints(args, cluster, direct, workdir, report, workloads)
        stack.callback(endpoints.close)
        run_workloads(args, cluster, workloads, endpoints, report)
        log("stopping proxies and PostgreSQL")
    compute_ratios(report, workloads)
    compute_checks(report)
    report.finished = now_iso()
    return report


def options_dict(args: argparse.Namespace) -> dict[str, Any]:
    return {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if k != "scram_verifier"  # a secret, even a throwaway one
    }


def csv_choice(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type for a comma-separated subset of ``allowed`` (order kept)."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(allowed)}"
            )
        return names

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    parser.add_argument("--quick", action="store_true", help="3 s per run")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    parser.add_argument("--replicas", type=int, default=0, help="streaming replicas (default 0)")
    parser.add_argument("--pool-size", type=int, default=20, help="proxy pool size (default 20)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="warm-up seconds per target (0: none)"
    )
    parser.add_argument(
        "--only",
        type=csv_choice([*(w.name for w in WORKLOADS), CLASSIFIER]),
        default=[*(w.name for w in WORKLOADS if w.default), CLASSIFIER],
        help="comma-separated workloads, and 'classifier' for the classifier's "
        "micro-benchmark (default: all but the *-c10 routed and scraped variants)",
    )
    parser.add_argument(
        "--all", action="store_true", help="every workload, the non-default variants too"
    )
    parser.add_argument(
        "--targets",
        type=csv_choice(TARGETS),
        default=list(TARGETS),
        help="comma-separated targets (default: direct,pgrouter,pgbouncer)",
    )
    parser.add_argument("--no-install", action="store_true", help="never apt-get install pgbouncer")
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="JSON output directory"
    )
    args = parser.parse_args(argv)
    if args.all:
        args.only = [*(w.name for w in WORKLOADS), CLASSIFIER]
    args.classifier = CLASSIFIER in args.only
    if args.quick:
        args.duration = 3
    if args.duration < 1 or args.scale < 1 or args.pool_size < 1 or args.replicas < 0:
        parser.error("--duration, --scale and --pool-size must be >= 1, --replicas >= 0")
    return args


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when every run was measured (targets met or missed), 1 when some run failed
    or a target did not start, 2 when the harness itself broke, 130 on interruption."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    workloads = [w for w in WORKLOADS if w.name in args.only]
    try:
        args.bindir = find_pg_bindir()
        report = run(args, workloads)
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        return 130
    except (HarnessError, ClusterError) as exc:
        log(f"harness error: {exc}")
        return 2
    except Exception:
        log("harness error:\n" + traceback.format_exc())
        return 2
    print_report(report, workloads, args.targets, args.duration)
    path = write_report(report, args.results_dir)
    print(f"\nResults: {args.results_dir / 'latest.json'} (copy: {path.name})")
    # A comparison target failing (PgBouncer cannot run -M prepared in transaction mode) is a
    # figure of the report; only pgrouter or the cluster failing makes the run fail.
    return (
        1
        if any(r.error and r.target not in ("pgbouncer", "pgbouncer-scram") for r in report.results)
        else 0
    )


if __name__ == "__main__":
    sys.exit(main())
