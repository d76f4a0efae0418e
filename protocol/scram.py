"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, both sides.

PostgreSQL differs from the RFC where generic libraries are strict: the user name in
client-first is empty (the startup packet names the user), and a password that fails
SASLprep is used as raw bytes. SCRAM pass-through also needs the ClientKey recovered from
a client's proof. So the exchange is ours; SASLprep itself is scramp's.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

from scramp.utils import saslprep


class ScramError(Exception):
    """The client's SCRAM messages were malformed or its proof was wrong."""


def _attributes(text: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError(f"malformed SCRAM attribute {part[:16]!r}")
        attrs[part[0]] = part[2:]
    return attrs


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")  # OpenSSL's one-shot HMAC, no Python object


def _xor(a: bytes, b: bytes) -> bytes:
    """Two 32-byte strings XORed (a proof from a key and a signature, and back)."""
    if len(a) != len(b):
        raise ScramError("proof has the wrong length")
    return (int.from_bytes(a) ^ int.from_bytes(b)).to_bytes(len(a))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def normalize_password(password: str) -> bytes:
    """SASLprep, or the raw UTF-8 bytes when that fails (as libpq and PostgreSQL do)."""
    try:
        return saslprep(password).encode()
    except Exception:  # scramp raises its own exception for prohibited characters
        return password.encode()


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", normalize_password(password), salt, iterations)


def derive_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) for a password: the PBKDF2 work, done once."""
    salted = salted_password(password, salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return client_key, hashlib.sha256(client_key).digest(), _hmac(salted, b"Server Key")


@functools.lru_cache(maxsize=256)
def _server_login_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """derive_keys for logging in to servers: a role's salt stays the same from connection to
    connection, so a pool opening many pays for PBKDF2 once. Only configured passwords and
    the servers' salts get here, never what a client sent."""
    return derive_keys(password, salt, iterations)


class ScramClient:
    """The logging-in side, from a password or (pass-through) from known keys."""

    def __init__(
        self,
        password: str | None = None,
        *,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
    ) -> None:
        if password is None and (client_key is None or server_key is None):
            raise ValueError("SCRAM needs a password or both keys")
        self._password = password
        self._client_key = client_key
        self._server_key = server_key
        self._nonce = _b64(secrets.token_bytes(18))
        self._first_bare = f"n=,r={self._nonce}"
        self._expected_signature = b""

    def client_first(self) -> str:
        return "n,," + self._first_bare

    def client_final(self, server_first: str) -> str:
        attrs = _attributes(server_first)
        nonce = attrs.get("r", "")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ScramError("server nonce does not extend ours")
        try:
            salt = base64.b64decode(attrs["s"], validate=True)
            iterations = int(attrs["i"])
        except (KeyError, ValueError) as exc:
            raise ScramError("server-first lacks a valid salt or iteration count") from exc
        if self._password is not None:
            client_key, _, server_key = _server_login_keys(self._password, salt, iterations)
        else:
            assert self._client_key is not None and self._server_key is not None
            client_key, server_key = self._client_key, self._server_key
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._first_bare},{server_first},{without_proof}".encode()
        signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        proof = _xor(client_key, signature)
        self._expected_signature = _hmac(server_key, auth_message)
        return f"{without_proof},p={_b64(proof)}"

    def verify_server_final(self, server_final: str) -> None:
        attrs = _attributes(server_final)
        if "e" in attrs:
            raise ScramError(f"server rejected the exchange: {attrs['e']}")
        try:
            signature = base64.b64decode(attrs.get("v", ""), validate=True)
        except ValueError as exc:
            raise ScramError("server signature is not base64") from exc
        if not hmac.compare_digest(signature, self._expected_signature):
            raise ScramError("server signature does not match: not the real server")


class ScramVerifier:
    """One server-side exchange: client-first -> server-first, client-final -> server-final."""

    def __init__(self, salt: bytes, stored_key: bytes, server_key: bytes, iterations: int) -> None:
        self.salt = salt
        self.stored_key = stored_key
        self.server_key = server_key
        self.iterations = iterations
        self.client_key: bytes | None = None  # known after a successful proof
        self._gs2 = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    def server_first(self, client_first: str) -> str:
        gs2_flag, _, rest = client_first.partition(",")
        authzid, _, bare = rest.partition(",")
        if gs2_flag not in ("n", "y") or authzid:
            raise ScramError("channel binding and authorization identities are not supported")
        attrs = _attributes(bare)
        client_nonce = attrs.get("r", "")
        if not client_nonce or "n" not in attrs:
            raise ScramError("client-first lacks a nonce or user name")
        self._gs2 = f"{gs2_flag},{authzid},"
        self._client_first_bare = bare
        self._nonce = client_nonce + _b64(secrets.token_bytes(18))
        salt = _b64(self.salt)
        self._server_first = f"r={self._nonce},s={salt},i={self.iterations}"
        return self._server_first

    def server_final(self, client_final: str) -> str:
        without_proof, sep, proof_b64 = client_final.rpartition(",p=")
        if not sep:
            raise ScramError("client-final lacks a proof")
        attrs = _attributes(without_proof)
        if attrs.get("r") != self._nonce:
            raise ScramError("nonce mismatch")
        if attrs.get("c") != _b64(self._gs2.encode()):
            raise ScramError("channel binding data mismatch")
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError as exc:
            raise ScramError("proof is not base64") from exc
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        client_key = _xor(proof, _hmac(self.stored_key, auth_message))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.stored_key):
            raise ScramError("wrong password")
        self.client_key = client_key
        return "v=" + _b64(_hmac(self.server_key, auth_message))
