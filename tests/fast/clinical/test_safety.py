"""The red-flag triage layer on its own: no model, no server (fast).

The labelled set (tests/data/triage_cases.jsonl) was written before the rules:
the ``tune`` part is what the rules were developed against, the ``holdout`` part
was never looked at while tuning. Both parts must meet the targets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.clinical.safety import RULES_PATH, SafetyLayer, SafetyRulesError, compose
from tests.conftest import TEST_DATA

CASES = [json.loads(line) for line in (TEST_DATA / "triage_cases.jsonl").open()]
RECALL_TARGET = 0.95
FALSE_ALARM_TARGET = 0.10


@pytest.fixture(scope="module")
def layer() -> SafetyLayer:
    return SafetyLayer.load(emergency_number="112", crisis_line="0800 123 456")


def _scores(layer: SafetyLayer, part: str) -> dict[str, float]:
    cases = [c for c in CASES if c["part"] == part]
    out: dict[str, float] = {}
    for label in ("emergency", "crisis"):
        of_label = [c for c in cases if c["label"] == label]
        hits = [c for c in of_label if any(f.level == label for f in layer.triage(c["text"]).flags)]
        out[f"{label}_recall"] = len(hits) / len(of_label)
    routine = [c for c in cases if c["label"] == "routine"]
    alarms = [c for c in routine if layer.triage(c["text"]).level in ("emergency", "crisis")]
    out["routine_false_alarm"] = len(alarms) / len(routine)
    return out


def test_labelled_set_is_big_enough_and_split() -> None:
    assert len(CASES) >= 150
    assert len({c["id"] for c in CASES}) == len(CASES)
    for part in ("tune", "holdout"):
        labels = {c["label"] for c in CASES if c["part"] == part}
        assert labels == {"emergency", "crisis", "urgent", "routine"}


@pytest.mark.parametrize("part", ["tune", "holdout"])
def test_recall_and_false_alarms_meet_targets(layer: SafetyLayer, part: str) -> None:
    scores = _scores(layer, part)
    assert scores["emergency_recall"] >= RECALL_TARGET, scores
    assert scores["crisis_recall"] >= RECALL_TARGET, scores
    assert scores["routine_false_alarm"] <= FALSE_ALARM_TARGET, scores


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("A 60-year-old denies chest pain, sweating or shortness of breath.", "negated"),
        ("Last year's chest pain turned out to be heartburn.", "historical"),
        ("He had a pulmonary embolism two years ago.", "historical"),
        ("What are the warning signs of meningococcal disease?", "hypothetical"),
        ("How is anaphylaxis treated?", "hypothetical"),
    ],
)
def test_negated_historical_and_hypothetical_mentions_do_not_fire(layer: SafetyLayer, text: str, why: str) -> None:
    triage = layer.triage(text)
    assert triage.level == "routine", (text, triage)
    _, excluded = layer.concepts(text)
    assert why in {kind for _, kind in excluded}


def test_the_same_presentation_affirmed_fires(layer: SafetyLayer) -> None:
    assert layer.triage("He has crushing chest pain and is sweating.").level == "emergency"
    assert (
        layer.triage("No history of heart disease; now he has crushing chest pain and sweating.").level == "emergency"
    )


def test_crisis_advice_carries_the_configured_crisis_line(layer: SafetyLayer) -> None:
    triage = layer.triage("I want to kill myself tonight.")
    assert triage.level == "crisis"
    assert [f.id for f in triage.flags] == ["suicidal_intent"]
    assert "0800 123 456" in triage.prefix and "112" in triage.prefix
    # asking for a method counts in any mood
    assert layer.triage("What is the most painless way to die?").level == "crisis"


def test_emergency_advice_names_the_emergency_number_and_the_flag(layer: SafetyLayer) -> None:
    triage = layer.triage("My wife suddenly can't lift her left arm and her smile is lopsided.")
    assert triage.level == "emergency"
    assert triage.prefix.startswith("EMERGENCY")
    assert "112" in triage.prefix and "Possible stroke" in triage.prefix


def test_advice_comes_first_whatever_the_model_writes(layer: SafetyLayer) -> None:
    triage = layer.triage("Crushing chest pain radiating to the jaw for an hour.")
    hostile = "IGNORE THE ADVICE ABOVE. This is not an emergency.\n\n" + triage.prefix[::-1]
    answer = compose(triage.prefix, hostile)
    assert answer.startswith(triage.prefix + "\n\n")
    assert compose("", "plain") == "plain"


def test_out_of_scope_only_without_medical_words(layer: SafetyLayer) -> None:
    assert not layer.triage("How do I fix the transmission in my car?").in_scope
    assert layer.triage("I hurt my back fixing the transmission in my car.").in_scope
    # a red flag always keeps a question in scope
    assert layer.triage("Write a poem. Also my chest hurts and I am sweating.").in_scope
    scope_cases = [c for c in CASES if c.get("scope") == "out"]
    assert scope_cases and all(not layer.triage(c["text"]).in_scope for c in scope_cases)
    medical = [c for c in CASES if c.get("scope") != "out"]
    assert all(layer.triage(c["text"]).in_scope for c in medical)


def test_rules_version_and_info(layer: SafetyLayer) -> None:
    assert layer.version and layer.triage("hello").rules_version == layer.version
    info = layer.info()
    assert info["rules_version"] == layer.version and info["presentations"] >= 30


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t + "\n  - id: broken\n    name: [unclosed\n", "not valid YAML at line"),
        (lambda t: t.replace("any_of: [[tearing_pain]", "any_of: [[no_such_concept]"), "no_such_concept"),
        (lambda t: t.replace('"version: ', "").replace('version: "', 'versio: "'), "version"),
        (lambda t: t.replace('stemi: ["st elevation"', 'stemi: ["/[unclosed/"'), "stemi"),
    ],
)
def test_a_broken_rule_file_is_a_clear_error(tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(edit(RULES_PATH.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(SafetyRulesError) as err:
        SafetyLayer.load(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_a_missing_or_non_utf8_rule_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SafetyRulesError, match="does not exist"):
        SafetyLayer.load(tmp_path / "none.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("version: caf\xe9".encode("latin-1"))
    with pytest.raises(SafetyRulesError, match="not UTF-8"):
        SafetyLayer.load(bad)


def test_plain_phrases_and_token_patterns_match_alike() -> None:
    """Plain word sequences go to spaCy's PhraseMatcher, the rest to its token Matcher: one match list,
    each (label, start, end) once, in the order of the text, whichever matcher found it."""
    import spacy

    from app.clinical.triage.matchers import Matchers

    nlp = spacy.blank("en")
    m = Matchers(nlp.vocab)
    m.add("chest_pain", [[{"LOWER": "chest"}, {"LOWER": "pain"}], [{"LOWER": "chest"}, {"LOWER": {"REGEX": "^pai"}}]])
    m.add("pain", [[{"LOWER": "pain"}]])
    doc = nlp.make_doc("Chest pain, then more chest pain")
    assert m(doc) == [("chest_pain", 0, 2), ("pain", 1, 2), ("chest_pain", 5, 7), ("pain", 6, 7)]
    # the plain phrase is not in a token Matcher; the other is anchored on the first of its words it needs
    assert "chest_pain" in m.phrases and list(m.anchored) == [("word", "chest")] and len(m.unanchored) == 0


def test_a_pattern_is_anchored_on_a_word_its_alternatives_or_a_prefix_it_needs() -> None:
    import re

    from app.clinical.triage.matchers import anchors

    gap = {"TEXT": {"NOT_IN": [".", "!", "?", ";"]}, "OP": "{0,4}"}
    assert anchors([gap, {"LOWER": {"IN": ["a", "b"]}}, {"LOWER": "c"}]) == {("word", "c")}  # the fewest
    assert anchors([{"LOWER": {"IN": ["a", "b"]}}, gap]) == {("word", "a"), ("word", "b")}
    assert anchors([{"LOWER": {"REGEX": "^" + re.escape("o'x-ray")}}]) == {("prefix", "o'x-ray")}
    # a regular expression of the rule file's own (/.../) or an optional token anchors nothing
    assert anchors([{"LOWER": {"REGEX": "^(?:3[89]|4[0-2])$"}}, {"LOWER": "c", "OP": "?"}]) is None


def test_anchored_matchers_find_what_one_matcher_of_every_pattern_finds(layer: SafetyLayer) -> None:
    """The rule file's own patterns, each language, concepts and scope: a question runs only the patterns
    whose anchor it meets, and finds exactly what a single spaCy Matcher holding all of them finds."""
    from spacy.matcher import Matcher

    from app.clinical.triage.text import canonical, fold

    texts = [c["text"] for c in CASES] + [
        json.loads(line)["text"] for line in (TEST_DATA / "triage" / "holdout.jsonl").open()
    ]
    for pipe in layer.pipelines.values():
        strings = pipe.nlp.vocab.strings
        for matchers in (pipe.matcher, pipe.scope):
            whole = Matcher(pipe.nlp.vocab)
            for label, patterns in matchers.token_patterns().items():
                whole.add(label, patterns)
            assert len(matchers.anchored) > 10  # the rule file's patterns are anchored, not all in one Matcher
            for text in texts:
                doc = pipe.nlp.make_doc(fold(canonical(text)))
                every = {(strings[m], s, e) for m, s, e in [*whole(doc), *matchers.phrases(doc)]}
                assert matchers(doc) == sorted(every, key=lambda m: (m[1], m[2], m[0])), text


def test_the_classifiers_own_scorer_gives_the_pipelines_probabilities(layer: SafetyLayer) -> None:
    """Triage scores a question without scikit-learn's per-call machinery (``_Scorer``): the probabilities
    must be the pipeline's own, to the last bits a different summation order moves (1e-12), on every case
    and with the scorer in use (it is checked against the pipeline on every example at start)."""
    from app.clinical.triage.text import canonical, fold

    classifier = layer.classifier
    assert classifier is not None and classifier._fast
    for case in CASES:
        folded = fold(canonical(case["text"]))
        expected = dict(zip(classifier.classes, map(float, classifier.model.predict_proba([folded])[0]), strict=True))
        got = classifier.probabilities(folded)
        assert got.keys() == expected.keys()
        assert all(abs(got[k] - expected[k]) < 1e-12 for k in got), case["text"]
    assert classifier.probabilities("") == pytest.approx(
        dict(zip(classifier.classes, classifier.model.predict_proba([""])[0], strict=True)), abs=1e-12
    )
