"""Privacy policies (issue 28): store them per organisation and project, and apply them to the
text of a request before anything else sees it.

`PrivacyService.screen(principal, entry_point, fields)` is the one hook: with the caller's
policy for that entry point it passes the texts (`off`), counts entities (`detect`), replaces
them (`redact`, placeholders or per-request pseudonyms) or refuses the request (`block`, 400
`pii_detected` naming types and spans, never values). The chat, completion, embedding and
prediction routes call it through the `screen_*` helpers, which rebuild the wire request with
the new texts. A policy is read once per `cache_s` per replica (the caller's organisation
only: another organisation's policy never applies) and detection runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiaas.domain import Actor, Principal
from aiaas.errors import InvalidRequest, NotFound
from aiaas.privacy.policy import (
    ALL_ENTITIES,
    ENTRY_POINTS,
    FILE_PURPOSES,
    OFF,
    Entity,
    Finding,
    Mode,
    PrivacyPolicy,
    Pseudonymiser,
    block_error,
    deidentifier,
    summary_header,
)
from aiaas.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    TextPart,
)
from aiaas.protocol.privacy import PrivacyPolicyBody, PrivacyPolicyObject
from aiaas.services.audit import AuditService
from aiaas.storage.db import Database
from aiaas.storage.repos import privacy as privacy_repo
from aiaas.storage.repos import tenancy as tenancy_repo

REDACTED_HEADER = "x-aiaas-pii-redacted"
DETECTED_HEADER = "x-aiaas-pii-detected"


@dataclass(frozen=True, slots=True)
class Screened:
    """The texts after the policy, and what was found in them (types and counts only)."""

    texts: list[str]
    mode: Mode = Mode.OFF
    found: Counter[Entity] = field(default_factory=Counter)

    @property
    def headers(self) -> dict[str, str]:
        """`x-aiaas-pii-redacted: EMAIL=2,PHONE=1` (or `-detected` under `detect`)."""
        if self.mode is Mode.REDACT:
            return {REDACTED_HEADER: summary_header(self.found) or "none"}
        if self.mode is Mode.DETECT:
            return {DETECTED_HEADER: summary_header(self.found) or "none"}
        return {}


class PrivacyService:
    def __init__(self, db: Database, audit: AuditService, *, cache_s: float = 5.0) -> None:
        self._db = db
        self._audit = audit
        self._cache_s = cache_s
        self._cache: dict[tuple[str, str | None], tuple[float, PrivacyPolicy]] = {}

    # --- the policy --------------------------------------------------------------------------

    def _check_org(self, principal: Principal, org_id: str, project_id: str | None) -> None:
        visible = principal.is_platform_admin or principal.org_id == org_id
        with self._db.read() as conn:
            org = tenancy_repo.get_org(conn, org_id) if visible else None
            if org is None:
                raise NotFound(f"No organization with id {org_id!r}.", param="org_id")
            if project_id is not None:
                project = tenancy_repo.get_project(conn, org_id=org_id, project_id=project_id)
                if project is None:
                    raise NotFound(f"No project with id {project_id!r}.", param="project_id")

    def get(
        self, principal: Principal, org_id: str, project_id: str | None = None
    ) -> tuple[PrivacyPolicy, bool]:
        """The policy set at that level (OFF when none), and whether one is set."""
        self._check_org(principal, org_id, project_id)
        with self._db.read() as conn:
            data = privacy_repo.get(conn, org_id=org_id, project_id=project_id)
        return (PrivacyPolicy.from_json(data), True) if data is not None else (OFF, False)

    def set(
        self,
        principal: Principal,
        org_id: str,
        policy: PrivacyPolicy,
        *,
        actor: Actor,
        project_id: str | None = None,
    ) -> PrivacyPolicy:
        self._check_org(principal, org_id, project_id)
        unknown = [e for e in policy.modes if e not in ENTRY_POINTS]
        unknown += [p for p in policy.files if p not in FILE_PURPOSES]
        if unknown:
            raise InvalidRequest(f"Unknown entry points or purposes: {', '.join(unknown)}.")
        with self._db.write() as conn:
            privacy_repo.put(
                conn,
                org_id=org_id,
                project_id=project_id,
                policy=policy.to_json(),
                updated_by=actor.id,
            )
            self._audit.record(
                conn,
                actor=actor,
                action="privacy_policy.updated",
                target_type="organization",
                target_id=org_id,
                org_id=org_id,
                project_id=project_id,
                data=policy.to_json(),
            )
        self._cache.clear()
        return policy

    def reset(
        self, principal: Principal, org_id: str, *, actor: Actor, project_id: str | None = None
    ) -> None:
        self._check_org(principal, org_id, project_id)
        with self._db.write() as conn:
            removed = privacy_repo.remove(conn, org_id=org_id, project_id=project_id)
            if removed:
                self._audit.record(
                    conn,
                    actor=actor,
                    action="privacy_policy.deleted",
                    target_type="organization",
                    target_id=org_id,
                    org_id=org_id,
                    project_id=project_id,
                )
        self._cache.clear()

    def effective(self, org_id: str | None, project_id: str | None) -> PrivacyPolicy:
        """The project's policy where it has one, else the organisation's, else OFF (cached)."""
        if org_id is None:
            return OFF  # the platform operator's own calls
        key = (org_id, project_id)
        cached = self._cache.get(key)
        clock = time.monotonic()
        if cached is not None and cached[0] > clock:
            return cached[1]
        with self._db.read() as conn:
            data = None
            if project_id is not None:
                data = privacy_repo.get(conn, org_id=org_id, project_id=project_id)
            if data is None:
                data = privacy_repo.get(conn, org_id=org_id)
        policy = OFF if data is None else PrivacyPolicy.from_json(data)
        self._cache[key] = (clock + self._cache_s, policy)
        return policy

    async def policy_for(self, principal: Principal) -> PrivacyPolicy:
        return await self.policy_of(principal.org_id, principal.project_id)

    async def policy_of(self, org_id: str | None, project_id: str | None) -> PrivacyPolicy:
        if org_id is None:
            return OFF
        cached = self._cache.get((org_id, project_id))
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        return await asyncio.to_thread(self.effective, org_id, project_id)

    # --- applying it -------------------------------------------------------------------------

    @staticmethod
    def apply(policy: PrivacyPolicy, mode: Mode, fields: Sequence[tuple[str, str]]) -> Screened:
        """Apply `mode` of `policy` to named texts (CPU work: call it off the event loop)."""
        texts = [text for _, text in fields]
        if mode is Mode.OFF:
            return Screened(texts)
        finder = deidentifier(policy.entities)
        pseudonyms = Pseudonymiser() if policy.pseudonymise else None
        found: Counter[Entity] = Counter()
        blocked: list[tuple[str, list[Finding]]] = []
        out: list[str] = []
        for name, text in fields:
            if mode is Mode.REDACT:
                text, findings = finder.apply(text, pseudonyms)
            else:
                findings = finder.find(text)
            found.update(f.entity for f in findings)
            if findings and mode is Mode.BLOCK:
                blocked.append((name, findings))
            out.append(text)
        if blocked:
            raise block_error(blocked)
        return Screened(out, mode, found)

    async def screen(
        self, principal: Principal, entry_point: str, fields: Sequence[tuple[str, str]]
    ) -> Screened:
        policy = await self.policy_for(principal)
        mode = policy.mode(entry_point)
        if mode is Mode.OFF or not fields:
            return Screened([text for _, text in fields])
        return await asyncio.to_thread(self.apply, policy, mode, fields)

    async def _refuse_token_ids(self, principal: Principal, entry_point: str, param: str) -> None:
        """Token ids cannot be screened: under any policy but `off` they are refused."""
        policy = await self.policy_for(principal)
        if policy.mode(entry_point) is not Mode.OFF:
            raise InvalidRequest(
                "This organization's privacy policy screens inputs, and token ids cannot be "
                "screened: send text.",
                param=param,
                code="pii_unscreenable",
            )

    async def file_screen(
        self, org_id: str, project_id: str | None, purpose: str | None
    ) -> FileScreen | None:
        """How an upload of this purpose is screened (None: it is not). With any file policy
        set, the purpose must come before the file in the form: it decides how the bytes are
        written."""
        policy = await self.policy_of(org_id, project_id)
        if purpose is None:
            if any(m is not Mode.OFF for m in policy.files.values()):
                raise InvalidRequest(
                    "This organization's privacy policy screens uploads: send the 'purpose' "
                    "field before the 'file' part.",
                    param="purpose",
                )
            return None
        mode = policy.file_mode(purpose)
        return None if mode is Mode.OFF else FileScreen(policy, mode)

    # --- the wire requests -------------------------------------------------------------------

    async def screen_chat(
        self, principal: Principal, body: ChatCompletionRequest
    ) -> tuple[ChatCompletionRequest, Screened]:
        fields: list[tuple[str, str]] = []
        for i, message in enumerate(body.messages):
            if isinstance(message.content, str):
                fields.append((f"messages[{i}].content", message.content))
            elif message.content is not None:
                fields += (
                    (f"messages[{i}].content[{j}].text", part.text)
                    for j, part in enumerate(message.content)
                )
        screened = await self.screen(principal, "chat", fields)
        if screened.mode is not Mode.REDACT or not screened.found:
            return body, screened
        texts = iter(screened.texts)
        messages = []
        for message in body.messages:
            if isinstance(message.content, str):
                message = message.model_copy(update={"content": next(texts)})
            elif message.content is not None:
                parts = [TextPart(type="text", text=next(texts)) for _ in message.content]
                message = message.model_copy(update={"content": parts})
            messages.append(message)
        return body.model_copy(update={"messages": messages}), screened

    async def screen_completion(
        self, principal: Principal, body: CompletionRequest
    ) -> tuple[CompletionRequest, Screened]:
        prompt = body.prompt
        if isinstance(prompt, str):
            fields = [("prompt", prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            fields = [(f"prompt[{i}]", str(p)) for i, p in enumerate(prompt)]
        else:
            if prompt:
                await self._refuse_token_ids(principal, "completions", "prompt")
            return body, Screened([])
        screened = await self.screen(principal, "completions", fields)
        if screened.mode is not Mode.REDACT or not screened.found:
            return body, screened
        new: Any = screened.texts[0] if isinstance(prompt, str) else screened.texts
        return body.model_copy(update={"prompt": new}), screened

    async def screen_embeddings(
        self, principal: Principal, body: EmbeddingRequest
    ) -> tuple[EmbeddingRequest, Screened]:
        given = body.input
        if isinstance(given, str):
            fields = [("input", given)]
        elif given and all(isinstance(x, str) for x in given):
            fields = [(f"input[{i}]", str(x)) for i, x in enumerate(given)]
        else:
            if given:
                await self._refuse_token_ids(principal, "embeddings", "input")
            return body, Screened([])
        screened = await self.screen(principal, "embeddings", fields)
        if screened.mode is not Mode.REDACT or not screened.found:
            return body, screened
        new: Any = screened.texts[0] if isinstance(given, str) else screened.texts
        return body.model_copy(update={"input": new}), screened

    async def screen_prediction_inputs(
        self,
        principal: Principal,
        texts: list[str] | None,
        records: list[dict[str, Any]] | None,
        entry_point: str = "predictions",
    ) -> tuple[list[str] | None, list[dict[str, Any]] | None, Screened]:
        """The `texts`, and the string values of `records`, after the policy."""
        fields: list[tuple[str, str]] = []
        if texts is not None:
            fields = [(f"texts[{i}]", t) for i, t in enumerate(texts)]
        elif records is not None:
            fields = [
                (f"records[{i}].{column}", value)
                for i, record in enumerate(records)
                for column, value in record.items()
                if isinstance(value, str)
            ]
        screened = await self.screen(principal, entry_point, fields)
        if screened.mode is not Mode.REDACT or not screened.found:
            return texts, records, screened
        if texts is not None:
            return screened.texts, records, screened
        assert records is not None
        out = iter(screened.texts)
        new_records = [
            {k: next(out) if isinstance(v, str) else v for k, v in record.items()}
            for record in records
        ]
        return texts, new_records, screened


# --- the wire form ---------------------------------------------------------------------------


def policy_from_body(body: PrivacyPolicyBody) -> PrivacyPolicy:
    modes = {name: Mode(getattr(body, name)) for name in ENTRY_POINTS}
    return PrivacyPolicy(
        modes={k: v for k, v in modes.items() if v is not Mode.OFF},
        files={k: Mode(v) for k, v in body.files.items() if v != "off"},
        entities=ALL_ENTITIES if body.entities is None else frozenset(map(Entity, body.entities)),
        pseudonymise=body.pseudonymise,
    )


def policy_object(
    org_id: str, project_id: str | None, policy: PrivacyPolicy, *, is_set: bool
) -> PrivacyPolicyObject:
    return PrivacyPolicyObject.model_validate(
        {
            "organization_id": org_id,
            "project_id": project_id,
            "is_set": is_set,
            **{name: str(policy.mode(name)) for name in ENTRY_POINTS},
            "files": {k: str(v) for k, v in sorted(policy.files.items())},
            "entities": sorted(str(e) for e in policy.entities),
            "pseudonymise": policy.pseudonymise,
        }
    )


# --- uploaded files ----------------------------------------------------------------------------

MAX_SCREENED_LINE = 8 << 20  # a longer line (no newline in 8 MiB) is not text we can screen


class FileScreen:
    """Screens an upload line by line as it streams to the blob store, so under `redact` the
    original bytes are never written. JSON lines have their string values screened (the JSON
    stays valid); other lines are screened as text. Files must be UTF-8 text."""

    def __init__(self, policy: PrivacyPolicy, mode: Mode) -> None:
        self.mode = mode
        self._finder = deidentifier(policy.entities)
        self._pseudonyms = Pseudonymiser() if policy.pseudonymise else None
        self.found: Counter[Entity] = Counter()
        self._line = 0

    @property
    def headers(self) -> dict[str, str]:
        return Screened([], self.mode, self.found).headers

    @property
    def details(self) -> str:
        verb = "redacted" if self.mode is Mode.REDACT else "detected"
        return f"personal data {verb}: {summary_header(self.found) or 'none'}"

    def wrap(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        pending = b""
        for chunk in chunks:
            pending += chunk
            if b"\n" not in chunk:
                if len(pending) > MAX_SCREENED_LINE:
                    raise InvalidRequest(
                        "A line of the file is too long to screen for personal data.",
                        param="file",
                        code="pii_unscreenable",
                    )
                continue
            *lines, pending = pending.split(b"\n")
            yield b"".join(self._screen(line) + b"\n" for line in lines)
        if pending:
            yield self._screen(pending)

    def _screen(self, raw: bytes) -> bytes:
        self._line += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(
                "This organization's privacy policy screens uploads of this purpose, and only "
                "UTF-8 text can be screened.",
                param="file",
                code="pii_unscreenable",
            ) from None
        findings: list[tuple[str, list[Finding]]] = []
        value: Any = None
        if line.lstrip().startswith(("{", "[")):
            try:
                value = json.loads(line)
            except ValueError:
                value = None
        if value is not None:
            value = self._screen_json(value, f"line {self._line}", findings)
            out = json.dumps(value, ensure_ascii=False) if self.mode is Mode.REDACT else line
        else:
            out = self._screen_text(line, f"line {self._line}", findings)
        if findings and self.mode is Mode.BLOCK:
            raise block_error(findings)
        return out.encode("utf-8")

    def _screen_text(self, text: str, where: str, findings: list[tuple[str, list[Finding]]]) -> str:
        if self.mode is Mode.REDACT:
            new, found = self._finder.apply(text, self._pseudonyms)
        else:
            new, found = text, self._finder.find(text)
        if found:
            self.found.update(f.entity for f in found)
            findings.append((where, found))
        return new

    def _screen_json(
        self, value: Any, where: str, findings: list[tuple[str, list[Finding]]]
    ) -> Any:
        if isinstance(value, str):
            return self._screen_text(value, where, findings)
        if isinstance(value, list):
            return [self._screen_json(v, f"{where}[{i}]", findings) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self._screen_json(v, f"{where}.{k}", findings) for k, v in value.items()}
        return value
