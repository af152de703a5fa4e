"""Batches (OpenAI's `/v1/batches`): create, read, cancel; and the runner that works them.

A batch names an uploaded JSONL file (purpose `batch`) of requests to one endpoint. The runner
lives in the server process, beside the engines: each line goes through `BatchLines`, the same
services the HTTP routes call, marked as background work, so batch lines fill the slots and
batcher capacity that interactive requests leave free, and never a second copy of a model.

Durability. Finished lines are written in parts: a part's results go to an encrypted blob, then
a row in `batch_parts` names its line numbers, in one transaction with the batch's counters. A
runner that dies loses at most the lines in flight; whoever takes the batch over (this process
after a restart, or another replica once the heartbeat is stale) skips the lines the parts name.
At the end the parts become the output file (answered lines) and the error file (refused
lines, and lines a cancel or the completion window cut off), each in the input file's order.

    validating ─► in_progress ─► finalizing ─► completed
        │              ├──────────────────────► expired     (the window passed)
        │              └─► cancelling ────────► cancelled   (files hold what was done)
        └─► failed      (the input file is unusable; the errors name its lines)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from aiaas.domain import Actor, Batch, BatchStatus, FilePurpose, Page, Principal
from aiaas.errors import ApiError, InvalidRequest, NotFound
from aiaas.ids import new_id, now
from aiaas.protocol.batches import BatchCreate, BatchLine
from aiaas.services.audit import AuditService
from aiaas.services.batch_lines import BatchLines, LineResult, Retry
from aiaas.services.files import FileService
from aiaas.services.keys import KeyService
from aiaas.storage.blobs import EncryptedBlobStore
from aiaas.storage.db import Database
from aiaas.storage.repos import batches as repo
from aiaas.storage.repos.batches import BatchPart

log = logging.getLogger("aiaas.batches")

MAX_LISTED_ERRORS = 100  # input-file problems named in a failed batch
SYSTEM = Actor(type="system", id="batch-runner")


@dataclass(frozen=True, slots=True)
class Line:
    number: int  # 1-based, as editors count
    custom_id: str
    body: dict[str, Any]

    def prefix_key(self, endpoint: str) -> str:
        """What lines that share a prompt prefix have in common: they run next to each other,
        after the first of them has left its prefix in the engine's cache."""
        model = str(self.body.get("model", ""))
        if endpoint == "/v1/chat/completions":
            messages = self.body.get("messages")
            first = messages[0] if isinstance(messages, list) and messages else None
            return model + "\x00" + json.dumps(first, sort_keys=True, default=str)[:4096]
        if endpoint == "/v1/completions":
            prompt = self.body.get("prompt")
            return model + "\x00" + (prompt[:256] if isinstance(prompt, str) else "")
        return model + "\x00" + str(self.number)  # nothing to share: no grouping


