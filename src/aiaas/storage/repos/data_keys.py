"""Wrapped per-owner data keys (the envelope-encryption key table). Only this module writes it."""

from __future__ import annotations

from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError

from aiaas.ids import new_id, now
from aiaas.storage.db import Database
from aiaas.storage.tables import data_keys


class DataKeyRepo:
    """Stores each owner's data key wrapped by the master key; never sees a key in the clear."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, owner: str) -> tuple[str, bytes] | None:
        """The owner's `(key_id, wrapped_key)`, or None when it has none yet."""
        with self._db.read() as conn:
            return _get(conn, owner)

    def get_by_id(self, key_id: str) -> tuple[str, bytes] | None:
        """`(owner, wrapped_key)` of a key named in a blob header."""
        with self._db.read() as conn:
            row = conn.execute(
                select(data_keys.c.owner, data_keys.c.wrapped_key).where(data_keys.c.id == key_id)
            ).first()
        return (row.owner, bytes(row.wrapped_key)) if row else None

    def create_if_absent(self, owner: str, wrapped_key: bytes) -> tuple[str, bytes]:
        """Insert a key for the owner unless one exists; return the one that is stored.

        Two replicas racing to create the first key agree on the winner's key.
        """
        key_id = new_id("dk")
        try:
            with self._db.write() as conn:
                existing = _get(conn, owner)
                if existing is not None:
                    return existing
                conn.execute(
                    insert(data_keys).values(
                        id=key_id, owner=owner, wrapped_key=wrapped_key, created_at=now()
                    )
                )
                return key_id, wrapped_key
        except IntegrityError:
            stored = self.get(owner)
            if stored is None:
                raise
            return stored


def _get(conn: Connection, owner: str) -> tuple[str, bytes] | None:
    row = conn.execute(
        select(data_keys.c.id, data_keys.c.wrapped_key).where(data_keys.c.owner == owner)
    ).first()
    return (row.id, bytes(row.wrapped_key)) if row else None
