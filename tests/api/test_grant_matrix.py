"""The isolation matrix of grants, generated from the route table.

resource type (dataset, registered model, deployment) x permission state of the grantee (none,
use, train-on, read, revoked, expired) x action (list, get, download, preview, predict, train,
deploy, bundle, write) for three organisations: A owns the objects, B is the grantee, C holds
nothing. Each cell is the status B must get; A always gets its normal success (reads) and C
always a 404, never a 403 (an object of another organisation that one may not reach does not
exist). A listing's cell is `LISTED` (200) or `ABSENT` (404): whether the object is in it.

The route table is the server's own `/openapi.json`: every route whose path names a shareable
object (`{dataset_id}`, `{model}`, `{deployment_id}`, `{name}` under `/v2/models`) or whose JSON
body does (a field such as `model`, `training_file`, `register_to`, `object_id`, or one of the
declared `BODY_NAMES_AN_OBJECT`) must be a key of `MATRIX` or of `EXEMPT` (with its reason): a
new route that touches a shareable object and is missing from both fails
`test_every_route_that_touches_a_shareable_object_is_in_the_matrix`.

One module-scoped world per backend: A is the owner of the session's `shared_model` (one small
dataset, one 2-epoch MLP trained on it, the registered model, and its deployment, made once per
backend for the whole session); B and C are this module's own organisations, and each makes a
dataset of its own (for the cells that need a caller's own file or dataset). Each
`(state, kind)` test grants B that state on one object only, runs every cell of that kind for A,
B and C, and revokes the grant, so states and kinds stay independent. Jobs, deployments and
optimisations a cell creates are cancelled or deleted at once.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.api.test_fine_tuning import make_dataset, tabular_csv, tabular_frame
from tests.conftest import Org, Server, SharedModel, create_org

STATES = ("none", "use", "train-on", "read", "revoked", "expired")
KINDS = ("dataset", "model", "deployment")
LISTED, ABSENT = 200, 404  # a listing's cell: the object is in it, or not

Route = tuple[str, str]  # (METHOD, OpenAPI path template)


# -- the world ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    server: Server
    a: Org  # the owner
    b: Org  # the grantee
    c: Org  # the third organisation: no grant, ever
    dataset: dict[str, Any]  # A's, with its version 1
    model: str  # A's registered model (one version), trained on `dataset`
    deployment: dict[str, Any]  # A's deployment of `model`
    own_datasets: dict[str, dict[str, Any]]  # org id -> a dataset of that org's own
    tensor: dict[str, Any]  # one OIP input row for the deployment

    @property
    def dataset_id(self) -> str:
        return str(self.dataset["id"])

    @property
    def version_id(self) -> str:
        return str(self.dataset["version"]["id"])

    @property
    def source_file(self) -> str:
        return str(self.dataset["version"]["source_file_ids"][0])

    def served(self, who: Org) -> str:
        """The name `who` sends for A's deployment: its own name for A, `<A>/<name>` else."""
        name = str(self.deployment["name"])
        return name if who.id == self.a.id else f"{self.a.name}/{name}"

    def own_file(self, who: Org) -> str:
        return str(self.own_datasets[who.id]["version"]["source_file_ids"][0])

    def own_version(self, who: Org) -> str:
        return str(self.own_datasets[who.id]["version"]["id"])

    def object_id(self, kind: str) -> str:
        return {"dataset": self.dataset_id, "model": self.model}.get(kind) or str(
            self.deployment["id"]
        )

    def http(self, who: Org) -> httpx.Client:
        return self.server.client(who.api_key)


@pytest.fixture(scope="module")
def world(server: Server, shared_model: SharedModel) -> World:
    # A's objects are the session's (the alias `stable` names version 1, the deployment is
    # loaded); no cell changes them. B and C are this module's: grants are per (A, grantee).
    a = shared_model.owner
    b, c = create_org(server), create_org(server)
    own = {
        org.id: make_dataset(server, org, "own.csv", tabular_csv(40, seed=9), label_column="label")
        for org in (b, c)
    }
    dataset = shared_model.dataset
    return World(
        server,
        a,
        b,
        c,
        dataset,
        shared_model.model,
        shared_model.deployment,
        {a.id: dataset, **own},
        shared_model.tensor,
    )


