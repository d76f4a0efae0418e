"""The bench harness without a cluster: which runs a plain `make bench` selects, the topologies
it hands pgrouter (validated by pgrouter's own parser), the tables and checks it prints from
results, the classifier micro-benchmark and the /metrics scraper against a real HTTP server."""

from __future__ import annotations

import http.server
import importlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from router.cluster import scram_verifier
from router.config import parse_config

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("run")
    finally:
        sys.path.remove(str(BENCH))


def _node(port: int) -> SimpleNamespace:
    return SimpleNamespace(host="127.0.0.1", port=port)


CLUSTER = SimpleNamespace(primary=_node(5432), replicas=[_node(5433), _node(5434)])


def test_default_run_has_every_issue_run_but_the_c10_variants(bench: ModuleType) -> None:
    args = bench.parse_args([])
    assert "routed-select-c100" in args.only and "scraped-select-c100" in args.only
    assert "scram-connect" in args.only and args.classifier
    assert "workers-select-c100" in args.only and "workers-select-connect" not in args.only
    assert "routed-select-c10" not in args.only and "scraped-select-c10" not in args.only
    every = bench.parse_args(["--all"]).only
    assert {w.name for w in bench.WORKLOADS} | {"classifier"} == set(every)
    assert not bench.parse_args(["--only", "select-c10"]).classifier


def test_the_routed_run_brings_two_replicas_only_when_selected(bench: ModuleType) -> None:
    workloads = {w.name: w for w in bench.WORKLOADS}
    routed, plain = [workloads["routed-select-c100"]], [workloads["select-c100"]]
    assert bench.replicas_needed(bench.parse_args([]), routed) == 2
    assert bench.replicas_needed(bench.parse_args([]), plain) == 0
    assert bench.replicas_needed(bench.parse_args(["--targets", "pgbouncer"]), routed) == 0
    assert bench.replicas_needed(bench.parse_args(["--replicas", "3"]), routed) == 3


def _topology(bench: ModuleType, name: str, **args: Any) -> dict[str, Any]:
    options = SimpleNamespace(pool_size=20, replicas=0, scram_verifier=scram_verifier("x"))
    for key, value in args.items():
        setattr(options, key, value)
    topology: dict[str, Any] = bench.pgrouter_variant(name, CLUSTER, options, 6432, 9930)
    parse_config(yaml.safe_load(yaml.safe_dump(topology)), env={})  # raises if invalid
    return topology


def test_pgrouter_topologies_are_valid_and_differ_only_where_meant(bench: ModuleType) -> None:
    main = _topology(bench, "pgrouter")
    assert "replicas" not in main["databases"]["bench"]
    assert main["admin"]["http"] == "127.0.0.1:9930"
    assert _topology(bench, "pgrouter", replicas=1)["databases"]["bench"]["replicas"] == [
        "127.0.0.1:5433"
    ]
    routed = _topology(bench, "pgrouter-routed")["databases"]
    off, on = routed["bench_routing_off"], routed["bench_routing_on"]
    assert off["dbname"] == on["dbname"] == "bench"
    assert off["replicas"] == on["replicas"] == ["127.0.0.1:5433", "127.0.0.1:5434"]
    assert (off["routing"]["reads"], on["routing"]["reads"]) == ("primary", "replicas")
    workers = _topology(bench, "pgrouter-workers")
    assert workers["workers"] == 2 and workers["databases"] == main["databases"]
    assert "workers" not in main
    scram = _topology(bench, "pgrouter-scram")
    assert scram["auth_type"] == "scram-sha-256"
    assert scram["users"]["bench_scram"]["password"].startswith("SCRAM-SHA-256$4096:")


def test_pgbouncer_scram_configuration(bench: ModuleType, tmp_path: Path) -> None:
    ini = bench.pgbouncer_ini(6432, CLUSTER, 20, tmp_path / "users.txt", "scram-sha-256")
    assert "auth_type = scram-sha-256" in ini and "pool_mode = transaction" in ini
    verifier = scram_verifier("x")
    assert bench.auth_line("bench_scram", verifier) == f'"bench_scram" "{verifier}"\n'


def test_routed_table_and_check(bench: ModuleType) -> None:
    workload = next(w for w in bench.WORKLOADS if w.name == "routed-select-c100")
    report = bench.Report(started="now", options={})
    report.results = [
        bench.RunResult(workload.name, "routing-off", tps=1000.0, cpu_us_per_txn=20.0,
                        replica_share=0.0),
        bench.RunResult(workload.name, "routing-on", tps=900.0, cpu_us_per_txn=25.0,
                        replica_share=0.995),
    ]  # fmt: skip
    bench.compute_ratios(report, [workload])
    bench.compute_checks(report)
    table = bench.workload_table(report, workload, list(bench.TARGETS), 10)
    lines = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "routing-on/routing-off" in table.splitlines()[1]
    assert lines["proxy"].split()[-1] == "1.25x"
    assert lines["reads"].split()[-2:] == ["0", "100"]
    assert "/metrics" not in lines  # rows of the scraped run stay out
    routed = next(c for c in report.checks if c.name.startswith("routed-select-c100"))
    assert (routed.status, routed.detail) == ("MISS", "routing-on/routing-off = 1.25x")
    scraped = next(c for c in report.checks if c.name.startswith("scraped-select-c100"))
    assert scraped.status == "N/A"


