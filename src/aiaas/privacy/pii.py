"""Find and redact personal data (PII) in free text and in the string columns of a dataset.

Every kind is found by a cheap precompiled regex first and confirmed by a validator, so a cell
with no digits, ``@``, ``:`` or capitalised words costs a handful of C-level regex scans:

- ``email``: RFC-ish local part, ``@``, dotted domain ending in a 2+ letter TLD.
- ``phone``: digit windows (7+ digits) are handed to libphonenumber's ``PhoneNumberMatcher`` with
  leniency VALID, trying each configured region until the window's digits are covered. Numbers in
  international form (``+44 …``) are found whatever the region list; national forms only for a
  listed region.
- ``credit_card``: 13-19 digits, contiguous or in consistent 4-4-4-4(-3) / 4-6-5 / 4-6-4 groups,
  a plausible issuer prefix for that length (Visa, Mastercard, Amex, Discover, JCB, Diners,
  UnionPay, Maestro) and a valid Luhn check digit.
- ``iban``: country code, two check digits and 11-30 alphanumerics, with or without spaces,
  validated by ``stdnum.iban`` (country length, BBAN structure and mod-97).
- ``ip_address``: dotted quads and colon-hex candidates parsed by :mod:`ipaddress`. A quad that
  is part of a longer dotted run (``1.2.3.4.5``) or prefixed by a letter (``v1.2.3.4``) is skipped.
- ``national_id``: one pattern per document with the usual formatting, confirmed by the
  ``stdnum`` validator: US SSN (``123-45-6789``), UK NINO (letter rules only, it has no
  checksum), French NIR, Spanish DNI/NIE, Italian codice fiscale, Brazilian CPF
  (``123.456.789-09``), Dutch BSN (``1234.56.782``), German tax id (``12 345 678 901``) and
  Indian Aadhaar (``2345 6789 0123``). A bare digit string only counts after a keyword (``SSN``,
  ``BSN``, ``NHS``, ``CPF``, ``Aadhaar``, ``Steuer-ID`` …): a 9-digit checksum passes for one
  random number in ten, far too many order numbers to redact blindly.
- ``person``: no NER model can be downloaded here (no spaCy or presidio weights), so names are a
  gazetteer heuristic over first and last names from Faker's person providers for several
  locales. "Common words" are Faker's English and German lorem word lists plus months,
  weekdays and name-like or place words (German capitalises nouns, many of them surnames).
  Title-case words are grouped into runs; a run yields a name when
    * a known first name is followed by a last name, or by a capitalised word that is not a
      common word (``Emma Watson``, ``Ludwig van Beethoven``, ``John F. Kennedy``);
    * a first name or an unknown capitalised non-word is followed by a known last name that is
      not a common word (``Mark Johnson``, ``Xochitl Hernandez``), unless the second word
      starts a name itself (``Yesterday Austin Smith``);
    * an honorific (``Mr``, ``Dr.``, ``Frau`` …) precedes a last name or a capitalised non-word
      (``Dr. Brown``); the honorific itself is kept.
  A name then takes up to four words (middle names, double surnames). In a title-case heading
  (most words capitalised common words) only gazetteer surnames complete a name. Sentence
  starters like "May the team …" or "Will it …" never match: the next word is lowercase.
  Limitations: single names (``Hi Sarah``), lower- or upper-case names, names with neither part
  in the gazetteer (``Barack Obama``), and non-Latin scripts are missed; a first name followed
  by a capitalised non-word is a false positive (``Harry Potter``, ``Paris Hilton``,
  ``Hugo Boss``); only common words are known, not places or brands.

Overlaps are resolved by specificity, then length: email > iban > credit_card > ip_address >
national_id > phone > person; so an IBAN wins over a phone number found inside it.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import phonenumbers
from stdnum import iban, luhn
from stdnum.br import cpf
from stdnum.de import idnr
from stdnum.es import dni, nie
from stdnum.fr import nir
from stdnum.gb import nhs
from stdnum.in_ import aadhaar
from stdnum.it import codicefiscale
from stdnum.nl import bsn
from stdnum.us import ssn

from aiaas.privacy.names import DEFAULT_NAME_LOCALES, NameFinder

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ALL_KINDS",
    "DEFAULT_NAME_LOCALES",
    "DEFAULT_PHONE_REGIONS",
    "ColumnPiiReport",
    "PiiDetector",
    "PiiKind",
    "PiiMatch",
    "redact_frame",
]


class PiiKind(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    CREDIT_CARD = "credit_card"
    IBAN = "iban"
    IP_ADDRESS = "ip_address"
    NATIONAL_ID = "national_id"
    PERSON = "person"

    @property
    def placeholder(self) -> str:
        return f"[{self.name}]"


ALL_KINDS: frozenset[PiiKind] = frozenset(PiiKind)
DEFAULT_PHONE_REGIONS: tuple[str, ...] = (
    "US", "GB", "DE", "FR", "ES", "IT", "NL", "IN", "BR", "AU", "CA",
)  # fmt: skip
# Lower rank wins an overlap: the more a kind is validated, the more its span is trusted.
_RANK: dict[PiiKind, int] = {
    PiiKind.EMAIL: 0, PiiKind.IBAN: 1, PiiKind.CREDIT_CARD: 2, PiiKind.IP_ADDRESS: 3,
    PiiKind.NATIONAL_ID: 4, PiiKind.PHONE: 5, PiiKind.PERSON: 6,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class PiiMatch:
    kind: PiiKind
    start: int
    end: int


@dataclass(frozen=True)
class ColumnPiiReport:
    column: str
    counts: dict[str, int]  # kind value -> matches found; kinds with no match are left out
    rows_affected: int


# --- gates and candidate patterns ----------------------------------------------------------------

_DIGIT = re.compile(r"\d")
_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-]|\.[A-Za-z0-9])"
)
_CARD = re.compile(
    r"(?<![\w.,+-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,4}(?:\1\d{1,3})?"
    r"|\d{4}([ -])\d{6}\2\d{4,5})(?![\w]|[.,-]\d)"
)
# Both cases spelled out rather than re.IGNORECASE, which also lets some non-ASCII letters in.
_IBAN = re.compile(r"(?<!\w)[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){11,30}(?!\w)")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:)(?=[0-9A-Fa-f:]*[0-9A-Fa-f])"
    r"[0-9A-Fa-f:]{2,39}(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?![\w:]|\.\d)"
)
_PHONE_WINDOW = re.compile(r"(?:\+|\()?\d[\d \t().\-/]{5,}\d")
_MIN_PHONE_DIGITS = 7
_DATE = re.compile(
    r"(?:19|20)\d\d([-/.])(?:0?[1-9]|1[0-2])\1(?:0?[1-9]|[12]\d|3[01])(?!\d)"
    r"|(?:0?[1-9]|[12]\d|3[01])([-/.])(?:0?[1-9]|[12]\d|3[01])\2(?:19|20)\d\d(?!\d)"
)
# libphonenumber reads a leading 49 or 33 as a country code even without "+"; that many digits
# without an international prefix are more likely an account or card number.
_MAX_NATIONAL_DIGITS = 13


@dataclass(frozen=True, slots=True)
class _IdRule:
    """A national id pattern whose named group ``id`` is checked by ``is_valid``."""

    pattern: re.Pattern[str]
    is_valid: Callable[[str], bool]


def _id_pattern(body: str) -> re.Pattern[str]:
    # Not a slice of a longer grouped number: "4111 1111 1111 1111" holds no Aadhaar number.
    return re.compile(rf"(?<![\w.-])(?<!\d )(?P<id>{body})(?![\w]|[.-]\w| \d)")


def _after_keyword(keywords: str, digits: int) -> re.Pattern[str]:
    return re.compile(rf"(?i:\b(?:{keywords})\b)\W{{0,6}}(?P<id>\d{{{digits}}})(?!\w)")


def _digits_only(text: str) -> str:
    return re.sub(r"\D", "", text)


# NINO prefixes never start with D F I Q U V, never have O second, and a few pairs are unused.
_NINO = re.compile(
    r"(?<!\w)(?P<id>(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
    r" ?\d{2} ?\d{2} ?\d{2} ?[A-D])(?!\w)"
)
_ID_RULES: tuple[_IdRule, ...] = (
    _IdRule(
        _id_pattern(r"\d{3}(?P<sep>[- ])\d{2}(?P=sep)\d{4}"),
        lambda s: ssn.is_valid(_digits_only(s)),  # stdnum strips dashes but not spaces
    ),
    _IdRule(_after_keyword(r"SSN|social security(?: number| no)?", 9), ssn.is_valid),
    _IdRule(_NINO, lambda s: True),
    _IdRule(_id_pattern(r"[12] ?\d{2} ?\d{2} ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}"), nir.is_valid),
    _IdRule(_id_pattern(r"\d{8}-?[A-Z]"), dni.is_valid),
    _IdRule(_id_pattern(r"[XYZ]-?\d{7}-?[A-Z]"), nie.is_valid),
    _IdRule(
        _id_pattern(r"[A-Z]{6}[\dLMNP-V]{2}[A-EHLMPR-T][\dLMNP-V]{2}[A-Z][\dLMNP-V]{3}[A-Z]"),
        codicefiscale.is_valid,
    ),
    _IdRule(_id_pattern(r"\d{3}\.\d{3}\.\d{3}-\d{2}"), cpf.is_valid),
    _IdRule(_after_keyword(r"CPF", 11), cpf.is_valid),
    _IdRule(_id_pattern(r"\d{4}\.\d{2}\.\d{3}"), bsn.is_valid),
    _IdRule(_after_keyword(r"BSN|burgerservicenummer|sofinummer", 9), bsn.is_valid),
    _IdRule(_id_pattern(r"\d{2} \d{3} \d{3} \d{3}"), idnr.is_valid),
    _IdRule(_after_keyword(r"Steuer-?ID|IdNr|Steueridentifikationsnummer", 11), idnr.is_valid),
    _IdRule(_id_pattern(r"[2-9]\d{3} \d{4} \d{4}"), aadhaar.is_valid),
    _IdRule(_after_keyword(r"Aadhaar|UIDAI", 12), aadhaar.is_valid),
    _IdRule(_after_keyword(r"NHS(?: number| no)?", 10), nhs.is_valid),
)


def _plausible_card_prefix(digits: str) -> bool:
    """Whether the issuer prefix (IIN) exists for a number of this length."""
    n, p2, p3, p4 = len(digits), int(digits[:2]), int(digits[:3]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16  # Mastercard
    if p2 in (34, 37):
        return n == 15  # American Express
    if p2 in (36, 38, 39) or 300 <= p3 <= 305:
        return 14 <= n <= 19  # Diners Club
    if 3528 <= p4 <= 3589:
        return 16 <= n <= 19  # JCB
    if p2 in (50, 56, 57, 58) or digits[0] == "6":
        return 13 <= n <= 19  # Maestro, Discover, UnionPay, RuPay
    return False


# --- the detector --------------------------------------------------------------------------------


class PiiDetector:
    """Finds PII spans in text; immutable after construction, so one may serve many threads."""

    def __init__(
        self,
        kinds: Iterable[PiiKind] = ALL_KINDS,
        *,
        phone_regions: Sequence[str] = DEFAULT_PHONE_REGIONS,
        name_locales: Sequence[str] = DEFAULT_NAME_LOCALES,
    ) -> None:
        self.kinds = frozenset(PiiKind(kind) for kind in kinds)
        unknown = [r for r in phone_regions if r not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"unknown phone regions: {', '.join(unknown)}")
        self.phone_regions = tuple(phone_regions)
        self._phone_plans = tuple(_phone_plan(region) for region in self.phone_regions)
        self._names = NameFinder(name_locales) if PiiKind.PERSON in self.kinds else None

    def find(self, text: str) -> list[PiiMatch]:
        """Sorted, non-overlapping matches in ``text``."""
        found: list[PiiMatch] = []
        kinds = self.kinds
        if PiiKind.EMAIL in kinds and "@" in text:
            found += _spans(PiiKind.EMAIL, _EMAIL, text)
        has_digit = _DIGIT.search(text) is not None
        if has_digit:
            if PiiKind.IBAN in kinds:
                found += self._ibans(text)
            if PiiKind.CREDIT_CARD in kinds:
                found += _spans(PiiKind.CREDIT_CARD, _CARD, text, _is_card)
            if PiiKind.IP_ADDRESS in kinds:
                found += _spans(PiiKind.IP_ADDRESS, _IPV4, text, _is_ip)
            if PiiKind.NATIONAL_ID in kinds:
                found += self._national_ids(text)
        if PiiKind.IP_ADDRESS in kinds and ":" in text:
            found += _spans(PiiKind.IP_ADDRESS, _IPV6, text, _is_ip)
        if has_digit and PiiKind.PHONE in kinds:
            found += self._phones(text, found)
        if self._names is not None:
            found += (PiiMatch(PiiKind.PERSON, s, e) for s, e in self._persons(text))
        return _resolve_overlaps(found)

    def redact(self, text: str) -> tuple[str, Counter[PiiKind]]:
        """``text`` with each match replaced by its placeholder, and the matches per kind."""
        counts: Counter[PiiKind] = Counter()
        parts: list[str] = []
        position = 0
        for match in self.find(text):
            parts += (text[position : match.start], match.kind.placeholder)
            position = match.end
            counts[match.kind] += 1
        if not counts:
            return text, counts
        parts.append(text[position:])
        return "".join(parts), counts

    def _ibans(self, text: str) -> Iterator[PiiMatch]:
        for candidate in _IBAN.finditer(text):
            start, end = candidate.span()
            # The pattern runs greedily into following words; retry shorter at each space.
            ends = [end, *(i for i in range(end - 1, start, -1) if text[i] == " ")]
            for stop in ends:
                if iban.is_valid(text[start:stop]):
                    yield PiiMatch(PiiKind.IBAN, start, stop)
                    break

    def _national_ids(self, text: str) -> Iterator[PiiMatch]:
        for rule in _ID_RULES:
            for candidate in rule.pattern.finditer(text):
                if rule.is_valid(candidate.group("id")):
                    yield PiiMatch(PiiKind.NATIONAL_ID, *candidate.span("id"))

    def _phones(self, text: str, found: list[PiiMatch]) -> Iterator[PiiMatch]:
        for window in _PHONE_WINDOW.finditer(text):
            start, end = window.span()
            raw = window.group()
            if _digit_count(raw) < _MIN_PHONE_DIGITS:
                continue
            date = _DATE.match(raw)
            if date is not None and _digit_count(raw[date.end() :]) < _MIN_PHONE_DIGITS:
                continue  # 2023-01-15 (10:30) may be a valid number somewhere; it is a date
            if any(m.start <= start and end <= m.end for m in found):
                continue  # already an IBAN, card or id: the matcher is the slowest step
            spans = self._phones_in_window(text, start, end)
            yield from (PiiMatch(PiiKind.PHONE, s, e) for s, e in spans)

    def _phones_in_window(self, text: str, start: int, end: int) -> set[tuple[int, int]]:
        raw = text[start:end]
        # A bare digit run can only be one number; skip regions where its length is impossible.
        bare = raw.isdigit() and not raw.startswith(("00", "011"))
        # One character of context each side: the matcher rejects numbers glued to letters.
        offset = max(start - 1, 0)
        snippet = text[offset : end + 1]
        spans: set[tuple[int, int]] = set()
        for region, lengths, prefix in self._phone_plans:
            if bare and not _fits_national_length(raw, lengths, prefix):
                continue
            for number in phonenumbers.PhoneNumberMatcher(
                snippet, region, leniency=phonenumbers.Leniency.VALID
            ):
                if _plausible_phone(number.raw_string):
                    spans.add(_balanced(text, offset + number.start, offset + number.end))
            # A national number is valid in only some regions; stop once the window is done.
            if spans and min(spans)[0] <= start + 1 and max(e for _, e in spans) >= end:
                break
        return spans

    def _persons(self, text: str) -> Iterator[tuple[int, int]]:
        assert self._names is not None
        return self._names.find(text)


# --- helpers -------------------------------------------------------------------------------------


def _spans(
    kind: PiiKind,
    pattern: re.Pattern[str],
    text: str,
    is_valid: Callable[[str], bool] | None = None,
) -> Iterator[PiiMatch]:
    for candidate in pattern.finditer(text):
        if is_valid is None or is_valid(candidate.group()):
            yield PiiMatch(kind, *candidate.span())


_PhonePlan = tuple[str, frozenset[int], str]


def _phone_plan(region: str) -> _PhonePlan:
    """The region, its national number lengths and its trunk prefix, from libphonenumber."""
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    assert metadata is not None  # the region was checked against SUPPORTED_REGIONS
    lengths = frozenset(metadata.general_desc.possible_length or ())
    return region, lengths, metadata.national_prefix or ""


def _fits_national_length(digits: str, lengths: frozenset[int], prefix: str) -> bool:
    if len(digits) in lengths:
        return True
    return bool(prefix) and digits.startswith(prefix) and len(digits) - len(prefix) in lengths


def _digit_count(text: str) -> int:
    return sum(ch.isdigit() for ch in text)


def _plausible_phone(raw: str) -> bool:
    international = raw.lstrip("(").startswith(("+", "00"))
    return international or _digit_count(raw) <= _MAX_NATIONAL_DIGITS


def _balanced(text: str, start: int, end: int) -> tuple[int, int]:
    """Drop an unpaired bracket the phone matcher took from the prose around a number."""
    if text[start] == "(" and ")" not in text[start:end]:
        start += 1
    if text[end - 1] == ")" and "(" not in text[start:end]:
        end -= 1
    return start, end


def _is_card(candidate: str) -> bool:
    digits = _digits_only(candidate)
    return 13 <= len(digits) <= 19 and _plausible_card_prefix(digits) and luhn.is_valid(digits)


def _is_ip(candidate: str) -> bool:
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _resolve_overlaps(found: list[PiiMatch]) -> list[PiiMatch]:
    kept: list[PiiMatch] = []
    for match in sorted(found, key=lambda m: (_RANK[m.kind], m.start - m.end, m.start)):
        if all(match.end <= k.start or k.end <= match.start for k in kept):
            kept.append(match)
    return sorted(kept, key=lambda m: m.start)


# --- dataframes ----------------------------------------------------------------------------------


def redact_frame(
    frame: pd.DataFrame,
    detector: PiiDetector,
    columns: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, list[ColumnPiiReport]]:
    """A new frame with PII redacted in string cells, and one report per scanned column.

    Without ``columns`` every object or string-dtype column is scanned. Only ``str`` cells are
    rewritten; numbers, missing values and other objects stay as they are.
    """
    import pandas as pd  # a heavy import that callers of find/redact on plain text do not need

    if columns is None:
        scanned = [
            position
            for position, dtype in enumerate(frame.dtypes)
            if pd.api.types.is_object_dtype(dtype) or isinstance(dtype, pd.StringDtype)
        ]
    else:
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise KeyError(f"columns not in the frame: {', '.join(map(str, missing))}")
        scanned = [i for i, label in enumerate(frame.columns) if label in set(columns)]
    out = frame.copy()
    reports: list[ColumnPiiReport] = []
    for position in scanned:
        series = frame.iloc[:, position]
        values, counts, rows = _redact_values(series.tolist(), detector)
        if rows:
            out.isetitem(position, pd.Series(values, index=series.index, dtype=series.dtype))
        counts_by_value = {kind.value: n for kind, n in sorted(counts.items())}
        reports.append(ColumnPiiReport(str(frame.columns[position]), counts_by_value, rows))
    return out, reports


def _redact_values(
    values: list[object], detector: PiiDetector
) -> tuple[list[object], Counter[PiiKind], int]:
    # Datasets repeat values (labels, templates); redacting each distinct string once pays off.
    seen: dict[str, tuple[str, Counter[PiiKind]]] = {}
    total: Counter[PiiKind] = Counter()
    rows = 0
    out: list[object] = []
    for value in values:
        if not isinstance(value, str):
            out.append(value)
            continue
        if value not in seen:
            seen[value] = detector.redact(value)
        redacted, counts = seen[value]
        if counts:
            rows += 1
            total.update(counts)
        out.append(redacted)
    return out, total, rows
