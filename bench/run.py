"""pgbench comparison of direct PostgreSQL, pgrouter and PgBouncer, side by side, in one run.

Usage: ``.venv/bin/python bench/run.py [--quick] [--only select-c100] [--targets ...]``.
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

BENCH_USER = "bench"
BENCH_PASSWORD = "bench-secret"
BENCH_DB = "bench"
PGBOUNCER_OS_USER = "postgres"
HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
TARGETS = ("direct", "pgrouter", "pgbouncer")
PROXIES = ("pgrouter", "pgbouncer")
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT_S = 20.0
# On top of LocalCluster's own settings (max_connections 400, fsync off): shared_buffers large
# enough to hold the scale-10 data set once prewarmed, so no target pays for cold reads.
CLUSTER_SETTINGS = {"shared_buffers": "512MB"}


class HarnessError(RuntimeError):
    """The benchmark harness itself could not run (cluster, pgbench init, ...)."""


class TargetError(RuntimeError):
    """One target could not be started or measured; the others still run."""


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Workload:
    """One pgbench invocation, run for the same duration against every target."""

    name: str
    args: tuple[str, ...]
    writes: bool = False  # vacuum + truncate history before each run, as pgbench itself would

    @property
    def description(self) -> str:
        return "pgbench " + " ".join(self.args or ("(TPC-B-like)",))


WORKLOADS = (
    Workload("select-c10", ("-S", "-c", "10", "-j", "2")),
    Workload("select-c100", ("-S", "-c", "100", "-j", "2")),
    Workload("select-prepared-c100", ("-S", "-M", "prepared", "-c", "100", "-j", "2")),
    Workload("select-connect", ("-S", "-C", "-c", "10", "-j", "2")),
    Workload("tpcb-c10", ("-c", "10", "-j", "2"), writes=True),
)


@dataclass
class Endpoint:
    """Where pgbench connects, and the proxy process to meter (None for direct)."""

    name: str
    host: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None


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


def pgrouter_config(port: int, cluster: LocalCluster, pool_size: int) -> dict[str, Any]:
    """Topology for pgrouter: the bench database on the cluster, md5, transaction pooling."""
    database: dict[str, Any] = {"primary": f"{cluster.primary.host}:{cluster.primary.port}"}
    if cluster.replicas:
        database["replicas"] = [f"{r.host}:{r.port}" for r in cluster.replicas]
    return {
        "listen": f"{HOST}:{port}",
        "pool_mode": "transaction",
        "pool_size": pool_size,
        "auth_type": "md5",
        "users": {BENCH_USER: {"password": BENCH_PASSWORD}},
        "databases": {BENCH_DB: database},
        "log": {"connections": False},  # as PgBouncer runs here (log_connections = 0)
    }


@contextlib.contextmanager
def run_pgrouter(cluster: LocalCluster, pool_size: int, workdir: Path) -> Iterator[Endpoint]:
    port = free_port()
    config = workdir / "pgrouter.yaml"
    config.write_text(yaml.safe_dump(pgrouter_config(port, cluster, pool_size), sort_keys=False))
    cmd = [sys.executable, "-m", "router", "--config", str(config)]
    log(f"starting pgrouter on port {port}")
    with spawned("pgrouter", cmd, port, workdir / "pgrouter.log", cwd=REPO) as endpoint:
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


def pgbouncer_ini(port: int, cluster: LocalCluster, pool_size: int, auth_file: Path) -> str:
    """pgbouncer.ini matching pgrouter's settings (same pool size, mode and auth)."""
    primary = cluster.primary
    return f"""\
[databases]
{BENCH_DB} = host={primary.host} port={primary.port} dbname={BENCH_DB}

[pgbouncer]
listen_addr = {HOST}
listen_port = {port}
unix_socket_dir =
auth_type = md5
auth_file = {auth_file}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 1000
log_connections = 0
log_disconnections = 0
"""


def md5_auth_line(user: str, password: str) -> str:
    digest = hashlib.md5((password + user).encode()).hexdigest()
    return f'"{user}" "md5{digest}"\n'


def pgbouncer_run_as() -> dict[str, Any]:
    """Popen arguments that drop root (PgBouncer refuses to run as root)."""
    if os.geteuid() != 0:
        return {}
    return {"user": PGBOUNCER_OS_USER, "group": PGBOUNCER_OS_USER, "extra_groups": []}


@contextlib.contextmanager
def run_pgbouncer(binary: str, cluster: LocalCluster, pool_size: int) -> Iterator[Endpoint]:
    """Run PgBouncer from its own temp dir, owned by the OS user it runs as."""
    workdir = Path(tempfile.mkdtemp(prefix="pgrouter-bench-pgbouncer-"))
    try:
        port = free_port()
        auth_file = workdir / "userlist.txt"
        ini = workdir / "pgbouncer.ini"
        auth_file.write_text(md5_auth_line(BENCH_USER, BENCH_PASSWORD))
        ini.write_text(pgbouncer_ini(port, cluster, pool_size, auth_file))
        run_as = pgbouncer_run_as()
        if run_as:
            for path in (workdir, auth_file, ini):
                shutil.chown(path, run_as["user"], run_as["group"])
        log(f"starting pgbouncer on port {port}")
        with spawned(
            "pgbouncer", [binary, str(ini)], port, workdir / "pgbouncer.log", **run_as
        ) as ep:
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


