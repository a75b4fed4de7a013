"""The claimer: claims batches of runnable jobs when there is room, sleeps until there is work.

Woken by a notification, a freed slot, the clock (the next delayed job or local retry falling
due) or its poll timer. Plain queues share one claim statement, which deals the room out round
robin across the queues with ready jobs (weighted by ``queue_weights``), and also fill the
prefetch buffer; capped and rate-limited queues claim only what can start at once, each under its
queue's settings row lock, so a global cap holds across workers.

Wake-ups go to one worker at a time. A claim that found less than it had room for puts the
worker on the waiting list (``start_waiting``): an enqueue that commits by itself wakes one
waiting worker (``wake_one``), not every worker listening, and sends nothing when none waits,
since busy workers claim again as soon as they have room. A waiting worker therefore does not
claim when a slot frees (nothing new is known), and a saturated worker with no room left passes
the wake-up on (``pass_wake``). One race remains: an enqueue that looked for a waiting worker
just before this one signed up, and committed just after its claim looked. It is closed by one
more claim ``WAKE_GRACE`` after signing up, long enough for a statement that commits by itself.
Only a worker whose listener has heard its own self-test signs up; a deaf one (a pooler in
transaction mode) or one whose listener is reconnecting stays off the list and polls. The sign-up
asks in the same round trip when the next delayed job falls due, the claimer's next question.

An enqueue that picks a waiting worker may also hand it the job (``!take``, see
:mod:`pgqueue.worker.handoff`): :meth:`Claimer.handed` takes it as a claim's row, or gives it
back uncharged when it cannot start here now (no room, its queue at the local cap, leases not
renewed on time, shutting down, or a stale or missed hand-off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pgqueue._base import QueueSettings
from pgqueue._enqueue import wake_params
from pgqueue._rows import dataclass_row
from pgqueue._sql import Queries
from pgqueue.worker.db import ServiceConnection, execute_together, reconnect_delay
from pgqueue.worker.execution import ClaimedJob, Outcome
from pgqueue.worker.executor import Executor
from pgqueue.worker.handoff import HandoffClock, give_back, read_handoff
from pgqueue.worker.settings import WorkerSettings

log = logging.getLogger("pgqueue.worker")
Row = tuple[Any, ...]
DEAF_POLL_INTERVAL = 0.25  # how often to look when notifications do not arrive
WAKE_GRACE = 0.025  # after signing up as waiting, look once more this much later
# How much earlier than its send a claim may have read the clock, as the next look for a
# delayed job sees it: both statements start a round trip after they are sent, which may differ.
CLAIM_CLOCK_MARGIN = 0.001


@dataclass(slots=True)
class QueueLimits:
    """A queue's cross-process settings as last read from the ``queues`` table."""

    paused: bool = False
    concurrency: int | None = None
    rate_limit: float | None = None

    @property
    def limited(self) -> bool:
        return self.concurrency is not None or self.rate_limit is not None


