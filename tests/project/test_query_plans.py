"""The acknowledgement must stay a primary-key lookup per job whatever the statistics say.

Statistics gathered while every job was queued say "almost no job is running". A plan built on
that (a generic plan of the prepared ack, as the worker uses) once went through the partial index
of running jobs and scanned all of them for each outcome: a worker with thousands of jobs in hand
stalled after autovacuum analysed the table.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg

from pgqueue import Queue
from pgqueue._sql import numbered


def _index_names(plan: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(plan, dict):
        if "Index Name" in plan:
            found.add(plan["Index Name"])
        for value in plan.values():
            found |= _index_names(value)
    elif isinstance(plan, list):
        for value in plan:
            found |= _index_names(value)
    return found


ACK_TYPES = {
    "id": "bigint[]",
    "token": "uuid[]",
    "kind": "text[]",
    "result": "jsonb[]",
    "error": "jsonb[]",
    "delay": "float8[]",
    "charge": "int[]",
    "started_at": "timestamptz[]",
    "start_id": "bigint[]",
    "start_token": "uuid[]",
    "start_at": "timestamptz[]",
}


def test_ack_uses_the_primary_key_even_with_stale_statistics(queue: Queue) -> None:
    ids = queue.enqueue_many([{"task": "t", "queue": "q"}] * 5000)
    schema = queue.schema
    token = uuid.uuid4()
    with psycopg.connect(queue.dsn, autocommit=True) as conn:
        conn.execute(f'ANALYZE "{schema}".jobs')  # statistics: every job queued, none running
        conn.execute(
            f"UPDATE \"{schema}\".jobs SET state = 'running', attempts = 1, worker_id = 'w',"
            " claim_token = %s, lease_expires_at = now() + interval '1 minute' WHERE id = ANY(%s)",
            (token, ids[:4000]),
        )
        conn.execute("SET plan_cache_mode = force_generic_plan")
        params = {
            "id": ids[:2000],
            "token": [token] * 2000,
            "kind": ["completed"] * 2000,
            "result": [None] * 2000,
            "error": [None] * 2000,
            "delay": [0.0] * 2000,
            "charge": [0] * 2000,
            "started_at": [None] * 2000,
            # the starts of prefetched jobs ride the same statement: they must not scan either
            "start_id": ids[2000:4000],
            "start_token": [token] * 2000,
            "start_at": [datetime.now(UTC)] * 2000,
        }
        row = _execute_prepared(conn, queue.queries.ack, ACK_TYPES, params, "EXPLAIN (FORMAT JSON) ")
    assert row is not None
    plan = row[0] if isinstance(row[0], list) else json.loads(row[0])
    used = _index_names(plan)
    assert "jobs_running_idx" not in used, used
    assert "jobs_pkey" in used, used


def _node_types(plan: Any) -> set[tuple[str, str | None]]:
    """(node type, relation) of every node: ("Seq Scan", "jobs") is a read of the whole table."""
    found: set[tuple[str, str | None]] = set()
    if isinstance(plan, dict):
        if "Node Type" in plan:
            found.add((plan["Node Type"], plan.get("Relation Name")))
        for value in plan.values():
            found |= _node_types(value)
    elif isinstance(plan, list):
        for value in plan:
            found |= _node_types(value)
    return found


def _execute_prepared(
    conn: psycopg.Connection[Any], query: str, types: dict[str, str], params: dict[str, Any], prefix: str = ""
) -> Any:
    """``query`` PREPAREd (as a worker's driver prepares it) and EXECUTEd after ``prefix`` (an
    EXPLAIN, say) with these parameter values; its first row."""
    text, names = numbered(query)
    conn.execute(f"PREPARE under_test({', '.join(types[n] for n in names)}) AS {text}", prepare=False)
    try:
        placeholders = ", ".join(f"%s::{types[n]}" for n in names)
        # A utility statement takes no server-side parameters: bind them client-side.
        cur = psycopg.ClientCursor(conn).execute(
            f"{prefix}EXECUTE under_test({placeholders})", [params[n] for n in names]
        )
        return cur.fetchone()
    finally:
        conn.execute("DEALLOCATE under_test", prepare=False)


def _generic_plan(
    conn: psycopg.Connection[Any],
    query: str,
    types: dict[str, str],
    params: dict[str, Any],
    *,
    cache_mode: str = "force_generic_plan",
) -> Any:
    """The plan a prepared ``query`` gets once the server settles on a generic plan (as it may
    for a statement a connection runs often), with these parameter values; run and rolled back.
    ``cache_mode="force_custom_plan"``: the plan of its first executions instead."""
    conn.execute(f"SET plan_cache_mode = {cache_mode}")
    try:
        with conn.transaction(force_rollback=True):
            row = _execute_prepared(conn, query, types, params, "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ")
    finally:
        conn.execute("RESET plan_cache_mode")
    assert row is not None
    return row[0] if isinstance(row[0], list) else json.loads(row[0])


def test_cancel_by_id_or_by_key_keeps_its_index_under_a_generic_plan(queue: Queue) -> None:
    """One statement cancels by id or by unique key (the other NULL); each arm keeps its index,
    where ``%(id)s IS NULL OR id = %(id)s`` would read every job."""
    ids = queue.enqueue_many([{"task": "t", "queue": "q"}] * 20000)
    keyed = queue.enqueue("t", queue="q", unique_key="the-key")
    types = {"id": "bigint", "unique_key": "text", "queue": "text", "channel": "text"}
    with psycopg.connect(queue.dsn, autocommit=True) as conn:
        conn.execute(f'ANALYZE "{queue.schema}".jobs')
        for params, index in (
            ({"id": ids[123], "unique_key": None, "queue": None}, "jobs_pkey"),
            ({"id": None, "unique_key": "the-key", "queue": None}, "jobs_unique_key_idx"),
            ({"id": None, "unique_key": "the-key", "queue": "q"}, "jobs_unique_key_idx"),
        ):
            plan = _generic_plan(conn, queue.queries.cancel_jobs, types, {**params, "channel": "c"})
            assert index in _index_names(plan), (params, plan)
            assert ("Seq Scan", "jobs") not in _node_types(plan), (params, plan)
            assert plan[0]["Plan"]["Plans"][0]["Actual Rows"] == 1, params
    assert keyed > ids[-1]


def test_pruning_and_cleaning_read_finished_jobs_through_their_index(queue: Queue) -> None:
    """Retention and the admin's clean share one delete: it must read the expired rows through
    an index of finished_jobs, not the kept history nor the live backlog."""
    queue.enqueue_many([{"task": "t", "queue": "q"}] * 5000)  # a live backlog, never read
    types = {
        "states": "text[]",
        "queue": "text",
        "queue_retention": "bool",
        "older_than": "float8",
        "limit": "int",
    }
    with psycopg.connect(queue.dsn, autocommit=True) as conn:
        # 20,000 kept rows of three queues, 3,000 of them of queue q past the cut-off.
        conn.execute(
            f'INSERT INTO "{queue.schema}".finished_jobs (id, queue, task, args, priority, state,'
            " run_at, attempts, max_attempts, errors, created_at, finished_at)"
            " SELECT 10000000 + i, CASE WHEN i <= 3000 THEN 'q' ELSE 'q' || i % 3 END, 't', '{}', 5,"
            " 'completed', now(), 1, 3, '[]', now(),"
            " CASE WHEN i <= 3000 THEN now() - interval '2 days' ELSE now() - interval '1 hour' END"
            " FROM generate_series(1, 20000) AS i"
        )
        conn.execute(f'ANALYZE "{queue.schema}".finished_jobs')
        conn.execute(f"""INSERT INTO "{queue.schema}".queues (name, keep_completed)
                         VALUES ('q1', interval '3 days')""")
        for params in (
            {"states": ["completed", "cancelled"], "queue": None, "queue_retention": True},  # the pruner
            {"states": ["completed"], "queue": "q", "queue_retention": False},  # the admin's clean
        ):
            plan = _generic_plan(
                conn,
                queue.queries.delete_finished_jobs,
                types,
                {**params, "older_than": 86400.0, "limit": 500},
            )
            assert "finished_jobs_age_idx" in _index_names(plan), (params, plan)
            assert ("Seq Scan", "finished_jobs") not in _node_types(plan), (params, plan)
            assert not {"jobs_pkey", "jobs_claim_idx"} & _index_names(plan), (params, plan)
            assert plan[0]["Plan"]["Plans"][0]["Actual Rows"] == 500, params  # the DELETE got its batch


def _conditions(plan: Any, key: str) -> list[str]:
    """Every ``key`` ("Index Cond", "Filter") of the plan's nodes."""
    found: list[str] = []
    if isinstance(plan, dict):
        if key in plan:
            found.append(plan[key])
        for value in plan.values():
            found += _conditions(value, key)
    elif isinstance(plan, list):
        for value in plan:
            found += _conditions(value, key)
    return found


