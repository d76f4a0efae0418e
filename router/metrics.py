"""Prometheus metrics, read from the proxy's plain counters at scrape time.

Nothing here runs in the data path: the pools and sessions only bump integers, and
`ProxyCollector.collect` turns them into metric families when Prometheus scrapes.

Two sets of names:

- ``pgrouter_*``: per pool (labels ``database``, ``user``, ``backend`` = "host:port") and
  process-wide metrics.
- ``pgbouncer_*``: the names pgbouncer_exporter produces from SHOW POOLS, SHOW STATS_TOTALS,
  SHOW DATABASES, SHOW LISTS and SHOW CONFIG (and the older ``pgbouncer_stats_*`` names of
  exporters before 0.11), with the same labels, so its Grafana dashboards work unchanged.
  Pools are summed per (database, user) like SHOW POOLS; times are in seconds.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import CollectorRegistry

from router import __version__
from router.admin import (
    VERSION,
    PoolState,
    database_totals,
    is_paused,
    pool_groups,
    pool_states,
)
from router.config import format_address

if TYPE_CHECKING:
    from router.proxy import Proxy

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # text/plain; version=0.0.4; charset=utf-8

_POOL_LABELS = ["database", "user", "backend"]
_PGB_POOL_LABELS = ["database", "user"]
_PGB_DATABASE_LABELS = ["name", "host", "port", "database", "force_user", "pool_mode"]


class ProxyCollector:
    """A custom collector: every metric is computed from the proxy when scraped."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        states = pool_states(self.proxy)
        yield from self._pools(states)
        yield from self._backends()
        yield from self._routing()
        yield from self._process()
        yield from self._pgbouncer(states)

    # ---- pgrouter_* -------------------------------------------------------------------------

    def _pools(self, states: list[PoolState]) -> Iterator[Metric]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"pgrouter_pool_{name}", doc, labels=_POOL_LABELS)

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"pgrouter_pool_{name}", doc, labels=_POOL_LABELS)

        clients_active = gauge("clients_active", "Logged-in clients not waiting for a server")
        clients_waiting = gauge("clients_waiting", "Clients waiting for a server connection")
        servers_active = gauge("servers_active", "Server connections linked to a client")
        servers_idle = gauge("servers_idle", "Idle server connections")
        servers_tested = gauge(
            "servers_tested", "Server connections taken but not linked (running a reset query)"
        )
        servers_login = gauge("servers_login", "Server connections being opened")
        size = gauge("size", "Maximum server connections of the pool (pool_size)")
        max_wait = gauge("max_wait_seconds", "How long the oldest waiting client has waited")
        longest_wait = gauge(
            "longest_wait_seconds", "Longest wait for a server of any client since start"
        )
        paused = gauge("paused", "1 while PAUSE holds the pool's database")
        xacts = counter("transactions", "Transactions (server releases)")
        queries = counter("queries", "Queries answered (simple queries and Syncs)")
        received = counter("received_bytes", "Bytes received from clients")
        sent = counter("sent_bytes", "Bytes sent to clients")
        wait_seconds = counter("wait_seconds", "Time clients spent waiting for a server")
        xact_seconds = counter(
            "transaction_seconds",
            "Time servers spent in client transactions (SHOW STATS xact_time)",
        )
        query_seconds = counter(
            "query_seconds", "Time servers spent running client queries (SHOW STATS query_time)"
        )
        waits = counter("waits", "Times a client had to wait for a server")
        assignments = counter("server_assignments", "Times a server was linked to a client")
        logins = counter("logins", "Client logins")
        connects = counter("server_connects", "Server connections opened")
        connect_failures = counter("server_connect_failures", "Failed server connection attempts")

        for st in states:
            pool = st.pool
            key = pool.key
            labels = [key.database, key.user, format_address(key.host, key.port)]
            clients_active.add_metric(labels, st.cl_active)
            clients_waiting.add_metric(labels, st.cl_waiting)
            servers_active.add_metric(labels, st.sv_active)
            servers_idle.add_metric(labels, st.sv_idle)
            servers_tested.add_metric(labels, st.sv_tested)
            servers_login.add_metric(labels, st.sv_login)
            size.add_metric(labels, pool.settings.pool_size)
            max_wait.add_metric(labels, st.maxwait)
            longest_wait.add_metric(labels, pool.max_wait)
            paused.add_metric(labels, 1 if pool.paused else 0)
            xacts.add_metric(labels, pool.xact_count)
            queries.add_metric(labels, pool.query_count)
            received.add_metric(labels, pool.bytes_received)
            sent.add_metric(labels, pool.bytes_sent)
            wait_seconds.add_metric(labels, pool.wait_time)
            xact_seconds.add_metric(labels, pool.xact_time_ns / 1e9)
            query_seconds.add_metric(labels, pool.query_time_ns / 1e9)
            waits.add_metric(labels, pool.wait_count)
            assignments.add_metric(labels, pool.assignment_count)
            logins.add_metric(labels, pool.login_count)
            connects.add_metric(labels, pool.connect_count)
            connect_failures.add_metric(labels, pool.connect_failures)
        yield from (
            clients_active, clients_waiting, servers_active, servers_idle, servers_tested,
            servers_login, size, max_wait, longest_wait, paused, xacts, queries, received, sent,
            wait_seconds, xact_seconds, query_seconds, waits, assignments, logins, connects,
            connect_failures,
        )  # fmt: skip

    def _backends(self) -> Iterator[Metric]:
        """What each backend's monitor last saw: up, role, WAL position, lag."""
        labels = ["backend"]
        up = GaugeMetricFamily(
            "pgrouter_backend_up", "1 if the last check succeeded", labels=labels
        )
        primary = GaugeMetricFamily(
            "pgrouter_backend_is_primary", "1 if the backend is not in recovery", labels=labels
        )
        lsn = GaugeMetricFamily(
            "pgrouter_backend_wal_lsn_bytes",
            "Current WAL position (primary) or replay position (replica)",
            labels=labels,
        )
        lag = GaugeMetricFamily(
            "pgrouter_backend_lag_bytes",
            "Bytes of WAL a replica has yet to replay, behind its database's primary",
            labels=labels,
        )
        time_lag = GaugeMetricFamily(
            "pgrouter_backend_lag_seconds",
            "Seconds a replica is behind its database's primary",
            labels=labels,
        )
        checks = CounterMetricFamily(
            "pgrouter_backend_checks", "Health checks, by result", labels=[*labels, "result"]
        )
        changes = CounterMetricFamily(
            "pgrouter_backend_state_changes", "Up/down verdict changes", labels=labels
        )
        proxy = self.proxy
        primaries = {}  # backend address -> its database's current primary
        for db in proxy.config.databases.values():
            current = proxy.primary_endpoint(db)
            for b in db.backends:
                if b != current:
                    primaries[(b.host, b.port)] = current
        for (host, port), monitor in proxy.monitors.items():
            name = [format_address(host, port)]
            checks.add_metric([*name, "ok"], monitor.checks)
            checks.add_metric([*name, "failed"], monitor.failures)
            changes.add_metric(name, monitor.transitions)
            if monitor.up is None:
                continue
            up.add_metric(name, 1 if monitor.up else 0)
            if monitor.in_recovery is not None:
                primary.add_metric(name, 0 if monitor.in_recovery else 1)
            if monitor.lsn is not None:
                lsn.add_metric(name, monitor.lsn)
            source = primaries.get((host, port))
            upstream = proxy.monitors.get((source.host, source.port)) if source else None
            if monitor.in_recovery and monitor.lsn is not None and upstream and upstream.lsn:
                lag.add_metric(name, max(upstream.lsn - monitor.lsn, 0))
            if monitor.in_recovery:
                time_lag.add_metric(name, monitor.time_lag)
        yield from (up, primary, lsn, lag, time_lag, checks, changes)
        failovers = CounterMetricFamily(
            "pgrouter_failovers", "Changes of a database's primary", labels=["database"]
        )
        fenced = GaugeMetricFamily(
            "pgrouter_database_fenced",
            "1 while writes are refused because two backends claim to be primary",
            labels=["database"],
        )
        no_primary = GaugeMetricFamily(
            "pgrouter_database_no_primary",
            "1 while the database has no usable primary: its writes wait for failover_timeout",
            labels=["database"],
        )
        waits = CounterMetricFamily(
            "pgrouter_failover_waits",
            "Transactions that waited for a primary (no usable primary, or two)",
            labels=["database"],
        )
        timeouts = CounterMetricFamily(
            "pgrouter_failover_timeouts",
            "Transactions refused after waiting failover_timeout for a primary",
            labels=["database"],
        )
        for db_name in proxy.config.databases:
            failovers.add_metric([db_name], proxy.failovers.get(db_name, 0))
            hold = proxy.holds.get(db_name)
            fenced.add_metric([db_name], 1 if hold is not None and hold.fenced else 0)
            no_primary.add_metric([db_name], 1 if hold is not None and not hold.fenced else 0)
            stats = proxy.hold_stats.get(db_name)
            waits.add_metric([db_name], stats.waited if stats else 0)
            timeouts.add_metric([db_name], stats.timed_out if stats else 0)
        yield from (failovers, fenced, no_primary, waits, timeouts)

    def _routing(self) -> Iterator[Metric]:
        """Routing decisions and the classifier's cache, per database with replicas."""
        db = ["database"]
        routed = CounterMetricFamily(
            "pgrouter_routed_transactions", "Transactions by target", labels=[*db, "target"]
        )
        fallbacks = CounterMetricFamily(
            "pgrouter_read_fallbacks",
            "Read-only transactions kept on the primary, by reason",
            labels=[*db, "reason"],
        )
        misroutes = CounterMetricFamily(
            "pgrouter_misroutes",
            "Reads run again before the client saw anything: a replica refused them, or their "
            "backend failed",
            labels=[*db, "reason"],
        )
        cache = CounterMetricFamily(
            "pgrouter_classifier_cache", "Statement classifier lookups", labels=[*db, "result"]
        )
        parse = CounterMetricFamily(
            "pgrouter_classifier_parse_seconds", "Time spent parsing statements", labels=db
        )
        lagging = CounterMetricFamily(
            "pgrouter_lagging_reads",
            "Read-only transactions that found every replica beyond max_replica_lag",
            labels=db,
        )
        for name, router in self.proxy.routers.items():
            routed.add_metric([name, "replica"], router.to_replica)
            routed.add_metric([name, "primary"], router.to_primary)
            fallbacks.add_metric([name, "no_replica"], router.no_replica)
            fallbacks.add_metric([name, "read_your_writes"], router.ryw_fallbacks)
            misroutes.add_metric([name, "refused"], router.misroutes)
            misroutes.add_metric([name, "server_lost"], router.lost_retries)
            cache.add_metric([name, "hit"], router.classifier.hits)
            cache.add_metric([name, "miss"], router.classifier.misses)
            parse.add_metric([name], router.classifier.parse_seconds)
            lagging.add_metric([name], router.lag_fallbacks)
        yield from (routed, fallbacks, misroutes, cache, parse, lagging)

    def _process(self) -> Iterator[Metric]:
        proxy = self.proxy
        connected = 0
        logging_in = 0
        for client in proxy.clients:
            state = getattr(getattr(client, "state", None), "name", "")
            if state == "CLOSED":
                continue
            connected += 1
            if state in ("STARTUP", "AUTH", "WELCOME"):
                logging_in += 1
        yield GaugeMetricFamily(
            "pgrouter_clients_connected", "Client connections (all states)", value=connected
        )
        yield GaugeMetricFamily(
            "pgrouter_clients_logging_in", "Client connections still logging in", value=logging_in
        )
        yield CounterMetricFamily(
            "pgrouter_auth_failures", "Failed client authentications", value=proxy.auth_failures
        )
        yield CounterMetricFamily(
            "pgrouter_login_refusals",
            "Logins refused by auth_rules or a per-user/per-database client limit",
            value=proxy.login_refusals,
        )
        yield CounterMetricFamily(
            "pgrouter_auth_query_lookups",
            "auth_query lookups run (answers are cached for auth_query_ttl)",
            value=proxy.auth_query.lookups,
        )
        yield CounterMetricFamily(
            "pgrouter_auth_query_failures",
            "auth_query lookups that failed (the login was refused)",
            value=proxy.auth_query.failures,
        )
        yield CounterMetricFamily(
            "pgrouter_cancel_requests", "Cancel requests received", value=proxy.cancel_requests
        )
        pinned = GaugeMetricFamily(
            "pgrouter_pinned_clients",
            "Clients kept on their server by session state",
            labels=["reason"],
        )
        pins = CounterMetricFamily(
            "pgrouter_pins", "Times a client was pinned to its server", labels=["reason"]
        )
        for reason, count in proxy.pinned.items():
            pinned.add_metric([reason], count)
            pins.add_metric([reason], proxy.pins_total[reason])
        yield pinned
        yield pins
        errors = CounterMetricFamily(
            "pgrouter_errors",
            "Errors sent to clients by SQLSTATE class: from servers, or from pgrouter itself",
            labels=["database", "source", "class"],
        )
        by_database: dict[tuple[str, str], int] = {}
        for pool in proxy.pools.values():
            for sqlstate_class, count in pool.error_counts.items():
                key = (pool.key.database, sqlstate_class)
                by_database[key] = by_database.get(key, 0) + count
        for (database, sqlstate_class), count in sorted(by_database.items()):
            errors.add_metric([database, "server", sqlstate_class], count)
        for sqlstate_class, count in sorted(proxy.errors.items()):
            errors.add_metric(["", "pgrouter", sqlstate_class], count)
        yield errors
        yield GaugeMetricFamily(
            "pgrouter_prepared_statements",
            "Distinct prepared statement texts known to the proxy",
            value=len(proxy.statements),
        )
        yield GaugeMetricFamily(
            "pgrouter_start_time_seconds",
            "When the proxy started (Unix time)",
            value=proxy.started,
        )
        info = GaugeMetricFamily(
            "pgrouter_build_info", "pgrouter version", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info

    # ---- pgbouncer_exporter names -----------------------------------------------------------

    def _pgbouncer(self, states: list[PoolState]) -> Iterator[Metric]:
        yield GaugeMetricFamily("pgbouncer_up", "The pgbouncer scrape succeeded", value=1)
        version = GaugeMetricFamily(
            "pgbouncer_version_info", "The pgbouncer version info", labels=["version"]
        )
        version.add_metric([VERSION], 1)
        yield version

        yield from self._pgbouncer_pools(states)
        yield from self._pgbouncer_stats()
        yield from self._pgbouncer_databases()
        yield from self._pgbouncer_lists(states)

    def _pgbouncer_pools(self, states: list[PoolState]) -> Iterator[Metric]:
        """SHOW POOLS, summed per (database, user)."""
        groups = pool_groups(states)
        names = [
            ("client_active_connections", "cl_active", "Client connections linked or idle"),
            ("client_waiting_connections", "cl_waiting", "Client connections waiting"),
            ("server_active_connections", "sv_active", "Server connections linked to a client"),
            ("server_idle_connections", "sv_idle", "Idle server connections"),
            ("server_used_connections", None, "Server connections needing a check"),
            ("server_testing_connections", "sv_tested", "Server connections running a reset"),
            ("server_login_connections", "sv_login", "Server connections logging in"),
            ("client_active_cancel_connections", None, "Clients forwarding a cancel"),
            ("client_waiting_cancel_connections", None, "Clients waiting to forward a cancel"),
            ("server_active_cancel_connections", None, "Servers forwarding a cancel"),
            ("server_being_canceled_connections", None, "Servers being canceled"),
        ]
        for suffix, attr, doc in names:
            family = GaugeMetricFamily(f"pgbouncer_pools_{suffix}", doc, labels=_PGB_POOL_LABELS)
            for key, g in groups.items():
                family.add_metric(list(key), 0 if attr is None else getattr(g, attr))
            yield family
        maxwait = GaugeMetricFamily(
            "pgbouncer_pools_client_maxwait_seconds",
            "Age of the oldest waiting client",
            labels=_PGB_POOL_LABELS,
        )
        for key, g in groups.items():
            maxwait.add_metric(list(key), g.maxwait)
        yield maxwait

    def _pgbouncer_stats(self) -> Iterator[Metric]:
        """SHOW STATS_TOTALS (and the pre-0.11 SHOW STATS names)."""
        totals = database_totals(self.proxy)
        stats = [
            ("queries_pooled", "query_count", "SQL queries pooled"),
            ("queries", "query_count", "SQL requests pooled"),
            ("received_bytes", "bytes_received", "Bytes received from clients"),
            ("sent_bytes", "bytes_sent", "Bytes sent to clients"),
            ("client_wait_seconds", "wait_time", "Time clients waited for a server"),
            ("queries_duration_seconds", "query_time", "Time servers spent running queries"),
            ("server_in_transaction_seconds", "xact_time", "Time servers spent in transactions"),
            ("sql_transactions_pooled", "xact_count", "SQL transactions pooled"),
            ("server_assignments", "server_assignment_count", "Server assignments"),
        ]
        for prefix in ("pgbouncer_stats_totals", "pgbouncer_stats"):
            for suffix, attr, doc in stats:
                family = CounterMetricFamily(f"{prefix}_{suffix}", doc, labels=["database"])
                for name, t in totals.items():
                    family.add_metric([name], getattr(t, attr))
                yield family

    def _pgbouncer_databases(self) -> Iterator[Metric]:
        """SHOW DATABASES."""
        proxy = self.proxy
        config = proxy.config
        servers: dict[str, int] = {}
        for key, pool in proxy.pools.items():
            if not pool.closed:
                servers[key.database] = servers.get(key.database, 0) + pool.size
        databases = [
            ("pool_size", "Maximum number of server connections"),
            ("reserve_pool", "Maximum number of additional connections"),
            ("max_connections", "Maximum allowed connections (0: unlimited)"),
            ("current_connections", "Current server connections"),
            ("paused", "1 if the database is paused"),
            ("disabled", "1 if the database is disabled"),
        ]
        for suffix, doc in databases:
            family = GaugeMetricFamily(
                f"pgbouncer_databases_{suffix}", doc, labels=_PGB_DATABASE_LABELS
            )
            for name, db in config.databases.items():
                labels = [name, db.primary.host, str(db.primary.port), db.dbname, "", db.pool_mode]
                value = {
                    "pool_size": db.pool_size,
                    "current_connections": servers.get(name, 0),
                    "paused": 1 if is_paused(proxy, name) else 0,
                }.get(suffix, 0)
                family.add_metric(labels, value)
            yield family

    def _pgbouncer_lists(self, states: list[PoolState]) -> Iterator[Metric]:
        """SHOW LISTS and SHOW CONFIG."""
        proxy = self.proxy
        config = proxy.config
        clients = 0
        logging_in = 0
        for client in proxy.clients:
            state = getattr(getattr(client, "state", None), "name", "")
            if state != "CLOSED":
                clients += 1
                logging_in += state in ("STARTUP", "AUTH", "WELCOME")
        lists = [
            ("databases", len(config.databases), "Count of databases"),
            ("users", len(set(config.users) | set(config.admin.users)), "Count of users"),
            ("pools", sum(1 for p in proxy.pools.values() if not p.closed), "Count of pools"),
            ("free_clients", 0, "Count of free clients"),
            ("used_clients", clients, "Count of used clients"),
            ("login_clients", logging_in, "Count of clients in login state"),
            ("free_servers", 0, "Count of free servers"),
            ("used_servers", sum(st.sv_active + st.sv_tested + st.sv_idle for st in states),
             "Count of used servers"),
        ]  # fmt: skip
        for name, value, doc in lists:
            yield GaugeMetricFamily(f"pgbouncer_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "pgbouncer_config_max_client_connections",
            "Config maximum number of client connections",
            value=config.max_client_conn,
        )


def registry_for(proxy: Proxy) -> CollectorRegistry:
    """A dedicated registry (never the global one) holding only the proxy's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(proxy))
    return registry


def render(proxy: Proxy) -> bytes:
    """The Prometheus text exposition (format 0.0.4) of every metric, computed now."""
    return generate_latest(registry_for(proxy))
