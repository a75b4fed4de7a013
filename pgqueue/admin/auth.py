"""Who may look and who may change: credentials, the dashboard session, and CSRF defences.

The admin can retry, cancel and delete jobs, so it is closed by default: a bearer token or HTTP
basic credentials must be configured, or ``insecure_no_auth`` chosen explicitly for local use.

Browsers add two risks that API clients do not: a cookie (or remembered basic credentials) is
sent along with requests other sites trigger, and a login form can be posted cross-site. So
every mutating request is refused when the browser says it came from another site
(``Sec-Fetch-Site``) or its ``Origin`` is not this host, and a request authenticated by the
session cookie must also carry the CSRF token the dashboard page embeds.

A third risk is DNS rebinding: a page on ``attacker.example`` re-points its name at 127.0.0.1
and its scripts then talk to a local admin as if same-origin. What gives it away is the
``Host`` header, so requests are only served for allowed host names: loopback names alone
when there are no credentials, a configurable allow-list otherwise.

Logging out revokes the session in this process, so a copied cookie stops working with it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyCookie, HTTPBasic, HTTPBearer

from pgqueue.admin.settings import AdminEnv
from pgqueue.errors import ConfigurationError

SESSION_COOKIE = "pgqueue_admin_session"
CSRF_HEADER = "x-csrf-token"
MIN_TOKEN_LENGTH = 16
MIN_PASSWORD_LENGTH = 8
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Method = Literal["bearer", "basic", "cookie", "anonymous"]


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1): names no other machine can be."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None] | None:
    """``"Admin.Example.com:8443"`` → ``("admin.example.com", 8443)``, ``"[::1]"`` → ``("::1",
    None)``; None for anything that is not a bare host and optional port."""
    if not value or any(c in value for c in "@/?#\\ \t") or (value.count(":") > 1 and "]" not in value):
        return None
    try:
        parts = urlsplit(f"//{value}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.rstrip("."), port


def _host_pattern(entry: str) -> tuple[str, int | None]:
    """One allow-list entry, checked once at start-up: ``name``, ``name:port``, ``*.domain``
    (any subdomain), or ``*`` (any host)."""
    if entry == "*":
        return "*", None
    wildcard = entry.startswith("*.")
    parsed = split_host(entry[2:] if wildcard else entry)
    if parsed is None:
        raise ConfigurationError(f"not a host name for the admin's allowed hosts: {entry!r}")
    name, port = parsed
    return ("*." if wildcard else "") + name, port


@dataclass(frozen=True, slots=True)
class AdminAuth:
    """The admin's credentials. Build it directly or with :meth:`from_env`.

    ``token`` is for API clients (``Authorization: Bearer``) and the dashboard's login form;
    ``username``/``password`` for HTTP basic (and the login form). Either suffices.
    """

    token: str | None = None
    username: str | None = None
    password: str | None = None
    insecure_no_auth: bool = False
    session_max_age_seconds: int = 12 * 3600
    trusted_origins: tuple[str, ...] = ()
    """Origins (``https://admin.example.com``) allowed to post besides this host itself: for a
    reverse proxy that does not pass the browser's Host header through."""
    allowed_hosts: tuple[str, ...] = ()
    """``Host`` values served besides loopback names: ``admin.example.com`` (any port),
    ``admin.example.com:8443``, ``*.example.com``, or ``*``. Empty with credentials: any Host
    (the credentials are the defence). Without credentials only loopback names are served."""

    def __post_init__(self) -> None:
        if (self.username is None) != (self.password is None):
            raise ConfigurationError("admin basic auth needs both a username and a password")
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise ConfigurationError(
                f"the admin token must be at least {MIN_TOKEN_LENGTH} characters "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        if self.password is not None and len(self.password) < MIN_PASSWORD_LENGTH:
            raise ConfigurationError(f"the admin password must be at least {MIN_PASSWORD_LENGTH} characters")
        if self.username is not None and (not self.username or ":" in self.username):
            raise ConfigurationError("the admin username must be non-empty and without ':'")
        if not self.insecure_no_auth and not self.has_credentials:
            raise ConfigurationError(
                "the admin needs credentials: set PGQUEUE_ADMIN_TOKEN (or PGQUEUE_ADMIN_USER and "
                "PGQUEUE_ADMIN_PASSWORD), or pass --insecure-no-auth for local use only"
            )
        if self.session_max_age_seconds <= 0:
            raise ConfigurationError("session_max_age_seconds must be positive")
        patterns = [_host_pattern(entry) for entry in self.allowed_hosts]
        if self.insecure_no_auth:
            # Without credentials the Host check is the only thing between a rebinding page and
            # the admin: a name anyone can point at 127.0.0.1 must not be accepted.
            for entry, (name, _port) in zip(self.allowed_hosts, patterns, strict=True):
                if not is_loopback(name):
                    raise ConfigurationError(
                        f"insecure_no_auth only serves loopback names; {entry!r} in allowed "
                        "hosts needs credentials"
                    )
            for origin in self.trusted_origins:
                parsed = split_host(urlsplit(origin).netloc)
                if parsed is None or not is_loopback(parsed[0]):
                    raise ConfigurationError(f"insecure_no_auth only trusts loopback origins, not {origin!r}")

    @property
    def has_credentials(self) -> bool:
        return self.token is not None or self.username is not None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, insecure_no_auth: bool = False
    ) -> AdminAuth:
        """``PGQUEUE_ADMIN_TOKEN``, ``PGQUEUE_ADMIN_USER`` + ``PGQUEUE_ADMIN_PASSWORD``,
        ``PGQUEUE_ADMIN_TRUSTED_ORIGINS`` and ``PGQUEUE_ADMIN_ALLOWED_HOSTS`` (both
        comma-separated); empty values count as unset."""
        env = AdminEnv.load(environ, only=("token", "user", "password", "trusted_origins", "allowed_hosts"))
        return cls(
            token=env.token,
            username=env.user,
            password=env.password,
            insecure_no_auth=insecure_no_auth,
            trusted_origins=env.trusted_origins,
            allowed_hosts=env.allowed_hosts,
        )


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def _basic_credentials(header: str) -> tuple[str, str] | None:
    try:
        decoded = base64.b64decode(header, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class _BearerDoc(HTTPBearer):
    """Lists the scheme in the OpenAPI document; :class:`Guard` does the checking."""

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        return None


class _BasicDoc(HTTPBasic):
    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        return None


class _CookieDoc(APIKeyCookie):
    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        return None


_bearer_doc = _BearerDoc(description="PGQUEUE_ADMIN_TOKEN")
_basic_doc = _BasicDoc(description="PGQUEUE_ADMIN_USER and PGQUEUE_ADMIN_PASSWORD")
_cookie_doc = _CookieDoc(name=SESSION_COOKIE, description="The dashboard's login session")


async def _documented_schemes(
    _b: Annotated[None, Depends(_bearer_doc)],
    _u: Annotated[None, Depends(_basic_doc)],
    _c: Annotated[None, Depends(_cookie_doc)],
) -> None:
    """Any one of the three schemes is accepted; this only makes OpenAPI say so."""


@dataclass(frozen=True, slots=True)
class Identity:
    method: Method
    session: str | None = None


class Guard:
    """Checks requests against :class:`AdminAuth`; its methods are FastAPI dependencies (and
    what :class:`pgqueue.admin.shield.Shield` calls before a request's body is read)."""

    def __init__(self, auth: AdminAuth) -> None:
        self.auth = auth
        material = "\0".join(
            ["pgqueue-admin-session", auth.token or "", auth.username or "", auth.password or ""]
        )
        # Derived from the credentials: every replica agrees, and rotating them logs all out.
        self._key = hashlib.sha256(material.encode("utf-8")).digest()
        self._hosts = [_host_pattern(entry) for entry in auth.allowed_hosts]
        # Sessions logged out of, by nonce, until they would have expired anyway. Sync routes
        # run in a thread pool, hence the lock.
        self._revoked: dict[str, float] = {}
        self._revoked_lock = threading.Lock()

    # ------------------------------------------------------------------ hosts

    def host_allowed(self, host: str | None) -> bool:
        """Whether to serve a request whose ``Host`` header (or Origin's netloc) is ``host``."""
        parsed = split_host(host) if host else None
        if parsed is not None and is_loopback(parsed[0]):
            return True
        if self.auth.insecure_no_auth:
            return False
        if not self._hosts:
            return True
        if parsed is None:
            return False
        name, port = parsed
        for pattern, wanted_port in self._hosts:
            if wanted_port is not None and wanted_port != port:
                continue
            if pattern == "*" or pattern == name:
                return True
            if pattern.startswith("*.") and name.endswith(pattern[1:]):
                return True
        return False

    def host_refusal(self) -> str:
        """The one sentence a request for a disallowed Host gets."""
        if self.auth.insecure_no_auth:
            return (
                "Host not allowed: without credentials the admin only answers to localhost, "
                "127.0.0.1 and [::1]"
            )
        return "Host not allowed: add it to PGQUEUE_ADMIN_ALLOWED_HOSTS (AdminAuth.allowed_hosts)"

    # ------------------------------------------------------------------ sessions

    def _sign(self, message: str) -> str:
        return hmac.new(self._key, message.encode("utf-8"), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        body = f"{int(time.time())}.{secrets.token_urlsafe(16)}"
        return f"{body}.{self._sign(body)}"

    def _session_parts(self, value: str) -> tuple[int, str] | None:
        """(issued at, nonce) of a well-signed, unexpired session; None otherwise."""
        issued, _, rest = value.partition(".")
        nonce, _, signature = rest.partition(".")
        if not issued.isdigit() or not nonce or not signature:
            return None
        if time.time() - int(issued) > self.auth.session_max_age_seconds:
            return None
        if not _equal(signature, self._sign(f"{issued}.{nonce}")):
            return None
        return int(issued), nonce

    def session_valid(self, value: str) -> bool:
        parts = self._session_parts(value)
        if parts is None:
            return False
        with self._revoked_lock:
            return parts[1] not in self._revoked

    def revoke(self, value: str) -> None:
        """End a session for good: the cookie (and any copy of it) no longer authenticates.

        Kept per process until the session would have expired; entries past that are dropped
        on each revocation, so the set stays as small as the logouts of one session lifetime.
        """
        parts = self._session_parts(value)
        if parts is None:
            return
        issued, nonce = parts
        now = time.time()
        with self._revoked_lock:
            self._revoked = {n: until for n, until in self._revoked.items() if until > now}
            self._revoked[nonce] = issued + self.auth.session_max_age_seconds

    def csrf_token(self, session: str | None) -> str:
        """The token the dashboard embeds; bound to the session, so it leaks nothing reusable."""
        return self._sign(f"csrf.{session or 'anonymous'}")[:40]

    def login(self, token: str | None, username: str | None, password: str | None) -> bool:
        auth = self.auth
        if token and auth.token is not None and _equal(token, auth.token):
            return True
        return bool(
            username is not None
            and password is not None
            and auth.username is not None
            and auth.password is not None
            and _equal(username, auth.username) & _equal(password, auth.password)
        )

    # ------------------------------------------------------------------ checks

    def identify(self, request: Request) -> Identity | None:
        """Who sent this request, by the first credential that checks out; None if nobody."""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self.auth.token is not None and value:
            if _equal(value, self.auth.token):
                return Identity("bearer")
        elif scheme.lower() == "basic" and self.auth.username is not None:
            pair = _basic_credentials(value)
            if pair is not None and self.login(None, *pair):
                return Identity("basic")
        session = request.cookies.get(SESSION_COOKIE)
        if session and self.auth.has_credentials and self.session_valid(session):
            return Identity("cookie", session)
        if self.auth.insecure_no_auth:
            return Identity("anonymous")
        return None

    def same_origin(self, request: Request) -> bool:
        """False when a browser tells us another site triggered this request: its
        ``Sec-Fetch-Site`` says so, or its ``Origin`` is neither trusted nor this host (an
        allowed one)."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is None:
            return True  # not a browser, or a same-origin GET: browsers send Origin on writes
        if origin in self.auth.trusted_origins:
            return True
        host = request.headers.get("host", "")
        netloc = urlsplit(origin).netloc.lower()
        return bool(host) and netloc == host.lower() and self.host_allowed(netloc)

    def _unauthorized(self) -> HTTPException:
        challenge = 'Bearer realm="pgqueue-admin"'
        if self.auth.username is not None:
            challenge += ', Basic realm="pgqueue-admin", charset="UTF-8"'
        return HTTPException(
            status_code=401,
            detail="authentication required: send Authorization: Bearer <PGQUEUE_ADMIN_TOKEN>"
            + (" or HTTP basic credentials" if self.auth.username is not None else ""),
            headers={"WWW-Authenticate": challenge},
        )

    def check_read(self, request: Request) -> Identity:
        identity = self.identify(request)
        if identity is None:
            raise self._unauthorized()
        return identity

    def check_write(self, request: Request) -> Identity:
        """Reads' check, plus: same origin, and the CSRF token for cookie sessions."""
        if request.method not in SAFE_METHODS and not self.same_origin(request):
            raise HTTPException(403, "cross-site request refused (Origin/Sec-Fetch-Site)")
        identity = self.check_read(request)
        # A cookie rides along with requests other sites make; the token proves our page sent it.
        # (Without credentials there is no secret to bind a token to: the origin check stands.)
        if identity.method == "cookie" and request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not sent or not _equal(sent, self.csrf_token(identity.session)):
                raise HTTPException(
                    403, "missing or wrong X-CSRF-Token header (required with a session cookie)"
                )
        return identity

    def read_dependency(self) -> Any:
        """``Depends`` for read routes (also lists the schemes in OpenAPI)."""

        async def require_read(
            request: Request, _docs: Annotated[None, Depends(_documented_schemes)]
        ) -> Identity:
            return self.check_read(request)

        return Depends(require_read)

    def write_dependency(self) -> Any:
        async def require_write(
            request: Request, _docs: Annotated[None, Depends(_documented_schemes)]
        ) -> Identity:
            return self.check_write(request)

        return Depends(require_write)
