"""Logins stay cheap: a storm of SCRAM connect-query-disconnect cycles, and the PBKDF2 work.

Scripts that connect per request make the login the hot path. 1000 cycles with SCRAM client
authentication (psycopg, several threads) must all succeed, leave no client behind and no
memory growth; the elapsed time, logins/s and the proxy's own CPU per login are printed
(`pytest -s`). SCRAM's expensive part, PBKDF2 over the password, must run once per user (or
never, for a stored verifier), not once per login: the salt the proxy offers stays the same from
login to login (a per-login derivation draws a new salt), and the proxy's CPU per login is below
the cost of one PBKDF2 at the iteration count it announces.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
import urllib.request
from collections.abc import Callable

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_bad_input import raw, startup_packet, typed
from tests.support import APP_USER, ProxyProcess, free_port, wait_for

pytestmark = pytest.mark.timeout(600)

ProxyFactory = Callable[..., ProxyProcess]
CYCLES = 1000
THREADS = 8
RSS_GROWTH_LIMIT_KB = 10 * 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def clients_connected(http_port: int) -> tuple[float, float]:
    """(pgrouter_clients_connected, pgrouter_clients_logging_in) from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in ("pgrouter_clients_connected", "pgrouter_clients_logging_in")
    }
    return values["pgrouter_clients_connected"], values["pgrouter_clients_logging_in"]


def scram_proxy(proxy_factory: ProxyFactory) -> tuple[ProxyProcess, int]:
    http_port = free_port()
    proxy = proxy_factory(
        auth_type="scram-sha-256",
        admin={"users": [APP_USER], "http": f"127.0.0.1:{http_port}"},
    )
    return proxy, http_port


def cycles(proxy: ProxyProcess, count: int, threads: int) -> list[str]:
    """`count` connect-query-disconnect cycles over `threads` threads; the failures."""
    dsn = proxy.dsn(sslmode="disable")
    failures: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for _ in range(n):
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
                    assert conn.execute("SELECT 1").fetchone() == (1,)
            except Exception as exc:
                with lock:
                    failures.append(repr(exc))

    shares = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    workers = [threading.Thread(target=worker, args=(n,)) for n in shares]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=500)
    assert not any(w.is_alive() for w in workers), "the storm did not end"
    return failures


def pbkdf2_seconds(iterations: int) -> float:
    """The CPU cost of one PBKDF2-SHA256 at `iterations`, on this machine now (the median of
    21 runs: as loaded as the proxy's average over the storm)."""
    runs = []
    for _ in range(21):
        started = time.process_time()
        hashlib.pbkdf2_hmac("sha256", b"password", b"0123456789abcdef", iterations)
        runs.append(time.process_time() - started)
    return sorted(runs)[10]


def server_first(proxy: ProxyProcess) -> dict[str, str]:
    """The attributes of the proxy's SCRAM server-first message for one login attempt."""
    with raw(proxy, timeout=15) as client:
        client.send(startup_packet({"user": APP_USER, "database": "appdb"}))
        kind, body = client.until(b"RE")[-1]
        assert kind == b"R" and body[:4] == (10).to_bytes(4, "big"), body
        first = b"n,,n=,r=" + base64.b64encode(os.urandom(18))
        client.send(typed(b"p", b"SCRAM-SHA-256\0" + len(first).to_bytes(4, "big") + first))
        kind, body = client.until(b"RE")[-1]
        assert kind == b"R" and body[:4] == (11).to_bytes(4, "big"), body
        return dict(part.split("=", 1) for part in body[4:].decode().split(","))


def test_scram_salt_and_keys_are_derived_once_per_user(proxy_factory: ProxyFactory) -> None:
    proxy, _ = scram_proxy(proxy_factory)
    offers = [server_first(proxy) for _ in range(10)]
    assert len({o["s"] for o in offers}) == 1, "a new salt per login: PBKDF2 ran per login"
    assert len({o["r"] for o in offers}) == 10  # the nonces, of course, are fresh
    assert offers[0]["i"] == "4096"


def test_storm_of_scram_logins(proxy_factory: ProxyFactory) -> None:
    proxy, http_port = scram_proxy(proxy_factory)
    assert not cycles(proxy, 100, THREADS)  # warm-up: pools, caches, allocator
    wait_for(lambda: clients_connected(http_port) == (0, 0), timeout=30)
    rss_before = max(proxy.rss_kb() for _ in range(3))
    cpu_before = cpu_seconds(proxy.pid)

    started = time.monotonic()
    failures = cycles(proxy, CYCLES, THREADS)
    elapsed = time.monotonic() - started
    cpu_per_login = (cpu_seconds(proxy.pid) - cpu_before) / CYCLES

    assert not failures, f"{len(failures)} of {CYCLES} cycles failed, first: {failures[0]}"
    wait_for(lambda: clients_connected(http_port) == (0, 0), timeout=30)
    time.sleep(0.5)
    rss_after = min(proxy.rss_kb() for _ in range(3))
    growth = rss_after - rss_before
    pbkdf2 = pbkdf2_seconds(4096)
    print(
        f"\nlogin storm: {CYCLES} SCRAM connect-query-disconnect cycles, {THREADS} threads: "
        f"{elapsed:.2f} s, {CYCLES / elapsed:.0f} logins/s; proxy CPU {cpu_per_login * 1e6:.0f} "
        f"µs per login (one PBKDF2-4096 here: {pbkdf2 * 1e6:.0f} µs); "
        f"RSS {rss_before} -> {rss_after} kB"
    )
    assert growth <= RSS_GROWTH_LIMIT_KB, f"proxy RSS grew by {growth} kB"
    # One PBKDF2 per login would cost at least this much on its own.
    assert cpu_per_login < pbkdf2, (
        f"proxy CPU per login {cpu_per_login * 1e6:.0f} µs >= one PBKDF2 ({pbkdf2 * 1e6:.0f} µs)"
    )
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:  # still serving
        assert conn.execute("SELECT 'after'").fetchone() == ("after",)
