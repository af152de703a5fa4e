"""Cross-organisation calls in the audit log: one `grant.used` event per grant, grantee and
window (a minute by default; 2 seconds here, `AIAAS_AUDIT_USAGE_WINDOW_S`), in the owner's log,
with both organisation ids and the window's counts; the grantee's log holds none of them, and
the hash chain stays whole.

Org A trains and deploys a classifier on a dedicated server and grants B `use`; B calls it as
`<A's name>/<deployment>`. The usage meter's aggregation and its failure path are also checked
in process, against a database of their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from aiaas.domain import UsageRow
from aiaas.services.audit import AuditService
from aiaas.services.usage import UsageMeter
from aiaas.storage.db import Database
from aiaas.storage.repos import audit as audit_repo
from aiaas.storage.tables import usage_records
from tests.api.test_deployments import deploy, tabular_csv, train
from tests.api.test_fine_tuning import make_dataset, tabular_frame
from tests.conftest import Org, Server, assert_error, create_org

WINDOW_S = 2
ROWS = tabular_frame(3, seed=5).to_dict(orient="records")


@dataclass(frozen=True)
class Shared:
    server: Server
    a: Org
    b: Org
    deployment: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.a.name}/{self.deployment['name']}"

    def revoke(self, grant_id: str) -> None:
        with self.server.client(self.a.api_key) as http:
            assert http.delete(f"/v1/grants/{grant_id}").status_code == 200

    def grant(self) -> dict[str, Any]:
        payload = {
            "grantee": self.b.id,
            "object_type": "deployment",
            "object_id": self.deployment["id"],
            "permission": "use",
        }
        with self.server.client(self.a.api_key) as http:
            response = http.post("/v1/grants", json=payload)
        assert response.status_code == 201, response.text
        return response.json()


@pytest.fixture(scope="module")
def shared(make_server: Callable[..., Server]) -> Iterator[Shared]:
    server = make_server("sqlite", audit_usage_window_s=str(WINDOW_S))
    server.start()
    a, b = create_org(server), create_org(server)
    dataset = make_dataset(server, a, "points.csv", tabular_csv(rows=200))
    job = train(server, a, dataset["version"]["id"], n_epochs=2, suffix="audited")
    with server.client(a.api_key) as http:
        deployment = deploy(http, model=job.fine_tuned_model, name="audited-points")
    yield Shared(server, a, b, deployment)
    server.stop()


def audit_events(server: Server, key: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = None
    with server.client(key) as http:
        while True:
            params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
            page = http.get("/v1/audit", params=params)
            assert page.status_code == 200, page.text
            body = page.json()
            out += body["data"]
            if not body["has_more"]:
                return out
            after = body["last_id"]


def grant_used(server: Server, key: str, grant_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in audit_events(server, key)
        if e["type"] == "grant.used" and e["target"]["id"] == grant_id
    ]


def wait_for_requests(
    shared: Shared, grant_id: str, requests: int, deadline_s: float = 20
) -> list[dict[str, Any]]:
    """A's `grant.used` events of the grant, once their requests add up to `requests`."""
    deadline = time.monotonic() + deadline_s
    while True:
        events = grant_used(shared.server, shared.a.api_key, grant_id)
        total = sum(e["data"]["requests"] for e in events)
        if total >= requests or time.monotonic() > deadline:
            return events
        time.sleep(0.5)


def predict(http: httpx.Client, model: str) -> httpx.Response:
    return http.post("/v1/predictions", json={"model": model, "records": ROWS})


def test_calls_through_a_grant_are_audited_per_window_in_the_owners_log(shared: Shared) -> None:
    made = shared.grant()
    try:
        with shared.server.client(shared.b.api_key) as http:
            answers = [predict(http, shared.name) for _ in range(3)]
            # Through the grant, then refused: a tabular model takes no texts.
            failed = http.post("/v1/predictions", json={"model": shared.name, "texts": ["hi"]})
            time.sleep(WINDOW_S)  # a second window
            answers.append(predict(http, shared.name))
    finally:
        shared.revoke(made["id"])
    for response in answers:
        assert response.status_code == 200, response.text
    assert_error(failed, 400)
    calls = len(answers) + 1

    events = wait_for_requests(shared, made["id"], calls)
    assert sum(e["data"]["requests"] for e in events) == calls, events
    assert sum(e["data"]["errors"] for e in events) == 1
    assert sum(e["data"]["items"] for e in events) == len(answers) * len(ROWS)
    assert sum(e["data"]["tokens"] for e in events) == 0  # a classifier counts items
    for event in events:
        assert event["organization_id"] == shared.a.id
        assert event["target"] == {"type": "grant", "id": made["id"]}
        assert event["data"]["grantee_org_id"] == shared.b.id
        assert event["data"]["minute"] % WINDOW_S == 0
        # Written once its window had ended, never before.
        assert event["effective_at"] >= event["data"]["minute"] + WINDOW_S
    # One event per window (one replica), and the calls spanned two windows at least.
    windows = [e["data"]["minute"] for e in events]
    assert len(windows) == len(set(windows)) >= 2

    # The grantee's own log holds none of them; the chain is whole.
    b_events = audit_events(shared.server, shared.b.api_key)
    assert not [e for e in b_events if e["type"] == "grant.used"]
    with shared.server.client(shared.server.admin_key) as http:
        report = http.get("/v1/audit/verify").json()
    assert report["ok"] is True, report


