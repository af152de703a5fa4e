"""A worker's hold on its job, and the harness that runs a job's body under it.

The worker holds the job through its claim token: a heartbeat thread refreshes the claim twice a
second and reads any cancel or pause request; every write (events, the final state) names the
token and is dropped once the job was taken back.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from aiaas.domain import Job, JobControl, JobStatus
from aiaas.errors import ApiError
from aiaas.ids import new_id
from aiaas.settings import Settings
from aiaas.storage.process import Storage
from aiaas.storage.repos import jobs as repo
from aiaas.training.trainer import Stop

log = logging.getLogger("aiaas.worker")

HEARTBEAT_S = 0.5


class JobLease:
    """The worker's hold on its job: heartbeats, the pending request, fenced writes."""

    def __init__(self, storage: Storage, job: Job, token: str, shutdown: threading.Event) -> None:
        self.storage = storage
        self.job = job
        self.token = token
        self.shutdown = shutdown
        self.control: JobControl | None = None
        self.lost = False
        self.progress: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def __enter__(self) -> JobLease:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                with self.storage.db.write() as conn:
                    held, control = repo.heartbeat(
                        conn, job_id=self.job.id, worker=self.token, **self.progress
                    )
            except Exception:  # a busy database must not end the job: retry
                log.warning("heartbeat of job %s failed; retrying", self.job.id, exc_info=True)
                continue
            self.lost = self.lost or not held
            self.control = control

    def stop_requested(self) -> Stop | None:
        if self.lost or self.control is JobControl.CANCEL:
            return Stop.CANCEL
        if self.control is JobControl.PAUSE or self.shutdown.is_set():
            return Stop.PAUSE
        return None

    def event(
        self,
        message: str,
        *,
        level: str = "info",
        data: dict[str, Any] | None = None,
        type: str = "message",
    ) -> None:
        with self.storage.db.write() as conn:
            if _holds(conn, self.job.id, self.token):
                repo.add_event(
                    conn,
                    job_id=self.job.id,
                    message=message,
                    level=level,
                    type=type,
                    data=data,
                )

    def store_checkpoint(
        self,
        data: bytes,
        *,
        epoch: int,
        step: int,
        metrics: dict[str, Any] | None,
        event: tuple[str, dict[str, Any]] | None,
        progress: dict[str, Any],
    ) -> None:
        """Keep a checkpoint: its blob, then its row (with the epoch's event, and the job's
        progress when it ends an epoch) in one transaction, then drop the checkpoints it
        supersedes. A worker that lost the job drops its own blob instead and marks `lost`."""
        job, blobs = self.job, self.storage.blobs
        key = f"jobs/{job.org_id}/{job.id}/{new_id('checkpoint')}.safetensors"
        info = blobs.put(job.org_id, key, [data])
        with self.storage.db.write() as conn:
            superseded = repo.add_checkpoint(
                conn,
                job_id=job.id,
                worker=self.token,
                epoch=epoch,
                step=step,
                metrics=metrics,
                blob_key=key,
                size=info.size,
                event=event,
            )
            if superseded is not None and metrics is not None:
                repo.set_progress(conn, job_id=job.id, worker=self.token, **progress)
        for old in superseded if superseded is not None else [key]:
            blobs.delete(old)
        if superseded is None:
            self.lost = True

    def requeue(self, message: str) -> None:
        with self.storage.db.write() as conn:
            if repo.requeue(conn, job_id=self.job.id, worker=self.token):
                repo.add_event(conn, job_id=self.job.id, message=message)

    def finish(self, status: JobStatus, message: str, **values: Any) -> bool:
        with self.storage.db.write() as conn:
            done = repo.transition(
                conn,
                job_id=self.job.id,
                expected=[JobStatus.RUNNING],
                status=status,
                held_by=self.token,
                **values,
            )
            if done:
                level = "error" if status is JobStatus.FAILED else "info"
                repo.add_event(conn, job_id=self.job.id, message=message, level=level)
                keys = (
                    repo.drop_checkpoint_blobs(conn, job_id=self.job.id) if status.finished else []
                )
        if done:
            for key in keys:
                self.storage.blobs.delete(key)
        return done


def _holds(conn: Any, job_id: str, token: str) -> bool:
    job = repo.get_job_any(conn, job_id=job_id)
    return job is not None and job.worker == token and job.status is JobStatus.RUNNING


JobBody = Callable[[Settings, Storage, JobLease], None]


def run_job(
    settings: Settings, job_id: str, token: str, body: JobBody, *, shutdown: threading.Event
) -> None:
    """Hold the job through its lease and run `body`; any failure ends the job as failed, with
    an API error's message as is and anything else as an internal error (logged)."""
    storage = Storage.open(settings, migrate=False)
    try:
        with storage.db.read() as conn:
            job = repo.get_job_any(conn, job_id=job_id)
        if job is None or job.worker != token or job.status is not JobStatus.RUNNING:
            return  # taken back before this process started
        torch.set_num_threads(settings.training_threads)
        with JobLease(storage, job, token, shutdown) as lease:
            try:
                body(settings, storage, lease)
            except ApiError as exc:
                lease.finish(
                    JobStatus.FAILED,
                    f"The job failed: {exc.message}",
                    error=json.dumps(
                        {
                            "code": exc.code or "invalid_request",
                            "message": exc.message,
                            "param": exc.param,
                        }
                    ),
                )
            except Exception:
                log.exception("job %s failed", job_id)
                message = "The job failed with an internal error; the operator's logs have details."
                lease.finish(
                    JobStatus.FAILED,
                    message,
                    error=json.dumps({"code": "internal_error", "message": message, "param": None}),
                )
    finally:
        storage.close()
