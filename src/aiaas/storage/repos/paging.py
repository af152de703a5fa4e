"""Cursor paging shared by the repositories: the cursor is a public id, order is by `seq`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, Row, Table, select

from aiaas.errors import InvalidRequest


def fetch_page(
    conn: Connection,
    table: Table,
    *,
    where: Sequence[ColumnElement[bool]],
    after: str | None,
    limit: int,
    newest_first: bool = False,
) -> tuple[list[Row[Any]], bool]:
    """Rows after the cursor within `where`, and whether more follow (fetches limit + 1)."""
    query = select(table).where(*where)
    if after is not None:
        cursor_seq = conn.execute(
            select(table.c.seq).where(table.c.id == after, *where)
        ).scalar_one_or_none()
        if cursor_seq is None:
            raise InvalidRequest(f"no object with id {after!r} to page after", param="after")
        query = query.where(table.c.seq < cursor_seq if newest_first else table.c.seq > cursor_seq)
    order = table.c.seq.desc() if newest_first else table.c.seq.asc()
    rows = list(conn.execute(query.order_by(order).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
