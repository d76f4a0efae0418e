"""The machine's pgbouncer_exporter (Debian's prometheus-pgbouncer-exporter) pointed at pgrouter's
admin console, as an operator keeping PgBouncer's tooling would run it: it connects to the
virtual database "pgbouncer" with the password in PGPASSWORD, runs SHOW LISTS / STATS / POOLS /
DATABASES at every scrape and reads their columns by name, some under PgBouncer's pre-1.8 names
(`total_requests`, `reserve_pool`) that pgrouter appends after the current columns.

deploy/bootstrap.sh installs the package as root; without it this test fails and says so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import APP_PASSWORD, APP_USER, free_port, stop_process

ADMIN = {"admin": {"users": [APP_USER]}}
PACKAGE = "prometheus-pgbouncer-exporter"
EXPORTER_BIN = f"/usr/bin/{PACKAGE}"
# Settings the exporter also takes from the environment (configargparse); a stray CONFIG or
# PORT from the caller's shell must not change what the test runs.
EXPORTER_ENV = re.compile(r"^(CONFIG|PORT|HOST|PGBOUNCER_.*|LICENCE_LOCATION|PYTHON(PATH|HOME))$")
# What in the exporter's log means something went wrong (it logs at DEBUG level; a scrape
# that fails leaves a traceback).
LOG_ERROR = re.compile(r"Traceback|Error|Exception|^(ERROR|CRITICAL):", re.M)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def exporter_binary() -> str:
    found = EXPORTER_BIN if os.access(EXPORTER_BIN, os.X_OK) else shutil.which(PACKAGE)
    if not found:
        pytest.fail(
            f"{PACKAGE} is not installed: this test runs the machine's pgbouncer_exporter. "
            f"Install it: sudo apt-get install {PACKAGE} (deploy/bootstrap.sh does it as root).",
            pytrace=False,
        )
    return found


class Exporter:
    """The exporter as a subprocess serving /metrics on 127.0.0.1:`port`."""

    def __init__(self, binary: str, proxy: Any, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        env = {k: v for k, v in os.environ.items() if not EXPORTER_ENV.match(k)}
        env["PGPASSWORD"] = APP_PASSWORD  # libpq's; the exporter has no password option
        self.log_path = directory / "exporter.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, "--host", "127.0.0.1", "--port", str(self.port),
                 "--pgbouncer-host", proxy.host, "--pgbouncer-port", str(proxy.port),
                 "--pgbouncer-user", APP_USER],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape(self, timeout: float = 20.0) -> Samples:
        """The samples of one /metrics GET, waiting for the exporter to listen first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"{PACKAGE} exited ({self.proc.returncode}):\n{self.log_text()}",
                    pytrace=False,
                )
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    assert resp.status == 200
                    text = resp.read().decode()
                break
            except (urllib.error.URLError, ConnectionError) as exc:
                if time.monotonic() > deadline:
                    pytest.fail(f"no /metrics from {PACKAGE}: {exc}\n{self.log_text()}")
                time.sleep(0.1)
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def exporter_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Exporter] = []

    def factory(proxy: Any) -> Exporter:
        exporter = Exporter(exporter_binary(), proxy, tmp_path)
        started.append(exporter)
        return exporter

    yield factory
    for exporter in started:
        exporter.stop()


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported; got {sorted(n for n, _ in samples)}"
    return samples[key]


@pytest.mark.timeout(90)
def test_pgbouncer_exporter_scrapes_pgrouter(proxy_factory: Any, exporter_factory: Any) -> None:
    proxy = proxy_factory(ADMIN)
    queries = 5
    with psycopg.connect(proxy.dsn(), prepare_threshold=None, autocommit=True) as conn:
        for _ in range(queries):
            conn.execute("SELECT 1")

    exporter = exporter_factory(proxy)
    with psycopg.connect(proxy.dsn(), prepare_threshold=None) as busy:
        busy.execute("SELECT 1")  # a transaction stays open: one active client during the scrape
        first = exporter.scrape()
        busy.rollback()

    # SHOW STATS, one series per database (the pre-1.8 total_requests = total_query_count)
    requests = value(first, "pgbouncer_requests_total", database="appdb")
    assert requests >= queries + 1
    assert value(first, "pgbouncer_received_bytes_total", database="appdb") > 0
    assert value(first, "pgbouncer_sent_bytes_total", database="appdb") > 0
    assert value(first, "pgbouncer_query_microseconds_total", database="appdb") > 0
    assert value(first, "pgbouncer_requests_total", database="otherdb") == 0
    # SHOW POOLS, per database and user
    assert value(first, "pgbouncer_active_clients", database="appdb", user=APP_USER) >= 1
    assert value(first, "pgbouncer_waiting_clients", database="appdb", user=APP_USER) == 0
    # SHOW DATABASES, labelled with the server-side database name
    assert value(first, "pgbouncer_pool_size", database="appdb") > 0
    assert value(first, "pgbouncer_reserve_pool", database="appdb") == 0
    # SHOW LISTS
    assert value(first, "pgbouncer_databases") >= 2
    assert value(first, "pgbouncer_pools") >= 1
    assert value(first, "pgbouncer_used_clients") >= 1  # the exporter's own admin session

    # Its one admin connection keeps working: the next scrape sees the new queries.
    with psycopg.connect(proxy.dsn(), prepare_threshold=None, autocommit=True) as conn:
        for _ in range(queries):
            conn.execute("SELECT 1")
    second = exporter.scrape()
    assert value(second, "pgbouncer_requests_total", database="appdb") >= requests + queries
    assert value(second, "pgbouncer_active_clients", database="appdb", user=APP_USER) >= 0

    exporter.stop()
    log = exporter.log_text()
    assert "Listing on port" in log, log  # (sic) its startup line: the log is the right one
    assert not LOG_ERROR.search(log), log
