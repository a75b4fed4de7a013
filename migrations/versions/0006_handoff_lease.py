"""Hand-offs: an enqueue may give a waiting worker its job outright.

A worker that takes jobs handed to it records its lease here (seconds). An enqueue that commits
by itself and finds such a worker waiting inserts the job already claimed by it, with that
lease, and sends it the job in the notification, saving the worker its claim. NULL: a worker
that does not take hand-offs (one started before this revision), woken to claim instead.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from alembic import op

from pgqueue.migrate import current_schema

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(f'ALTER TABLE "{current_schema()}".workers ADD COLUMN handoff_lease double precision')


def downgrade() -> None:
    op.execute(f'ALTER TABLE "{current_schema()}".workers DROP COLUMN handoff_lease')
