"""The admin against hostile clients: DNS rebinding, huge bodies, leaky data, stolen cookies,
sloppy types — each with the real app on a real database, and a real uvicorn process where only
a socket and a separate process can show it (response time, memory)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from admin_support import AUTH, TOKEN, admin_app, bury, insert_job
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pgqueue import Queue
from pgqueue.admin import AdminAuth, AdminOptions, app_from_env, create_admin_router, default_redact
from pgqueue.admin.redaction import is_secret_key, mask_keys, redact_text
from pgqueue.errors import ConfigurationError

LOOPBACK = "http://127.0.0.1:8080"
EVIL = "http://attacker.example"
MIB = 1024 * 1024
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def insecure(queue: Queue, base_url: str, **auth: Any) -> TestClient:
    return TestClient(admin_app(queue, auth=AdminAuth(insecure_no_auth=True, **auth)), base_url=base_url)


def paused(queue: Queue, name: str) -> bool:
    with queue.connection() as c:
        row = c.execute(f'SELECT paused FROM "{queue.schema}".queues WHERE name = %s', [name]).fetchone()
    return bool(row and row[0])


# ---------------------------------------------------------------------------- 1. Host allow-list


def test_without_credentials_only_loopback_hosts_are_served(
    pgqueue_queue: Queue, seeded: dict[str, int]
) -> None:
    """A DNS-rebinding page talks to the admin under its own name: that Host is refused."""
    with insecure(pgqueue_queue, EVIL) as c:
        rebound = {"Origin": EVIL}
        for method, path, body in (
            ("GET", "/api/jobs", None),
            ("GET", "/", None),
            ("GET", "/api/openapi.json", None),
            ("POST", "/api/queues/email/pause", None),
            ("POST", "/api/jobs/clean", {"older_than_seconds": 0}),
        ):
            response = c.request(method, path, json=body, headers=rebound)
            assert response.status_code == 400, (method, path)
            assert "Host not allowed" in response.json()["detail"]
            assert len(response.content) < 200
    assert not paused(pgqueue_queue, "email")
    with insecure(pgqueue_queue, LOOPBACK) as c:
        assert c.get(f"/api/jobs/{seeded['completed0']}").status_code == 200  # nothing was cleaned
        for host in ("localhost", "LOCALHOST:9000", "127.0.0.1", "127.0.0.1:8080", "[::1]:8080", "[::1]"):
            assert c.get("/api/queues", headers={"Host": host}).status_code == 200, host
        for host in ("attacker.example", "127.0.0.1.attacker.example", "localhost.attacker.example", ""):
            assert c.get("/api/queues", headers={"Host": host}).status_code == 400, host


def test_without_credentials_writes_need_a_loopback_origin(pgqueue_queue: Queue) -> None:
    with insecure(pgqueue_queue, LOOPBACK) as c:
        assert c.post("/api/queues/q/pause", headers={"Origin": LOOPBACK}).status_code == 200
        assert c.post("/api/queues/q/resume", headers={"Origin": EVIL}).status_code == 403
        assert c.post("/api/queues/q/resume").status_code == 200  # no Origin: not a browser
    assert not paused(pgqueue_queue, "q")


def test_with_credentials_any_host_is_served_unless_configured(pgqueue_queue: Queue) -> None:
    with TestClient(admin_app(pgqueue_queue), base_url="http://whatever.example") as c:
        assert c.get("/api/queues", headers=AUTH).status_code == 200
    auth = AdminAuth(token=TOKEN, allowed_hosts=("admin.example.com", "*.ops.example:8443"))
    with TestClient(admin_app(pgqueue_queue, auth=auth)) as c:
        for host, status in (
            ("admin.example.com", 200),
            ("Admin.Example.com:443", 200),
            ("a.ops.example:8443", 200),
            ("a.b.ops.example:8443", 200),
            ("a.ops.example:80", 400),
            ("ops.example:8443", 400),
            ("localhost:8080", 200),  # loopback names always pass: nobody else can send them
            ("attacker.example", 400),
            ("admin.example.com.attacker.example", 400),
            ("admin.example.com@attacker.example", 400),
        ):
            assert c.get("/api/queues", headers={**AUTH, "Host": host}).status_code == status, host
        # Origin on writes must be this host, and an allowed one.
        ok = {**AUTH, "Host": "admin.example.com", "Origin": "https://admin.example.com"}
        assert c.post("/api/queues/q/pause", headers=ok).status_code == 200
        cross = {**AUTH, "Host": "admin.example.com", "Origin": "https://attacker.example"}
        assert c.post("/api/queues/q/resume", headers=cross).status_code == 403


def test_host_allow_list_configuration(pgqueue_queue: Queue) -> None:
    auth = AdminAuth.from_env(
        {"PGQUEUE_ADMIN_TOKEN": TOKEN, "PGQUEUE_ADMIN_ALLOWED_HOSTS": "a.example, *.b.example:8443,"}
    )
    assert auth.allowed_hosts == ("a.example", "*.b.example:8443")
    with pytest.raises(ConfigurationError, match="not a host name"):
        AdminAuth(token=TOKEN, allowed_hosts=("https://a.example/",))
    with pytest.raises(ConfigurationError, match="loopback"):
        AdminAuth(insecure_no_auth=True, allowed_hosts=("admin.example.com",))
    with pytest.raises(ConfigurationError, match="loopback origins"):
        AdminAuth(insecure_no_auth=True, trusted_origins=("https://attacker.example",))
    assert AdminAuth(
        insecure_no_auth=True, allowed_hosts=("localhost:3000",), trusted_origins=("http://localhost:3000",)
    )


def test_an_included_router_checks_the_host_too(pgqueue_queue: Queue) -> None:
    host = FastAPI()
    host.include_router(
        create_admin_router(pgqueue_queue, auth=AdminAuth(insecure_no_auth=True)), prefix="/admin"
    )
    with TestClient(host, base_url=EVIL) as c:
        assert c.get("/admin/api/queues").status_code == 400
        assert c.post("/admin/api/queues/q/pause", headers={"Origin": EVIL}).status_code == 400
    with TestClient(host, base_url=LOOPBACK) as c:
        assert c.get("/admin/api/queues").status_code == 200


# ---------------------------------------------------------------------------- 2. auth before body


def test_credentials_are_checked_before_the_body_is_parsed(client: TestClient) -> None:
    """Garbage from an anonymous client is a 401, not a 422: its body was never parsed."""
    for method, path in (("POST", "/api/jobs/clean"), ("PATCH", "/api/queues/q/limits")):
        response = client.request(
            method, path, content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.headers["connection"] == "close"  # the rest of the body is never read


def test_bodies_over_the_limit_are_refused(pgqueue_queue: Queue) -> None:
    app = admin_app(pgqueue_queue, options=AdminOptions(metrics_lag_seconds=0, max_body_bytes=2048))
    padded = json.dumps({"older_than_seconds": 60, "queue": None}).encode() + b" " * 3000

    def chunked(data: bytes) -> Iterator[bytes]:  # no Content-Length: sent chunked
        for i in range(0, len(data), 500):
            yield data[i : i + 500]

    with TestClient(app) as c:
        declared = c.post(
            "/api/jobs/clean", content=padded, headers={**AUTH, "Content-Type": "application/json"}
        )
        assert declared.status_code == 413 and "2048-byte limit" in declared.json()["detail"]
        streamed = c.post(
            "/api/jobs/clean", content=chunked(padded), headers={**AUTH, "Content-Type": "application/json"}
        )
        assert streamed.status_code == 413
        json_auth = {**AUTH, "Content-Type": "application/json"}
        assert c.post("/api/jobs/clean", content=chunked(padded[:1500]), headers=json_auth).status_code == 200
        assert c.post("/api/jobs/clean", headers={**AUTH, "Content-Length": "12x"}).status_code == 400
        over = c.post("/login", content=chunked(b"token=" + b"x" * 3000), headers=FORM)
        assert over.status_code == 413
    # The login form has its own, smaller cap (8 KiB), also when it comes chunked.
    with TestClient(admin_app(pgqueue_queue)) as c:
        assert c.post("/login", content=chunked(b"token=" + b"x" * 9000), headers=FORM).status_code == 413


def test_body_limit_from_the_environment(postgres_dsn: str, pgqueue_schema: str) -> None:
    env = {"PGQUEUE_DSN": postgres_dsn, "PGQUEUE_SCHEMA": pgqueue_schema, "PGQUEUE_ADMIN_TOKEN": TOKEN}
    with pytest.raises(ConfigurationError, match="PGQUEUE_ADMIN_MAX_BODY_BYTES"):
        app_from_env({**env, "PGQUEUE_ADMIN_MAX_BODY_BYTES": "1MB"})
    with pytest.raises(ConfigurationError, match="max_body_bytes"):
        app_from_env({**env, "PGQUEUE_ADMIN_MAX_BODY_BYTES": "10"})
    with TestClient(app_from_env({**env, "PGQUEUE_ADMIN_MAX_BODY_BYTES": "4096"})) as c:
        body = b'{"older_than_seconds": 60}' + b" " * 5000
        headers = {**AUTH, "Content-Type": "application/json"}
        assert c.post("/api/jobs/clean", content=body, headers=headers).status_code == 413
        assert c.post("/api/jobs/clean", content=body[:4000], headers=headers).status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _memory_mb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak since start) of a process, in MB."""
    with open(f"/proc/{pid}/status") as status:
        return {
            line.split(":")[0]: int(line.split()[1]) // 1024
            for line in status
            if line.startswith(("VmRSS:", "VmHWM:"))
        }


