"""TLS (optionally mutual) for the gRPC hops.

With ``auth.tls.enabled`` and no files, each service gets its own certificate from
the embedded STS's dev CA, named for the service (CN ``mesh <service>``, the service
name among its DNS names): pass the service's name (``"router"``, an agent's name).
Without a name the certificate is the shared ``server`` one (kept for callers that do
not name themselves yet).
"""

from __future__ import annotations

import grpc

from mesh.auth.devca import ensure_dev_tls
from mesh.auth.runtime import sts_dir
from mesh.config import MeshConfig
from mesh.errors import ConfigError

#: The certificate name used when a caller does not say which service it is.
SHARED_NAME = "server"


def _tls_files(config: MeshConfig, service: str) -> tuple[bytes, bytes, bytes]:
    """(certificate chain, private key, CA bundle) of ``service`` for the gRPC hops."""
    tls = config.auth.tls
    base = config.base_dir
    if tls.cert_file:
        cert = (base / tls.cert_file).read_bytes()
        key = (base / tls.key_file).read_bytes()
    else:
        dev = ensure_dev_tls(sts_dir(config) / "tls", extra_hosts=tuple(tls.hosts), name=service)
        cert, key = dev.server_cert.read_bytes(), dev.server_key.read_bytes()
    if tls.ca_file:
        ca = (base / tls.ca_file).read_bytes()
    else:
        ca = (sts_dir(config) / "tls" / "ca.pem").read_bytes() if not tls.cert_file else b""
    return cert, key, ca


def server_credentials(
    config: MeshConfig, service: str = SHARED_NAME
) -> grpc.ServerCredentials | None:
    """TLS server credentials of ``service`` (requiring client certificates with
    ``client_auth``), or None when ``auth.tls.enabled`` is false."""
    tls = config.auth.tls
    if not tls.enabled:
        return None
    cert, key, ca = _tls_files(config, service)
    if tls.client_auth and not ca:
        raise ConfigError("auth.tls.client_auth: needs auth.tls.ca_file")
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=ca if tls.client_auth else None,
        require_client_auth=tls.client_auth,
    )


def channel_credentials(
    config: MeshConfig, service: str = SHARED_NAME
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials trusting ``ca_file`` (presenting ``service``'s
    certificate with ``client_auth``), or None when ``auth.tls.enabled`` is false."""
    tls = config.auth.tls
    if not tls.enabled:
        return None
    cert, key, ca = _tls_files(config, service)
    if tls.client_auth:
        return grpc.ssl_channel_credentials(ca or None, private_key=key, certificate_chain=cert)
    return grpc.ssl_channel_credentials(ca or None)


__all__ = ["channel_credentials", "server_credentials"]
