"""Whose dataset a job reads, and whether it still may.

A job normally trains on its own organisation's data. A job created through a `train-on` grant
(`Job.grant_id`) reads another organisation's dataset version: the rows are decrypted only here,
inside the worker process, and never leave it except as the trained model. The grant is checked
when the job starts and at every checkpoint, so a revoked or expired grant stops the job at its
next checkpoint with a clear error.
"""

from __future__ import annotations

from aiaas.domain import GrantPermission, Job
from aiaas.errors import PermissionDenied
from aiaas.ids import now
from aiaas.storage.process import Storage
from aiaas.storage.repos import datasets as datasets_repo
from aiaas.storage.repos import grants as grants_repo


class GrantEnded(PermissionDenied):
    code = "grant_revoked"


def data_org(storage: Storage, job: Job) -> str:
    """The organisation whose dataset version the job reads (its own, or the grantor's), once
    the grant it trains through is checked; raises `GrantEnded` when that grant no longer
    allows it."""
    if job.grant_id is None:
        return job.org_id
    with storage.db.read() as conn:
        grant = grants_repo.get(conn, job.grant_id)
        owned = datasets_repo.owner_of_version(conn, job.dataset_version_id)
        version = (
            datasets_repo.get_version_by_id(
                conn, org_id=owned[0], version_id=job.dataset_version_id
            )
            if owned
            else None
        )
    usable = (
        grant is not None
        and version is not None
        and grant.active(now())
        and grant.grantee_org_id in (job.org_id, "*")
        and grant.org_id == version.org_id
        and grant.object_id == version.dataset_id
        and grant.covers(version.version)
        and grant.permission.allows(GrantPermission.TRAIN_ON)
    )
    if not usable:
        state = grant.status(now()) if grant is not None else "revoked"
        raise GrantEnded(
            f"The grant {job.grant_id} to train on dataset version {job.dataset_version_id} "
            f"is {state}: the owner no longer lets this organisation train on it.",
            param="training_file",
        )
    assert grant is not None
    return grant.org_id
