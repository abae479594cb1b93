"""The auth service's RSA signing key: from `AUTH_PRIVATE_KEY_FILE`, or a development key
generated once and kept on disk so that restarts keep issued tokens valid."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from microapp.platform.authn import ALGORITHM
from microapp.platform.config import ConfigError

logger = logging.getLogger(__name__)

MIN_KEY_BITS = 2048
DEV_KEY_FILE_NAME = "auth-dev-key.pem"


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def jwk_thumbprint(public_jwk: dict[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of an RSA JWK, base64url without padding."""
    canonical = json.dumps(
        {"e": public_jwk["e"], "kty": public_jwk["kty"], "n": public_jwk["n"]},
        separators=(",", ":"),
        sort_keys=True,
    )
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def public_jwk(key: rsa.RSAPublicKey) -> dict[str, Any]:
    """The JWKS entry of an RSA public key: its kid is the key's RFC 7638 thumbprint."""
    if key.key_size < MIN_KEY_BITS:
        raise ConfigError(f"the RSA key has {key.key_size} bits; at least 2048 are needed")
    numbers = key.public_numbers()
    jwk = {"kty": "RSA", "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}
    kid = jwk_thumbprint(jwk)
    return {**jwk, "use": "sig", "alg": ALGORITHM, "kid": kid}


@dataclass(frozen=True)
class SigningKey:
    """An RSA private key with its public JWK; the kid is the key's own thumbprint."""

    private_pem: bytes
    kid: str
    public_jwk: dict[str, Any]

    @classmethod
    def from_private_key(cls, key: rsa.RSAPrivateKey) -> SigningKey:
        """Describe a private key: PEM for signing, JWK and kid for verifiers."""
        public = public_jwk(key.public_key())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cls(private_pem=pem, kid=public["kid"], public_jwk=public)

    @classmethod
    def from_pem(cls, pem: bytes, *, source: str) -> SigningKey:
        """Load an unencrypted PEM RSA private key (PKCS#1 or PKCS#8)."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source} is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"{source} must hold an RSA private key")
        return cls.from_private_key(key)


def generate_private_key() -> rsa.RSAPrivateKey:
    """A new 2048-bit RSA key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=MIN_KEY_BITS)


def load_key_file(path: Path) -> SigningKey:
    """The key of `AUTH_PRIVATE_KEY_FILE`; a missing or unusable file is a `ConfigError`."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"AUTH_PRIVATE_KEY_FILE cannot be read: {exc}") from None
    return SigningKey.from_pem(pem, source=f"AUTH_PRIVATE_KEY_FILE ({path})")


def load_previous_public_keys(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The JWKS entries of `AUTH_PREVIOUS_PUBLIC_KEY_FILES`, in the order given.

    Each file holds a PEM public key (or the old private key, whose public half is
    taken). A missing or unusable file is a `ConfigError`: silently dropping a key would
    log out everyone holding a token it signed.
    """
    return [_load_public_key_file(path) for path in paths]


def _load_public_key_file(path: Path) -> dict[str, Any]:
    source = f"AUTH_PREVIOUS_PUBLIC_KEY_FILES ({path})"
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{source} cannot be read: {exc}") from None
    key: object
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        try:
            key = serialization.load_pem_private_key(pem, password=None).public_key()
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ConfigError(f"{source} is not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ConfigError(f"{source} must hold an RSA key")
    return public_jwk(key)


def load_or_create_dev_key(directory: Path) -> SigningKey:
    """The development key in `directory`, generated on first use.

    Several replicas starting at once agree on one key: each writes a private temporary
    file and links it into place; the first link wins and the others read the winner's.
    """
    path = directory / DEV_KEY_FILE_NAME
    if not path.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            _create_exclusively(path, generate_private_key())
        except OSError as exc:
            raise ConfigError(f"cannot create a development key in {directory}: {exc}") from None
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the development key {path}: {exc}") from None
    return SigningKey.from_pem(pem, source=str(path))


def _create_exclusively(path: Path, key: rsa.RSAPrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd, tmp = tempfile.mkstemp(prefix=".auth-key-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
            logger.warning("generated a development signing key", extra={"path": str(path)})
    finally:
        os.unlink(tmp)
