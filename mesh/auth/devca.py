"""A development certificate authority for the embedded token service.

msal refuses plain-http authorities, so the STS serves HTTPS with a server
certificate from a local CA generated once and persisted under the data dir
(``<data_dir>/sts/tls``); clients trust ``ca.pem`` explicitly. Also makes
self-signed client certificates for certificate (``private_key_jwt``) credentials.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_HOSTS = ("localhost", "127.0.0.1", "::1")
_VALID_DAYS = 825
_RENEW_BEFORE = dt.timedelta(days=7)


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the dev CA certificate and the server certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def _write_private(path: Path, data: bytes) -> None:
    _private_dir(path.parent)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    # Certificates are public, but the data dir holds user data: 0600 like the rest.
    _write_private(path, data)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _valid(cert_path: Path, hosts: tuple[str, ...]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return False
    if cert.not_valid_after_utc - _RENEW_BEFORE < _now():
        return False
    if not hosts:
        return True
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    have |= set(san.get_values_for_type(x509.DNSName))
    return all(str(ipaddress.ip_address(h)) in have if _is_ip(h) else h in have for h in hosts)


def _serves_both(cert_path: Path) -> bool:
    """The dev certificate is used as server and (mTLS) client certificate."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage and ExtendedKeyUsageOID.SERVER_AUTH in usage


def _issued_by(cert_path: Path, ca_cert: x509.Certificate) -> bool:
    """The certificate was signed by this CA (a regenerated CA voids the old ones)."""
    try:
        x509.load_pem_x509_certificate(cert_path.read_bytes()).verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _load_or_create_ca(
    ca_path: Path, ca_key_path: Path
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, bool]:
    """The dev CA's key and certificate; ``True`` when they were just created."""
    if _valid(ca_path, ()) and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key_path}: not an EC key")
        return loaded, ca_cert, False
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "grpc-agent-mesh dev CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=_VALID_DAYS * 4))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(ca_key_path, _key_pem(ca_key))
    _write_public(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    return ca_key, ca_cert, True


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    hosts: tuple[str, ...],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server-and-client certificate for service ``name`` from the dev CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"mesh {name}")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=_VALID_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def ensure_dev_tls(
    directory: Path, extra_hosts: tuple[str, ...] = (), *, name: str = "server"
) -> TlsFiles:
    """Create (once) the dev CA and the certificate of service ``name`` (CN ``mesh
    <name>``, files ``<name>.pem``/``<name>-key.pem``) for loopback, ``name`` and
    ``extra_hosts``: one certificate per service, so a leaked key names one service.

    Existing files are reused while valid; a certificate is reissued when it nears
    expiry, does not cover a requested host or was issued by an earlier CA.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", name) or name in ("ca", "ca-key"):
        raise ValueError(f"not a usable certificate name: {name!r}")
    hosts = tuple(dict.fromkeys((*_HOSTS, name, *(h for h in extra_hosts if h))))
    files = TlsFiles(directory / "ca.pem", directory / f"{name}.pem", directory / f"{name}-key.pem")
    ca_key, ca_cert, created = _load_or_create_ca(files.ca_cert, directory / "ca-key.pem")
    if (
        not created
        and _valid(files.server_cert, hosts)
        and _issued_by(files.server_cert, ca_cert)
        and _serves_both(files.server_cert)
        and files.server_key.exists()
    ):
        return files
    cert, key = _issue(ca_key, ca_cert, name, hosts)
    _write_private(files.server_key, _key_pem(key))
    _write_public(files.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def make_client_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed RSA certificate + key for ``name`` (certificate client credentials).

    Returns ``(cert_path, key_path)``; existing files are reused.
    """
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    if _valid(cert_path, ()) and key_path.exists():
        return cert_path, key_path
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=_VALID_DAYS))
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def certificate_der(cert_pem: bytes) -> bytes:
    """DER bytes of a PEM certificate."""
    return x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)


def certificate_public_pem(cert_pem: bytes) -> str:
    """The SubjectPublicKeyInfo PEM of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return (
        cert.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def sha1_thumbprint_hex(cert_pem: bytes) -> str:
    """The SHA-1 thumbprint (hex) Entra shows for a certificate."""
    return (
        x509.load_pem_x509_certificate(cert_pem)
        .fingerprint(
            hashes.SHA1()  # noqa: S303 - x5t is SHA-1 by definition (RFC 7515)
        )
        .hex()
    )


def generate_rsa_private_pem() -> str:
    """A fresh RSA-2048 private key, PKCS#8 PEM (STS signing keys)."""
    return _key_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)).decode()
