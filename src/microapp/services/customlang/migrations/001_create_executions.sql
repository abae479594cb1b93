CREATE TABLE IF NOT EXISTS executions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name varchar(255) NOT NULL,
    result_message text,
    status_code integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
