"""Engines and sessions from a database URL, and Alembic run from inside the package.

SQLite (the embedded default) gets WAL, foreign keys and a busy timeout on every connection:
WAL lets the API read while the call writer writes, foreign keys make deleting a call delete
its turns and events. PostgreSQL (asyncpg) needs nothing special. The same code runs on both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_file(url: str) -> Path | None:
    """The file behind a SQLite URL, or None for in-memory databases."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


SUPPORTED_BACKENDS = ("sqlite", "postgresql")


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for `url`; a SQLite file's directory is created on first use."""
    backend = make_url(url).get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            "DATABASE_URL: call records need SQLite (sqlite+aiosqlite:///path.db) or "
            f"PostgreSQL (postgresql+asyncpg://…), not {backend}"
        )
    if is_sqlite(url):
        path = _sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _on_sqlite_connect)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **kwargs)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)


# --- migrations -----------------------------------------------------------------------------


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing into the installed package (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # `%` would be read as interpolation by configparser
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _run(connection: Connection, action: str, revision: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    if action == "upgrade":
        command.upgrade(cfg, revision)
    elif action == "downgrade":
        command.downgrade(cfg, revision)
    else:  # pragma: no cover - programming error
        raise ValueError(action)


#: PostgreSQL advisory lock key ("livecall" in ASCII) held while migrating.
MIGRATION_LOCK_KEY = 0x6C69766563616C6C


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema up to `revision` (in one transaction where the backend allows it).

    On PostgreSQL the transaction first takes an advisory lock, so instances starting together
    migrate one after the other: the later ones find the schema at head and do nothing.
    SQLite serializes writers itself; a loser of that race finds the schema done (see
    `upgrade_or_confirm`).
    """
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        await conn.run_sync(_run, "upgrade", revision)


async def upgrade_or_confirm(engine: AsyncEngine) -> None:
    """`upgrade()` to head; if that fails but another process got the schema to head, fine."""
    try:
        await upgrade(engine)
    except Exception:
        try:
            done = await current_revision(engine) == head_revision()
        except Exception:
            done = False
        if not done:
            raise


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(_run, "downgrade", revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or None when it has never been migrated."""

    def _current(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(_current)


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()
