"""Real parts for tests: PostgreSQL, service processes, an external HTTP target."""