def test_the_rescue_sighting_tests_leases_in_the_running_index(queue: Queue) -> None:
    """Every rescue round sights the expired leases. Under churn the running index holds an entry
    for each job that ran since the last vacuum; those of finished jobs carry leases still in the
    future. Tested as an index condition they are skipped; tested as a filter, each costs a fetch
    of its row (12.7 ms a round instead of 0.06 at 12,000 jobs/s)."""
    ids = queue.enqueue_many([{"task": "t", "queue": "q"}] * 5000)
    jobs = f'"{queue.schema}".jobs'
    with psycopg.connect(queue.dsn, autocommit=True) as conn:
        conn.execute(
            f"UPDATE {jobs} SET state = 'running', claim_token = gen_random_uuid(), worker_id = 'w',"
            " lease_expires_at = now() + interval '30 seconds' WHERE id = ANY(%s)",
            [ids[:2000]],
        )
        expired = "lease_expires_at = now() - interval '1 minute'"
        conn.execute(f"UPDATE {jobs} SET {expired} WHERE id = ANY(%s)", [ids[:5]])
        conn.execute(f"UPDATE {jobs} SET lease_expires_at = NULL WHERE id = %s", [ids[5]])
        conn.execute(f"ANALYZE {jobs}")
        sighting, types = queue.queries.expired_leases, {"limit": "int"}
        plan = _generic_plan(conn, sighting, types, {"limit": 10_000}, cache_mode="force_custom_plan")
    index_conditions = " ".join(_conditions(plan, "Index Cond"))
    assert "lease_expires_at < now()" in index_conditions, plan
    assert "lease_expires_at IS NULL" in index_conditions, plan
    assert not [f for f in _conditions(plan, "Filter") if "lease_expires_at" in f], plan
    assert ("Seq Scan", "jobs") not in _node_types(plan), plan
    assert plan[0]["Plan"]["Actual Rows"] == 6, plan


