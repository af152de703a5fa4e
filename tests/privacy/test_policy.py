"""Privacy policies: the model, de-identification, pseudonyms and the block error."""

from __future__ import annotations

import pytest

from aiaas.privacy.policy import (
    ALL_ENTITIES,
    Deidentifier,
    Entity,
    Mode,
    PiiDetected,
    PrivacyPolicy,
    Pseudonymiser,
    block_error,
    counts,
    deidentifier,
    summary_header,
)

SEEDED = {
    Entity.EMAIL: ("Write to {} today.", "jane.doe@example.org"),
    Entity.PHONE: ("Call me on {} please.", "+44 20 7946 0958"),
    Entity.IBAN: ("Pay to {} by Friday.", "DE89 3704 0044 0532 0130 00"),
    Entity.CREDIT_CARD: ("My card is {} thanks.", "4111 1111 1111 1111"),
    Entity.IP_ADDRESS: ("The server {} is down.", "192.168.10.42"),
    Entity.NATIONAL_ID: ("SSN {} on file.", "123-45-6789"),
    Entity.PERSON: ("Ask {} about it.", "Maria Garcia"),
    Entity.ADDRESS: ("Ship it to {}, London.", "221B Baker Street"),
    Entity.DATE_OF_BIRTH: ("She was born on {} in Leeds.", "12 March 1985"),
}


@pytest.mark.parametrize("entity", sorted(SEEDED))
def test_each_entity_is_found_and_redacted(entity: Entity) -> None:
    template, value = SEEDED[entity]
    text = template.format(value)
    redacted, findings = deidentifier().apply(text)
    assert [f.entity for f in findings] == [entity]
    assert text[findings[0].start : findings[0].end] == value
    assert redacted == template.format(entity.placeholder)
    assert value not in redacted


def test_chinese_text() -> None:
    text = (
        "张伟的身份证号是11010519491231002X\uff0c电话13812345678\uff0c"
        "出生日期\uff1a1949年12月31日\uff0c住在北京市朝阳区建国路88号"
    )
    redacted, findings = deidentifier().apply(text)
    assert {f.entity for f in findings} == {
        Entity.NATIONAL_ID,
        Entity.PHONE,
        Entity.DATE_OF_BIRTH,
        Entity.ADDRESS,
    }
    for value in ("11010519491231002X", "13812345678", "1949年12月31日", "建国路88号"):
        assert value not in redacted


@pytest.mark.parametrize(
    "text",
    [
        "Order SKU-4111-2222 shipped in 2024-05-01.",
        "Invoice 123456789 is due.",
        "Card 4111 1111 1111 1112 fails Luhn.",  # not a valid card
        "IBAN-like DE00 3704 0044 0532 0130 00 fails mod-97.",
        "Version 1.2.3.4.5 of the tool.",
        "The meeting is on 12 March 1985 at noon.",  # a date, not a birth date
    ],
)
def test_hard_negatives(text: str) -> None:
    assert deidentifier().find(text) == []


def test_entity_subset() -> None:
    text = "jane.doe@example.org, +44 20 7946 0958"
    only_email = Deidentifier([Entity.EMAIL])
    redacted, findings = only_email.apply(text)
    assert redacted == "<EMAIL>, +44 20 7946 0958"
    assert counts(findings) == {Entity.EMAIL: 1}


def test_pseudonyms_consistent_within_and_different_between_requests() -> None:
    text = "Maria Garcia wrote to jane.doe@example.org; Maria Garcia and John Smith agreed."
    first = Pseudonymiser()
    out, findings = deidentifier().apply(text, first)
    assert "Maria Garcia" not in out and "jane.doe@example.org" not in out
    persons = [f for f in findings if f.entity is Entity.PERSON]
    assert len(persons) == 3
    # Same value, same pseudonym; different values, different ones.
    assert first(Entity.PERSON, "Maria Garcia") == first(Entity.PERSON, "Maria Garcia")
    assert first(Entity.PERSON, "Maria Garcia") != first(Entity.PERSON, "John Smith")
    assert out.count(first(Entity.PERSON, "Maria Garcia")) == 2
    others = {Pseudonymiser()(Entity.EMAIL, "jane.doe@example.org") for _ in range(5)}
    assert len(others) == 5


def test_policy_round_trip_and_defaults() -> None:
    policy = PrivacyPolicy(
        modes={"chat": Mode.REDACT, "embeddings": Mode.BLOCK},
        files={"fine-tune": Mode.REDACT},
        entities=frozenset({Entity.EMAIL, Entity.PHONE}),
        pseudonymise=True,
    )
    assert PrivacyPolicy.from_json(policy.to_json()) == policy
    assert policy.mode("completions") is Mode.OFF
    assert policy.file_mode("dataset") is Mode.OFF
    assert PrivacyPolicy().is_off and not policy.is_off
    assert PrivacyPolicy.from_json({}).entities == ALL_ENTITIES


def test_summary_header_and_block_error_never_hold_values() -> None:
    text = "Mail jane.doe@example.org or bob@example.com, call +44 20 7946 0958"
    findings = deidentifier().find(text)
    assert summary_header(counts(findings)) == "EMAIL=2,PHONE=1"
    error = block_error([("messages[0].content", findings)])
    assert isinstance(error, PiiDetected)
    assert error.status == 400 and error.code == "pii_detected"
    assert "email at 5-25" in error.message
    for value in ("jane.doe@example.org", "bob@example.com", "7946"):
        assert value not in error.message
    assert error.param == "messages[0].content"
