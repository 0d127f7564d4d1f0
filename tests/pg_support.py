"""A fresh PostgreSQL database per test, for tests that run a whole server against one.

A database (not a schema) because a `livecall serve` subprocess only gets a URL. Without
PostgreSQL the test is skipped, except under CI=true, where it fails (`service_missing`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from support import service_missing

PG_URL = os.environ.get(
    "LIVECALL_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
# a port nothing listens on: connections are refused at once
DEAD_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:1/test"


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


@asynccontextmanager
async def _admin() -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database (skipped or failed by the CI rule when it is down)."""
    try:
        admin = await asyncpg.connect(_dsn(PG_URL), timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        service_missing(f"PostgreSQL unreachable at {PG_URL}: {error!r}")
    try:
        yield admin
    finally:
        await admin.close()


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """A new, empty database (no tables) for one test, dropped afterwards; yields its URL."""
    name = f"lc_test_{uuid.uuid4().hex[:12]}"
    async with _admin() as admin:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@asynccontextmanager
async def fresh_schema() -> AsyncIterator[dict[str, Any]]:
    """A new, empty schema in the test database for one test, dropped afterwards; yields the
    engine's `connect_args` that put it first on the search path."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    async with _admin() as admin:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield {"server_settings": {"search_path": schema}}
        finally:
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


async def table_counts(url: str, call_sid: str) -> tuple[int, int, int]:
    """Rows of one call in calls, turns and call_events (0s when the tables do not exist)."""
    conn = await asyncpg.connect(_dsn(url), timeout=5)
    try:
        counts = []
        for table in ("calls", "turns", "call_events"):
            exists = await conn.fetchval("SELECT to_regclass($1)", table)
            n = 0
            if exists:
                n = await conn.fetchval(
                    f"SELECT count(*) FROM {table} WHERE call_sid = $1", call_sid
                )
            counts.append(int(n))
        return counts[0], counts[1], counts[2]
    finally:
        await conn.close()
