"""PII detection and redaction on seeded, generated data: no network, no server."""

from __future__ import annotations

import ipaddress
import math
import random
from collections.abc import Callable

import pandas as pd
import phonenumbers
import pytest
from faker import Faker
from stdnum import iban, luhn

from aiaas.privacy.pii import (
    ALL_KINDS,
    ColumnPiiReport,
    PiiDetector,
    PiiKind,
    PiiMatch,
    redact_frame,
)

SEED = 20240611
# Ordinary text around each value; none of it is PII, and it must survive byte for byte.
TEMPLATES = (
    "Please contact {} about the overdue invoice.",
    "The value {} was copied from the old form, see ticket 4521.",
    "{} appears in row 17 of the export.",
    "Our notes say: {}",
    "According to the call log ({}), the refund of $42.50 was approved in 2023.",
)


@pytest.fixture(scope="module")
def detector() -> PiiDetector:
    return PiiDetector()


# --- generators ----------------------------------------------------------------------------------


def random_card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("37", 15), ("6011", 16)])
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    number = body + luhn.calc_check_digit(body)
    style = rng.choice(["plain", "space", "dash"])
    if style == "plain":
        return number
    sep = " " if style == "space" else "-"
    if length == 15:
        return sep.join([number[:4], number[4:10], number[10:]])
    return sep.join(number[i : i + 4] for i in range(0, 16, 4))


def random_iban(rng: random.Random) -> str:
    def digits(n: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(n))

    country, bban = rng.choice(
        [
            ("DE", lambda: digits(18)),
            ("GB", lambda: "WEST" + digits(14)),
            ("NL", lambda: "ABNA" + digits(10)),
            ("AT", lambda: digits(16)),
            ("CH", lambda: digits(17)),
        ]
    )
    compact = country + "00" + bban()
    number = country + iban.calc_check_digits(compact) + compact[4:]
    assert iban.is_valid(number)
    if rng.random() < 0.5:
        return number
    return " ".join(number[i : i + 4] for i in range(0, len(number), 4))


def random_phone(rng: random.Random) -> str:
    region = rng.choice(["US", "GB", "DE", "FR", "ES", "IT", "NL", "IN", "BR", "AU"])
    kind = rng.choice(
        [phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE]
    )
    example = phonenumbers.example_number_for_type(region, kind)
    national = str(example.national_number)
    number = example
    for _ in range(100):  # vary the subscriber digits; some ranges only allow a few of them
        candidate = national[:-4] + f"{rng.randrange(10_000):04d}"
        parsed = phonenumbers.parse(f"+{example.country_code}{candidate}")
        if phonenumbers.is_valid_number(parsed):
            number = parsed
            break
    style = rng.choice(
        [
            phonenumbers.PhoneNumberFormat.NATIONAL,
            phonenumbers.PhoneNumberFormat.INTERNATIONAL,
            phonenumbers.PhoneNumberFormat.E164,
        ]
    )
    return phonenumbers.format_number(number, style)


def random_ip(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return str(ipaddress.IPv4Address(rng.getrandbits(32)))
    address = ipaddress.IPv6Address(rng.getrandbits(128))
    return address.exploded if rng.random() < 0.5 else str(address)


def random_ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10_000):04d}"


GENERATORS: dict[PiiKind, Callable[[random.Random], str]] = {
    PiiKind.CREDIT_CARD: random_card,
    PiiKind.IBAN: random_iban,
    PiiKind.PHONE: random_phone,
    PiiKind.IP_ADDRESS: random_ip,
    PiiKind.NATIONAL_ID: random_ssn,
}


def assert_only_match(detector: PiiDetector, template: str, value: str, kind: PiiKind) -> None:
    text = template.format(value)
    start = template.index("{}")
    assert detector.find(text) == [PiiMatch(kind, start, start + len(value))], text
    redacted, counts = detector.redact(text)
    assert redacted == template.format(f"[{kind.name}]"), text
    assert counts == {kind: 1}


# --- positives -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_generated_values_are_found_with_their_kind_and_redacted(
    detector: PiiDetector, kind: PiiKind
) -> None:
    rng = random.Random(f"{SEED}-{kind}")
    for _ in range(60):
        value = GENERATORS[kind](rng)
        assert_only_match(detector, rng.choice(TEMPLATES), value, kind)


