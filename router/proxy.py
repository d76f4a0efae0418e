"""The running proxy: listeners, the pools of every database, client registry, janitor."""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable

import structlog

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
from router.logs import set_level
from router.routing import Router
from router.statements import StatementRegistry

log = structlog.get_logger("pgrouter.proxy")
JANITOR_INTERVAL = 0.5


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pools: dict[PoolKey, Pool] = {}
        self.clients: set[ClientSession] = set()
        self.listeners: list[asyncio.Server] = []
        self.http: asyncio.Server | None = None
        self.monitors: dict[tuple[str, int], BackendMonitor] = {}  # by backend address
        self.patroni_watchers: dict[str, PatroniWatcher] = {}  # by REST API URL
        self.patroni: dict[str, PatroniCluster] = {}  # databases whose leader Patroni decides
        self.routers: dict[str, Router] = {}  # databases whose reads may go to replicas
        # Where each database's writes go now: its configured primary until a monitor shows
        # another backend promoted. `fenced` holds the databases refusing writes because two
        # backends claim to be primary, with the pool that answers the refusal.
        self.primaries: dict[str, Endpoint] = {}
        self.fenced: dict[str, Pool] = {}
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

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.config.listen:
            server = await loop.create_server(
                lambda: ClientSession(self),
                None if host in ("*", "") else host,  # every interface
                port,
                reuse_address=True,
                backlog=2048,
            )
            self.listeners.append(server)
            log.info("listening", address=f"{host}:{port}")
        if self.config.admin.http is not None:
            from router.http import start_http

            host, port = self.config.admin.http
            self.http = await start_http(self, host, port)
        self._janitor = loop.create_task(self._janitor_loop())
        self._start_monitors()
        self._start_routers()
        for database in self.config.databases.values():
            for user in self.config.users:
                if database.min_pool_size > 0:
                    self.pool_for(database, user).fill()

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let linked clients finish their transactions, then close."""
        for server in self.listeners:
            server.close()
        if self.http is not None:
            self.http.close()
        deadline = time.monotonic() + timeout
        while any(c.server is not None or c.waiting for c in self.clients):
            if time.monotonic() > deadline:
                break
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
        """One monitor per backend address, shared by the databases that use it."""
        login = self._monitor_login()
        if login is None:
            log.warning("no user with a password: backends are not monitored")
            return
        c = self.config
        for database in c.databases.values():
            for endpoint in database.backends:
                address = (endpoint.host, endpoint.port)
                if address not in self.monitors:
                    monitor = BackendMonitor(
                        endpoint.host,
                        endpoint.port,
                        login[0],
                        login[1],
                        database.dbname,
                        tls=self.config.server_tls,
                        interval=c.health_check_interval,
                        timeout=c.health_check_timeout,
                        fall=c.health_check_fall,
                        rise=c.health_check_rise,
                    )
                    monitor.listeners.append(self._backend_changed)
                    self.monitors[address] = monitor
        for database in c.databases.values():
            self._set_upstream(database)
            self._watch_patroni(database)
        for monitor in self.monitors.values():
            monitor.start()
        for watcher in self.patroni_watchers.values():
            watcher.start()

    def _watch_patroni(self, database: Database) -> None:
        """A database whose members name their Patroni REST API: Patroni decides its leader."""
        members: dict[tuple[str, int], PatroniWatcher] = {}
        for endpoint in database.backends:
            if endpoint.patroni is None:
                continue
            watcher = self.patroni_watchers.get(endpoint.patroni)
            if watcher is None:
                watcher = PatroniWatcher(
                    endpoint.patroni,
                    interval=self.config.health_check_interval,
                    timeout=self.config.health_check_timeout,
                )
                watcher.listeners.append(self._patroni_changed)
                self.patroni_watchers[endpoint.patroni] = watcher
            members[(endpoint.host, endpoint.port)] = watcher
        if members:
            self.patroni[database.name] = PatroniCluster(database.name, members)

    # ---- health and failover ------------------------------------------------------------------

    def primary_endpoint(self, database: Database) -> Endpoint:
        """Where `database`'s writes go now."""
        return self.primaries.get(database.name, database.primary)

    def primary_pool(self, database: Database, user: str) -> Pool:
        """The pool a client's primary-bound transactions use: the current primary's, or the
        refusing pool of a fenced database."""
        fenced = self.fenced.get(database.name)
        if fenced is not None:
            return fenced
        return self.pool_for(database, user)

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
        lock): it is the primary. Two or more: fence the database (writes refused) until one
        remains. None: keep the current one (its connection errors tell the clients)."""
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
        if len(claims) > 1:
            if name not in self.fenced:
                self._fence(database, claims)
            return
        if not claims:
            return
        new = claims[0]
        old = self.primary_endpoint(database)
        was_fenced = self.fenced.pop(name, None) is not None
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
        elif was_fenced:
            log.warning("one primary again: writes accepted", database=name, primary=new.address)
        if new != old or was_fenced:
            self._repoint_clients(database)  # queued transactions move to the new primary
        if new != old:
            for key, pool in list(self.pools.items()):
                if key.database == name and (key.host, key.port) == (old.host, old.port):
                    pool.close()  # idle servers now, busy ones when their transaction ends

    def _fence(self, database: Database, claims: list[Endpoint]) -> None:
        name = database.name
        addresses = ", ".join(e.address for e in claims)
        message = (
            f'database "{name}" has more than one primary ({addresses}): pgrouter refuses '
            "writes until exactly one remains"
        )
        log.error("split brain: writes refused", database=name, primaries=addresses)
        pool = Pool(
            PoolKey(name, "", "fenced", 0), database.dbname, None, self._pool_settings(database)
        )
        pool.parameters = next(  # new clients can still log in and read
            (p.parameters for k, p in self.pools.items() if k.database == name and p.parameters),
            None,
        )
        pool.closed = True
        pool.refusal = (e.CONNECTION_FAILURE, message)
        self.fenced[name] = pool
        self._repoint_clients(database)

    def _repoint_clients(self, database: Database) -> None:
        """Clients of `database` take their primary pool from here from now on."""
        for client in list(self.clients):
            db = client.database
            if db is not None and db.name == database.name and client.primary_pool is not None:
                client.primary_changed(self.primary_pool(database, client.user))

    def _start_routers(self) -> None:
        """A router for every database with replicas that may take reads."""
        login = self._monitor_login()
        if login is None:
            return
        for database in self.config.databases.values():
            if database.replicas and database.routing.reads != "primary":
                router = Router(self, database, login)
                self.routers[database.name] = router
                router.start()

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
            if database is None:
                pool.close()
            else:
                pool.settings = self._pool_settings(database)
                pool.password = self._server_password(key.database, key.user)
        if self._janitor is not None:  # running: the backends may have changed
            for monitor in self.monitors.values():
                monitor.stop()
            for watcher in self.patroni_watchers.values():
                watcher.stop()
            for router in self.routers.values():
                router.stop()
            self.monitors.clear()
            self.patroni_watchers.clear()
            self.patroni.clear()
            self.routers.clear()
            for name, endpoint in list(self.primaries.items()):
                database = config.databases.get(name)
                if database is None or endpoint not in database.backends:
                    del self.primaries[name]
            self.fenced.clear()
            self._start_monitors()
            self._start_routers()
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
        while True:
            key = new_cancel_key()
            if key[0] not in self._cancel_keys:
                self._cancel_keys[key[0]] = client
                return key

    def cancel(self, key: tuple[int, int]) -> None:
        """Forward a CancelRequest to the server serving the client with exactly this key."""
        self.cancel_requests += 1
        client = self._cancel_keys.get(key[0])
        if client is None:
            return
        if not hmac.compare_digest(key[1].to_bytes(4, "big"), client.key[1].to_bytes(4, "big")):
            return
        server = client.server
        if server is None:
            client.cancel_waiting()
            return
        asyncio.get_running_loop().create_task(
            _quiet(send_cancel(server.host, server.port, server.backend_key))
        )

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

    def _pool_settings(self, database: Database) -> PoolSettings:
        c = self.config
        return PoolSettings(
            pool_size=database.pool_size,
            min_pool_size=database.min_pool_size,
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
