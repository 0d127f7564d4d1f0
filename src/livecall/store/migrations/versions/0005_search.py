"""search and call backs: searchable lines with a full-text index, numbers' digits, handled mark

SQLite gets an FTS5 table over `search_docs` kept in step by triggers; PostgreSQL a GIN index
on `to_tsvector('simple', text)`. Existing calls are indexed here (their turns, their numbers,
their analyses' summaries and fields).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SQLITE_FTS = (
    "CREATE VIRTUAL TABLE search_fts USING fts5(text, content='search_docs', "
    "content_rowid='id', tokenize='unicode61 remove_diacritics 2')",
    "CREATE TRIGGER search_docs_ai AFTER INSERT ON search_docs BEGIN "
    "INSERT INTO search_fts(rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER search_docs_ad AFTER DELETE ON search_docs BEGIN "
    "INSERT INTO search_fts(search_fts, rowid, text) VALUES ('delete', old.id, old.text); END",
    "CREATE TRIGGER search_docs_au AFTER UPDATE ON search_docs BEGIN "
    "INSERT INTO search_fts(search_fts, rowid, text) VALUES ('delete', old.id, old.text); "
    "INSERT INTO search_fts(rowid, text) VALUES (new.id, new.text); END",
)


def _rdigits(number: str | None) -> str | None:
    found = "".join(ch for ch in number or "" if ch.isdigit())
    return found[::-1][:32] or None


def upgrade() -> None:
    bind = op.get_bind()
    # plain ALTER TABLE on both (no batch copy of `calls`: its turns would cascade away)
    op.add_column("calls", sa.Column("from_rdigits", sa.String(32), nullable=True))
    op.add_column("calls", sa.Column("to_rdigits", sa.String(32), nullable=True))
    op.add_column(
        "calls", sa.Column("callback_handled_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index("ix_calls_from_rdigits", "calls", ["from_rdigits"])
    op.create_index("ix_calls_to_rdigits", "calls", ["to_rdigits"])
    op.create_table(
        "search_docs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("call_sid", sa.String(64), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("ref", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["call_sid"],
            ["calls.call_sid"],
            name=op.f("fk_search_docs_call_sid_calls"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_search_docs")),
        sa.UniqueConstraint(
            "call_sid", "source", "ref", name=op.f("uq_search_docs_call_sid_source_ref")
        ),
    )
    if bind.dialect.name == "sqlite":
        for statement in _SQLITE_FTS:
            op.execute(statement)
    else:
        op.execute(
            "CREATE INDEX ix_search_docs_tsv ON search_docs "
            "USING gin (to_tsvector('simple'::regconfig, text))"
        )
    # what is already there: every turn's words, every call's numbers
    op.execute(
        "INSERT INTO search_docs (call_sid, source, ref, text) "
        "SELECT call_sid, speaker, idx, text FROM turns WHERE text <> ''"
    )
    # and every finished analysis: its summary and extracted fields (store.search.analysis_docs)
    from livecall.store.search import analysis_docs

    analyses = sa.table(
        "call_analyses",
        sa.column("call_sid", sa.String),
        sa.column("status", sa.String),
        sa.column("summary", sa.Text),
        sa.column("fields", sa.JSON),
    )
    docs = []
    for sid, summary, fields in bind.execute(
        sa.select(analyses.c.call_sid, analyses.c.summary, analyses.c.fields).where(
            analyses.c.status == "done"
        )
    ):
        docs += analysis_docs(sid, summary, fields if isinstance(fields, dict) else None)
    if docs:
        op.bulk_insert(
            sa.table(
                "search_docs",
                sa.column("call_sid", sa.String),
                sa.column("source", sa.String),
                sa.column("ref", sa.Integer),
                sa.column("text", sa.Text),
            ),
            docs,
        )
    calls = sa.table(
        "calls",
        sa.column("call_sid", sa.String),
        sa.column("from_number", sa.String),
        sa.column("to_number", sa.String),
        sa.column("from_rdigits", sa.String),
        sa.column("to_rdigits", sa.String),
    )
    rows = bind.execute(sa.select(calls.c.call_sid, calls.c.from_number, calls.c.to_number))
    updates = [
        {"sid": sid, "f": _rdigits(from_number), "t": _rdigits(to_number)}
        for sid, from_number, to_number in rows
        if from_number or to_number
    ]
    if updates:
        bind.execute(
            calls.update()
            .where(calls.c.call_sid == sa.bindparam("sid"))
            .values(from_rdigits=sa.bindparam("f"), to_rdigits=sa.bindparam("t")),
            updates,
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in ("search_docs_ai", "search_docs_ad", "search_docs_au"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS search_fts")
    else:
        op.execute("DROP INDEX IF EXISTS ix_search_docs_tsv")
    op.drop_table("search_docs")
    op.drop_index("ix_calls_to_rdigits", table_name="calls")
    op.drop_index("ix_calls_from_rdigits", table_name="calls")
    for column in ("callback_handled_at", "to_rdigits", "from_rdigits"):
        op.drop_column("calls", column)  # SQLite 3.35+ drops a column in place
