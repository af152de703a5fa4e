"""`aiaas privacy show|set|reset`: an organisation's privacy policy (org admin key)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from aiaas.cli.remote import ApiKey, AsJson, BaseUrl, checked, client

privacy_app = typer.Typer(help="Privacy policies: de-identify prompts, inputs and uploads.",
                          no_args_is_help=True)  # fmt: skip

MODES = ("off", "detect", "redact", "block")
ENTRY_POINTS = ("chat", "completions", "embeddings", "predictions")

OrgArg = Annotated[str, typer.Argument(help="The organisation id.")]
ProjectOpt = Annotated[
    str | None, typer.Option("--project", help="A project's own policy instead.")
]
ModeOpt = Annotated[str, typer.Option(help=f"One of {', '.join(MODES)}.")]


def _path(org_id: str) -> str:
    return f"/v1/organizations/{org_id}/privacy_policy"


def _params(project: str | None) -> dict[str, str]:
    return {"project_id": project} if project else {}


def _print(policy: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(policy))
        return
    scope = f"project {policy['project_id']}" if policy["project_id"] else "organisation"
    typer.echo(f"{policy['organization_id']} ({scope}){'' if policy['is_set'] else ': not set'}")
    for name in ENTRY_POINTS:
        typer.echo(f"  {name:<12} {policy[name]}")
    for purpose, mode in policy["files"].items():
        typer.echo(f"  files/{purpose:<6} {mode}")
    typer.echo(f"  entities     {', '.join(policy['entities'])}")
    typer.echo(f"  pseudonymise {str(policy['pseudonymise']).lower()}")


@privacy_app.command("show")
def show(
    org_id: OrgArg,
    project: ProjectOpt = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """The policy of an organisation (or of one of its projects)."""
    with client(base_url, api_key) as http:
        _print(checked(http.get(_path(org_id), params=_params(project))), as_json)


@privacy_app.command("set")
def set_policy(
    org_id: OrgArg,
    chat: ModeOpt = "off",
    completions: ModeOpt = "off",
    embeddings: ModeOpt = "off",
    predictions: ModeOpt = "off",
    file: Annotated[
        list[str] | None,
        typer.Option(help="PURPOSE=MODE for uploaded files, e.g. fine-tune=redact (repeatable)."),
    ] = None,
    entities: Annotated[
        str | None, typer.Option(help="Comma-separated entity types (default: all).")
    ] = None,
    pseudonymise: Annotated[
        bool, typer.Option(help="Consistent per-request pseudonyms instead of <TYPE>.")
    ] = False,
    project: ProjectOpt = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Replace the policy (entry points not named are off)."""
    body: dict[str, Any] = {
        "chat": chat,
        "completions": completions,
        "embeddings": embeddings,
        "predictions": predictions,
        "pseudonymise": pseudonymise,
    }
    files: dict[str, str] = {}
    for item in file or []:
        purpose, sep, mode = item.partition("=")
        if not sep:
            raise typer.BadParameter("expected PURPOSE=MODE", param_hint="--file")
        files[purpose] = mode
    body["files"] = files
    if entities is not None:
        body["entities"] = [e.strip() for e in entities.split(",") if e.strip()]
    with client(base_url, api_key) as http:
        _print(checked(http.post(_path(org_id), json=body, params=_params(project))), as_json)


@privacy_app.command("reset")
def reset(
    org_id: OrgArg,
    project: ProjectOpt = None,
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Remove the policy at that level (back to the organisation's, or to off)."""
    with client(base_url, api_key) as http:
        _print(checked(http.delete(_path(org_id), params=_params(project))), as_json)
