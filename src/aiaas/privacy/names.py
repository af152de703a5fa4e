"""Person names by gazetteer: first and last names from Faker's person providers.

No NER model can be downloaded here (no spaCy or presidio weights), so this is a heuristic over
title-case word runs; `aiaas.privacy.pii` documents the rules and their limits.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_NAME_LOCALES", "NameFinder"]

DEFAULT_NAME_LOCALES: tuple[str, ...] = (
    "en_US", "en_GB", "en_IN", "de_DE", "fr_FR", "es_ES", "es_MX", "it_IT", "nl_NL", "pt_BR",
    "sv_SE", "pl_PL",
)  # fmt: skip


# Python's re has no \p{Lu}; Latin-1 and Latin Extended-A/B cover the gazetteer locales.
_UPPER = "A-Z" + "".join(ch for ch in map(chr, range(0xC0, 0x250)) if ch.isupper())
_LOWER = "a-z" + "".join(ch for ch in map(chr, range(0xC0, 0x250)) if ch.islower())
_CAP = rf"[{_UPPER}][{_LOWER}]*(?:['\u2019-]?[{_UPPER}][{_LOWER}]+)*(?![\w'\u2019-])"
_PARTICLE = r"(?:van|von|der|den|de|del|della|di|da|dos|das|du|la|le|ter|ten|bin|al)"
# A run: capitalised words joined by spaces, lowercase particles, or the dot of an initial/title.
_NAME_RUN = re.compile(rf"(?<![\w'\u2019-]){_CAP}(?:(?:\.?[ \t]+(?:{_PARTICLE}[ \t]+)*){_CAP})+")
_CAP_WORD = re.compile(_CAP)
# fmt: off
_TITLES = frozenset({
    "Mr", "Mrs", "Ms", "Miss", "Mx", "Dr", "Prof", "Sir", "Dame", "Lady", "Lord", "Herr",
    "Frau", "Mme", "Mlle", "Sr", "Sra", "Srta", "Dott", "Dra", "Signor", "Signora", "Mevrouw",
    "Meneer", "Pan", "Pani",
})
# fmt: on
# German capitalises every noun, and many nouns are also surnames (Stein, Mann, Schüler).
_COMMON_WORD_LOCALES = ("en_US", "de_DE")
# Title-case words that Faker's lorem list lacks: name-like words that start sentences (May,
# Will), and words of place, organisation and heading names (San Francisco, Jordan River).
# fmt: off
_EXTRA_COMMON = frozenset({
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
    "Saturday", "Sunday", "Will", "Mark", "Bill", "Grant", "Rose", "Hope", "Joy", "Faith",
    "Guy", "Art", "Frank", "Jack", "Chase", "Dawn", "Lance", "Rob", "Gene", "Miles", "Summer",
    "Autumn", "Winter", "Spring", "Iris", "Lily", "Ruby", "Amber", "Crystal", "Penny", "Sky",
    "Star", "Sunny", "Dear", "Hello", "Hi", "Thanks", "Regards", "Team", "Customer", "Client",
    "User", "Users", "Admin", "Manager", "Director", "Department", "Brown", "Gray", "Grey",
    "Gold", "Silver", "Quick", "Lazy", "Fox", "Wolf", "Bear", "Lion", "Eagle", "Swan", "Crow",
    "San", "Santa", "Saint", "St", "Los", "Las", "El", "Fort", "Port", "Mount", "Lake", "River",
    "Bay", "Cape", "Upper", "Lower", "Great", "Valley", "Hills", "Island", "Beach", "Bridge",
    "Tower", "Hall", "Square", "Gardens", "Park", "Street", "Road", "Avenue", "Lane", "Drive",
    "Boulevard", "Way", "Court", "Place", "Station", "Airport", "Harbour", "Harbor", "City",
    "County", "Province", "Kingdom", "Republic", "University", "College", "School", "Academy",
    "Hospital", "Clinic", "Museum", "Cathedral", "Chapel", "Temple", "Market", "Mall", "Hotel",
    "Bank", "Group", "Inc", "Ltd", "Corp", "Company", "Services", "Systems", "Solutions",
    "Technologies", "Labs", "Studios", "Media", "Capital", "Partners", "Holdings", "Foundation",
    "Institute", "Association", "Council", "Committee", "Board", "Office", "Ministry", "Agency",
    "Authority", "Period", "Guide", "Chapter", "Section", "Appendix", "Version", "Release",
    "Puerto", "Porto", "Rio", "Nueva", "Nuevo", "Sierra", "Isla", "Playa",
})
# fmt: on
_MAX_NAME_WORDS = 4


@dataclass(frozen=True, slots=True)
class _Gazetteer:
    first: frozenset[str]
    last: frozenset[str]
    common: frozenset[str]  # title-cased common words, to tell "May" the month from May Smith


def _provider_names(provider: type, kind: str) -> set[str]:
    names: set[str] = set()
    for attribute in dir(provider):
        if f"{kind}_names" not in attribute:
            continue
        value = getattr(provider, attribute)
        # Some locales weight names in an OrderedDict, others list them in a tuple.
        if isinstance(value, dict | tuple | list):
            names.update(name for name in value if isinstance(name, str))
    # Compound entries ("Luiz Miguel", "Le Goff") contribute their longer parts.
    parts = (part for name in names for part in name.split())
    return {part for part in parts if len(part) > 2 and part[0].isupper()}


def _build_gazetteer(locales: Sequence[str]) -> _Gazetteer:
    # Faker's providers are imported here, not at module import: they are only data and a
    # detector without PERSON never needs them.
    first: set[str] = set()
    last: set[str] = set()
    for locale in locales:
        try:
            provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        except ModuleNotFoundError as error:
            raise ValueError(f"Faker has no person names for locale {locale!r}") from error
        first |= _provider_names(provider, "first")
        last |= _provider_names(provider, "last")
    common = set(_EXTRA_COMMON)
    for locale in _COMMON_WORD_LOCALES:
        lorem = importlib.import_module(f"faker.providers.lorem.{locale}").Provider
        common |= {word.title() for word in lorem.word_list}
    return _Gazetteer(frozenset(first), frozenset(last), frozenset(common))


_Word = tuple[str, int, int]


def _split_at_sentence_dots(text: str, words: list[_Word]) -> Iterator[list[_Word]]:
    """Split a run where a dot ends a sentence rather than a title (``Dr.``) or initial."""
    segment: list[_Word] = []
    for word in words:
        segment.append(word)
        text_end = word[2]
        dotted = text_end < len(text) and text[text_end] == "."
        if dotted and word[0] not in _TITLES and len(word[0]) > 1:
            yield segment
            segment = []
    if segment:
        yield segment


def _names_in_segment(words: list[_Word], names: _Gazetteer) -> Iterator[tuple[int, int]]:
    # In a title-case heading most words are capitalised common words; trust only the gazetteer.
    heading = len(words) >= 4 and 2 * sum(w in names.common for w, _, _ in words) >= len(words)

    def is_surname(word: str) -> bool:
        return word in names.last and word not in names.common

    def is_other(word: str) -> bool:
        """Whether ``word`` may complete a name: not a common word, not an initial."""
        if heading:
            return is_surname(word)
        return len(word) > 1 and word not in names.common

    def first_name_length(i: int) -> int:
        """Words in a name anchored on a first name at ``words[i]``; 0 for none."""
        first = words[i][0]
        second = words[i + 1][0] if i + 1 < len(words) else ""
        third = words[i + 2][0] if i + 2 < len(words) else ""
        if not second or first not in names.first or first in names.common:
            return 0
        if is_other(second) or (second in names.last and not heading):
            return 2
        if len(second) == 1 and (third in names.last or is_other(third)):
            return 3  # John F. Kennedy
        return 0

    i = 0
    while i < len(words) - 1:
        first, second = words[i][0], words[i + 1][0]
        third = words[i + 2][0] if i + 2 < len(words) else ""
        if first in _TITLES:
            i += 1  # the honorific stays; the capitalised word(s) after it are the person
            length = 0
            if second in names.last or is_other(second):  # not "Frau Katze", the cat lady
                pair = is_surname(third) or (second in names.first and is_other(third))
                length = 2 if pair else 1
        else:
            length = first_name_length(i)
            # Or a surname after a capitalised word, unless the surname starts a name itself:
            # "Yesterday Austin Smith".
            if length == 0 and (first in names.first or is_other(first)) and is_surname(second):
                length = 0 if first_name_length(i + 1) else 2
        if length == 0:
            i += 1
            continue
        end = i + length
        # Middle names and double surnames: Maria Garcia Lopez, Cyprian Willems van Lier.
        while end < min(len(words), i + _MAX_NAME_WORDS) and is_other(words[end][0]):
            end += 1
        yield words[i][1], words[end - 1][2]
        i = end


class NameFinder:
    """Finds person names in text; builds its name lists once, at construction."""

    def __init__(self, locales: Sequence[str] = DEFAULT_NAME_LOCALES) -> None:
        self._names = _build_gazetteer(locales)

    def find(self, text: str) -> Iterator[tuple[int, int]]:
        for run in _NAME_RUN.finditer(text):
            words = [(w.group(), w.start(), w.end()) for w in _CAP_WORD.finditer(text, *run.span())]
            for segment in _split_at_sentence_dots(text, words):
                yield from _names_in_segment(segment, self._names)
