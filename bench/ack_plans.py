"""What one acknowledgement costs the server, by the size of the jobs table and its statistics.

    python -m bench.ack_plans --dsn DSN              # a database pgqueue has migrated (schema pgqueue)
    python -m bench.ack_plans --dsn DSN --outcomes 300 --rows 150,400,1500,20000

For each table size, twice: a table never analysed since it was emptied ("fresh") and one that
autovacuum analysed while it was empty ("analysed empty", the usual case for a table that holds
only live jobs). It fills ``jobs`` with that many running jobs, then EXPLAIN ANALYZEs the worker's
ack statement for ``--outcomes`` completed jobs (custom and generic plan), rolled back, and
prints the time and every sequential scan and join filter in the plan. It empties the schema's
jobs and finished_jobs tables: point it at a scratch database.
"""

from __future__ import annotations

import argparse
import re
import uuid
from typing import Any

import psycopg

from pgqueue._sql import Queries, numbered

# Every placeholder of the ack carries its cast: the PREPARE's parameter types come from them.
CAST = re.compile(r"%\((\w+)\)[sb]::([\w\[\]]+)")


def findings(plan: Any, out: list[str]) -> list[str]:
    if isinstance(plan, dict):
        if plan.get("Node Type") == "Seq Scan":
            out.append(f"seq scan {plan.get('Relation Name')} x{plan.get('Actual Loops')}")
        if plan.get("Rows Removed by Join Filter"):
            out.append(f"join filter removed {plan['Rows Removed by Join Filter']:,}")
        for value in plan.values():
            findings(value, out)
    elif isinstance(plan, list):
        for value in plan:
            findings(value, out)
    return out


def measure(
    conn: psycopg.Connection[Any], schema: str, rows: int, outcomes: int, analysed_empty: bool
) -> None:
    jobs = f'"{schema}".jobs'
    conn.execute(f'TRUNCATE {jobs}, "{schema}".finished_jobs')
    if analysed_empty:
        conn.execute(f"INSERT INTO {jobs} (queue, task) SELECT 'q', 't' FROM generate_series(1, %s)", [rows])
        conn.execute(f"DELETE FROM {jobs}")
        conn.execute(f"VACUUM ANALYZE {jobs}")
    token = uuid.uuid4()
    conn.execute(
        f"INSERT INTO {jobs} (queue, task, state, claim_token, worker_id, attempts, lease_expires_at)"
        " SELECT 'q', 't', 'running', %s, 'w', 1, now() + interval '1 minute' FROM generate_series(1, %s)",
        [token, rows],
    )
    ids = [r[0] for r in conn.execute(f"SELECT id FROM {jobs} ORDER BY id LIMIT %s", [outcomes])]
    n = len(ids)
    params = {
        "id": ids, "token": [token] * n, "kind": ["completed"] * n, "result": [None] * n,
        "error": [None] * n, "delay": [0.0] * n, "charge": [0] * n, "started_at": [None] * n,
        "start_id": [], "start_token": [], "start_at": [],
    }  # fmt: skip
    query = Queries(schema).ack
    types = dict(CAST.findall(query))
    text, names = numbered(query)
    conn.execute("DEALLOCATE ALL")
    conn.execute(f"PREPARE ack_plan({', '.join(types[name] for name in names)}) AS {text}")
    placeholders = ", ".join(f"%s::{types[name]}" for name in names)
    label = "analysed empty" if analysed_empty else "fresh"
    for mode in ("force_custom_plan", "force_generic_plan"):
        conn.execute(f"SET plan_cache_mode = {mode}")
        with conn.transaction(force_rollback=True):
            row = (
                psycopg.ClientCursor(conn)
                .execute(
                    f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE ack_plan({placeholders})",
                    [params[k] for k in names],
                )
                .fetchone()
            )
        assert row is not None
        plan = row[0][0]
        took = plan["Execution Time"]
        print(f"{rows:>7,} rows · {label:14} · {mode[6:12]:7} · {n} outcomes: {took:7.2f} ms  ", end="")
        print(", ".join(findings(plan, [])))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--schema", default="pgqueue")
    parser.add_argument("--outcomes", type=int, default=100)
    parser.add_argument("--rows", default="150,400,1500,20000")
    args = parser.parse_args()
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        for rows in (int(r) for r in args.rows.split(",")):
            for analysed_empty in (False, True):
                measure(conn, args.schema, rows, args.outcomes, analysed_empty)


if __name__ == "__main__":
    main()
