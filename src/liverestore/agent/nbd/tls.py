"""TLS for the NBD server: x509 credentials in QEMU's directory layout, clients verified.

The NBD spec upgrades a connection in the middle of the handshake (``NBD_OPT_STARTTLS``), so
the server holds an ``SSLContext`` and a policy, not a TLS listener. The directory is the one
QEMU's ``tls-creds-x509`` and nbdkit's ``--tls-certificates`` read: ``ca-cert.pem`` (the CA
client certificates must chain to), ``server-cert.pem`` and ``server-key.pem``.

PSK is not offered: Python 3.11's ``ssl`` module has no PSK callbacks (3.13 adds them).
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from liverestore.errors import LiverestoreError

CA_CERT, SERVER_CERT, SERVER_KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"


@dataclass(frozen=True)
class TlsPolicy:
    """``require``: nothing but STARTTLS (or ABORT) is answered before the upgrade."""

    context: ssl.SSLContext
    require: bool = True


def server_context(creds_dir: Path, verify_clients: bool = True) -> ssl.SSLContext:
    """A server context from QEMU's layout; a clear one-line error for what is missing or bad."""
    if not creds_dir.is_dir():
        raise LiverestoreError(f"TLS credentials directory {creds_dir} does not exist")
    need = [SERVER_CERT, SERVER_KEY] + ([CA_CERT] if verify_clients else [])
    missing = [n for n in need if not (creds_dir / n).is_file()]
    if missing:
        raise LiverestoreError(f"TLS credentials in {creds_dir} lack {', '.join(missing)} "
                               "(QEMU's layout: ca-cert.pem, server-cert.pem, server-key.pem)")  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(creds_dir / SERVER_CERT, creds_dir / SERVER_KEY)
        if verify_clients:
            ctx.load_verify_locations(creds_dir / CA_CERT)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as e:
        raise LiverestoreError(f"TLS credentials in {creds_dir} are unusable: {e}") from None
    return ctx


def is_loopback(host: str) -> bool:
    """Whether a listen address stays on this machine (plaintext is allowed there)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
