"""The Grafana dashboard against real data: a real Prometheus (the machine's `prometheus`
package) scrapes a running pgrouter under load, and every PromQL expression of
deploy/grafana/dashboards/pgrouter.json must parse and return data. The load covers every row:
reads routed to the replicas and writes on the primary, server errors, wrong passwords, a client
pinned by LISTEN and a prepared statement.

Also checks that the dashboard, its Grafana provisioning and deploy/prometheus/prometheus.yml
fit together (data source uid, dashboard path, scrape target).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.support import APP_USER, REPO_ROOT, free_port, stop_process, wait_replica_reads

DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "pgrouter.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "pgrouter.yaml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
PROMETHEUS_BIN = "/usr/bin/prometheus"

# Grafana's built-in interval variables, as Grafana would expand them for a 1 s scrape.
BUILTINS = {"__rate_interval": "10s", "__interval": "5s", "__range": "1m", "__range_s": "60"}
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")
LABEL_VALUES = re.compile(r"^\s*label_values\((.+),\s*(\w+)\s*\)\s*$", re.S)
LOAD_SECONDS = 5.0
MIN_SCRAPES = 5
# appdb sends reads to the replicas (the base topology keeps them on the primary), so the
# routing panels have data; otherdb stays on the primary.
ROUTED = {"databases": {"appdb": {"routing": {"reads": "replicas"}}}}
LISTEN_CHANNEL = "dashboard_test"
# The load's writes go to a real table: DDL in the load (a temp table) would hold appdb's reads
# on the primary until pgrouter has read the function catalog again.
TABLE = f"dash_load_{uuid.uuid4().hex[:8]}"
LOAD_DATABASES = ("appdb", "otherdb")


# ---- the dashboard JSON --------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def panel_targets(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every Prometheus query of the dashboard."""
    return [
        (panel.get("title", ""), target.get("refId", ""), target["expr"])
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def query_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """name -> label_values(...) query of each query-type template variable."""
    out = {}
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            out[var["name"]] = query.get("query", "") if isinstance(query, dict) else query
    return out


def expand(expr: str, variables: set[str]) -> str:
    """Substitute Grafana variables: built-in intervals, and template variables as "All"."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in BUILTINS:
            return BUILTINS[name]
        if name in variables:
            return ".*"  # the variables' allValue: every instance / database
        raise AssertionError(f"{expr!r}: unknown Grafana variable ${name}")

    return VARIABLE.sub(repl, expr)


def test_dashboard_json_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "pgrouter" and dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"

    templating = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert templating["DS_PROMETHEUS"]["type"] == "datasource"
    assert templating["DS_PROMETHEUS"]["query"] == "prometheus"
    # The provisioned data source is the variable's default.
    sources = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    provisioned = {s["uid"]: s for s in sources}
    default_uid = templating["DS_PROMETHEUS"]["current"]["value"]
    assert provisioned[default_uid]["type"] == "prometheus"
    assert provisioned[default_uid]["url"] == "http://prometheus:9090"
    allowed = {"${DS_PROMETHEUS}", default_uid}

    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        targets = panel.get("targets", [])
        if panel["type"] in ("row", "text"):
            assert not targets, panel["title"]
            continue
        assert targets, f"panel {panel['title']!r} has no queries"
        assert panel["datasource"]["uid"] in allowed, panel["title"]
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] in allowed, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for name, var in templating.items():
        if var["type"] == "query":
            assert var["datasource"]["uid"] in allowed, name

    providers = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == ["/var/lib/grafana/dashboards"]


def test_prometheus_config_scrapes_pgrouter() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["pgrouter"]
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert [t for sc in job["static_configs"] for t in sc["targets"]] == ["pgrouter:9930"]
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if os.access(promtool, os.X_OK):
        out = subprocess.run(
            [promtool, "check", "config", str(PROMETHEUS_YML)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr


# ---- a real Prometheus ---------------------------------------------------------------------


def prometheus_binary() -> str:
    """The machine's prometheus; as root, installed the way deploy/bootstrap.sh does it."""
    found = PROMETHEUS_BIN if os.access(PROMETHEUS_BIN, os.X_OK) else shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("prometheus is not installed (apt-get install prometheus) and we are not root")
    out = subprocess.run(
        ["bash", str(DEPLOY / "bootstrap.sh")], capture_output=True, text=True, timeout=600
    )
    found = PROMETHEUS_BIN if os.access(PROMETHEUS_BIN, os.X_OK) else shutil.which("prometheus")
    if not found:
        pytest.fail(
            f"prometheus is missing and deploy/bootstrap.sh did not install it "
            f"(exit {out.returncode}):\n{out.stdout}\n{out.stderr}",
            pytrace=False,
        )
    return found


def _get_json(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 400/422 carry the PromQL error as JSON
        body = exc.read()
        try:
            return json.loads(body)
        except ValueError:
            return {"status": "error", "error": f"HTTP {exc.code}: {body[:200]!r}"}


class Prometheus:
    def __init__(self, binary: str, scrape_port: int, directory: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "pgrouter",
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "static_configs": [{"targets": [f"127.0.0.1:{scrape_port}"]}],
                }
            ],
        }
        config_path = directory / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = directory / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={directory / 'prometheus-data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited:\n{self.log_text()}", pytrace=False)
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        pytest.fail(f"prometheus not ready within {timeout:.0f}s:\n{self.log_text()}")

    def query(self, expr: str) -> dict[str, Any]:
        return _get_json(self.base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))

    def scalar(self, expr: str) -> float:
        """The value of a single-series query, NaN when there is none."""
        answer = self.query(expr)
        result = answer.get("data", {}).get("result", [])
        if answer.get("status") != "success" or not result:
            return math.nan
        return float(result[0]["value"][1])

    def stop(self) -> None:
        stop_process(self.proc)


