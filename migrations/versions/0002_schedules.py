"""Recurring schedules shared by every scheduler process.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from alembic import op

from pgqueue.migrate import current_schema

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = """
CREATE TABLE {s}.schedules (
    name            text PRIMARY KEY,
    task            text NOT NULL,
    args            jsonb NOT NULL DEFAULT '{{}}',
    queue           text,
    priority        smallint CHECK (priority BETWEEN 1 AND 10),
    max_attempts    integer CHECK (max_attempts >= 1),
    cron            text,
    every_seconds   double precision CHECK (every_seconds > 0),
    timezone        text NOT NULL DEFAULT 'UTC',
    paused          boolean NOT NULL DEFAULT false,
    misfire_policy  text NOT NULL DEFAULT 'skip' CHECK (misfire_policy IN ('skip', 'coalesce')),
    misfire_grace_seconds double precision NOT NULL DEFAULT 60 CHECK (misfire_grace_seconds >= 0),
    from_code       boolean NOT NULL DEFAULT false,
    next_fire_at    timestamptz,
    last_fire_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (every_seconds IS NULL))
);
"""

DOWNGRADE = """
DROP TABLE {s}.schedules;
"""


def upgrade() -> None:
    op.execute(UPGRADE.format(s=f'"{current_schema()}"'))


def downgrade() -> None:
    op.execute(DOWNGRADE.format(s=f'"{current_schema()}"'))
