"""The `read` permission: a grantee reads another organisation's dataset or registered model.

Three organisations on the real server (SQLite and PostgreSQL): A owns a dataset (two versions)
and a model trained on it (the session's `shared_model`, trained once per backend); B is this
module's grantee, granted one permission at a time, and C its bystander. With no grant, `use` or
`train-on`, every read route answers B exactly the 404 it answers C; with `read` (on every
version, or on version 1 only) B reads what the grant reaches and nothing else; writes stay A's;
a revoke ends it at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from tests.api.test_fine_tuning import make_dataset, tabular_csv
from tests.conftest import Org, Server, SharedModel, assert_error, create_org


@dataclass(frozen=True)
class World:
    a: Org
    b: Org
    c: Org
    dataset: dict[str, Any]  # two versions
    file_id: str  # the source file of version 1
    model: str  # one version
    rows: int  # in each version of the dataset

    def dataset_reads(self, version: int = 1) -> list[str]:
        url = f"/v1/datasets/{self.dataset['id']}"
        v = f"{url}/versions/{version}"
        return [url, f"{url}/versions", v, f"{v}/rows", f"{v}/content"]

    def version_reads(self, version: int) -> list[str]:
        return self.dataset_reads(version)[2:]

    def model_reads(self) -> list[str]:
        v = f"/v1/models/{self.model}/versions/1"
        return [f"/v1/models/{self.model}/versions", v, f"{v}/artifacts/model.onnx", f"{v}/bundle"]


@pytest.fixture(scope="module")
def world(server: Server, shared_model: SharedModel) -> World:
    # A's dataset (two versions of the same rows) and model (one version) are the session's;
    # nothing here changes them. B and C are this module's: grants are per (A, grantee).
    b, c = create_org(server), create_org(server)
    shared = shared_model
    return World(shared.owner, b, c, shared.dataset, shared.source_file, shared.model, shared.rows)


@contextmanager
def granted(
    server: Server, world: World, kind: str, permission: str | None, version: int | None = None
) -> Iterator[dict[str, Any] | None]:
    """A grants B `permission` on its dataset or model for the block, and revokes it after."""
    if permission is None:
        yield None
        return
    object_id = world.dataset["id"] if kind == "dataset" else world.model
    body = {"grantee": world.b.name, "object_type": kind, "object_id": object_id}
    body |= {"permission": permission, "version": version}
    with server.client(world.a.api_key) as http:
        response = http.post("/v1/grants", json=body)
        assert response.status_code == 201, response.text
        made = response.json()
        try:
            yield made
        finally:
            assert http.delete(f"/v1/grants/{made['id']}").status_code == 200


def assert_hidden(server: Server, world: World, urls: list[str]) -> None:
    """B gets the very 404 that C, who holds nothing, gets."""
    with server.client(world.b.api_key) as b, server.client(world.c.api_key) as c:
        for url in urls:
            assert assert_error(b.get(url), 404) == assert_error(c.get(url), 404), url


def assert_readable(server: Server, org: Org, urls: list[str]) -> None:
    with server.client(org.api_key) as http:
        for url in urls:
            response = http.get(url)
            assert response.status_code == 200, (url, response.text)


def listed(server: Server, org: Org) -> dict[str, dict[str, Any]]:
    with server.client(org.api_key) as http:
        response = http.get("/v1/datasets", params={"limit": 100})
    assert response.status_code == 200, response.text
    return {d["id"]: d for d in response.json()["data"]}


def assert_writes_refused(server: Server, world: World) -> None:
    """Deletes and new versions stay the owner's, whatever B holds; the source file too."""
    url = f"/v1/datasets/{world.dataset['id']}"
    with server.client(world.b.api_key) as http:
        assert_error(http.delete(f"{url}/versions/1"), 404)
        assert_error(http.delete(url), 404)
        assert_error(http.post(f"{url}/versions", json={"file_ids": [world.file_id]}), 404)
        assert_error(http.delete(f"/v1/models/{world.model}"), 404)
        assert_error(http.get(f"/v1/files/{world.file_id}"), 404)
        assert_error(http.get(f"/v1/files/{world.file_id}/content"), 404)
    assert_readable(
        server, world.a, [url, f"{url}/versions/1", f"/v1/models/{world.model}/versions/1"]
    )


