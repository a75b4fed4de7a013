"""Claim tokens, unrecorded losses and abandoned-thread counts.

Every claim writes a fresh token on the rows it takes; acknowledgements, heartbeats, starts and
progress name that token, so a late write from an earlier run (a frozen worker whose job was
rescued, retried from the dead letter and claimed again) can never touch a later run. The
attempt number cannot serve: it restarts at a retry from the dead letter.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from alembic import op

from pgqueue.migrate import current_schema

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE {s}.jobs ADD COLUMN claim_token uuid;
-- Times a worker died holding this job before its start was recorded (it may have started):
-- such losses cost no attempt, but a job that keeps taking workers down is stopped after a few.
ALTER TABLE {s}.jobs ADD COLUMN unrecorded_losses integer NOT NULL DEFAULT 0;
-- Sync handlers that ran past their timeout still hold a thread (and so a slot) until they end.
ALTER TABLE {s}.workers ADD COLUMN abandoned_threads integer NOT NULL DEFAULT 0;
"""

DOWNGRADE = """
ALTER TABLE {s}.workers DROP COLUMN abandoned_threads;
ALTER TABLE {s}.jobs DROP COLUMN unrecorded_losses;
ALTER TABLE {s}.jobs DROP COLUMN claim_token;
"""


def upgrade() -> None:
    op.execute(UPGRADE.format(s=f'"{current_schema()}"'))


def downgrade() -> None:
    op.execute(DOWNGRADE.format(s=f'"{current_schema()}"'))
