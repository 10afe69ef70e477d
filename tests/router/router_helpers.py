"""What the front-door tests share besides fixtures: limits, the servers' addresses, a
self-signed certificate, and waiting for the router to be idle."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

#: The test router's admission limit (a request beyond it is refused as overload).
MAX_INFLIGHT = 3
API_KEY = "test-key-123"
NUM_KV_BLOCKS = 96


@dataclass(frozen=True)
class Servers:
    router: object
    grpc_port: int
    http_port: int
    scheme: str = "http"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


def make_self_signed(folder: Path) -> TlsFiles:
    """A certificate for localhost and 127.0.0.1 (its own CA): cryptography if installed,
    else the openssl command."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        _self_signed_cryptography(cert, key)
    except ImportError:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
    return TlsFiles(cert, key)


def _self_signed_cryptography(cert_path: Path, key_path: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def wait_idle(router, timeout_s: float = 10.0) -> dict:
    """The router's KV state once no request is live (fails the test after ``timeout_s``)."""
    import asyncio

    deadline = time.monotonic() + timeout_s
    while True:
        state = asyncio.run(router.kv_state())
        if not (state["live_requests"] or state["inflight"] or state["open_transfers"]):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"the router is still busy {timeout_s:g} s after the test: {state}")
        time.sleep(0.02)