def test_a_window_still_open_at_shutdown_is_written_by_close(shared: Shared) -> None:
    server = shared.server
    made = shared.grant()
    server.stop()
    server.env["AIAAS_AUDIT_USAGE_WINDOW_S"] = "3600"  # no window ends during the test
    server.start()
    try:
        with server.client(shared.b.api_key) as http:
            assert predict(http, shared.name).status_code == 200
        time.sleep(2.5)  # flushed (usage rows), the hour's window still open
        assert grant_used(server, shared.a.api_key, made["id"]) == []
        shared.revoke(made["id"])
    finally:
        server.stop()
        server.env["AIAAS_AUDIT_USAGE_WINDOW_S"] = str(WINDOW_S)
        server.start()
    events = grant_used(server, shared.a.api_key, made["id"])
    assert [(e["data"]["requests"], e["data"]["grantee_org_id"]) for e in events] == [
        (1, shared.b.id)
    ]
    assert events[0]["data"]["minute"] % 3600 == 0
    with server.client(server.admin_key) as http:
        assert http.get("/v1/audit/verify").json()["ok"] is True


# -- the meter in process ----------------------------------------------------------------------


def usage_row(
    created_at: float, *, status: int = 200, grant: str | None = "grant_1", tokens: int = 5
) -> UsageRow:
    return UsageRow(
        org_id="org_b",
        project_id=None,
        key_id="key_b",
        model="org-a/points",
        endpoint="predictions",
        status=status,
        prompt_tokens=tokens,
        completion_tokens=2 * tokens,
        items=1,
        latency_ms=1.0,
        request_id=None,
        created_at=created_at,
        grant_id=grant,
        owner_org_id="org_a" if grant else None,
    )


class FailingOnce(AuditService):
    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.fail = True

    def record(self, conn: Any, **kwargs: Any) -> Any:
        if self.fail:
            self.fail = False
            raise RuntimeError("the audit log is unavailable")
        return super().record(conn, **kwargs)


def stored(db: Database) -> tuple[int, list[Any]]:
    with db.read() as conn:
        rows = conn.execute(select(func.count()).select_from(usage_records)).scalar_one()
        events = list(audit_repo.iter_chain(conn))
    return rows, [e for e in events if e.action == "grant.used"]


def test_a_failed_write_keeps_rows_and_windows_together_and_counts_them_once(
    tmp_path: Path,
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'meter.db'}")
    db.migrate()
    audit = FailingOnce(db)
    meter = UsageMeter(db, audit=audit, audit_window_s=3600)
    now = time.time()
    past = now - 7200  # an hour that has ended
    for row in (
        usage_row(past),
        usage_row(past, status=500),
        usage_row(past, grant=None),  # B's own model: not audited
        usage_row(now),  # this hour: held until it ends or the meter closes
    ):
        meter.record(row)
    with pytest.raises(RuntimeError):
        meter.flush()
    assert stored(db) == (0, [])  # rolled back together
    meter.flush()
    rows, events = stored(db)
    assert rows == 4
    assert [(e.org_id, e.target_type, e.target_id, e.data) for e in events] == [
        (
            "org_a",
            "grant",
            "grant_1",
            {
                "grantee_org_id": "org_b",
                "minute": int(past // 3600 * 3600),
                "window_s": 3600,
                "requests": 2,
                "errors": 1,
                "tokens": 30,
                "items": 2,
            },
        )
    ]
    meter.flush()  # nothing new: nothing written twice
    assert len(stored(db)[1]) == 1
    meter.close()
    rows, events = stored(db)
    assert rows == 4
    assert [(e.data["minute"], e.data["requests"]) for e in events] == [
        (int(past // 3600 * 3600), 2),
        (int(now // 3600 * 3600), 1),
    ]
    assert audit.verify().ok
    db.close()