def connect(proxy: Any, dbname: str = "appdb") -> psycopg.Connection[Any]:
    return psycopg.connect(
        proxy.dsn(dbname), prepare_threshold=None, autocommit=True, connect_timeout=10
    )


def run_load(
    proxy: Any, dbname: str, writes: bool, stop: threading.Event, errors: list[str]
) -> None:
    """Autocommit SELECTs (on appdb: on a replica), now and then a short sleep (so clients wait
    for the small pool) and a division by zero (a server error, SQLSTATE class 22). A writer
    also inserts into TABLE (in one transaction: on the primary); its reads right after a write
    stay on the primary (read-your-writes), so appdb has readers that never write."""
    try:
        with connect(proxy, dbname) as conn:
            i = 0
            while not stop.is_set():
                i += 1
                conn.execute("SELECT %s::int + 1", (i,)).fetchone()
                if i % 5 == 0:
                    conn.execute("SELECT pg_sleep(0.005)")
                if i % 20 == 0:
                    try:
                        conn.execute("SELECT 1 / 0")
                    except psycopg.errors.DivisionByZero:
                        pass
                    else:
                        errors.append(f"{dbname}: SELECT 1 / 0 did not fail")
                if writes and i % 10 == 0:
                    with conn.transaction():
                        conn.execute(
                            f"INSERT INTO {TABLE} SELECT g, repeat('x', 100) "
                            "FROM generate_series(1, 50) g"
                        )
                        conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
    except Exception as exc:  # reported by the test, not lost in the thread
        errors.append(f"{dbname}: {exc!r}")


def churn_logins(proxy: Any, stop: threading.Event, errors: list[str]) -> None:
    """A connection per request (moves logins/s), and now and then a wrong password."""
    try:
        i = 0
        while not stop.wait(0.1):
            i += 1
            if i % 10 == 1:
                try:
                    psycopg.connect(proxy.dsn(password="wrong-password"), connect_timeout=10)
                except psycopg.OperationalError:
                    pass
                else:
                    errors.append("a wrong password was accepted")
                continue
            with psycopg.connect(proxy.dsn("otherdb"), connect_timeout=10) as conn:
                conn.execute("SELECT 1").fetchone()
    except Exception as exc:
        errors.append(f"logins: {exc!r}")


def check_result(answer: dict[str, Any]) -> str:
    """The problem with a query's answer: "" for success with at least one finite value."""
    if answer.get("status") != "success":
        return f"{answer.get('errorType', 'error')}: {answer.get('error', answer)}"
    data = answer["data"]
    if data["resultType"] in ("scalar", "string"):
        values = [data["result"][1]]
    else:
        values = [s["value"][1] for s in data["result"]]
    if not values:
        return "no series"
    if not any(math.isfinite(float(v)) for v in values):
        return f"no finite value: {values}"
    return ""


