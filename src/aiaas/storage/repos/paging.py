"""Cursor paging shared by the repositories: the cursor is a public id, order is by `seq`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Connection, Row, Table, select

from aiaas.domain import Page
from aiaas.errors import InvalidRequest

T = TypeVar("T")


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


def after_cursor(items: Sequence[T], after: str | None, *, id_of: Callable[[T], str]) -> list[T]:
    """The items that follow the one whose id is `after` (all of them when None), with the same
    cursor rule as `fetch_page`: an id not among them is a 400."""
    if after is None:
        return list(items)
    ids = [id_of(item) for item in items]
    if after not in ids:
        raise InvalidRequest(f"no object with id {after!r} to page after", param="after")
    return list(items[ids.index(after) + 1 :])


def page_in_memory(
    items: Sequence[T], *, after: str | None, limit: int, id_of: Callable[[T], str]
) -> Page[T]:
    """A page of a list already in memory, paged like the repositories' lists."""
    rest = after_cursor(items, after, id_of=id_of)
    return Page(items=rest[:limit], has_more=len(rest) > limit)
