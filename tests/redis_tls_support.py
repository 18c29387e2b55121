"""A throw-away redis-server that speaks TLS, with a certificate authority made for it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import need_binary
from tests.processes import LOOPBACK, free_port
from tests.redis_support import RedisServer, running

OPENSSL_TIMEOUT = 60.0  # seconds for one openssl command (key generation)


@dataclass(frozen=True)
class TlsRedis:
    """A server answering plain Redis on `server.port` (for the readiness probe) and TLS
    on `tls_port`, with a certificate for 127.0.0.1 signed by the CA in `ca`."""

    server: RedisServer
    tls_port: int
    ca: Path

    @property
    def url(self) -> str:
        """`rediss://` to the TLS port, trusting the test CA."""
        return f"rediss://{LOOPBACK}:{self.tls_port}/0?ssl_ca_certs={self.ca}"


def _openssl(*args: str) -> None:
    subprocess.run(
        [need_binary("openssl"), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=OPENSSL_TIMEOUT,
        check=True,
    )


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 (P-256 keys, valid one day)."""
    ca_key, ca, key, csr, cert = (
        directory / name for name in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")
    )
    ext = directory / "server.ext"
    ext.write_text(f"subjectAltName=IP:{LOOPBACK}\n")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "1",
             "-subj", "/CN=ortto-gateway test CA")  # fmt: skip
    _openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={LOOPBACK}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


@contextmanager
def running_tls(directory: Path) -> Iterator[TlsRedis]:
    """A redis-server with a TLS port (skipped without redis-server or openssl)."""
    ca, cert, key = make_certificates(directory)
    tls_port = free_port()
    tls_args = (
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(cert),
        "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(ca),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    with running(directory, *tls_args) as server:
        yield TlsRedis(server, tls_port, ca)