@pytest.mark.timeout(300)  # a first run as root may apt-get install prometheus
def test_every_dashboard_query_returns_data(proxy_factory: Any, tmp_path: Path) -> None:
    dashboard = load_dashboard()
    variables = query_variables(dashboard)
    targets = panel_targets(dashboard)
    assert targets
    binary = prometheus_binary()

    http_port = free_port()
    proxy = proxy_factory(
        {"admin": {"users": [APP_USER], "http": f"127.0.0.1:{http_port}"}, "pool_size": 2, **ROUTED}
    )
    prometheus = Prometheus(binary, http_port, tmp_path)
    listener: psycopg.Connection[Any] | None = None
    stop = threading.Event()
    errors: list[str] = []
    workers = [
        threading.Thread(target=run_load, args=(proxy, db, writes, stop, errors), daemon=True)
        for db, writes in (("appdb", False), ("appdb", False), ("appdb", True), ("otherdb", True))
    ]
    workers.append(threading.Thread(target=churn_logins, args=(proxy, stop, errors), daemon=True))
    try:
        for db in LOAD_DATABASES:
            with connect(proxy, db) as conn:
                conn.execute(f"CREATE TABLE {TABLE} (n int, s text)")
        wait_replica_reads(proxy)  # also: the catalog was read again after the CREATE
        prometheus.wait_ready()
        # A first scrape before the load, so that counters are seen to move.
        deadline = time.monotonic() + 15
        while prometheus.scalar('up{job="pgrouter"}') != 1:
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus did not scrape pgrouter:\n{prometheus.log_text()}")
            time.sleep(0.2)
        started = time.monotonic()
        # A client pinned to its server (LISTEN) until the end, and a prepared statement: the
        # session-state panels.
        listener = connect(proxy)
        listener.execute(f"LISTEN {LISTEN_CHANNEL}")
        listener.prepare_threshold = 0
        listener.execute("SELECT %s::int", (1,)).fetchone()
        for worker in workers:
            worker.start()

        # Keep the load running while the queries are evaluated, so rates are not zero.
        deadline = started + 30
        while True:
            scrapes = prometheus.scalar('count_over_time(up{job="pgrouter"}[1m])')
            up = prometheus.scalar('up{job="pgrouter"}')
            if time.monotonic() - started >= LOAD_SECONDS and scrapes >= MIN_SCRAPES and up == 1:
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"prometheus did not scrape pgrouter ({scrapes} scrapes, up={up}):\n"
                    f"{prometheus.log_text()}\n--- pgrouter:\n{proxy.log_text()}",
                    pytrace=False,
                )
            time.sleep(0.5)
        assert not errors, errors
        # The load reached every kind of panel: not only series, but moving ones.
        expected = {
            "sum(rate(pgrouter_auth_failures_total[10s]))": 0,
            'sum(rate(pgrouter_routed_transactions_total{target="replica"}[10s]))': 0,
            'sum(rate(pgrouter_routed_transactions_total{target="primary"}[10s]))': 0,
            'sum(rate(pgrouter_errors_total{source="server", class="22"}[10s]))': 0,
            'sum(pgrouter_pinned_clients{reason="listen"})': 0,
            'sum(increase(pgrouter_pins_total{reason="listen"}[1m]))': 0,
            "sum(pgrouter_prepared_statements)": 0,
            "min(pgrouter_backend_up)": 0,
            "count(pgrouter_backend_lag_bytes)": 1,
        }
        for expr, above in expected.items():
            value = prometheus.scalar(expr)
            assert value > above, f"{expr} = {value}, expected > {above}"

        names = set(variables)
        problems = []
        for name, query in variables.items():
            m = LABEL_VALUES.match(query)
            assert m, f"variable {name}: expected label_values(metric, label), got {query!r}"
            selector, label = m.group(1), m.group(2)
            answer = prometheus.query(expand(selector, names))
            if answer.get("status") != "success":
                problems.append(f"variable {name}: {query}: {answer.get('error')}")
            elif not any(label in s["metric"] for s in answer["data"]["result"]):
                problems.append(f"variable {name}: {query}: no series with label {label!r}")
        for title, ref, expr in targets:
            problem = check_result(prometheus.query(expand(expr, names)))
            if problem:
                problems.append(f"panel {title!r} query {ref}: {expr}\n    -> {problem}")
        assert not problems, "dashboard queries failing:\n" + "\n".join(problems)
    finally:
        stop.set()
        for worker in workers:
            if worker.is_alive():
                worker.join(timeout=10)
        if listener is not None:
            listener.close()
        prometheus.stop()
        for db in LOAD_DATABASES:
            with contextlib.suppress(psycopg.Error), connect(proxy, db) as conn:
                conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    assert not errors, errors
