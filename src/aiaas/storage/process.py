"""The storage a process needs (database, secrets, encrypted blobs), opened from `Settings`.

Shared by the server's `Platform` and by job worker processes, which need storage but none of
the server's engines.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import SecretStr

from aiaas.settings import Settings
from aiaas.storage.blobs import EncryptedBlobStore, open_blob_store
from aiaas.storage.crypto import KeyRing, load_or_create_secret
from aiaas.storage.db import Database
from aiaas.storage.repos.data_keys import DataKeyRepo


@dataclass
class Storage:
    db: Database
    keyring: KeyRing
    blobs: EncryptedBlobStore
    pepper: bytes

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool) -> Storage:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.resolved_database_url)
        try:
            if migrate:
                db.migrate()
            master = load_or_create_secret(
                _secret(settings.master_key),
                settings.data_dir / "master-key",
                name="AIAAS_MASTER_KEY",
            )
            pepper = load_or_create_secret(
                _secret(settings.key_pepper),
                settings.data_dir / "key-pepper",
                name="AIAAS_KEY_PEPPER",
            )
            keyring = KeyRing(master, DataKeyRepo(db))
            blobs = open_blob_store(settings.resolved_blob_url, keyring)
        except BaseException:
            db.close()
            raise
        return cls(db=db, keyring=keyring, blobs=blobs, pepper=pepper)

    def close(self) -> None:
        self.blobs.close()
        self.db.close()


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
