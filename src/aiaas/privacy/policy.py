"""Privacy policies: what to do with personal data found in a request's text.

A policy says, for each entry point (chat and completion prompts, embedding inputs, the text
fields of predictions, uploaded files by purpose), one of:

- ``off``: the text passes unread;
- ``detect``: entities are counted (by type) and reported; the text passes unchanged;
- ``redact``: each entity is replaced by a typed placeholder (``<EMAIL>``), or, with
  ``pseudonymise``, by a pseudonym that is the same for the same value within one request and
  differs between requests (``Alex Morgan``, ``user-3f9a1@example.com``), so a chat still reads
  naturally;
- ``block``: the request is refused (400 ``pii_detected``) naming the entity types and character
  spans, never the values.

`Deidentifier.apply(text)` returns the new text and the findings (type and span in the
original text). Findings never hold the matched value, so they may be logged or returned.
"""

from __future__ import annotations

import re
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache

from aiaas.errors import InvalidRequest
from aiaas.privacy.extra import find_addresses, find_cn_resident_ids, find_dates_of_birth
from aiaas.privacy.pii import DEFAULT_PHONE_REGIONS, PiiDetector, PiiKind

__all__ = [
    "ALL_ENTITIES",
    "ENTRY_POINTS",
    "Deidentifier",
    "Entity",
    "Finding",
    "Mode",
    "PiiDetected",
    "PrivacyPolicy",
    "Pseudonymiser",
    "deidentifier",
    "summary_header",
]


class Mode(StrEnum):
    OFF = "off"
    DETECT = "detect"
    REDACT = "redact"
    BLOCK = "block"


