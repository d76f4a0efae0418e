"""Throwaway certificates for the TLS tests, made with the `openssl` command line tool.

A CA, a server certificate for localhost / 127.0.0.1 / ::1 and a client certificate (CN app),
both signed by the CA, plus a second CA + server certificate for "the certificate changed"
(reload) and "signed by someone else" (verification) cases.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

SAN = "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"


@dataclass(frozen=True)
class Certs:
    directory: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60
    )


def _signed(directory: Path, name: str, subject: str, ca: Path, ca_key: Path, ext: str) -> None:
    key, csr, cert = (directory / f"{name}.{x}" for x in ("key", "csr", "crt"))
    _openssl("req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", key, "-out", csr,
             "-subj", subject, cwd=directory)  # fmt: skip
    extfile = directory / f"{name}.ext"
    extfile.write_text(ext + "\n")
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "2", "-sha256", "-extfile", extfile, cwd=directory)  # fmt: skip
    key.chmod(0o600)


def make_certs(directory: Path, prefix: str = "") -> Certs:
    """A CA and the certificates it signs, in `directory` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / f"{prefix}ca.crt", directory / f"{prefix}ca.key"
    _openssl("req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", ca_key,
             "-out", ca, "-days", "2", "-subj", f"/CN=pgrouter test CA {prefix or 'one'}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip
    _signed(directory, f"{prefix}server", "/CN=localhost", ca, ca_key, SAN)
    _signed(directory, f"{prefix}client", "/CN=app", ca, ca_key, "extendedKeyUsage=clientAuth")
    return Certs(
        directory,
        ca,
        ca_key,
        directory / f"{prefix}server.crt",
        directory / f"{prefix}server.key",
        directory / f"{prefix}client.crt",
        directory / f"{prefix}client.key",
    )
