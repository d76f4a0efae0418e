"""The running proxy: listeners, the pools of every database, client registry, janitor."""

from __future__ import annotations

import asyncio
import hmac
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from pools.hold import HoldingPool, HoldStats
from pools.monitor import BackendMonitor
from pools.patroni import PatroniCluster, PatroniWatcher
from pools.pool import Pool, PoolKey, PoolSettings
from pools.server import send_cancel
from protocol import errors as e
from protocol.auth import (
    ClientAuth,
    Md5Hash,
    ScramAuthInfo,
    ServerSecret,
    is_md5_hash,
    parse_scram_verifier,
    scram_auth_info,
)
from router.access import ClientLimits, choose_rule, peer_address, rule_refusal
from router.auth_query import AuthQuery, LookupKey
from router.client import PIN_REASONS, ClientSession, new_cancel_key
from router.config import SCRAM_PREFIX, Config, ConfigError, Database, Endpoint, load_config
from router.handover import CancelKey, Inherited, Label
from router.logs import set_level
from router.routing import Router
from router.statements import StatementRegistry

if TYPE_CHECKING:
    from router.admin import AdminConsole

log = structlog.get_logger("pgrouter.proxy")
JANITOR_INTERVAL = 0.5
#: A draining proxy lets a client that just logged in send its first query: a client that
#: connects per request is not cut between its login and its transaction.
FRESH = 0.5


