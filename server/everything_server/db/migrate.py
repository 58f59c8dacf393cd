"""Alembic, run from code: `everything-server migrate` and `--migrate` on start use this."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory


def migrations_dir() -> Path:
    env = os.environ.get("EVERYTHING_MIGRATIONS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolation would trip over a % in a password.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("postgresql://unused")).get_current_head()


def is_current(revision: str | None, head: str | None, known: frozenset[str]) -> bool:
    """Whether code whose migrations end at `head` may serve a database at `revision`: at head, or
    at a revision this code does not know, which a newer release applied during a rolling deploy
    (migrations only expand, so older replicas keep working). None or an older one is not ready."""
    return revision is not None and (revision == head or revision not in known)


def known_revisions() -> frozenset[str]:
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused"))
    return frozenset(rev.revision for rev in script.walk_revisions())


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


async def upgrade_async(url: str, revision: str = "head") -> None:
    # env.py drives its own event loop, so it runs in a worker thread.
    await asyncio.to_thread(upgrade, url, revision)
