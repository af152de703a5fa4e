"""`aiaas train` and `aiaas jobs`: start a training job, follow it (see `follow.py`), and
manage jobs."""

from __future__ import annotations

import json
import time
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from aiaas.cli.follow import (
    JOBS_PATH,
    BarView,
    Event,
    JobState,
    LineView,
    Readout,
    duration,
    event_line,
    follow,
)
from aiaas.cli.remote import ApiKey, AsJson, BaseUrl, checked, client

jobs_app = typer.Typer(
    help="Training jobs (the OpenAI fine-tuning jobs API).", no_args_is_help=True
)

_JOBS = JOBS_PATH
_STATUS_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}


class TaskName(StrEnum):
    classification = "classification"
    regression = "regression"


def train(
    dataset_version: Annotated[
        str, typer.Argument(help="A dataset version id (dsv_...), or a dataset id (ds_...).")
    ],
    model: Annotated[
        str, typer.Option(help="mlp, cnn, lstm, transformer-encoder or all-minilm-l6-v2.")
    ],
    target: Annotated[str | None, typer.Option(help="The column to predict.")] = None,
    task: Annotated[TaskName | None, typer.Option(help="Default: the dataset's task.")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Training epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Rows per step.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="The optimiser's rate.")] = None,
    early_stopping: Annotated[
        int | None, typer.Option(min=1, help="Stop after N epochs without a better val loss.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the training run.")] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the fine-tuned model's name.")] = None,
    detach: Annotated[bool, typer.Option(help="Start the job and return at once.")] = False,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Train a model on a dataset version and follow the job until it ends."""
    hyper = {"n_epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate}
    hyper["early_stopping_patience"] = early_stopping
    optional = {"target_column": target, "task": task.value if task else None}
    optional |= {"seed": seed, "suffix": suffix}
    optional["hyperparameters"] = {k: v for k, v in hyper.items() if v is not None} or None
    body = {"model": model, "training_file": dataset_version}
    body |= {k: v for k, v in optional.items() if v is not None}
    out = Console()
    with client(base_url, api_key) as http:
        job = JobState.parse(checked(http.post(_JOBS, json=body)))
        if detach:
            _print_job_line(out, job, as_json)
            return
        try:  # from here on, Ctrl-C leaves a job running: say how to stop it
            job = _follow_with_view(http, job, Console(stderr=as_json))  # stdout: the JSON
        except KeyboardInterrupt:
            Console(stderr=True).print(
                f"\ninterrupted: the job keeps running; `aiaas jobs cancel {job.id}` stops it",
                soft_wrap=True,
                highlight=False,
            )
            raise typer.Exit(code=130) from None
        _report_end(http, job, out, as_json)


def _follow_with_view(http: httpx.Client, job: JobState, console: Console) -> JobState:
    console.print(
        f"Job {job.id}: {job.model} on {job.raw['training_file']} ({job.n_epochs} epochs)",
        soft_wrap=True,
        highlight=False,
    )
    readout, last = Readout(), None
    view = BarView(console) if console.is_terminal else LineView(console)
    with view:
        for update in follow(http, job.id):
            readout.add(update)
            view.show(update, readout)
            last = update.job
    assert last is not None  # follow yields at least once
    return last


def _report_end(http: httpx.Client, job: JobState, out: Console, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(job.raw))
    elif job.status == "succeeded":
        _print_result(http, job, out)
    elif job.status == "failed":
        out.print(Text.assemble(("failed: ", "red"), job.error or "no error was reported"))
    elif job.status == "paused":
        out.print(f"paused: `aiaas jobs resume {job.id}` queues it again", highlight=False)
    else:
        out.print(f"{job.status}", highlight=False)
    if job.status != "succeeded":
        raise typer.Exit(code=1)


def _print_result(http: httpx.Client, job: JobState, out: Console) -> None:
    """The model's name, and the headline metrics of the version the job registered."""
    assert job.fine_tuned_model is not None
    version = _registered_version(http, job.fine_tuned_model, job.model_version_id)
    number = f" (version {version['version']})" if version else ""
    out.print(Text(f"fine-tuned model: {job.fine_tuned_model}{number}"), soft_wrap=True)
    if version is None:
        return
    metrics = version.get("metrics") or {}
    headline = metrics.get("summary") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in headline.items() if isinstance(v, int | float))
    if shown:
        out.print(f"{metrics.get('evaluated_on', 'test')} metrics: {shown}", highlight=False)


def _registered_version(
    http: httpx.Client, model: str, version_id: str | None
) -> dict[str, Any] | None:
    # The job has succeeded whatever happens here, so a failed lookup only loses the metrics.
    response = http.get(f"/v1/models/{quote(model, safe=':')}/versions", params={"limit": 100})
    if not response.is_success:
        return None
    versions: list[dict[str, Any]] = response.json()["data"]
    return next((v for v in versions if v["id"] == version_id), None)


