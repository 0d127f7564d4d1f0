"""Alembic environment for livecall's call records (async engines: aiosqlite, asyncpg).

Two ways in: `livecall.store.db.upgrade()` hands over an open connection (the normal path, for
the CLI and the app), and a plain `alembic` command with `sqlalchemy.url` set makes its own
async engine. SQLite runs in batch mode so later migrations can alter columns there too.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import async_engine_from_config

from livecall.store.models import Base
from livecall.store.search import include_name

config = context.config

target_metadata = Base.metadata


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_name=include_name,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _migrate_with_own_engine() -> None:
    engine = async_engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_migrate)
            await connection.commit()
    finally:
        await engine.dispose()


def _offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _offline()
elif (shared := config.attributes.get("connection")) is not None:
    _migrate(shared)
else:
    asyncio.run(_migrate_with_own_engine())
