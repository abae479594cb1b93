-- Idempotency-Key outcomes (src/microapp/platform/idempotency.py, docs/idempotency.md): one
-- row per procedure and key, in progress until its call ends, kept until expires_at.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    procedure text NOT NULL,
    key varchar(255) NOT NULL,
    -- SHA-256 of the procedure and the canonical request: the same key must mean the same request.
    fingerprint bytea NOT NULL,
    status text NOT NULL CHECK (status IN ('in_progress', 'done')),
    -- Which call holds the claim; only it may store the outcome or release the key.
    owner uuid NOT NULL,
    -- {"kind": "message"|"error"|"http", ...}; set when the call is done.
    outcome jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- An in-progress claim older than the lease is taken over (its call died).
    claimed_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (procedure, key),
    CHECK ((status = 'done') = (outcome IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS idempotency_keys_expires_at ON idempotency_keys (expires_at);