def pgbench(bindir: Path, endpoint: Endpoint, args: Sequence[str], timeout: float) -> str:
    """Run pgbench against ``endpoint`` and return its stdout (raises TargetError on failure)."""
    cmd = [str(bindir / "pgbench"), "-h", endpoint.host, "-p", str(endpoint.port)]
    cmd += ["-U", BENCH_USER, *args, BENCH_DB]
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


def measure(bindir: Path, endpoint: Endpoint, workload: Workload, duration: int) -> RunResult:
    """One pgbench run against one target, metering the proxy's CPU around it."""
    result = RunResult(workload.name, endpoint.name)
    pid = endpoint.proc.pid if endpoint.proc else None
    if endpoint.proc is not None and endpoint.proc.poll() is not None:
        raise TargetError(f"{endpoint.name} is no longer running:\n{tail(endpoint.log)}")
    cpu_before = cpu_seconds(pid) if pid else 0.0
    args = ["-n", "-T", str(duration), *workload.args]
    output = pgbench(bindir, endpoint, args, timeout=duration + 120)
    parsed = parse_pgbench(output)
    result.tps, result.tps_kind = parsed.tps, parsed.tps_kind
    result.transactions, result.failed = parsed.transactions, parsed.failed
    result.latency_ms = parsed.latency_ms
    if pid:
        result.proxy_cpu_s = cpu_seconds(pid) - cpu_before
        if parsed.transactions:
            result.cpu_us_per_txn = result.proxy_cpu_s * 1e6 / parsed.transactions
        result.peak_rss_kb = peak_rss_kb(pid)
    return result


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


def compute_ratios(report: Report, workloads: Sequence[Workload]) -> None:
    for w in workloads:
        ours, theirs = (
            result_for(report, w.name, "pgrouter"),
            result_for(report, w.name, "pgbouncer"),
        )
        if ours is None or theirs is None:
            continue
        report.ratios[w.name] = {
            "tps_pgrouter_over_pgbouncer": ratio(ours.tps, theirs.tps),
            "cpu_pgrouter_over_pgbouncer": ratio(ours.cpu_us_per_txn, theirs.cpu_us_per_txn),
        }


def check(
    report: Report, name: str, workload: str, metric: str, passes: Callable[[float], bool]
) -> Check:
    """A target on ``ratios[workload][metric]``; N/A when it was not measured."""
    value = report.ratios.get(workload, {}).get(metric)
    if value is None:
        return Check(name, "N/A", f"needs {workload} measured on pgrouter and pgbouncer")
    return Check(name, "PASS" if passes(value) else "MISS", f"pgrouter/pgbouncer = {value:.2f}x")


def own_ratio_check(report: Report, name: str, workload: str, base: str, limit: float) -> Check:
    """pgrouter's CPU per transaction on `workload` against its own on `base`."""
    ours, own_base = result_for(report, workload, "pgrouter"), result_for(report, base, "pgrouter")
    if ours is None or own_base is None or not ours.cpu_us_per_txn or not own_base.cpu_us_per_txn:
        return Check(name, "N/A", f"needs {workload} and {base} measured on pgrouter")
    value = ours.cpu_us_per_txn / own_base.cpu_us_per_txn
    status = "PASS" if value <= limit else "MISS"
    return Check(name, status, f"{workload}/{base} = {value:.2f}x")


def compute_checks(report: Report) -> None:
    report.checks = [
        own_ratio_check(
            report,
            "select-prepared-c100: pgrouter CPU µs/txn <= 1.3x its own with -M simple",
            "select-prepared-c100",
            "select-c100",
            1.3,
        ),
        check(
            report,
            "select-c100: pgrouter CPU µs/txn <= 1.3x PgBouncer's",
            "select-c100",
            "cpu_pgrouter_over_pgbouncer",
            lambda v: v <= 1.3,
        ),
        check(
            report,
            "select-connect: pgrouter tps >= PgBouncer's",
            "select-connect",
            "tps_pgrouter_over_pgbouncer",
            lambda v: v >= 1.0,
        ),
    ]


@dataclass(frozen=True)
class Row:
    """One metric row of a workload table; ``ratio`` names the pgrouter/pgbouncer ratio shown."""

    label: str
    value: Callable[[RunResult], float | None]
    spec: str
    ratio: str | None = None


