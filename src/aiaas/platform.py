"""The Platform: the wiring of every part, built once per process and closed once.

`Platform.open(settings)` is the composition root shared by the server's lifespan and the CLI:
it applies migrations, loads the secrets and builds the services. It holds no business logic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from aiaas.domain import IssuedKey
from aiaas.observability.metrics import Metrics
from aiaas.services.audit import AuditService
from aiaas.services.keys import KeyService
from aiaas.services.tenancy import TenancyService
from aiaas.settings import Settings
from aiaas.storage.blobs import EncryptedBlobStore, open_blob_store
from aiaas.storage.crypto import KeyRing, load_or_create_secret
from aiaas.storage.db import Database
from aiaas.storage.repos.data_keys import DataKeyRepo


@dataclass
class Readiness:
    """What still loads; `/health` is 503 until nothing does."""

    loading: set[str] = field(default_factory=set)

    @property
    def ready(self) -> bool:
        return not self.loading


@dataclass
class Platform:
    settings: Settings
    db: Database
    keyring: KeyRing
    blobs: EncryptedBlobStore
    audit: AuditService
    keys: KeyService
    tenancy: TenancyService
    metrics: Metrics
    readiness: Readiness

    @classmethod
    def open(cls, settings: Settings) -> Platform:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.resolved_database_url)
        try:
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
        audit = AuditService(db)
        keys = KeyService(
            db,
            pepper=pepper,
            audit=audit,
            max_lifetime_s=settings.max_key_lifetime_days * 86400.0,
        )
        return cls(
            settings=settings,
            db=db,
            keyring=keyring,
            blobs=blobs,
            audit=audit,
            keys=keys,
            tenancy=TenancyService(db, keys=keys, audit=audit),
            metrics=Metrics(),
            readiness=Readiness(),
        )

    def bootstrap_admin_key(self) -> IssuedKey | None:
        """On the first start, create the operator's key and save it (mode 0600)."""
        issued = self.keys.ensure_platform_admin_key()
        if issued is not None:
            write_private_file(self.settings.admin_key_path, issued.secret + "\n")
        return issued

    def close(self) -> None:
        self.blobs.close()
        self.db.close()


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def write_private_file(path: Path, text: str) -> None:
    """Write a secret file readable by its owner only, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
