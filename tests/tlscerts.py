"""Certificates for TLS tests, made at run time with the openssl CLI (no key is ever committed).

``CertAuthority.create(dir, name)`` makes a CA (an EC P-256 key and a
self-signed certificate); ``ca.issue(name)`` signs a leaf certificate for
``IP:127.0.0.1`` and ``DNS:localhost``, usable both as a server and as a
client certificate (mutual TLS). Keys are written 0600. Certificates are valid
for two days: long enough for any test run, short enough to be worthless.

``make_certs(dir)`` gives what a TLS test needs: one cluster CA with a
certificate for the daemons and one for clients, plus a second, unrelated CA
(a "wrong CA") with a certificate of its own. Tests that need more (a new
certificate for a reload) call ``issue`` on its CA.

Probes for tests: ``plaintext_hello`` (what a TLS port answers a plaintext
client), ``served_fingerprint`` (the certificate a new connection sees).
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dcache.protocol import PROTOCOL_VERSION, Op, encode_request
from dcache.tls import fingerprint
from tests.harness import unavailable
from tests.wire import split_addr

OPENSSL_TIMEOUT_S = 30.0
_DAYS = "2"
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=OPENSSL_TIMEOUT_S)
    if res.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")


@dataclass(frozen=True)
class CertKey:
    """A certificate and its key, as file paths."""

    cert: str
    key: str


@dataclass(frozen=True)
class CertAuthority:
    """A test CA: ``cert`` is what peers trust (``--tls-ca``)."""

    dir: Path
    name: str
    cert: str
    key: str

    @classmethod
    def create(cls, dir: Path, name: str) -> CertAuthority:
        """A new CA named ``name`` with its files in ``dir``."""
        dir.mkdir(parents=True, exist_ok=True)
        cert, key = dir / f"{name}.pem", dir / f"{name}.key"
        _openssl(
            "req", "-x509", *_EC, "-days", _DAYS, "-subj", f"/CN={name}",
            "-keyout", str(key), "-out", str(cert),
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash",
            cwd=dir,
        )  # fmt: skip
        key.chmod(0o600)
        return cls(dir, name, str(cert), str(key))

    def issue(self, name: str, *, san: str = "IP:127.0.0.1,DNS:localhost") -> CertKey:
        """A leaf certificate for ``san``, signed by this CA, valid for server and client use."""
        cert, key, csr, ext = (self.dir / f"{name}.{suffix}" for suffix in ("pem", "key", "csr", "ext"))
        ext.write_text(
            f"subjectAltName={san}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n"
        )
        _openssl("req", *_EC, "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr), cwd=self.dir)
        key.chmod(0o600)
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", self.cert, "-CAkey", self.key, "-CAcreateserial",
            "-days", _DAYS, "-out", str(cert), "-extfile", str(ext),
            cwd=self.dir,
        )  # fmt: skip
        csr.unlink()
        ext.unlink()
        return CertKey(str(cert), str(key))


@dataclass(frozen=True)
class TlsCerts:
    """What a TLS test needs: the cluster CA, a certificate for the daemons and one for clients, and a stranger."""

    ca: CertAuthority
    node: CertKey
    client: CertKey
    wrong_ca: CertAuthority
    wrong: CertKey

    def daemon_args(self, *, client_auth: bool = True) -> list[str]:
        """Flags that turn TLS on for a daemon (mutual with ``client_auth``)."""
        args = ["--tls-cert", self.node.cert, "--tls-key", self.node.key, "--tls-ca", self.ca.cert]
        return [*args, "--tls-client-auth", "true"] if client_auth else args

    def client_context(self, *, cert: bool = True) -> ssl.SSLContext:
        """A client context trusting the cluster CA, presenting the client certificate with ``cert``."""
        from dcache.tls import client_context

        return client_context(ca=self.ca.cert, cert=self.client.cert if cert else None, key=self.client.key if cert else None)

    def cli_args(self) -> list[str]:
        """Flags that make a ``dcache`` tool speak TLS with the client certificate."""
        return ["--tls-ca", self.ca.cert, "--tls-cert", self.client.cert, "--tls-key", self.client.key]


def make_certs(dir: Path) -> TlsCerts:
    """A cluster CA with a node and a client certificate, and an unrelated CA with one of its own, under ``dir``."""
    if shutil.which("openssl") is None:
        unavailable("the openssl command", "not found on PATH (it makes the test certificates)")
    ca = CertAuthority.create(dir / "ca", "dcache-test-ca")
    wrong_ca = CertAuthority.create(dir / "wrong", "stranger-ca")
    return TlsCerts(ca, ca.issue("node"), ca.issue("client"), wrong_ca, wrong_ca.issue("stranger"))


# -- probes ---------------------------------------------------------------------------

#: The first byte of a TLS alert record (what OpenSSL may send before closing on a plaintext client).
TLS_ALERT = 0x15


def plaintext_hello(addr: str, timeout: float = 5.0) -> bytes:
    """Send a plaintext HELLO to ``addr``; everything received until the node closes (bounded)."""
    got = b""
    with socket.create_connection(split_addr(addr), timeout=timeout) as s:
        s.sendall(encode_request(Op.HELLO, 1, PROTOCOL_VERSION, None, "plaintext"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        else:
            raise AssertionError(f"{addr} kept a plaintext connection open for {timeout} s")
    return got


def served_fingerprint(addr: str, certs: TlsCerts) -> str:
    """The fingerprint of the certificate ``addr`` serves to a new connection."""
    ctx = certs.client_context()
    with socket.create_connection(split_addr(addr), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return fingerprint(der)


def cert_fingerprint(path: str) -> str:
    """The fingerprint of the (first) certificate in the PEM file ``path``."""
    return fingerprint(ssl.PEM_cert_to_DER_cert(Path(path).read_text()))
