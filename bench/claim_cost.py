"""What claiming costs per job, by the size of the backlog and of the batch, and whether the
claim's plan reads the whole jobs table.

    python -m bench.claim_cost --dsn DSN                 # a database pgqueue has migrated (schema pgqueue)
    python -m bench.claim_cost --dsn DSN --backlog 8000,20000,100000 --batch 50,400

For each backlog and batch size: fills ``jobs`` with that many queued jobs (five priorities),
analyses it (as autovacuum does once a backlog has sat a while), then drains it with the
worker's claim statement (planned at each run as the worker runs it, half of each batch
starting at once, as a worker with prefetch does), deleting each batch before the next claim.
Prints the wall time per claimed job (client and server), the rows sequential scans read from
``jobs`` per claimed job over the drain (the figure machine noise does not move), and what
``bench.ack_plans`` finds in the first claim's plan (sequential scans, rows a join threw away).
It empties the schema's jobs and finished_jobs tables: point it at a scratch database.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from typing import Any

import psycopg

from bench.ack_plans import findings
from pgqueue._sql import Queries


def claim_params(batch: int) -> dict[str, Any]:
    return {
        "queues": ["q"],
        "weights": [1.0],
        "vtimes": [0.0],
        "limit": batch,
        "start": batch // 2,
        "worker_id": "bench",
        "lease": 30.0,
        "token": uuid.uuid4(),
    }


def rows_read(conn: psycopg.Connection[Any], queries: Queries) -> int:
    """Rows sequential scans have read from ``jobs`` so far, as another session sees them: a
    backend reports its counts when it has been idle a second, so wait that long first."""
    time.sleep(1.1)
    with psycopg.connect(conn.info.dsn, autocommit=True) as other:
        (read,) = other.execute(
            "SELECT seq_tup_read FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'jobs'",
            [queries.schema],
        ).fetchone()  # type: ignore[misc]
    return int(read)


def measure(
    conn: psycopg.Connection[Any], queries: Queries, backlog: int, batch: int
) -> tuple[float, list[str], float]:
    jobs = f'"{queries.schema}".jobs'
    conn.execute(f'TRUNCATE {jobs}, "{queries.schema}".finished_jobs')
    conn.execute("DEALLOCATE ALL")
    conn.execute(
        f"INSERT INTO {jobs} (queue, task, args, priority)"
        " SELECT 'q', 't', '{\"n\": 1}', 1 + mod(i, 5) FROM generate_series(1, %s) AS i",
        [backlog],
    )
    conn.execute(f"ANALYZE {jobs}")
    with conn.transaction(force_rollback=True):
        (plan,) = conn.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + queries.claim, claim_params(batch)
        ).fetchone()  # type: ignore[misc]
    scans = findings(plan, [])
    read_before = rows_read(conn, queries)
    spent, claimed = 0.0, 0
    while True:
        began = time.perf_counter()
        rows = conn.execute(queries.claim, claim_params(batch), prepare=False).fetchall()
        spent += time.perf_counter() - began
        if not rows:
            read = rows_read(conn, queries) - read_before
            return spent / max(claimed, 1), scans, read / max(claimed, 1)
        claimed += len(rows)
        conn.execute(f"DELETE FROM {jobs} WHERE id = ANY(%s)", [[r[0] for r in rows]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dsn", required=True)
    p.add_argument("--schema", default="pgqueue")
    p.add_argument("--backlog", default="8000,20000,100000")
    p.add_argument("--batch", default="50,400")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    queries = Queries(args.schema)
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        for backlog in (int(x) for x in args.backlog.split(",")):
            for batch in (int(x) for x in args.batch.split(",")):
                results = [measure(conn, queries, backlog, batch) for _ in range(args.reps)]
                per_job = " ".join(f"{r[0] * 1e6:.1f}" for r in results)
                read = " ".join(f"{r[2]:.1f}" for r in results)
                print(
                    json.dumps(
                        {
                            "backlog": backlog,
                            "batch": batch,
                            "us_per_job": per_job,
                            "rows_read_per_job": read,
                            "plan": results[0][1],
                        }
                    )
                )


if __name__ == "__main__":
    main()
