"""`aiaas explain`: why a deployed model predicts what it does, for the records of a file.

Tables (CSV, JSON Lines, a JSON list) and texts (a .txt file, one per line) print a table of
attributions; images (PNG, JPEG, ...) write heatmaps to lay over them. A request large enough to
run as a job is followed to its end and its result file read back.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.status import Status
from rich.table import Table

from aiaas.cli.remote import ApiKey, AsJson, BaseUrl, cells, checked, client

PATH = "/v1/explanations"
POLL_S = 0.5
FINISHED = frozenset({"succeeded", "failed", "cancelled", "paused"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
METHODS = (
    "integrated_gradients",
    "shapley_sampling",
    "kernel_shap",
    "occlusion",
    "attention",
    "feature_ablation",
)


def explain(
    model: Annotated[str, typer.Argument(help="A deployment (or name@version, name@alias).")],
    inputs: Annotated[
        list[Path],
        typer.Option(
            "--input",
            "-i",
            help="Records (.csv, .jsonl, .json), texts (.txt, one per line) or images "
            "(repeat for several).",
            exists=True,
            dir_okay=False,
        ),
    ],
    method: Annotated[
        str, typer.Option("--method", "-m", help=f"One of: {', '.join(METHODS)}.")
    ] = "integrated_gradients",
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option", "-o", help="A method option, KEY=VALUE (e.g. n_steps=64); repeat."
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Where heatmaps (and a job's result file) go.")
    ] = Path("."),
    top: Annotated[int, typer.Option(help="Tokens shown per text.")] = 5,
    detach: Annotated[bool, typer.Option(help="A job: queue it and return at once.")] = False,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Explain a deployed model's predictions for the records in a file."""
    body: dict[str, Any] = {"model": model, "method": method, "options": _options(option)}
    names = _read_inputs(inputs, body)
    with client(base_url, api_key) as http:
        response = http.post(PATH, json=body)
        answer = checked(response)
        if response.status_code == 202:
            if detach:
                _print_job(answer, as_json)
                return
            answer = _follow(http, answer, out)
            if answer is None:
                raise typer.Exit(code=1)
    if as_json:
        typer.echo(json.dumps(answer))
        return
    _show(answer, names, out, top)


def _options(given: list[str] | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for text in given or []:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{text!r}: options are KEY=VALUE", param_hint="--option")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _read_inputs(paths: list[Path], body: dict[str, Any]) -> list[str]:
    """Fill the request's records, texts or images from the files; the inputs' names (image
    files' stems, for their heatmaps)."""
    if all(p.suffix.lower() in IMAGE_SUFFIXES for p in paths):
        body["images"] = [base64.b64encode(p.read_bytes()).decode() for p in paths]
        return [p.stem for p in paths]
    if len(paths) != 1:
        raise typer.BadParameter("give one table or text file, or image files", param_hint="-i")
    path = paths[0]
    suffix = path.suffix.lower()
    if suffix == ".txt":
        body["texts"] = [line for line in path.read_text(encoding="utf-8").splitlines() if line]
        return [str(i) for i in range(len(body["texts"]))]
    if suffix == ".csv":
        import pandas as pd

        frame = pd.read_csv(path)
        records = json.loads(frame.to_json(orient="records"))
    elif suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    elif suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
    else:
        raise typer.BadParameter(
            f"{path}: use .csv, .jsonl, .json, .txt or images", param_hint="-i"
        )
    body["records"] = records
    return [str(i) for i in range(len(records))]


def _follow(http: httpx.Client, job: dict[str, Any], out: Path) -> dict[str, Any] | None:
    """Wait for a job; its items as an answer (its file saved under `out`), or None."""
    console = Console(stderr=True)
    with Status("", console=console) as status:
        while job["status"] not in FINISHED:
            status.update(f"{job['id']}: {job['status']} ({job['records']} records)")
            time.sleep(POLL_S)
            job = checked(http.get(f"{PATH}/jobs/{job['id']}"))
    if job["status"] != "succeeded":
        error = (job.get("error") or {}).get("message", job["status"])
        console.print(f"[red]job {job['id']} {job['status']}:[/red] {error}", markup=True)
        return None
    content = http.get(f"/v1/files/{job['result_file_id']}/content")
    if not content.is_success:
        checked(content)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / f"{job['id']}.jsonl"
    saved.write_bytes(content.content)
    console.print(f"result saved to {saved}")
    items = [json.loads(line) for line in content.text.splitlines() if line.strip()]
    return {"model": job["model"], "method": job["method"], "data": items}


def _print_job(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(job))
        return
    typer.echo(f"{job['id']}: {job['status']} ({job['records']} records, {job['method']})")


def _prediction(item: dict[str, Any]) -> str:
    predicted = item["prediction"]
    if predicted.get("label") is not None:
        return str(predicted["label"])
    value = predicted.get("value")
    return "" if value is None else f"{value:.4g}"


def _show(answer: dict[str, Any], names: list[str], out: Path, top: int) -> None:
    items = answer["data"]
    console = Console(soft_wrap=True)
    if items and items[0].get("image") is not None:
        out.mkdir(parents=True, exist_ok=True)
        table = Table("input", "prediction", "explained", "heatmap")
        for item in items:
            name = names[item["index"]] if item["index"] < len(names) else str(item["index"])
            path = out / f"{name}.heatmap.png"
            path.write_bytes(base64.b64decode(item["image"]["heatmap_png"]))
            table.add_row(*cells(name, _prediction(item), item.get("target"), path))
        console.print(table)
        return
    if items and item_tokens(items[0]) is not None:
        table = Table("#", "prediction", "explained", f"strongest tokens (top {top})")
        for item in items:
            tokens = sorted(item_tokens(item) or [], key=lambda t: -abs(t["attribution"] or 0))
            shown = ", ".join(f"{t['token']} {t['attribution']:+.3g}" for t in tokens[:top])
            table.add_row(*cells(item["index"], _prediction(item), item.get("target"), shown))
        console.print(table)
        return
    strength: dict[str, float] = {}
    for item in items:
        for column in item.get("columns") or []:
            strength[column["column"]] = strength.get(column["column"], 0.0) + abs(
                column["attribution"] or 0.0
            )
    order = sorted(strength, key=lambda c: -strength[c])  # strongest on average first
    table = Table("#", "prediction", "explained", *order)
    for item in items:
        values = {c["column"]: c["attribution"] for c in item.get("columns") or []}
        shown = [f"{values[c]:+.3g}" if values.get(c) is not None else "" for c in order]
        table.add_row(*cells(item["index"], _prediction(item), item.get("target"), *shown))
    console.print(table)
    console.print(f"{answer.get('method', '')}: each column's effect on the explained output")


def item_tokens(item: dict[str, Any]) -> list[dict[str, Any]] | None:
    tokens: list[dict[str, Any]] | None = item.get("tokens")
    return tokens
