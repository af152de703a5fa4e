"""Constrained output: JSON and JSON-schema grammars in llama.cpp's GBNF."""

from __future__ import annotations

import json
from typing import Any

from aiaas.errors import InvalidRequest


def json_object_grammar() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


def grammar_for_json_schema(schema: dict[str, Any]) -> str:
    """GBNF for a JSON schema, by llama-cpp-python's converter (a port of llama.cpp's own)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError, RecursionError) as exc:
        raise InvalidRequest(
            f"response_format.json_schema.schema is not a schema we can enforce: {exc}",
            param="response_format.json_schema.schema",
        ) from exc
