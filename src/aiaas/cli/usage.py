"""`aiaas usage`: the organisation's metered usage per day, by model (and project)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from aiaas.cli.remote import ApiKey, AsJson, BaseUrl, cells, checked, client

GROUPS = ("model", "project_id", "api_key_id", "endpoint")


def usage(
    days: Annotated[int, typer.Option(min=1, max=31, help="Days back, today included.")] = 7,
    group_by: Annotated[
        str, typer.Option(help=f"Comma-separated: {', '.join(GROUPS)}.")
    ] = "model,project_id",
    hourly: Annotated[bool, typer.Option(help="Hourly buckets (at most 7 days).")] = False,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Requests, tokens and items per day (or hour), like OpenAI's usage page. Needs an org
    admin key (the operator adds the OpenAI-Organization header through the API)."""
    groups = [g.strip() for g in group_by.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise typer.BadParameter(f"cannot group by {unknown[0]!r}", param_hint="--group-by")
    if hourly and days > 7:
        raise typer.BadParameter("hourly usage goes back at most 7 days", param_hint="--days")
    width = 3600 if hourly else 86400
    now = int(time.time())
    start = (now // 86400 - (days - 1)) * 86400
    params: dict[str, object] = {
        "start_time": start,
        "bucket_width": "1h" if hourly else "1d",
        "group_by": groups,
        "limit": -(-(now - start) // width),
    }
    with client(base_url, api_key) as http:
        page = checked(http.get("/v1/usage", params=params))
    if as_json:
        typer.echo(json.dumps(page))
        return
    table = Table(
        "hour" if hourly else "day",
        *groups,
        "requests",
        "input tokens",
        "output tokens",
        "items",
        "errors",
    )
    shape = "%Y-%m-%d %H:00" if hourly else "%Y-%m-%d"
    totals = [0, 0, 0, 0, 0]
    for bucket in page["data"]:
        when = datetime.fromtimestamp(bucket["start_time"], UTC).strftime(shape)
        for result in bucket["results"]:
            numbers = [
                result["num_model_requests"],
                result["input_tokens"],
                result["output_tokens"],
                result["input_items"],
                result["num_errors"],
            ]
            totals = [a + b for a, b in zip(totals, numbers, strict=True)]
            table.add_row(*cells(when, *(result[g] for g in groups), *numbers))
    table.add_row(*cells("total", *("" for _ in groups), *totals))
    Console(soft_wrap=True).print(table)
