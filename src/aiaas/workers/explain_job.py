"""One explanation job, run inside its worker process: a `/v1/explanations` request too large to
answer inline, explained in chunks on the version the request was routed to.

It loads what the server would (the served ONNX graph with its preprocessing for the predictions,
the torch network checked against it for the attributions; `services/explanations.py` does both,
so a job's items are the ones an inline answer would hold) and writes one `ExplanationItem` per
line to a JSON Lines file in the Files API, named by the job's `result`. Cancel is honoured
between chunks; a job that loses its worker starts over.
"""

from __future__ import annotations

import json
import threading
import time

from aiaas.domain import Actor, FilePurpose, JobStatus
from aiaas.engines.classic.model import ClassicModel
from aiaas.errors import InvalidRequest
from aiaas.services.audit import AuditService
from aiaas.services.explanations import load_explainer, render, resolve_options
from aiaas.services.files import FileService
from aiaas.services.predictions import records_from
from aiaas.services.registry import RegistryService
from aiaas.settings import Settings
from aiaas.specs.preprocessing import PreprocessingSpec
from aiaas.storage.process import Storage
from aiaas.storage.repos import registry as registry_repo
from aiaas.training.trainer import Stop
from aiaas.workers.lease import JobLease, run_job

CHUNK = 64  # records explained together (one captum call)
EVENT_S = 5.0  # at most one progress event this often


def run_explanation_job(
    settings: Settings, job_id: str, token: str, *, shutdown: threading.Event
) -> None:
    run_job(settings, job_id, token, _run, shutdown=shutdown)


def _run(settings: Settings, storage: Storage, lease: JobLease) -> None:
    try:
        _explain(settings, storage, lease)
    except BaseException:
        # The harness ends the job as failed: its inputs are of no more use (unless another
        # worker holds it now).
        if not lease.lost:
            storage.blobs.delete(lease.job.spec["input_blob"])
        raise


def _explain(settings: Settings, storage: Storage, lease: JobLease) -> None:
    job = lease.job
    spec = job.spec
    registry = RegistryService(storage.db, storage.blobs, AuditService(storage.db))
    with storage.db.read() as conn:
        version = registry_repo.get_version(
            conn, org_id=spec["owner_org_id"], model_id=spec["model_id"], version=spec["version"]
        )
    if version is None or version.id != spec["version_id"]:
        raise InvalidRequest(
            f"Model '{spec['model_id']}' no longer has version {spec['version']}.", param="model"
        )
    served = ClassicModel.load(
        onnx=registry.read_artifact(version, "model.onnx"),
        description=json.loads(registry.read_artifact(version, "model.json")),
        preprocessing=PreprocessingSpec.model_validate_json(
            registry.read_artifact(version, "preprocessing.json")
        ),
        threads=settings.training_threads,
    )
    explainer = load_explainer(registry, version, served)
    method = spec["method"]
    options = resolve_options(explainer, method, spec["options"])
    given = json.loads(b"".join(storage.blobs.open(spec["input_blob"])))
    rows = given.get("records")
    if rows is None:
        rows = records_from(served, given.get("texts"), given.get("images"))
    lease.event(f"Explaining {len(rows)} records with {method}.")
    lines: list[bytes] = []
    last_event = time.monotonic()
    for start in range(0, len(rows), CHUNK):
        stop = lease.stop_requested()
        if stop is not None:
            _stop(storage, lease, stop)
            return
        chunk = rows[start : start + CHUNK]
        inputs = served.encode_records(chunk)
        logits = served.run(inputs)
        attributions = explainer.explain(inputs, method, options, predicted=logits)
        items = render(
            explainer, chunk, inputs, served.interpret(logits), attributions, offset=start
        )
        lines.extend(json.dumps(item).encode() + b"\n" for item in items)
        if time.monotonic() - last_event >= EVENT_S:
            last_event = time.monotonic()
            lease.event(
                f"Explained {start + len(chunk)} of {len(rows)} records.",
                data={"done": start + len(chunk), "records": len(rows)},
            )
    if lease.stop_requested() is Stop.CANCEL:
        _stop(storage, lease, Stop.CANCEL)
        return
    stored = _write(settings, storage, lease, lines)
    done = lease.finish(
        JobStatus.SUCCEEDED,
        f"Explained {len(rows)} records; the result is file {stored}.",
        result=json.dumps({"file_id": stored, "records": len(rows), "method": method}),
        fine_tuned_model=spec["model_id"],
    )
    if done:
        storage.blobs.delete(spec["input_blob"])


def _write(settings: Settings, storage: Storage, lease: JobLease, lines: list[bytes]) -> str:
    """The result as a file of the job's organisation and project; its id."""
    job = lease.job
    files = FileService(
        storage.db, storage.blobs, AuditService(storage.db), max_file_bytes=settings.max_file_bytes
    )
    return files.write(
        org_id=job.org_id,
        project_id=job.project_id,
        filename=f"{job.id}.jsonl",
        chunks=lines,
        purpose=FilePurpose.USER_DATA,
        actor=Actor(type="job", id=job.id),
    ).id


def _stop(storage: Storage, lease: JobLease, stop: Stop) -> None:
    if lease.lost:
        return
    if stop is Stop.CANCEL:
        if lease.finish(JobStatus.CANCELLED, "Job cancelled."):
            storage.blobs.delete(lease.job.spec["input_blob"])
    else:
        lease.requeue("The server is stopping; queued again (it starts over).")