ROWS = (
    Row("tps", lambda r: r.tps, ".1f", "tps_pgrouter_over_pgbouncer"),
    Row("proxy CPU µs/txn", lambda r: r.cpu_us_per_txn, ".1f", "cpu_pgrouter_over_pgbouncer"),
    Row("latency ms", lambda r: r.latency_ms, ".3f"),
    Row("peak RSS MB", lambda r: r.peak_rss_kb / 1024 if r.peak_rss_kb else None, ".1f"),
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
    """One table: targets as columns, metrics as rows, then the pgrouter/pgbouncer ratio."""
    results = [result_for(report, workload.name, t) for t in targets]
    ratios = report.ratios.get(workload.name)
    header = f"{'':<18}" + "".join(f"{t:>12}" for t in targets)
    lines = [f"== {workload.name}: {workload.description}, {duration} s ==", header]
    if ratios is not None:
        lines[1] += f"{'pgrouter/pgbouncer':>20}"
    for row in ROWS:
        line = f"{row.label:<18}" + "".join(f"{cell(r, row):>12}" for r in results)
        if ratios is not None and row.ratio:
            line += f"{fmt(ratios.get(row.ratio), '.2f', 'x'):>20}"
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


def proxy_starter(
    target: str, args: argparse.Namespace, cluster: LocalCluster, workdir: Path, report: Report
) -> Callable[[], contextlib.AbstractContextManager[Endpoint]] | None:
    """How to start one proxy target, or None when it is skipped (a note says why)."""
    if target == "pgrouter":
        return lambda: run_pgrouter(cluster, args.pool_size, workdir)
    binary = find_pgbouncer(not args.no_install, report.notes)
    if binary is None:
        return None
    report.machine["pgbouncer"] = command_output([binary, "--version"])
    return lambda: run_pgbouncer(binary, cluster, args.pool_size)


def start_targets(
    stack: contextlib.ExitStack,
    args: argparse.Namespace,
    cluster: LocalCluster,
    direct: Endpoint,
    workdir: Path,
    report: Report,
) -> tuple[dict[str, Endpoint], dict[str, str]]:
    """Start the requested proxies; return running endpoints and per-target start errors."""
    endpoints = {"direct": direct} if "direct" in args.targets else {}
    errors: dict[str, str] = {}
    for target in (t for t in args.targets if t in PROXIES):
        starter = proxy_starter(target, args, cluster, workdir, report)
        if starter is None:
            continue
        try:
            endpoints[target] = stack.enter_context(starter())
        except TargetError as exc:
            errors[target] = str(exc)
            report.notes.append(f"{target} did not start: {exc}")
    if cluster.replicas and "pgbouncer" in endpoints:
        report.notes.append("PgBouncer has no replica routing: it sends everything to the primary")
    return endpoints, errors


def warm_up(bindir: Path, endpoints: dict[str, Endpoint], seconds: int) -> None:
    """A short select-only run per target: fills pools and caches before measuring."""
    if seconds <= 0:
        return
    for endpoint in endpoints.values():
        with contextlib.suppress(TargetError):
            pgbench(bindir, endpoint, ["-n", "-S", "-c", "10", "-j", "2", "-T", str(seconds)], 60)


def run_workloads(
    args: argparse.Namespace,
    cluster: LocalCluster,
    workloads: Sequence[Workload],
    endpoints: dict[str, Endpoint],
    start_errors: dict[str, str],
    report: Report,
) -> None:
    for workload in workloads:
        for target in args.targets:
            if target in start_errors:
                report.results.append(RunResult(workload.name, target, error="did not start"))
                continue
            if target not in endpoints:
                continue
            if workload.writes:
                prepare_writes(cluster)
            log(f"{workload.name} -> {target} ({args.duration} s)")
            try:
                result = measure(args.bindir, endpoints[target], workload, args.duration)
            except TargetError as exc:
                result = RunResult(workload.name, target, error=str(exc))
                log(f"{workload.name} -> {target}: {exc}")
            report.results.append(result)


def run(args: argparse.Namespace, workloads: Sequence[Workload]) -> Report:
    """Start everything, measure every (workload, target) and return the report."""
    report = Report(started=now_iso(), options=options_dict(args))
    report.workloads = [{"name": w.name, "pgbench_args": list(w.args)} for w in workloads]
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgrouter-bench-")))
        log(f"starting PostgreSQL (replicas={args.replicas})")
        cluster = LocalCluster(replicas=args.replicas, settings=CLUSTER_SETTINGS)
        stack.enter_context(cluster)
        direct = prepare_cluster(cluster, args.bindir, args.scale)
        report.machine = machine_info(cluster, args.bindir)
        endpoints, start_errors = start_targets(stack, args, cluster, direct, workdir, report)
        warm_up(args.bindir, endpoints, args.warmup)
        run_workloads(args, cluster, workloads, endpoints, start_errors, report)
        log("stopping proxies and PostgreSQL")
    compute_ratios(report, workloads)
    compute_checks(report)
    report.finished = now_iso()
    return report


def options_dict(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


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
        type=csv_choice([w.name for w in WORKLOADS]),
        default=[w.name for w in WORKLOADS],
        help="comma-separated workloads (default: all)",
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
    return 1 if any(r.error for r in report.results) else 0


if __name__ == "__main__":
    sys.exit(main())
