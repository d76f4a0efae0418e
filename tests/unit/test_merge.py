"""Several workers' metrics and admin answers combined into one view (router.merge)."""

from __future__ import annotations

from protocol import messages as m
from router.merge import RULES, merge_metrics, merge_results, parse_result, render_result
from router.supervisor import assign

WORKER_0 = b"""# HELP pgrouter_pool_logins_total Client logins
# TYPE pgrouter_pool_logins_total counter
pgrouter_pool_logins_total{database="appdb",user="app",backend="h:5432"} 3.0
# HELP pgrouter_pool_size Maximum server connections of the pool (pool_size)
# TYPE pgrouter_pool_size gauge
pgrouter_pool_size{database="appdb",user="app",backend="h:5432"} 2.0
# HELP pgrouter_backend_up 1 while the backend passes its health checks
# TYPE pgrouter_backend_up gauge
pgrouter_backend_up{backend="h:5432"} 1.0
"""
WORKER_1 = b"""# HELP pgrouter_pool_logins_total Client logins
# TYPE pgrouter_pool_logins_total counter
pgrouter_pool_logins_total{database="appdb",user="app",backend="h:5432"} 4.0
pgrouter_pool_logins_total{database="otherdb",user="app",backend="h:5432"} 1.0
# HELP pgrouter_pool_size Maximum server connections of the pool (pool_size)
# TYPE pgrouter_pool_size gauge
pgrouter_pool_size{database="appdb",user="app",backend="h:5432"} 1.0
# HELP pgrouter_backend_up 1 while the backend passes its health checks
# TYPE pgrouter_backend_up gauge
pgrouter_backend_up{backend="h:5432"} 1.0
"""


def test_counters_and_counting_gauges_are_summed_shared_gauges_taken_once() -> None:
    text = merge_metrics([WORKER_0, WORKER_1]).decode()
    lines = text.splitlines()
    assert 'pgrouter_pool_logins_total{database="appdb",user="app",backend="h:5432"} 7.0' in lines
    assert 'pgrouter_pool_logins_total{database="otherdb",user="app",backend="h:5432"} 1.0' in lines
    assert 'pgrouter_pool_size{database="appdb",user="app",backend="h:5432"} 3.0' in lines
    assert 'pgrouter_backend_up{backend="h:5432"} 1.0' in lines
    assert lines.count("# TYPE pgrouter_pool_logins_total counter") == 1
    # a family's samples stay under its own TYPE line
    assert lines.index("# TYPE pgrouter_pool_size gauge") < lines.index(
        'pgrouter_pool_size{database="appdb",user="app",backend="h:5432"} 3.0'
    )


def show(columns: list[str], rows: list[list[str | None]]) -> bytes:
    out = [m.row_description(columns), *(m.data_row(r) for r in rows)]
    return b"".join([*out, m.command_complete("SHOW"), m.ready_for_query()])


POOLS = ["database", "user", "cl_active", "sv_idle", "maxwait", "maxwait_us", "pool_mode"]


def test_show_pools_rows_of_one_pool_become_one() -> None:
    a = parse_result(show(POOLS, [["appdb", "app", "2", "1", "0", "5", "transaction"]]))
    b = parse_result(
        show(
            POOLS,
            [
                ["appdb", "app", "3", "0", "1", "7", "transaction"],
                ["otherdb", "app", "1", "1", "0", "0", "session"],
            ],
        )
    )
    assert a is not None and b is not None
    merged = parse_result(render_result(merge_results(RULES["pools"], [a, b])))
    assert merged is not None
    assert merged.rows == [
        ["appdb", "app", "5", "1", "1", "7", "transaction"],
        ["otherdb", "app", "1", "1", "0", "0", "session"],
    ]


def test_show_clients_rows_are_listed_and_lists_keep_the_configured_counts() -> None:
    a = parse_result(show(["type", "user"], [["C", "app"]]))
    b = parse_result(show(["type", "user"], [["C", "ops"], ["C", None]]))
    assert a is not None and b is not None
    assert merge_results(RULES["clients"], [a, b]).rows == [["C", "app"], ["C", "ops"], ["C", None]]
    la = parse_result(show(["list", "items"], [["databases", "2"], ["used_clients", "3"]]))
    lb = parse_result(show(["list", "items"], [["databases", "2"], ["used_clients", "4"]]))
    assert la is not None and lb is not None
    assert merge_results(RULES["lists"], [la, lb]).rows == [
        ["databases", "2"],
        ["used_clients", "7"],
    ]


def test_an_error_is_not_a_result() -> None:
    from protocol import errors as e

    assert parse_result(e.error_response("55000", "no") + m.ready_for_query()) is None


def test_sockets_are_spread_over_the_workers() -> None:
    a, b, c = object(), object(), object()
    assert assign([a, b], 2) == [[a], [b]]  # type: ignore[list-item]
    assert assign([a, b, c], 2) == [[a, c], [b]]  # type: ignore[list-item]
    assert assign([a], 3) == [[a], [a], [a]]  # type: ignore[list-item]


def test_every_shared_gauge_is_a_gauge_the_collector_exports() -> None:
    """The list of gauges taken once names only real gauges (a renamed one would be summed)."""
    from router.merge import SHARED_GAUGES
    from router.metrics import render
    from tests.unit.test_admin import make_proxy

    text = render(make_proxy()).decode()
    gauges = [line.split()[2] for line in text.splitlines() if line.endswith(" gauge")]
    for entry in SHARED_GAUGES:
        if entry.endswith("_"):
            assert any(g.startswith(entry) for g in gauges), entry
        else:
            assert entry in gauges, entry
