"""The job runner: claims queued jobs, starts a worker for each, and takes back the jobs of
workers that died.

One runner thread per server process. Each pass it (1) looks at the workers it started: one that
exited without finishing its job (killed, crashed, out of memory) gives the job back to the
queue, where it resumes from its last checkpoint; (2) takes back running jobs whose heartbeats
stopped, whoever ran them (a worker of a replica that died); (3) claims queued jobs while it has
free slots, in fair order between organisations (see `repos/jobs.claim_next`). A job that lost
its worker `max_attempts` times fails instead of looping.

How a worker runs is the executor's business (`Executor`: local processes here, Ray later); the
runner only sees handles with an exit code.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from aiaas.domain import Job, JobStatus
from aiaas.ids import now
from aiaas.storage.db import Database
from aiaas.storage.repos import jobs as repo

log = logging.getLogger("aiaas.runner")


class WorkerHandle(Protocol):
    def exitcode(self) -> int | None:
        """None while the worker runs; its exit status after (negative: killed by that signal)."""

    def stop(self) -> None:
        """Ask the worker to checkpoint and give its job back (server shutdown)."""

    def kill(self) -> None: ...

    def join(self, timeout: float) -> None: ...


class Executor(Protocol):
    def start(self, job: Job, token: str) -> WorkerHandle: ...


@dataclass(frozen=True)
class RunnerConfig:
    # Called every `housekeeping_s` from the runner thread (e.g. deleting checkpoint blobs of
    # jobs that ended without their worker: cancelled while queued, failed after a crash).
    housekeeping: Callable[[], object] | None = None
    housekeeping_s: float = 300.0
    slots: int = 1
    kinds: tuple[str, ...] = ("training", "lora", "optimisation", "explanation")
    poll_s: float = 1.0
    heartbeat_timeout_s: float = 60.0
    max_attempts: int = 3
    stop_timeout_s: float = 60.0


class JobRunner:
    def __init__(self, db: Database, executor: Executor, config: RunnerConfig) -> None:
        self._db = db
        self._executor = executor
        self._config = config
        self._workers: dict[str, tuple[str, WorkerHandle]] = {}  # job id -> (token, handle)
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._prefix = f"{socket.gethostname()}:{os.getpid()}"
        self._next_housekeeping = time.monotonic() + config.housekeeping_s

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="aiaas-job-runner", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """Stop claiming; ask running workers to checkpoint and requeue; wait for them."""
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        for _, handle in self._workers.values():
            handle.stop()
        for job_id, (token, handle) in list(self._workers.items()):
            handle.join(self._config.stop_timeout_s)
            if handle.exitcode() is None:
                log.warning("worker of job %s did not stop in time; killing it", job_id)
                handle.kill()
                handle.join(10.0)
            self._give_back(job_id, token, why="the server stopped")
        self._workers.clear()

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closing.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("job runner pass failed; retrying")
            self._wake.wait(self._config.poll_s)
            self._wake.clear()

    def run_once(self) -> None:
        if self._config.housekeeping and time.monotonic() >= self._next_housekeeping:
            self._next_housekeeping = time.monotonic() + self._config.housekeeping_s
            self._config.housekeeping()
        self._collect_exited()
        self._take_back_stale()
        while len(self._workers) < self._config.slots and not self._closing.is_set():
            token = f"{self._prefix}:{secrets.token_hex(6)}"
            with self._db.write() as conn:
                job = repo.claim_next(conn, worker=token, kinds=self._config.kinds)
            if job is None:
                return
            log.info("job %s claimed (attempt %d)", job.id, job.attempts)
            try:
                self._workers[job.id] = (token, self._executor.start(job, token))
            except OSError as exc:
                log.error("cannot start a worker for job %s: %s", job.id, exc)
                self._give_back(job.id, token, why=f"no worker could start ({exc})")
                return

    def _collect_exited(self) -> None:
        for job_id, (token, handle) in list(self._workers.items()):
            code = handle.exitcode()
            if code is None:
                continue
            del self._workers[job_id]
            if code != 0:
                self._give_back(job_id, token, why=_describe_exit(code))

    def _take_back_stale(self) -> None:
        with self._db.read() as conn:
            stale = repo.stale(conn, heartbeat_before=now() - self._config.heartbeat_timeout_s)
        for job in stale:
            mine = self._workers.pop(job.id, None)
            if mine is not None:  # ours, but hung: end it before its job runs elsewhere
                mine[1].kill()
                mine[1].join(10.0)
            with self._db.read() as conn:
                current = repo.get_job_any(conn, job_id=job.id)
            worker = current.worker if current else None
            if worker:
                self._give_back(job.id, worker, why="its worker stopped sending heartbeats")

    def _give_back(self, job_id: str, token: str, *, why: str) -> None:
        """Requeue a job whose worker ended without finishing it (or fail it, or honour a
        pending cancel/pause). A no-op when the worker finished it after all."""
        with self._db.write() as conn:
            job = repo.get_job_any(conn, job_id=job_id)
            if job is None or job.status is not JobStatus.RUNNING:
                return
            if job.attempts >= self._config.max_attempts and job.control is None:
                error = {
                    "code": "worker_failed",
                    "message": f"The job's worker ended {job.attempts} times; last: {why}.",
                    "param": None,
                }
                done = repo.transition(
                    conn,
                    job_id=job_id,
                    expected=[JobStatus.RUNNING],
                    status=JobStatus.FAILED,
                    held_by=token,
                    error=json.dumps(error),
                )
                if done:
                    repo.add_event(conn, job_id=job_id, level="error", message=error["message"])
                return
            if not repo.requeue(conn, job_id=job_id, worker=token):
                return
            checkpoint = repo.latest_checkpoint(conn, job_id=job_id)
            where = (
                f"its checkpoint at epoch {checkpoint.epoch}, step {checkpoint.step}"
                if checkpoint
                else "the start"
            )
            after = repo.get_job_any(conn, job_id=job_id)
            state = after.status.value if after else "queued"
            message = (
                f"The worker ended ({why}); the job is queued again and resumes from {where}."
                if state == JobStatus.QUEUED.value
                else f"The worker ended ({why}); the job is {state}."
            )
            repo.add_event(conn, job_id=job_id, level="warn", message=message)
        log.warning("job %s: %s", job_id, message)
        self._wake.set()

    @property
    def running(self) -> Iterable[str]:
        return list(self._workers)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit status {code}"
