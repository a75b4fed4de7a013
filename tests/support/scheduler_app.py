"""The app the scheduler tests run in subprocesses: ``pgqueue scheduler tests.support.scheduler_app:queue``.

The DSN comes from ``PGQUEUE_DSN`` and the schema from ``PGQUEUE_SCHEMA`` (read when the module is
imported). It declares one periodic task, ``tick``, every second on the ``ticks`` queue; the
handler returns ``ctx.scheduled_for`` (ISO text) so the job's stored result shows what the handler
saw. With ``SCHEDULER_APP_BAD_CRON`` set, it also declares a schedule named ``broken`` with that
cron string, to see how a bad declaration fails at start-up.
"""

from __future__ import annotations

import os
from datetime import timedelta

from pgqueue import JobContext, Queue

TICK = "tick"
TICK_QUEUE = "ticks"
TICK_EVERY = timedelta(seconds=1)
BAD_CRON_VARIABLE = "SCHEDULER_APP_BAD_CRON"


def build_queue(dsn: str | None, schema: str) -> Queue:
    q = Queue(dsn, schema=schema)

    @q.periodic(every=TICK_EVERY, name=TICK, queue=TICK_QUEUE)
    async def tick(ctx: JobContext) -> str | None:
        return ctx.scheduled_for.isoformat() if ctx.scheduled_for is not None else None

    bad_cron = os.environ.get(BAD_CRON_VARIABLE)
    if bad_cron:
        q.schedule(TICK, cron=bad_cron, name="broken")
    return q


queue = build_queue(os.environ.get("PGQUEUE_DSN"), os.environ.get("PGQUEUE_SCHEMA", "pgqueue"))