# -- the cells ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    method: str
    url: str
    json: Any = None
    params: dict[str, Any] | None = None


Build = Callable[[World, Org], Req]
Undo = Callable[[httpx.Client, httpx.Response], None]


@dataclass(frozen=True)
class Cell:
    kind: str  # the object the request touches: dataset, model or deployment
    action: str  # list, get, download, preview, predict, train, deploy, bundle, write
    build: Build  # the request `who` sends to reach A's object
    grantee: dict[str, int]  # B's status per permission state
    owner: int | None  # A's status; None: not sent (it would change or destroy the world)
    listed: Callable[[World, Org, dict[str, Any]], bool] | None = None  # for a listing
    undo: Undo | None = None  # run on any 2xx: cancel a job, delete a deployment, ...
    error_code: str | None = None  # the error's code where the cell expects a 4xx but 404
    note: str = ""

    @property
    def once_for_owner(self) -> bool:
        """A cell that makes something is sent by A in state `none` only (A's answer does not
        depend on B's grants)."""
        return self.undo is not None


def states(allowed: set[str], ok: int) -> dict[str, int]:
    """`ok` in the `allowed` states, 404 in every other one."""
    return {s: ok if s in allowed else 404 for s in STATES}


READ = {"read"}
TRAIN_ON = {"train-on", "read"}
USE = {"use", "train-on", "read"}  # each permission implies the ones before it
DEPLOYMENT_USE = {"use"}  # a deployment is granted for `use` only


def never(status: int = 404) -> dict[str, int]:
    """Refused (or, for a listing, absent) in every state: the owner's alone."""
    return dict.fromkeys(STATES, status)


