"""post-call analysis and caller memory

Revision ID: 0004
Revises: 0001
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "call_analyses",
        sa.Column("call_sid", sa.String(64), nullable=False),
        sa.Column("profile", sa.String(128), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("model", sa.String(128), nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.Column("fields", JSON, nullable=True),
        sa.Column("success", sa.Boolean(), nullable=True),
        sa.Column("success_reason", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("completed_at", TS, nullable=True),
        sa.ForeignKeyConstraint(
            ["call_sid"],
            ["calls.call_sid"],
            name=op.f("fk_call_analyses_call_sid_calls"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("call_sid", name=op.f("pk_call_analyses")),
    )
    op.create_index("ix_call_analyses_status_next", "call_analyses", ["status", "next_attempt_at"])
    op.create_table(
        "caller_memory",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("call_sid", sa.String(64), nullable=False),
        sa.Column("number", sa.String(64), nullable=False),
        sa.Column("profile", sa.String(128), nullable=False),
        sa.Column("call_started_at", TS, nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("fields", JSON, nullable=False),
        sa.ForeignKeyConstraint(
            ["call_sid"],
            ["calls.call_sid"],
            name=op.f("fk_caller_memory_call_sid_calls"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_caller_memory")),
        sa.UniqueConstraint("call_sid", name=op.f("uq_caller_memory_call_sid")),
    )
    op.create_index(
        "ix_caller_memory_number_profile",
        "caller_memory",
        ["number", "profile", "call_started_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_caller_memory_number_profile", table_name="caller_memory")
    op.drop_table("caller_memory")
    op.drop_index("ix_call_analyses_status_next", table_name="call_analyses")
    op.drop_table("call_analyses")
