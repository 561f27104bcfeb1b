"""Triage as people write it (issue 22): styles, Portuguese, canonical text, findings, the second signal.

Fast: no model, no server. The holdout (tests/data/triage/holdout.jsonl) was written before the rules
changed and is never used to tune them; the targets below are measured on it.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from app.clinical.safety import SafetyLayer
from app.clinical.triage.findings import extract
from app.clinical.triage.text import Speller, canonical, fold
from tests.conftest import ROOT, TEST_DATA

DATA = TEST_DATA / "triage"
HOLDOUT = [json.loads(line) for line in (DATA / "holdout.jsonl").open(encoding="utf-8")]
TUNE = [json.loads(line) for line in (ROOT / "app" / "clinical" / "triage" / "tune.jsonl").open()]
ALARM = ("emergency", "crisis")


@pytest.fixture(scope="module")
def layer() -> SafetyLayer:
    return SafetyLayer.load()


def test_the_labelled_sets_are_big_enough_and_apart() -> None:
    assert len(HOLDOUT) >= 200 and len(HOLDOUT) + len(TUNE) >= 500
    assert {c["lang"] for c in HOLDOUT} == {"en", "pt"}
    assert not {c["text"].lower() for c in HOLDOUT} & {c["text"].lower() for c in TUNE}
    styles = {c["style"] for c in HOLDOUT}
    assert {"lay", "texting", "shorthand", "vitals", "infant", "pregnancy", "elderly"} <= styles
    assert {"crisis_indirect", "third_party", "hard_negative", "metaphor"} <= styles


def test_holdout_recall_per_language_and_false_alarms(layer: SafetyLayer) -> None:
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    alarms = [0, 0]
    for c in HOLDOUT:
        level = layer.triage(c["text"]).level
        if c["label"] in ALARM:
            hits[c["lang"]][0] += level in ALARM
            hits[c["lang"]][1] += 1
        elif c["label"] == "routine":
            alarms[0] += level in ALARM
            alarms[1] += 1
    assert hits["en"][0] / hits["en"][1] >= 0.97, hits
    assert hits["pt"][0] / hits["pt"][1] >= 0.95, hits
    # measured 1/78 with the rules of 2026.11.30.3 (the first, blind measurement: 5/78; README)
    assert alarms[0] / alarms[1] <= 0.05, alarms


def test_holdout_recall_per_style(layer: SafetyLayer) -> None:
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for c in HOLDOUT:
        if c["label"] in ALARM:
            per[c["style"]][0] += layer.triage(c["text"]).level in ALARM
            per[c["style"]][1] += 1
    low = {s: v for s, v in per.items() if v[0] / v[1] < 0.9}
    assert not low, low


@pytest.mark.parametrize(
    "text",
    [
        "I want to kill myself tonight.",
        "My father has crushing chest pain and is sweating.",
        "My wife's face is drooping and her speech is slurred.",
        "My lips are swelling and my throat is closing after eating peanuts.",
        "She took a whole packet of paracetamol an hour ago.",
        "I lost everything in stocks and I want to end my life.",
        "quero me matar hoje",
    ],
)
@pytest.mark.parametrize(
    "variant",
    [
        lambda t: t.replace(" ", "  "),
        lambda t: t.replace(" ", "\u00a0"),
        lambda t: t.replace(" ", "\n"),
        lambda t: t.replace(" ", "\t"),
        lambda t: t.replace("e", "e\u00ad"),  # soft hyphens inside words
        lambda t: t.replace(" ", " \u200b"),
        lambda t: "".join(chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch for ch in t),  # full-width
        lambda t: t.upper(),
    ],
    ids=["double-space", "nbsp", "newline", "tab", "soft-hyphen", "zero-width", "full-width", "upper"],
)
def test_spacing_and_invisible_characters_change_nothing(layer: SafetyLayer, text: str, variant) -> None:
    plain = layer.triage(text)
    varied = layer.triage(variant(text))
    assert plain.level in ALARM and plain.in_scope
    assert (varied.level, [f.id for f in varied.flags], varied.in_scope) == (
        plain.level,
        [f.id for f in plain.flags],
        plain.in_scope,
    )


def test_every_labelled_question_reads_the_same_under_spacing_and_invisible_characters() -> None:
    """Triage decides on the canonical text only, so a rule that fires on a question fires on each of
    these variants of it: checked on every question of the three labelled sets."""
    older = [json.loads(line) for line in (DATA.parent / "triage_cases.jsonl").open(encoding="utf-8")]
    variants = (
        lambda t: t.replace(" ", "  "),
        lambda t: t.replace(" ", "\u00a0"),
        lambda t: t.replace(" ", " \u200b"),
        lambda t: t.replace(" ", "\n\t"),
        lambda t: t.replace("e", "e\u00ad"),
        lambda t: "".join(chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch for ch in t),
    )
    for c in HOLDOUT + TUNE + older:
        assert all(canonical(v(c["text"])) == canonical(c["text"]) for v in variants), c["text"]


def test_canonical_and_folded_text() -> None:
    assert canonical("a\u200b  b\u00a0\u00adc\n\td\ufeff") == "a b c d"
    assert fold("Não CONSIGO respirar") == "nao consigo respirar"
    assert canonical("\uff23\uff30") == "CP"


@pytest.mark.parametrize(
    ("text", "measure", "value"),
    [
        ("SpO2 84% on room air", "spo2", 84),
        ("sats 91% RA", "spo2", 91),
        ("oximetro marcando 86", "spo2", 86),
        ("BP 85/50", "sbp", 85),
        ("pressao 70 por 40", "sbp", 70),
        ("blood pressure machine says 78/45", "sbp", 78),
        ("HR 130", "hr", 130),
        ("RR 32", "rr", 32),
        ("T 39.4", "temp_c", 39.4),
        ("temp 104.5 F", "temp_c", 40.3),
        ("febre de 38,5", "temp_c", 38.5),
        ("GCS dropped from 15 to 10", "gcs", 10),
        ("glucose 2.1 mmol/L", "glucose_mmol", 2.1),
        ("blood sugar 36 mg/dL", "glucose_mmol", 2.0),
        ("lactate 5", "lactate", 5),
        ("my 6 week old", "age_days", 42),
        ("58M c/o CP", "age_days", 58 * 365),
        ("meu filho de 2 meses", "age_days", 60),
        ("G1 at 34/40", "pregnancy_weeks", 34),
        ("gravida de 33 semanas", "pregnancy_weeks", 33),
        ("seizing for 10 minutes", "minutes", 10),
        ("dor ha 40 min", "minutes", 40),
    ],
)
def test_findings_read_with_their_units(text: str, measure: str, value: float) -> None:
    assert value in extract(fold(text)).values(measure), extract(fold(text))


def test_findings_that_are_not_measurements() -> None:
    f = extract(fold("G1 at 34/40, 8 weeks pregnant, what does GCS stand for? T1DM"))
    assert not f.sbp and not f.gcs and not f.temp_c and 8.0 not in [d / 7 for d in f.age_days]


def test_findings_fire_by_threshold_and_age(layer: SafetyLayer) -> None:
    assert layer.triage("SpO2 97%, feeling fine").level == "routine"
    assert layer.triage("SpO2 84%").level == "emergency"
    assert layer.triage("my 6 week old has a temperature of 38.2").level == "emergency"
    assert layer.triage("my 4 year old has a temperature of 38.2, playing happily").level != "emergency"
    # adult thresholds do not apply to a baby's heart rate
    assert "shock" not in [f.id for f in layer.triage("my 2 month old has a heart rate of 150").flags]


def test_portuguese_advice_language_and_numbers() -> None:
    layer = SafetyLayer.load(numbers={"pt": {"emergency_number": "192", "crisis_line": "CVV 188"}})
    t = layer.triage("meu pai esta com dor no peito e suando frio")
    assert t.language == "pt" and t.level == "emergency"
    assert t.prefix.startswith("EMERGÊNCIA") and "192" in t.prefix and "infarto" in t.prefix
    assert t.note and "inglês" in t.note
    crisis = layer.triage("nao quero mais viver")
    assert crisis.level == "crisis" and "CVV 188" in crisis.prefix
    assert layer.triage("My father has chest pain and is sweating").language == "en"
    refused = layer.triage("Qual a capital da Austrália?")
    assert not refused.in_scope and layer.refusal_for(refused).startswith("Esta pergunta")


def test_portuguese_context_cues(layer: SafetyLayer) -> None:
    assert layer.triage("Sem dor no peito e sem falta de ar, tosse leve").level == "routine"
    assert layer.triage("Quais são os sintomas de um AVC?").level == "routine"
    assert layer.triage("cortei o pulso sem querer e o sangue nao para").level == "emergency"


def test_texting_forms_and_misspellings(layer: SafetyLayer) -> None:
    assert layer.triage("cant breath n lips r blue").level == "emergency"
    assert layer.triage("my dad is unconcious on the floor").level == "emergency"
    speller = Speller({"unconscious", "breathing", "fit"})
    assert speller.correct("unconcious breating fot") == "unconscious breathing fot"


def test_metaphors_outside_medicine_are_refused_not_flagged(layer: SafetyLayer) -> None:
    for text in ("Our server is bleeding memory after the deploy", "My car engine is choking when I accelerate"):
        t = layer.triage(text)
        assert t.level == "routine" and not t.in_scope, text
    # a real emergency beside an off-topic word still fires
    assert layer.triage("My son swallowed a battery from the car key").level == "emergency"


def test_the_classifier_alone_says_so(layer: SafetyLayer) -> None:
    a = layer.assess("everyone would be happier if i just disappeared for good")
    t = layer.triage("everyone would be happier if i just disappeared for good")
    if a.rules:  # the rules learnt this phrasing since: then the flag is theirs
        assert all(f.signal == "rules" for f in t.flags)
    else:
        assert a.classifier and t.flags == a.classifier and t.flags[0].signal == "classifier"
        assert "second signal" in t.flags[0].name


def test_the_classifier_does_not_read_negated_mentions(layer: SafetyLayer) -> None:
    text = "A 60-year-old denies chest pain, sweating or shortness of breath."
    assert layer.triage(text).level == "routine"
    assert layer.assess(text).classifier == ()
