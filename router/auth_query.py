"""auth_query: the secrets of users who are not in the topology, read from the servers.

``auth_user`` logs in to the primary of the database a client asks for (or of
``auth_dbname``) and runs ``auth_query`` with ``$1`` replaced by the user name as a quoted
literal (simple protocol). The second column of the first row is the user's secret: a SCRAM
verifier, an md5 hash, or a cleartext password; no row or NULL means no such user. Answers,
also "no such user", are reused for ``auth_query_ttl`` seconds, and logins waiting for the same
user share one query. Secrets never reach a log.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import structlog

from pools.server import TLSOptions, open_server
from protocol.auth import LoginError

__all__ = ["AuthQuery", "LookupKey", "auth_query_sql"]

log = structlog.get_logger("pgrouter.auth_query")

_PARAM = re.compile(r"\$1(?!\d)")
#: (primary host, primary port, user): secrets belong to a cluster, not to one database.
LookupKey = tuple[str, int, str]
Done = Callable[[str | None, str | None], None]  # (secret or None, error or None)


def auth_query_sql(query: str, user: str) -> str:
    """`query` with ``$1`` replaced by `user` as a string literal that is safe whatever
    standard_conforming_strings says (as PostgreSQL's quote_literal: E'' for backslashes)."""
    text = user.replace("'", "''")
    literal = "E'" + text.replace("\\", "\\\\") + "'" if "\\" in text else f"'{text}'"
    return _PARAM.sub(lambda _: literal, query)


class AuthQuery:
    """The cache of looked-up secrets and the lookups in flight."""

    def __init__(self) -> None:
        self._cache: dict[LookupKey, tuple[float, str | None]] = {}
        self._waiting: dict[LookupKey, list[Done]] = {}
        self.lookups = 0  # queries run
        self.failures = 0

    def cached(self, key: LookupKey, now: float | None = None) -> tuple[bool, str | None]:
        """(found, secret): found is False when the key must be looked up (again)."""
        entry = self._cache.get(key)
        if entry is None:
            return False, None
        expires, secret = entry
        if (time.monotonic() if now is None else now) >= expires:
            del self._cache[key]
            return False, None
        return True, secret

    def clear(self) -> None:
        """Forget every answer (a reload may have changed the query or the servers)."""
        self._cache.clear()

    def lookup(
        self,
        key: LookupKey,
        dbname: str,
        login: tuple[str, str | None],
        query: str,
        timeout: float,
        ttl: float,
        done: Done,
        tls: TLSOptions | None = None,
    ) -> None:
        """Look `key` up on its server; `done(secret, None)` or `done(None, error)` later."""
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(done)
            return
        self._waiting[key] = [done]
        asyncio.get_running_loop().create_task(
            self._run(key, dbname, login, auth_query_sql(query, key[2]), timeout, ttl, tls)
        )

    async def _run(
        self,
        key: LookupKey,
        dbname: str,
        login: tuple[str, str | None],
        sql: str,
        timeout: float,
        ttl: float,
        tls: TLSOptions | None = None,
    ) -> None:
        host, port, user = key
        secret: str | None = None
        error: str | None = None
        self.lookups += 1
        try:
            async with asyncio.timeout(2 * timeout):
                conn = await open_server(
                    host,
                    port,
                    login[0],
                    login[1],
                    {"database": dbname, "application_name": "pgrouter auth_query"},
                    timeout,
                    tls,
                )
                try:
                    rows = await conn.query(sql)
                finally:
                    conn.close()
            if rows and len(rows[0]) < 2:
                error = "auth_query must return two columns (user name, secret)"
            elif rows and rows[0][1]:
                secret = rows[0][1]
        except LoginError as exc:
            error = f"{exc.sqlstate}: {exc.message}"
        except (OSError, TimeoutError, ConnectionError) as exc:
            error = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
        if error is not None:
            self.failures += 1
            log.warning(
                "auth_query failed",
                server=f"{host}:{port}",
                database=dbname,
                user=user,
                error=error,
            )
        elif ttl > 0:
            self._cache[key] = (time.monotonic() + ttl, secret)
        for done in self._waiting.pop(key, ()):
            done(secret, error)
