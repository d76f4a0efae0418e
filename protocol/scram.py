"""The verifying side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it.

libpq sends an empty user name in client-first (PostgreSQL takes the user from the
startup packet), which scramp's server rejects; and SCRAM pass-through to servers needs
the ClientKey recovered from the client's proof. So this side is ours; the client side and
the PBKDF2 key derivation stay scramp's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets


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
    return hmac.new(key, msg, hashlib.sha256).digest()


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
        self._nonce = client_nonce + base64.b64encode(secrets.token_bytes(18)).decode()
        salt = base64.b64encode(self.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={self.iterations}"
        return self._server_first

    def server_final(self, client_final: str) -> str:
        without_proof, sep, proof_b64 = client_final.rpartition(",p=")
        if not sep:
            raise ScramError("client-final lacks a proof")
        attrs = _attributes(without_proof)
        if attrs.get("r") != self._nonce:
            raise ScramError("nonce mismatch")
        if attrs.get("c") != base64.b64encode(self._gs2.encode()).decode():
            raise ScramError("channel binding data mismatch")
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError as exc:
            raise ScramError("proof is not base64") from exc
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        signature = _hmac(self.stored_key, auth_message)
        if len(proof) != len(signature):
            raise ScramError("proof has the wrong length")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.stored_key):
            raise ScramError("wrong password")
        self.client_key = client_key
        return "v=" + base64.b64encode(_hmac(self.server_key, auth_message)).decode()
