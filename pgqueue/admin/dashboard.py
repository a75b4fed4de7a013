"""The dashboard: server-rendered pages over the read model the API uses, plus login/logout.

Pages are plain HTML; one small script (``static/admin.js``) adds confirmations, calls the JSON
API for actions with the page's CSRF token, and refreshes the page's content on a timer. No build
step, no third-party JS. Pages are left out of the OpenAPI document: they are not an API.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, get_args
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from pgqueue._naming import check_queue_name, check_task_name
from pgqueue.admin.auth import SESSION_COOKIE, Identity
from pgqueue.admin.context import AdminContext
from pgqueue.admin.readmodel import JobFilter
from pgqueue.admin.render import STATIC, environment
from pgqueue.admin.schemas import MAX_JOB_ID, StateFilter

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
STATIC_FILES = {"admin.js": "text/javascript", "admin.css": "text/css"}
STATES: tuple[str, ...] = get_args(StateFilter)
MAX_LOGIN_BODY = 8192


def _base(request: Request) -> str:
    """The dashboard's URL path prefix, wherever the app mounted the router."""
    return request.url_for("pgqueue_admin_overview").path.rstrip("/")


def _parse_filters(query: dict[str, str]) -> tuple[JobFilter, int | None, str | None]:
    """The job filters from the query string, leniently: a bad value is dropped and explained
    instead of failing the page."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, check in (("queue", check_queue_name), ("task", check_task_name)):
        raw = query.get(key, "").strip()
        if raw:
            try:
                values[key] = check(raw)
            except ValueError as exc:
                problems.append(str(exc))
    state = query.get("state", "")
    if state in STATES:
        values["state"] = state
    elif state:
        problems.append(f"unknown state {state!r}")
    for key in ("created_after", "created_before"):
        raw = query.get(key, "").strip()
        if raw:
            try:
                moment = datetime.fromisoformat(raw)
                values[key] = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
            except ValueError:
                problems.append(f"{key}: {raw!r} is not a date and time")
    before: int | None = None
    raw_before = query.get("before_id", "")
    if raw_before.isdigit() and 1 <= int(raw_before) <= MAX_JOB_ID:
        before = int(raw_before)
    return JobFilter(**values), before, "; ".join(problems) or None


async def _read_capped(request: Request, limit: int) -> bytes:
    """The body, refusing (413) as soon as it passes ``limit``: a chunked upload declares no
    length, so the declared one alone proves nothing."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, "login form too large", headers={"Connection": "close"})
    return bytes(body)


class Pages:
    """Renders the pages; one instance per admin router."""

    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        self.env = environment()

    def render(self, request: Request, template: str, identity: Identity, **data: Any) -> Response:
        base = _base(request)
        html = self.env.get_template(template).render(
            base=base,
            csrf=self.ctx.guard.csrf_token(identity.session),
            identity=identity.method,
            refresh_seconds=self.ctx.options.refresh_seconds,
            firing=self.ctx.monitor.firing if self.ctx.monitor is not None else [],
            **data,
        )
        return HTMLResponse(html, headers=SECURITY_HEADERS)

    def identity_or_login(self, request: Request) -> Identity | Response:
        identity = self.ctx.guard.identify(request)
        if identity is None:
            return RedirectResponse(f"{_base(request)}/login", status_code=303)
        return identity


def build(ctx: AdminContext) -> APIRouter:
    router = APIRouter(include_in_schema=False, route_class=ctx.route_class)
    pages = Pages(ctx)

    @router.get("/", name="pgqueue_admin_overview")
    def overview(request: Request) -> Response:
        identity = pages.identity_or_login(request)
        if isinstance(identity, Response):
            return identity
        with ctx.connection() as conn:
            queues = ctx.reads.queue_stats(conn, ctx.options)
            workers = ctx.reads.workers(conn, ctx.options.worker_stale_seconds)
            schedules = ctx.reads.schedules(conn, ctx.redact)
        return pages.render(
            request,
            "overview.html",
            identity,
            title="Queues",
            queues=queues,
            workers=workers.workers,
            schedules=schedules.schedules,
        )

    @router.get("/jobs")
    def jobs(request: Request) -> Response:
        identity = pages.identity_or_login(request)
        if isinstance(identity, Response):
            return identity
        query = dict(request.query_params)
        where, before, problem = _parse_filters(query)
        size = ctx.options.page_size
        with ctx.connection() as conn:
            page = ctx.reads.list_jobs(conn, where, before_id=before, limit=size, redact=ctx.redact)
            names = ctx.reads.queue_names(conn)
        kept = {k: v for k, v in query.items() if k != "before_id" and v}
        older = urlencode({**kept, "before_id": page.next_cursor}) if page.next_cursor else None
        return pages.render(
            request,
            "jobs.html",
            identity,
            title="Jobs",
            page=page,
            where=where,
            problem=problem,
            queue_names=names,
            states=STATES,
            newest=urlencode(kept),
            older=older,
            paged=before is not None,
        )

    @router.get("/jobs/{job_id}")
    def job(request: Request, job_id: int) -> Response:
        identity = pages.identity_or_login(request)
        if isinstance(identity, Response):
            return identity
        if not 1 <= job_id <= MAX_JOB_ID:
            raise HTTPException(404, f"no job with id {job_id}")
        with ctx.connection() as conn:
            detail = ctx.reads.get_job(conn, job_id, ctx.redact)
        if detail is None:
            return pages.render(request, "missing.html", identity, title="Not found", job_id=job_id)
        return pages.render(request, "job.html", identity, title=f"Job {job_id}", job=detail)

    @router.get("/login")
    def login_form(request: Request) -> Response:
        return pages.render(
            request,
            "login.html",
            Identity("anonymous"),
            title="Sign in",
            error=None,
            basic=ctx.guard.auth.username is not None,
        )

    @router.post("/login")
    async def login(request: Request) -> Response:
        """Credentials in, an HttpOnly SameSite=Strict session cookie out."""
        if not ctx.guard.same_origin(request):
            raise HTTPException(403, "cross-site login refused")
        if int(request.headers.get("content-length") or 0) > MAX_LOGIN_BODY:
            raise HTTPException(413, "login form too large")
        body = await _read_capped(request, MAX_LOGIN_BODY)
        try:
            fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
        except ValueError as exc:
            raise HTTPException(400, "malformed login form") from exc
        form = {k: v[0] for k, v in fields.items()}
        if not ctx.guard.auth.has_credentials:
            return RedirectResponse(f"{_base(request)}/", status_code=303)
        if not ctx.guard.login(form.get("token"), form.get("username"), form.get("password")):
            response = pages.render(
                request,
                "login.html",
                Identity("anonymous"),
                title="Sign in",
                error="Wrong token or credentials.",
                basic=ctx.guard.auth.username is not None,
            )
            response.status_code = 401
            return response
        base = _base(request)
        response = RedirectResponse(f"{base}/", status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            ctx.guard.new_session(),
            path=f"{base}/",
            max_age=ctx.guard.auth.session_max_age_seconds,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @router.post("/logout", dependencies=[ctx.write])
    def logout(request: Request) -> Response:
        """Revoke the session server-side (a copy of the cookie dies with it), then drop it."""
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            ctx.guard.revoke(session)
        response = Response(status_code=204)
        response.delete_cookie(SESSION_COOKIE, path=f"{_base(request)}/", httponly=True, samesite="strict")
        return response

    @router.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise HTTPException(404, "no such file")
        return Response(
            (STATIC / name).read_bytes(),
            media_type=STATIC_FILES[name],
            headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    return router
