"""TLS for STARTTLS: the configured certificate, or a self-signed pair made on first start."""
from __future__ import annotations

import datetime
import logging
import os
import ssl
from pathlib import Path

log = logging.getLogger("mailengine.tls")


def make_self_signed(cert_path: Path, key_path: Path, hostname: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(key, hashes.SHA256()))
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def server_context(home: Path, cert: str, key: str, hostname: str) -> ssl.SSLContext:
    """An SSL context for the SMTP server; makes HOME/tls/*.pem when no certificate is set."""
    if cert:
        cert_path, key_path = Path(cert), Path(key or cert)
    else:
        cert_path, key_path = home / "tls" / "cert.pem", home / "tls" / "key.pem"
        if not cert_path.exists() or not key_path.exists():
            make_self_signed(cert_path, key_path, hostname)
            log.info("made a self-signed TLS certificate for %s in %s", hostname, cert_path.parent)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    return ctx
