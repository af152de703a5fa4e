"""`aiaas models`, `aiaas deploy` and `aiaas deployments` against the real server."""

from __future__ import annotations

import json

from tests.cli.test_train_cli import make_dataset_version, run
from tests.conftest import Server, create_org


def test_a_trained_model_is_listed_aliased_deployed_and_undeployed(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    version = make_dataset_version(sqlite_server, org.api_key)
    trained = run(
        sqlite_server, org.api_key, "train", version, "--model", "mlp", "--epochs", "3", "--json"
    )
    assert trained.returncode == 0, trained.stderr
    model = json.loads(trained.stdout)["fine_tuned_model"]

    listed = run(sqlite_server, org.api_key, "models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert model in {m["id"] for m in json.loads(listed.stdout)}

    aliased = run(sqlite_server, org.api_key, "models", "alias", model, "production", "1")
    assert aliased.returncode == 0, aliased.stderr
    assert "production -> version 1" in aliased.stdout

    versions = run(sqlite_server, org.api_key, "models", "versions", model)
    assert versions.returncode == 0, versions.stderr
    assert "accuracy" in versions.stdout and "production" in versions.stdout

    deployed = run(
        sqlite_server, org.api_key, "deploy", model, "--alias", "production", "--name", "churn"
    )
    assert deployed.returncode == 0, deployed.stderr
    assert "alias production" in deployed.stdout and "as churn" in deployed.stdout

    listed = run(sqlite_server, org.api_key, "deployments", "list", "--json")
    [deployment] = json.loads(listed.stdout)
    assert (deployment["name"], deployment["target"]["alias"]) == ("churn", "production")

    again = run(sqlite_server, org.api_key, "deploy", model, "--name", "churn")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr

    removed = run(sqlite_server, org.api_key, "deployments", "delete", deployment["id"])
    assert removed.returncode == 0, removed.stderr
    listed = run(sqlite_server, org.api_key, "deployments", "list", "--json")
    assert json.loads(listed.stdout) == []
