"""Bulk enqueue writes COPY text by hand and validates repeated options once: prove both exact."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pgqueue import InvalidJobError, JobSpec, Queue

AWKWARD_ARGS = [
    {"path": "C:\\temp\\new", "quote": 'say "hi"', "tab": "a\tb", "lines": "1\n2\r\n3"},
    {"unicode": "Grüße · 日本 · 🙂", "backslash_u": "\\u0000 is text here", "empty": ""},
    {"nested": {"list": [1, 2.5, None, True], "deep": {"x": "\\\\"}}},
]


def test_awkward_args_round_trip_exactly(queue: Queue) -> None:
    ids = queue.enqueue_many([{"task": "t", "args": a} for a in AWKWARD_ARGS])
    assert [queue.get_job(i).args for i in ids] == AWKWARD_ARGS


def test_every_option_of_every_job_is_stored(queue: Queue) -> None:
    at = datetime(2030, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    fired = datetime(2029, 12, 31, tzinfo=UTC)
    ids = queue.enqueue_many(
        [
            JobSpec("a", {"n": 1}, queue="q1", priority=2, run_at=at, max_attempts=7, timeout=1.5),
            JobSpec("a", {"n": 2}, queue="q1", priority=2, run_at=at, max_attempts=7, timeout=1.5),
            JobSpec("b", None, queue="q2", delay=timedelta(hours=1), scheduled_for=fired),
        ]
    )
    first, second, third = (queue.get_job(i) for i in ids)
    for job, n in ((first, 1), (second, 2)):
        assert (job.task, job.queue, job.priority, job.run_at, job.max_attempts, job.timeout) == (
            "a",
            "q1",
            2,
            at,
            7,
            1.5,
        )
        assert job.args == {"n": n}
    assert third.args == {} and third.timeout is None and third.scheduled_for == fired
    assert third.run_at is not None and third.created_at is not None
    assert third.run_at - third.created_at == timedelta(hours=1)


@pytest.mark.parametrize("bad", [True, 1.0, "1"])
def test_a_repeated_option_set_never_lets_a_lookalike_value_through(queue: Queue, bad: object) -> None:
    jobs = [{"task": "t", "priority": 1, "args": {"i": i}} for i in range(3)]
    jobs.append({"task": "t", "priority": bad, "args": {"i": 3}})
    with pytest.raises(InvalidJobError, match="job #3: priority"):
        queue.enqueue_many(jobs)
    assert queue.enqueue_many([]) == []


def test_bad_args_later_in_a_repeated_option_set_are_refused(queue: Queue) -> None:
    jobs: list[dict[str, object]] = [{"task": "t", "args": {"i": i}} for i in range(5)]
    jobs.append({"task": "t", "args": {"when": datetime.now(UTC)}})
    with pytest.raises(InvalidJobError, match="job #5: job args are not JSON-serialisable"):
        queue.enqueue_many(jobs)


def test_registered_signature_is_checked_for_every_job(queue: Queue) -> None:
    @queue.task()
    def greet(name: str) -> None: ...

    jobs: list[dict[str, object]] = [{"task": "greet", "args": {"name": str(i)}} for i in range(5)]
    jobs.append({"task": "greet", "args": {"nme": "typo"}})
    with pytest.raises(InvalidJobError, match="job #5: arguments do not fit task 'greet'"):
        queue.enqueue_many(jobs)
