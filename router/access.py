"""Who may log in, and how: ``auth_rules`` (like pg_hba.conf) and the client limits per user
and per database (``max_user_client_connections``, ``max_db_client_connections``).

Login path only: nothing here runs per message.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address

from router.config import AuthRule

__all__ = ["ClientLimits", "choose_rule", "peer_address", "rule_refusal"]

IPAddress = IPv4Address | IPv6Address


def peer_address(peername: object) -> IPAddress | None:
    """The client's IP address from a transport's ``peername``; None for a client that is not
    an IP client (a Unix socket). An IPv4 client seen on a dual-stack IPv6 socket
    (``::ffff:10.1.2.3``) is its IPv4 address, so IPv4 rules match it."""
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return None
    try:
        address = ip_address(peername[0])
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def choose_rule(
    rules: Sequence[AuthRule], database: str, user: str, address: IPAddress | None
) -> AuthRule | None:
    """The first rule that matches, as pg_hba.conf is read; None when none does."""
    for rule in rules:
        if rule.matches(database, user, address):
            return rule
    return None


def rule_refusal(
    rule: AuthRule | None, database: str, user: str, address: IPAddress | None
) -> str | None:
    """PostgreSQL's wording for a login refused by the rules (28000), in pgrouter's terms;
    None when the rule lets the client go on to authenticate."""
    if rule is not None and rule.method != "reject":
        return None
    host = "[local]" if address is None else str(address)
    who = f'host "{host}", user "{user}", database "{database}"'
    if rule is None:
        return f"no pgrouter auth_rules entry for {who}"
    return f"pgrouter auth_rules rejects connection for {who}"


class ClientLimits:
    """Logged-in clients per user and per database, checked against their limits at login.

    Every admitted client is counted (also when no limit is set), so a limit introduced by a
    reload applies to the clients already connected. A client is counted once, from `admit`
    until `release`.
    """

    __slots__ = ("_admitted", "per_database", "per_user")

    def __init__(self) -> None:
        self.per_user: dict[str, int] = {}
        self.per_database: dict[str, int] = {}
        self._admitted: dict[object, tuple[str, str]] = {}

    def admit(
        self,
        client: object,
        user: str,
        database: str,
        user_limit: tuple[int, str],
        database_limit: int,
    ) -> str | None:
        """Count `client` in, or say which limit it is over (the database's is checked first,
        as PostgreSQL does). `user_limit` is (limit, the setting's name); 0 is unlimited."""
        if client in self._admitted:
            return None
        if database_limit and self.per_database.get(database, 0) >= database_limit:
            return (
                f'no more connections allowed for database "{database}" (max_db_client_connections)'
            )
        limit, setting = user_limit
        if limit and self.per_user.get(user, 0) >= limit:
            return f'no more connections allowed for user "{user}" ({setting})'
        self.per_user[user] = self.per_user.get(user, 0) + 1
        self.per_database[database] = self.per_database.get(database, 0) + 1
        self._admitted[client] = (user, database)
        return None

    def release(self, client: object) -> None:
        """The client left: its user and database have one connection fewer."""
        held = self._admitted.pop(client, None)
        if held is None:
            return
        user, database = held
        for counts, key in ((self.per_user, user), (self.per_database, database)):
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]
