"""The harness side of the driver protocol (see bench/peers/_driver.py for the wire format)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

PEERS_DIR = Path(__file__).resolve().parent / "peers"


class DriverError(RuntimeError):
    pass


class Driver:
    """One running driver process: its events arrive on a queue read by a thread."""

    def __init__(
        self,
        python: str,
        system: str,
        command: dict[str, Any],
        log_dir: Path | None = None,
        script: str | None = None,
    ) -> None:
        self.system = system
        self.command = command
        script_name = script or system
        script_path = PEERS_DIR / f"{script_name}_driver.py"
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # pgqueue must come from its own checkout even when the harness runs from elsewhere.
        env["PYTHONPATH"] = str(PEERS_DIR.parent.parent) if script_name == "pgqueue" else ""
        self._stderr_path = None
        stderr: Any = subprocess.DEVNULL
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            self._stderr_path = log_dir / f"{system}-{command['op']}-{time.time_ns()}.log"
            stderr = open(self._stderr_path, "w")  # noqa: SIM115 - closed in wait()
        self._stderr = stderr
        self.proc = subprocess.Popen(
            [python, str(script_path), json.dumps(command)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.progress: list[tuple[float, int]] = []  # (unix time, jobs done)
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "progress":
                self.progress.append((float(event["at"]), int(event["done"])))
            self.events.put(event)
        self.events.put(None)

    @property
    def done(self) -> int:
        return self.progress[-1][1] if self.progress else 0

    def wait_for(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next event of this kind (progress events are recorded on the way)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DriverError(
                    f"{self.system} {self.command['op']}: no {kind!r} within {timeout:.0f}s{self._tail()}"
                )
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if event is None:
                self.proc.wait()
                raise DriverError(
                    f"{self.system} {self.command['op']}: exited ({self.proc.returncode})"
                    f" before {kind!r}{self._tail()}"
                )
            if event.get("event") == "error":
                self.error = event.get("message")
                raise DriverError(f"{self.system} {self.command['op']}: {self.error}{self._tail()}")
            if event.get("event") == kind:
                if kind == "result":
                    self.result = event
                return event

    def stop(self) -> None:
        """Ask a long-running op to finish gracefully."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def finish(self, timeout: float = 120) -> dict[str, Any]:
        try:
            result = self.wait_for("result", timeout)
        finally:
            self.close()
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._stderr is not subprocess.DEVNULL:
            self._stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._stderr is not subprocess.DEVNULL:
            self._stderr.close()

    def stderr_text(self) -> str:
        """What the driver wrote to stderr (its log), if it was kept."""
        if self._stderr_path is None:
            return ""
        try:
            return self._stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def _tail(self) -> str:
        if self._stderr_path is None:
            return ""
        try:
            self._stderr.flush()
            text = self._stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        lines = text.strip().splitlines()[-15:]
        return ("\n    " + "\n    ".join(lines)) if lines else ""


def run_op(
    python: str,
    system: str,
    command: dict[str, Any],
    timeout: float,
    log_dir: Path | None = None,
    script: str | None = None,
) -> dict[str, Any]:
    """Run a short op to completion and return its result."""
    driver = Driver(python, system, command, log_dir, script)
    try:
        return driver.finish(timeout)
    except BaseException:
        driver.kill()
        raise