def test_classifier_bench_measures_hits_below_misses() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        classifier = importlib.import_module("classifier")
    finally:
        sys.path.remove(str(BENCH))
    result = classifier.run_classifier_bench(calls=2000, repeats=2, miss_repeats=5)
    assert 0 < result.hit_exact_ns < result.miss_pgbench_us * 1000
    assert 0 < result.hit_normalized_ns < result.miss_varied_us * 1000
    assert set(result.miss_by_statement_us) >= set(classifier.PGBENCH_STATEMENTS)
    assert "cache hit, exact text" in classifier.classifier_table(result)


class _Routes:
    """A collector with pgrouter's routing counter, rendered by prometheus_client as
    pgrouter's /metrics renders it."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "pgrouter_routed_transactions", "by target", labels=["database", "target"]
        )
        family.add_metric(["bench_routing_on", "replica"], 7)
        family.add_metric(["bench_routing_on", "primary"], 1)
        family.add_metric(["other", "replica"], 9)
        yield family


class _Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Routes())
        body = generate_latest(registry)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def metrics_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


def test_scraper_and_route_counts(metrics_url: str) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        scrape = importlib.import_module("scrape")
    finally:
        sys.path.remove(str(BENCH))
    assert scrape.routed_transactions(metrics_url, "bench_routing_on") == {
        "replica": 7.0,
        "primary": 1.0,
    }
    scraper = scrape.Scraper(metrics_url, interval=0.05)
    scraper.start()
    threading.Event().wait(0.5)
    scraper.stop()
    assert scraper.scrapes >= 3 and scraper.failures == 0
    assert scraper.mean_ms is not None and scraper.mean_ms > 0


def test_self_comparisons_run_a_b_b_a_and_merge(bench: ModuleType) -> None:
    workload = next(w for w in bench.WORKLOADS if w.name == "scraped-select-c100")
    a, b = workload.columns
    order = bench.schedule(workload, workload.columns, 11)
    assert order == [(a, 5), (b, 5), (b, 6), (a, 6)]
    plain = next(w for w in bench.WORKLOADS if w.name == "select-c100")
    assert [d for _, d in bench.schedule(plain, plain.columns, 11)] == [11, 11, 11]

    def part(tps: float, txns: int, cpu_s: float, scrapes: int, ms: float) -> Any:
        return bench.RunResult(workload.name, "scraped", tps=tps, transactions=txns, failed=0,
                               latency_ms=1.0, proxy_cpu_s=cpu_s, peak_rss_kb=100,
                               scrapes=scrapes, scrape_ms=ms)  # fmt: skip

    merged = bench.merge(
        [(part(1000, 5000, 0.1, 5, 10.0), 5), (part(2000, 12000, 0.24, 6, 21.0), 6)]
    )
    assert merged.runs == 2 and merged.transactions == 17000
    assert merged.tps == pytest.approx((1000 * 5 + 2000 * 6) / 11)
    assert merged.cpu_us_per_txn == pytest.approx(0.34e6 / 17000)
    assert merged.scrapes == 11 and merged.scrape_ms == pytest.approx(16.0)
    failed = bench.RunResult(workload.name, "scraped", error="boom")
    assert bench.merge([(part(1, 1, 0.1, 1, 1.0), 5), (failed, 6)]) is failed


def test_the_select_c100_check_names_the_floor(bench: ModuleType) -> None:
    workloads = [w for w in bench.WORKLOADS if w.name in ("select-c100", "floor-select-c100")]
    report = bench.Report(started="now", options={})
    report.results = [
        bench.RunResult("select-c100", "pgrouter", tps=1000.0, cpu_us_per_txn=30.0),
        bench.RunResult("select-c100", "pgbouncer", tps=1500.0, cpu_us_per_txn=15.0),
        bench.RunResult("floor-select-c100", "floor", tps=1400.0, cpu_us_per_txn=18.0),
        bench.RunResult("floor-select-c100", "pgbouncer", tps=1500.0, cpu_us_per_txn=15.0),
    ]
    bench.compute_ratios(report, workloads)
    bench.compute_checks(report)
    (c100,) = [c for c in report.checks if c.name.startswith("select-c100")]
    assert c100.status == "MISS"
    assert c100.detail == "pgrouter/pgbouncer = 2.00x (bench/floor.py: floor/pgbouncer = 1.20x)"
    assert "floor-select-c100" in bench.parse_args([]).only


def test_the_floor_copies_bytes_both_ways(tmp_path: Path) -> None:
    """bench/floor.py in front of an echo server: what goes in comes back, in order."""
    echo = socket.create_server(("127.0.0.1", 0))
    echo_port = echo.getsockname()[1]

    def serve() -> None:
        conn, _ = echo.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    floor = subprocess.Popen(
        [sys.executable, str(BENCH / "floor.py"), str(port), "127.0.0.1", str(echo_port)]
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "floor.py did not listen"
                time.sleep(0.05)
        with client:
            sent = bytes(range(256)) * 400
            client.sendall(sent)
            received = b""
            while len(received) < len(sent):
                chunk = client.recv(65536)
                assert chunk, "the floor closed the connection"
                received += chunk
            assert received == sent
    finally:
        floor.terminate()
        floor.wait(10)
        echo.close()
