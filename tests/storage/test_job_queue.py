"""The job queue on a real database (SQLite and PostgreSQL): fair claims, exclusive claims,
fenced workers, requeues that honour a pending cancel or pause."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from aiaas.domain import JobControl, JobStatus
from aiaas.ids import new_id
from aiaas.storage.db import Database
from aiaas.storage.repos import jobs as repo
from aiaas.storage.repos import tenancy
from tests.conftest import BACKENDS, PostgresDatabases


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'q.db'}"
    else:
        dbs: PostgresDatabases = request.getfixturevalue("postgres_databases")
        url = dbs.create()
    database = Database(url)
    database.migrate()
    yield database
    database.close()


def _org(db: Database, name: str, weight: float = 1.0) -> tuple[str, str]:
    with db.write() as conn:
        org = tenancy.create_org(conn, name=name, weight=weight)
        project = tenancy.create_project(conn, org_id=org.id, name="default", is_default=True)
    return org.id, project.id


def _queue(db: Database, org: tuple[str, str], n: int = 1) -> list[str]:
    ids = []
    for _ in range(n):
        job_id = new_id("ftjob", sep="-")
        with db.write() as conn:
            repo.insert_job(
                conn,
                job_id=job_id,
                org_id=org[0],
                project_id=org[1],
                kind="training",
                model="mlp",
                dataset_version_id="dsv_x",
                task="classification",
                target_column="label",
                spec={},
                seed=1,
                suffix=None,
                metadata=None,
                register_to=None,
                created_by=None,
            )
        ids.append(job_id)
    return ids


def _claim(db: Database, worker: str = "w") -> str | None:
    with db.write() as conn:
        job = repo.claim_next(conn, worker=worker, kinds=["training"])
    return job.id if job else None


def test_an_organisation_with_nothing_running_goes_first(db: Database) -> None:
    busy, quiet = _org(db, "busy"), _org(db, "quiet")
    first, second, third = _queue(db, busy, 3)
    [theirs] = _queue(db, quiet)
    assert _claim(db, "w1") == first
    # busy has one running; quiet none, though its job was queued after busy's other two.
    assert _claim(db, "w2") == theirs
    assert _claim(db, "w3") == second
    assert _claim(db, "w4") == third
    assert _claim(db, "w5") is None


def test_a_heavier_organisation_gets_more_workers(db: Database) -> None:
    heavy, light = _org(db, "heavy", weight=3.0), _org(db, "light")
    heavy_jobs = _queue(db, heavy, 4)
    light_jobs = _queue(db, light, 4)
    claimed = [_claim(db, f"w{i}") for i in range(4)]
    # Running jobs per unit of weight, lowest first (ties: oldest job):
    # 0 vs 0 → heavy; 1/3 vs 0 → light; 1/3 vs 1 → heavy; 2/3 vs 1 → heavy.
    assert claimed == [heavy_jobs[0], light_jobs[0], heavy_jobs[1], heavy_jobs[2]]


def test_a_job_is_claimed_once(db: Database) -> None:
    [job_id] = _queue(db, _org(db, "acme"))
    assert _claim(db, "a") == job_id
    assert _claim(db, "b") is None
    with db.read() as conn:
        job = repo.get_job_any(conn, job_id=job_id)
    assert job is not None and job.worker == "a" and job.attempts == 1


def test_a_worker_whose_job_was_taken_back_can_write_nothing(db: Database) -> None:
    [job_id] = _queue(db, _org(db, "acme"))
    _claim(db, "old")
    with db.write() as conn:
        assert repo.requeue(conn, job_id=job_id, worker="old")
    assert _claim(db, "new") == job_id
    with db.write() as conn:
        assert repo.heartbeat(conn, job_id=job_id, worker="old") == (False, None)
        assert (
            repo.add_checkpoint(
                conn,
                job_id=job_id,
                worker="old",
                epoch=1,
                step=1,
                metrics=None,
                blob_key="jobs/x/y/z",
                size=1,
            )
            is None
        )
        assert not repo.transition(
            conn,
            job_id=job_id,
            expected=[JobStatus.RUNNING],
            status=JobStatus.SUCCEEDED,
            held_by="old",
        )
        assert repo.heartbeat(conn, job_id=job_id, worker="new") == (True, None)
    with db.read() as conn:
        job = repo.get_job_any(conn, job_id=job_id)
    assert job is not None and job.status is JobStatus.RUNNING and job.attempts == 2


@pytest.mark.parametrize(
    ("control", "after"),
    [
        (None, JobStatus.QUEUED),
        (JobControl.CANCEL, JobStatus.CANCELLED),
        (JobControl.PAUSE, JobStatus.PAUSED),
    ],
)
def test_a_dead_workers_job_honours_a_pending_request(
    db: Database, control: JobControl | None, after: JobStatus
) -> None:
    [job_id] = _queue(db, _org(db, "acme"))
    _claim(db, "w")
    with db.write() as conn:
        if control is not None:
            assert repo.request_control(conn, job_id=job_id, control=control)
            assert repo.heartbeat(conn, job_id=job_id, worker="w") == (True, control)
        assert repo.requeue(conn, job_id=job_id, worker="w")
    with db.read() as conn:
        job = repo.get_job_any(conn, job_id=job_id)
    assert job is not None and job.status is after
    assert job.worker is None and job.control is None


def test_only_the_newest_checkpoint_keeps_its_blob(db: Database) -> None:
    [job_id] = _queue(db, _org(db, "acme"))
    _claim(db, "w")
    with db.write() as conn:
        first = repo.add_checkpoint(
            conn, job_id=job_id, worker="w", epoch=1, step=5, metrics={}, blob_key="k1", size=1
        )
        second = repo.add_checkpoint(
            conn, job_id=job_id, worker="w", epoch=2, step=10, metrics={}, blob_key="k2", size=1
        )
        latest = repo.latest_checkpoint(conn, job_id=job_id)
        listed = repo.list_checkpoints(conn, job_id=job_id, after=None, limit=10).items
    assert first == [] and second == ["k1"]
    assert latest is not None and (latest.step, latest.blob_key) == (10, "k2")
    assert [(c.step, c.blob_key) for c in listed] == [(10, "k2"), (5, None)]