class Proxy:
    def __init__(self, config: Config, worker: tuple[int, int] = (0, 1)) -> None:
        self.config = config
        #: (this process's index, the number of worker processes): each pool gets its share
        #: of the sizes, and cancel keys name the worker that issued them.
        self.worker_index, self.worker_count = worker
        self.pools: dict[PoolKey, Pool] = {}
        self.clients: set[ClientSession] = set()
        self.listeners: list[asyncio.Server] = []
        self.listener_labels: list[Label] = []  # the topology address of each listener
        self.http: asyncio.Server | None = None
        self.monitors: dict[tuple[str, int], BackendMonitor] = {}  # by backend address
        self.patroni_watchers: dict[str, PatroniWatcher] = {}  # by REST API URL
        self.patroni: dict[str, PatroniCluster] = {}  # databases whose leader Patroni decides
        self.routers: dict[str, Router] = {}  # databases whose reads may go to replicas
        # Where each database's writes go now: its configured primary until a monitor shows
        # another backend promoted. `holds` has the databases without a usable primary (down,
        # in recovery, or two claiming the role), whose primary-bound transactions wait there.
        self.primaries: dict[str, Endpoint] = {}
        self.holds: dict[str, HoldingPool] = {}
        self.hold_stats: dict[str, HoldStats] = {}  # per database, across holds
        self.failovers: dict[str, int] = {}  # primary changes, per database
        self.started = time.time()
        self.auth_failures = 0
        self.cancel_requests = 0
        self.statements = StatementRegistry()
        self.pinned: dict[str, int] = dict.fromkeys(PIN_REASONS, 0)  # clients pinned now
        self.pins_total: dict[str, int] = dict.fromkeys(PIN_REASONS, 0)
        self.errors: dict[str, int] = {}  # errors pgrouter itself sent, by SQLSTATE class
        self._cancel_keys: dict[int, ClientSession] = {}
        self._secrets: dict[tuple[str, str], tuple[str | None, ScramAuthInfo | None]] = {}
        self._janitor: asyncio.Task[None] | None = None
        self._dummy_scram: ScramAuthInfo | None = None
        self._logins: deque[ClientSession] = deque()  # in connection order, for the login timeout
        self.limits = ClientLimits()  # logged-in clients per user and per database
        self.auth_query = AuthQuery()
        # What logs in to the servers for users without a cleartext password in the topology:
        # SCRAM keys from their own SCRAM login, or an md5 hash from auth_query.
        self._server_secrets: dict[tuple[str, str], ServerSecret] = {}  # (database, user)
        self.login_refusals = 0  # by auth_rules and the per-user/per-database limits
        self.paused: set[str] = set()  # database names held by PAUSE; "*" for all
        self.on_shutdown_request: Callable[[], None] | None = None  # set by the CLI
        #: Where a cancel request for a key nobody here has goes (a predecessor still
        #: draining, or the worker that issued the key).
        self.cancel_elsewhere: Callable[[CancelKey], None] | None = None
        self.console_factory: Callable[[], AdminConsole] | None = None  # set by a worker

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self, inherited: Inherited | None = None) -> None:
        """Listen, on the sockets handed over by a predecessor (or a supervisor) where they
        match the topology's addresses, else on freshly bound ones."""
        loop = asyncio.get_running_loop()
        inherited = inherited if inherited is not None else {}
        for host, port in self.config.listen:
            label: Label = ("listen", host, port)
            socks: list[socket.socket | None] = list(inherited.pop(label, ()))
            for sock in socks or [None]:
                if sock is None:
                    server = await loop.create_server(
                        lambda: ClientSession(self),
                        None if host in ("*", "") else host,  # every interface
                        port,
                        reuse_address=True,
                        backlog=2048,
                    )
                else:
                    server = await loop.create_server(
                        lambda: ClientSession(self), sock=sock, backlog=2048
                    )
                self.listeners.append(server)
                self.listener_labels.append(label)
            log.info("listening", address=f"{host}:{port}", inherited=bool(socks))
        if self.config.admin.http is not None and self.worker_count == 1:  # else the supervisor's
            from router.http import start_http

            host, port = self.config.admin.http
            http = inherited.pop(("http", host, port), None)
            self.http = await start_http(self, host, port, http[0] if http else None)
        for label, unused in inherited.items():  # addresses the topology no longer has
            log.info("closing a listener no longer configured", address=f"{label[1]}:{label[2]}")
            for sock in unused:
                sock.close()
        self._janitor = loop.create_task(self._janitor_loop())
        self._start_monitors()
        self._start_routers()
        for database in self.config.databases.values():
            for user in self.config.users:
                if database.min_pool_size > 0:
                    self.pool_for(database, user).fill()

    def handover_sockets(self) -> list[tuple[Label, int]]:
        """The listening sockets (label, fd) a successor takes over; none once closed."""
        items = [
            (label, sock.fileno())
            for label, server in zip(self.listener_labels, self.listeners, strict=True)
            if server.is_serving()
            for sock in server.sockets
        ]
        if items and self.http is not None and self.config.admin.http is not None:
            host, port = self.config.admin.http
            items += [(("http", host, port), sock.fileno()) for sock in self.http.sockets]
        return items

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let clients finish their logins and transactions, then close."""
        for server in self.listeners:
            server.close()
        if self.http is not None:
            self.http.close()
        deadline = time.monotonic() + timeout
        while (now := time.monotonic()) <= deadline and any(
            c.server is not None or c.waiting or c.logging_in or now - c.connected_at < FRESH
            for c in self.clients
        ):
            await asyncio.sleep(0.05)
        for client in list(self.clients):
            client.fatal("57P01", "terminating connection due to administrator command")
        for pool in self.pools.values():
            pool.close()
        if self._janitor is not None:
            self._janitor.cancel()
        for monitor in self.monitors.values():
            monitor.stop()
        for watcher in self.patroni_watchers.values():
            watcher.stop()
        for router in self.routers.values():
            router.stop()
        await asyncio.sleep(0)  # let transports flush their last writes

    def _monitor_login(self) -> tuple[str, str | None] | None:
        """Credentials for the backend monitors: an admin user with a password, else any."""
        users = self.config.users
        for name in (*self.config.admin.users, *users):
            user = users.get(name)
            if user is not None and user.password is not None:
                return name, user.password
        return None

    def _start_monitors(self) -> None:
        """One monitor per backend address, shared by the databases that use it. On a reload,
        the monitors of backends still listed keep their verdicts and take the new settings."""
        login = self._monitor_login()
        c = self.config
        wanted: dict[tuple[str, int], str] = {}  # backend address -> a database to log in to
        if login is None:
            log.warning("no user with a password: backends are not monitored")
        else:
            for database in c.databases.values():
                for endpoint in database.backends:
                    wanted.setdefault((endpoint.host, endpoint.port), database.dbname)
        for address in [a for a in self.monitors if a not in wanted]:
            self.monitors.pop(address).stop()
        for (host, port), dbname in wanted.items():
            assert login is not None
            monitor = self.monitors.get((host, port))
            if monitor is None:
                monitor = BackendMonitor(host, port, login[0], login[1], dbname)
                monitor.listeners.append(self._backend_changed)
                self.monitors[(host, port)] = monitor
                monitor.start()
            monitor.user, monitor.password, monitor.dbname = login[0], login[1], dbname
            monitor.tls = c.server_tls
            monitor.interval, monitor.timeout = c.health_check_interval, c.health_check_timeout
            monitor.fall, monitor.rise = c.health_check_fall, c.health_check_rise
        for database in c.databases.values():
            self._set_upstream(database)
        for watcher in self._watch_patroni():
            watcher.start()

    def _watch_patroni(self) -> list[PatroniWatcher]:
        """Databases whose members name their Patroni REST API: Patroni decides their leader.
        On a reload, the watchers of APIs still named are kept, with what they saw; the new
        ones are returned, to be started."""
        c = self.config
        clusters: dict[str, PatroniCluster] = {}
        new: list[PatroniWatcher] = []
        for database in c.databases.values():
            members: dict[tuple[str, int], PatroniWatcher] = {}
            for endpoint in database.backends:
                if endpoint.patroni is None:
                    continue
                watcher = self.patroni_watchers.get(endpoint.patroni)
                if watcher is None:
                    watcher = PatroniWatcher(endpoint.patroni)
                    watcher.listeners.append(self._patroni_changed)
                    self.patroni_watchers[endpoint.patroni] = watcher
                    new.append(watcher)
                watcher.interval, watcher.timeout = c.health_check_interval, c.health_check_timeout
                members[(endpoint.host, endpoint.port)] = watcher
            if members:
                known = self.patroni.get(database.name)
                if known is None or known.members != members:
                    known = PatroniCluster(database.name, members)
                clusters[database.name] = known
        named = {w.url for cluster in clusters.values() for w in cluster.members.values()}
        for url in [u for u in self.patroni_watchers if u not in named]:
            self.patroni_watchers.pop(url).stop()
        self.patroni = clusters
        return new

    # ---- health and failover ------------------------------------------------------------------

    def primary_endpoint(self, database: Database) -> Endpoint:
        """Where `database`'s writes go now."""
        return self.primaries.get(database.name, database.primary)

    @property
    def fenced(self) -> dict[str, HoldingPool]:
        """The databases refusing writes because two backends claim to be primary."""
        return {name: hold for name, hold in self.holds.items() if hold.fenced}

    def primary_pool(self, database: Database, user: str) -> Pool:
        """The pool a client's primary-bound transactions use: the current primary's, or the
        hold of a database without a usable primary."""
        hold = self.holds.get(database.name)
        if hold is not None:
            return hold
        return self.pool_for(database, user)

    def backend_trouble(self, host: str, port: int, error: str | None) -> None:
        """A pool connection learnt something about its backend (see pools.pool.BackendTrouble):
        the monitor takes it down now, or checks it now."""
        monitor = self.monitors.get((host, port))
        if monitor is None:
            return
        if error is None:
            monitor.suspect()
        else:
            monitor.failed(error, at_once=True)

    def _set_upstream(self, database: Database) -> None:
        """Replicas measure their time lag against the current primary."""
        primary = self.primary_endpoint(database)
        upstream = self.monitors.get((primary.host, primary.port))
        for endpoint in database.backends:
            monitor = self.monitors.get((endpoint.host, endpoint.port))
            if monitor is not None and monitor is not upstream:
                monitor.upstream = upstream

    def _backend_changed(self, monitor: BackendMonitor) -> None:
        """A monitor's verdict or role changed: no new work for a down backend, and every
        database using it looks for its primary again."""
        address = (monitor.host, monitor.port)
        if not monitor.up:
            for key, pool in self.pools.items():
                if (key.host, key.port) == address:
                    pool.drop_idle()
        for database in self.config.databases.values():
            if any((b.host, b.port) == address for b in database.backends):
                self._resolve_primary(database)

    def _patroni_changed(self, watcher: PatroniWatcher) -> None:
        for name, patroni in self.patroni.items():
            if watcher in patroni.members.values():
                self._resolve_primary(self.config.databases[name])

    def _resolve_primary(self, database: Database) -> None:
        """Exactly one backend up and out of recovery (and, with Patroni, holding the leader
        lock): it is the primary. Two or more: fence the database (writes held, then refused)
        until one remains. None while the current primary is known to be down or in recovery:
        hold its writes until one appears."""
        patroni = self.patroni.get(database.name)
        leaders = None if patroni is None else patroni.leaders()
        claims = []
        for endpoint in database.backends:
            address = (endpoint.host, endpoint.port)
            monitor = self.monitors.get(address)
            writable = monitor is not None and monitor.up and monitor.in_recovery is False
            if writable and (leaders is None or address in leaders):
                claims.append(endpoint)
        name = database.name
        old = self.primary_endpoint(database)
        if len(claims) > 1:
            addresses = ", ".join(e.address for e in claims)
            if not self._hold(
                database,
                f'database "{name}" has more than one primary ({addresses}): pgrouter refuses '
                "writes until exactly one remains",
                fenced=True,
            ):
                log.error("split brain: writes refused", database=name, primaries=addresses)
            return
        if not claims:
            monitor = self.monitors.get((old.host, old.port))
            if monitor is None or monitor.up is None or (not monitor.up and monitor.refused):
                return  # not known to be down: keep it (its own errors tell the clients)
            state = f"is down ({monitor.error})" if not monitor.up else "is in recovery"
            reason = f'database "{name}" has no primary: {old.address} {state}'
            # Logins that need a first server's parameters wait only for a backend that is up
            # (at start the first of `hosts:` may be a replica); a down one refuses them at once.
            if not self._hold(database, reason, logins_wait=bool(monitor.up)):
                log.warning(
                    "no primary: writes wait",
                    database=name,
                    reason=reason,
                    failover_timeout=database.failover_timeout,
                )
            return
        new = claims[0]
        hold = self.holds.pop(name, None)
        if new != old:
            self.primaries[name] = new
            self.failovers[name] = self.failovers.get(name, 0) + 1
            log.warning(
                "primary changed",
                database=name,
                old=old.address,
                new=new.address,
                by="pg_is_in_recovery" if leaders is None else "patroni",
            )
            self._set_upstream(database)
        elif hold is not None and hold.fenced:
            log.warning("one primary again: writes accepted", database=name, primary=new.address)
        elif hold is not None:
            log.warning("primary back", database=name, primary=new.address)
        if new != old or hold is not None:
            self._repoint_clients(database)  # waiting transactions move to the primary
        if hold is not None:
            hold.close()
        if new != old:
            for key, pool in list(self.pools.items()):
                if key.database == name and (key.host, key.port) == (old.host, old.port):
                    pool.close()  # idle servers now, busy ones when their transaction ends

    def _hold(
        self, database: Database, reason: str, *, fenced: bool = False, logins_wait: bool = False
    ) -> bool:
        """Primary-bound transactions of `database` wait in a hold from now on; False when
        this starts the hold or changes its kind (the caller logs it)."""
        name = database.name
        hold = self.holds.get(name)
        if hold is not None:
            unchanged = hold.fenced == fenced
            hold.reason, hold.fenced, hold.logins_wait = reason, fenced, logins_wait
            hold.timeout = database.failover_timeout  # a reload may have changed it
            return unchanged
        stats = self.hold_stats.setdefault(name, HoldStats())
        hold = HoldingPool(
            PoolKey(name, "", "fenced" if fenced else "no primary", 0),
            database.dbname,
            self._pool_settings(database),
            timeout=database.failover_timeout,
            reason=reason,
            stats=stats,
            fenced=fenced,
        )
        hold.logins_wait = logins_wait
        hold.parameters = next(  # new clients can still log in and read
            (p.parameters for k, p in self.pools.items() if k.database == name and p.parameters),
            None,
        )
        self.holds[name] = hold
        self._repoint_clients(database)  # transactions queued for the primary wait here
        return False

    def _repoint_clients(self, database: Database) -> None:
        """Clients of `database` take their primary pool from here from now on."""
        for client in list(self.clients):
            db = client.database
            if db is not None and db.name == database.name and client.primary_pool is not None:
                client.primary_changed(self.primary_pool(database, client.user))

    def _start_routers(self) -> None:
        """A router for every database with replicas that may take reads. On a reload, a
        database's router stays (with what it learned) and takes the new routing options."""
        login = self._monitor_login()
        wanted = {
            name: database
            for name, database in self.config.databases.items()
            if login is not None and database.replicas and database.routing.reads != "primary"
        }
        for name in [n for n in self.routers if n not in wanted]:
            self.routers.pop(name).stop()
        for name, database in wanted.items():
            assert login is not None
            router = self.routers.get(name)
            if router is None:
                router = self.routers[name] = Router(self, database, login)
                router.start()
            else:
                router.login = login
                router.reconfigure(database)

    def router_for(self, database: Database) -> Router | None:
        return self.routers.get(database.name)

    def reload(self, config: Config) -> None:
        """Use `config` for new logins and pool settings; connected clients stay."""
        if config.log.level != self.config.log.level:
            log.info("log level changed", old=self.config.log.level, new=config.log.level)
        set_level(config.log.level)
        self.config = config
        self._secrets.clear()
        self.auth_query.clear()
        for key, pool in self.pools.items():
            database = config.databases.get(key.database)
            if (
                database is None
                or pool.dbname != database.dbname
                or not any((b.host, b.port) == (key.host, key.port) for b in database.backends)
            ):
                pool.close()  # new transactions open a pool for what the file says now
            else:
                pool.settings = self._pool_settings(database)
                pool.password = self._server_password(key.database, key.user)
        for name, endpoint in list(self.primaries.items()):
            database = config.databases.get(name)
            if database is None or endpoint not in database.backends:
                del self.primaries[name]
        for name in [n for n in self.holds if n not in config.databases]:
            self.holds.pop(name).close()
        if self._janitor is not None:  # running: the backends may have changed
            self._start_monitors()
            self._start_routers()
            for database in config.databases.values():
                self._resolve_primary(database)
        for client in list(self.clients):
            old = client.database
            new = config.databases.get(old.name) if old is not None else None
            if new is not None and new is not old:
                router = self.routers.get(new.name)
                client.reconfigured(new, router, self.primary_pool(new, client.user))
        log.info("configuration reloaded", databases=len(config.databases))

    # ---- admin commands -----------------------------------------------------------------------

    def _pools_of(self, database: str | None) -> list[Pool]:
        return [p for k, p in self.pools.items() if database is None or k.database == database]

    def pause(self, database: str | None = None) -> None:
        """PAUSE: new transactions wait; running ones finish."""
        self.paused.add(database or "*")
        for pool in self._pools_of(database):
            pool.pause()
        log.info("paused", database=database or "all")

    def is_paused(self, database: str) -> bool:
        """Still held by PAUSE (`database` "*": everything)."""
        return "*" in self.paused or database in self.paused

    def transactions_running(self, database: str) -> int:
        """Server connections of `database` ("*": all) inside a client's transaction. Servers
        kept by session-mode or pinned clients between transactions do not count."""
        return sum(
            pool.busy() for pool in self.pools.values() if database in ("*", pool.key.database)
        )

    def resume(self, database: str | None = None) -> None:
        if database is None:
            self.paused.clear()
        else:
            self.paused.discard(database)
        for pool in self._pools_of(database):
            if "*" not in self.paused and pool.key.database not in self.paused:
                pool.resume()
        log.info("resumed", database=database or "all")

    def reload_from_file(self) -> list[str]:
        """RELOAD / SIGHUP: the file's errors, or [] when the new configuration is in use."""
        if self.config.source is None:
            return ["the configuration was not loaded from a file"]
        try:
            self.reload(load_config(self.config.source))
        except ConfigError as exc:
            log.error("reload rejected; keeping the running configuration", errors=exc.errors)
            return exc.errors
        return []

    def request_shutdown(self) -> None:
        if self.on_shutdown_request is not None:
            self.on_shutdown_request()

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_INTERVAL)
            now = time.monotonic()
            for pool in list(self.pools.values()):
                pool.maintain(now)
            self._expire_logins(now)

    def _expire_logins(self, now: float) -> None:
        """Cut clients still logging in after client_login_timeout (oldest first)."""
        timeout = self.config.client_login_timeout
        logins = self._logins
        while logins and (not logins[0].logging_in or now - logins[0].connected_at >= timeout):
            client = logins.popleft()
            if client.logging_in:
                client.login_timed_out()

    def admin_console(self) -> AdminConsole:
        """The console of one admin session (with several workers, one that gathers)."""
        if self.console_factory is not None:
            return self.console_factory()
        from router.admin import AdminConsole

        return AdminConsole(self)

    # ---- clients ------------------------------------------------------------------------------

    @property
    def client_count(self) -> int:
        return len(self.clients)

    def client_connected(self, client: ClientSession) -> None:
        self.clients.add(client)
        self._logins.append(client)

    def client_gone(self, client: ClientSession) -> None:
        self.clients.discard(client)
        self.limits.release(client)
        if self._cancel_keys.get(client.key[0]) is client:
            del self._cancel_keys[client.key[0]]

    def count_error(self, sqlstate: str) -> None:
        self.errors[sqlstate[:2]] = self.errors.get(sqlstate[:2], 0) + 1

    def repin(self, old: frozenset[str], new: frozenset[str]) -> None:
        """A client's pin reasons changed from `old` to `new`."""
        for reason in new - old:
            self.pinned[reason] += 1
            self.pins_total[reason] += 1
        self.unpin(old - new)

    def unpin(self, reasons: frozenset[str]) -> None:
        for reason in reasons:
            self.pinned[reason] -= 1

    def register_cancel_key(self, client: ClientSession) -> tuple[int, int]:
        """A fresh key; with several workers its pid modulo their number is our index."""
        count = self.worker_count
        while True:
            key = new_cancel_key()
            if count > 1:
                key = ((key[0] >> 7) * count + self.worker_index, key[1])  # < 2**31
            if key[0] and key[0] not in self._cancel_keys:
                self._cancel_keys[key[0]] = client
                return key

    def cancel(self, key: tuple[int, int], forwarded: bool = False) -> bool:
        """Forward a CancelRequest to the server serving the client with exactly this key
        (False: no client has it). A key issued elsewhere goes there, unless `forwarded`:
        a request passed on is not passed on again by this method."""
        client = self._cancel_keys.get(key[0])
        if not forwarded:
            self.cancel_requests += 1
            if client is None and self.cancel_elsewhere is not None:
                self.cancel_elsewhere(key)
        if client is None:
            return False
        if not hmac.compare_digest(key[1].to_bytes(4, "big"), client.key[1].to_bytes(4, "big")):
            return False
        server = client.server
        if server is None:
            client.cancel_waiting()
            return True
        asyncio.get_running_loop().create_task(
            _quiet(send_cancel(server.host, server.port, server.backend_key))
        )
        return True

    def auth_method(
        self, client: ClientSession, user: str, database: str
    ) -> tuple[str, str | None]:
        """How `client` must authenticate as `user` for `database`: (method, None), or
        (reject, the 28000 message) when auth_rules refuse it. Without auth_rules every
        client gets auth_type. An md5 rule checks a user known only by a SCRAM verifier with
        SCRAM, as PostgreSQL does."""
        config = self.config
        rules = config.auth_rules
        if rules is None:
            return config.auth_type, None
        address = peer_address(client.transport.get_extra_info("peername"))
        rule = choose_rule(rules, database, user, address)
        refusal = rule_refusal(rule, database, user, address)
        if rule is None or refusal is not None:
            self.login_refusals += 1
            log.info(
                "login refused by auth_rules",
                client=client.peer,
                user=user,
                database=database,
                rule=None if rule is None else rule.index,
            )
            return "reject", refusal
        return rule.method, None

    def admit(self, client: ClientSession) -> str | None:
        """Count a client that just logged in against the limits of its user and database;
        the 53300 message when it is over one. Admin console clients are not counted."""
        database = client.database
        assert database is not None
        config = self.config
        current = config.databases.get(database.name, database)  # a reload may have changed it
        refusal = self.limits.admit(
            client,
            client.user,
            database.name,
            config.user_client_limit(client.user),
            current.max_db_client_connections,
        )
        if refusal is not None:
            self.login_refusals += 1
            log.info(
                "client limit reached", client=client.peer, user=client.user, database=database.name
            )
        return refusal

    def client_auth(self, client: ClientSession, user: str, method: str) -> ClientAuth | None:
        """The check of `client`'s credentials, or None while auth_query looks the user up
        (then ``client.begin_auth`` or ``client.fatal`` follows)."""
        config = self.config
        if method == "trust" or config.auth_user is None or user in config.users:
            return self._client_auth(user, method, *self.user_secrets(user, method))
        database = client.database
        if config.auth_dbname is not None:
            database = config.databases.get(config.auth_dbname)
        if database is None:  # the admin console without auth_dbname: topology users only
            return self._client_auth(user, method, *self.user_secrets(user, method))
        key: LookupKey = (database.primary.host, database.primary.port, user)
        found, secret = self.auth_query.cached(key)
        if found:
            return self._looked_up_auth(user, method, secret)

        def done(secret: str | None, error: str | None) -> None:
            if error is not None:
                client.fatal(e.CONNECTION_FAILURE, "could not look up the user (auth_query failed)")
            else:
                client.begin_auth(self._looked_up_auth(user, method, secret))

        auth_user = config.users[config.auth_user]
        self.auth_query.lookup(
            key,
            database.dbname,
            (auth_user.name, auth_user.password),
            config.auth_query,
            config.server_connect_timeout,
            config.auth_query_ttl,
            done,
            config.server_tls,
        )
        return None

    def _looked_up_auth(self, user: str, method: str, secret: str | None) -> ClientAuth:
        """A ClientAuth for a secret auth_query found (None: no such user)."""
        if secret is None:
            return self._client_auth(user, method, *self._unknown_user(method))
        if secret.startswith(SCRAM_PREFIX):
            try:
                info = parse_scram_verifier(secret)
            except ValueError:
                log.warning("auth_query returned a malformed SCRAM verifier", user=user)
                return self._client_auth(user, method, *self._unknown_user(method))
            return self._client_auth(user, method, None, info)
        if is_md5_hash(secret):
            return ClientAuth(method, user, None, md5_hash=secret)
        derived = scram_auth_info(secret) if method == "scram-sha-256" else None  # cleartext
        return self._client_auth(user, method, secret, derived)

    def _client_auth(
        self, user: str, method: str, password: str | None, info: ScramAuthInfo | None
    ) -> ClientAuth:
        """md5 for a user known only by a SCRAM verifier is SCRAM, as in PostgreSQL."""
        if method == "md5" and password is None and info is not None:
            method = "scram-sha-256"
        return ClientAuth(method, user, password, info)

    def _unknown_user(self, method: str) -> tuple[str | None, ScramAuthInfo | None]:
        """Random secrets: the exchange fails exactly like a wrong password."""
        if method == "trust":
            return None, None
        if self._dummy_scram is None:
            self._dummy_scram = scram_auth_info(secrets.token_hex(16))
        return secrets.token_hex(16), self._dummy_scram

    def learn_server_secret(self, database: Database, user: str, auth: ClientAuth | None) -> None:
        """After a client logged in: what lets its pools log in to the servers when the
        topology has no cleartext password for the user (SCRAM pass-through, md5 hash)."""
        entry = self.config.users.get(user)
        if auth is None or (entry is not None and entry.password is not None):
            return
        secret: ServerSecret = auth.scram_keys
        if secret is None and auth.md5_hash is not None:
            secret = Md5Hash(auth.md5_hash)
        elif secret is None and entry is None:
            secret = auth.password  # cleartext from auth_query
        if secret is None:
            return
        self._server_secrets[(database.name, user)] = secret
        for key, pool in self.pools.items():
            if key.user == user and key.database == database.name:
                pool.password = secret

    def user_secrets(self, user: str, method: str) -> tuple[str | None, ScramAuthInfo | None]:
        """The password and SCRAM keys to check `user` with (PBKDF2 runs once per user).

        An unknown user gets random secrets, so the exchange fails exactly like a wrong
        password and never reveals whether the user exists.
        """
        cached = self._secrets.get((user, method))
        if cached is not None:
            return cached
        entry = self.config.users.get(user)
        if entry is None:
            return self._unknown_user(method)
        info: ScramAuthInfo | None = None
        if entry.scram_verifier and method != "trust":  # md5 and cleartext can use it too
            info = parse_scram_verifier(entry.scram_verifier)
        elif method == "scram-sha-256" and entry.password is not None:
            info = scram_auth_info(entry.password)
        result = (entry.password, info)
        self._secrets[(user, method)] = result
        return result

    # ---- pools --------------------------------------------------------------------------------

    def _share(self, size: int) -> int:
        """This worker's part of `size`: equal parts, the remainder to the first workers."""
        count = self.worker_count
        return size // count + (self.worker_index < size % count)

    def _pool_settings(self, database: Database) -> PoolSettings:
        c = self.config
        return PoolSettings(
            pool_size=self._share(database.pool_size),
            min_pool_size=self._share(database.min_pool_size),
            server_idle_timeout=c.server_idle_timeout,
            server_lifetime=c.server_lifetime,
            server_connect_timeout=c.server_connect_timeout,
            query_wait_timeout=c.query_wait_timeout,
            server_reset_query=database.server_reset_query
            if database.pool_mode == "session"
            else "",
            server_tls=c.server_tls,
        )

    def _server_password(self, database: str, user: str) -> ServerSecret:
        entry = self.config.users.get(user)
        if entry is not None and entry.password is not None:
            return entry.password
        return self._server_secrets.get((database, user))

    def pool_for(self, database: Database, user: str, endpoint: Endpoint | None = None) -> Pool:
        """The pool for (database, user, backend); the primary until routing picks another."""
        backend = endpoint or self.primaries.get(database.name, database.primary)
        key = PoolKey(database.name, user, backend.host, backend.port)
        pool = self.pools.get(key)
        if pool is None or pool.closed:
            pool = Pool(
                key,
                database.dbname,
                self._server_password(database.name, user),
                self._pool_settings(database),
            )
            pool.on_trouble = self.backend_trouble
            if self.is_paused(database.name):
                pool.pause()  # a pool first used while its database is paused is held too
            self.pools[key] = pool
        return pool


async def _quiet(coro: object) -> None:
    """Run a fire-and-forget coroutine, logging instead of raising."""
    try:
        await coro  # type: ignore[misc]
    except (OSError, TimeoutError) as exc:
        log.info("cancel request not delivered", error=str(exc))
