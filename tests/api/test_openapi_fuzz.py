"""Schemathesis over the served /openapi.json: no input, however odd, becomes a 5xx.

Runs against both database backends (PostgreSQL rejects things SQLite accepts, such as NUL
bytes). Each case is sent with the key that can reach the route: the platform admin's for
operator routes, an org admin's for the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup

from tests.conftest import Org, Server, create_org

_OPERATOR_PATHS = ("/v1/organizations", "/metrics", "/v1/audit/verify")
MAX_EXAMPLES = 40


@pytest.fixture(scope="session")
def fuzz_org(server: Server) -> Org:
    return create_org(server, f"fuzz-{server.port}")


def _fuzz(
    server: Server,
    key: str,
    operation: schemathesis.APIOperation,
    prepare: Callable[[schemathesis.Case], None] | None = None,
) -> None:
    """Send generated cases for one operation; `prepare` may adjust each case first."""

    @given(case=operation.as_strategy())
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def check(case: schemathesis.Case) -> None:
        if prepare is not None:
            prepare(case)
        case.call_and_validate(
            base_url=server.base_url,
            headers={"Authorization": f"Bearer {key}"},
            checks=[not_a_server_error],
            # A generated chat may prefill 2k tokens: on a busy 2-core machine that can take
            # longer than schemathesis' 10 s default, and a client that gives up is no 5xx.
            timeout=60,
        )

    check()


def test_no_input_causes_a_server_error(server: Server, fuzz_org: Org) -> None:
    # Schemathesis' own pytest plugin does not load under this pytest, so drive it directly.
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    failures = []
    for operation in operations:
        try:
            operator = operation.path.startswith(_OPERATOR_PATHS)
            _fuzz(server, server.admin_key if operator else fuzz_org.api_key, operation)
        except (AssertionError, FailureGroup) as exc:
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert not failures, "\n\n".join(failures)


LLM_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def test_llm_routes_never_5xx_with_real_models(llm_server: Server) -> None:
    """Generated bodies, pointed at the real models so the engines see odd parameters too."""
    org = create_org(llm_server, f"fuzz-llm-{llm_server.port}")
    schema = schemathesis.openapi.from_url(f"{llm_server.base_url}/openapi.json")
    operations = [
        op for op in (r.ok() for r in schema.get_all_operations()) if op.path in LLM_PATHS
    ]
    assert len(operations) == len(LLM_PATHS)
    models = {
        "/v1/chat/completions": "smollm2-135m-instruct",
        "/v1/completions": "gemma-3-270m",
        "/v1/embeddings": "all-minilm-l6-v2",
    }

    for operation in operations:
        _fuzz(llm_server, org.api_key, operation, _on_model(models[operation.path]))


def _on_model(model: str) -> Callable[[schemathesis.Case], None]:
    def prepare(case: schemathesis.Case) -> None:
        if isinstance(case.body, dict):
            case.body["model"] = model
            if "/embeddings" in case.path:
                return
            # Keep generations short; the parameters, not the length, are under test.
            if not isinstance(case.body.get("max_tokens"), int) or case.body["max_tokens"] > 4:
                case.body["max_tokens"] = 4
            case.body.pop("max_completion_tokens", None)

    return prepare