CLAIM_TYPES = {
    "queues": "text[]",
    "weights": "float8[]",
    "vtimes": "float8[]",
    "limit": "int",
    "start": "int",
    "worker_id": "text",
    "lease": "float8",
    "token": "uuid",
    "queue": "text",
    "burst": "float8",
}
CLAIM_COMMON = {"worker_id": "w", "lease": 30.0, "start": 10, "burst": 1.0, "weights": [1.0], "vtimes": [0.0]}
"""The claim parameters every plan test uses alike (a one-queue worker with ten free slots)."""
DELAYED = 100_000


def _pages_read(plan: Any) -> int:
    """Buffers the reads of ``jobs`` touched to find the rows (the leaf scans; the UPDATE's own
    lookups of the claimed rows, by primary key or by row address, and its writes are not
    counted: a TID scan's figure also holds the buffers of the subquery that feeds it)."""
    if isinstance(plan, list):
        return sum(_pages_read(p) for p in plan)
    if not isinstance(plan, dict):
        return 0
    own = 0
    node = plan.get("Node Type", "")
    finding = "Scan" in node and node != "Tid Scan" and plan.get("Index Name") != "jobs_pkey"
    if plan.get("Relation Name") == "jobs" and finding:
        own = int(plan["Shared Hit Blocks"] + plan["Shared Read Blocks"])
    return own + sum(_pages_read(v) for v in plan.values() if isinstance(v, (dict, list)))