class Claimer:
    def __init__(
        self,
        conn: ServiceConnection,
        queries: Queries,
        settings: WorkerSettings,
        executor: Executor,
        worker_id: str,
        *,
        stopping: asyncio.Event,
        leases_renewable: Callable[[], bool],
    ) -> None:
        self._conn = conn
        self._queries = queries
        self._settings = settings
        self._executor = executor
        self._worker_id = worker_id
        self._prepare = conn.prepare or None
        self._stopping = stopping
        self._leases_renewable = leases_renewable  # see LeaseKeeper.renewable
        self._renewed_once = False
        self._paused_since: float | None = None  # claiming paused after renewals fell behind
        self.wake = asyncio.Event()
        self.limits: dict[str, QueueLimits] = {}
        self._limits_read_at = float("-inf")
        self._retry_due: float | None = None
        self._poll_interval = settings.poll_interval
        self._first_claim_sent: float | None = None  # this round's, by the monotonic clock
        self.alive_at = time.monotonic()
        # Producers may wake this worker alone only once its listener is known to hear: a
        # worker on the waiting list that cannot hear would leave the jobs meant for it to polls.
        self._can_wait = False
        self.waiting = False  # on the waiting list, as far as this worker knows
        self._blocked = False  # the last claim skipped a queue at its local cap
        self._grace_due: float | None = None
        self._wakes = 0  # wake-ups received: one arriving mid sign-up voids the sign-up
        self._signing_up = False
        self._freed_while_signing = False  # a slot freed while the sign-up was in flight
        self._handoffs = HandoffClock(settings.lease_seconds)
        # Stride scheduling across claims (which are often one or two rows: a slot frees, a
        # claim fills it): each queue's virtual time advances by 1/weight per job it got, and
        # the queues furthest behind go first. A queue that sat idle is brought to within one
        # round of the others, so its return takes one round of precedence, not a whole hour's.
        self._vtime: dict[str, float] = dict.fromkeys(settings.queues, 0.0)
        self._weights = {q: float(settings.queue_weights.get(q, 1)) for q in settings.queues}

    def _served(self, jobs: list[ClaimedJob]) -> None:
        if len(self._vtime) < 2 or not jobs:
            return
        for job in jobs:
            if job.queue in self._vtime:
                self._vtime[job.queue] += 1 / self._weights[job.queue]
        top = max(self._vtime.values())
        floor = min(max(v, top - 1) for v in self._vtime.values())
        for q, v in self._vtime.items():
            self._vtime[q] = max(v, top - 1) - floor

    def notifications_lost(self, lost: bool) -> None:
        """The listener found LISTEN deaf (or hearing again): poll often meanwhile."""
        self._poll_interval = (
            min(DEAF_POLL_INTERVAL, self._settings.poll_interval) if lost else self._settings.poll_interval
        )
        self.wake.set()  # the wait in progress was planned on the old interval

    def hearing(self, heard: bool) -> None:
        """Whether this worker's listener is known to receive notifications right now."""
        if heard != self._can_wait:
            self._can_wait = heard
            self.wake.set()  # sign up, or leave the waiting list, without waiting for a poll

    def woken(self) -> None:
        """A producer took this worker off the waiting list to tell it of new jobs."""
        self.waiting = False
        self._wakes += 1
        self.wake.set()

    def handed(self, payload: str) -> None:
        """A producer's enqueue claimed a job for this worker and took it off the waiting list:
        start it (or buffer it) as a claim's row, or give it back uncharged. Either way, claim
        again: there may be more room, and the sign-up is to be renewed."""
        self.woken()
        try:
            job, lease_ends = read_handoff(payload)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # args nested too deep
            log.error("a job handed to this worker could not be read (%s); its lease will lapse", exc)
            return
        refusal, level = self._refusal(job), logging.DEBUG  # a claim would have left it too
        if refusal is None:
            refusal, level = self._handoffs.staleness(lease_ends), logging.WARNING  # it came late
        if refusal is None:
            self._served([job])
            self._executor.take([job])
        else:
            log.log(level, "job %d (%s) handed to this worker goes back: %s", job.id, job.task, refusal)
            self._executor.decline(job)

    def _refusal(self, job: ClaimedJob) -> str | None:
        """Why a handed-over job cannot start here now, as a claimed one could not (None: it can)."""
        ex = self._executor
        if self._stopping.is_set() or ex.closing:
            return "shutting down"
        if not self._leases_renewable():
            return "this worker's leases are not renewed on time"
        if job.queue not in self._vtime:
            return "not one of this worker's queues"
        if ex.room() <= 0:
            return "no room"
        cap = self._settings.queue_concurrency.get(job.queue)
        if cap is not None and (ex.per_queue[job.queue] >= cap or ex.free_slots() <= 0):
            return "its queue is at this worker's cap"
        return None

    def listening_again(self, since: datetime) -> None:
        """The listener (re)connected, listening since ``since``: give back what was handed to
        this worker before (its notification went to a connection that was gone), then claim."""
        self._handoffs.listening_again(since)
        self.wake.set()

    async def _give_back_missed(self, since: datetime) -> None:
        held = [job_id for job_id, _ in self._executor.held()]
        async with self._conn.use() as c:
            queues = await give_back(
                c, self._queries, self._worker_id, self._settings.lease_seconds, since, held
            )
        if queues:
            log.warning(
                "%d jobs handed to this worker while its listener was away went back to %s",
                len(queues),
                ",".join(sorted(set(queues))),
            )
        if self._handoffs.missed_since == since:  # not a later reconnect's, set meanwhile
            self._handoffs.missed_since = None

    def capacity_freed(self) -> None:
        """A slot freed: look again unless this worker waits for a wake-up (nothing is known to
        be ready that its last claim did not already find). While the sign-up is in flight the
        answer decides: a look then would also use up the look once more that WAKE_GRACE times
        for the race it closes.

        Under steady load the jobs a claim started end before the sign-up is sent, so each
        batch is claimed twice, the second look finding nothing. Skipping that look was measured
        (docs/benchmarks.md, "The look that finds nothing") and not taken: it halves the claim
        statements but slows the next batch's claim, which must then step over the index
        entries of the rows the last one took."""
        if self._blocked:
            self.wake.set()
        elif self._signing_up:
            self._freed_while_signing = True
        elif not self.waiting:
            self.wake.set()

    def settings_changed(self) -> None:
        """A queue's settings changed: read them again before the next claim."""
        self._limits_read_at = float("-inf")
        self.wake.set()

    def retry_due_in(self, seconds: float) -> None:
        """A job of ours goes back in line in ``seconds``: look again then, not at the next poll."""
        due = time.monotonic() + seconds
        self._retry_due = due if self._retry_due is None else min(self._retry_due, due)

    def limited(self, queue: str) -> bool:
        return self.limits.get(queue, QueueLimits()).limited

    def after_written(self, outcomes: list[Outcome]) -> list[str]:
        """Outcomes are on record: look again when a retry falls due, or now when a queue at this
        worker's cap has a slot again (its claims count until their outcome is written, so the
        look when the handler ended found it still full); the queues whose workers should look
        again now (capacity freed under a global cap, or a job back in line)."""
        for o in outcomes:
            if o.kind == "retry":
                self.retry_due_in(o.delay)
        queues = {o.job.queue for o in outcomes}  # each looked at once, not once per outcome
        if self._blocked and not queues.isdisjoint(self._settings.queue_concurrency):
            self.wake.set()
        back_in_line = {o.job.queue for o in outcomes if o.kind in ("retry", "requeue", "release")}
        return sorted(back_in_line | {q for q in queues if self.limited(q)})

    async def run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self.alive_at = time.monotonic()
            self.wake.clear()
            saturated, rate_limited, claimed = False, False, False
            next_due: Row | None = None  # next_run_at's answer, when the sign-up brought it
            self._first_claim_sent = None
            if self._handoffs.missed_since is not None:
                try:
                    await self._give_back_missed(self._handoffs.missed_since)
                except Exception as exc:  # the claim below meets the same failure, and backs off
                    log.warning("giving back hand-offs the listener missed failed (%s); retrying", exc)
            if self._executor.room() > 0 and self._may_claim():
                try:
                    saturated, rate_limited = await self.claim()
                    claimed = True
                    next_due = await self._sign_up(saturated)
                    if failures:
                        log.info("claiming again after %d failed attempts", failures)
                    failures = 0
                except Exception as exc:
                    failures += 1
                    log.warning("claim failed (%s); retrying", exc)
                    await self._sleep(reconnect_delay(failures))
                    continue
            if saturated and self._executor.room() > 0:
                continue
            timeout = self._poll_interval
            if rate_limited:
                timeout = min(timeout, max(0.01, self._settings.rate_burst_seconds / 2))
            if self._grace_due is not None:
                timeout = min(timeout, self._grace_due - time.monotonic())
                self._grace_due = None
            if not saturated:
                timeout = min(timeout, await self._seconds_to_next_job(next_due))
            if not claimed and self.waiting:
                await self._leave_waiting_list()  # no room: wake-ups should go to others
            await self._wait_for_work(timeout)
        await self._leave_waiting_list()  # shutting down: this worker claims no more

    def _may_claim(self) -> bool:
        """False while this worker's leases are not renewed: what it claimed now would be
        rescued and run a second time. The lease keeper wakes the claimer when renewals resume.

        At start-up the first renewal is simply awaited (the lease keeper says if it is slow);
        a pause after that is said, and so is its end.
        """
        if self._leases_renewable():
            if self._paused_since is not None:
                paused = time.monotonic() - self._paused_since
                log.info("leases renewed again after %.1f s: claiming resumes", paused)
                self._paused_since = None
            self._renewed_once = True
            return True
        if self._renewed_once and self._paused_since is None:
            self._paused_since = time.monotonic()
            log.warning(
                "claiming paused: the heartbeat has not renewed this worker's leases on time, and a "
                "job claimed now could be rescued and run twice"
            )
        return False

    async def _sign_up(self, saturated: bool) -> Row | None:
        """After a claim: on the waiting list if it found less than there was room for, off it
        (and the wake-up passed on when no room is left) if it got all it asked for.

        A sign-up also asks ``next_run_at``, which the claimer asks next after such a claim, in
        the same round trip (a pipeline): its answer is returned (None: not asked). Under load a
        worker signs up after nearly every batch, and the next batch's wake-up would otherwise
        find it still waiting for that second answer."""
        next_due = None
        if saturated:
            await self._leave_waiting_list()
            if self._executor.room() <= 0 and self._can_wait:
                wake = wake_params(self._queries, list(self._settings.queues), waker=self._worker_id)
                await self._execute(self._queries.pass_wake, wake)
        elif not self._can_wait:
            await self._leave_waiting_list()
        elif not self.waiting:
            wakes = self._wakes
            self._signing_up, self._freed_while_signing = True, False
            try:
                async with self._conn.use() as c:
                    sent = time.monotonic()
                    cur, ahead = await execute_together(
                        c,
                        [
                            (
                                self._queries.start_waiting,
                                {"worker_id": self._worker_id, "lease": self._settings.lease_seconds},
                            ),
                            (self._queries.next_run_at, self._next_run_at_params()),
                        ],
                    )
                    row = await cur.fetchone()
                    next_due = await ahead.fetchone()
                    if row is not None:
                        self._handoffs.read(row[0], sent, time.monotonic())
                    signed = row is not None
            finally:
                self._signing_up = False
            # A producer that woke us while the sign-up was in flight took us off the list
            # again: believing we wait then would leave us off it, claiming only at polls.
            self.waiting = signed and self._wakes == wakes
            if self.waiting:
                self._grace_due = time.monotonic() + WAKE_GRACE
            elif self._freed_while_signing:
                self.wake.set()
        return next_due

    async def _leave_waiting_list(self) -> None:
        """Off the waiting list. A failure (the database is down) is said, not raised: the
        sign-up lapses with its lease, and until then a producer may wake this worker in vain
        (the job waits for a poll instead)."""
        if not self.waiting:
            return
        self.waiting = False
        try:
            await self._execute(self._queries.stop_waiting, {"worker_id": self._worker_id})
        except Exception as exc:
            log.warning("leaving the waiting list failed (%s); the sign-up lapses on its own", exc)

    async def _execute(self, query: str, params: dict[str, Any]) -> None:
        async with self._conn.use() as c:
            await c.execute(query, params, prepare=self._prepare)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def _wait_for_work(self, timeout: float) -> None:
        if timeout <= 0:
            return
        waiters = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def _since_claim_looked(self) -> float:
        """Seconds since this round's first claim was sent, with CLAIM_CLOCK_MARGIN (0: none was)."""
        sent = self._first_claim_sent
        return 0.0 if sent is None else time.monotonic() - sent + CLAIM_CLOCK_MARGIN

    def _next_run_at_params(self) -> dict[str, Any]:
        """``next_run_at``'s parameters, for this round's claim."""
        return {"queues": list(self._settings.queues), "looked_ago": self._since_claim_looked()}

    async def _ask_next_run_at(self) -> Row | None:
        async with self._conn.use() as c:
            cur = await c.execute(self._queries.next_run_at, self._next_run_at_params())
            return await cur.fetchone()

    async def _seconds_to_next_job(self, answer: Row | None) -> float:
        """Time until the next delayed job (or local retry) falls due, by the database's clock.

        ``answer`` is ``next_run_at``'s row when the sign-up already asked it (None: ask now).
        A job that fell due after this round's claim began counts too (0: at
        once): it is no longer delayed, yet that claim could not see it, and without it here the
        worker would sleep to its next poll. Retries of jobs that failed together fall due a
        millisecond apart, so one often lands there. Jobs due before the claim began, and left
        (locked by another worker, a queue at its cap), do not count: they would make it spin.
        """
        due = self._poll_interval
        if self._retry_due is not None:
            due = min(due, self._retry_due - time.monotonic())
            if due <= 0:
                self._retry_due = None
        try:
            row = answer if answer is not None else await self._ask_next_run_at()
        except Exception as exc:
            log.warning("next run time lookup failed: %s", exc)
            return due
        if row is not None and row[0] is not None:
            due = min(due, float(row[0]) + 0.001)
        return max(due, 0.0)

    async def _refresh_limits(self) -> None:
        if time.monotonic() - self._limits_read_at < self._settings.poll_interval:
            return
        async with self._conn.use() as c, c.cursor(row_factory=dataclass_row(QueueSettings)) as cur:
            await cur.execute(self._queries.queue_settings, {"queues": list(self._settings.queues)})
            rows = await cur.fetchall()
        self.limits = {r.name: QueueLimits(r.paused, r.concurrency, r.rate_limit) for r in rows}
        self._limits_read_at = time.monotonic()

    async def claim(self) -> tuple[bool, bool]:
        """Claim up to the room there is; returns (got all it asked for, a rate limit is in play).

        Capped and rate-limited queues claim only what can start at once: a job waiting in a
        buffer would hold a share of a global limit without running.
        """
        await self._refresh_limits()
        s = self._settings
        ex = self._executor
        free = ex.room()
        plain: list[str] = []
        saturated, rate_limited = False, False
        self._blocked = False
        for name in s.queues:
            limits = self.limits.get(name, QueueLimits())
            local_cap = s.queue_concurrency.get(name)
            if not limits.limited and local_cap is None:
                plain.append(name)
                continue
            room = min(free, ex.free_slots())
            if local_cap is not None:
                room = min(room, local_cap - ex.per_queue[name])
            if room <= 0:
                self._blocked = True  # a slot of this queue freeing is a reason to look again
                continue
            rate_limited |= limits.rate_limit is not None
            if limits.limited:
                got = await self._claim_limited(name, room)
            else:
                got = await self._claim_plain([name], room, start=room)
            free -= got
            saturated |= got == room
            if free <= 0:
                return True, rate_limited
        if plain and free > 0:
            got = await self._claim_plain(plain, free, start=max(0, ex.free_slots()))
            saturated |= got == free
        return saturated, rate_limited

    async def _claim_plain(self, queues: list[str], limit: int, *, start: int) -> int:
        token = uuid.uuid4()
        params = {
            "queues": queues,
            "weights": [self._weights[q] for q in queues],
            "vtimes": [self._vtime[q] for q in queues],
            "limit": limit,
            "start": start,
            "worker_id": self._worker_id,
            "lease": self._settings.lease_seconds,
            "token": token,
        }
        return await self._take(self._queries.claim, params, token, reserve=start)

    async def _claim_limited(self, queue: str, limit: int) -> int:
        token = uuid.uuid4()
        params = {
            "queue": queue,
            "limit": limit,
            "worker_id": self._worker_id,
            "lease": self._settings.lease_seconds,
            "burst": self._settings.rate_burst_seconds,
            "token": token,
        }
        return await self._take(self._queries.claim_limited, params, token, reserve=limit, lock=True)

    async def _take(
        self, query: str, params: dict[str, Any], token: uuid.UUID, *, reserve: int, lock: bool = False
    ) -> int:
        """Run a claim statement with ``reserve`` slots held for the rows it starts at once.

        Rows become :class:`ClaimedJob` by column name, each with the claim's token. The claim
        is planned afresh at each run (see :class:`ServiceConnection`): its plan depends on the
        size of ``jobs``.
        """
        ex = self._executor
        ex.reserved += reserve
        rows = dataclass_row(ClaimedJob, token=token)
        if self._first_claim_sent is None:
            self._first_claim_sent = time.monotonic()
        try:
            async with self._conn.use() as c, c.cursor(row_factory=rows) as cur:
                if lock:
                    async with c.transaction():
                        await c.execute(self._queries.lock_queue, params)
                        jobs = await (await cur.execute(query, params, prepare=self._prepare)).fetchall()
                else:
                    jobs = await (await cur.execute(query, params, prepare=self._prepare)).fetchall()
        finally:
            ex.reserved -= reserve
        self._served(jobs)
        ex.take(jobs)
        if jobs:
            # The jobs just begun take their first step (their handlers start) before this task
            # builds and sends its next statement (the waiting-list sign-up): ~0.2 ms sooner on
            # an idle worker, where that statement went first.
            await asyncio.sleep(0)
        return len(jobs)
