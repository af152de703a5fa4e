"""A server under test: a subprocess on a free loopback port, health-checked, then stopped.

The process runs in its own session so `stop()` reaches everything it spawned. Its output goes
to a log file (a pipe nobody reads would fill up and stall the server); when it fails to come up,
the error carries the log's tail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

__all__ = ["ServerError", "ServerProcess", "free_port"]

_LOG_TAIL_LINES = 25


class ServerError(Exception):
    """The server exited, or did not become healthy in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just considered free; the server binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """Start with `start()` (or `with`), wait with `wait_healthy()`, end with `stop()`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self._env = dict(env)
        self._cwd = cwd
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self._running().pid

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError(f"{self.name} already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(  # noqa: S603 - argv is built by the bench, not a user
                self.argv,
                env=self._env,
                cwd=self._cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_healthy(
        self,
        url: str,
        *,
        timeout_s: float,
        headers: Mapping[str, str] | None = None,
        poll_s: float = 0.25,
    ) -> None:
        """Poll `GET url` until it answers 200; fail early if the process exits."""
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        with httpx.Client(timeout=5.0, headers=headers) as client:
            while True:
                if (code := self._running().poll()) is not None:
                    raise ServerError(
                        f"{self.name} exited with {code} while starting{self._tail()}"
                    )
                try:
                    response = client.get(url)
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                else:
                    if response.status_code == httpx.codes.OK:
                        return
                    last = f"HTTP {response.status_code}"
                if time.monotonic() >= deadline:
                    raise ServerError(
                        f"{self.name} not healthy after {timeout_s:.0f} s ({last}){self._tail()}"
                    )
                time.sleep(poll_s)

    def stop(self, *, grace_s: float = 15.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `grace_s`; returns the exit status."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            self._signal_group(process, signal.SIGTERM)
            try:
                return process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(process, signal.SIGKILL)  # also reaps children left behind
        return process.wait()

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _running(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._process

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group is already gone
            os.killpg(process.pid, signum)

    def _tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        tail = "\n".join(f"    {line}" for line in lines[-_LOG_TAIL_LINES:])
        return f"\n  last lines of {self.log_path}:\n{tail}"
