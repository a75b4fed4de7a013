"""Shared bits of the API routes: documented error responses and action-error mapping."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import HTTPException

from pgqueue.admin.schemas import ErrorOut
from pgqueue.errors import ConflictError, NotFoundError

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "No valid credentials."},
    404: {"model": ErrorOut, "description": "No such queue, job or schedule."},
    503: {"model": ErrorOut, "description": "The database is unreachable or not migrated."},
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    400: {"model": ErrorOut, "description": "A value the queue refuses."},
    403: {"model": ErrorOut, "description": "Cross-site request, or no CSRF token."},
    409: {"model": ErrorOut, "description": "The job's state does not allow this."},
}


@contextmanager
def action_errors() -> Iterator[None]:
    """NotFoundError → 404, ConflictError → 409, each with the action's own sentence."""
    try:
        yield
    except NotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
    except ConflictError as exc:
        raise HTTPException(409, str(exc)) from exc
