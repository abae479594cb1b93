CREATE TABLE IF NOT EXISTS invocations (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name varchar(255) NOT NULL,
    result_message text,
    success boolean NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