def _post_huge(port: int, size: int, *, chunked: bool, auth: bool) -> tuple[float, str]:
    """POST ``size`` bytes of JSON to /api/jobs/clean from a raw socket, sending from a thread
    while waiting for the answer: returns the seconds until the status line, and that line."""
    sock = socket.create_connection(("127.0.0.1", port))
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    credentials = f"Authorization: Bearer {TOKEN}\r\n" if auth else ""
    head = (
        f"POST /api/jobs/clean HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"{framing}\r\n{credentials}\r\n"
    )
    piece = b"x" * MIB
    first, last = b'{"pad": "' + piece[9:], piece[:-2] + b'"}'

    def send_body() -> None:
        sent = 0
        try:
            while sent < size:
                part = first if sent == 0 else last if sent + MIB >= size else piece
                sock.sendall(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
                sent += MIB
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed: what we are here to see

    start = time.monotonic()
    sock.sendall(head.encode())
    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    sock.settimeout(30)
    answer = sock.recv(4096)
    elapsed = time.monotonic() - start
    sock.close()
    sender.join(10)
    return elapsed, answer.split(b"\r\n", 1)[0].decode()


@pytest.fixture
def uvicorn_admin(postgres_dsn: str, pgqueue_schema: str) -> Iterator[tuple[int, int]]:
    """``uvicorn --factory pgqueue.admin.serve:app_from_env`` on a free loopback port, as the
    service runs it: yields (port, pid)."""
    port = _free_port()
    env = {
        **os.environ,
        "PGQUEUE_DSN": postgres_dsn,
        "PGQUEUE_SCHEMA": pgqueue_schema,
        "PGQUEUE_ADMIN_TOKEN": TOKEN,
    }
    command = [sys.executable, "-m", "uvicorn", "--factory", "pgqueue.admin.serve:app_from_env"]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.1)
        yield port, process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_huge_bodies_are_refused_at_once_and_never_buffered(uvicorn_admin: tuple[int, int]) -> None:
    """256 MB at a real server: the answer comes from the headers, the bytes never land."""
    port, pid = uvicorn_admin
    _post_huge(port, MIB // 2, chunked=False, auth=False)  # warm up: first request, imports
    _post_huge(port, 2 * MIB, chunked=True, auth=True)
    baseline = _memory_mb(pid)
    results = {}
    for name, chunked, auth in (
        ("declared, anonymous", False, False),
        ("chunked, anonymous", True, False),
        ("declared, authenticated", False, True),
        ("chunked, authenticated", True, True),
    ):
        results[name] = _post_huge(port, 256 * MIB, chunked=chunked, auth=auth)
    after = _memory_mb(pid)
    print(f"\nbaseline {baseline} MB, after {after} MB, {results}")
    for name, (elapsed, status) in results.items():
        expected = "413" if "authenticated" in name else "401"
        assert f" {expected} " in status, (name, status)
        assert elapsed < 0.5, (name, elapsed)
    assert after["VmHWM"] - baseline["VmHWM"] < 50, (baseline, after)


# ---------------------------------------------------------------------------- 3. redaction

SECRETS = {
    "pwd": "s-pwd-01",
    "access_key": "s-access-02",
    "aws_access_key_id": "s-awsid-03",
    "aws_secret_access_key": "s-awssecret-04",
    "credit_card": "s-card-05",
    "otp": "s-otp-06",
    "pin": "s-pin-07",
    "jwt": "s-jwt-08",
    "X-Api-Key": "s-apikey-09",
    "sessionId": "s-session-10",
}
LEAKS = [
    *SECRETS.values(),
    "dsn-secret-11",
    "bearer-secret-12",
    "query-secret-13",
    "eyJzdWIiOiIxMjMifQ",
    "dXNlcjpiYXNpYy1zZWNyZXQ",
    "progress-secret-14",
    "error-secret-15",
    "traceback-secret-16",
    "uk-secret-17",
    "nested-secret-18",
]


@pytest.fixture
def leaky_job(pgqueue_queue: Queue) -> int:
    args = {
        **SECRETS,
        "to": "ann@example.com",
        "shipping": "express",
        "config": {"db": {"dsn": "postgresql://app:dsn-secret-11@db.internal:5432/app"}},
        "headers": [["Authorization", "Bearer bearer-secret-12"], ["Accept", "application/json"]],
        "env": [{"name": "DB_PASSWORD", "value": "nested-secret-18"}, {"name": "HOME", "value": "/home/app"}],
        "callback": "https://hooks.example.com/cb?token=query-secret-13&x=1",
        "note": "id eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl here",
    }
    errors = [
        {
            "attempt": 1,
            "at": "2026-01-01T00:00:00+00:00",
            "type": "OperationalError",
            "message": "connection to postgresql://app:error-secret-15@db.internal/app failed",
            "traceback": 'Traceback:\n  File "jobs.py", line 9\n    api.call(token="traceback-secret-16")\n',
        }
    ]
    with pgqueue_queue.connection() as c:
        job = insert_job(
            c,
            pgqueue_queue.schema,
            args=args,
            attempts=1,
            errors=errors,
            run_in=600,
            unique_key="reset:token=uk-secret-17",
        )
        c.execute(
            f'UPDATE "{pgqueue_queue.schema}".jobs SET result = %s::jsonb, progress = %s::jsonb '
            "WHERE id = %s",
            [
                json.dumps({"echo": "Authorization: Basic dXNlcjpiYXNpYy1zZWNyZXQ="}),
                json.dumps({"step": "login with password=progress-secret-14"}),
                job,
            ],
        )
    return job


def test_default_redaction_covers_every_view(client: TestClient, leaky_job: int) -> None:
    detail = client.get(f"/api/jobs/{leaky_job}", headers=AUTH)
    listed = client.get("/api/jobs", headers=AUTH)
    page = client.get(f"/jobs/{leaky_job}", headers=AUTH)
    rows = client.get("/jobs", headers=AUTH)
    for view in (detail, listed, page, rows):
        assert view.status_code == 200
        for leak in LEAKS:
            assert leak not in view.text, (view.url, leak)
    body = detail.json()
    args = body["args"]
    assert all(args[k] == "[redacted]" for k in SECRETS)
    assert args["to"] == "ann@example.com" and args["shipping"] == "express"
    assert args["config"]["db"]["dsn"] == "postgresql://app:***@db.internal:5432/app"
    assert args["headers"] == [["Authorization", "[redacted]"], ["Accept", "application/json"]]
    assert args["env"][0]["value"] == "[redacted]" and args["env"][1]["value"] == "/home/app"
    assert args["callback"] == "https://hooks.example.com/cb?token=***&x=1"
    assert args["note"] == "id *** here"
    assert body["result"] == {"echo": "Authorization: *** ***"}
    assert body["progress"] == {"step": "login with password=***"}
    assert body["errors"][0]["message"] == "connection to postgresql://app:***@db.internal/app failed"
    assert 'api.call(token="***")' in body["errors"][0]["traceback"]
    assert body["last_error"] == body["errors"][0]["message"]
    assert body["unique_key"] == "reset:token=***"
    assert listed.json()["jobs"][0]["last_error"] == body["errors"][0]["message"]


def test_a_refusal_does_not_name_the_unique_key_in_clear(client: TestClient, pgqueue_queue: Queue) -> None:
    key = "signup:token=uk-secret-19"
    with pgqueue_queue.connection() as c:
        insert_job(c, pgqueue_queue.schema, unique_key=key)
        dead = bury(c, pgqueue_queue.schema, unique_key=key)
    refused = client.post(f"/api/dead/{dead}/retry", headers=AUTH)
    assert refused.status_code == 409
    assert "uk-secret-19" not in refused.text and "signup:token=***" in refused.text


def test_secret_keys_are_matched_by_word_not_by_accident() -> None:
    for key in (
        "password",
        "DB_PASSWORD",
        "apiKey",
        "APIKey",
        "aws_secret_access_key",
        "AWSAccessKeyId",
        "X-Auth-Token",
        "auth",
        "user_pin",
        "otpCode",
        "SSN",
        "cvv",
        "Authorization",
        "Cookie",
        "session_id",
        "client_secret",
        "private_key",
        "card_number",
        "creditCard",
        "jwt",
        "pwd",
    ):
        assert is_secret_key(key), key
    for key in ("shipping", "author", "footprint", "opinion", "spinner", "keyboard", "to", "email", "id"):
        assert not is_secret_key(key), key


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        ("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("see http://example.com:8080/path", "see http://example.com:8080/path"),
        ("Authorization: Bearer abc.def", "Authorization: *** ***"),
        ("got bearer abc", "got bearer ***"),
        ("header Basic dXNlcjpwYXNz", "header Basic ***"),
        ("Basic usage of the basic client", "Basic usage of the basic client"),
        ("GET /cb?access_token=abc&state=1", "GET /cb?access_token=***&state=1"),
        ("host=db user=app password=s3 dbname=x", "host=db user=app password=*** dbname=x"),
        ('{"password": "hunter2", "user": "ann"}', '{"password": "***", "user": "ann"}'),
        ("a:password=x", "a:password=***"),
        ("jwt eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0. end", "jwt *** end"),
        ("pgqueue.worker.core.run_job failed: timeout", "pgqueue.worker.core.run_job failed: timeout"),
        ('password authentication failed for user "app"', 'password authentication failed for user "app"'),
    ],
)
def test_secrets_inside_strings(text: str, shown: str) -> None:
    assert redact_text(text) == shown


