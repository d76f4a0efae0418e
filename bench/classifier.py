"""In-process micro-benchmark of the statement classifier (router/classify.py).

What a routed transaction pays before it reaches a server: a cache hit on the exact text, a hit
after number normalisation (simple-protocol clients such as pgbench inline their values, so
the exact text is new every time), and a miss (pglast parses the text). No server, no
network: only the classifier's own CPU. Times are the thread's CPU time
(``time.thread_time_ns``), so other work preempting this process on a busy machine does not
count, and the best of several rounds is kept.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from router.classify import Classifier, normalize_numbers

# pgbench's built-in scripts as the server sees them in simple-protocol mode (values inlined).
PGBENCH_STATEMENTS = (
    "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
    "BEGIN;",
    "UPDATE pgbench_accounts SET abalance = abalance + -2317 WHERE aid = 48213;",
    "UPDATE pgbench_tellers SET tbalance = tbalance + -2317 WHERE tid = 17;",
    "UPDATE pgbench_branches SET bbalance = bbalance + -2317 WHERE bid = 3;",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
    "VALUES (17, 3, 48213, -2317, CURRENT_TIMESTAMP);",
    "END;",
)

# What applications and ORMs send: reads of every shape, writes, locking reads, session and
# transaction control, hints, multi-statement queries.
VARIED_STATEMENTS = (
    "SELECT 1",
    "SELECT now()",
    "SHOW search_path",
    "SELECT id, name, email FROM users WHERE id = $1",
    'SELECT "users"."id", "users"."name" FROM "users" WHERE "users"."email" = $1 LIMIT 1',
    "SELECT u.id, count(o.id) AS orders FROM users u LEFT JOIN orders o ON o.user_id = u.id "
    "WHERE u.created_at > now() - interval '7 days' GROUP BY u.id ORDER BY orders DESC LIMIT 20",
    "WITH recent AS (SELECT * FROM events WHERE ts > now() - interval '1 hour') "
    "SELECT kind, count(*) FROM recent GROUP BY kind",
    "SELECT id, rank() OVER (PARTITION BY team ORDER BY score DESC) FROM scores",
    "SELECT * FROM items WHERE id IN (SELECT item_id FROM cart WHERE user_id = 42)",
    "SELECT * FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
    "SELECT nextval('orders_id_seq')",
    "SELECT pg_advisory_lock(12345)",
    "/* pgrouter: primary */ SELECT balance FROM accounts WHERE id = 7",
    "INSERT INTO orders (user_id, total) VALUES ($1, $2) RETURNING id",
    "UPDATE users SET last_seen = now() WHERE id = $1",
    "DELETE FROM sessions WHERE expires_at < now()",
    "WITH moved AS (DELETE FROM inbox WHERE id = 3 RETURNING *) INSERT INTO archive "
    "SELECT * FROM moved",
    "BEGIN READ ONLY",
    "SET application_name = 'worker-3'",
    "SELECT 1; SELECT 2",
    "CREATE TABLE IF NOT EXISTS t_bench (id int PRIMARY KEY, v text)",
    "EXPLAIN SELECT * FROM users WHERE id = 1",
    "SELECT * FROM orders WHERE id = ANY($1::int[]) AND status NOT IN ('void', 'refunded')",
    "SELECT json_agg(t) FROM (SELECT id, payload->>'kind' AS kind FROM events LIMIT 100) t",
)


@dataclass
class ClassifierBench:
    """Nanoseconds per classify() call; per-statement miss costs in µs."""

    reference_ns: float  # a dict lookup in the same loop: how fast this machine is right now
    hit_exact_ns: float
    hit_normalized_ns: float
    miss_pgbench_us: float
    miss_varied_us: float
    miss_by_statement_us: dict[str, float] = field(default_factory=dict)


def _best_ns(fn: Callable[[], None], calls: int, repeats: int) -> float:
    """Best (least disturbed) mean of `repeats` timings of `calls` calls, in ns per call."""
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time_ns()
        fn()
        best = min(best, (time.thread_time_ns() - start) / calls)
    return best


def _hits_exact(texts: Sequence[str], calls: int) -> Callable[[], None]:
    """Texts the cache finds as they are: parameters as $n, no numeric literals."""
    texts = [t for t in texts if normalize_numbers(t) == t]
    classifier = Classifier()
    for text in texts:
        classifier.classify(text)
    classify = classifier.classify
    loop = [texts[i % len(texts)] for i in range(calls)]

    def run() -> None:
        for text in loop:
            classify(text)

    return run


def _reference(calls: int) -> Callable[[], None]:
    """The same loop around a plain dict lookup, to tell a slow classifier from a slow CPU."""
    table = {"SELECT 1": 1}
    lookup = table.get
    loop = ["SELECT 1"] * calls

    def run() -> None:
        for text in loop:
            lookup(text)

    return run


def _hits_normalized(calls: int) -> Callable[[], None]:
    """pgbench -S in simple mode: a new aid in every text, one cached normalised entry."""
    classifier = Classifier()
    classify = classifier.classify
    loop = [
        f"SELECT abalance FROM pgbench_accounts WHERE aid = {i * 7919 % 1000000};"
        for i in range(calls)
    ]
    classify(loop[0])

    def run() -> None:
        for text in loop:
            classify(text)

    return run


def _miss_us(text: str, repeats: int) -> float:
    """Median µs of classifying `text` with no cache (the parser runs every time)."""
    classifier = Classifier(cache_size=0)
    times = []
    for _ in range(repeats):
        start = time.thread_time_ns()
        classifier.classify(text)
        times.append(time.thread_time_ns() - start)
    return statistics.median(times) / 1000


def run_classifier_bench(
    calls: int = 200_000, repeats: int = 5, miss_repeats: int = 200
) -> ClassifierBench:
    """Measure everything; about two seconds on an idle core."""
    texts = (*PGBENCH_STATEMENTS, *VARIED_STATEMENTS)
    misses = {text: _miss_us(text, miss_repeats) for text in texts}
    return ClassifierBench(
        reference_ns=_best_ns(_reference(calls), calls, repeats),
        hit_exact_ns=_best_ns(_hits_exact(texts, calls), calls, repeats),
        hit_normalized_ns=_best_ns(_hits_normalized(calls), calls, repeats),
        miss_pgbench_us=statistics.mean(misses[t] for t in PGBENCH_STATEMENTS),
        miss_varied_us=statistics.mean(misses[t] for t in VARIED_STATEMENTS),
        miss_by_statement_us={text: round(us, 2) for text, us in misses.items()},
    )


def classifier_table(result: ClassifierBench) -> str:
    """The bench output section: costs per call, then the slowest statements to parse."""
    slowest = sorted(result.miss_by_statement_us.items(), key=lambda kv: -kv[1])[:3]
    lines = [
        "== classifier: router/classify.py in-process, per statement ==",
        f"{'cache hit, exact text':<34}{result.hit_exact_ns / 1000:>10.2f} µs"
        "   (no numeric literal: $n parameters, prepared statements)",
        f"{'cache hit, numbers normalised':<34}{result.hit_normalized_ns / 1000:>10.2f} µs"
        "   (pgbench -S simple: a new aid in every text)",
        f"{'miss, pgbench statements':<34}{result.miss_pgbench_us:>10.1f} µs"
        f"   (mean of {len(PGBENCH_STATEMENTS)})",
        f"{'miss, varied statements':<34}{result.miss_varied_us:>10.1f} µs"
        f"   (mean of {len(VARIED_STATEMENTS)})",
        f"(reference: a dict lookup in the same loop takes {result.reference_ns:.0f} ns here, "
        "a sign of how loaded the CPU is)",
        "slowest to parse: " + "; ".join(f"{us:.0f} µs {text[:40]!r}" for text, us in slowest),
    ]
    return "\n".join(lines)
