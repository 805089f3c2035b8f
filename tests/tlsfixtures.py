"""Throwaway x509 credentials for the TLS tests, in QEMU's directory layout, made with
``cryptography``: a CA, a server certificate for 127.0.0.1, client certificates from that CA and
from a stranger's CA."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Issuer:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))  # fmt: skip
    return Issuer(key, cert)


def _leaf(ca: Issuer, cn: str, server: bool) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))  # fmt: skip
    if server:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@dataclass
class Credentials:
    server: Path  # ca-cert.pem, server-cert.pem, server-key.pem
    client: Path  # ca-cert.pem, client-cert.pem, client-key.pem (from the server's CA)
    stranger: Path  # trusts the server's CA, but its client certificate is from another CA
    anonymous: Path  # trusts the server's CA, presents no certificate
    both: Path  # server and client files together: a restore's agent and its VM on one host


def make_credentials(base: Path) -> Credentials:
    ca, other = make_ca("liverestore test CA"), make_ca("somebody else's CA")
    ca_pem = ca.cert.public_bytes(serialization.Encoding.PEM)
    dirs = Credentials(base / "server", base / "client", base / "stranger", base / "anonymous", base / "both")
    for d in (dirs.server, dirs.client, dirs.stranger, dirs.anonymous):
        d.mkdir(parents=True)
        (d / "ca-cert.pem").write_bytes(ca_pem)
    cert, key = _leaf(ca, "127.0.0.1", server=True)
    (dirs.server / "server-cert.pem").write_bytes(cert)
    (dirs.server / "server-key.pem").write_bytes(key)
    for d, issuer in ((dirs.client, ca), (dirs.stranger, other)):
        cert, key = _leaf(issuer, "client", server=False)
        (d / "client-cert.pem").write_bytes(cert)
        (d / "client-key.pem").write_bytes(key)
    dirs.both.mkdir()
    for src in (dirs.server, dirs.client):
        for f in src.iterdir():
            (dirs.both / f.name).write_bytes(f.read_bytes())
    for f in base.rglob("*-key.pem"):
        f.chmod(0o600)
    return dirs
