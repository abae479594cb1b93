"""RSA keys and RS256 tokens made by the tests, independently of the service's own code."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def b64url(data: bytes) -> str:
    """Base64url without padding, as JOSE writes it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TestKey:
    """An RSA signing key; with a `path`, also the PEM key file handed to an auth process."""

    __test__ = False  # not a test class, despite its name

    private: rsa.RSAPrivateKey
    path: Path | None = None

    @classmethod
    def new(cls, path: Path | None = None) -> TestKey:
        """A fresh 2048-bit key, written (PKCS#8 PEM) to `path` when one is given."""
        key = cls(rsa.generate_private_key(public_exponent=65537, key_size=2048), path)
        if path is not None:
            path.write_bytes(key.private_pem)
        return key

    @property
    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def kid(self) -> str:
        """The RFC 7638 thumbprint, computed here independently of the service's code."""
        jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        canonical = json.dumps({k: jwk[k] for k in ("e", "kty", "n")}, separators=(",", ":"))
        return b64url(hashlib.sha256(canonical.encode()).digest())

    def jwk(self) -> dict[str, Any]:
        """The public key as a JWKS entry."""
        public = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        return {**public, "use": "sig", "alg": "RS256", "kid": self.kid}

    def sign(self, **overrides: Any) -> str:
        """An RS256 token as auth issues it, claims valid unless overridden (`None` drops a
        claim; `kid=` changes the header's key id)."""
        now = int(time.time())
        claims = {"sub": str(uuid.uuid4()), "role": "user", "iss": "auth-service", "iat": now}
        claims["exp"] = now + 3600
        kid = overrides.pop("kid", self.kid)
        claims.update(overrides)
        claims = {name: value for name, value in claims.items() if value is not None}
        return pyjwt.encode(claims, self.private_pem, algorithm="RS256", headers={"kid": kid})


async def token_from_auth(auth_url: str, email: str = "reader@example.org") -> str:
    """Log in to an auth process in development mode (any email) and return its token."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(auth_url + "/auth/login", json={"email": email, "password": "x"}) as resp,
    ):
        assert resp.status == 200
        return (await resp.json())["token"]
