"""Refuse hostile requests from their headers alone, before a byte of their body is read.

FastAPI reads and parses a request's body before it runs the route's dependencies, so with
authentication done in a dependency an anonymous client could make the admin buffer and parse
any amount of data just to be told 401. :class:`Shield` is pure ASGI and runs first:

1. the ``Host`` must be allowed (DNS rebinding), see :meth:`Guard.host_allowed` — 400;
2. a state-changing request must not come from another site (``Origin``/``Sec-Fetch-Site``) — 403;
3. the route's credentials (and CSRF token for cookie writes), from headers and cookies — 401/403;
4. a declared ``Content-Length`` over the limit — 413, unread;
5. a body sent without a length (chunked) is counted as it streams and cut off at the limit — 413.

Refusals of a request that still has a body to send ask the server to close the connection
(``Connection: close``), so the rest is never read either.

It wraps each admin route (:func:`route_class`) — so the router is protected in whatever app
includes it — and, in the standalone app, the whole app for the host and origin checks alone
(``max_body=None``), which covers the OpenAPI document and never answers 413 before a route
had the chance to answer 401.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgqueue.admin.auth import SAFE_METHODS, Guard

Access = Literal["public", "read", "write"]
"""What a route needs: nothing (its handler decides), read credentials, or write credentials."""


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a streamed body passes the limit; FastAPI's handler turns it
    into the 413 (an HTTPException passes its body parsing untouched)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"request body over the admin's {limit}-byte limit", headers={"Connection": "close"}
        )


def _body_expected(scope: Scope) -> bool:
    """Whether the client has (or may have) a body still to send."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class Shield:
    """Pure ASGI middleware: host, origin, credentials, then body size — see the module."""

    def __init__(
        self, app: ASGIApp, *, guard: Guard, max_body: int | None, access: Access = "public"
    ) -> None:
        self.app = app
        self.guard = guard
        self.max_body = max_body
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
        elif self.max_body is None:
            await self.app(scope, receive, send)
        else:
            await self._limited(scope, receive, send, self.max_body)

    def refusal(self, scope: Scope) -> JSONResponse | None:
        """The response that refuses this request from its headers, or None to let it in."""
        request = Request(scope)  # headers and cookies only: no receive, so no body
        headers = request.headers
        try:
            if not self.guard.host_allowed(headers.get("host")):
                raise HTTPException(400, self.guard.host_refusal())
            if request.method not in SAFE_METHODS and not self.guard.same_origin(request):
                raise HTTPException(403, "cross-site request refused (Origin/Sec-Fetch-Site)")
            if self.access == "write":
                self.guard.check_write(request)
            elif self.access == "read":
                self.guard.check_read(request)
            length = headers.get("content-length")
            if length is not None and self.max_body is not None:
                if not length.strip().isdigit():
                    raise HTTPException(400, "malformed Content-Length")
                if int(length) > self.max_body:
                    raise BodyTooLarge(self.max_body)
        except HTTPException as exc:
            extra = dict(exc.headers or {})
            if _body_expected(scope):
                extra["Connection"] = "close"
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=extra)
        return None

    async def _limited(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the app with a ``receive`` that counts body bytes and stops past ``limit``."""
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge as exc:
            # Read outside a FastAPI handler (no exception handler saw it): answer here.
            if started:
                raise
            response = JSONResponse({"detail": exc.detail}, status_code=413, headers=exc.headers)
            await response(scope, receive, send)


def route_class(guard: Guard, *, read: Any, write: Any, max_body: int) -> type[APIRoute]:
    """An ``APIRoute`` class whose requests pass a :class:`Shield` before FastAPI sees them.

    The access a route needs is read from its dependencies (``read``/``write`` are the admin's
    ``Depends`` objects), so a route is shielded exactly as it is guarded, and a route declared
    without either stays public (its handler decides, as the dashboard pages do).
    """

    def access_of(route: APIRoute) -> Access:
        calls = {d.dependency for d in route.dependencies}
        if write.dependency in calls:
            return "write"
        return "read" if read.dependency in calls else "public"

    class AdminRoute(APIRoute):
        def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
            super().__init__(path, endpoint, **kwargs)
            self.shield = Shield(super().handle, guard=guard, max_body=max_body, access=access_of(self))

        async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
            await self.shield(scope, receive, send)

    return AdminRoute