def _claimed(plan: Any) -> int:
    return int(plan[0]["Plan"]["Actual Rows"])


def test_a_claim_never_reads_the_delayed_jobs(queue: Queue) -> None:
    """100,000 jobs delayed an hour at the best priority, a few ready at a worse one: the claim
    takes the ready ones reading a few dozen pages, as it does with no delayed job at all, under
    the generic plan and the custom one alike; with only delayed jobs left (the idle poll), it
    finds nothing just as cheaply. One range over the queue would walk every delayed entry of
    priority 1 (hundreds of pages) before reaching priority 5; a sequential scan reads them all."""
    schema = queue.schema
    with psycopg.connect(queue.dsn, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{schema}".jobs (queue, task, priority, run_at)'
            " SELECT 'q', 't', 1, now() + interval '1 hour' FROM generate_series(1, %s)",
            (DELAYED,),
        )
        ready = queue.enqueue_many([{"task": "t", "queue": "q", "priority": 5}] * 20)
        conn.execute(f"INSERT INTO \"{schema}\".queues (name, concurrency) VALUES ('capped', 5)")
        conn.execute(
            f'INSERT INTO "{schema}".jobs (queue, task, priority, run_at)'
            " SELECT 'capped', 't', 1, now() + interval '1 hour' FROM generate_series(1, %s)",
            (DELAYED,),
        )
        queue.enqueue_many([{"task": "t", "queue": "capped", "priority": 5}] * 3)
        conn.execute(f'VACUUM ANALYZE "{schema}".jobs')
        common = {**CLAIM_COMMON, "token": uuid.uuid4()}
        for mode in ("force_generic_plan", "force_custom_plan"):
            for query, params, expected in (
                (queue.queries.claim, {"queues": ["q"], "limit": 10, "queue": None}, 10),
                (queue.queries.claim_limited, {"queue": "capped", "limit": 10, "queues": None}, 3),
            ):
                plan = _generic_plan(conn, query, CLAIM_TYPES, {**common, **params}, cache_mode=mode)
                where = (mode, params)
                assert ("Seq Scan", "jobs") not in _node_types(plan), where
                assert _claimed(plan) == expected, where
                assert _pages_read(plan) < 80, (where, _pages_read(plan))
        conn.execute(f'DELETE FROM "{schema}".jobs WHERE id = ANY(%s)', (ready,))
        conn.execute(f'VACUUM ANALYZE "{schema}".jobs')
        for mode in ("force_generic_plan", "force_custom_plan"):
            params = {**common, "queues": ["q"], "limit": 10, "queue": None}
            plan = _generic_plan(conn, queue.queries.claim, CLAIM_TYPES, params, cache_mode=mode)
            assert ("Seq Scan", "jobs") not in _node_types(plan), mode
            assert _claimed(plan) == 0, mode
            assert _pages_read(plan) < 40, (mode, _pages_read(plan))


def test_a_claim_keeps_its_indexes_when_the_statistics_say_the_table_is_empty(queue: Queue) -> None:
    """The jobs table holds only live jobs, so it is often empty when autovacuum analyses it (a
    drained queue, its pages still allocated). A backlog that arrives before the next analyse
    must still be claimed through the indexes: with "no rows" in the statistics a plan may read
    the whole table per claim, which turns a drain of N jobs into N²/batch reads."""
    schema = queue.schema
    with psycopg.connect(queue.dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO \"{schema}\".jobs (queue, task) SELECT 'q', 't' FROM generate_series(1, 50000)"
        )
        conn.execute(f'DELETE FROM "{schema}".jobs')
        conn.execute(f'VACUUM ANALYZE "{schema}".jobs')  # statistics: 0 rows in many pages
        conn.execute(
            f"INSERT INTO \"{schema}\".jobs (queue, task) SELECT 'q', 't' FROM generate_series(1, 50000)"
        )
        common = {**CLAIM_COMMON, "token": uuid.uuid4(), "queues": ["q"], "limit": 50, "queue": None}
        for mode in ("force_generic_plan", "force_custom_plan"):
            plan = _generic_plan(conn, queue.queries.claim, CLAIM_TYPES, common, cache_mode=mode)
            assert ("Seq Scan", "jobs") not in _node_types(plan), (mode, plan)
            assert _claimed(plan) == 50, mode
            assert _pages_read(plan) < 80, (mode, _pages_read(plan))


