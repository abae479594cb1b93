"""Issuing and checking the auth service's RS256 JWTs, and publishing their public key."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jose import jwk, jwt

from microapp.platform.authn import ALGORITHM, ISSUER, Principal, rsa_public_key, verify_jwt
from microapp.services.auth.keys import SigningKey

DEFAULT_TOKEN_TTL_S = 24 * 3600


class TokenIssuer:
    """Signs tokens with one key and verifies them with the same rules as every service.

    The JWKS and the verification accept the signing key and any previous public keys.
    """

    def __init__(
        self,
        key: SigningKey,
        *,
        previous_public_jwks: Sequence[Mapping[str, Any]] = (),
        ttl_s: int = DEFAULT_TOKEN_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._kid = key.kid
        self._ttl_s = ttl_s
        self._clock = clock
        # Parse the PEM once; signing with a ready key object skips that per token.
        self._signing_key = jwk.construct(key.private_pem, ALGORITHM)
        # Previous keys only verify: tokens they signed before a rotation stay valid until
        # they expire, and verifiers elsewhere find them in the JWKS.
        published = [dict(key.public_jwk)]
        for previous in previous_public_jwks:
            if previous["kid"] not in {entry["kid"] for entry in published}:
                published.append(dict(previous))
        self._verification_keys = {entry["kid"]: rsa_public_key(entry) for entry in published}
        self._jwks = {"keys": published}

    @property
    def kid(self) -> str:
        """The key id in the header of every token issued here."""
        return self._kid

    def issue(self, user_id: str, role: str) -> str:
        """A signed token for this user: sub, role, iss, iat and exp claims."""
        now = int(self._clock())
        claims = {
            "sub": user_id,
            "role": role,
            "iss": ISSUER,
            "iat": now,
            "exp": now + self._ttl_s,
        }
        return jwt.encode(
            claims, self._signing_key, algorithm=ALGORITHM, headers={"kid": self._kid}
        )

    def verify(self, token: str) -> Principal:
        """The token's principal; raises `InvalidToken` (also for an unpublished key's tokens)."""
        return verify_jwt(token, self._verification_keys)

    def jwks(self) -> dict[str, Any]:
        """The JWKS document served at `/.well-known/jwks.json`."""
        return self._jwks
