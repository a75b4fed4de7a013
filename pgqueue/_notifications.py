"""The payloads sent on a schema's NOTIFY channel (``pgqueue_<schema>``).

A bare queue name wakes every worker of that queue; ``!wake <worker id>`` one worker, and
``!take <worker id> <job as JSON>`` gives one worker a job claimed for it by its enqueue. Control
messages start with ``!``, which no queue name can contain, so the two can never be confused.
"""

CANCEL_PREFIX = "!cancel "  # + job id: its worker stops it now (written by the cancel queries)
SETTINGS_PREFIX = "!settings "  # + queue name: re-read the queue's shared settings
WAKE_PREFIX = "!wake "  # + worker id: new jobs for that worker alone (written by wake_one)
TAKE_PREFIX = "!take "  # + worker id, a space, the job: the job is that worker's (enqueue)
PING_PREFIX = "!ping "  # + worker id: a listener's self-test that notifications reach it


def settings_changed(queue: str) -> str:
    return SETTINGS_PREFIX + queue
