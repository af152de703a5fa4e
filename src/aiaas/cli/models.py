"""`aiaas models` and `aiaas deploy`: trained models, their versions and aliases, deployments."""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from aiaas.cli.data import ProgressReader, upload_progress
from aiaas.cli.remote import ApiKey, AsJson, BaseUrl, cells, checked, client

models_app = typer.Typer(
    help="Models: served and trained, versions, aliases.", no_args_is_help=True
)
deployments_app = typer.Typer(help="Deployments of trained models.", no_args_is_help=True)


def _path(model: str) -> str:
    return f"/v1/models/{quote(model, safe=':')}"


@models_app.command("list")
def models_list(base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Every model this key can use: bundled, trained and deployed."""
    with client(base_url, api_key) as http:
        found = checked(http.get("/v1/models"))["data"]
    if as_json:
        typer.echo(json.dumps(found))
        return
    table = Table("id", "owned by", "task", "latest version")
    for model in found:
        table.add_row(
            *cells(model["id"], model["owned_by"], model.get("task"), model.get("latest_version"))
        )
    Console(soft_wrap=True).print(table)


@models_app.command("versions")
def models_versions(
    model: Annotated[str, typer.Argument(help="A trained model's id (ft:...).")],
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """A trained model's versions with their headline test metrics and lineage."""
    with client(base_url, api_key) as http:
        versions = checked(http.get(f"{_path(model)}/versions", params={"limit": 100}))["data"]
        aliases = checked(http.get(f"{_path(model)}/aliases"))["data"]
    if as_json:
        typer.echo(json.dumps({"versions": versions, "aliases": aliases}))
        return
    named: dict[int, list[str]] = {}
    for alias in aliases:
        named.setdefault(alias["version"], []).append(alias["alias"])
    table = Table("version", "aliases", "metrics", "dataset version", "job")
    for version in versions:
        summary = version["metrics"].get("summary") or {}
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if v is not None)
        table.add_row(
            *cells(
                version["version"],
                ", ".join(named.get(version["version"], [])),
                metrics,
                version["dataset_version_id"],
                version["job_id"],
            )
        )
    Console(soft_wrap=True).print(table)


@models_app.command("alias")
def models_alias(
    model: Annotated[str, typer.Argument(help="A trained model's id.")],
    alias: Annotated[str, typer.Argument(help="The alias, e.g. production.")],
    version: Annotated[int, typer.Argument(help="The version it should name.")],
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Point an alias at a version; deployments serving it switch at their next request."""
    with client(base_url, api_key) as http:
        found = checked(
            http.put(f"{_path(model)}/aliases/{quote(alias)}", json={"version": version})
        )
    Console().print(Text(f"{found['model']}: {found['alias']} -> version {found['version']}"))


_FORMATS = ("gguf", "onnx", "sentence-embedding")


@models_app.command("import")
def models_import(
    path: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, readable=True, help="The model file: .gguf or .onnx."
        ),
    ],
    name: Annotated[str, typer.Option(help="The model's name; its id is <name>:<org slug>.")],
    model_format: Annotated[
        str | None,
        typer.Option("--format", help=f"One of {', '.join(_FORMATS)} (default: detected)."),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, readable=True, help="Sentence embedding: tokenizer.json."
        ),
    ] = None,
    signature: Annotated[
        str | None,
        typer.Option(help="ONNX: the signature as JSON, or @file.json."),
    ] = None,
    pooling: Annotated[
        str | None, typer.Option(help="Sentence embedding: mean (default), cls or max.")
    ] = None,
    normalize: Annotated[
        bool | None,
        typer.Option("--normalize/--no-normalize", help="Sentence embedding: unit vectors."),
    ] = None,
    max_seq_length: Annotated[
        int | None, typer.Option(help="Sentence embedding: longer inputs are truncated.")
    ] = None,
    chat_template: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            readable=True,
            help="GGUF: a Jinja chat template file (default: the GGUF's own).",
        ),
    ] = None,
    project: Annotated[str | None, typer.Option(help="The project (default: the key's).")] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Import your own model (GGUF, ONNX with a signature, or an ONNX sentence encoder with its
    tokenizer.json) as a new version of <name>, uploading it with a progress bar."""
    if model_format is not None and model_format not in _FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(_FORMATS)}")
    fields: dict[str, str] = {"name": name}
    if signature is not None:
        fields["signature"] = _json_option(signature, "--signature")
    if chat_template is not None:
        fields["chat_template"] = chat_template.read_text(encoding="utf-8")
    options = {
        "format": model_format,
        "pooling": pooling,
        "max_seq_length": max_seq_length,
        "project_id": project,
        "normalize": None if normalize is None else str(normalize).lower(),
    }
    fields |= {key: str(value) for key, value in options.items() if value is not None}
    uploads = {"file": path, **({"tokenizer": tokenizer} if tokenizer is not None else {})}
    with (
        client(base_url, api_key) as http,
        ExitStack() as stack,
        upload_progress(disable=as_json) as progress,
    ):
        parts = {}
        for part, source in uploads.items():
            task = progress.add_task(f"uploading {source.name}", total=source.stat().st_size)
            reader = ProgressReader(stack.enter_context(source.open("rb")), progress, task)
            parts[part] = (source.name, reader, "application/octet-stream")
        created = checked(http.post("/v1/models/import", data=fields, files=parts))
    if as_json:
        typer.echo(json.dumps(created))
        return
    detected = created["metadata"]
    about = ", ".join(
        f"{key} {detected[key]}"
        for key in ("architecture", "file_type", "context_length", "task", "dimension")
        if detected.get(key) is not None
    )
    line = f"{created['model']}  version {created['version']}  ({created['format']}; {about})"
    Console().print(Text(line))


