"""Evidence packs: indexed, checksummed passages from trusted sources.

``python -m training evidence --corpus guidelines.jsonl --out packs/hospital`` builds a
pack from any corpus JSONL of ``{id, title, text, url, source}`` (a hospital's own
guidelines); ``--default`` builds the shipped pack from the vendored data: NIH's
MedQuAD answers with their page URLs and the MedText *train* split (held-out rows are
never in it, and MedQuAD documents that contain held-out text are dropped).

Long documents are cut into passages of about ``PASSAGE_WORDS`` words, each keeping
its document's title. The BM25 index is ``bm25s`` (sparse matrices, saved with the
pack). The build is deterministic: rebuilding from the same corpus gives the same
bytes, which is how the default pack ships (its manifest is committed; the files are
rebuilt on first use and must match it).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from app.clinical.evidence import INDEX_DIR, PASSAGES, STOPWORDS
from app.manifest import MANIFEST, file_digests, read_manifest, verify_folder
from training.data import MEDQUAD_PATH, _normalise_ws, contains_heldout, train_rows

PASSAGE_WORDS = 120
OVERLAP_WORDS = 20
MEDTEXT_URL = "https://huggingface.co/datasets/BI55/MedText"
DEFAULT_PACK = Path(__file__).resolve().parents[1] / "model_artifacts" / "evidence"
PACK_FORMAT = 1


class EvidenceBuildError(ValueError):
    """A corpus or destination that cannot be used; the message names the file, line or key."""


def medquad_documents(limit: int | None = None) -> Iterator[dict[str, Any]]:
    """MedQuAD answers as documents: the question is the title, the focus is the condition."""
    seen: set[str] = set()
    with gzip.open(MEDQUAD_PATH, "rt", encoding="utf-8") as fh:
        for line in fh:
            obj = json.loads(line)
            text = _normalise_ws(obj["answer"])
            title = _normalise_ws(obj["question"])
            if not text or text in seen or contains_heldout(f"{title}\n{text}"):
                continue
            seen.add(text)
            yield {
                "id": f"medquad-{obj['qid']}",
                "title": title,
                "text": text,
                "url": obj.get("url") or None,
                "source": "MedQuAD",
                "focus": [obj["focus"]] if obj.get("focus") else [],
            }
            if limit and len(seen) >= limit:
                return


def medtext_documents(limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Validated MedText *train* cases: the case and its assessment. Ids are the row ids, so a
    training row can exclude its own case."""
    for row in train_rows(limit):
        yield {
            "id": row.id,
            "title": "MedText case: " + _first_sentence(row.prompt),
            "text": f"Case: {row.prompt} Assessment: {row.completion}",
            "url": MEDTEXT_URL,
            "source": "MedText",
            "focus": [],
        }


def default_corpus(medquad_docs: int | None = None, medtext_rows: int | None = None) -> list[dict[str, Any]]:
    """MedQuAD (all, or the first ``medquad_docs``) and the MedText train split (or its first rows)."""
    docs = list(medquad_documents(medquad_docs))
    focuses = focus_vocabulary(docs)
    for doc in medtext_documents(medtext_rows):
        doc["focus"] = conditions_in(doc["text"], focuses)
        docs.append(doc)
    return docs


def focus_vocabulary(docs: Iterable[dict[str, Any]]) -> list[str]:
    """Condition names (MedQuAD focus) long enough to be matched in free text."""
    names = {f.lower() for d in docs for f in d.get("focus", []) if len(f) >= 5}
    return sorted(names)


_WORDCHARS = re.compile(r"[^a-z0-9]+")


def conditions_in(text: str, focuses: Iterable[str]) -> list[str]:
    """The focus names that occur in ``text`` as whole words (case-insensitive)."""
    padded = f" {_WORDCHARS.sub(' ', text.lower())} "
    return [f for f in focuses if f" {_WORDCHARS.sub(' ', f).strip()} " in padded]


def _first_sentence(text: str, limit: int = 100) -> str:
    first = re.split(r"(?<=[.?!])\s", text.strip(), maxsplit=1)[0]
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