class BatchService:
    def __init__(
        self,
        db: Database,
        blobs: EncryptedBlobStore,
        files: FileService,
        audit: AuditService,
        *,
        max_lines: int,
        max_line_bytes: int,
    ) -> None:
        self._db = db
        self.blobs = blobs
        self.files = files
        self._audit = audit
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes
        self._wake: list[asyncio.Event] = []  # set by create and cancel: the runner looks now

    def on_change(self, event: asyncio.Event) -> None:
        self._wake.append(event)

    def _changed(self) -> None:
        for event in self._wake:
            event.set()

    # -- use cases -----------------------------------------------------------------------------

    def create(
        self,
        *,
        principal: Principal,
        org_id: str,
        project_id: str,
        request: BatchCreate,
    ) -> Batch:
        stored = self.files.get(org_id=org_id, file_id=request.input_file_id)  # 404: not ours
        if stored.purpose is not FilePurpose.BATCH:
            raise InvalidRequest(
                f"File {stored.id} has purpose '{stored.purpose.value}'; a batch reads a file "
                "uploaded with purpose 'batch'.",
                param="input_file_id",
            )
        created = now()
        batch = Batch(
            id=new_id("batch"),
            org_id=org_id,
            project_id=project_id,
            key_id=principal.key_id,
            endpoint=request.endpoint,
            input_file_id=stored.id,
            completion_window=request.completion_window,
            status=BatchStatus.VALIDATING,
            created_at=created,
            expires_at=created + int(request.completion_window[:-1]) * 3600.0,
            metadata=request.metadata,
        )
        with self._db.write() as conn:
            repo.insert_batch(conn, batch)
            self._audit.record(
                conn,
                actor=Actor.of(principal),
                action="batch.created",
                target_type="batch",
                target_id=batch.id,
                org_id=org_id,
                project_id=project_id,
                data={"endpoint": batch.endpoint, "input_file_id": batch.input_file_id},
            )
        self._changed()
        return batch

    def get(self, *, org_id: str, batch_id: str) -> Batch:
        with self._db.read() as conn:
            batch = repo.get_batch(conn, org_id=org_id, batch_id=batch_id)
        if batch is None:
            raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch

    def list(self, *, org_id: str, after: str | None, limit: int) -> Page[Batch]:
        with self._db.read() as conn:
            return repo.list_batches(conn, org_id=org_id, after=after, limit=limit)

    def cancel(self, *, org_id: str, batch_id: str, actor: Actor) -> Batch:
        """validating or in_progress -> cancelling; the runner stops sending lines and writes
        what was done. Cancelling again changes nothing; a batch that ended otherwise (or is
        writing its files) is a 400."""
        with self._db.write() as conn:
            batch = repo.get_batch(conn, org_id=org_id, batch_id=batch_id)
            if batch is None:
                raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
            if repo.request_cancel(conn, org_id=org_id, batch_id=batch_id):
                self._audit.record(
                    conn,
                    actor=actor,
                    action="batch.cancelled",
                    target_type="batch",
                    target_id=batch_id,
                    org_id=org_id,
                    project_id=batch.project_id,
                )
            elif batch.status not in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
                raise InvalidRequest(
                    f"Batch {batch_id} is {batch.status.value}; it can no longer be cancelled.",
                    param="batch_id",
                    code="batch_not_cancellable",
                )
            batch = repo.get_batch(conn, org_id=org_id, batch_id=batch_id)
        self._changed()
        assert batch is not None
        return batch

    # -- reading the input file ----------------------------------------------------------------

    def read_lines(self, batch: Batch) -> tuple[list[Line], list[dict[str, Any]]]:
        """The input file's requests, or the problems that make it unusable (line numbers are
        1-based). Blocking: call it in a thread."""
        try:
            _stored, chunks = self.files.open(org_id=batch.org_id, file_id=batch.input_file_id)
        except NotFound:
            return [], [
                _problem("file_not_found", f"The input file {batch.input_file_id} was deleted.")
            ]
        lines: list[Line] = []
        problems: list[dict[str, Any]] = []
        seen: set[str] = set()
        for number, raw in _split_lines(chunks, self.max_line_bytes):
            if len(problems) >= MAX_LISTED_ERRORS:
                break
            if raw is None:
                problems.append(
                    _problem(
                        "line_too_long",
                        f"The line is longer than {self.max_line_bytes} bytes.",
                        line=number,
                    )
                )
                continue
            if not raw.strip():
                continue
            try:
                parsed = BatchLine.model_validate_json(raw)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first.get("loc", ())) or None
                problems.append(
                    _problem("invalid_request", f"{first['msg']}", param=where, line=number)
                )
                continue
            if parsed.url != batch.endpoint:
                problems.append(
                    _problem(
                        "mismatched_endpoint",
                        f"The line's url '{parsed.url}' is not the batch's endpoint "
                        f"'{batch.endpoint}'.",
                        param="url",
                        line=number,
                    )
                )
            elif parsed.custom_id in seen:
                problems.append(
                    _problem(
                        "duplicate_custom_id",
                        f"The custom_id '{parsed.custom_id}' is used by an earlier line.",
                        param="custom_id",
                        line=number,
                    )
                )
            else:
                seen.add(parsed.custom_id)
                lines.append(Line(number, parsed.custom_id, parsed.body))
            if len(lines) > self.max_lines:
                problems.append(
                    _problem(
                        "too_many_requests",
                        f"The file holds more than {self.max_lines} requests.",
                        line=number,
                    )
                )
                break
        if not lines and not problems:
            problems.append(_problem("empty_file", "The input file holds no requests."))
        return lines, problems

    # -- parts ---------------------------------------------------------------------------------

    def write_part(self, batch: Batch, runner: str, part: int, results: list[LineResult]) -> bool:
        """Store finished lines: the blob first, then the row naming them (with the batch's
        counters, in one transaction). False when the runner no longer holds the batch."""
        blob_key = f"batches/{batch.org_id}/{batch.id}/part-{part:06d}.jsonl"
        payload = b"".join(
            json.dumps(
                {"line": r.line, "ok": r.ok, "record": r.record(new_id("batch_req"))},
                separators=(",", ":"),
            ).encode()
            + b"\n"
            for r in results
        )
        self.blobs.put(batch.org_id, blob_key, [payload])
        row = BatchPart(
            part=part,
            blob_key=blob_key,
            lines=[r.line for r in results],
            completed=sum(r.ok for r in results),
            failed=sum(not r.ok for r in results),
            input_tokens=sum(r.input_tokens for r in results),
            output_tokens=sum(r.output_tokens for r in results),
            cached_tokens=sum(r.cached_tokens for r in results),
        )
        with self._db.write() as conn:
            kept = repo.add_part(conn, batch_id=batch.id, runner=runner, part=row)
        if not kept:
            self.blobs.delete(blob_key)
        return kept

    def parts(self, batch_id: str) -> list[BatchPart]:
        with self._db.read() as conn:
            return repo.parts(conn, batch_id=batch_id)

    def read_parts(self, parts: list[BatchPart]) -> dict[int, dict[str, Any]]:
        """Line number -> {"ok", "record"} over every part."""
        found: dict[int, dict[str, Any]] = {}
        for part in parts:
            data = b"".join(self.blobs.open(part.blob_key))
            for raw in data.splitlines():
                entry = json.loads(raw)
                found[entry["line"]] = entry
        return found

    def drop_parts(self, batch_id: str, parts: list[BatchPart]) -> None:
        for part in parts:
            self.blobs.delete(part.blob_key)
        with self._db.write() as conn:
            repo.remove_parts(conn, batch_id=batch_id)

    # -- the runner's writes -------------------------------------------------------------------

    def claim(self, runner: str, stale_before: float, limit: int) -> list[str]:
        with self._db.read() as conn:  # every second on every replica: a read, mostly
            candidates = repo.claimable(conn, stale_before=stale_before, limit=limit)
        if not candidates:
            return []
        with self._db.write() as conn:
            return [
                batch_id
                for batch_id in candidates
                if repo.claim(conn, batch_id=batch_id, runner=runner, stale_before=stale_before)
            ]

    def heartbeat(self, runner: str, batch_ids: list[str]) -> set[str]:
        with self._db.write() as conn:
            return repo.heartbeat(conn, runner=runner, batch_ids=batch_ids)

    def held(self, batch_id: str, runner: str) -> Batch | None:
        with self._db.read() as conn:
            return repo.held(conn, batch_id=batch_id, runner=runner)

    def status(self, batch_id: str) -> BatchStatus | None:
        with self._db.read() as conn:
            return repo.status_of(conn, batch_id=batch_id)

    def update(self, batch_id: str, runner: str, **values: Any) -> bool:
        with self._db.write() as conn:
            return repo.update_held(conn, batch_id=batch_id, runner=runner, **values)

    def release(self, batch_id: str, runner: str) -> None:
        with self._db.write() as conn:
            repo.release(conn, batch_id=batch_id, runner=runner)

    def write_file(self, batch: Batch, name: str, records: list[dict[str, Any]]) -> str:
        """A JSON Lines file of purpose `batch_output` in the batch's project; its id."""
        return self.files.write(
            org_id=batch.org_id,
            project_id=batch.project_id,
            filename=f"{batch.id}_{name}.jsonl",
            chunks=_jsonl(records),
            purpose=FilePurpose.BATCH_OUTPUT,
            actor=SYSTEM,
        ).id

    def visible_file(self, batch: Batch, file_id: str | None) -> bool:
        if file_id is None:
            return False
        try:
            self.files.get(org_id=batch.org_id, file_id=file_id)
        except NotFound:
            return False
        return True


