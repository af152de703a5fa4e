"""Commands that talk to a running server over HTTP, as any API client would.

The base URL and key come from `--base-url`/`--api-key` or `AIAAS_BASE_URL`/`AIAAS_API_KEY`
(falling back to `OPENAI_API_KEY`), so the same shell that drives the `openai` client drives us.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

DEFAULT_BASE_URL = "http://127.0.0.1:8000"

BaseUrl = Annotated[
    str | None,
    typer.Option("--base-url", help="The server (AIAAS_BASE_URL; default 127.0.0.1:8000)."),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key", help="An API key (AIAAS_API_KEY or OPENAI_API_KEY).", show_default=False
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the response as JSON.")]


@contextmanager
def client(base_url: str | None, api_key: str | None) -> Iterator[httpx.Client]:
    url = (base_url or os.environ.get("AIAAS_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    key = api_key or os.environ.get("AIAAS_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if not key:
        Console(stderr=True).print(
            "[red]error:[/red] no API key: pass --api-key or set AIAAS_API_KEY"
        )
        raise typer.Exit(code=2)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(
            base_url=url, headers=headers, timeout=httpx.Timeout(600, connect=10)
        ) as http:
            yield http
    except httpx.TransportError as exc:
        Console(stderr=True).print(
            f"[red]error:[/red] cannot reach {escape(url)}: {escape(str(exc))}", soft_wrap=True
        )
        raise typer.Exit(code=1) from exc


def checked(response: httpx.Response) -> Any:
    """The response's JSON, or exit 1 with the server's error message."""
    if response.is_success:
        return response.json()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text or response.reason_phrase
    # Messages often repeat user input: print them as text, never as rich markup, on one line.
    Console(stderr=True).print(
        f"[red]error ({response.status_code}):[/red] {escape(str(message))}", soft_wrap=True
    )
    raise typer.Exit(code=1)


def cells(*values: object) -> list[Text]:
    """Table cells as plain text: names and descriptions are user input, never rich markup."""
    return [Text("" if value is None else str(value)) for value in values]
