"""Following a training job: poll it, collect its new events, render progress.

`follow` asks for the job and its new events every half second and yields what changed until
the job stops. A view renders that: a rich progress bar on a terminal, plain event lines
anywhere else (a pipe, a log file, a test).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from statistics import fmean
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.text import Text

from aiaas.cli.remote import checked

POLL_S = 0.5
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
STOPPED = FINISHED | {"paused"}  # following ends here: a paused job waits for `jobs resume`
JOBS_PATH = "/v1/fine_tuning/jobs"


@dataclass(frozen=True, slots=True)
class JobState:
    """The fields of a job the CLI acts on; `raw` is the API's JSON, printed by `--json`."""

    id: str
    status: str
    model: str
    fine_tuned_model: str | None
    model_version_id: str | None
    epoch: int
    n_epochs: int
    estimated_finish: int | None
    error: str | None
    raw: dict[str, Any]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> JobState:
        progress = body.get("progress") or {}
        return cls(
            id=body["id"],
            status=body["status"],
            model=body["model"],
            fine_tuned_model=body.get("fine_tuned_model"),
            model_version_id=body.get("model_version_id"),
            epoch=int(progress.get("epoch", 0)),
            n_epochs=int(progress.get("n_epochs", 0)),
            estimated_finish=body.get("estimated_finish"),
            error=(body.get("error") or {}).get("message"),
            raw=body,
        )


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    created_at: int
    level: str
    type: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def parse(cls, body: dict[str, Any]) -> Event:
        return cls(
            id=body["id"],
            created_at=int(body["created_at"]),
            level=body.get("level", "info"),
            type=body.get("type", "message"),
            message=body.get("message", ""),
            data=body.get("data"),
        )

    @property
    def epoch_metrics(self) -> dict[str, Any] | None:
        """The data of an end-of-epoch event (the final evaluation is a metrics event too)."""
        if self.type == "metrics" and self.data and "epoch" in self.data:
            return self.data
        return None


@dataclass(frozen=True, slots=True)
class Update:
    """One poll: the job as it is now, and the events since the previous poll, oldest first."""

    job: JobState
    events: list[Event]


def follow(http: httpx.Client, job_id: str, *, poll_s: float = POLL_S) -> Iterator[Update]:
    """Poll a job until it stops (finished or paused), yielding each poll's news."""
    newest: str | None = None
    while True:
        # The job first: a job read as finished has its last events written already.
        job = JobState.parse(checked(http.get(f"{JOBS_PATH}/{job_id}")))
        events = _events_since(http, job_id, newest)
        if events:
            newest = events[-1].id
        yield Update(job, events)
        if job.status in STOPPED:
            return
        time.sleep(poll_s)


def _events_since(http: httpx.Client, job_id: str, newest: str | None) -> list[Event]:
    """The events after `newest` (all of them when None), oldest first."""
    fresh: list[Event] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = checked(http.get(f"{JOBS_PATH}/{job_id}/events", params=params))
        for body in page["data"]:  # newest first
            if body["id"] == newest:
                return fresh[::-1]
            fresh.append(Event.parse(body))
        if not page["has_more"] or not page["data"]:
            return fresh[::-1]
        params["after"] = page["data"][-1]["id"]


@dataclass
class Readout:
    """What the progress display shows, folded from the updates seen so far."""

    status: str = "created"
    epoch: int = 0
    n_epochs: int = 0
    estimated_finish: int | None = None
    last: dict[str, Any] | None = None  # the newest epoch's metrics
    epoch_seconds: list[float] = field(default_factory=list)

    def add(self, update: Update) -> None:
        job = update.job
        self.status, self.estimated_finish = job.status, job.estimated_finish
        self.n_epochs = job.n_epochs or self.n_epochs
        # Events can be ahead of the job's progress, which the worker writes with its heartbeat.
        self.epoch = max(self.epoch, job.epoch)
        for event in update.events:
            if (metrics := event.epoch_metrics) is not None:
                self.last = metrics
                self.epoch = max(self.epoch, int(metrics["epoch"]))
                self.n_epochs = self.n_epochs or int(metrics.get("total_epochs", 0))
                if metrics.get("seconds") is not None:
                    self.epoch_seconds.append(float(metrics["seconds"]))

    def metrics_text(self) -> str:
        if self.last is None:
            return ""
        # Keras's short names: the whole bar fits an 80-column terminal.
        parts = [("loss", "train_loss"), ("val_loss", "valid_loss"), ("val_acc", "valid_accuracy")]
        return "  ".join(
            f"{label} {self.last[key]:.4f}"
            for label, key in parts
            if self.last.get(key) is not None
        )

    def eta_s(self, now: float) -> float | None:
        """From the server's estimate; else from the epochs timed so far."""
        if self.status in STOPPED:
            return None
        if self.estimated_finish is not None:
            return max(0.0, self.estimated_finish - now)
        if self.epoch_seconds and self.n_epochs:
            return fmean(self.epoch_seconds) * max(0, self.n_epochs - self.epoch)
        return None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-:--"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def event_line(event: Event) -> Text:
    stamp = datetime.fromtimestamp(event.created_at).strftime("%H:%M:%S")
    style = {"error": "red", "warn": "yellow", "warning": "yellow"}.get(event.level, "")
    return Text.assemble((f"[{stamp}] ", "dim"), (event.message, style))


class LineView:
    """Plain lines, one per event: for pipes and logs, where a live bar would be noise."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def __enter__(self) -> LineView:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def show(self, update: Update, readout: Readout) -> None:
        for event in update.events:
            self._console.print(event_line(event), soft_wrap=True)


class BarView(LineView):
    """Event lines scrolling above a live bar: epoch i/N, the last losses, the ETA."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self._progress = Progress(
            TextColumn("{task.description}"),  # the status, unless running
            BarColumn(bar_width=12),
            TextColumn("epoch {task.fields[epochs]}"),
            TextColumn("{task.fields[metrics]}"),
            TextColumn("ETA {task.fields[eta]}"),
            console=console,
        )
        fields = {"epochs": "-", "metrics": "", "eta": duration(None)}
        self._task = self._progress.add_task("created", total=None, **fields)

    def __enter__(self) -> BarView:
        self._progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._progress.stop()

    def show(self, update: Update, readout: Readout) -> None:
        for event in update.events:
            self._progress.console.print(event_line(event), soft_wrap=True)
        self._progress.update(
            self._task,
            description="" if readout.status == "running" else readout.status,
            total=readout.n_epochs or None,
            completed=readout.epoch,
            epochs=f"{readout.epoch}/{readout.n_epochs or '?'}",
            metrics=readout.metrics_text(),
            eta=duration(readout.eta_s(time.time())),
        )
