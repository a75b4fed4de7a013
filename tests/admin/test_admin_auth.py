"""The admin is closed by default and refuses cross-site writes; secrets stay redacted."""

from __future__ import annotations

import base64
import re

import pytest
from admin_support import AUTH, TOKEN, admin_app, insert_job
from fastapi.testclient import TestClient

from pgqueue import Queue
from pgqueue.admin import AdminAuth, app_from_env, create_admin_app, serve
from pgqueue.errors import ConfigurationError

ORIGIN = "http://admin.test"


def basic(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


# ---------------------------------------------------------------------------- configuration


def test_no_credentials_refuses_to_build(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGQUEUE_ADMIN_TOKEN", "PGQUEUE_ADMIN_USER", "PGQUEUE_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError, match="insecure-no-auth"):
        create_admin_app(Queue("postgresql://localhost/x"))
    with pytest.raises(ConfigurationError, match="credentials"):
        app_from_env({"PGQUEUE_DSN": "postgresql://localhost/x"})
    assert app_from_env({"PGQUEUE_DSN": "postgresql://localhost/x"}, insecure_no_auth=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"token": "short"}, "at least 16"),
        ({"username": "ops"}, "both a username and a password"),
        ({"username": "ops", "password": "pw"}, "at least 8"),
        ({"username": "a:b", "password": "long-enough"}, "without ':'"),
    ],
)
def test_weak_or_partial_credentials_are_refused(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        AdminAuth(**kwargs)  # type: ignore[arg-type]


def test_credentials_from_the_environment() -> None:
    auth = AdminAuth.from_env(
        {
            "PGQUEUE_ADMIN_TOKEN": TOKEN,
            "PGQUEUE_ADMIN_USER": "ops",
            "PGQUEUE_ADMIN_PASSWORD": "correct horse",
            "PGQUEUE_ADMIN_TRUSTED_ORIGINS": "https://a.b, ",
        }
    )
    assert (auth.token, auth.username, auth.password) == (TOKEN, "ops", "correct horse")
    assert auth.trusted_origins == ("https://a.b",)


def test_insecure_mode_only_binds_to_loopback() -> None:
    with pytest.raises(ConfigurationError, match="loopback"):
        serve("postgresql://localhost/x", host="0.0.0.0", insecure_no_auth=True)


# ---------------------------------------------------------------------------- API credentials


def test_reads_need_credentials(client: TestClient) -> None:
    response = client.get("/api/queues")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "PGQUEUE_ADMIN_TOKEN" in response.json()["detail"]
    for headers in (
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic !!!"},
        basic("ops", "correct horse"),
    ):
        assert client.get("/api/queues", headers=headers).status_code == 401, headers
    assert client.get("/metrics").status_code == 401
    assert client.get("/health/detailed").status_code == 401
    assert client.get("/api/queues", headers=AUTH).status_code == 200
    # Liveness and readiness stay public for load balancers.
    assert client.get("/health/live").status_code == 200


def test_http_basic(pgqueue_queue: Queue) -> None:
    app = admin_app(pgqueue_queue, auth=AdminAuth(username="ops", password="correct horse"))
    with TestClient(app) as c:
        assert c.get("/api/queues", headers=basic("ops", "correct horse")).status_code == 200
        denied = c.get("/api/queues", headers=basic("ops", "wrong horse"))
        assert denied.status_code == 401 and "Basic" in denied.headers["www-authenticate"]
        assert c.get("/api/queues", headers=AUTH).status_code == 401  # no token configured


def test_openapi_lists_the_security_schemes(client: TestClient) -> None:
    schemes = client.get("/api/openapi.json").json()["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}


# ---------------------------------------------------------------------------- cross-site writes


def test_cross_site_writes_are_refused(client: TestClient) -> None:
    for headers in (
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
    ):
        response = client.post("/api/queues/email/pause", headers={**AUTH, **headers})
        assert response.status_code == 403, headers
        assert "cross-site" in response.json()["detail"]
    # Reads are not affected: a link from elsewhere still opens the page.
    assert client.get("/api/queues", headers={**AUTH, "Sec-Fetch-Site": "cross-site"}).is_success


def test_same_origin_and_trusted_origins_may_write(pgqueue_queue: Queue) -> None:
    app = admin_app(
        pgqueue_queue, auth=AdminAuth(token=TOKEN, trusted_origins=("https://admin.example.com",))
    )
    with TestClient(app, base_url=ORIGIN) as c:
        for origin in (ORIGIN, "https://admin.example.com"):
            response = c.post(
                "/api/jobs/clean",
                json={"older_than_seconds": 60},
                headers={**AUTH, "Origin": origin, "Sec-Fetch-Site": "same-origin"},
            )
            assert response.status_code == 200, origin


# ---------------------------------------------------------------------------- dashboard session


def login(c: TestClient, token: str = TOKEN) -> str:
    """Sign in through the form; returns the page's CSRF token."""
    response = c.post("/login", data={"token": token}, headers={"Origin": ORIGIN}, follow_redirects=False)
    assert response.status_code == 303, response.text
    page = c.get("/")
    assert page.status_code == 200
    match = re.search(r'name="pgqueue-csrf" content="([^"]+)"', page.text)
    assert match is not None
    return match.group(1)


def test_dashboard_redirects_to_login(client: TestClient) -> None:
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login"
    assert "Sign in" in client.get("/login").text


def test_login_sets_a_strict_http_only_cookie(client: TestClient) -> None:
    wrong = client.post("/login", data={"token": "nope"}, follow_redirects=False)
    assert wrong.status_code == 401 and "Wrong token" in wrong.text
    response = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    cookie = response.headers["set-cookie"]
    assert "pgqueue_admin_session=" in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert TOKEN not in cookie


def test_cookie_session_writes_need_the_csrf_token(client: TestClient, seeded: dict[str, int]) -> None:
    csrf = login(client)
    assert client.get("/api/queues").status_code == 200  # the cookie authenticates reads
    retry = f"/api/jobs/{seeded['dead']}/retry"
    refused = client.post(retry)
    assert refused.status_code == 403 and "X-CSRF-Token" in refused.json()["detail"]
    forged = client.post(retry, headers={"X-CSRF-Token": "0" * 40})
    assert forged.status_code == 403
    ok = client.post(retry, headers={"X-CSRF-Token": csrf, "Origin": ORIGIN})
    assert ok.status_code == 200 and ok.json()["action"] == "moved_from_dead_letter"


def test_cross_site_login_and_tampered_sessions_are_refused(client: TestClient) -> None:
    assert (
        client.post("/login", data={"token": TOKEN}, headers={"Sec-Fetch-Site": "cross-site"}).status_code
        == 403
    )
    client.cookies.set("pgqueue_admin_session", "1.abc.def")
    assert client.get("/", follow_redirects=False).status_code == 303


def test_garbage_login_forms_are_refused(client: TestClient) -> None:
    many = "&".join(f"f{n}=x" for n in range(20))
    assert (
        client.post(
            "/login", content=many, headers={"Content-Type": "application/x-www-form-urlencoded"}
        ).status_code
        == 400
    )
    assert client.post("/login", content="token=" + "x" * 10_000).status_code == 413
    assert client.post("/login", content=b"\xff\xfe", follow_redirects=False).status_code == 401


def test_logout_ends_the_session(client: TestClient) -> None:
    csrf = login(client)
    assert client.post("/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert client.get("/", follow_redirects=False).status_code == 303


def test_pages_send_security_headers_and_escape_job_data(client: TestClient, pgqueue_queue: Queue) -> None:
    with pgqueue_queue.connection() as c:
        job = insert_job(c, pgqueue_queue.schema, args={"html": "<script>alert(1)</script>"})
    page = client.get(f"/jobs/{job}", headers=AUTH)
    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY"


# ---------------------------------------------------------------------------- insecure mode


def test_insecure_mode_opens_reads_but_still_refuses_cross_site_writes(
    pgqueue_queue: Queue,
) -> None:
    app = admin_app(pgqueue_queue, auth=AdminAuth(insecure_no_auth=True))
    # Loopback names only without credentials (tests/test_admin_security.py has the rest).
    with TestClient(app, base_url="http://127.0.0.1:8080") as c:
        assert c.get("/api/queues").status_code == 200
        assert c.get("/").status_code == 200
        assert c.post("/api/queues/q/resume", headers={"Origin": "https://evil.example"}).status_code == 403
