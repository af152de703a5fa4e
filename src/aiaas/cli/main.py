"""The `aiaas` command line: run the server and administer the platform.

Administrative commands open the same database and keys as the server (same `AIAAS_*`
settings), so they work while the server runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from aiaas.cli.data import datasets_app, files_app
from aiaas.cli.explain import explain
from aiaas.cli.grants import catalog, grants_app
from aiaas.cli.models import deploy, deployments_app, export, models_app
from aiaas.cli.optimise import optimise_app
from aiaas.cli.privacy import privacy_app
from aiaas.cli.training import jobs_app, train
from aiaas.cli.usage import usage
from aiaas.domain import Actor
from aiaas.errors import ApiError
from aiaas.settings import Settings

if TYPE_CHECKING:
    from aiaas.platform import Platform

app = typer.Typer(help="aiaas: AI models as a service.", no_args_is_help=True)
org_app = typer.Typer(help="Organisations.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log.", no_args_is_help=True)
app.add_typer(org_app, name="org")
app.add_typer(audit_app, name="audit")
app.add_typer(files_app, name="files")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
app.command()(train)
app.add_typer(models_app, name="models")
app.add_typer(deployments_app, name="deployments")
app.command()(deploy)
app.command()(usage)
app.add_typer(optimise_app, name="optimise")
app.command()(export)
app.command()(explain)
app.add_typer(grants_app, name="grants")
app.add_typer(privacy_app, name="privacy")
app.command()(catalog)

_CLI_ACTOR = Actor(type="cli")


# llama.cpp's OpenMP workers sleep after ~300k spins by default, which is shorter than the
# Python work between two decode steps, so every step paid a wake-up. Spinning a little longer
# (tens of ms, then sleeping) measured +5-13% tok/s at 8-16 streams (bench/RESULTS.md), and an
# idle server still sleeps. libgomp reads this once, when it loads: before llama_cpp is imported.
_OPENMP_SPIN = {"GOMP_SPINCOUNT": "20000000"}


@contextmanager
def _platform() -> Iterator[Platform]:
    from aiaas.platform import Platform

    platform = Platform.open(Settings())
    try:
        yield platform
    finally:
        platform.close()


def _fail(console: Console, error: ApiError) -> None:
    console.print(f"[red]error:[/red] {error.message}")
    raise typer.Exit(code=1)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (AIAAS_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (AIAAS_PORT).")] = None,
) -> None:
    """Run the API server."""
    for name, value in _OPENMP_SPIN.items():
        os.environ.setdefault(name, value)
    import uvicorn

    from aiaas.app import create_app
    from aiaas.observability.logs import configure_logging, logging_config

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=logging_config(settings.log_level),
        access_log=False,
        timeout_graceful_shutdown=10,
    )


@org_app.command("create")
def org_create(
    name: Annotated[str, typer.Argument(help="The organisation's unique name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create an organisation with a default project and an org-admin key (shown once)."""
    console = Console()
    from pydantic import ValidationError

    from aiaas.protocol.platform import OrganizationCreate

    try:
        OrganizationCreate(name=name)
    except ValidationError as exc:
        console.print(f"[red]error:[/red] invalid name: {exc.errors()[0]['msg']}")
        raise typer.Exit(code=2) from exc
    with _platform() as platform:
        try:
            created = platform.tenancy.create_org(name=name, actor=_CLI_ACTOR)
        except ApiError as exc:
            _fail(console, exc)
            return
    payload = {
        "id": created.org.id,
        "name": created.org.name,
        "project_id": created.project.id,
        "api_key": created.admin_key.secret,
    }
    if as_json:
        typer.echo(json.dumps(payload))
        return
    console.print(f"Created organisation [bold]{name}[/bold] ({created.org.id})")
    console.print(f"Default project: {created.project.id}")
    console.print(f"Org-admin API key (shown once): [bold]{created.admin_key.secret}[/bold]")


@org_app.command("list")
def org_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List every organisation."""
    from aiaas.domain import Principal, Scope

    operator = Principal(
        key_id="cli", org_id=None, project_id=None, scopes=frozenset({Scope.PLATFORM_ADMIN})
    )
    with _platform() as platform:
        orgs, after = [], None
        while True:
            page = platform.tenancy.list_orgs(operator, after=after, limit=100)
            orgs.extend(page.items)
            if not page.has_more:
                break
            after = page.items[-1].id
    if as_json:
        typer.echo(
            json.dumps(
                [{"id": o.id, "name": o.name, "created_at": int(o.created_at)} for o in orgs]
            )
        )
        return
    table = Table("id", "name")
    for org in orgs:
        table.add_row(org.id, org.name)
    Console().print(table)


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the audit log's hash chain; exit 1 if any event was changed or removed."""
    console = Console()
    with _platform() as platform:
        report = platform.audit.verify()
    if report.ok:
        console.print(f"audit chain OK: {report.events} events verified")
        return
    console.print(
        f"[red]audit chain BROKEN at event {report.broken_at_seq}:[/red] {report.reason} "
        f"({report.events} events verified before it)"
    )
    raise typer.Exit(code=1)


def main() -> None:
    app()
