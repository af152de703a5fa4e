"""`aiaas optimise`: make measured variants of a trained model and show how they compare."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.status import Status
from rich.table import Table

from aiaas.cli.remote import ApiKey, AsJson, BaseUrl, cells, checked, client

optimise_app = typer.Typer(
    help="Optimised variants (int8, pruned, graph-optimised) of trained models.",
    no_args_is_help=True,
)
PATH = "/v1/optimisations"
POLL_S = 0.5
FINISHED = frozenset({"succeeded", "failed", "cancelled", "paused"})
METHODS = ("dynamic_int8", "static_int8", "onnx_optimized", "prune")


def _variant(text: str) -> dict[str, Any]:
    """`dynamic_int8`, `static_int8`, `onnx_optimized`, `prune:0.5` or
    `prune:0.5:structured`."""
    method, _, rest = text.partition(":")
    if method not in METHODS:
        raise typer.BadParameter(f"{text!r}: choose from {', '.join(METHODS)}")
    if method != "prune":
        if rest:
            raise typer.BadParameter(f"{method} takes no parameters")
        return {"method": method}
    sparsity, _, kind = rest.partition(":")
    try:
        value = float(sparsity)
    except ValueError:
        raise typer.BadParameter("prune needs a sparsity: prune:0.5") from None
    if kind not in ("", "structured"):
        raise typer.BadParameter(f"{text!r}: prune:SPARSITY[:structured]")
    return {"method": "prune", "sparsity": value, "structured": kind == "structured"}


@optimise_app.command("create")
def optimise_create(
    model: Annotated[str, typer.Argument(help="A trained model's id (ft:...).")],
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            "-v",
            help="dynamic_int8, static_int8, onnx_optimized, prune:SPARSITY[:structured] "
            "(repeat; default: the first three).",
        ),
    ] = None,
    version: Annotated[int | None, typer.Option(help="Default: the latest version.")] = None,
    detach: Annotated[bool, typer.Option(help="Queue it and return at once.")] = False,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Queue an optimisation job, follow it, and print the comparison table."""
    variants = [_variant(v) for v in (variant or ["dynamic_int8", "static_int8", "onnx_optimized"])]
    body: dict[str, Any] = {"model": model, "variants": variants}
    if version is not None:
        body["version"] = version
    with client(base_url, api_key) as http:
        job = checked(http.post(PATH, json=body))
        if not detach:
            job = _follow(http, job)
    _show(job, as_json)
    if job["status"] == "failed":
        raise typer.Exit(code=1)


def _follow(http: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    console = Console(stderr=True)
    with Status("", console=console) as status:
        while job["status"] not in FINISHED:
            done = len((job.get("result") or {}).get("variants", []))
            status.update(f"{job['id']}: {job['status']}, {done}/{len(job['variants'])} variants")
            time.sleep(POLL_S)
            job = checked(http.get(f"{PATH}/{job['id']}"))
    return job


@optimise_app.command("show")
def optimise_show(
    job_id: Annotated[str, typer.Argument(help="An optimisation job id (optjob-...).")],
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """An optimisation job and its comparison table."""
    with client(base_url, api_key) as http:
        job = checked(http.get(f"{PATH}/{job_id}"))
    _show(job, as_json)


@optimise_app.command("list")
def optimise_list(
    base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False
) -> None:
    """Optimisation jobs, newest first."""
    with client(base_url, api_key) as http:
        jobs = checked(http.get(PATH, params={"limit": 100}))["data"]
    if as_json:
        typer.echo(json.dumps(jobs))
        return
    table = Table("id", "model", "version", "status", "variants")
    for job in jobs:
        methods = ", ".join(v["method"] for v in job["variants"])
        table.add_row(*cells(job["id"], job["model"], job["version"], job["status"], methods))
    Console(soft_wrap=True).print(table)


def _show(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(job))
        return
    out = Console(soft_wrap=True)
    if not out.is_terminal:  # a pipe or a file: room for the whole table, never wrapped cells
        out = Console(soft_wrap=True, width=200)
    which = f" version {job['version']}" if job.get("version") else ""
    out.print(f"{job['id']}  {job['model']}{which}: {job['status']}")
    if job.get("error"):
        out.print(f"error: {job['error'].get('message')}", markup=False)
    result = job.get("result")
    if not result:
        return
    parent = result["parent"]
    names = [k for k, v in parent["metrics"].items() if v is not None][:3]
    throughput = "tokens/s" if "throughput_tokens_per_s" in parent else "rows/s @32"
    table = Table("variant", "version", "size", "p50 ms", "p95 ms", throughput, *names, "sparsity")
    table.add_row(*_cells("parent", parent, names))
    for row in result["variants"]:
        label = row["method"]
        if row["method"] == "gguf":
            label = row["params"]["quant_type"]
        if row["method"] == "prune":
            label += f" {row['params']['sparsity']:g}" + (
                " structured" if row["params"].get("structured") else ""
            )
        table.add_row(*_cells(label, row, names))
    out.print(table)
    if result.get("rows"):
        out.print(f"measured on {result['rows']} {result['split']} rows")
    else:
        out.print(f"measured on {result['split']}")


def _cells(label: str, row: dict[str, Any], names: list[str]) -> list[Any]:
    metrics = row["metrics"]
    return cells(
        label,
        row.get("version", ""),
        _size(row["size_bytes"]),
        f"{row['latency_p50_ms']:.3f}",
        f"{row['latency_p95_ms']:.3f}",
        f"{row.get('throughput_rows_per_s') or row.get('throughput_tokens_per_s') or 0:.0f}",
        *(f"{metrics[n]:.4f}" if metrics.get(n) is not None else "" for n in names),
        f"{row['sparsity']:.3f}" if row.get("sparsity") is not None else "",
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
