"""Settings resolved at run time: the issuer, TLS trust and client credentials.

Shared by the validating side (interceptors), the exchangers and the embedded STS,
so they agree on where the STS lives (``<data_dir>/sts``), which issuer it is and
which credentials a service presents.
"""

from __future__ import annotations

import os
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from mesh.auth.devca import certificate_der, sha1_thumbprint_hex
from mesh.auth.jwt import thumbprint_b64
from mesh.auth.policy import client_services
from mesh.config import MeshConfig
from mesh.errors import ConfigError

#: Where ``mesh sts`` writes its bound URL (port 0) for ``mesh token`` and services.
URL_FILE = "url"
CLIENTS_DIR = "clients"


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700: it holds keys and secrets."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def write_private(path: Path, data: str) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600."""
    private_dir(path.parent)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(data)
    os.replace(tmp, path)


def sts_dir(config: MeshConfig) -> Path:
    """The embedded STS's state folder: signing keys, dev CA, per-client dev secrets."""
    return Path(config.data_dir) / "sts"


def embedded_sts(config: MeshConfig) -> bool:
    """The embedded STS is the identity provider (whichever protocol talks to it)."""
    return config.auth.exchanger == "embedded" or not config.auth.issuer


def resolve_issuer(config: MeshConfig) -> str:
    """``auth.issuer``; else the URL the running STS wrote; else ``https://host:sts.port``."""
    if config.auth.issuer:
        return config.auth.issuer
    url_file = sts_dir(config) / URL_FILE
    if config.auth.sts.port == 0 and url_file.exists():
        return url_file.read_text(encoding="utf-8").strip()
    if config.auth.sts.port == 0:
        raise ConfigError(
            "auth.issuer: unknown (auth.sts.port is 0 and no STS has written its URL yet)"
        )
    return config.auth.default_sts_url


def ca_path(config: MeshConfig) -> Path | None:
    """The CA bundle to trust for the identity provider: ``auth.ca_file``; the embedded
    STS's dev CA when it is the issuer; else None (the system store)."""
    if config.auth.ca_file:
        return Path(config.auth.ca_file)
    if embedded_sts(config):
        return sts_dir(config) / "tls" / "ca.pem"  # the embedded STS's dev CA
    return None


def ssl_context(config: MeshConfig) -> ssl.SSLContext:
    """TLS settings for HTTPS to the identity provider; environment CA variables are
    deliberately ignored (they silently override explicit trust in requests)."""
    path = ca_path(config)
    if path is None:
        return ssl.create_default_context()
    if not path.exists():
        raise ConfigError(f"auth.ca_file: {path} does not exist (start `mesh sts` first?)")
    return ssl.create_default_context(cafile=str(path))


def secret_env_name(service: str) -> str:
    """The environment variable ``mesh up`` hands ``service``'s own dev secret in."""
    return "MESH_CLIENT_SECRET_" + re.sub(r"[^A-Z0-9]", "_", service.upper())


def _secret_file(config: MeshConfig, client_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", client_id)
    return sts_dir(config) / CLIENTS_DIR / f"{safe}.secret"


def dev_client_secret(config: MeshConfig, service: str) -> str:
    """``service``'s own development client secret for the embedded STS, created on first
    use in ``<data_dir>/sts/clients`` (dir 0700, file 0600): one per client, so that one
    leaked secret does not authenticate every other service."""
    path = _secret_file(config, config.auth.client_id_for(service))
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    private_dir(path.parent)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(secrets.token_urlsafe(32))
    try:
        os.link(tmp, path)  # first writer wins; others read its secret
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text(encoding="utf-8").strip()


def child_env(config: MeshConfig, service: str) -> dict[str, str]:
    """Environment for a ``mesh up`` child running ``service``: its own dev secret only
    (nothing when it has configured credentials or the issuer is not the embedded STS)."""
    client = config.auth.client_for(service)
    if not config.auth.enabled or not embedded_sts(config):
        return {}
    if client.private_key or (client.secret_env and os.environ.get(client.secret_env)):
        return {}
    return {secret_env_name(service): dev_client_secret(config, service)}


@dataclass(frozen=True, repr=False)
class ClientCredential:
    """What a service presents to the token endpoint. ``repr`` hides the secrets."""

    client_id: str
    secret: str | None = None
    certificate_pem: str | None = None
    private_key_pem: str | None = None
    thumbprint_hex: str | None = None

    def __repr__(self) -> str:
        kind = "certificate" if self.private_key_pem else "secret" if self.secret else "none"
        return f"ClientCredential(client_id={self.client_id!r}, kind={kind})"


def _read(path: str, what: str, base: Path) -> str:
    file = Path(path) if Path(path).is_absolute() else base / path
    try:
        return file.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{what}: cannot read {file}: {err.strerror}") from None


def client_credential(config: MeshConfig, service: str) -> ClientCredential:
    """The credential ``service`` authenticates with (secret from the environment,
    or a certificate; the dev secret with the embedded STS)."""
    client = config.auth.client_for(service)
    client_id = config.auth.client_id_for(service)
    where = f"auth.clients.{service}"
    if client.private_key:
        cert = _read(client.certificate, f"{where}.certificate", config.base_dir)
        key = _read(client.private_key, f"{where}.private_key", config.base_dir)
        thumb = client.thumbprint or sha1_thumbprint_hex(cert.encode())
        return ClientCredential(
            client_id, certificate_pem=cert, private_key_pem=key, thumbprint_hex=thumb
        )
    if client.secret_env:
        value = os.environ.get(client.secret_env)
        if value:
            return ClientCredential(client_id, secret=value)
        if not embedded_sts(config):
            raise ConfigError(f"{where}.secret_env: ${client.secret_env} is not set")
    if embedded_sts(config):
        handed = os.environ.get(secret_env_name(service))
        return ClientCredential(client_id, secret=handed or dev_client_secret(config, service))
    raise ConfigError(f"{where}: needs secret_env or certificate + private_key")


@dataclass(frozen=True, repr=False)
class RegisteredClient:
    """A client the embedded STS accepts, with what it may authenticate with."""

    client_id: str
    secrets: tuple[str, ...] = ()
    public_key_pem: str | None = None
    thumbprints: tuple[str, ...] = ()


def registered_clients(config: MeshConfig) -> dict[str, RegisteredClient]:
    """Every service of the mesh (router, agents, extra ``auth.clients`` keys) as an
    STS client: by the named secret, by certificate, else by the dev secret."""
    from mesh.auth.devca import certificate_public_pem

    out: dict[str, RegisteredClient] = {}
    for service in client_services(config):
        client = config.auth.client_for(service)
        client_id = config.auth.client_id_for(service)
        found: list[str] = []
        public_pem: str | None = None
        thumbs: tuple[str, ...] = ()
        if client.secret_env and os.environ.get(client.secret_env):
            found.append(os.environ[client.secret_env])
        if client.certificate:
            cert = _read(
                client.certificate, f"auth.clients.{service}.certificate", config.base_dir
            ).encode()
            public_pem = certificate_public_pem(cert)
            der = certificate_der(cert)
            thumbs = (thumbprint_b64(der), thumbprint_b64(der, sha256=True))
        if not found and public_pem is None:
            found.append(dev_client_secret(config, service))
        out[client_id] = RegisteredClient(client_id, tuple(found), public_pem, thumbs)
    return out


def known_audiences(config: MeshConfig) -> set[str]:
    """Audiences the STS issues tokens for: every service of the mesh."""
    services = ["router", *config.agents, *config.auth.audiences, *config.auth.clients]
    return {config.auth.audience_for(s) for s in services}