def test_a_big_claim_on_a_mid_sized_table_never_scans_it(queue: Queue) -> None:
    """A claim of 400 from a backlog of 8,000 jobs, analysed: updating the claimed rows through a
    join by id, the planner hashed the whole table (a third of the claim's time, growing with
    the table until index lookups look cheaper). The claim updates them where its lock found
    them, returns them best first, and charges only the ones that start at once."""
    schema = queue.schema
    with psycopg.connect(queue.dsn, autocommit=True) as conn:
        jobs = f'"{schema}".jobs'
        conn.execute(
            f"INSERT INTO {jobs} (queue, task, priority)"
            " SELECT 'q', 't', 1 + i % 5 FROM generate_series(1, 8000) AS i"
        )
        conn.execute(f"ANALYZE {jobs}")
        common = {**CLAIM_COMMON, "token": uuid.uuid4(), "queues": ["q"], "limit": 400, "start": 200}
        for mode in ("force_generic_plan", "force_custom_plan"):
            plan = _generic_plan(
                conn, queue.queries.claim, CLAIM_TYPES, {**common, "queue": None}, cache_mode=mode
            )
            assert ("Seq Scan", "jobs") not in _node_types(plan), (mode, _node_types(plan))
            assert _claimed(plan) == 400, mode
        claimed = conn.execute(queue.queries.claim, common).fetchall()
        stored = dict(
            conn.execute(
                f"SELECT id, (attempts, started_at IS NOT NULL) FROM {jobs} WHERE id = ANY(%s)",
                ([r[0] for r in claimed],),
            ).fetchall()
        )
    assert len(claimed) == 400
    best_first = [(r[4], r[0]) for r in claimed]  # (priority, id): all due at the same moment
    assert best_first == sorted(best_first), "not returned best first"
    assert [r[-1] for r in claimed] == [True] * 200 + [False] * 200
    assert [stored[r[0]] for r in claimed] == [("1", "t")] * 200 + [("0", "f")] * 200


def _join_filtered(plan: Any) -> int:
    """Rows every join of the plan read only to throw away: a join rescanning one side per row."""
    if isinstance(plan, dict):
        return int(plan.get("Rows Removed by Join Filter", 0)) + sum(_join_filtered(v) for v in plan.values())
    if isinstance(plan, list):
        return sum(_join_filtered(v) for v in plan)
    return 0


def _loops(plan: Any, node: tuple[str, str]) -> int:
    """The most times any node of this type and relation ran."""
    most = 0
    if isinstance(plan, dict):
        if (plan.get("Node Type"), plan.get("Relation Name")) == node:
            most = int(plan.get("Actual Loops", 0))
        return max([most, *(_loops(v, node) for v in plan.values())])
    if isinstance(plan, list):
        return max([0, *(_loops(v, node) for v in plan)])
    return most


