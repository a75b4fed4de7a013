"""Finished jobs leave the jobs table: ``finished_jobs`` holds the completed and cancelled ones.

Why: the jobs table is what every claim, acknowledgement and heartbeat works on. While finished
rows stayed in it (kept a day by default), it grew with every job run: its primary key and heap
outgrew the cache, vacuum had ever more to walk, and each finish wrote one more entry into an
index of finished rows on the hot table. Now a finish deletes the live row (no index entry is
written for a delete) and inserts the history row into ``finished_jobs``, which only ever
receives appends and retention's deletes: the jobs table holds what is queued or running, so it
stays as small as the backlog whatever the retention.

Workers older than this revision write finished states into ``jobs`` and are refused by the new
check constraint (their acknowledgements fail, and the jobs run again once their leases expire):
stop them before upgrading, as for any schema change, and start the new ones after.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from alembic import op

from pgqueue.migrate import current_schema

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# The history columns, in both tables' order; what only a live job has (its lease, claim token,
# cancel flag) is not kept.
HISTORY = (
    "id, queue, task, args, priority, state, run_at, attempts, max_attempts, timeout, unique_key, "
    "scheduled_for, worker_id, progress, result, errors, created_at, started_at, finished_at, "
    "unrecorded_losses"
)


def upgrade() -> None:
    s = current_schema()
    op.execute(f"""
        CREATE TABLE "{s}".finished_jobs (
            id bigint PRIMARY KEY,
            queue text NOT NULL,
            task text NOT NULL,
            args jsonb NOT NULL,
            priority smallint NOT NULL,
            state "{s}".job_state NOT NULL CHECK (state IN ('completed', 'cancelled')),
            run_at timestamptz NOT NULL,
            attempts integer NOT NULL,
            max_attempts integer NOT NULL,
            timeout double precision,
            unique_key text,
            scheduled_for timestamptz,
            worker_id text,
            progress jsonb,
            result jsonb,
            errors jsonb NOT NULL,
            created_at timestamptz NOT NULL,
            started_at timestamptz,
            finished_at timestamptz NOT NULL,
            unrecorded_losses integer NOT NULL DEFAULT 0
        )""")
    # Per queue and outcome over time (the admin's figures, its clean); by age alone (retention
    # across every queue).
    op.execute(f'CREATE INDEX finished_jobs_queue_idx ON "{s}".finished_jobs (queue, state, finished_at)')
    op.execute(f'CREATE INDEX finished_jobs_age_idx ON "{s}".finished_jobs (finished_at)')
    op.execute(f"""
        WITH moved AS (
            DELETE FROM "{s}".jobs WHERE state IN ('completed', 'cancelled') RETURNING *
        )
        INSERT INTO "{s}".finished_jobs ({HISTORY})
        SELECT {HISTORY.replace("finished_at", "coalesce(finished_at, now())")} FROM moved""")
    op.execute(f'DROP INDEX "{s}".jobs_finished_idx')
    # The unique key of a live job: every row of jobs is live now.
    op.execute(f'DROP INDEX "{s}".jobs_unique_key_idx')
    op.execute(f"""CREATE UNIQUE INDEX jobs_unique_key_idx ON "{s}".jobs (queue, unique_key)
                   WHERE unique_key IS NOT NULL""")
    op.execute(f"""ALTER TABLE "{s}".jobs ADD CONSTRAINT jobs_live_state_check
                   CHECK (state IN ('queued', 'running'))""")


def downgrade() -> None:
    s = current_schema()
    op.execute(f'ALTER TABLE "{s}".jobs DROP CONSTRAINT jobs_live_state_check')
    op.execute(f'DROP INDEX "{s}".jobs_unique_key_idx')
    op.execute(f"""CREATE UNIQUE INDEX jobs_unique_key_idx ON "{s}".jobs (queue, unique_key)
                   WHERE unique_key IS NOT NULL AND state IN ('queued', 'running')""")
    op.execute(f"""CREATE INDEX jobs_finished_idx ON "{s}".jobs (queue, state, finished_at)
                   WHERE state IN ('completed', 'cancelled')""")
    op.execute(f'INSERT INTO "{s}".jobs ({HISTORY}) SELECT {HISTORY} FROM "{s}".finished_jobs')
    op.execute(f'DROP TABLE "{s}".finished_jobs')
