"""Bad input becomes the right 4xx with an OpenAI error body; every response has a request id."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Org, Server, assert_error


def test_malformed_json_is_400(server: Server, org: Org) -> None:
    with server.client(org.api_key) as client:
        response = client.post(
            "/v1/projects", content=b'{"name": ', headers={"content-type": "application/json"}
        )
    assert_error(response, 400, "invalid_json")


def test_missing_body_is_400(server: Server, org: Org) -> None:
    with server.client(org.api_key) as client:
        assert_error(client.post("/v1/projects"), 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": 5}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 300}, "name"),
        ({"name": "ok", "scopes": "admin"}, "scopes"),
        ({"name": "ok", "scopes": ["root"]}, "scopes[0]"),
        ({"name": "ok", "expires_in": "soon"}, "expires_in"),
        ({"name": "ok", "expires_in": 0}, "expires_in"),
        ({"name": "ok", "role": "god"}, "role"),
    ],
)
def test_wrong_types_name_the_param(server: Server, org: Org, body: dict, param: str) -> None:
    with server.client(org.api_key) as client:
        error = assert_error(client.post("/v1/api_keys", json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_missing_field_is_400_naming_it(server: Server, org: Org) -> None:
    with server.client(org.api_key) as client:
        error = assert_error(
            client.post("/v1/api_keys", json={}), 400, "missing_required_parameter"
        )
    assert error["param"] == "name"


def test_unknown_field_is_400(server: Server, org: Org) -> None:
    with server.client(org.api_key) as client:
        error = assert_error(
            client.post("/v1/projects", json={"name": "p", "colour": "red"}),
            400,
            "unknown_parameter",
        )
    assert error["param"] == "colour"


def test_body_that_is_not_an_object_is_400(server: Server, org: Org) -> None:
    with server.client(org.api_key) as client:
        assert_error(client.post("/v1/projects", json=["name"]), 400)
        assert_error(client.post("/v1/projects", json=None), 400)


def test_bad_query_param_is_400(server: Server, org: Org) -> None:
    with server.client(org.api_key) as client:
        error = assert_error(client.get("/v1/api_keys", params={"limit": 0}), 400)
        assert error["param"] == "limit"
        assert_error(client.get("/v1/api_keys", params={"limit": "many"}), 400)
        assert_error(client.get("/v1/api_keys", params={"after": "key_nope"}), 400)


def test_unknown_route_is_404(server: Server) -> None:
    with server.client() as client:
        error = assert_error(client.get("/v1/nowhere"), 404, "unknown_url")
    assert "/v1/nowhere" in error["message"]


def test_wrong_method_is_405(server: Server, org: Org) -> None:
    with server.client(org.api_key) as client:
        assert_error(client.put("/v1/projects", json={}), 405, "method_not_allowed")
        assert_error(client.delete("/health"), 405)


def test_huge_declared_body_is_413(sqlite_server: Server) -> None:
    body = b'{"name": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    with sqlite_server.client("sk-aiaas-anything") as client:
        response = client.post(
            "/v1/projects", content=body, headers={"content-type": "application/json"}
        )
    assert_error(response, 413, "request_too_large")


def test_huge_streamed_body_is_413(sqlite_server: Server) -> None:
    """A chunked body has no Content-Length: it is cut off once it passes the limit."""
    org_key = sqlite_server.admin_key

    def chunks():
        yield b'{"name": "'
        for _ in range(40):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    with sqlite_server.client(org_key) as client:
        response = client.post(
            "/v1/organizations", content=chunks(), headers={"content-type": "application/json"}
        )
    assert_error(response, 413, "request_too_large")


def test_request_id_is_returned_and_echoed(server: Server) -> None:
    with server.client() as client:
        generated = client.get("/health")
        echoed = client.get("/health", headers={"x-request-id": "trace-123"})
        hostile = client.get("/health", headers={"x-request-id": "bad id\twith spaces"})
        failed = client.get("/v1/models")
    assert len(generated.headers["x-request-id"]) >= 16
    assert echoed.headers["x-request-id"] == "trace-123"
    assert hostile.headers["x-request-id"] != "bad id\twith spaces"
    assert failed.headers["x-request-id"]


def test_health_needs_no_key(server: Server) -> None:
    response = httpx.get(f"{server.base_url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/projects?after=a%00b",
        "/v1/projects/proj%00x",
        "/v1/api_keys?project_id=" + "p" * 65,
        "/v1/api_keys/key_%F0%9F%92%A5",
    ],
)
def test_ids_that_cannot_exist_are_400_or_404(server: Server, org: Org, path: str) -> None:
    """NUL bytes and junk never reach the database (PostgreSQL would reject NUL with a 500)."""
    with server.client(org.api_key) as client:
        response = client.get(path)
    assert response.status_code in (400, 404), response.text
    assert_error(response, response.status_code)
