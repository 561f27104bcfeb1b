"""The one place where a role and a question retrieve passages from an evidence
pack and become the evidence block of a prompt.

Training (retrieval-augmented SFT/DPO), evaluation and serving all call this
module, so a model is trained under exactly the evidence contract it is served
under: the same query (role + question), the same top-k with one passage per
document, the same block format and the same token budget. An evidence pack is
a folder built by ``python -m training evidence``: ``passages.jsonl``, a BM25
index written by ``bm25s`` under ``index/``, and ``manifest.json`` with the
sha256 of every file; it is verified like a checkpoint before it is used.
Pure Python: no FastAPI import.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.manifest import read_manifest, verify_folder

log = logging.getLogger("medask.evidence")

PASSAGES = "passages.jsonl"
INDEX_DIR = "index"
PACK_REQUIRED = (PASSAGES, f"{INDEX_DIR}/params.index.json", f"{INDEX_DIR}/vocab.index.json")
STOPWORDS = "en"
SNIPPET_CHARS = 600
DEFAULT_K = 3
DEFAULT_MAX_TOKENS = 256
# candidates scored before one-passage-per-document and exclusions cut to k
_CANDIDATES = 64  # passages reranked per query
# Retrieval weights, chosen on the LiveQA 2017 medical *training* questions and MedText *train* cases
# (benchmarks/retrieval.py), never on the LiveQA test questions or the held-out split it reports
NAMED_BOOST = 2  # a condition the question names is searched for this many times over
FOCUS_BONUS = 1.0  # a passage about a condition the question names scores (1 + this) times its BM25
_NAME_WORD = re.compile(r"[a-z0-9]+")


class EvidenceError(RuntimeError):
    """The pack cannot be used; the message says exactly why."""


@dataclass(frozen=True)
class Passage:
    id: str
    doc_id: str
    title: str
    text: str
    url: str | None
    source: str
    focus: tuple[str, ...] = ()
    score: float = 0.0

    def citation(self) -> dict[str, Any]:
        snippet = self.text if len(self.text) <= SNIPPET_CHARS else self.text[: SNIPPET_CHARS - 1].rstrip() + "…"
        return {
            "id": self.id,
            "title": self.title,
            "source": self.source,
            "url": self.url,
            "score": round(self.score, 4),
            "snippet": snippet,
        }


def query_for(role: str, question: str) -> str:
    """What is searched: the role and the question, as the prompt asks them."""
    return f"{role} {question}"


def tokenize_query(text: str) -> list[str]:
    import bm25s

    return bm25s.tokenize([text], stopwords=STOPWORDS, show_progress=False, return_ids=False)[0]


def pack_digest(manifest: dict[str, Any]) -> str:
    """The pack's identity: the sha256 of its manifest's file list (every file's path, size and sha256),
    which the files were verified against at load. Any changed passage changes it."""
    files = json.dumps(manifest.get("files") or {}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(files.encode()).hexdigest()


class EvidencePack:
    """A verified pack, loaded once; ``retrieve`` is read-only and thread-safe."""

    pack_sha256: str = ""
    pinned: bool = False

    def __init__(self, folder: Path, manifest: dict[str, Any], passages: list[Passage], retriever: Any) -> None:
        self.folder = folder
        self.manifest = manifest
        self.passages = passages
        self.retriever = retriever

    @classmethod
    def load(cls, folder: Path, pin: str | None = None) -> EvidencePack:
        """A verified pack. ``pin``: the pack digest it must have (``pack_sha256``), fixed outside the folder
        (a setting, or the checkpoint's manifest), as pip's --require-hashes does: a pack whose passages were
        edited and whose manifest was recomputed to match verifies against itself, not against the pin."""
        import bm25s

        folder = Path(folder)
        problems = verify_folder(folder, PACK_REQUIRED, "a MedAsk evidence pack")
        if problems:
            raise EvidenceError(f"evidence pack {folder} is not usable: " + "; ".join(problems))
        manifest = read_manifest(folder)
        digest = pack_digest(manifest)
        if pin is not None and digest != pin:
            raise EvidenceError(
                f"evidence pack {folder} is not the pinned pack: its digest is {digest}, the pin is {pin} "
                "(MEDASK_EVIDENCE_SHA256 or the checkpoint's manifest): its files were changed"
            )
        passages = []
        with (folder / PASSAGES).open(encoding="utf-8") as fh:
            for line in fh:
                p = json.loads(line)
                passages.append(
                    Passage(p["id"], p["doc_id"], p["title"], p["text"], p.get("url"), p["source"], tuple(p["focus"]))
                )
        retriever = bm25s.BM25.load(str(folder / INDEX_DIR), load_corpus=False, show_progress=False)
        if manifest.get("passages") != len(passages):
            raise EvidenceError(
                f"evidence pack {folder}: manifest says {manifest.get('passages')} passages, found {len(passages)}"
            )
        pack = cls(folder, manifest, passages, retriever)
        pack.pack_sha256 = digest
        pack.pinned = pin is not None
        return pack

    @property
    def version(self) -> str:
        return str(self.manifest.get("version") or self.manifest.get("corpus_sha256", "")[:12])

    def retrieve(
        self,
        query: str,
        k: int = DEFAULT_K,
        exclude_docs: Collection[str] = (),
        sources: Collection[str] | None = None,
    ) -> list[Passage]:
        """The top ``k`` passages for ``query``, one per document, ties broken by BM25 rank then index order.

        BM25, then two steps for the conditions the question names (the pack's condition names found in
        it): they are searched for ``NAMED_BOOST`` times more than the other words (a consumer's question
        drowns its one condition in words about family, age and worry), and among the best
        ``_CANDIDATES`` passages one about a named condition scores ``1 + FOCUS_BONUS`` times its BM25.
        ``exclude_docs``: documents never returned (a training case's own id).
        ``sources``: only passages from these sources (evaluation per source).
        """

        if k <= 0:
            return []
        names = self.named_conditions(query)
        tokens = tokenize_query(query) + (tokenize_query(" ".join(names)) * NAMED_BOOST if names else [])
        if not tokens:
            return []
        scores = self.retriever.get_scores(tokens)
        best: dict[str, tuple[float, int, Passage]] = {}
        seen = 0
        for rank, i in enumerate(_ranked(scores)):
            score = float(scores[i])
            if score <= 0 or seen >= _CANDIDATES:
                break
            p = self.passages[int(i)]
            if p.doc_id in exclude_docs or (sources is not None and p.source not in sources):
                continue
            seen += 1
            if names and any(_names_key(f) in names for f in p.focus):
                score *= 1 + FOCUS_BONUS
            if p.doc_id not in best or score > best[p.doc_id][0]:
                best[p.doc_id] = (score, rank, p)
        ranked = sorted(best.values(), key=lambda x: (-x[0], x[1]))[:k]
        return [Passage(p.id, p.doc_id, p.title, p.text, p.url, p.source, p.focus, s) for s, _, p in ranked]

    def named_conditions(self, text: str) -> list[str]:
        """The pack's condition names found in ``text`` (longest first, none inside another)."""
        words = _NAME_WORD.findall(text.lower())
        found: list[str] = []
        for n in (4, 3, 2, 1):
            for i in range(len(words) - n + 1):
                gram = " ".join(words[i : i + n])
                if gram in self.names and not any(gram in f for f in found):
                    found.append(gram)
        return found

    @property
    def names(self) -> frozenset[str]:
        """The condition names retrieval recognises: the lexicon, as plain lower-case words."""
        if not hasattr(self, "_names"):
            self._names = frozenset(_names_key(n) for n in self.lexicon)
        return self._names

    @property
    def lexicon(self) -> frozenset[str]:
        """The pack's condition names (lower case, up to 4 words): what grounding recognises as a named
        condition in a sentence (computed once)."""
        if not hasattr(self, "_lexicon"):
            names = {f.lower().strip() for p in self.passages for f in p.focus}
            self._lexicon = frozenset(n for n in names if n and len(n.split()) <= 4 and len(n) > 3)
        return self._lexicon

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "folder": str(self.folder),
            "version": self.version,
            "passages": len(self.passages),
            "documents": m.get("documents"),
            "sources": m.get("sources"),
            # computed from the files verified and loaded (each file's sha256 checked against this list)
            "pack_sha256": self.pack_sha256,
            "pinned": self.pinned,
            "corpus_sha256": m.get("corpus_sha256"),  # declared by the pack's manifest; pack_sha256 is computed
        }


# passages sorted at once per query: enough for _CANDIDATES after exclusions in practice; more are sorted
# only when these run out
_SORTED_FIRST = 4 * _CANDIDATES


def _ranked(scores: Any) -> Iterator[int]:
    """Passage indices with a positive score, best first; equal scores keep corpus order (deterministic
    retrieval). The same order as a stable sort of the whole corpus, but sorted in two parts: the
    ``_SORTED_FIRST`` best (every passage tied with the last of them included), then, only if the caller
    reads that far, the rest. Sorting all 39,000 scores took most of a question's retrieval time."""
    import numpy as np

    hits = np.flatnonzero(scores > 0)
    first = hits
    if len(hits) > _SORTED_FIRST:
        cut = np.partition(scores[hits], len(hits) - _SORTED_FIRST)[len(hits) - _SORTED_FIRST]
        first = hits[scores[hits] >= cut]
    yield from (int(i) for i in first[np.argsort(-scores[first], kind="stable")])
    if len(first) < len(hits):
        rest = np.setdiff1d(hits, first, assume_unique=True)
        yield from (int(i) for i in rest[np.argsort(-scores[rest], kind="stable")])


def evidence_block(
    passages: Sequence[Passage],
    count_tokens: Callable[[str], int],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    token_ends: Callable[[str], list[int] | None] | None = None,
) -> str:
    """The evidence as the model reads it, within ``max_tokens`` (the question is never what gets cut).

    Each passage is numbered like its citation; a passage that does not fit is
    cut at a word boundary, and later ones are dropped. ``token_ends`` (where each token of a text ends,
    ``EngineBase.token_ends``) only makes finding the cut faster: the block is the same without it.
    """
    if not passages or max_tokens <= 0:
        return ""
    lines = ["Evidence:"]
    used = count_tokens(lines[0] + "\n")
    for n, p in enumerate(passages, 1):
        line = f"[{n}] {p.title}: {p.text}"
        cost = count_tokens(line + "\n")
        if used + cost <= max_tokens:
            lines.append(line)
            used += cost
            continue
        words = line.split()
        kept = _longest_fit(words, max_tokens - used, count_tokens, token_ends)
        if kept > 3:
            lines.append(" ".join(words[:kept]) + CUT)
        break
    return "\n".join(lines) if len(lines) > 1 else ""


CUT = " …"  # ends a passage cut by the budget


def _longest_fit(
    words: list[str],
    room: int,
    count_tokens: Callable[[str], int],
    token_ends: Callable[[str], list[int] | None] | None,
) -> int:
    """The most leading words of a passage that fit in ``room`` tokens once cut (the longest prefix whose
    ``"<words> …\n"`` does). A binary search costs a tokenization per step, 7-8 for a passage, most of a
    question's evidence block; with ``token_ends`` one tokenization of the line gives every prefix's count
    (tokens do not span a space in the byte-level BPE here nor in SentencePiece), and two exact counts
    confirm the answer, else the search decides."""

    def fits(m: int) -> bool:
        return count_tokens(" ".join(words[:m]) + CUT + "\n") <= room

    ends = token_ends(" ".join(words)) if token_ends is not None and words else None
    if ends is not None:
        tail = count_tokens(CUT + "\n")
        guess, end = 0, -1
        for m, word in enumerate(words, 1):
            end += len(word) + 1  # the end of word m in the joined line
            if bisect.bisect_right(ends, end) + tail > room:
                break
            guess = m
        if fits(guess) and (guess == len(words) or not fits(guess + 1)):
            return guess
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def gather(
    pack: EvidencePack | None,
    role: str,
    question: str,
    count_tokens: Callable[[str], int],
    k: int = DEFAULT_K,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    exclude_docs: Collection[str] = (),
    token_ends: Callable[[str], list[int] | None] | None = None,
) -> tuple[list[Passage], str]:
    """Passages for a role and question, and the evidence block the model reads: the one
    contract training, evaluation and serving share. The block holds at most the passages
    returned (a passage cut by the budget is still cited; one dropped is not)."""
    if pack is None or k <= 0:
        return [], ""
    passages = pack.retrieve(query_for(role, question), k, exclude_docs)
    block = evidence_block(passages, count_tokens, max_tokens, token_ends)
    shown = block.count("\n[")  # passages that made it into the block
    return passages[:shown], block


def load_pack(folder: Path | None, pin: str | None = None) -> EvidencePack | None:
    """The pack at ``folder``, or None when no folder is configured or it does not exist."""
    if folder is None or not Path(folder).exists():
        return None
    t0 = time.perf_counter()
    pack = EvidencePack.load(Path(folder), pin)
    log.info(
        "evidence pack loaded",
        extra={
            "event": "evidence_loaded",
            "passages": len(pack.passages),
            "seconds": round(time.perf_counter() - t0, 2),
        },
    )
    return pack


DEFAULT_PACK_DIR = Path("model_artifacts/evidence")


def open_pack(enabled: bool, folder: Path | None, pin: str | None = None) -> tuple[EvidencePack | None, str]:
    """The pack the service serves with, and a note saying which (or why none): the configured pack
    (refused when it fails verification), the default one when it has been built, or none; then
    answers carry no citations and /info says why."""
    if not enabled:
        return None, "evidence retrieval is turned off (MEDASK_EVIDENCE=false)"
    if folder is not None:
        if not Path(folder).is_dir():
            raise EvidenceError(f"MEDASK_EVIDENCE_DIR={folder} does not exist")
        return load_pack(folder, pin), f"evidence pack {folder}"
    if not (DEFAULT_PACK_DIR / PASSAGES).is_file():
        note = (
            f"no evidence pack: {DEFAULT_PACK_DIR} has not been built (run `python -m training evidence --default`, "
            "which `make serve` does) and MEDASK_EVIDENCE_DIR is not set"
        )
        log.warning(note, extra={"event": "no_evidence"})
        return None, note
    return load_pack(DEFAULT_PACK_DIR, pin), f"evidence pack {DEFAULT_PACK_DIR}"


def check_pack_against(pack: EvidencePack | None, manifest: dict[str, Any], pinned: bool) -> None:
    """A checkpoint names the pack it was trained and evaluated with (name and digest): a pack that
    carries that name must be that pack. (A pack with another name, a hospital's own, is the
    operator's choice; MEDASK_EVIDENCE_SHA256 pins any pack.)"""
    named = ((manifest.get("evidence") or {}).get("pack")) or {}
    if pack is None or pinned or not named.get("pack_sha256"):
        return
    if named.get("name") == pack.manifest.get("name") and named["pack_sha256"] != pack.pack_sha256:
        raise EvidenceError(
            f"evidence pack {pack.folder} calls itself {named['name']!r}, the pack this checkpoint names, but "
            f"its digest is {pack.pack_sha256}, not the checkpoint's {named['pack_sha256']}: its files were changed"
        )


def _names_key(name: str) -> str:
    """A condition name as retrieval compares it: lower-case words, punctuation dropped."""
    return " ".join(_NAME_WORD.findall(name.lower()))