def test_generated_emails_are_found_and_redacted(detector: PiiDetector) -> None:
    fake = Faker(["en_US", "en_GB", "de_DE", "fr_FR"])
    fake.seed_instance(SEED)
    rng = random.Random(SEED)
    for _ in range(60):
        assert_only_match(detector, rng.choice(TEMPLATES), fake.email(), PiiKind.EMAIL)


@pytest.mark.parametrize(
    "value",
    [
        "Emma Watson",
        "Maria Garcia Lopez",
        "Ludwig van Beethoven",
        "John F. Kennedy",
        "Xochitl Hernandez",
        "Sophie Müller",
        "Giulia Bianchi",
        "Łukasz Kowalski",
        "Mark Johnson",
        "Priya Sharma",
    ],
)
def test_person_names_are_found(detector: PiiDetector, value: str) -> None:
    assert_only_match(detector, "Yesterday {} signed the contract.", value, PiiKind.PERSON)


def test_honorific_is_kept_and_the_name_redacted(detector: PiiDetector) -> None:
    redacted, counts = detector.redact("Ask Dr. Brown or Mrs Whitfield about it.")
    assert redacted == "Ask Dr. [PERSON] or Mrs [PERSON] about it."
    assert counts == {PiiKind.PERSON: 2}


def test_generated_person_names_are_mostly_found(detector: PiiDetector) -> None:
    # A gazetteer heuristic: names that are also English words ("Mark Long") can slip through.
    fake = Faker(["en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT"])
    fake.seed_instance(SEED)
    found = 0
    for _ in range(200):
        name = f"{fake.first_name()} {fake.last_name()}"
        text = f"The form was signed by {name} on the second page."
        if detector.find(text) == [PiiMatch(PiiKind.PERSON, 23, 23 + len(name))]:
            found += 1
    assert found >= 180


def test_several_kinds_in_one_text_keep_the_prose_intact(detector: PiiDetector) -> None:
    text = (
        "Emma Watson (emma.watson@example.org, +44 20 7946 0958) paid with 4111 1111 1111 1111 "
        "from DE89 3704 0044 0532 0130 00; SSN 536-22-1234, login from 192.168.1.100."
    )
    redacted, counts = detector.redact(text)
    assert redacted == (
        "[PERSON] ([EMAIL], [PHONE]) paid with [CREDIT_CARD] "
        "from [IBAN]; SSN [NATIONAL_ID], login from [IP_ADDRESS]."
    )
    assert counts == dict.fromkeys(ALL_KINDS, 1)


@pytest.mark.parametrize(
    "value",
    [
        "AB 12 34 56 C",  # UK NINO
        "54362315-K",  # Spanish DNI
        "X-2482300W",  # Spanish NIE
        "RCCMNL83S18D969H",  # Italian codice fiscale
        "390.533.447-05",  # Brazilian CPF
        "2 95 10 99 126 111 93",  # French NIR
        "1112.22.333",  # Dutch BSN
    ],
)
def test_formatted_national_ids_are_found(detector: PiiDetector, value: str) -> None:
    assert_only_match(detector, "The applicant id {} was verified.", value, PiiKind.NATIONAL_ID)


def test_bare_nine_digits_need_a_keyword_to_be_an_id(detector: PiiDetector) -> None:
    assert detector.find("order 111222333 shipped") == []
    assert detector.find("BSN: 111222333") == [PiiMatch(PiiKind.NATIONAL_ID, 5, 14)]


def test_ip_address_wins_over_a_phone_reading_of_it(detector: PiiDetector) -> None:
    # libphonenumber reads 192.168.1.100 as a valid Brazilian or Indian number.
    assert detector.find("from 192.168.1.100 today") == [PiiMatch(PiiKind.IP_ADDRESS, 5, 18)]


def test_only_requested_kinds_are_reported() -> None:
    detector = PiiDetector([PiiKind.EMAIL])
    text = "Emma Watson, emma@example.org, 4111 1111 1111 1111"
    assert detector.find(text) == [PiiMatch(PiiKind.EMAIL, 13, 29)]


def test_unknown_phone_region_is_refused() -> None:
    with pytest.raises(ValueError, match="XX"):
        PiiDetector(phone_regions=["US", "XX"])


# --- negatives -----------------------------------------------------------------------------------


