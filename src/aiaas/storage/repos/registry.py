"""The model registry. Only this module writes `models` and `model_versions`.

Same life cycle as datasets: a version is `creating` while its artifacts are written, `ready`
(immutable) once they are all in place, `deleting` while they go; a model is `creating` until its
first version is ready. Reads see `ready` rows only, so a crash never shows a half-made version.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, Row, delete, func, insert, select, update

from aiaas.domain import Artifact, ModelAlias, ModelVersion, Page, RegisteredModel
from aiaas.ids import new_id, now
from aiaas.storage.repos.datasets import State
from aiaas.storage.repos.paging import fetch_page
from aiaas.storage.tables import model_aliases, model_versions, models

__all__ = [
    "State",
    "abandoned",
    "count_using_dataset_versions",
    "delete_alias",
    "delete_aliases_of",
    "get_alias",
    "get_model",
    "get_version",
    "list_aliases",
    "list_models",
    "list_versions",
    "mark_model",
    "mark_version",
    "publish_version",
    "remove_model",
    "remove_version",
    "reserve_version",
    "set_alias",
    "versions_of",
]


def _latest(conn: Connection, model_id: str) -> int | None:
    return conn.execute(
        select(func.max(model_versions.c.version)).where(
            model_versions.c.model_id == model_id, model_versions.c.status == State.READY.value
        )
    ).scalar_one_or_none()


def _model(conn: Connection, row: Row[Any]) -> RegisteredModel:
    return RegisteredModel(
        id=row.id,
        org_id=row.org_id,
        project_id=row.project_id,
        base=row.base,
        task=row.task,
        created_at=row.created_at,
        latest_version=_latest(conn, row.id),
    )


def _version(row: Row[Any]) -> ModelVersion:
    artifacts = {
        name: Artifact(name=name, **info) for name, info in json.loads(row.artifacts).items()
    }
    return ModelVersion(
        id=row.id,
        model_id=row.model_id,
        org_id=row.org_id,
        version=row.version,
        artifacts=artifacts,
        metrics=json.loads(row.metrics),
        lineage=json.loads(row.lineage),
        dataset_version_id=row.dataset_version_id,
        job_id=row.job_id,
        created_at=row.created_at,
    )


def reserve_version(
    conn: Connection,
    *,
    version_id: str,
    model_id: str,
    org_id: str,
    project_id: str,
    base: str,
    task: str,
    created_by: str | None,
) -> int:
    """Make the model row when it is new, and take the next version number for it."""
    exists = conn.execute(select(models.c.id).where(models.c.id == model_id)).scalar_one_or_none()
    if exists is None:
        conn.execute(
            insert(models).values(
                id=model_id,
                org_id=org_id,
                project_id=project_id,
                base=base,
                task=task,
                status=State.CREATING.value,
                created_by=created_by,
                created_at=now(),
            )
        )
    highest = conn.execute(
        select(func.max(model_versions.c.version)).where(model_versions.c.model_id == model_id)
    ).scalar_one_or_none()
    number = (highest or 0) + 1
    conn.execute(
        insert(model_versions).values(
            id=version_id,
            model_id=model_id,
            org_id=org_id,
            version=number,
            status=State.CREATING.value,
            artifacts="{}",
            metrics="{}",
            lineage="{}",
            created_by=created_by,
            created_at=now(),
        )
    )
    return number


def publish_version(
    conn: Connection,
    *,
    version_id: str,
    artifacts: list[Artifact],
    metrics: dict[str, Any],
    lineage: dict[str, Any],
    dataset_version_id: str | None,
    job_id: str | None,
) -> ModelVersion:
    documents = {
        a.name: {"blob_key": a.blob_key, "bytes": a.bytes, "sha256": a.sha256} for a in artifacts
    }
    conn.execute(
        update(model_versions)
        .where(model_versions.c.id == version_id)
        .values(
            status=State.READY.value,
            artifacts=json.dumps(documents),
            metrics=json.dumps(metrics, allow_nan=False),
            lineage=json.dumps(lineage, allow_nan=False),
            dataset_version_id=dataset_version_id,
            job_id=job_id,
        )
    )
    row = conn.execute(select(model_versions).where(model_versions.c.id == version_id)).one()
    conn.execute(update(models).where(models.c.id == row.model_id).values(status=State.READY.value))
    return _version(row)


def get_model(conn: Connection, *, org_id: str, model_id: str) -> RegisteredModel | None:
    row = conn.execute(
        select(models).where(
            models.c.id == model_id, models.c.org_id == org_id, models.c.status == State.READY.value
        )
    ).first()
    return _model(conn, row) if row else None


def owner_of_model(conn: Connection, model_id: str) -> str | None:
    """The organisation a ready model belongs to, whoever asks (for a grant check)."""
    row = conn.execute(
        select(models.c.org_id).where(models.c.id == model_id, models.c.status == State.READY.value)
    ).first()
    return row.org_id if row else None


def list_models(
    conn: Connection, *, org_id: str, after: str | None = None, limit: int = 1000
) -> Page[RegisteredModel]:
    where = [models.c.org_id == org_id, models.c.status == State.READY.value]
    rows, more = fetch_page(conn, models, where=where, after=after, limit=limit)
    return Page(items=[_model(conn, r) for r in rows], has_more=more)


def get_version(
    conn: Connection, *, org_id: str, model_id: str, version: int
) -> ModelVersion | None:
    row = conn.execute(
        select(model_versions).where(
            model_versions.c.model_id == model_id,
            model_versions.c.org_id == org_id,
            model_versions.c.version == version,
            model_versions.c.status == State.READY.value,
        )
    ).first()
    return _version(row) if row else None


def list_versions(
    conn: Connection, *, org_id: str, model_id: str, after: str | None, limit: int
) -> Page[ModelVersion]:
    where = [
        model_versions.c.model_id == model_id,
        model_versions.c.org_id == org_id,
        model_versions.c.status == State.READY.value,
    ]
    rows, more = fetch_page(conn, model_versions, where=where, after=after, limit=limit)
    return Page(items=[_version(r) for r in rows], has_more=more)


def versions_of(conn: Connection, *, model_id: str) -> list[tuple[str, list[str]]]:
    """`(id, blob keys)` of every version of a model, whatever its state."""
    rows = conn.execute(
        select(model_versions.c.id, model_versions.c.artifacts).where(
            model_versions.c.model_id == model_id
        )
    )
    return [(r.id, [a["blob_key"] for a in json.loads(r.artifacts).values()]) for r in rows]


def mark_model(conn: Connection, *, model_id: str, state: State) -> None:
    conn.execute(update(models).where(models.c.id == model_id).values(status=state.value))


def mark_version(conn: Connection, *, version_id: str, state: State) -> None:
    conn.execute(
        update(model_versions).where(model_versions.c.id == version_id).values(status=state.value)
    )


def remove_version(conn: Connection, *, version_id: str) -> None:
    conn.execute(delete(model_versions).where(model_versions.c.id == version_id))


def remove_model(conn: Connection, *, model_id: str) -> None:
    conn.execute(delete(models).where(models.c.id == model_id))


def count_using_dataset_versions(conn: Connection, *, version_ids: list[str]) -> int:
    return conn.execute(
        select(func.count())
        .select_from(model_versions)
        .where(
            model_versions.c.dataset_version_id.in_(version_ids),
            model_versions.c.status != State.DELETING.value,
        )
    ).scalar_one()


def abandoned(conn: Connection, *, creating_before: float) -> tuple[list[Row[Any]], list[str]]:
    """Versions to clean up (`deleting`, or `creating` for too long) as (id, model_id, org_id)
    rows, and models left without versions that are not `ready`."""
    stale = (model_versions.c.status == State.CREATING.value) & (
        model_versions.c.created_at < creating_before
    )
    versions = list(
        conn.execute(
            select(model_versions.c.id, model_versions.c.model_id, model_versions.c.org_id).where(
                (model_versions.c.status == State.DELETING.value) | stale
            )
        )
    )
    has_versions = select(model_versions.c.id).where(
        model_versions.c.model_id == models.c.id,
        model_versions.c.status != State.DELETING.value,
        ~stale,
    )
    empty = conn.execute(
        select(models.c.id).where(models.c.status != State.READY.value, ~has_versions.exists())
    ).scalars()
    return versions, list(empty)


# -- aliases -----------------------------------------------------------------------------------


def _alias(row: Row[Any]) -> ModelAlias:
    return ModelAlias(
        model_id=row.model_id, alias=row.alias, version=row.version, updated_at=row.updated_at
    )


def set_alias(
    conn: Connection,
    *,
    model_id: str,
    org_id: str,
    alias: str,
    version: int,
    updated_by: str | None,
) -> ModelAlias:
    """Point `alias` at `version` (made, or moved); the caller checked the version exists."""
    moved = conn.execute(
        update(model_aliases)
        .where(model_aliases.c.model_id == model_id, model_aliases.c.alias == alias)
        .values(version=version, updated_by=updated_by, updated_at=now())
    )
    if moved.rowcount == 0:
        conn.execute(
            insert(model_aliases).values(
                id=new_id("alias"),
                model_id=model_id,
                org_id=org_id,
                alias=alias,
                version=version,
                updated_by=updated_by,
                updated_at=now(),
            )
        )
    found = get_alias(conn, model_id=model_id, alias=alias)
    assert found is not None
    return found


def get_alias(conn: Connection, *, model_id: str, alias: str) -> ModelAlias | None:
    row = conn.execute(
        select(model_aliases).where(
            model_aliases.c.model_id == model_id, model_aliases.c.alias == alias
        )
    ).first()
    return _alias(row) if row else None


def list_aliases(conn: Connection, *, model_id: str) -> list[ModelAlias]:
    rows = conn.execute(
        select(model_aliases)
        .where(model_aliases.c.model_id == model_id)
        .order_by(model_aliases.c.alias)
    )
    return [_alias(r) for r in rows]


def delete_alias(conn: Connection, *, model_id: str, alias: str) -> bool:
    result = conn.execute(
        delete(model_aliases).where(
            model_aliases.c.model_id == model_id, model_aliases.c.alias == alias
        )
    )
    return result.rowcount == 1


def delete_aliases_of(conn: Connection, *, model_id: str) -> None:
    conn.execute(delete(model_aliases).where(model_aliases.c.model_id == model_id))