def _ack_on_a_table_analysed_empty(
    queue: Queue, kinds: list[str], cancel_requested: int = 0
) -> psycopg.Connection[Any]:
    """400 running jobs in a table analysed while empty; the first 100 get ``kinds`` as
    outcomes, the first ``cancel_requested`` of them flagged as queue.cancel flags a running
    job. Checks the plans (each outcome finds its row by key) and runs the ack; returns the
    connection, to look at what it did."""
    schema = queue.schema
    token = uuid.uuid4()
    conn = psycopg.connect(queue.dsn, autocommit=True)
    jobs = f'"{schema}".jobs'
    conn.execute(f"INSERT INTO {jobs} (queue, task) SELECT 'q', 't' FROM generate_series(1, 400)")
    conn.execute(f"DELETE FROM {jobs}")
    conn.execute(f"VACUUM ANALYZE {jobs}")  # statistics: no rows
    conn.execute(
        f"INSERT INTO {jobs} (queue, task, state, claim_token, worker_id, attempts, lease_expires_at)"
        " SELECT 'q', 't', 'running', %s, 'w', 1, now() + interval '1 minute'"
        " FROM generate_series(1, 400)",
        [token],
    )
    ids = [r[0] for r in conn.execute(f"SELECT id FROM {jobs} ORDER BY id LIMIT 100")]
    conn.execute(f"UPDATE {jobs} SET cancel_requested = true WHERE id = ANY(%s)", [ids[:cancel_requested]])
    params = {
        "id": ids, "token": [token] * 100, "kind": kinds,
        "result": [None] * 100, "error": [None] * 100, "delay": [0.0] * 100, "charge": [0] * 100,
        "started_at": [None] * 100, "start_id": [], "start_token": [], "start_at": [],
    }  # fmt: skip
    for mode in ("force_generic_plan", "force_custom_plan"):
        plan = _generic_plan(conn, queue.queries.ack, ACK_TYPES, params, cache_mode=mode)
        assert plan[0]["Plan"]["Plans"], plan
        assert _join_filtered(plan) == 0, (mode, _join_filtered(plan))
        assert _loops(plan, ("Seq Scan", "jobs")) <= 1, (mode, plan)
    assert _execute_prepared(conn, queue.queries.ack, ACK_TYPES, params) == (100,)
    return conn


def _count(conn: psycopg.Connection[Any], query: str) -> int:
    row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def test_an_ack_on_a_small_table_analysed_empty_looks_each_job_up_once(queue: Queue) -> None:
    """jobs holds only live jobs, so autovacuum often analyses it empty; then a few hundred
    rows come back. Planned from those statistics, an ack that joined jobs with its outcomes
    scanned jobs and, for each row, the whole outcome list: 100 outcomes on 400 rows read
    39,900 rows to throw away (40 ms instead of 2). Each outcome must find its row by key."""
    s = queue.schema
    with _ack_on_a_table_analysed_empty(queue, ["completed"] * 98 + ["retry", "dead"]) as conn:
        # 98 finished, one back in line, one dead; nothing else touched.
        assert _count(conn, f'SELECT count(*) FROM "{s}".jobs') == 301
        assert _count(conn, f"SELECT count(*) FROM \"{s}\".jobs WHERE state = 'queued'") == 1
        assert _count(conn, f'SELECT count(*) FROM "{s}".finished_jobs') == 98
        assert _count(conn, f'SELECT count(*) FROM "{s}".dead_letter') == 1


def test_an_ack_of_many_give_backs_looks_each_up_once_and_keeps_cancels(queue: Queue) -> None:
    """A worker stopping with a full prefetch buffer hands most of its jobs back in one ack. Those
    go back to the queue by key too, and the ones asked to cancel meanwhile (the first 10, among
    them a failed attempt and a dead one) end cancelled rather than run again."""
    s = queue.schema
    kinds = ["retry", "dead"] + ["release"] * 8 + ["completed"] * 10 + ["release", "requeue"] * 40
    with _ack_on_a_table_analysed_empty(queue, kinds, cancel_requested=10) as conn:
        states = dict(conn.execute(f'SELECT state::text, count(*) FROM "{s}".finished_jobs GROUP BY 1'))
        assert states == {"cancelled": 10, "completed": 10}
        assert _count(conn, f"SELECT count(*) FROM \"{s}\".jobs WHERE state = 'queued'") == 80
        assert _count(conn, f'SELECT count(*) FROM "{s}".jobs') == 380
        assert _count(conn, f'SELECT count(*) FROM "{s}".dead_letter') == 0
        # A requeue hands back an attempt that does not count; a release, one that never began.
        attempts = dict(
            conn.execute(f"SELECT attempts, count(*) FROM \"{s}\".jobs WHERE state = 'queued' GROUP BY 1")
        )
        assert attempts == {0: 40, 1: 40}