@pytest.mark.parametrize("permission", [None, "use", "train-on"])
def test_without_read_every_read_route_is_the_bystanders_404(
    server: Server, world: World, permission: str | None
) -> None:
    with (
        granted(server, world, "dataset", permission),
        granted(server, world, "model", permission),
    ):
        assert_hidden(server, world, world.dataset_reads() + world.model_reads())
        assert world.dataset["id"] not in listed(server, world.b)
        assert_writes_refused(server, world)


def test_read_on_every_version_shows_the_grantee_everything_but_writes(
    server: Server, world: World
) -> None:
    with (
        granted(server, world, "dataset", "read"),
        granted(server, world, "model", "read"),
    ):
        urls = world.dataset_reads(1) + world.version_reads(2) + world.model_reads()
        assert_readable(server, world.b, urls)
        with server.client(world.c.api_key) as c:  # C still sees nothing
            for url in urls:
                assert_error(c.get(url), 404)
        url = f"/v1/datasets/{world.dataset['id']}"
        with server.client(world.b.api_key) as http:
            shown = http.get(url).json()
            assert shown["owned_by"] == world.a.name and shown["latest_version"] == 2
            versions = http.get(f"{url}/versions").json()["data"]
            assert [v["version"] for v in versions] == [1, 2]
            first = http.get(f"{url}/versions/1").json()
            assert first["preview"] and first["columns"] and first["splits"]
            rows = http.get(f"{url}/versions/1/rows", params={"limit": 5}).json()
            assert len(rows["data"]) == 5 and rows["total"] == world.rows
            content = http.get(f"{url}/versions/1/content")
            assert len(content.content) == first["bytes"]
            bundle = http.get(f"/v1/models/{world.model}/versions/1/bundle")
            assert bundle.headers["content-type"] == "application/zip"
            models = http.get(f"/v1/models/{world.model}/versions").json()["data"]
            assert [v["version"] for v in models] == [1]
        # B lists it as A's; A lists it as its own; C does not list it.
        assert listed(server, world.b)[world.dataset["id"]]["owned_by"] == world.a.name
        assert listed(server, world.a)[world.dataset["id"]]["owned_by"] is None
        assert world.dataset["id"] not in listed(server, world.c)
        assert_writes_refused(server, world)
    # Revoked: back to the bystander's 404 at once.
    assert_hidden(server, world, world.dataset_reads() + world.model_reads())
    assert world.dataset["id"] not in listed(server, world.b)


def test_read_on_one_version_shows_that_version_only(server: Server, world: World) -> None:
    with (
        granted(server, world, "dataset", "read", version=1),
        granted(server, world, "model", "read", version=1),
    ):
        assert_readable(server, world.b, world.dataset_reads(1) + world.model_reads())
        assert_hidden(server, world, world.version_reads(2))
        url = f"/v1/datasets/{world.dataset['id']}"
        with server.client(world.b.api_key) as http:
            versions = http.get(f"{url}/versions").json()["data"]
            assert [v["version"] for v in versions] == [1]
            assert http.get(url).json()["latest_version"] == 1
        shown = listed(server, world.b)[world.dataset["id"]]
        assert shown["owned_by"] == world.a.name and shown["latest_version"] == 1
        with server.client(world.c.api_key) as c:
            for url in world.dataset_reads(1) + world.model_reads():
                assert_error(c.get(url), 404)
        assert_writes_refused(server, world)
    assert_hidden(server, world, world.dataset_reads() + world.model_reads())


def test_listing_pages_through_own_then_shared_datasets(server: Server, world: World) -> None:
    own = make_dataset(server, world.b, "own.csv", tabular_csv(20, seed=4))
    with granted(server, world, "dataset", "read"), server.client(world.b.api_key) as http:
        first = http.get("/v1/datasets", params={"limit": 1}).json()
        assert [d["id"] for d in first["data"]] == [own["id"]] and first["has_more"]
        assert first["data"][0]["owned_by"] is None
        second = http.get("/v1/datasets", params={"limit": 1, "after": own["id"]}).json()
        assert [d["id"] for d in second["data"]] == [world.dataset["id"]]
        assert not second["has_more"]
        after = {"after": world.dataset["id"]}
        assert http.get("/v1/datasets", params=after).json()["data"] == []
