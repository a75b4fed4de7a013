"""Waiting workers: who may be woken by an enqueue.

A worker with room whose last claim found less than it asked for sets ``waiting_until`` (its
lease from now, renewed by its heartbeat); an enqueue that commits by itself wakes one such
worker and clears it, instead of notifying every worker that listens. NULL: busy, or woken.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from alembic import op

from pgqueue.migrate import current_schema

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(f'ALTER TABLE "{current_schema()}".workers ADD COLUMN waiting_until timestamptz')


def downgrade() -> None:
    op.execute(f'ALTER TABLE "{current_schema()}".workers DROP COLUMN waiting_until')
