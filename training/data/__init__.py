"""Vendored datasets, their loaders and the held-out split.

The held-out ids live in ``split.json`` beside this file and are the only
authority on what no stage may see: every stage gets its MedText rows from
``train_rows()`` and its MedQuAD text from ``medquad_texts()``, which drops any
document that contains held-out text.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from app.manifest import sha256_file

DATA_DIR = Path(__file__).resolve().parent
MEDTEXT_PATH = DATA_DIR / "medtext.jsonl"
MEDQUAD_PATH = DATA_DIR / "medquad.jsonl.gz"
SPLIT_PATH = DATA_DIR / "split.json"
SPLIT_SEED = 20231025
HELDOUT_FRACTION = 0.10

# Patient vignettes name an age, a presentation or a patient; the other rows
# are off-topic refusals, questions about the assistant and first-aid scenes.
_VIGNETTE = re.compile(r"\b\d+[- ](year|month|week|day)s?[- ]old\b|\bpresents?\b|\bpatient\b|\bcomplain", re.I)


@dataclass(frozen=True)
class MedTextRow:
    id: str
    prompt: str
    completion: str

    @property
    def kind(self) -> str:
        return "vignette" if _VIGNETTE.search(self.prompt) else "other"


class DataError(ValueError):
    """A vendored data file that cannot be read; the message names the file and line."""


@lru_cache(maxsize=1)
def load_medtext() -> tuple[MedTextRow, ...]:
    rows = []
    try:
        with MEDTEXT_PATH.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                try:
                    obj = json.loads(line)
                    prompt, completion = obj["prompt"], obj["completion"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    what = (
                        f"missing key {exc}"
                        if isinstance(exc, KeyError)
                        else "not a JSON object with prompt/completion"
                    )
                    raise DataError(f"{MEDTEXT_PATH}:{i + 1}: {what}") from None
                if not isinstance(prompt, str) or not isinstance(completion, str) or not prompt.strip():
                    raise DataError(f"{MEDTEXT_PATH}:{i + 1}: prompt and completion must be non-empty strings")
                rows.append(MedTextRow(f"medtext-{i:04d}", prompt, completion))
    except UnicodeDecodeError as exc:
        raise DataError(f"{MEDTEXT_PATH} is not UTF-8 text (byte {exc.start})") from None
    return tuple(rows)


def make_split(rows: Iterable[MedTextRow], seed: int = SPLIT_SEED, fraction: float = HELDOUT_FRACTION) -> list[str]:
    """Held-out ids, stratified by kind so both splits get non-vignette rows."""
    rng = random.Random(seed)
    heldout: list[str] = []
    by_kind: dict[str, list[str]] = {}
    for row in rows:
        by_kind.setdefault(row.kind, []).append(row.id)
    for kind in sorted(by_kind):
        ids = sorted(by_kind[kind])
        rng.shuffle(ids)
        heldout.extend(ids[: round(len(ids) * fraction)])
    return sorted(heldout)


def row_hash(row: MedTextRow) -> str:
    """A row's identity for the split: its content, so inserting or reordering rows moves no row
    across the split (positions shift; contents do not)."""
    return hashlib.sha256(f"{row.prompt}\n\x00\n{row.completion}".encode()).hexdigest()[:20]


def write_split(path: Path = SPLIT_PATH) -> dict:
    """Record the split. Rows already held out (by content) stay held out; a first split follows
    the seeded, stratified draw, and rows added later join training."""
    rows = load_medtext()
    previous = _read_split(path) if path.is_file() else None
    if previous and previous.get("heldout_hashes"):
        keep = set(previous["heldout_hashes"])
        heldout = sorted(r.id for r in rows if row_hash(r) in keep)
    else:
        heldout = make_split(rows)
    held = set(heldout)
    record = {
        "dataset": "medtext.jsonl",
        "dataset_sha256": sha256_file(MEDTEXT_PATH),
        "seed": SPLIT_SEED,
        "fraction": HELDOUT_FRACTION,
        "stratified_by": "kind (vignette / other)",
        "keyed_by": "content: sha256 of prompt and completion (heldout_hashes); heldout_ids are for reading only",
        "rows": len(rows),
        "heldout": len(heldout),
        "train": len(rows) - len(heldout),
        "heldout_hashes": sorted({row_hash(r) for r in rows if r.id in held}),
        "heldout_ids": heldout,
    }
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    heldout_ids.cache_clear()
    return record


def _read_split(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def heldout_ids() -> frozenset[str]:
    """The held-out rows of the current data, found by content. Refuses data that changed since
    the split was recorded: run ``python -m training split`` to record it (held-out rows stay out)."""
    split = _read_split(SPLIT_PATH)
    current = sha256_file(MEDTEXT_PATH)
    if split.get("dataset_sha256") != current:
        raise DataError(
            f"{MEDTEXT_PATH} changed since {SPLIT_PATH} was written (sha256 {current[:12]}, split made for "
            f"{str(split.get('dataset_sha256'))[:12]}): run `python -m training split` to record the new data; "
            "rows already held out stay held out"
        )
    hashes = set(split.get("heldout_hashes") or [])
    if not hashes:
        raise DataError(f"{SPLIT_PATH} has no heldout_hashes: run `python -m training split`")
    return frozenset(r.id for r in load_medtext() if row_hash(r) in hashes)


def train_rows(limit: int | None = None) -> list[MedTextRow]:
    rows = [r for r in load_medtext() if r.id not in heldout_ids()]
    return rows[:limit] if limit else rows


def heldout_rows(limit: int | None = None) -> list[MedTextRow]:
    rows = [r for r in load_medtext() if r.id in heldout_ids()]
    return rows[:limit] if limit else rows


def _normalise_ws(text: str) -> str:
    # MedQuAD keeps the HTML layout's indentation; runs of spaces teach nothing
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\s*\n\s*", "\n", text)
    return text.strip()


@lru_cache(maxsize=1)
def _heldout_fingerprints() -> tuple[str, ...]:
    return tuple(r.prompt for r in heldout_rows()) + tuple(r.completion for r in heldout_rows())


def contains_heldout(text: str) -> bool:
    return any(fp in text for fp in _heldout_fingerprints())


def medquad_texts(limit: int | None = None) -> list[str]:
    """MedQuAD question/answer documents, deduplicated, held-out text removed."""
    seen: set[str] = set()
    docs: list[str] = []
    with gzip.open(MEDQUAD_PATH, "rt", encoding="utf-8") as fh:
        for line in fh:
            obj = json.loads(line)
            doc = f"{_normalise_ws(obj['question'])}\n{_normalise_ws(obj['answer'])}"
            if doc in seen or contains_heldout(doc):
                continue
            seen.add(doc)
            docs.append(doc)
            if limit and len(docs) >= limit:
                break
    return docs


def medtext_train_texts(limit: int | None = None) -> list[str]:
    return [f"{r.prompt}\n{r.completion}" for r in train_rows(limit)]


# Keyword map from case text to the specialty that would take the case; the
# first match in this order wins, so specific organ systems come before the
# catch-alls (pediatrics, emergency).
_ROLE_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Obstetrician-Gynecologist",
        ("pregnan", "trimester", "menstrua", "vaginal", "ovar", "uter", "postpartum", "cervical cancer", "menopaus"),
    ),
    (
        "Cardiologist",
        (
            "chest pain",
            "heart",
            "cardiac",
            "murmur",
            "palpitation",
            "myocard",
            "atrial",
            "hypertension",
            "ecg",
            "angina",
            "aortic",
        ),
    ),
    (
        "Pulmonologist",
        ("cough", "shortness of breath", "dyspnea", "wheez", "asthma", "lung", "pneumo", "copd", "sputum"),
    ),
    (
        "Neurologist",
        (
            "headache",
            "seizure",
            "numbness",
            "weakness in",
            "stroke",
            "tremor",
            "concussion",
            "migraine",
            "neuropath",
            "memory",
            "paralysis",
        ),
    ),
    (
        "Gastroenterologist",
        ("abdominal", "diarrhea", "vomit", "liver", "jaundice", "bowel", "stool", "dysphagia", "epigastric", "hepat"),
    ),
    ("Endocrinologist", ("thyroid", "diabet", "glucose", "insulin", "adrenal", "cortisol", "pituitar")),
    ("Nephrologist", ("kidney", "renal", "creatinine", "proteinuria", "dialysis")),
    ("Urologist", ("urinary", "urination", "prostat", "testic", "scrot", "hematuria")),
    ("Infectious Disease Specialist", ("fever", "infection", "hiv", "zika", "tuberculosis", "malaria", "sepsis")),
    ("Hematologist", ("anemia", "bleeding", "bruis", "platelet", "leukemia", "lymphoma", "clot")),
    ("Oncologist", ("cancer", "tumor", "mass", "malignan", "metasta")),
    ("Rheumatologist", ("joint", "arthritis", "lupus", "gout", "stiffness")),
    ("Dermatologist", ("rash", "skin", "itch", "lesion", "vitiligo", "eczema", "psoriasis", "mole")),
    ("Ophthalmologist", ("vision", "eye", "visual")),
    ("Otolaryngologist", ("ear", "hearing", "throat", "tinnitus", "sinus", "vertigo")),
    ("Orthopedic Surgeon", ("fracture", "x-ray", "sprain", "knee", "hip", "shoulder", "back pain")),
    ("Psychiatrist", ("depress", "anxiety", "hallucinat", "suicid", "mood", "psycholog", "insomnia")),
    ("Pediatrician", ("newborn", "infant", "child", "boy", "girl", "toddler")),
    ("Emergency Physician", ("unresponsive", "choking", "bitten", "burn", "accident", "trauma", "poison")),
)


def case_prompt(tokenizer: object, row: MedTextRow, evidence: str = "") -> str:
    """The prompt a MedText case is trained, calibrated, evaluated and served under:
    its question, asked in the role of the specialty that fits it, after its evidence
    block when the recipe retrieves evidence (training.evidence.CasePrompter)."""
    from app.clinical.prompting import render_prompt

    return render_prompt(tokenizer, row.prompt, role_for_case(row.prompt), evidence)


def role_for_case(text: str) -> str:
    """The specialty that fits a case, by keyword; General Practitioner otherwise."""
    from app.clinical.prompting import DEFAULT_ROLE

    low = text.lower()
    for role, words in _ROLE_KEYWORDS:
        if any(re.search(r"\b" + re.escape(w), low) for w in words):
            return role
    return DEFAULT_ROLE
