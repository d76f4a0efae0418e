"""Reading pgrouter's /metrics from the bench: a Prometheus-like scraper running beside a
pgbench run, and the routing counters that show where a routed run's reads went."""

from __future__ import annotations

import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

TIMEOUT_S = 10.0


def get_metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
        return str(resp.read().decode())


def routed_transactions(url: str, database: str) -> dict[str, float]:
    """pgrouter_routed_transactions_total of `database` by target (replica, primary)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(get_metrics(url)):
        if family.name != "pgrouter_routed_transactions":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("database") == database:
                out[sample.labels["target"]] = sample.value
    return out


class Scraper(threading.Thread):
    """GET `url` every `interval` seconds until stopped, as Prometheus would (the response is
    read in full and dropped). Counts scrapes, failures and the time they took."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        super().__init__(name="metrics-scraper", daemon=True)
        self.url = url
        self.interval = interval
        self.scrapes = 0
        self.failures = 0
        self.seconds = 0.0  # summed scrape latency
        self._stop_event = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._stop_event.is_set():
            start = time.monotonic()
            try:
                get_metrics(self.url)
                self.scrapes += 1
                self.seconds += time.monotonic() - start
            except OSError:
                self.failures += 1
            next_at += self.interval
            self._stop_event.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(TIMEOUT_S + 1)

    @property
    def mean_ms(self) -> float | None:
        return self.seconds * 1000 / self.scrapes if self.scrapes else None
