CREATE TABLE IF NOT EXISTS greetings (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name varchar(255) NOT NULL,
    message text NOT NULL,
    external_status integer,
    created_at timestamptz NOT NULL DEFAULT now()
);