@dataclass
class BatchRunnerConfig:
    concurrency: int = 32  # lines of one batch in flight
    max_batches: int = 2  # batches one runner works at once
    heartbeat_timeout_s: float = 60.0
    poll_s: float = 1.0
    part_lines: int = 64  # a part is written when this many lines finished ...
    part_every_s: float = 2.0  # ... or this long after its first line finished


class BatchRunner:
    """Claims active batches and works them on the server's event loop."""

    def __init__(
        self,
        service: BatchService,
        lines: BatchLines,
        keys: KeyService,
        config: BatchRunnerConfig,
    ) -> None:
        self._service = service
        self._lines = lines
        self._keys = keys
        self._config = config
        self.token = f"runner-{secrets.token_hex(8)}"
        self._running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        service.on_change(self._wake)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batch-runner")

    async def close(self) -> None:
        """Stop working: lines in flight are dropped (a restart sends them again) and the
        claims are released, so another replica may take the batches over at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database was unavailable: try again next tick
                log.exception("batch runner tick failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._config.poll_s)

    async def _tick(self) -> None:
        held = list(self._running)
        if held:
            kept = await asyncio.to_thread(self._service.heartbeat, self.token, held)
            for lost in set(held) - kept:  # another runner took it over: stop ours
                self._running[lost].cancel()
        room = self._config.max_batches - len(self._running)
        if room <= 0:
            return
        stale = now() - self._config.heartbeat_timeout_s
        for batch_id in await asyncio.to_thread(self._service.claim, self.token, stale, room):
            task = asyncio.get_running_loop().create_task(
                self._work(batch_id), name=f"batch-{batch_id}"
            )
            self._running[batch_id] = task

    async def _work(self, batch_id: str) -> None:
        try:
            await _Execution(
                self._service, self._lines, self._keys, self._config, self.token, batch_id
            ).run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch %s: the runner failed; it is released for another try", batch_id)
        finally:
            self._running.pop(batch_id, None)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._service.release, batch_id, self.token)
            self._wake.set()


@dataclass
class _Execution:
    """One runner's turn at one batch."""

    service: BatchService
    lines: BatchLines
    keys: KeyService
    config: BatchRunnerConfig
    runner: str
    batch_id: str
    results: list[LineResult] = field(default_factory=list)
    first_result_at: float | None = None
    next_part: int = 0
    principal: Principal | None = None
    principal_at: float = 0.0
    flushing: asyncio.Future[bool] | None = None  # the part being written
    problems: list[dict[str, Any]] = field(default_factory=list)
    stop: str | None = None  # why lines stopped being sent: "cancelled", "expired", "key", "lost"

    async def run(self) -> None:
        batch = await asyncio.to_thread(self.service.held, self.batch_id, self.runner)
        if batch is None:
            return
        lines, problems = await asyncio.to_thread(self.service.read_lines, batch)
        if batch.status is BatchStatus.VALIDATING:
            if problems:
                await self._update(
                    status=BatchStatus.FAILED, failed_at=now(), errors=problems, total=0
                )
                return
            await self._update(
                status=BatchStatus.IN_PROGRESS, in_progress_at=now(), total=len(lines)
            )
            batch = dataclasses.replace(batch, status=BatchStatus.IN_PROGRESS)
        elif problems:  # the input file went away while the batch ran
            self.stop, self.problems = "input", problems
        parts = await asyncio.to_thread(self.service.parts, batch.id)
        self.next_part = max((p.part for p in parts), default=-1) + 1
        done = {line for part in parts for line in part.lines}
        pending = [line for line in lines if line.number not in done]
        if batch.status is BatchStatus.IN_PROGRESS and pending:
            await self._send(batch, pending)
        await self._finish(batch, lines)

    # -- sending lines ---------------------------------------------------------------------

    async def _send(self, batch: Batch, pending: list[Line]) -> None:
        """Send the lines, at most `concurrency` in flight. Lines that share a prompt prefix form
        a group: its first line runs alone, then the rest (they find the prefix cached). Groups
        run side by side, so a group waiting on its first line never holds the others back."""
        groups: dict[str, list[Line]] = {}
        for line in sorted(pending, key=lambda x: (x.prefix_key(batch.endpoint), x.number)):
            groups.setdefault(line.prefix_key(batch.endpoint), []).append(line)
        slots = asyncio.Semaphore(self.config.concurrency)  # lines in flight
        active = asyncio.Semaphore(self.config.concurrency)  # groups started, not yet done
        tasks: set[asyncio.Task[None]] = set()
        watcher = asyncio.get_running_loop().create_task(self._watch(batch))
        try:
            for lines in groups.values():
                await active.acquire()
                if self.stop:
                    active.release()
                    break
                task = asyncio.get_running_loop().create_task(
                    self._group(batch, lines, slots, active)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks and not self.stop:
                await asyncio.wait(set(tasks), timeout=self.config.poll_s)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            # Keep what finished, even when the server is shutting down: the part being
            # written lands, then the rest becomes one more part.
            await self._flush(batch)

    async def _group(
        self,
        batch: Batch,
        lines: list[Line],
        slots: asyncio.Semaphore,
        active: asyncio.Semaphore,
    ) -> None:
        followers: list[asyncio.Task[None]] = []
        try:
            await slots.acquire()
            await self._one(batch, lines[0], slots)  # leaves the group's prefix cached
            for line in lines[1:]:
                await slots.acquire()
                if self.stop:
                    slots.release()
                    break
                followers.append(
                    asyncio.get_running_loop().create_task(self._one(batch, line, slots))
                )
            await asyncio.gather(*followers)
        finally:
            for task in followers:
                task.cancel()
            await asyncio.gather(*followers, return_exceptions=True)
            active.release()

    async def _one(self, batch: Batch, line: Line, slots: asyncio.Semaphore) -> None:
        """Run one line (its slot is taken) until it has an answer, retrying while the platform
        says "busy"; the slot is given back at the end."""
        try:
            delay = 0.25
            while not self.stop:
                principal = await self._principal(batch)
                if principal is None:
                    return
                try:
                    result = await self.lines.run(
                        principal,
                        batch.org_id,
                        batch.endpoint,
                        line=line.number,
                        custom_id=line.custom_id,
                        body=line.body,
                    )
                except Retry as busy:
                    await asyncio.sleep(min(max(busy.after, delay), 10.0))
                    delay = min(delay * 2, 10.0)
                    continue
                self.results.append(result)
                if self.first_result_at is None:
                    self.first_result_at = time.monotonic()
                return
        finally:
            slots.release()

    async def _principal(self, batch: Batch) -> Principal | None:
        """The creating key's principal, re-read every few seconds: a revoked key stops the
        batch (the lines done so far are kept)."""
        if self.principal is not None and time.monotonic() - self.principal_at < 5.0:
            return self.principal
        try:
            principal = await asyncio.to_thread(self.keys.principal_of, batch.key_id)
        except ApiError:
            self.stop = self.stop or "key"
            return None
        if principal.org_id is None:  # a platform admin acting in the batch's organisation
            principal = dataclasses.replace(
                principal, org_id=batch.org_id, project_id=batch.project_id
            )
        self.principal, self.principal_at = principal, time.monotonic()
        return principal

    async def _watch(self, batch: Batch) -> None:
        """Write parts as lines finish; notice a cancel, the window's end, a lost claim."""
        while True:
            await asyncio.sleep(min(self.config.poll_s, self.config.part_every_s))
            status = await asyncio.to_thread(self.service.status, batch.id)
            if status is BatchStatus.CANCELLING:
                self.stop = self.stop or "cancelled"
            elif now() >= batch.expires_at:
                self.stop = self.stop or "expired"
            due = self.first_result_at is not None and (
                time.monotonic() - self.first_result_at >= self.config.part_every_s
            )
            if len(self.results) >= self.config.part_lines or due:
                await self._flush(batch)

    async def _flush(self, batch: Batch) -> None:
        """Write the finished lines as a part. The write is shielded: a cancelled caller (the
        watcher, a shutdown) never leaves a part half-known; the next flush waits for it."""
        if self.flushing is not None:
            await asyncio.gather(asyncio.shield(self.flushing), return_exceptions=True)
        if not self.results:
            return
        taken, self.results, self.first_result_at = self.results, [], None
        part, self.next_part = self.next_part, self.next_part + 1
        self.flushing = asyncio.ensure_future(
            asyncio.to_thread(self.service.write_part, batch, self.runner, part, taken)
        )
        self.flushing.add_done_callback(self._written)
        await asyncio.shield(self.flushing)

    def _written(self, future: asyncio.Future[bool]) -> None:
        if future.cancelled() or future.exception() is not None or not future.result():
            self.stop = "lost"  # the claim is gone (or the store failed): let another try

    # -- the end ---------------------------------------------------------------------------

    async def _finish(self, batch: Batch, lines: list[Line]) -> None:
        if self.stop == "lost":
            return
        status = await asyncio.to_thread(self.service.status, batch.id)
        if status is BatchStatus.CANCELLING or self.stop == "cancelled":
            end, code, why = BatchStatus.CANCELLED, "batch_cancelled", "The batch was cancelled."
        elif self.stop == "expired" or now() >= batch.expires_at:
            end, code, why = (
                BatchStatus.EXPIRED,
                "batch_expired",
                "This request could not be executed before the completion window expired.",
            )
        elif self.stop == "input":
            end, code, why = BatchStatus.FAILED, "file_not_found", "The input file was deleted."
        elif self.stop == "key":
            end, code, why = (
                BatchStatus.FAILED,
                "invalid_api_key",
                "The API key that created this batch was revoked or expired.",
            )
        else:
            end, code, why = BatchStatus.COMPLETED, "batch_incomplete", "The line was not run."
            if status is not BatchStatus.FINALIZING:
                await self._update(status=BatchStatus.FINALIZING, finalizing_at=now())
        await asyncio.to_thread(self._write_files, batch, lines, end, code, why)

    def _write_files(
        self, batch: Batch, lines: list[Line], end: BatchStatus, code: str, why: str
    ) -> None:
        current = self.service.held(batch.id, self.runner)
        if current is None:
            return
        parts = self.service.parts(batch.id)
        found = self.service.read_parts(parts)
        answered: list[dict[str, Any]] = []
        refused: list[dict[str, Any]] = []
        cut = 0
        for line in lines:
            entry = found.pop(line.number, None)
            if entry is None:  # never run: cut off by a cancel, the window, a revoked key
                cut += 1
                refused.append(
                    {
                        "id": new_id("batch_req"),
                        "custom_id": line.custom_id,
                        "response": None,
                        "error": {"code": code, "message": why},
                    }
                )
            elif entry["ok"]:
                answered.append(entry["record"])
            else:
                refused.append(entry["record"])
        for _number, entry in sorted(found.items()):  # done, but the input file is gone now
            (answered if entry["ok"] else refused).append(entry["record"])
        output = (
            current.output_file_id
            if self.service.visible_file(current, current.output_file_id)
            else None
        )
        errors = (
            current.error_file_id
            if self.service.visible_file(current, current.error_file_id)
            else None
        )
        if answered and output is None:
            output = self.service.write_file(current, "output", answered)
            if not self.service.update(batch.id, self.runner, output_file_id=output):
                return
        if refused and errors is None:
            errors = self.service.write_file(current, "error", refused)
            if not self.service.update(batch.id, self.runner, error_file_id=errors):
                return
        times = {
            BatchStatus.COMPLETED: "completed_at",
            BatchStatus.CANCELLED: "cancelled_at",
            BatchStatus.EXPIRED: "expired_at",
            BatchStatus.FAILED: "failed_at",
        }
        extra: dict[str, Any] = {}
        if end is BatchStatus.FAILED:
            extra["errors"] = self.problems or [_problem(code, why)]
        if self.service.update(
            batch.id,
            self.runner,
            status=end,
            total=max(current.total, len(lines)),
            failed=current.failed + cut,
            **{times[end]: now()},
            **extra,
        ):
            self.service.drop_parts(batch.id, parts)
            log.info(
                "batch %s %s: %d answered, %d refused",
                batch.id,
                end.value,
                len(answered),
                len(refused),
            )

    async def _update(self, **values: Any) -> None:
        kept = await asyncio.to_thread(self.service.update, self.batch_id, self.runner, **values)
        if not kept:
            self.stop = "lost"


def _problem(
    code: str, message: str, *, param: str | None = None, line: int | None = None
) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _split_lines(chunks: Iterator[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based number, line) over a byte stream; None for a line longer than `max_bytes`."""
    pending = bytearray()
    number = 0
    too_long = False
    for chunk in chunks:
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            number += 1
            yield number, None if too_long or end - start > max_bytes else bytes(pending[start:end])
            too_long = False
            start = end + 1
        del pending[:start]
        if len(pending) > max_bytes:
            too_long = True
            pending.clear()
    if pending or too_long:
        yield number + 1, None if too_long else bytes(pending)


def _jsonl(records: list[dict[str, Any]]) -> Iterator[bytes]:
    buffer = bytearray()
    for record in records:
        buffer += json.dumps(record, separators=(",", ":")).encode() + b"\n"
        if len(buffer) >= 1 << 20:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)
