"""Authentication exchanges, both sides, as sans-IO state machines.

`ServerLogin` logs the proxy in to a PostgreSQL server (trust, cleartext, md5, SCRAM-SHA-256)
with a password, an md5 hash (`Md5Hash`, md5 servers only) or SCRAM keys learned from a
client's own SCRAM exchange (`ScramKeys`, pass-through). `ClientAuth` checks a connecting
client (trust, cleartext, md5, SCRAM-SHA-256) against a password, an md5 hash or a SCRAM
verifier. SCRAM is `protocol.scram` (SASLprep from scramp); the PBKDF2 work is done once per
password by `scram_auth_info`, not per login.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import struct
from dataclasses import dataclass, field

from protocol import messages as m
from protocol.errors import INVALID_PASSWORD, PROTOCOL_VIOLATION, parse_error_fields
from protocol.framing import MessageReader
from protocol.scram import ScramClient, ScramError, ScramVerifier, derive_keys

_I32 = struct.Struct("!I")
SCRAM_ITERATIONS = 4096
ScramAuthInfo = tuple[bytes, bytes, bytes, int]  # salt, stored key, server key, iterations
_MD5_HASH = re.compile(r"md5[0-9a-f]{32}")


class Md5Hash(str):
    """PostgreSQL's md5 verifier ('md5' + md5(password + user)) standing in for a password:
    it answers md5 challenges, never cleartext or SCRAM ones."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Md5Hash(...)"


def is_md5_hash(text: str) -> bool:
    return _MD5_HASH.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """ClientKey and ServerKey from a client's SCRAM exchange: enough to log in to a server
    that stores the same verifier (same salt and iterations), without the password."""

    client_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


ServerSecret = str | ScramKeys | None  # a str may be an Md5Hash


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_password(user: str, password: str, salt: bytes) -> str:
    """The md5 response libpq sends: 'md5' + md5(md5(password + user) + salt)."""
    inner = md5_hex(password.encode() + user.encode())
    return "md5" + md5_hex(inner.encode() + salt)


def scram_auth_info(password: str, iterations: int = SCRAM_ITERATIONS) -> ScramAuthInfo:
    """Salt and keys for verifying SCRAM logins against a cleartext password (PBKDF2 once)."""
    salt = secrets.token_bytes(16)
    _, stored_key, server_key = derive_keys(password, salt, iterations)
    return salt, stored_key, server_key, iterations


def parse_scram_verifier(verifier: str) -> ScramAuthInfo:
    """Decode PostgreSQL's 'SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>'."""
    try:
        method, rest = verifier.split("$", 1)
        iter_salt, keys = rest.split("$", 1)
        iters, salt = iter_salt.split(":", 1)
        stored, server = keys.split(":", 1)
        if method != "SCRAM-SHA-256":
            raise ValueError(method)
        return (
            base64.b64decode(salt, validate=True),
            base64.b64decode(stored, validate=True),
            base64.b64decode(server, validate=True),
            int(iters),
        )
    except (ValueError, TypeError) as exc:
        raise ValueError("not a SCRAM-SHA-256 verifier") from exc


