"""Validation errors in OpenAI's words: the API's 400s and a batch line's errors say the same."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiaas.errors import InvalidRequest

# Pydantic names the member of a union it tried ("str", "list[str]", "function-after[...]")
# inside the location; those are types, not parameters.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _is_type_tag(part: str) -> bool:
    return part in _TYPE_TAGS or ("[" in part and part.endswith("]"))


def _param(loc: tuple[Any, ...]) -> str | None:
    in_request = bool(loc) and loc[0] in {"body", "query", "path", "header"}
    parts = [str(p) for p in loc[1:] if not _is_type_tag(str(p))] if in_request else []
    if not parts:
        return None
    text = parts[0]
    for part in parts[1:]:
        text += f"[{part}]" if part.isdigit() else f".{part}"
    return text


def invalid_request(errors: Sequence[Any]) -> InvalidRequest:
    """The first of pydantic's errors, phrased the way OpenAI phrases it, naming the parameter.
    Locations start with where the value was ("body", "query", ...), as FastAPI reports them."""
    first = errors[0] if errors else {"type": "invalid", "loc": (), "msg": "invalid"}
    kind, loc = first.get("type", ""), tuple(first.get("loc", ()))
    param = _param(loc)
    if kind == "json_invalid":
        return InvalidRequest(
            "We could not parse the JSON body of your request. The body must be valid JSON.",
            code="invalid_json",
        )
    if kind == "extra_forbidden":
        return InvalidRequest(
            f"Unrecognized request argument supplied: {param}",
            param=param,
            code="unknown_parameter",
        )
    if kind == "missing":
        if param is None:
            return InvalidRequest("The request body is missing.", code="missing_body")
        return InvalidRequest(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        )
    where = f" for '{param}'" if param else ""
    return InvalidRequest(
        f"Invalid value{where}: {first.get('msg', 'invalid')}.", param=param, code="invalid_value"
    )