def _print_job_line(out: Console, job: JobState, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(job.raw))
    else:
        out.print(f"{job.id}  {job.status}", highlight=False)


def _status(status: str) -> Text:
    return Text(status, style=_STATUS_STYLE.get(status, ""))


def _progress_cell(job: JobState) -> str:
    return f"{job.epoch}/{job.n_epochs}" if job.n_epochs else "-"


def _created(raw: dict[str, Any]) -> str:
    return datetime.fromtimestamp(raw["created_at"]).strftime("%Y-%m-%d %H:%M")


JobIdArg = Annotated[str, typer.Argument(help="A fine-tuning job id (ftjob-...).")]


@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option(min=1, max=100, help="How many, newest first.")] = 20,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """List the organisation's training jobs, newest first."""
    with client(base_url, api_key) as http:
        data = checked(http.get(_JOBS, params={"limit": limit}))["data"]
    if as_json:
        typer.echo(json.dumps(data))
        return
    table = Table("id", "model", "status", "epoch", "fine-tuned model", "created")
    table.columns[0].no_wrap = table.columns[5].no_wrap = True
    for job in map(JobState.parse, data):
        fine_tuned = Text(job.fine_tuned_model or "-", overflow="fold")
        table.add_row(
            job.id, Text(job.model), _status(job.status), _progress_cell(job), fine_tuned,
            _created(job.raw),
        )  # fmt: skip
    console = Console()
    # On a terminal the table fits its width; in a pipe each row stays on one line, for grep.
    (console if console.is_terminal else Console(width=250)).print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: JobIdArg,
    events: Annotated[int, typer.Option(min=1, max=100, help="Recent events to show.")] = 10,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """A job's state, settings and recent events (`--json`: the job object)."""
    with client(base_url, api_key) as http:
        job = JobState.parse(checked(http.get(f"{_JOBS}/{job_id}")))
        recent = checked(http.get(f"{_JOBS}/{job_id}/events", params={"limit": events}))["data"]
    if as_json:
        typer.echo(json.dumps(job.raw))
        return
    console, raw = Console(), job.raw
    console.print(Text.assemble((job.id, "bold"), "  ", _status(job.status)), soft_wrap=True)
    eta = raw["estimated_finish"] and duration(max(0, raw["estimated_finish"] - time.time()))
    lines = [
        f"model: {job.model} -> {job.fine_tuned_model or '(not yet trained)'}",
        f"data: {raw['training_file']}, {raw['task']} of {raw['target_column']!r}",
        f"epoch: {_progress_cell(job)}" + (f", ETA {eta}" if eta else ""),
        "hyperparameters: "
        + ", ".join(f"{k} {v}" for k, v in raw["hyperparameters"].items() if v is not None),
        f"created: {_created(raw)}",
    ]
    if job.error:
        lines.append(f"error: {job.error}")
    for line in lines:
        console.print(Text(line), soft_wrap=True)
    console.print(Text("recent events:", style="bold"))
    for event in reversed([Event.parse(e) for e in recent]):
        console.print(event_line(event), soft_wrap=True)


@jobs_app.command("events")
def jobs_events(
    job_id: JobIdArg,
    limit: Annotated[int, typer.Option(min=1, max=100, help="How many, the newest.")] = 20,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """A job's newest events, printed oldest first."""
    with client(base_url, api_key) as http:
        data = checked(http.get(f"{_JOBS}/{job_id}/events", params={"limit": limit}))["data"]
    if as_json:
        typer.echo(json.dumps(data))
        return
    console = Console()
    for event in reversed([Event.parse(e) for e in data]):
        console.print(event_line(event), soft_wrap=True)


def _control(
    verb: str, job_id: str, base_url: str | None, api_key: str | None, as_json: bool
) -> None:
    with client(base_url, api_key) as http:
        job = JobState.parse(checked(http.post(f"{_JOBS}/{job_id}/{verb}")))
    if as_json:
        typer.echo(json.dumps(job.raw))
        return
    console = Console()
    console.print(Text.assemble(job.id, "  ", _status(job.status)), soft_wrap=True)
    if job.status == "running":  # the worker had not acted within the server's wait
        console.print(f"{verb} requested; the worker acts on it at its next step", highlight=False)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: JobIdArg, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Cancel a job: it stops and registers no model."""
    _control("cancel", job_id, base_url, api_key, as_json)


@jobs_app.command("pause")
def jobs_pause(
    job_id: JobIdArg, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Pause a job: a running one checkpoints and stops."""
    _control("pause", job_id, base_url, api_key, as_json)


@jobs_app.command("resume")
def jobs_resume(
    job_id: JobIdArg, base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Queue a paused job again; it continues from its last checkpoint."""
    _control("resume", job_id, base_url, api_key, as_json)