def chunk(doc: dict[str, Any], words: int = PASSAGE_WORDS, overlap: int = OVERLAP_WORDS) -> list[dict[str, Any]]:
    """Passages of about ``words`` words with ``overlap`` shared; each keeps the document's title."""
    tokens = doc["text"].split()
    step = max(words - overlap, 1)
    starts = list(range(0, max(len(tokens) - overlap, 1), step)) or [0]
    out = []
    for n, start in enumerate(starts):
        out.append(
            {
                "id": f"{doc['id']}#{n}" if len(starts) > 1 else doc["id"],
                "doc_id": doc["id"],
                "title": doc["title"],
                "text": " ".join(tokens[start : start + words]),
                "url": doc.get("url"),
                "source": doc["source"],
                "focus": list(doc.get("focus") or []),
            }
        )
    return out


def read_corpus(path: Path) -> list[dict[str, Any]]:
    """A corpus JSONL; a malformed line is an error naming the file and line."""
    docs = []
    ids: set[str] = set()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EvidenceBuildError(f"corpus {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise EvidenceBuildError(f"corpus {path} is not UTF-8: {exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvidenceBuildError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise EvidenceBuildError(f"{path}:{n}: each line must be a JSON object")
        for key in ("id", "title", "text", "source"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise EvidenceBuildError(f"{path}:{n}: {key!r} must be a non-empty string")
        if obj.get("url") is not None and not isinstance(obj["url"], str):
            raise EvidenceBuildError(f"{path}:{n}: 'url' must be a string or null")
        if obj["id"] in ids:
            raise EvidenceBuildError(f"{path}:{n}: duplicate id {obj['id']!r}")
        ids.add(obj["id"])
        docs.append({**obj, "focus": obj.get("focus") or []})
    if not docs:
        raise EvidenceBuildError(f"corpus {path} has no documents")
    return docs


def corpus_sha256(docs: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps(d, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def build_pack(docs: list[dict[str, Any]], out: Path, name: str, force: bool = False) -> dict[str, Any]:
    """Chunk, index and write a pack atomically (a ``.partial`` folder renamed into place)."""
    import bm25s

    out = Path(out)
    expected = _committed_manifest(out)
    if out.exists() and not force and expected is None and any(out.iterdir()):
        raise EvidenceBuildError(f"{out} exists and is not an evidence pack; choose another --out")
    passages = [p for d in docs for p in chunk(d)]
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    (partial / INDEX_DIR).mkdir(parents=True)
    with (partial / PASSAGES).open("w", encoding="utf-8") as fh:
        for p in passages:
            fh.write(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n")
    texts = [f"{p['title']} {p['text']}" for p in passages]
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords=STOPWORDS, show_progress=False), show_progress=False)
    retriever.save(str(partial / INDEX_DIR), show_progress=False)
    sources: dict[str, int] = {}
    for d in docs:
        sources[d["source"]] = sources.get(d["source"], 0) + 1
    manifest = {
        "format": PACK_FORMAT,
        "name": name,
        "corpus_sha256": corpus_sha256(docs),
        "documents": len(docs),
        "passages": len(passages),
        "sources": sources,
        "chunking": {"words": PASSAGE_WORDS, "overlap": OVERLAP_WORDS, "title_kept": True},
        "index": {"library": "bm25s", "method": "lucene", "k1": 1.5, "b": 0.75, "stopwords": STOPWORDS},
        "libraries": {p: _version(p) for p in ("bm25s", "numpy")},
        "files": file_digests(partial),
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if expected is not None and expected.get("files") != manifest["files"]:
        differing = sorted(
            k
            for k in set(expected.get("files", {})) | set(manifest["files"])
            if expected.get("files", {}).get(k) != manifest["files"].get(k)
        )
        if not force:
            shutil.rmtree(partial)
            raise EvidenceBuildError(
                f"rebuilt pack differs from the committed manifest in {out} ({', '.join(differing)}); "
                "the corpus or library versions changed. Rebuild with --force to replace it."
            )
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return manifest


def _committed_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(out) if (out / MANIFEST).is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def ensure_default_pack(out: Path = DEFAULT_PACK, force: bool = False) -> tuple[dict[str, Any], bool]:
    """The default pack at ``out``: verified as it is, or rebuilt from the vendored data.
    Returns the manifest and whether it was built now."""
    if not force and (out / MANIFEST).is_file() and not verify_folder(out, (PASSAGES,), "an evidence pack"):
        return read_manifest(out), False
    return build_pack(default_corpus(), out, "medask-default-evidence", force=force), True


class CasePrompter:
    """A MedText case's prompt as the recipe trains, calibrates and evaluates it: with the
    evidence block the service would retrieve for it, never retrieving the case itself."""

    def __init__(self, tokenizer: Any, pack: Any = None, k: int = 3, max_tokens: int = 256) -> None:
        self.tokenizer, self.pack, self.k, self.max_tokens = tokenizer, pack, k, max_tokens

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def evidence(self, row: Any) -> tuple[list[Any], str]:
        from app.clinical.evidence import gather
        from training.data import role_for_case

        return gather(
            self.pack, role_for_case(row.prompt), row.prompt, self.count_tokens, self.k, self.max_tokens, {row.id}
        )

    def __call__(self, row: Any) -> str:
        from training.data import case_prompt

        return case_prompt(self.tokenizer, row, self.evidence(row)[1])


def case_prompter(tokenizer: Any, recipe: Any, work: Path | None) -> CasePrompter:
    """The recipe's prompter: with the run's evidence pack when ``evidence.enabled``."""
    if not recipe.evidence.enabled or work is None:
        return CasePrompter(tokenizer)
    from app.clinical.evidence import EvidencePack

    pack = EvidencePack.load(Path(work) / "evidence" / "pack")
    return CasePrompter(tokenizer, pack, recipe.evidence.k, recipe.evidence.max_tokens)


def retrieval_quality(pack: Any, rows: list[Any], k: int = 5) -> dict[str, Any]:
    """Evidence relevance on held-out rows: recall@k is the share of rows whose gold answer names a
    condition (a MedQuAD focus found in the gold text) that is the focus of one of the top-k
    passages, among rows where such a condition exists; per source and over the whole pack.
    Also the retrieval latency per query."""
    import time

    from app.clinical.evidence import query_for
    from training.data import role_for_case

    focuses = sorted({f.lower() for p in pack.passages for f in p.focus if p.source == "MedQuAD" and len(f) >= 5})
    sources = sorted({p.source for p in pack.passages})
    hits = {name: 0 for name in ["all", *sources]}
    counted, latencies = 0, []
    for row in rows:
        gold = set(conditions_in(row.completion, focuses))
        t0 = time.perf_counter()
        top = pack.retrieve(query_for(role_for_case(row.prompt), row.prompt), k)
        latencies.append(time.perf_counter() - t0)
        if not gold:
            continue
        counted += 1
        hits["all"] += any(gold & {f.lower() for f in p.focus} for p in top)
        for source in sources:
            top_s = pack.retrieve(query_for(role_for_case(row.prompt), row.prompt), k, sources={source})
            hits[source] += any(gold & {f.lower() for f in p.focus} for p in top_s)
    latencies.sort()
    return {
        "k": k,
        "rows": len(rows),
        "rows_with_condition": counted,
        "recall": {name: (h / counted if counted else None) for name, h in hits.items()},
        "latency_ms_p50": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "latency_ms_p99": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None,
        "passages": len(pack.passages),
    }


def run_evidence_stage(stage: Any, recipe: Any) -> Path:
    """The run's pack, built from the vendored data (the MedText rows the recipe trains on)."""
    work = stage.begin_fresh()
    if not recipe.evidence.enabled:
        return stage.finish({"enabled": False})
    docs = default_corpus(recipe.evidence.medquad_docs, recipe.data.train_rows)
    manifest = build_pack(docs, work / "pack", f"medask-{recipe.name}-evidence")
    return stage.finish({"enabled": True, "passages": manifest["passages"], "corpus_sha256": manifest["corpus_sha256"]})


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None