def test_redaction_hooks_still_choose() -> None:
    custom = mask_keys("email")
    assert custom({"email": "a@b.c", "password": "p", "dsn": "pg://u:p@h/d"}) == {
        "email": "[redacted]",
        "password": "p",
        "dsn": "pg://u:***@h/d",
    }
    both = mask_keys("email", defaults=True, strings=False)
    assert both({"email": "a", "password": "p", "dsn": "pg://u:p@h/d"}) == {
        "email": "[redacted]",
        "password": "[redacted]",
        "dsn": "pg://u:p@h/d",
    }
    assert default_redact({"value": [["Cookie", "a=b"], ["x", "y"], ["only-one"]]}) == {
        "value": [["Cookie", "[redacted]"], ["x", "y"], ["only-one"]]
    }


# ---------------------------------------------------------------------------- 4. logout revokes


def _login(c: TestClient) -> str:
    response = c.post(
        "/login", data={"token": TOKEN}, headers={"Origin": "http://admin.test"}, follow_redirects=False
    )
    assert response.status_code == 303
    match = re.search(r'name="pgqueue-csrf" content="([^"]+)"', c.get("/").text)
    assert match is not None
    return match.group(1)


def test_logout_revokes_the_session_server_side(app: FastAPI) -> None:
    base = "http://admin.test"
    with TestClient(app, base_url=base) as browser, TestClient(app, base_url=base) as thief:
        csrf = _login(browser)
        stolen = browser.cookies["pgqueue_admin_session"]
        other = TestClient(app, base_url=base)
        _login(other)  # a second session of the same operator
        thief.cookies.set("pgqueue_admin_session", stolen)
        assert thief.get("/api/queues").status_code == 200
        assert browser.post("/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
        assert thief.get("/api/queues").status_code == 401
        assert thief.get("/", follow_redirects=False).status_code == 303
        assert thief.post("/api/queues/q/pause", headers={"X-CSRF-Token": csrf}).status_code == 401
        assert other.get("/api/queues").status_code == 200  # only the logged-out session ends
        other.close()


# ---------------------------------------------------------------------------- 5. strict bodies


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/jobs/clean", {"older_than_seconds": True}),
        ("POST", "/api/jobs/clean", {"older_than_seconds": "1"}),
        ("POST", "/api/jobs/clean", {"older_than_seconds": 1, "queue": 5}),
        ("PATCH", "/api/queues/email/limits", {"concurrency": True}),
        ("PATCH", "/api/queues/email/limits", {"concurrency": 2.5}),
        ("PATCH", "/api/queues/email/limits", {"concurrency": "2"}),
        ("PATCH", "/api/queues/email/limits", {"rate_limit": False}),
    ],
)
def test_bodies_are_strictly_typed(
    client: TestClient, seeded: dict[str, int], method: str, path: str, body: dict[str, Any]
) -> None:
    assert client.request(method, path, json=body, headers=AUTH).status_code == 422
    assert client.get(f"/api/jobs/{seeded['completed0']}", headers=AUTH).status_code == 200


