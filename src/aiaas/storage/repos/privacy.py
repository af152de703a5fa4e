"""Privacy policies per organisation and project. Only this module writes `privacy_policies`.

A policy is stored as the JSON object `privacy.policy.PrivacyPolicy.to_json` makes; this layer
keeps it as a dict (storage does not import `privacy`).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from aiaas.ids import now
from aiaas.storage.tables import privacy_policies

ORG_SCOPE = ""  # the project_id of an organisation-wide policy


def get(conn: Connection, *, org_id: str, project_id: str | None = None) -> dict[str, Any] | None:
    row = conn.execute(
        select(privacy_policies.c.policy).where(
            privacy_policies.c.org_id == org_id,
            privacy_policies.c.project_id == (project_id or ORG_SCOPE),
        )
    ).first()
    return json.loads(row.policy) if row else None


def put(
    conn: Connection,
    *,
    org_id: str,
    policy: dict[str, Any],
    project_id: str | None = None,
    updated_by: str | None = None,
) -> None:
    scope = project_id or ORG_SCOPE
    values = {"policy": json.dumps(policy, sort_keys=True), "updated_by": updated_by}
    done = conn.execute(
        update(privacy_policies)
        .where(privacy_policies.c.org_id == org_id, privacy_policies.c.project_id == scope)
        .values(**values, updated_at=now())
    )
    if done.rowcount == 0:
        conn.execute(
            insert(privacy_policies).values(
                org_id=org_id, project_id=scope, updated_at=now(), **values
            )
        )


def remove(conn: Connection, *, org_id: str, project_id: str | None = None) -> bool:
    done = conn.execute(
        delete(privacy_policies).where(
            privacy_policies.c.org_id == org_id,
            privacy_policies.c.project_id == (project_id or ORG_SCOPE),
        )
    )
    return done.rowcount > 0
