"""The systemd notify protocol against real datagram sockets standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgqueue.worker.sdnotify import SystemdNotifier


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may themselves run under systemd: never leak its socket or watchdog into a test.
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


def _receive(server: socket.socket) -> bytes:
    return server.recv(4096)


def _assert_nothing_more(server: socket.socket) -> None:
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.recv(4096)
    server.settimeout(2)


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(tmp_path / "notify"))
    server.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield server
    server.close()


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"pgqueue-test-{uuid.uuid4().hex}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(b"\0" + name.encode())
    server.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield server
    server.close()


def test_messages_reach_a_filesystem_socket(path_socket: socket.socket) -> None:
    notifier = SystemdNotifier()
    assert notifier.enabled

    assert notifier.ready() is True
    assert _receive(path_socket) == b"READY=1"
    assert notifier.watchdog() is True
    assert _receive(path_socket) == b"WATCHDOG=1"
    assert notifier.status("3 jobs running on email, reports") is True
    assert _receive(path_socket) == b"STATUS=3 jobs running on email, reports"
    assert notifier.stopping() is True
    assert _receive(path_socket) == b"STOPPING=1"
    _assert_nothing_more(path_socket)
    notifier.close()


def test_messages_reach_an_abstract_socket(abstract_socket: socket.socket) -> None:
    notifier = SystemdNotifier()

    assert notifier.ready() is True
    assert _receive(abstract_socket) == b"READY=1"
    assert notifier.stopping() is True
    assert _receive(abstract_socket) == b"STOPPING=1"
    assert notifier.watchdog() is True
    assert _receive(abstract_socket) == b"WATCHDOG=1"
    notifier.close()


def test_ready_with_status_is_one_datagram(path_socket: socket.socket) -> None:
    with SystemdNotifier() as notifier:
        notifier.ready(status="claiming from email")

    assert _receive(path_socket) == b"READY=1\nSTATUS=claiming from email"
    _assert_nothing_more(path_socket)


def test_status_stays_on_one_line(path_socket: socket.socket) -> None:
    with SystemdNotifier() as notifier:
        notifier.status("line one\nREADY=1")

    assert _receive(path_socket) == b"STATUS=line one READY=1"


def test_without_notify_socket_everything_is_a_no_op(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = SystemdNotifier()

    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    with caplog.at_level(logging.DEBUG, logger="pgqueue.worker.sdnotify"):
        assert notifier.ready("hello") is False
        assert notifier.stopping() is False
        assert notifier.watchdog() is False
        assert notifier.status("x") is False
    assert caplog.records == []
    notifier.close()


def test_environment_is_read_at_construction(
    path_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SystemdNotifier() as notifier:
        monkeypatch.delenv("NOTIFY_SOCKET")

        assert notifier.ready() is True
    assert _receive(path_socket) == b"READY=1"


def test_an_explicit_environment_wins(path_socket: socket.socket) -> None:
    assert not SystemdNotifier(environ={}).enabled


def test_an_unusable_address_is_ignored_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    with caplog.at_level(logging.WARNING, logger="pgqueue.worker.sdnotify"):
        notifier = SystemdNotifier()

    assert not notifier.enabled
    assert notifier.ready() is False
    assert "NOTIFY_SOCKET" in caplog.text


@pytest.mark.parametrize(
    ("usec", "expected"),
    [("30000000", 15.0), ("1000000", 0.5), ("500", 0.00025)],
)
def test_watchdog_interval_is_half_the_timeout(
    monkeypatch: pytest.MonkeyPatch, usec: str, expected: float
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)

    assert SystemdNotifier().watchdog_interval == pytest.approx(expected)


def test_watchdog_interval_for_this_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    assert SystemdNotifier().watchdog_interval == pytest.approx(15.0)


def test_watchdog_meant_for_another_process_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))

    assert SystemdNotifier().watchdog_interval is None


@pytest.mark.parametrize("usec", ["", "0", "-5", "thirty", "1.5"])
def test_watchdog_off_when_unset_zero_or_malformed(monkeypatch: pytest.MonkeyPatch, usec: str) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)

    assert SystemdNotifier().watchdog_interval is None


def test_malformed_watchdog_pid_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", "me")

    assert SystemdNotifier().watchdog_interval is None


def test_a_vanished_socket_does_not_raise_and_is_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    address = tmp_path / "notify"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(address))
    server.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(address))
    notifier = SystemdNotifier()
    assert notifier.ready() is True
    assert server.recv(4096) == b"READY=1"

    server.close()
    address.unlink()
    with caplog.at_level(logging.DEBUG, logger="pgqueue.worker.sdnotify"):
        for _ in range(5):
            assert notifier.watchdog() is False
        assert notifier.stopping() is False

    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert str(address) in warnings[0].getMessage()
    notifier.close()


def test_a_socket_nobody_listens_on_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "never-bound"))
    with SystemdNotifier() as notifier:
        assert notifier.ready() is False

    monkeypatch.setenv("NOTIFY_SOCKET", f"@pgqueue-test-unbound-{uuid.uuid4().hex}")
    with SystemdNotifier() as notifier:
        assert notifier.watchdog() is False


def test_sending_resumes_after_the_socket_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    address = tmp_path / "notify"
    monkeypatch.setenv("NOTIFY_SOCKET", str(address))
    notifier = SystemdNotifier()
    with caplog.at_level(logging.WARNING, logger="pgqueue.worker.sdnotify"):
        assert notifier.watchdog() is False

    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(address))
    server.settimeout(2)
    try:
        assert notifier.watchdog() is True
        assert server.recv(4096) == b"WATCHDOG=1"
    finally:
        server.close()
        notifier.close()
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