class LoginError(Exception):
    """A server refused the login, or spoke out of turn."""

    def __init__(self, sqlstate: str, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.fields = fields or {}


class ServerLogin:
    """Startup and authentication of one server connection, then its welcome parameters."""

    def __init__(self, user: str, password: ServerSecret, params: dict[str, str]) -> None:
        self.user = user
        self.password = password
        self.params = {"user": user, **params}
        self.reader = MessageReader(1 << 20)
        self.parameters: dict[str, str] = {}
        self.backend_key: tuple[int, int] = (0, 0)
        self.done = False
        self._scram: ScramClient | None = None

    def startup(self) -> bytes:
        return m.startup_message(self.params)

    def feed(self, data: bytes) -> bytes:
        """Consume server bytes; return what to send back. Raises LoginError on refusal."""
        self.reader.feed(data)
        out = []
        while not self.done and (msg := self.reader.next()) is not None:
            kind, body = msg
            if kind == ord("R"):
                out.append(self._authenticate(body))
            elif kind == ord("S"):
                name, value = m.parse_parameter_status(body)
                self.parameters[name] = value
            elif kind == ord("K"):
                self.backend_key = struct.unpack("!II", body[:8])
            elif kind == ord("Z"):
                self.done = True
            elif kind == ord("E"):
                fields = parse_error_fields(body)
                raise LoginError(fields.get("C", "XX000"), fields.get("M", "login failed"), fields)
            elif kind in (ord("N"), ord("v")):
                continue
            else:
                raise LoginError(
                    PROTOCOL_VIOLATION, f"unexpected message {chr(kind)!r} during login"
                )
        return b"".join(out)

    def _need_password(self, request: str) -> str:
        """The cleartext password; a clear LoginError when only another form is known."""
        secret = self.password
        if secret is None:
            raise LoginError(INVALID_PASSWORD, f"server asks a password for user {self.user!r} "
                             "and none is configured")  # fmt: skip
        if isinstance(secret, ScramKeys | Md5Hash):
            known = "SCRAM keys" if isinstance(secret, ScramKeys) else "an md5 hash"
            raise LoginError(
                INVALID_PASSWORD,
                f"server asks {request} for user {self.user!r}; only {known} of the password "
                "is known",
            )
        return secret

    def _authenticate(self, body: bytes) -> bytes:
        (code,) = _I32.unpack_from(body)
        payload = body[4:]
        if code == m.AUTH_OK:
            return b""
        if code == m.AUTH_CLEARTEXT:
            return m.password_message(m.cstr(self._need_password("a cleartext password")))
        if code == m.AUTH_MD5:
            if isinstance(self.password, Md5Hash):
                reply = "md5" + md5_hex(self.password[3:].encode() + payload[:4])
            else:
                reply = md5_password(self.user, self._need_password("md5"), payload[:4])
            return m.password_message(m.cstr(reply))
        if code == m.AUTH_SASL:
            mechanisms = m.split_cstrings(payload)
            if "SCRAM-SHA-256" not in mechanisms:
                raise LoginError(PROTOCOL_VIOLATION, f"no supported SASL mechanism in {mechanisms}")
            keys = self.password
            if isinstance(keys, ScramKeys):
                self._scram = ScramClient(client_key=keys.client_key, server_key=keys.server_key)
            else:
                self._scram = ScramClient(self._need_password("SCRAM-SHA-256"))
            first = self._scram.client_first().encode()
            return m.sasl_initial_response("SCRAM-SHA-256", first)
        try:
            if code == m.AUTH_SASL_CONTINUE and self._scram is not None:
                final = self._scram.client_final(payload.decode())
                return m.password_message(final.encode())
            if code == m.AUTH_SASL_FINAL and self._scram is not None:
                self._scram.verify_server_final(payload.decode())
                return b""
        except (ScramError, UnicodeDecodeError) as exc:
            raise LoginError(INVALID_PASSWORD, f"SCRAM login to the server failed: {exc}") from exc
        raise LoginError(PROTOCOL_VIOLATION, f"unsupported authentication request {code}")


class AuthFailed(Exception):
    """The client's credentials were wrong; the reason is for logs, never for the client."""


class ClientAuth:
    """Checks one client's credentials. `start()` gives the first request to send; each
    PasswordMessage body goes to `feed()`, which returns the next message to send. When
    `done` is true the caller sends AuthenticationOk.

    The secret is a cleartext `password`, an `md5_hash` (md5 and cleartext exchanges) or
    `scram_info` (SCRAM, and cleartext exchanges at the cost of one PBKDF2)."""

    def __init__(
        self,
        method: str,
        user: str,
        password: str | None,
        scram_info: ScramAuthInfo | None = None,
        md5_hash: str | None = None,
    ) -> None:
        self.method = method
        self.user = user
        self.password = password
        self.scram_info = scram_info
        self.md5_hash = md5_hash
        self.done = False
        self._salt = b""
        self._scram: ScramVerifier | None = None

    def start(self) -> bytes:
        if self.method == "trust":
            self.done = True
            return b""
        if self.method == "plain":
            return m.authentication(m.AUTH_CLEARTEXT)
        if self.method == "md5":
            self._salt = secrets.token_bytes(4)
            return m.authentication(m.AUTH_MD5, self._salt)
        if self.method == "scram-sha-256":
            return m.authentication_sasl(["SCRAM-SHA-256"])
        raise ValueError(f"unknown auth method {self.method}")

    @property
    def scram_keys(self) -> ScramKeys | None:
        """After a successful SCRAM exchange: the keys that log in to servers storing the same
        verifier (pass-through)."""
        scram = self._scram
        if not self.done or scram is None or scram.client_key is None:
            return None
        return ScramKeys(scram.client_key, scram.server_key)

    def feed(self, body: bytes) -> bytes:
        if self.method == "plain":
            if not self._cleartext_matches(body.rstrip(b"\0")):
                raise AuthFailed("password mismatch")
            self.done = True
            return b""
        if self.method == "md5":
            if self.password is not None:
                expected = md5_password(self.user, self.password, self._salt).encode()
            elif self.md5_hash is not None:
                expected = b"md5" + md5_hex(self.md5_hash[3:].encode() + self._salt).encode()
            else:
                raise AuthFailed("user has no cleartext password or md5 hash for md5")
            if not hmac.compare_digest(body.rstrip(b"\0"), expected):
                raise AuthFailed("password mismatch")
            self.done = True
            return b""
        return self._feed_scram(body)

    def _cleartext_matches(self, given: bytes) -> bool:
        if self.password is not None:
            return hmac.compare_digest(given, self.password.encode())
        if self.md5_hash is not None:
            computed = md5_hex(given + self.user.encode())
            return hmac.compare_digest(computed.encode(), self.md5_hash[3:].encode())
        if self.scram_info is not None:
            salt, stored_key, _, iterations = self.scram_info
            try:
                password = given.decode()
            except UnicodeDecodeError:
                return False
            _, computed_key, _ = derive_keys(password, salt, iterations)
            return hmac.compare_digest(computed_key, stored_key)
        return False

    def _feed_scram(self, body: bytes) -> bytes:
        info = self.scram_info
        if info is None:
            raise AuthFailed("user has no SCRAM secret")
        try:
            if self._scram is None:
                mech_end = body.index(b"\0")
                if body[:mech_end] != b"SCRAM-SHA-256":
                    raise AuthFailed("unsupported SASL mechanism")
                (length,) = _I32.unpack_from(body, mech_end + 1)
                first = body[mech_end + 5 : mech_end + 5 + length].decode()
                self._scram = ScramVerifier(*info)
                server_first = self._scram.server_first(first)
                return m.authentication(m.AUTH_SASL_CONTINUE, server_first.encode())
            server_final = self._scram.server_final(body.decode())
        except (ScramError, ValueError, UnicodeDecodeError, struct.error) as exc:
            raise AuthFailed(f"SCRAM exchange failed: {exc}") from exc
        self.done = True
        return m.authentication(m.AUTH_SASL_FINAL, server_final.encode())
