"""The auth service: users, RS256 JWTs, JWKS, and the forwardAuth target."""