def cancel_job(http: httpx.Client, made: httpx.Response) -> None:
    cancelled = http.post(f"/v1/fine_tuning/jobs/{made.json()['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text


def cancel_optimisation(http: httpx.Client, made: httpx.Response) -> None:
    cancelled = http.post(f"/v1/optimisations/{made.json()['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text


def delete_deployment(http: httpx.Client, made: httpx.Response) -> None:
    deleted = http.delete(f"/v1/deployments/{made.json()['id']}")
    assert deleted.status_code == 200, deleted.text


def revoke_made_grant(http: httpx.Client, made: httpx.Response) -> None:
    revoked = http.delete(f"/v1/grants/{made.json()['id']}")
    assert revoked.status_code == 200, revoked.text


def ids(body: dict[str, Any]) -> set[str]:
    return {str(item["id"]) for item in body["data"]}


def ds(w: World, v: str = "") -> str:
    return f"/v1/datasets/{w.dataset_id}{v}"


def mv(w: World, v: str = "") -> str:
    return f"/v1/models/{w.model}{v}"


def v2(w: World, who: Org, v: str = "") -> str:
    return f"/v2/models/{w.served(who)}{v}"


def regrant(kind: str) -> Build:
    """The caller grants A's object on to another organisation: no one but A may."""
    return lambda w, who: Req(
        "POST",
        "/v1/grants",
        {
            "grantee": w.c.id if who.id == w.b.id else w.b.id,
            "object_type": kind,
            "object_id": w.object_id(kind),
            "permission": "use",
        },
    )


def train_on(ref: Callable[[World], str]) -> Build:
    return lambda w, who: Req(
        "POST",
        "/v1/fine_tuning/jobs",
        {"model": "mlp", "training_file": ref(w), "hyperparameters": {"n_epochs": 1}},
    )


def predict(w: World, who: Org) -> Req:
    rows = tabular_frame(2, seed=5).to_dict(orient="records")
    return Req("POST", "/v1/predictions", {"model": w.served(who), "records": rows})


def infer(w: World, who: Org, v: str = "") -> Req:
    return Req("POST", v2(w, who, f"{v}/infer"), {"inputs": [w.tensor]})


DATASET_CELLS: dict[Route, tuple[Cell, ...]] = {
    ("GET", "/v1/datasets"): (
        Cell(
            "dataset",
            "list",
            lambda w, who: Req("GET", "/v1/datasets", params={"limit": 100}),
            states(READ, LISTED),
            LISTED,
            listed=lambda w, who, body: w.dataset_id in ids(body),
        ),
    ),
    ("GET", "/v1/datasets/{dataset_id}"): (
        Cell("dataset", "get", lambda w, who: Req("GET", ds(w)), states(READ, 200), 200),
    ),
    ("GET", "/v1/datasets/{dataset_id}/versions"): (
        Cell(
            "dataset", "get", lambda w, who: Req("GET", ds(w, "/versions")), states(READ, 200), 200
        ),
    ),
    ("GET", "/v1/datasets/{dataset_id}/versions/{version}"): (
        Cell(
            "dataset",
            "preview",
            lambda w, who: Req("GET", ds(w, "/versions/1")),
            states(READ, 200),
            200,
        ),
    ),
    ("GET", "/v1/datasets/{dataset_id}/versions/{version}/rows"): (
        Cell(
            "dataset",
            "preview",
            lambda w, who: Req("GET", ds(w, "/versions/1/rows"), params={"limit": 5}),
            states(READ, 200),
            200,
        ),
    ),
    ("GET", "/v1/datasets/{dataset_id}/versions/{version}/content"): (
        Cell(
            "dataset",
            "download",
            lambda w, who: Req("GET", ds(w, "/versions/1/content")),
            states(READ, 200),
            200,
        ),
    ),
    ("DELETE", "/v1/datasets/{dataset_id}"): (
        Cell("dataset", "write", lambda w, who: Req("DELETE", ds(w)), never(), None),
    ),
    ("DELETE", "/v1/datasets/{dataset_id}/versions/{version}"): (
        Cell("dataset", "write", lambda w, who: Req("DELETE", ds(w, "/versions/1")), never(), None),
    ),
    ("POST", "/v1/datasets/{dataset_id}/versions"): (
        Cell(
            "dataset",
            "write",
            # The caller's own file: the dataset is the only thing it may not reach.
            lambda w, who: Req("POST", ds(w, "/versions"), {"file_ids": [w.own_file(who)]}),
            never(),
            None,
        ),
    ),
    # A's source file stays A's whatever B holds: `read` shows the dataset, never the upload.
    ("GET", "/v1/files/{file_id}"): (
        Cell(
            "dataset",
            "get",
            lambda w, who: Req("GET", f"/v1/files/{w.source_file}"),
            never(),
            200,
        ),
    ),
    ("GET", "/v1/files/{file_id}/content"): (
        Cell(
            "dataset",
            "download",
            lambda w, who: Req("GET", f"/v1/files/{w.source_file}/content"),
            never(),
            200,
        ),
    ),
    ("DELETE", "/v1/files/{file_id}"): (
        Cell(
            "dataset",
            "write",
            lambda w, who: Req("DELETE", f"/v1/files/{w.source_file}"),
            never(),
            None,
        ),
    ),
}

MODEL_CELLS: dict[Route, tuple[Cell, ...]] = {
    ("GET", "/v1/models/{model}/versions"): (
        Cell("model", "get", lambda w, who: Req("GET", mv(w, "/versions")), states(READ, 200), 200),
    ),
    ("GET", "/v1/models/{model}/versions/{version}"): (
        Cell(
            "model", "get", lambda w, who: Req("GET", mv(w, "/versions/1")), states(READ, 200), 200
        ),
    ),
    ("GET", "/v1/models/{model}/versions/{version}/artifacts/{name}"): (
        Cell(
            "model",
            "download",
            lambda w, who: Req("GET", mv(w, "/versions/1/artifacts/model.onnx")),
            states(READ, 200),
            200,
        ),
    ),
    ("GET", "/v1/models/{model}/versions/{version}/bundle"): (
        Cell(
            "model",
            "bundle",
            lambda w, who: Req("GET", mv(w, "/versions/1/bundle")),
            states(READ, 200),
            200,
        ),
    ),
    ("DELETE", "/v1/models/{model}"): (
        Cell("model", "write", lambda w, who: Req("DELETE", mv(w)), never(), None),
    ),
    # Loading is for language models: a trained model is a 400 to whoever may use it, and
    # does not exist (404) for anyone else.
    ("POST", "/v1/models/{model}/load"): (
        Cell(
            "model",
            "predict",
            lambda w, who: Req("POST", mv(w, "/load")),
            states(USE, 400),
            400,
            error_code="model_not_generative",
        ),
    ),
    ("POST", "/v1/models/{model}/unload"): (
        Cell(
            "model",
            "write",
            lambda w, who: Req("POST", mv(w, "/unload")),
            states(USE, 400),
            400,
            error_code="model_not_generative",
        ),
    ),
    # Aliases are the owner's deployment plumbing (names it moves between versions), not part of
    # what `read` shows (versions, artifacts, bundles): 404 to every other organisation, `read`
    # included. (The contract left alias GET to the matrix; the other defensible answer would
    # be 200 with `read`, like the versions the aliases name.)
    ("GET", "/v1/models/{model}/aliases"): (
        Cell("model", "get", lambda w, who: Req("GET", mv(w, "/aliases")), never(), 200),
    ),
    ("PUT", "/v1/models/{model}/aliases/{alias}"): (
        Cell(
            "model",
            "write",
            lambda w, who: Req("PUT", mv(w, "/aliases/stable"), {"version": 1}),
            never(),
            200,  # A sets `stable` to the version it already names: the world does not change
        ),
    ),
    ("DELETE", "/v1/models/{model}/aliases/{alias}"): (
        Cell(
            "model", "write", lambda w, who: Req("DELETE", mv(w, "/aliases/stable")), never(), None
        ),
    ),
    ("POST", "/v1/deployments"): (
        Cell(
            "model",
            "deploy",
            lambda w, who: Req(
                "POST", "/v1/deployments", {"model": w.model, "name": f"m-{secrets.token_hex(4)}"}
            ),
            states(USE, 201),
            201,
            undo=delete_deployment,
        ),
    ),
    ("POST", "/v1/optimisations"): (
        Cell(
            "model",
            "write",
            # Its variants become new versions of A's model: A's to ask for, whatever B holds.
            lambda w, who: Req(
                "POST",
                "/v1/optimisations",
                {"model": w.model, "variants": [{"method": "onnx_optimized"}]},
            ),
            never(),
            200,
            undo=cancel_optimisation,
        ),
    ),
}

DEPLOYMENT_CELLS: dict[Route, tuple[Cell, ...]] = {
    ("GET", "/v1/deployments"): (
        # B sees a shared deployment in /v1/models (as `<A>/<name>`), never among deployments.
        Cell(
            "deployment",
            "list",
            lambda w, who: Req("GET", "/v1/deployments", params={"limit": 100}),
            never(ABSENT),
            LISTED,
            listed=lambda w, who, body: str(w.deployment["id"]) in ids(body),
        ),
    ),
    ("GET", "/v1/deployments/{deployment_id}"): (
        Cell(
            "deployment",
            "get",
            lambda w, who: Req("GET", f"/v1/deployments/{w.deployment['id']}"),
            never(),
            200,
        ),
    ),
    ("POST", "/v1/deployments/{deployment_id}"): (
        Cell(
            "deployment",
            "write",
            lambda w, who: Req("POST", f"/v1/deployments/{w.deployment['id']}", {"version": 1}),
            never(),
            200,  # A pins the one version it serves: the world does not change
        ),
    ),
    ("DELETE", "/v1/deployments/{deployment_id}"): (
        Cell(
            "deployment",
            "write",
            lambda w, who: Req("DELETE", f"/v1/deployments/{w.deployment['id']}"),
            never(),
            None,
        ),
    ),
    ("POST", "/v1/predictions"): (
        Cell("deployment", "predict", predict, states(DEPLOYMENT_USE, 200), 200),
    ),
    # An explanation resolves its model exactly as a prediction does.
    ("POST", "/v1/explanations"): (
        Cell(
            "deployment",
            "predict",
            lambda w, who: Req(
                "POST",
                "/v1/explanations",
                {"model": w.served(who), "records": predict(w, who).json["records"][:1]},
            ),
            states(DEPLOYMENT_USE, 200),
            200,
        ),
    ),
    # The deployment is an MLP: with `use`, B reaches it and is told it serves no embeddings
    # (400 model_not_embedding, as A is); without, the very 404 of a name that does not exist.
    ("POST", "/v1/embeddings"): (
        Cell(
            "deployment",
            "predict",
            lambda w, who: Req("POST", "/v1/embeddings", {"model": w.served(who), "input": "hi"}),
            states(DEPLOYMENT_USE, 400),
            400,
            error_code="model_not_embedding",
        ),
    ),
    # Chat and completions serve only the platform's bundled LLMs: no deployment is one, A's
    # included. A 404 for everyone; a change there must revisit this row.
    ("POST", "/v1/chat/completions"): (
        Cell(
            "deployment",
            "predict",
            lambda w, who: Req(
                "POST",
                "/v1/chat/completions",
                {
                    "model": w.served(who),
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 1,
                },
            ),
            never(),
            404,
        ),
    ),
    ("POST", "/v1/completions"): (
        Cell(
            "deployment",
            "predict",
            lambda w, who: Req(
                "POST", "/v1/completions", {"model": w.served(who), "prompt": "hi", "max_tokens": 1}
            ),
            never(),
            404,
        ),
    ),
    ("GET", "/v2/models/{name}"): (
        Cell(
            "deployment",
            "get",
            lambda w, who: Req("GET", v2(w, who)),
            states(DEPLOYMENT_USE, 200),
            200,
        ),
    ),
    ("GET", "/v2/models/{name}/versions/{version}"): (
        Cell(
            "deployment",
            "get",
            lambda w, who: Req("GET", v2(w, who, "/versions/1")),
            states(DEPLOYMENT_USE, 200),
            200,
        ),
    ),
    ("GET", "/v2/models/{name}/ready"): (
        Cell(
            "deployment",
            "get",
            lambda w, who: Req("GET", v2(w, who, "/ready")),
            states(DEPLOYMENT_USE, 200),
            200,
        ),
    ),
    ("GET", "/v2/models/{name}/versions/{version}/ready"): (
        Cell(
            "deployment",
            "get",
            lambda w, who: Req("GET", v2(w, who, "/versions/1/ready")),
            states(DEPLOYMENT_USE, 200),
            200,
        ),
    ),
    ("POST", "/v2/models/{name}/infer"): (
        Cell("deployment", "predict", infer, states(DEPLOYMENT_USE, 200), 200),
    ),
    ("POST", "/v2/models/{name}/versions/{version}/infer"): (
        Cell(
            "deployment",
            "predict",
            lambda w, who: infer(w, who, "/versions/1"),
            states(DEPLOYMENT_USE, 200),
            200,
        ),
    ),
}

# Routes whose cells span kinds.
SHARED_CELLS: dict[Route, tuple[Cell, ...]] = {
    ("GET", "/v1/models"): (
        Cell(
            "model",
            "list",
            lambda w, who: Req("GET", "/v1/models"),
            states(USE, LISTED),
            LISTED,
            listed=lambda w, who, body: w.model in ids(body),
        ),
        Cell(
            "deployment",
            "list",
            lambda w, who: Req("GET", "/v1/models"),
            states(DEPLOYMENT_USE, LISTED),
            LISTED,
            listed=lambda w, who, body: w.served(who) in ids(body),
        ),
    ),
    ("GET", "/v1/models/{model}"): (
        Cell("model", "get", lambda w, who: Req("GET", mv(w)), states(USE, 200), 200),
        Cell(
            "deployment",
            "get",
            lambda w, who: Req("GET", f"/v1/models/{w.served(who)}"),
            states(DEPLOYMENT_USE, 200),
            200,
        ),
    ),
    ("POST", "/v1/fine_tuning/jobs"): (
        Cell(
            "dataset",
            "train",
            train_on(lambda w: w.version_id),
            states(TRAIN_ON, 200),
            200,
            undo=cancel_job,
            note="training_file: A's dsv_ id",
        ),
        Cell(
            "dataset",
            "train",
            train_on(lambda w: w.dataset_id),
            states(TRAIN_ON, 200),
            200,
            undo=cancel_job,
            note="training_file: A's ds_ id",
        ),
        Cell(
            "model",
            "write",
            # The caller's own data, registered as a new version of A's model: never B's to do.
            lambda w, who: Req(
                "POST",
                "/v1/fine_tuning/jobs",
                {
                    "model": "mlp",
                    "training_file": w.own_version(who),
                    "hyperparameters": {"n_epochs": 1},
                    "register_to": w.model,
                },
            ),
            never(),
            None,  # A's own would add a version to the model every other cell reads
            undo=cancel_job,
            note="register_to: A's model",
        ),
    ),
    # Only the owner grants its objects: a grantee, even with `read`, cannot pass them on.
    ("POST", "/v1/grants"): tuple(
        Cell(kind, "write", regrant(kind), never(), None, undo=revoke_made_grant) for kind in KINDS
    ),
}

MATRIX: dict[Route, tuple[Cell, ...]] = {
    **DATASET_CELLS,
    **MODEL_CELLS,
    **DEPLOYMENT_CELLS,
    **SHARED_CELLS,
}

# Routes that touch a shareable object but are no cell of the matrix, each with the reason.
EXEMPT: dict[Route, str] = {}

# -- the route table ---------------------------------------------------------------------------

OBJECT_PARAMS = {"dataset_id", "model", "deployment_id"}
OBJECT_FIELDS = {
    "model",
    "training_file",
    "register_to",
    "object_id",
    "dataset_id",
    "deployment_id",
}
BODY_NAMES_AN_OBJECT: set[Route] = {
    ("POST", "/v1/predictions"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("POST", "/v1/deployments"),
    ("POST", "/v1/optimisations"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v2/models/{name}/infer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer"),
    ("POST", "/v1/grants"),
}
METHODS = {"get", "post", "put", "patch", "delete"}


def route_table(server: Server) -> dict[Route, dict[str, Any]]:
    with server.client(server.admin_key) as http:
        response = http.get("/openapi.json")
    assert response.status_code == 200, response.text
    spec = response.json()
    table = {
        (method.upper(), path): {"operation": operation, "components": spec["components"]}
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }
    assert len(table) > 50, sorted(table)
    return table


def body_fields(operation: dict[str, Any], components: dict[str, Any]) -> set[str]:
    content = operation.get("requestBody", {}).get("content", {})
    fields: set[str] = set()
    for media in content.values():
        schema = media.get("schema", {})
        ref = schema.get("$ref")
        if ref:
            schema = components["schemas"][ref.rsplit("/", 1)[1]]
        fields |= set(schema.get("properties", {}))
    return fields


def touches(route: Route, entry: dict[str, Any]) -> bool:
    _method, path = route
    operation = entry["operation"]
    params = {p["name"] for p in operation.get("parameters", []) if p.get("in") == "path"}
    if params & OBJECT_PARAMS:
        return True
    if "name" in params and path.startswith("/v2/models/"):
        return True
    return route in BODY_NAMES_AN_OBJECT or bool(
        body_fields(operation, entry["components"]) & OBJECT_FIELDS
    )


def test_every_route_that_touches_a_shareable_object_is_in_the_matrix(server: Server) -> None:
    table = route_table(server)
    touching = {route for route, entry in table.items() if touches(route, entry)}
    missing = sorted(touching - set(MATRIX) - set(EXEMPT))
    assert missing == [], (
        f"routes that touch a shareable object, in no cell of the matrix: {missing}"
    )
    # The detector still sees what the matrix was written for.
    assert ("GET", "/v1/datasets/{dataset_id}") in touching
    assert ("POST", "/v2/models/{name}/infer") in touching
    assert ("POST", "/v1/fine_tuning/jobs") in touching


def test_the_matrix_names_only_routes_that_exist(server: Server) -> None:
    table = route_table(server)
    gone = sorted((set(MATRIX) | set(EXEMPT)) - set(table))
    assert gone == [], f"the matrix names routes the server no longer has: {gone}"
    assert not set(MATRIX) & set(EXEMPT)


def test_every_kind_and_state_has_cells() -> None:
    for kind in KINDS:
        cells = [c for cs in MATRIX.values() for c in cs if c.kind == kind]
        assert len(cells) >= 5, kind
        for cell in cells:
            assert set(cell.grantee) == set(STATES), cell


# -- the states --------------------------------------------------------------------------------


def grant(w: World, kind: str, permission: str, **extra: Any) -> httpx.Response:
    body = {"grantee": w.b.id, "object_type": kind, "object_id": w.object_id(kind)}
    with w.http(w.a) as http:
        return http.post("/v1/grants", json={**body, "permission": permission, **extra})


def top_permission(kind: str) -> str:
    return "use" if kind == "deployment" else "read"


@pytest.fixture(scope="module")
def expired(world: World) -> dict[str, str]:
    """One grant per kind with the kind's top permission, all expired (one sleep for all)."""
    made: dict[str, str] = {}
    expires_at = int(time.time()) + 2
    for kind in KINDS:
        response = grant(world, kind, top_permission(kind), expires_at=expires_at)
        assert response.status_code == 201, response.text
        made[kind] = response.json()["id"]
    time.sleep(max(0.0, expires_at - time.time()) + 0.5)
    with world.http(world.a) as http:
        for grant_id in made.values():
            assert http.get(f"/v1/grants/{grant_id}").json()["status"] == "expired"
    return made


@pytest.fixture
def in_state(request: pytest.FixtureRequest, world: World) -> Iterator[None]:
    """B holds `state` on A's object of `kind` (and nothing else of A's) for the test."""
    state, kind = request.param
    if state == "expired":
        request.getfixturevalue("expired")
        yield
        return
    if state == "none":
        yield
        return
    if state == "revoked":
        response = grant(world, kind, top_permission(kind))
        assert response.status_code == 201, response.text
        with world.http(world.a) as http:
            revoked = http.delete(f"/v1/grants/{response.json()['id']}")
        assert revoked.status_code == 200 and revoked.json()["status"] == "revoked", revoked.text
        yield
        return
    response = grant(world, kind, state)
    if kind == "deployment" and state != "use":
        # A deployment is granted for `use` only: B holds nothing in this state.
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "permission", response.text
        yield
        return
    assert response.status_code == 201, response.text
    try:
        yield
    finally:
        with world.http(world.a) as http:
            assert http.delete(f"/v1/grants/{response.json()['id']}").status_code == 200


# -- the matrix --------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int  # for a listing: LISTED or ABSENT (or the listing's own failing status)
    body: Any = None
    text: str = ""


def send(w: World, who: Org, cell: Cell) -> Outcome:
    req = cell.build(w, who)
    with w.http(who) as http:
        response = http.request(req.method, req.url, json=req.json, params=req.params)
        if cell.undo is not None and 200 <= response.status_code < 300:
            cell.undo(http, response)
    try:
        body = response.json()
    except ValueError:
        body = None
    if cell.listed is not None and response.status_code == 200:
        return Outcome(LISTED if cell.listed(w, who, body) else ABSENT, body)
    return Outcome(response.status_code, body, response.text[:300])


@dataclass
class Findings:
    rows: list[str] = field(default_factory=list)

    def check(self, route: Route, cell: Cell, who: str, expected: int, got: Outcome) -> None:
        what = f"{route[0]} {route[1]} [{cell.kind} {cell.action}"
        what += f" ({cell.note})] {who}" if cell.note else f"] {who}"
        if got.status != expected:
            self.rows.append(f"{what}: expected {expected}, got {got.status} {got.text}")
        elif cell.error_code and 400 <= expected != 404:
            code = (got.body or {}).get("error", {}).get("code")
            if code != cell.error_code:
                self.rows.append(f"{what}: expected code {cell.error_code}, got {got.text}")


CASES = [(state, kind) for state in STATES for kind in KINDS]


@pytest.mark.parametrize("in_state", CASES, ids=[f"{s}-{k}" for s, k in CASES], indirect=True)
def test_grant_matrix(world: World, in_state: None, request: pytest.FixtureRequest) -> None:
    state, kind = request.node.callspec.params["in_state"]
    findings = Findings()
    for route, cells in MATRIX.items():
        for cell in cells:
            if cell.kind != kind:
                continue
            if cell.owner is not None and (state == "none" or not cell.once_for_owner):
                findings.check(route, cell, "owner", cell.owner, send(world, world.a, cell))
            b = send(world, world.b, cell)
            c = send(world, world.c, cell)
            findings.check(route, cell, f"grantee[{state}]", cell.grantee[state], b)
            third = ABSENT if cell.listed is not None else 404
            findings.check(route, cell, "third", third, c)
            # Refused, the grantee learns no more than the third organisation does.
            if cell.listed is None and b.status == c.status == 404 and b.body != c.body:
                findings.rows.append(
                    f"{route[0]} {route[1]} [{cell.kind} {cell.action}] grantee[{state}]: "
                    f"its 404 differs from the third organisation's: {b.body} vs {c.body}"
                )
    assert findings.rows == [], "\n".join(findings.rows)
