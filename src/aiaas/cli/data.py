"""`aiaas files` and `aiaas datasets`: upload with a progress bar, make and inspect datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from aiaas.cli.remote import ApiKey, AsJson, BaseUrl, cells, checked, client

files_app = typer.Typer(help="Files (the OpenAI Files API).", no_args_is_help=True)
datasets_app = typer.Typer(help="Datasets: versioned tables made from files.", no_args_is_help=True)

_PURPOSES = ("fine-tune", "batch", "dataset", "user_data")


def upload_progress(*, disable: bool = False) -> Progress:
    """The progress display of an upload, on stderr (files, model imports)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=Console(stderr=True), disable=disable)


class ProgressReader:
    """A read-only file that advances a progress bar as the HTTP client reads it."""

    def __init__(self, file: BinaryIO, progress: Progress, task: TaskID) -> None:
        self._file = file
        self._progress = progress
        self._task = task

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._progress.advance(self._task, len(chunk))
        return chunk

    def __iter__(self) -> Any:
        while chunk := self.read(64 * 1024):
            yield chunk


@files_app.command("upload")
def files_upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    purpose: Annotated[str, typer.Option(help=f"One of {', '.join(_PURPOSES)}.")] = "dataset",
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Upload a file, streaming it with a progress bar; prints the new file's id."""
    if purpose not in _PURPOSES:
        raise typer.BadParameter(f"purpose must be one of {', '.join(_PURPOSES)}")
    size = path.stat().st_size
    with (
        client(base_url, api_key) as http,
        path.open("rb") as file,
        upload_progress(disable=as_json) as progress,
    ):
        task = progress.add_task(f"uploading {path.name}", total=size)
        reader = ProgressReader(file, progress, task)
        body = checked(
            http.post(
                "/v1/files",
                data={"purpose": purpose},
                files={"file": (path.name, reader, "application/octet-stream")},
            )
        )
    if as_json:
        typer.echo(json.dumps(body))
        return
    Console().print(
        Text(f"{body['id']}  {body['filename']}  {body['bytes']} bytes  ({body['purpose']})")
    )


@files_app.command("list")
def files_list(
    purpose: Annotated[str | None, typer.Option(help="Only files of this purpose.")] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """List the organisation's files, newest first."""
    params = {"purpose": purpose} if purpose else {}
    with client(base_url, api_key) as http:
        files = checked(http.get("/v1/files", params=params))["data"]
    if as_json:
        typer.echo(json.dumps(files))
        return
    table = Table("id", "filename", "purpose", "bytes")
    for f in files:
        table.add_row(*cells(f["id"], f["filename"], f["purpose"], str(f["bytes"])))
    Console().print(table)


@datasets_app.command("create")
def datasets_create(
    name: Annotated[str, typer.Argument(help="A name, unique in the organisation.")],
    file_ids: Annotated[list[str], typer.Option("--file", help="A file id (repeat for more).")],
    label: Annotated[str | None, typer.Option(help="The label column.")] = None,
    task: Annotated[str | None, typer.Option(help="classification or regression.")] = None,
    redact_pii: Annotated[
        bool | None, typer.Option("--redact-pii/--no-redact-pii", help="Redact personal data.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the train/validation/test split.")
    ] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Make a dataset (version 1) from uploaded files."""
    body: dict[str, Any] = {"name": name, "file_ids": file_ids}
    for key, value in (("label_column", label), ("task", task), ("redact_pii", redact_pii)):
        if value is not None:
            body[key] = value
    if seed is not None:
        body["split"] = {"seed": seed}
    with client(base_url, api_key) as http:
        dataset = checked(http.post("/v1/datasets", json=body))
    if as_json:
        typer.echo(json.dumps(dataset))
        return
    _show(dataset, dataset["version"])


@datasets_app.command("list")
def datasets_list(
    base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """List the organisation's datasets."""
    with client(base_url, api_key) as http:
        datasets = checked(http.get("/v1/datasets", params={"limit": 100}))["data"]
    if as_json:
        typer.echo(json.dumps(datasets))
        return
    table = Table("id", "name", "latest version", "description")
    for d in datasets:
        table.add_row(*cells(d["id"], d["name"], str(d["latest_version"]), d["description"]))
    Console().print(table)


@datasets_app.command("show")
def datasets_show(
    dataset_id: Annotated[str, typer.Argument(help="A dataset id.")],
    version: Annotated[int | None, typer.Option(help="Default: the latest version.")] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """A dataset version's schema, splits, class balance and PII report."""
    with client(base_url, api_key) as http:
        dataset = checked(http.get(f"/v1/datasets/{dataset_id}"))
        number = version or dataset["latest_version"]
        found = checked(http.get(f"/v1/datasets/{dataset_id}/versions/{number}"))
    if as_json:
        typer.echo(json.dumps(found))
        return
    _show(dataset, found)


def _show(dataset: dict[str, Any], version: dict[str, Any]) -> None:
    console = Console()
    console.print(
        f"[bold]{escape(dataset['name'])}[/bold] ({dataset['id']}) version {version['version']}: "
        f"{version['rows']} rows, {version['format']}, {version['content_hash']}"
    )
    console.print(
        Text(
            f"label: {version['label_column']}  task: {version['task']}  "
            f"splits: {version['splits']}"
        )
    )
    table = Table("column", "type", "missing", "unique")
    for column in version["columns"]:
        table.add_row(
            *cells(column["name"], column["type"], str(column["missing"]), str(column["unique"]))
        )
    console.print(table)
    if version["class_balance"]:
        console.print(Text(f"class balance: {version['class_balance']}"))
    if version["pii"]:
        found = {c["column"]: c["counts"] for c in version["pii"]["columns"] if c["counts"]}
        console.print(Text(f"PII redacted: {found or 'none found'}"))
