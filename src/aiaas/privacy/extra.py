"""Entity kinds the dataset detector (`pii.py`) does not look for, used by privacy policies.

- ``date_of_birth``: a date (``1985-03-12``, ``12/03/1985``, ``12 March 1985``,
  ``March 12, 1985``, ``1985年3月12日``) within a few characters after a birth keyword
  (``born``, ``DOB``, ``date of birth``, ``birthday``, ``geboren``, ``né(e) le``,
  ``fecha de nacimiento``, ``出生``, ``生日``). A date with no such keyword is not a birth date.
- ``national_id`` (China): the 18-character resident identity number, confirmed by its
  ISO 7064 check character and its birth date (``stdnum.cn.ric``).
- ``address``: a street address in a few Western forms (``221B Baker Street``,
  ``1600 Pennsylvania Avenue NW``, ``Hauptstraße 5``, ``12 rue de la Paix``,
  ``Calle Mayor 10``, ``Via Roma 1``) and Chinese addresses ending in a street number
  (``…路88号``). Heuristic: recall on free-form addresses is partial (see README).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from stdnum.cn import ric

__all__ = ["find_addresses", "find_cn_resident_ids", "find_dates_of_birth"]

_MONTHS = (
    "January|February|March|April|May|June|July|August|September|October|November|December|"
    "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
)
_DATE_BODY = (
    r"(?:19|20)\d\d[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])"
    r"|(?:0?[1-9]|[12]\d|3[01])[-/.](?:0?[1-9]|1[0-2]|[12]\d|3[01])[-/.](?:19|20)\d\d"
    rf"|(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?\s+(?:{_MONTHS})\.?,?\s+(?:19|20)\d\d"
    rf"|(?:{_MONTHS})\.?\s+(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?,?\s+(?:19|20)\d\d"
    r"|(?:19|20)\d\d\s*年\s*(?:0?[1-9]|1[0-2])\s*月\s*(?:0?[1-9]|[12]\d|3[01])\s*日"
)
_DOB_KEYWORD = (
    r"(?i:\b(?:born(?:\s+on)?|DOB|D\.O\.B\.?|date\s+of\s+birth|birth\s*date|birthday|"
    r"geboren(?:\s+am)?|Geburtsdatum|n[ée]e?\s+le|date\s+de\s+naissance|"
    r"fecha\s+de\s+nacimiento|nacid[oa]\s+el|data\s+di\s+nascita|nato\s+il|nata\s+il))"
    r"|出生日期|出生于|出生於|出生|生日"
)
_DOB = re.compile(
    rf"(?:{_DOB_KEYWORD})[\s:\uff1a,是为於于在]{{0,6}}(?:(?:on|am|el|il|le)\s+)?"
    rf"(?P<date>{_DATE_BODY})(?!\d)"
)
_RIC = re.compile(r"(?<![0-9A-Za-z])(?P<id>\d{17}[\dXx])(?![0-9A-Za-z])")

_STREET_EN = (
    r"Street|St\.?|Road|Rd\.?|Avenue|Ave\.?|Lane|Ln\.?|Drive|Dr\.?|Boulevard|Blvd\.?|Way|"
    r"Court|Ct\.?|Place|Pl\.?|Terrace|Close|Crescent|Square|Highway|Parkway"
)
_CAPWORD = r"[A-Z][a-zA-Z'\u00c0-\u024f-]+"
_ADDRESS = re.compile(
    # 221B Baker Street, 1600 Pennsylvania Avenue NW
    rf"(?<![\w-])\d{{1,5}}[A-Za-z]?,?\s+(?:{_CAPWORD}\s+){{1,3}}(?:{_STREET_EN})"
    r"(?:\s+(?:NW|NE|SW|SE|N|S|E|W))?(?![\w])"
    # Hauptstraße 5, Lindenweg 12a, Am Markt ... (German compounds)
    r"|(?<![\w-])[A-Z\u00c4\u00d6\u00dc][a-z\u00e4\u00f6\u00fc\u00df-]+"
    r"(?:stra(?:ß|ss)e|str\.|weg|allee|platz|gasse|ring|damm)\s+\d{1,4}[a-z]?(?![\w])"
    # 12 rue de la Paix, 5 avenue des Champs-Élysées, 3 boulevard Haussmann
    r"|(?<![\w-])\d{1,4}(?:\s?bis|\s?ter)?,?\s+(?:rue|avenue|boulevard|place|chemin|allée|quai)"
    r"(?:\s+(?:(?:de|du|des|la|le)\s+|l'|d')*[A-ZÉ][\w'\u00c0-\u024f-]+){1,3}"
    # Calle Mayor 10, Via Roma 1, Avenida Paulista 1578, Rua Augusta 500
    r"|(?<![\w-])(?:Calle|Avenida|Av\.|Via|Viale|Piazza|Corso|Rua|Travessa|Plaza|Paseo)"
    r"(?:\s+(?:(?:de|del|della|da|do|dos|das|la)\s+)*[A-Z][\w'\u00c0-\u024f-]+){1,3},?\s+\d{1,5}(?![\w])"
    # 北京市朝阳区建国路88号, 上海市浦东新区世纪大道100号
    r"|(?:[\u4e00-\u9fff]{2,12}(?:省|市|区|區|县|縣|镇|鎮))*"
    r"[\u4e00-\u9fff]{1,10}(?:路|街|道|巷|弄|大道)\d{1,5}(?:号|號)"
    r"(?:\d{1,4}(?:室|楼|樓|栋|棟))?"
)


def find_dates_of_birth(text: str) -> Iterator[tuple[int, int]]:
    """Spans of dates that follow a birth keyword (the date only, not the keyword)."""
    if not any(ch.isdigit() for ch in text):
        return
    for match in _DOB.finditer(text):
        yield match.span("date")


def _is_ric(number: str) -> bool:
    """The check character and a real birth date; the region code is not checked against
    stdnum's list (it misses codes, and a region is no less personal for being renamed)."""
    number = number.upper()
    try:
        ric.get_birth_date(number)
    except ValueError:
        return False
    return ric.calc_check_digit(number) == number[-1]  # it takes the whole number


def find_cn_resident_ids(text: str) -> Iterator[tuple[int, int]]:
    for match in _RIC.finditer(text):
        if _is_ric(match.group("id")):
            yield match.span("id")


# Words a Chinese address run swallows from the sentence before it ("住在北京市…").
_CN_LEAD = frozenset("住在位于於地址是为為的到寄送")


def find_addresses(text: str) -> Iterator[tuple[int, int]]:
    for match in _ADDRESS.finditer(text):
        start, end = match.span()
        while start < end and text[start] in _CN_LEAD:
            start += 1
        yield start, end
