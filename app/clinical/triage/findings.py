"""Structured findings: the numbers in a question, with their units, before any phrase is matched.

Triage systems decide on measurements as much as on words: NEWS2 and ESI danger-zone vital signs,
the age of a febrile infant, the weeks of a pregnancy, how long a seizure has lasted. This module
reads them from the folded text (see ``text.fold``) in English and Portuguese notations, e.g.
``SpO2 84%``, ``sats 88 on air``, ``BP 85/50``, ``pressão 70 por 40``, ``HR 130``, ``RR 32``,
``T 39.4``, ``temp 104 F``, ``38,5``, ``GCS 8``, ``glucose 2.1 mmol/L``, ``glicemia 35``, ``lactate 5``,
``6 week old``, ``58M``, ``de 2 meses``, ``34/40``, ``grávida de 33 semanas``, ``for 10 minutes``,
``há 40 min``. Each value is range-checked (an impossible value is not a finding). The rule file
turns them into named findings with thresholds and sources (``findings:``); this module knows
no thresholds.

Pure Python, linear in the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_N = r"(\d{1,3}(?:[.,]\d{1,2})?)"
_GAP = r"[^0-9\n.;!?]{0,25}?"
_WORDNUM = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "fifteen": 15, "twenty": 20, "thirty": 30, "um": 1, "dois": 2, "tres": 3, "quatro": 4,
    "cinco": 5, "seis": 6, "sete": 7, "oito": 8, "nove": 9, "dez": 10, "quinze": 15, "vinte": 20, "trinta": 30,
}  # fmt: skip


def _num(text: str) -> float:
    return float(_WORDNUM.get(text) or text.replace(",", "."))


_SPO2 = [
    re.compile(
        r"\b(?:spo2|sp02|sao2|sato2|o2 sats?|sats?|saturation|saturacao|saturando|oxygen(?: saturation| level| sat)?"
        r"|pulse ?ox(?:imeter|imetry)?|oximetro|oximeter|oxigenio)\b" + _GAP + r"(\d{2,3})\b"
    ),
    re.compile(r"\b(\d{2})\s*(?:%|percent|por cento)?\s*(?:on |in |em |no )?(?:room air|ra|air|ar ambiente|aa)\b"),
]
_BP = [
    re.compile(
        r"\b(?:bp|b/p|blood pressure|pressure|pa|pressao(?: arterial)?|ta|nibp)\b"
        + _GAP
        + r"(\d{2,3})\s*(?:/|over|por|x)\s*(\d{2,3})\b"
    ),
    re.compile(r"\b(\d{2,3})\s*/\s*(\d{2,3})\s*(?:mm ?hg)\b"),
]
_HR = re.compile(
    r"\b(?:hr|heart rate|pulse(?! ?ox)(?: rate)?|fc|frequencia cardiaca|pulso|tachy(?:cardic|cardia)?|bradycardic)\b"
    + _GAP
    + r"(\d{2,3})\b|\b(\d{2,3})\s*(?:bpm|beats (?:a|per) min)"
)
_RR = re.compile(
    r"\b(?:rr|resp(?:iratory)? rate|resps?|breathing rate|fr|frequencia respiratoria|respiratory)\b"
    + _GAP
    + r"(\d{1,2})\b|\b(\d{1,2})\s*(?:breaths|respiracoes|irpm|rpm)\b"
)
_TEMP = [
    re.compile(
        r"\b(?:temp(?:erature)?|t|tax|febre(?: de)?|fever(?: of)?|temperatura|thermometer|termometro|febril)\b"
        + _GAP
        + r"(\d{2,3}(?:[.,]\d{1,2})?)\s*(?:°|º|degrees|graus)?\s*([cf])?\b"
    ),
    re.compile(r"\b(\d{2,3}(?:[.,]\d{1,2})?)\s*(?:°|º|degrees|graus)\s*([cf])?\b"),
    re.compile(r"\b(\d{2}[.,]\d)\s*(?:de temperatura|de febre)\b"),
]
_GCS = re.compile(r"\b(?:gcs|glasgow)\b" + _GAP + r"(\d{1,2})(?:\s*(?:to|->|para|pra)\s*(\d{1,2}))?\b")
_GLUCOSE = re.compile(
    r"\b(?:glucose|glicose|glicemia|blood sugar|sugar|bg|bm|cbg|dextro|hgt|glycemia|glycaemia)\b"
    + _GAP
    + r"(\d{1,3}(?:[.,]\d)?)\s*(mmol|mg)?"
)
_KETONES = re.compile(r"\b(?:ketones?|cetonas?|cetonemia|beta-?hydroxybutyrate)\b" + _GAP + r"(\d{1,2}(?:[.,]\d)?)")
_PH = re.compile(r"\bph\b" + r"[^0-9\n]{0,6}?" + r"(\d[.,]\d{1,2})")
_LACTATE = re.compile(r"\b(?:lactate|lactato|lactic acid|lactic)\b" + _GAP + r"(\d{1,2}(?:[.,]\d)?)")
_MAP = re.compile(r"\b(?:map|pam)\b" + _GAP + r"(\d{2,3})\b")
_AGE = [
    # 6 week old, 9-day-old, 3 month old, 70 years old
    (re.compile(r"\b(\d{1,3})[\s-]*(day|week|wk|month|mo|year|yr)s?[\s-]*old\b"), None),
    # clinicians: 58M, 72 F, 19 yo, 3yo
    (re.compile(r"(?:^|[\s,;(])(\d{1,3})\s?(?:yo|y/o|y\.o\.)?\s?(?:m|f)\b(?!\s*(?:min|/))"), "year"),
    (
        re.compile(
            r"\b(\d{1,3})\s?(?:yo|y/o|y\.o\.|yrs?|years?)\b(?!\s*ago)(?= (?:old|with|has|man|woman|male|female|boy|girl|c/o|pt|patient|is|and|,))"
        ),
        "year",
    ),
    (
        re.compile(
            r"\b(?:aged|age|i'?m|im|i am|he'?s|she'?s|hes|shes|he is|she is)\s(\d{1,2})\b(?!\s*(?:weeks?|wks?|days?|months?|kg|lbs?|%|/|mg|min|minutes|hours|hrs|cm|semanas))"
        ),
        "year",
    ),
    # Portuguese: de 2 meses, com 85 anos, tenho 25 anos, 65a
    (
        re.compile(
            r"\b(?:de|com|tem|tenho|idade)\s+(\d{1,3})\s+(dia|semana|mes|meses|ano)s?\b(?!\s+de\s+(?:gesta|gravid))"
        ),
        None,
    ),
    (re.compile(r"\b(\d{2,3})a\b"), "year"),
]
_UNIT_DAYS = {"day": 1, "dia": 1, "week": 7, "wk": 7, "semana": 7, "month": 30, "mo": 30, "mes": 30, "meses": 30,
              "year": 365, "yr": 365, "ano": 365}  # fmt: skip
_PREGNANT_CONTEXT = re.compile(r"(?:gravida|gestante|gestacao|pregnan)\w*\s+(?:de\s+)?$")
_PREGNANCY = [
    re.compile(
        r"\b(\d{1,2})\s*(?:weeks?|wks?|w|semanas?|sem)\s*(?:pregnant|gestation|of pregnancy|along|de gestacao|de gravidez|gravida)\b"
    ),
    re.compile(r"\b(?:g\d\s*)?(?:at\s*)?(\d{1,2})\s*(?:\+\d)?\s*/\s*40\b"),
    re.compile(
        r"\b(?:pregnant|gravida|gestante|pregnancy)\b[^0-9.\n]{0,15}?(\d{1,2})\s*(?:weeks?|wks?|semanas?|sem)\b"
    ),
    re.compile(r"(?:^|\b(?:at|i'?m|im|i am|she'?s|she is)\s)(\d{1,2})\s*(?:weeks?|wks)\b(?!\s*(?:old|ago))"),
]
_DURATION = re.compile(
    r"(?:\b(?:for|x|lasting|lasted|over|more than|longer than|ha|faz|por|mais de|durante|already)\s*|>\s*|\bx)"
    r"(\d{1,3}|" + "|".join(_WORDNUM) + r")\s*(?:\+\s*)?(minutes?|mins?|minutos?|min|m|hours?|hrs?|h|horas?)\b"
    r"|\b(\d{1,3}|"
    + "|".join(_WORDNUM)
    + r")\s*(minutes?|mins?|minutos?|min)\s+(?:later|now|straight|already|e nao|and)"
)


@dataclass
class Findings:
    """What the question measures. Empty lists when it says nothing of the kind."""

    spo2: list[float] = field(default_factory=list)
    sbp: list[float] = field(default_factory=list)
    dbp: list[float] = field(default_factory=list)
    hr: list[float] = field(default_factory=list)
    rr: list[float] = field(default_factory=list)
    temp_c: list[float] = field(default_factory=list)
    gcs: list[float] = field(default_factory=list)
    glucose_mmol: list[float] = field(default_factory=list)
    ketones: list[float] = field(default_factory=list)
    ph: list[float] = field(default_factory=list)
    lactate: list[float] = field(default_factory=list)
    map: list[float] = field(default_factory=list)
    age_days: list[float] = field(default_factory=list)
    pregnancy_weeks: list[float] = field(default_factory=list)
    minutes: list[float] = field(default_factory=list)

    def values(self, measure: str) -> list[float]:
        return getattr(self, measure)

    def public(self) -> dict[str, list[float]]:
        """The measurements found (no text): for the response and the evaluation."""
        return {k: v for k, v in self.__dict__.items() if v}


MEASURES = tuple(Findings.__dataclass_fields__)


def extract(folded: str) -> Findings:
    """Every measurement in a folded question (lower case, no accents)."""
    f = Findings()
    for rx in _SPO2:
        f.spo2 += [v for m in rx.finditer(folded) if 50 <= (v := float(m.group(1))) <= 100]
    for rx in _BP:
        for m in rx.finditer(folded):
            s, d = float(m.group(1)), float(m.group(2))
            if d == 40 and s <= 42:  # 34/40 is a gestation, not a blood pressure
                continue
            if 40 <= s <= 300 and 20 <= d <= 200 and d < s:
                f.sbp.append(s)
                f.dbp.append(d)
    f.hr = [v for m in _HR.finditer(folded) if 20 <= (v := float(m.group(1) or m.group(2))) <= 250]
    f.rr = [v for m in _RR.finditer(folded) if 3 <= (v := float(m.group(1) or m.group(2))) <= 90]
    for rx in _TEMP:
        for m in rx.finditer(folded):
            value = _num(m.group(1))
            unit = m.group(2) if rx.groups >= 2 else None
            if unit == "f" or 86 <= value <= 113:
                value = round((value - 32) * 5 / 9, 1)
            if 30 <= value <= 45:
                f.temp_c.append(value)
    for m in _GCS.finditer(folded):
        value = float(m.group(2) or m.group(1))
        if 3 <= value <= 15:
            f.gcs.append(value)
    for m in _GLUCOSE.finditer(folded):
        value, unit = _num(m.group(1)), m.group(2)
        # no unit: below 20 can only be mmol/L (a mg/dL reading under 20 is not compatible with life)
        mmol = value if unit == "mmol" or (unit is None and value < 20) else value / 18.0
        if 0.5 <= mmol <= 60:
            f.glucose_mmol.append(round(mmol, 1))
    f.ketones = [v for m in _KETONES.finditer(folded) if 0 <= (v := _num(m.group(1))) <= 15]
    f.ph = [v for m in _PH.finditer(folded) if 6.5 <= (v := _num(m.group(1))) <= 7.8]
    f.lactate = [v for m in _LACTATE.finditer(folded) if 0 <= (v := _num(m.group(1))) <= 30]
    f.map = [v for m in _MAP.finditer(folded) if 20 <= (v := float(m.group(1))) <= 200]
    pregnancy_spans: list[tuple[int, int]] = []
    for rx in _PREGNANCY:
        for m in rx.finditer(folded):
            if 3 <= (v := float(m.group(1))) <= 43:
                f.pregnancy_weeks.append(v)
                pregnancy_spans.append(m.span(1))
    for rx, fixed_unit in _AGE:
        for m in rx.finditer(folded):
            if any(a <= m.start(1) < b for a, b in pregnancy_spans):
                continue
            if _PREGNANT_CONTEXT.search(folded[max(0, m.start() - 24) : m.start(1)]):
                continue
            unit = fixed_unit or m.group(2)
            days = float(m.group(1)) * _UNIT_DAYS[unit]
            if days <= 120 * 365:
                f.age_days.append(days)
    for m in _DURATION.finditer(folded):
        amount, unit = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        minutes = _num(amount) * (60 if unit.startswith("h") else 1)
        f.minutes.append(minutes)
    return f