class Entity(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    IBAN = "iban"
    CREDIT_CARD = "credit_card"
    IP_ADDRESS = "ip_address"
    NATIONAL_ID = "national_id"
    PERSON = "person"
    ADDRESS = "address"
    DATE_OF_BIRTH = "date_of_birth"

    @property
    def placeholder(self) -> str:
        return f"<{self.name}>"


ALL_ENTITIES: frozenset[Entity] = frozenset(Entity)
# Request entry points a policy names; uploaded files are set per purpose (`files`).
ENTRY_POINTS: tuple[str, ...] = ("chat", "completions", "embeddings", "predictions")
FILE_PURPOSES: tuple[str, ...] = ("fine-tune", "dataset", "batch", "user_data")
# Chinese mobile and landline numbers besides the dataset detector's regions.
POLICY_PHONE_REGIONS: tuple[str, ...] = (*DEFAULT_PHONE_REGIONS, "CN")
# When one span is claimed by two kinds, the more validated one wins (lower rank).
_RANK: dict[Entity, int] = {
    Entity.EMAIL: 0, Entity.IBAN: 1, Entity.CREDIT_CARD: 2, Entity.IP_ADDRESS: 3,
    Entity.NATIONAL_ID: 4, Entity.DATE_OF_BIRTH: 5, Entity.PHONE: 6, Entity.ADDRESS: 7,
    Entity.PERSON: 8,
}  # fmt: skip
_BASE_KINDS: dict[Entity, PiiKind] = {
    Entity.EMAIL: PiiKind.EMAIL,
    Entity.PHONE: PiiKind.PHONE,
    Entity.IBAN: PiiKind.IBAN,
    Entity.CREDIT_CARD: PiiKind.CREDIT_CARD,
    Entity.IP_ADDRESS: PiiKind.IP_ADDRESS,
    Entity.NATIONAL_ID: PiiKind.NATIONAL_ID,
    Entity.PERSON: PiiKind.PERSON,
}


_CJK = re.compile(r"[\u3000-\u303f\u3400-\u9fff\uf900-\ufaff\uff00-\uffef]")
_CJK_BLANK = {
    c: " "
    for lo, hi in ((0x3000, 0x303F), (0x3400, 0x9FFF), (0xF900, 0xFAFF), (0xFF00, 0xFFEF))
    for c in range(lo, hi + 1)
}


class PiiDetected(InvalidRequest):
    """A `block` policy refused the request: types and spans are named, values never."""

    code = "pii_detected"


@dataclass(frozen=True, slots=True)
class Finding:
    entity: Entity
    start: int
    end: int


@dataclass(frozen=True)
class PrivacyPolicy:
    """One organisation's (or project's) policy. Unnamed entry points and purposes are off."""

    modes: Mapping[str, Mode] = field(default_factory=dict)
    files: Mapping[str, Mode] = field(default_factory=dict)
    entities: frozenset[Entity] = ALL_ENTITIES
    pseudonymise: bool = False

    def mode(self, entry_point: str) -> Mode:
        return self.modes.get(entry_point, Mode.OFF)

    def file_mode(self, purpose: str) -> Mode:
        return self.files.get(purpose, Mode.OFF)

    @property
    def is_off(self) -> bool:
        return all(m is Mode.OFF for m in (*self.modes.values(), *self.files.values()))

    def to_json(self) -> dict[str, object]:
        return {
            "modes": {k: str(v) for k, v in sorted(self.modes.items())},
            "files": {k: str(v) for k, v in sorted(self.files.items())},
            "entities": sorted(str(e) for e in self.entities),
            "pseudonymise": self.pseudonymise,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> PrivacyPolicy:
        modes = data.get("modes") or {}
        files = data.get("files") or {}
        entities = data.get("entities")
        assert isinstance(modes, Mapping) and isinstance(files, Mapping)
        return cls(
            modes={str(k): Mode(v) for k, v in modes.items()},
            files={str(k): Mode(v) for k, v in files.items()},
            entities=(
                ALL_ENTITIES if entities is None else frozenset(Entity(e) for e in entities)  # type: ignore[union-attr]
            ),
            pseudonymise=bool(data.get("pseudonymise", False)),
        )


OFF = PrivacyPolicy()

# Pseudonyms for people: invented, common-looking names in several languages.
_PSEUDO_NAMES: tuple[str, ...] = (
    "Alex Morgan", "Sam Taylor", "Jordan Lee", "Robin Fischer", "Kim Laurent", "Chris Novak",
    "Jamie Rossi", "Taylor Brooks", "Casey Romero", "Riley Jansen", "Avery Costa", "Quinn Weber",
    "Morgan Silva", "Drew Martin", "Jules Bernard", "Noa Lindqvist", "Eli Kowalski",
    "Sasha Moreau", "Dana Keller", "Remy Dubois", "Ari Santos", "Lou Becker", "Max Ferreira",
    "Nico Bianchi", "Pat Olsen", "Sky Harper", "Toni Vidal", "Yuri Nagy", "Lin Park", "Ren Ito",
)  # fmt: skip


class Pseudonymiser:
    """Pseudonyms for one request: the same value gets the same pseudonym; a fresh request
    draws new ones (a random salt and a shuffled name list)."""

    def __init__(self) -> None:
        self._tag = secrets.token_hex(3)
        names = list(_PSEUDO_NAMES)
        secrets.SystemRandom().shuffle(names)
        self._names = names
        self._memo: dict[tuple[Entity, str], str] = {}
        self._counts: Counter[Entity] = Counter()

    def __call__(self, entity: Entity, value: str) -> str:
        key = (entity, value)
        found = self._memo.get(key)
        if found is None:
            found = self._memo[key] = self._make(entity)
        return found

    def _make(self, entity: Entity) -> str:
        n = self._counts[entity]
        self._counts[entity] += 1
        tag = self._tag
        if entity is Entity.PERSON:
            base = self._names[n % len(self._names)]
            return base if n < len(self._names) else f"{base} {n // len(self._names) + 1}"
        if entity is Entity.EMAIL:
            return f"user-{tag}{n}@example.com"
        if entity is Entity.PHONE:
            return f"+1 555 01{int(tag, 16) % 100:02d} {n:03d}"
        return f"<{entity.name}_{tag}{n}>"


class Deidentifier:
    """Finds the policy's entity types in text and replaces them; immutable, thread-safe."""

    def __init__(self, entities: Iterable[Entity] = ALL_ENTITIES) -> None:
        self.entities = frozenset(Entity(e) for e in entities)
        kinds = [_BASE_KINDS[e] for e in self.entities if e in _BASE_KINDS]
        self._base = PiiDetector(kinds, phone_regions=POLICY_PHONE_REGIONS) if kinds else None

    def find(self, text: str) -> list[Finding]:
        """Sorted, non-overlapping findings."""
        found: list[Finding] = []
        if self._base is not None:
            # CJK characters count as word characters, so "卡号4111…" would hide the number
            # from the patterns' word boundaries: scan a copy with them blanked (same offsets).
            scanned = text.translate(_CJK_BLANK) if _CJK.search(text) else text
            found += (
                Finding(Entity(m.kind.value), m.start, m.end) for m in self._base.find(scanned)
            )
        entities = self.entities
        if Entity.NATIONAL_ID in entities:
            found += (Finding(Entity.NATIONAL_ID, s, e) for s, e in find_cn_resident_ids(text))
        if Entity.DATE_OF_BIRTH in entities:
            found += (Finding(Entity.DATE_OF_BIRTH, s, e) for s, e in find_dates_of_birth(text))
        if Entity.ADDRESS in entities:
            found += (Finding(Entity.ADDRESS, s, e) for s, e in find_addresses(text))
        kept: list[Finding] = []
        for f in sorted(found, key=lambda f: (_RANK[f.entity], f.start - f.end, f.start)):
            if all(f.end <= k.start or k.end <= f.start for k in kept):
                kept.append(f)
        return sorted(kept, key=lambda f: f.start)

    def apply(
        self, text: str, pseudonyms: Pseudonymiser | None = None
    ) -> tuple[str, list[Finding]]:
        """``text`` with every finding replaced (placeholder or pseudonym), and the findings."""
        findings = self.find(text)
        if not findings:
            return text, findings
        parts: list[str] = []
        position = 0
        for f in findings:
            value = text[f.start : f.end]
            replacement = (
                f.entity.placeholder if pseudonyms is None else pseudonyms(f.entity, value)
            )
            parts += (text[position : f.start], replacement)
            position = f.end
        parts.append(text[position:])
        return "".join(parts), findings


@lru_cache(maxsize=64)
def deidentifier(entities: frozenset[Entity] = ALL_ENTITIES) -> Deidentifier:
    """One shared de-identifier per entity set (building one loads the name gazetteer)."""
    return Deidentifier(entities)


def counts(findings: Iterable[Finding]) -> Counter[Entity]:
    return Counter(f.entity for f in findings)


def summary_header(found: Mapping[Entity, int]) -> str:
    """``EMAIL=2,PHONE=1``: entity types in alphabetical order, with how many were found."""
    return ",".join(f"{e.name}={n}" for e, n in sorted(found.items()) if n)


def block_error(fields: Sequence[tuple[str, list[Finding]]]) -> PiiDetected:
    """The 400 for a blocked request: each field's entity types and spans, no values."""
    described = []
    for name, findings in fields:
        spans = ", ".join(f"{f.entity.value} at {f.start}-{f.end}" for f in findings)
        described.append(f"{name}: {spans}")
    types = sorted({f.entity.value for _, fs in fields for f in fs})
    return PiiDetected(
        "The request contains personal data that this organization's privacy policy blocks "
        f"({', '.join(types)}); " + "; ".join(described) + ".",
        param=fields[0][0] if fields else None,
    )
