"""Chat templates (Jinja, from the GGUF metadata) rendered in a sandbox.

A template comes from a model file, so it is untrusted code: it runs in Jinja's immutable
sandbox, which refuses attribute access to internals and mutation of the inputs.
"""

from __future__ import annotations

import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from aiaas.errors import InvalidRequest


class TemplateRaised(Exception):
    """The template itself rejected the conversation (`raise_exception` in the template)."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.filters["tojson"] = _tojson
        self._template = env.from_string(source)
        self._bos = bos_token
        self._eos = eos_token

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except TemplateRaised as exc:
            raise InvalidRequest(
                f"The chat template rejected the messages: {exc}", param="messages"
            ) from exc
        except TemplateError as exc:
            raise InvalidRequest(
                f"The chat template failed to render: {exc}", param="messages"
            ) from exc


def _tojson(value: Any, indent: int | None = None) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, indent=indent)