def test_strict_bodies_still_take_numbers(client: TestClient) -> None:
    assert client.post("/api/jobs/clean", json={"older_than_seconds": 3600}, headers=AUTH).status_code == 200
    limits = client.patch("/api/queues/email/limits", json={"concurrency": 3, "rate_limit": 5}, headers=AUTH)
    assert limits.status_code == 200 and limits.json()["rate_limit"] == 5.0
    # JSON Schema's integer includes 3.0, and the OpenAPI document is JSON Schema.
    limits = client.patch("/api/queues/email/limits", json={"concurrency": 4.0}, headers=AUTH)
    assert limits.status_code == 200 and limits.json()["concurrency"] == 4


# ---------------------------------------------------------------------------- what held


def test_every_operation_but_the_probes_needs_credentials(client: TestClient) -> None:
    public = {"/health/live", "/health/ready"}
    values = {"name": "email", "job_id": "1"}
    for path, operations in client.get("/api/openapi.json").json()["paths"].items():
        url = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)
        for method in operations:
            response = client.request(method.upper(), url, content=b"garbage")
            expected = 200 if path in public else 401
            assert response.status_code in (expected, 503), (method, path, response.status_code)


def test_injection_looking_input_is_data(client: TestClient, seeded: dict[str, int]) -> None:
    evil = "x'; DROP TABLE jobs; --"
    assert client.get("/api/jobs", params={"task": evil}, headers=AUTH).status_code == 422
    assert client.post(f"/api/schedules/{evil}/pause", headers=AUTH).status_code == 404
    listed = client.get("/jobs", params={"queue": evil, "task": "a' OR '1'='1"}, headers=AUTH)
    assert listed.status_code == 200 and "DROP TABLE" in listed.text  # explained, escaped, not run
    assert client.get(f"/api/jobs/{seeded['queued']}", headers=AUTH).status_code == 200