def _json_option(value: str, option: str) -> str:
    """JSON given inline or as @file, checked here so a typo fails before the upload."""
    text = Path(value[1:]).read_text(encoding="utf-8") if value.startswith("@") else value
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{option} is not valid JSON: {exc}") from exc
    return text


def deploy(
    model: Annotated[str, typer.Argument(help="A trained model's id (ft:...).")],
    version: Annotated[int | None, typer.Option(help="Serve this version.")] = None,
    alias: Annotated[str | None, typer.Option(help="Serve whatever this alias names.")] = None,
    name: Annotated[str | None, typer.Option(help="The served name (default: model id).")] = None,
    canary_version: Annotated[int | None, typer.Option(help="A canary version.")] = None,
    canary_percent: Annotated[float, typer.Option(help="Share of requests it answers.")] = 10.0,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Serve a trained model (its latest version unless --version or --alias says otherwise)."""
    body: dict[str, Any] = {"model": model}
    for key, value in (("version", version), ("alias", alias), ("name", name)):
        if value is not None:
            body[key] = value
    if canary_version is not None:
        body["canary"] = {"version": canary_version, "percent": canary_percent}
    with client(base_url, api_key) as http:
        created = checked(http.post("/v1/deployments", json=body))
    if as_json:
        typer.echo(json.dumps(created))
        return
    target = created["target"]
    what = f"version {target['version']}" if target["version"] else f"alias {target['alias']}"
    line = f"{created['id']}  serving {created['model']} ({what}) as {created['name']}"
    Console().print(Text(line))


_FILENAME = re.compile(r'filename="([A-Za-z0-9._-]+)"')


def export(
    model: Annotated[str, typer.Argument(help="A trained model's id (ft:...).")],
    version: Annotated[int | None, typer.Option(help="The version (default: the latest).")] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where to write the zip (default: ./<name>-v<n>.zip)."),
    ] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Download an edge bundle: the model as a zip that runs with only numpy and onnxruntime."""
    with client(base_url, api_key) as http:
        if version is None:
            version = checked(http.get(_path(model))).get("latest_version")
            if version is None:
                Console(stderr=True).print(Text(f"error: {model} has no registered version"))
                raise typer.Exit(code=1)
        with http.stream("GET", f"{_path(model)}/versions/{version}/bundle") as response:
            if not response.is_success:
                response.read()
                checked(response)
            found = _FILENAME.search(response.headers.get("content-disposition", ""))
            target = output or Path(found.group(1) if found else f"bundle-v{version}.zip")
            written = _download(response, target)
    Console().print(Text(f"{target}  ({written} bytes, {model} version {version})"))


def _download(response: httpx.Response, target: Path) -> int:
    """Stream the body to `target` (via a partial file, so a cut download leaves no zip)."""
    total = int(response.headers.get("content-length", 0)) or None
    partial = target.with_name(f".{target.name}.partial")
    written = 0
    columns = (*Progress.get_default_columns()[:1], BarColumn(), DownloadColumn())
    progress = Progress(*columns, TransferSpeedColumn(), console=Console(stderr=True))
    try:
        with progress, partial.open("wb") as handle:
            task = progress.add_task(f"{target.name}", total=total)
            for chunk in response.iter_bytes():
                handle.write(chunk)
                written += len(chunk)
                progress.update(task, advance=len(chunk))
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return written


@deployments_app.command("list")
def deployments_list(
    base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    with client(base_url, api_key) as http:
        found = checked(http.get("/v1/deployments", params={"limit": 100}))["data"]
    if as_json:
        typer.echo(json.dumps(found))
        return
    table = Table("id", "name", "model", "target", "canary")
    for d in found:
        target = d["target"]["version"] or d["target"]["alias"]
        canary = d["canary"]
        canary_text = (
            f"{canary['version'] or canary['alias']} ({canary['percent']:g}%)" if canary else ""
        )
        table.add_row(*cells(d["id"], d["name"], d["model"], target, canary_text))
    Console(soft_wrap=True).print(table)


@deployments_app.command("delete")
def deployments_delete(
    deployment_id: Annotated[str, typer.Argument(help="A deployment id (dep_...).")],
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
) -> None:
    with client(base_url, api_key) as http:
        checked(http.delete(f"/v1/deployments/{quote(deployment_id)}"))
    Console().print(Text(f"{deployment_id} deleted"))
