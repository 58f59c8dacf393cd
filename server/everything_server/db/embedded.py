"""The embedded PostgreSQL for a fresh machine: real server binaries from the `pgserver` wheel,
in a data folder that survives restarts. Used only when no DATABASE_URL is configured."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

DATABASE = "everything"


def start_embedded(data_dir: Path, database: str = DATABASE) -> str:
    """Start (or reuse) the embedded server and return a URL for `database`, creating it if needed."""
    import pgserver  # imported lazily: only the embedded default needs it

    if not database.isidentifier():
        raise ValueError("database name must be a plain identifier")

    pgdata = data_dir / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server keeps running for the next start (and for other processes of
    # this machine that share the folder); pgserver reuses a running one.
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    # psql takes no parameters; the name was checked to be a plain identifier above.
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")  # noqa: S608
    if "1 row" not in exists:
        server.psql(f'CREATE DATABASE "{database}";')
    log.info("embedded postgresql ready", extra={"data_dir": str(pgdata)})
    return server.get_uri(database)
