"""`aiaas grants create|list|revoke` and `aiaas catalog`: sharing across organisations."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from aiaas.cli.remote import ApiKey, AsJson, BaseUrl, cells, checked, client

grants_app = typer.Typer(help="Share models, datasets and deployments.", no_args_is_help=True)

KINDS = ("model", "dataset", "deployment")
PERMISSIONS = ("use", "train-on", "read")


def _when(stamp: int | None) -> str:
    if stamp is None:
        return ""
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M")


def _print_grants(grants: list[dict[str, Any]], *, received: bool = False) -> None:
    """One row a grant; the other party is the owner (received) or the grantee (given)."""
    table = Table("id", "owner" if received else "grantee", "object", "version", "permission")
    table.add_column("status")
    table.add_column("expires")
    for g in grants:
        table.add_row(
            *cells(
                g["id"],
                g["organization_id"] if received else g["grantee"],
                f"{g['object_type']} {g['object_id']}",
                g["version"] or "all",
                g["permission"],
                g["status"],
                _when(g["expires_at"]),
            )
        )
    Console(soft_wrap=True).print(table)


@grants_app.command("create")
def create(
    object_type: Annotated[str, typer.Argument(help=f"One of {', '.join(KINDS)}.")],
    object_id: Annotated[str, typer.Argument(help="The model, dataset or deployment id.")],
    grantee: Annotated[str, typer.Argument(help="An organisation id or name, or '*' (public).")],
    permission: Annotated[str, typer.Option(help=f"One of {', '.join(PERMISSIONS)}.")] = "use",
    version: Annotated[int | None, typer.Option(min=1, help="One version only.")] = None,
    max_requests_per_minute: Annotated[int | None, typer.Option(min=1)] = None,
    monthly_tokens: Annotated[int | None, typer.Option(min=1)] = None,
    expires_in_days: Annotated[float | None, typer.Option(min=0.0)] = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Grant one of your organisation's objects to another organisation (org admin key)."""
    if object_type not in KINDS:
        raise typer.BadParameter(f"not one of {', '.join(KINDS)}", param_hint="OBJECT_TYPE")
    if permission not in PERMISSIONS:
        raise typer.BadParameter(f"not one of {', '.join(PERMISSIONS)}", param_hint="--permission")
    body: dict[str, Any] = {
        "grantee": grantee,
        "object_type": object_type,
        "object_id": object_id,
        "permission": permission,
    }
    for name, value in (
        ("version", version),
        ("max_requests_per_minute", max_requests_per_minute),
        ("monthly_tokens", monthly_tokens),
    ):
        if value is not None:
            body[name] = value
    if expires_in_days is not None:
        body["expires_at"] = int(datetime.now(UTC).timestamp() + expires_in_days * 86400)
    with client(base_url, api_key) as http:
        made = checked(http.post("/v1/grants", json=body))
    if as_json:
        typer.echo(json.dumps(made))
    else:
        _print_grants([made])


@grants_app.command("list")
def list_grants(
    received: Annotated[bool, typer.Option(help="Grants made to you, not by you.")] = False,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Your organisation's grants: given (default) or received."""
    params = {"direction": "received" if received else "given", "limit": 100}
    with client(base_url, api_key) as http:
        page = checked(http.get("/v1/grants", params=params))
    if as_json:
        typer.echo(json.dumps(page["data"]))
    else:
        _print_grants(page["data"], received=received)


@grants_app.command("revoke")
def revoke(
    grant_id: Annotated[str, typer.Argument(help="The grant's id.")],
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Revoke a grant; it stops answering on the grantee's next request."""
    with client(base_url, api_key) as http:
        ended = checked(http.delete(f"/v1/grants/{grant_id}"))
    if as_json:
        typer.echo(json.dumps(ended))
    else:
        _print_grants([ended])


def catalog(base_url: BaseUrl = None, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """Models and datasets shared with every organisation."""
    with client(base_url, api_key) as http:
        page = checked(http.get("/v1/catalog", params={"limit": 100}))
    if as_json:
        typer.echo(json.dumps(page["data"]))
        return
    table = Table("id", "type", "object", "version", "permission", "owned by")
    for e in page["data"]:
        table.add_row(
            *cells(
                e["id"],
                e["object_type"],
                e["object_id"],
                e["version"] or "all",
                e["permission"],
                e["owned_by"],
            )
        )
    Console(soft_wrap=True).print(table)
