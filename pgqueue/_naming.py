"""Rules for the names users choose: queues, tasks, schemas. Checked once, at the edge."""

import re
from functools import lru_cache

from pgqueue.errors import ConfigurationError, InvalidJobError

DEFAULT_SCHEMA = "pgqueue"

_QUEUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}")
_TASK = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,199}")
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,47}")


@lru_cache(maxsize=1024)  # bulk enqueues check the same few names thousands of times
def _valid_queue(name: str) -> bool:
    return _QUEUE.fullmatch(name) is not None


@lru_cache(maxsize=1024)
def _valid_task(name: str) -> bool:
    return _TASK.fullmatch(name) is not None


def check_queue_name(name: object) -> str:
    """Queue names go into logs, URLs and NOTIFY payloads: keep them to a safe alphabet."""
    if not isinstance(name, str) or not _valid_queue(name):
        raise InvalidJobError(
            f"invalid queue name {name!r}: use 1-63 letters, digits, '_', '.', ':' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_task_name(name: object) -> str:
    if not isinstance(name, str) or not _valid_task(name):
        raise InvalidJobError(
            f"invalid task name {name!r}: use letters, digits, '_', '.', ':' or '-', "
            "starting with a letter or '_'"
        )
    return name


def check_schema_name(name: object) -> str:
    """The schema name is spliced into SQL as an identifier, so only a plain lowercase one passes."""
    if not isinstance(name, str) or not _SCHEMA.fullmatch(name):
        raise ConfigurationError(
            f"invalid schema name {name!r}: use lowercase letters, digits and '_' (max 48)"
        )
    return name
