"""Sentence-level grounding (app/clinical/grounding.py): fast, no model."""

from __future__ import annotations

from dataclasses import dataclass

from app.clinical.grounding import Checker, SentenceGate, ground
from app.clinical.sentences import named_things, split_sentences


@dataclass(frozen=True)
class P:
    title: str
    text: str
    focus: tuple[str, ...] = ()


ANAPHYLAXIS = P(
    "What is (are) Anaphylaxis ?",
    "Anaphylaxis is a severe, potentially life-threatening allergic reaction. It can occur within seconds or "
    "minutes of exposure to something you are allergic to, such as peanuts or bee stings. Anaphylaxis causes "
    "your immune system to release chemicals that can cause you to go into shock. Treatment is an injection of "
    "epinephrine and a trip to an emergency room. Symptoms include a rapid, weak pulse, a skin rash, nausea and "
    "vomiting, and a narrowed airway that blocks breathing.",
    ("Anaphylaxis",),
)
ASTHMA = P(
    "What is (are) Asthma ?",
    "Asthma is a chronic disease that affects your airways. During an asthma attack, the lining of the airways "
    "swells and the muscles around them tighten. Inhaled corticosteroids are used for long-term control.",
    ("Asthma",),
)
Q = "My son ate peanuts and now has hives, wheezing and a swollen face. What is happening and what should we do?"


def test_sentences_split_but_abbreviations_and_decimals_stay() -> None:
    text = "Give 0.5 mg, e.g. by auto-injector. Call Dr. Smith now! Then rest.\n\n- a list item"
    assert split_sentences(text) == [
        "Give 0.5 mg, e.g. by auto-injector.",
        "Call Dr. Smith now!",
        "Then rest.",
        "- a list item",
    ]


def test_supported_sentences_get_their_markers_unsupported_ones_are_withheld() -> None:
    answer = (
        "Anaphylaxis is a severe allergic reaction to something like peanuts. "
        "Treatment is an injection of epinephrine and a trip to the emergency room. "
        "This is probably erectile dysfunction and needs sildenafil."
    )
    g = ground(answer, [ASTHMA, ANAPHYLAXIS], Q, lexicon={"anaphylaxis", "asthma", "erectile dysfunction"})
    assert "[2]" in g.text and "erectile" not in g.text and "sildenafil" not in g.text
    report = g.public()
    assert report["sentences"] == 3 and report["supported"] == 2 and report["withheld"] == 1
    assert g.answer_source == "model" and "cannot see negation" in report["method"]


def test_a_named_thing_absent_from_the_sources_is_never_supported() -> None:
    checker = Checker([ANAPHYLAXIS], Q, lexicon={"whiplash injury", "anaphylaxis"})
    sentence = "Anaphylaxis causes your immune system to release chemicals, like a whiplash injury can."
    c = checker.check(sentence)
    assert not c.supported and "whiplash injury" in c.missing
    assert "metoprolol" in named_things("start metoprolol now") and "ecg" in named_things("get an ECG")


def test_mark_mode_shows_unsupported_sentences_marked_and_off_shows_the_text() -> None:
    answer = "Anaphylaxis is a severe allergic reaction to peanuts or bee stings. The moon is made of cheese today."
    marked = ground(answer, [ANAPHYLAXIS], Q, mode="mark")
    assert "cheese today. [not supported" in marked.text and "[1]" in marked.text
    assert ground(answer, [ANAPHYLAXIS], Q, mode="off").text == answer


def test_too_little_support_composes_the_answer_from_the_passages() -> None:
    g = ground("A whiplash injury of the neck. Rest at home.", [ANAPHYLAXIS, ASTHMA], Q)
    assert g.answer_source == "evidence" and g.text.startswith("What the sources say:")
    assert "epinephrine" in g.text and "[1]" in g.text and "whiplash" not in g.text
    # every marker points to a passage that was given
    assert set(__import__("re").findall(r"\[(\d+)\]", g.text)) <= {"1", "2"}
    # what it is comes before treatment (the order a clinician reads)
    assert g.text.index("severe") < g.text.index("injection")


def test_without_passages_nothing_is_checked_and_it_says_so() -> None:
    g = ground("Some answer. Another sentence.", [], Q)
    assert g.text == "Some answer. Another sentence." and "nothing to check" in g.public()["method"]


def test_the_lexical_check_cannot_see_negation() -> None:
    """A known blind spot, kept visible: a negated copy of a passage's sentence is 'supported'."""
    c = Checker([ANAPHYLAXIS], Q).check("Anaphylaxis is not a severe, potentially life-threatening allergic reaction.")
    assert c.supported


def test_a_stream_releases_only_checked_complete_sentences() -> None:
    gate = SentenceGate(Checker([ANAPHYLAXIS], Q), "strict")
    answer = (
        "Anaphylaxis is a severe allergic reaction to peanuts or bee stings. This is erectile dysfunction. "
        "Treatment is an injection of epinephrine and a trip to an emergency room."
    )
    out = []
    for i in range(0, len(answer), 7):
        piece = gate.feed(answer[i : i + 7])
        assert "erectile" not in piece
        out.append(piece)
    tail, g = gate.close(Q)
    text = "".join(out) + tail
    assert text.strip() == g.text and "erectile" not in text and text.count("[1]") >= 2
    assert g.public()["withheld"] == 1


def test_a_loop_is_shown_once_plain_and_streamed() -> None:
    loop = "Treatment is an injection of epinephrine and a trip to an emergency room. " * 3
    g = ground(loop, [ANAPHYLAXIS], Q)
    assert g.text.count("injection of epinephrine") == 1
    gate = SentenceGate(Checker([ANAPHYLAXIS], Q), "strict")
    streamed = "".join(gate.feed(loop[i : i + 9]) for i in range(0, len(loop), 9))
    tail, sg = gate.close(Q)
    assert (streamed + tail).strip() == sg.text == g.text


def test_a_stream_cut_inside_a_sentence_keeps_its_spaces() -> None:
    """Pieces that end in a space mid-sentence, after a complete sentence: no words run together."""
    gate = SentenceGate(Checker([ANAPHYLAXIS], Q), "strict")
    pieces = ["Anaphylaxis is a severe allergic reaction to peanuts or bee stings. Treatment is ", "an ",
              "injection of epinephrine and a trip to an emergency room."]  # fmt: skip
    text = "".join(gate.feed(p) for p in pieces)
    tail, g = gate.close(Q)
    assert "is an injection" in text + tail and "isan" not in g.text