def test_luhn_invalid_sixteen_digits_are_not_a_card(detector: PiiDetector) -> None:
    rng = random.Random(SEED)
    for _ in range(50):
        body = "4" + "".join(rng.choice("0123456789") for _ in range(14))
        wrong = (int(luhn.calc_check_digit(body)) + rng.randrange(1, 10)) % 10
        assert detector.find(f"ref {body}{wrong} ok") == []
        assert detector.find(f"ref {body[:4]} {body[4:8]} {body[8:12]} {body[12:]}{wrong}") == []


def test_iban_with_a_wrong_checksum_is_not_an_iban(detector: PiiDetector) -> None:
    assert detector.find("pay to DE88 3704 0044 0532 0130 00 now") == []
    assert detector.find("pay to DE88370400440532013000 now") == []


@pytest.mark.parametrize(
    "text",
    [
        "Upgrade to 1.2.3.4.5 before Friday.",
        "The address 999.1.1.1 is out of range.",
        "Release v1.2.3.4 is out.",
        "Meet at 12:30:45 near gate 3.",
    ],
)
def test_version_strings_and_times_are_not_ip_addresses(detector: PiiDetector, text: str) -> None:
    assert detector.find(text) == []


@pytest.mark.parametrize(
    "text",
    [
        "May the team will mark the results.",
        "Will it rain tomorrow? Mark my words, it will.",
        "The laptop costs $1,299.99 and shipped on 2023-01-15, order 12345678.",
        "Revenue grew 12.5% in 2021, 2022 and 2023 to 4,500,000 units.",
        "The United States and New York signed the agreement in San Francisco last March.",
        "How To Train Your Dragon: A Complete Guide For New Users In North America",
        "The Quick Brown Fox Jumps Over The Lazy Dog.",
        "Please read Chapter 4, Section 2.1 of the Annual Report before Monday.",
        "Error at line 42: expected ';' but got '}' (see RFC 2616).",
    ],
)
def test_ordinary_prose_has_no_pii(detector: PiiDetector, text: str) -> None:
    assert detector.find(text) == []
    assert detector.redact(text) == (text, {})


# --- dataframes ----------------------------------------------------------------------------------


def test_redact_frame_rewrites_strings_only_and_reports_each_column(detector: PiiDetector) -> None:
    frame = pd.DataFrame(
        {
            "id": [1, 2, 3, 4],
            "score": [0.5, math.nan, 2.25, None],
            "note": [
                "mail emma@example.org or call +44 20 7946 0958",
                None,
                "card 4111 1111 1111 1111",
                "nothing to see here",
            ],
            "mixed": ["from 10.0.0.1", 7, None, "Emma Watson"],
            "label": ["red", "green", "blue", "red"],
        }
    )
    frame["mixed"] = frame["mixed"].astype(object)
    original = frame.copy()

    out, reports = redact_frame(frame, detector)

    pd.testing.assert_frame_equal(frame, original)  # the input is not modified
    assert out.loc[0, "note"] == "mail [EMAIL] or call [PHONE]"
    assert pd.isna(out.loc[1, "note"])
    assert out.loc[2, "note"] == "card [CREDIT_CARD]"
    assert out.loc[3, "note"] == "nothing to see here"
    assert out["mixed"].tolist()[:2] == ["from [IP_ADDRESS]", 7]
    assert out.loc[2, "mixed"] is None
    assert out.loc[3, "mixed"] == "[PERSON]"
    for column in ("id", "score", "label"):
        pd.testing.assert_series_equal(out[column], frame[column])
    assert reports == [
        ColumnPiiReport("note", {"credit_card": 1, "email": 1, "phone": 1}, rows_affected=2),
        ColumnPiiReport("mixed", {"ip_address": 1, "person": 1}, rows_affected=2),
        ColumnPiiReport("label", {}, rows_affected=0),
    ]


def test_redact_frame_scans_only_the_given_columns(detector: PiiDetector) -> None:
    frame = pd.DataFrame({"a": ["x@example.org"], "b": ["y@example.org"], "n": [1]})
    out, reports = redact_frame(frame, detector, columns=["b", "n"])
    assert out["a"].tolist() == ["x@example.org"]
    assert out["b"].tolist() == ["[EMAIL]"]
    assert reports == [
        ColumnPiiReport("b", {"email": 1}, rows_affected=1),
        ColumnPiiReport("n", {}, rows_affected=0),
    ]
    with pytest.raises(KeyError, match="missing"):
        redact_frame(frame, detector, columns=["missing"])
