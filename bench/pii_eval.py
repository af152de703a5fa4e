"""Detection quality of the privacy-policy detector (`aiaas.privacy.policy.Deidentifier`).

A labelled set is generated (seeded, so every run scores the same sentences): sentences with one
or two seeded entities of every type, in English and in Chinese, with names, addresses, phone
numbers and national ids from several countries (Faker locales), plus hard negatives (product
codes, order numbers, version strings, dates that are not birth dates, card-like numbers that
fail Luhn, IBAN-like strings that fail mod-97, names of fictional characters).

A predicted span counts as a true positive when it overlaps a gold span of the same type; each
gold span is matched at most once. Precision and recall are reported per type.

    .venv/bin/python bench/pii_eval.py [--per-type 200] [--json out.json]

Presidio is not compared: `presidio-analyzer` needs a spaCy model (en_core_web_lg) that is not
on PyPI and is downloaded at run time, which this machine cannot do.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from dataclasses import dataclass

from aiaas.privacy.policy import Entity, deidentifier
from faker import Faker
from stdnum import iban


@dataclass
class Sample:
    text: str
    spans: list[tuple[Entity, int, int]]
    lang: str


LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_BR", "en_IN")
EN_TEMPLATES: dict[Entity, tuple[str, ...]] = {
    Entity.EMAIL: ("Please write to {} before Monday.", "My address for invoices is {}."),
    Entity.PHONE: ("You can reach me on {} after six.", "Call the office at {} tomorrow."),
    Entity.IBAN: ("Transfer the deposit to {} this week.", "Our account: {}."),
    Entity.CREDIT_CARD: ("Charge my card {} for the order.", "Card number {} expires soon."),
    Entity.IP_ADDRESS: ("The login came from {} last night.", "Block traffic from {} now."),
    Entity.NATIONAL_ID: ("My national id number is {}.", "ID on file: {}."),
    Entity.PERSON: ("I spoke with {} about the contract.", "{} will join the call."),
    Entity.ADDRESS: ("Ship the parcel to {}.", "We moved to {} last year."),
    Entity.DATE_OF_BIRTH: ("She was born on {}.", "Date of birth: {}."),
}
ZH_TEMPLATES: dict[Entity, tuple[str, ...]] = {
    Entity.EMAIL: ("请把报告发到{}\uff0c谢谢。",),
    Entity.PHONE: ("我的电话是{}\uff0c下午联系我。",),
    Entity.IBAN: ("请转账到{}。",),
    Entity.CREDIT_CARD: ("我的信用卡号是{}。",),
    Entity.IP_ADDRESS: ("昨晚的登录来自{}。",),
    Entity.NATIONAL_ID: ("我的身份证号是{}。",),
    Entity.PERSON: ("{}明天会参加会议。", "我和{}谈过合同。"),
    Entity.ADDRESS: ("请寄到{}。",),
    Entity.DATE_OF_BIRTH: ("出生日期\uff1a{}。", "他出生于{}。"),
}
NEGATIVES = (
    "Order SKU-4111-2222-3333 shipped on 2024-05-01.",
    "Invoice 123456789 is due on 15 March 2025.",
    "Use part number 4111 1111 1111 1112 for the replacement.",
    "Reference DE00 3704 0044 0532 0130 00 is not an account.",
    "Upgrade to version 1.2.3.4.5 before Friday.",
    "Harry Potter and Hermione Granger visit Hogwarts.",
    "Frodo Baggins carried the ring to Mordor.",
    "Sherlock Holmes lived at a famous fictional address.",
    "The meeting was moved to 12 March 1985 in the archive scenario.",
    "Ticket #88231 was closed after 3 days.",
    "The model scored 0.9123 on 12000 samples.",
    "Room 1204, floor 12, building B.",
    "Batch 20240501-0042 passed QA.",
    "订单号 20240501123 已发货。",
    "产品型号 ABC-1234-XYZ 缺货。",
    "孙悟空和猪八戒去西天取经。",
    "会议在2024年5月1日举行。",
    "Error code 0x80070005 means access denied.",
    "Lot 7/2023, 450 kg, price 12.50 EUR.",
    "Revenue grew 12 percent to 4,500,000 dollars.",
)


def _value(entity: Entity, fake: Faker, zh: Faker, lang: str, rng: random.Random) -> str:
    f = zh if lang == "zh" else fake
    if entity is Entity.EMAIL:
        return f.email()
    if entity is Entity.PHONE:
        return f.phone_number()
    if entity is Entity.IBAN:
        # Some Faker locales make IBANs of the wrong length (en_IN's "GB" ones): real ones only.
        tries = [fake.iban() for _ in range(5)] + [_GERMAN.iban() for _ in range(20)]
        number = next(n for n in tries if iban.is_valid(n))
        return number if rng.random() < 0.5 else _grouped(number)
    if entity is Entity.CREDIT_CARD:
        number = fake.credit_card_number()
        return _grouped(number) if rng.random() < 0.5 else number
    if entity is Entity.IP_ADDRESS:
        return fake.ipv4() if rng.random() < 0.7 else fake.ipv6()
    if entity is Entity.NATIONAL_ID:
        if lang == "zh":
            return zh.ssn()
        return _national_id(fake)
    if entity is Entity.PERSON:
        return f.name()
    if entity is Entity.ADDRESS:
        if lang == "zh":
            return zh.address()
        return fake.street_address()
    if entity is Entity.DATE_OF_BIRTH:
        d = f.date_of_birth(minimum_age=18, maximum_age=90)
        if lang == "zh":
            return f"{d.year}年{d.month}月{d.day}日"
        return rng.choice(
            [d.isoformat(), d.strftime("%d/%m/%Y"), d.strftime("%d %B %Y"), d.strftime("%B %d, %Y")]
        )
    raise AssertionError(entity)


_GERMAN = Faker("de_DE")


def _grouped(number: str) -> str:
    return " ".join(number[i : i + 4] for i in range(0, len(number), 4))


def _national_id(fake: Faker) -> str:
    locale = str(fake.locales[0]) if hasattr(fake, "locales") else ""
    if locale in ("es_ES",):
        return fake.nif()
    if locale == "pt_BR":
        return fake.cpf()
    return fake.ssn()


def build(per_type: int, seed: int = 7) -> list[Sample]:
    rng = random.Random(seed)  # noqa: S311 - a reproducible test set, not a secret
    Faker.seed(seed)
    _GERMAN.seed_instance(seed)
    fakers = {loc: Faker(loc) for loc in LOCALES}
    zh = Faker("zh_CN")
    samples: list[Sample] = []
    for entity in Entity:
        for i in range(per_type):
            lang = "zh" if i % 4 == 3 else "en"  # a quarter in Chinese
            loc = rng.choice(LOCALES)
            if entity is Entity.NATIONAL_ID and lang == "en":
                loc = rng.choice(("en_US", "es_ES", "it_IT", "nl_NL", "pt_BR", "fr_FR"))
            if entity is Entity.ADDRESS and lang == "en":
                loc = rng.choice(("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT"))
            value = _value(entity, fakers[loc], zh, lang, rng)
            template = rng.choice((ZH_TEMPLATES if lang == "zh" else EN_TEMPLATES)[entity])
            start = template.index("{}")
            text = template.format(value)
            samples.append(Sample(text, [(entity, start, start + len(value))], f"{lang}:{loc}"))
    for text in NEGATIVES:
        for _ in range(max(1, per_type // 20)):
            samples.append(Sample(text, [], "negative"))
    return samples


def score(samples: list[Sample]) -> dict[str, dict[str, float]]:
    finder = deidentifier()
    tp: Counter[Entity] = Counter()
    fp: Counter[Entity] = Counter()
    fn: Counter[Entity] = Counter()
    for sample in samples:
        gold = list(sample.spans)
        for found in finder.find(sample.text):
            match = next(
                (
                    g
                    for g in gold
                    if g[0] is found.entity and found.start < g[2] and g[1] < found.end
                ),
                None,
            )
            if match is None:
                fp[found.entity] += 1
            else:
                tp[found.entity] += 1
                gold.remove(match)
        fn.update(g[0] for g in gold)
    table: dict[str, dict[str, float]] = {}
    for entity in Entity:
        p_den, r_den = tp[entity] + fp[entity], tp[entity] + fn[entity]
        table[entity.value] = {
            "precision": tp[entity] / p_den if p_den else float("nan"),
            "recall": tp[entity] / r_den if r_den else float("nan"),
            "tp": tp[entity],
            "fp": fp[entity],
            "fn": fn[entity],
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-type", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    samples = build(args.per_type)
    started = time.perf_counter()
    overall = score(samples)
    by_lang = {
        lang: score([s for s in samples if s.lang.startswith(lang) or s.lang == "negative"])
        for lang in ("en", "zh")
    }
    elapsed = time.perf_counter() - started
    print(f"{len(samples)} sentences, scored in {elapsed:.1f} s")
    print("| type | precision | recall | recall (en) | recall (zh) | tp | fp | fn |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in overall.items():
        en, zh = by_lang["en"][name]["recall"], by_lang["zh"][name]["recall"]
        print(
            f"| {name} | {row['precision']:.3f} | {row['recall']:.3f} | {en:.3f} | {zh:.3f} "
            f"| {row['tp']} | {row['fp']} | {row['fn']} |"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"overall": overall, "by_lang": by_lang}, out, indent=1)


if __name__ == "__main__":
    main()
