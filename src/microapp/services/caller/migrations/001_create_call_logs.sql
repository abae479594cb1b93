CREATE TABLE IF NOT EXISTS call_logs (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    url text NOT NULL,
    status_code integer NOT NULL,
    body_length integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
