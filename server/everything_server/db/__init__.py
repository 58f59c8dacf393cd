"""Storage: the engine, per-request transactions with the caller set for row-level security."""

from everything_server.db.base import Base
from everything_server.db.database import Database

__all__ = ["Base", "Database"]
