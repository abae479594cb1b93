"""Our own SQL text, typed the way psycopg's API asks for it."""

from __future__ import annotations

from typing import LiteralString, cast


def trusted_sql(sql: str) -> LiteralString:
    """`sql` as the `LiteralString` psycopg's types ask for (to catch SQL built from input).

    psycopg runs any `str`; ours is the package's own text: statement constants, the
    coalescer's multi-row form of them, migration files. Values always travel as parameters.
    """
    return cast(LiteralString, sql)
