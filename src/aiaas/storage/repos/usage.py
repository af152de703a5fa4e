"""Usage records and monthly totals. Only this module writes their tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Integer, case, cast, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from aiaas.domain import UsageGroup, UsageRow
from aiaas.storage.tables import usage_monthly, usage_records

# The columns a summary may group by, as the API names them.
GROUP_COLUMNS = {
    "model": usage_records.c.model,
    "project_id": usage_records.c.project_id,
    "api_key_id": usage_records.c.key_id,
    "endpoint": usage_records.c.endpoint,
    "grant_id": usage_records.c.grant_id,
    "organization_id": usage_records.c.org_id,
    "batch": usage_records.c.batch,
}


def insert_records(conn: Connection, rows: Sequence[UsageRow]) -> None:
    if rows:
        conn.execute(insert(usage_records), [_values(row) for row in rows])


def _values(row: UsageRow) -> dict[str, Any]:
    values = {name: getattr(row, name) for name in row.__slots__}
    values["batch"] = int(row.batch)  # an integer column, as the schema's other flags
    return values


def add_monthly(conn: Connection, *, org_id: str, month: str, requests: int, tokens: int) -> None:
    """Add to an organisation's month; a concurrent first insert by another replica is retried
    as an update."""
    where = (usage_monthly.c.org_id == org_id) & (usage_monthly.c.month == month)
    bump = (
        update(usage_monthly)
        .where(where)
        .values(
            requests=usage_monthly.c.requests + requests, tokens=usage_monthly.c.tokens + tokens
        )
    )
    if conn.execute(bump).rowcount:
        return
    try:
        with conn.begin_nested():
            conn.execute(
                insert(usage_monthly).values(
                    org_id=org_id, month=month, requests=requests, tokens=tokens
                )
            )
    except IntegrityError:
        conn.execute(bump)


def month_totals(conn: Connection, month: str) -> dict[str, tuple[int, int]]:
    """org id -> (requests, tokens) in `month`."""
    rows = conn.execute(
        select(usage_monthly.c.org_id, usage_monthly.c.requests, usage_monthly.c.tokens).where(
            usage_monthly.c.month == month
        )
    )
    return {row.org_id: (int(row.requests), int(row.tokens)) for row in rows}


def summarize(
    conn: Connection,
    *,
    org_id: str,
    start: float,
    end: float,
    width_s: int,
    group_by: Sequence[str],
    models: Sequence[str] = (),
    project_ids: Sequence[str] = (),
    shared: bool = False,
) -> list[UsageGroup]:
    """Sums per bucket of `width_s` seconds from `start`, and per the `group_by` columns: of
    the calls `org_id` made, or (`shared`) of the calls others made through its grants."""
    offset = (usage_records.c.created_at - start) / width_s
    # PostgreSQL rounds a float cast to an integer; SQLite truncates (and may lack floor()).
    bucket = func.floor(offset) if conn.dialect.name == "postgresql" else cast(offset, Integer)
    bucket = cast(bucket, Integer).label("bucket")
    keys = [GROUP_COLUMNS[name].label(name) for name in group_by]
    query = (
        select(
            bucket,
            *keys,
            func.count().label("requests"),
            func.sum(case((usage_records.c.status >= 400, 1), else_=0)).label("errors"),
            func.sum(usage_records.c.prompt_tokens).label("prompt_tokens"),
            func.sum(usage_records.c.completion_tokens).label("completion_tokens"),
            func.sum(usage_records.c["items"]).label("items"),
        )
        .where(
            (usage_records.c.owner_org_id if shared else usage_records.c.org_id) == org_id,
            usage_records.c.created_at >= start,
            usage_records.c.created_at < end,
        )
        .group_by(bucket, *keys)
        .order_by(bucket, *keys)
    )
    if models:
        query = query.where(usage_records.c.model.in_(models))
    if project_ids:
        query = query.where(usage_records.c.project_id.in_(project_ids))
    return [
        UsageGroup(
            bucket=int(row.bucket),
            keys={name: _key(name, getattr(row, name)) for name in group_by},
            requests=int(row.requests),
            errors=int(row.errors or 0),
            prompt_tokens=int(row.prompt_tokens or 0),
            completion_tokens=int(row.completion_tokens or 0),
            items=int(row.items or 0),
        )
        for row in conn.execute(query)
    ]


def _key(name: str, value: Any) -> str | bool | None:
    return bool(value) if name == "batch" else value
