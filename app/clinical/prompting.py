"""The one place where a role and a question become chat messages.

Training formats every SFT/DPO example with these functions and the service
builds every prompt with them, so the model is trained under exactly the
contract it is served under. The role instruction is attached to every
example (Llama-2's Ghost Attention idea) so the model keeps the persona.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

DEFAULT_ROLE = "General Practitioner"

SPECIALTIES: tuple[str, ...] = (
    "General Practitioner",
    "Cardiologist",
    "Pulmonologist",
    "Neurologist",
    "Gastroenterologist",
    "Endocrinologist",
    "Nephrologist",
    "Infectious Disease Specialist",
    "Oncologist",
    "Hematologist",
    "Rheumatologist",
    "Dermatologist",
    "Pediatrician",
    "Obstetrician-Gynecologist",
    "Psychiatrist",
    "Orthopedic Surgeon",
    "Emergency Physician",
    "Ophthalmologist",
    "Otolaryngologist",
    "Urologist",
)

MAX_ROLE_CHARS = 64

# Plain-text markers rather than a model family's own format: the same template
# works for the embedded default (whose tokenizer makes the markers single
# special tokens) and for any Llama-family base folder. A prompt always ends in
# "\n" so that prompt and answer tokenize independently with byte-level BPE.
# BOS is written by the template, so prompts are always tokenized with
# add_special_tokens=False (as TRL does), never getting it twice.
CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MARKER_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>")
# the layout above and the user turn below (evidence block, then "Question: "), versioned: a checkpoint
# records the one it was trained on, and the service refuses one it does not render
PROMPT_FORMAT = "medask-chat-1"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A role is a title ("Paediatric Cardiologist"), never a sentence: letters,
# digits, spaces and the punctuation titles use, at most six words.
_ROLE_TITLE = re.compile(r"^[^\W_][\w .,'&()/+-]*$")
MAX_ROLE_WORDS = 6
# words that make a "role" an instruction to the model rather than a title
_ROLE_INSTRUCTION = re.compile(
    r"\b(ignor|disregard|forget|instruct|prompt|system|pretend|reveal|overrid|jailbreak)\w*", re.IGNORECASE
)


def system_instruction(role: str) -> str:
    """The paper's "act as a <role>" instruction, phrased for a clinical answer."""
    return (
        f"Act as a {role}. Answer the clinical question as a {role} would: "
        "give the most likely diagnosis and the recommended next steps or treatment."
    )


def clean_role(role: str | None) -> str:
    """Normalise a role: default when empty; control characters are refused by callers."""
    role = (role or "").strip()
    return role or DEFAULT_ROLE


def role_problem(role: str) -> str | None:
    """Why a role string is unacceptable, or None when it is fine."""
    if len(role) > MAX_ROLE_CHARS:
        return f"role must be at most {MAX_ROLE_CHARS} characters"
    if _CONTROL.search(role):
        return "role must not contain control characters"
    if not _ROLE_TITLE.match(role) or len(role.split()) > MAX_ROLE_WORDS:
        return (
            f"role must be a specialty or job title (e.g. 'Cardiologist'): letters, digits, spaces and "
            f".,'&()/+- only, at most {MAX_ROLE_WORDS} words"
        )
    if _ROLE_INSTRUCTION.search(role):
        return "role must be a specialty or job title, not an instruction to the model"
    return None


def defuse_markers(text: str) -> str:
    """User text cannot open a turn: "<|system|>" in a question stays plain text."""
    return text.replace("<|", "< |")


def user_turn(question: str, evidence: str = "") -> str:
    """The user message: the question, after the evidence block when there is one
    (built by app.clinical.evidence.evidence_block; numbered like the citations)."""
    question = defuse_markers(question.strip())
    if not evidence:
        return question
    return f"{defuse_markers(evidence)}\n\nQuestion: {question}"


# an earlier turn of a conversation: ("user" | "assistant", text)
Turn = tuple[str, str]


def build_messages(
    question: str, role: str = DEFAULT_ROLE, evidence: str = "", history: Sequence[Turn] = ()
) -> list[dict[str, str]]:
    """Chat messages for one clinical question answered in a role, after the conversation so far.

    The role's system message comes first whatever the history holds (the paper's GAtt idea: the
    persona persists across turns), and no turn's text can open a turn of its own."""
    messages = [{"role": "system", "content": system_instruction(clean_role(role))}]
    for speaker, text in history:
        if speaker not in ("user", "assistant"):
            raise ValueError(f"a history turn is spoken by 'user' or 'assistant', not {speaker!r}")
        messages.append({"role": speaker, "content": defuse_markers(text.strip())})
    messages.append({"role": "user", "content": user_turn(question, evidence)})
    return messages


def render_prompt(
    tokenizer: object, question: str, role: str = DEFAULT_ROLE, evidence: str = "", history: Sequence[Turn] = ()
) -> str:
    """The prompt text the model sees, ending where the answer starts."""
    return render_messages(tokenizer, build_messages(question, role, evidence, history))


def fit_history(history: Sequence[Turn], fits: Callable[[Sequence[Turn]], bool]) -> list[Turn]:
    """The most recent turns that fit: the oldest go first, and what is kept never starts with
    an answer whose question was cut."""
    turns = list(history)
    while turns and not fits(turns):
        turns.pop(0)
        while turns and turns[0][0] == "assistant":
            turns.pop(0)
    return turns


def render_messages(tokenizer: object, messages: list[dict[str, str]]) -> str:
    """Apply the checkpoint's chat template (ours) with the generation prompt."""
    return tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        messages, tokenize=False, add_generation_prompt=True
    )


def answer_suffix(tokenizer: object) -> str:
    """What follows an answer in training text: the end-of-sequence token."""
    return tokenizer.eos_token or ""  # type: ignore[attr-defined]
