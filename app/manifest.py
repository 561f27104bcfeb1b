"""The checkpoint contract: ``manifest.json`` lists the sha256 of every file.

Pure standard library. Training writes manifests with ``file_digests`` and the
service refuses to start on a folder that ``verify_checkpoint`` finds fault with,
so both sides agree on what a complete checkpoint is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
REQUIRED = ("config.json", "tokenizer.json", "tokenizer_config.json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file below ``folder`` except the manifest itself."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def verify_checkpoint(folder: Path) -> list[str]:
    """Everything wrong with a checkpoint folder; an empty list means it is sound."""
    return verify_folder(folder, REQUIRED, "a published MedAsk checkpoint", weights=True)


def verify_folder(folder: Path, required: tuple[str, ...], what: str, weights: bool = False) -> list[str]:
    """Check a folder against its manifest: every listed file present with its size and sha256,
    no file the manifest does not list (loaders read whatever is there), no links, no path
    that leaves the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"folder {folder} does not exist"]
    if not (folder / MANIFEST).is_file():
        return [f"{folder} has no {MANIFEST}: not {what}"]
    try:
        manifest = read_manifest(folder)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"{folder / MANIFEST} is not valid JSON: {exc}"]
    problems: list[str] = []
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        return [f"{MANIFEST} lists no files"]
    for name in required:
        if name not in files:
            problems.append(f"{name} is missing from the manifest")
    if weights and not any(n.endswith(".safetensors") for n in files):
        problems.append("the manifest lists no .safetensors weights")
    root = folder.resolve()
    for rel, meta in files.items():
        path = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or rel != Path(rel).as_posix():
            problems.append(f"manifest entry {rel!r} is not a plain relative path inside the folder")
        elif path.is_symlink() or path.resolve() != root / rel:  # a link here or in a parent folder
            problems.append(f"{rel} is a symbolic link (refused)")
        elif not path.is_file():
            problems.append(f"{rel} is listed in the manifest but missing")
        elif not isinstance(meta, dict) or path.stat().st_size != meta.get("bytes"):
            problems.append(
                f"{rel} has {path.stat().st_size} bytes, the manifest says {meta.get('bytes') if isinstance(meta, dict) else '?'} (truncated or altered)"
            )
        elif sha256_file(path) != meta.get("sha256"):
            problems.append(f"{rel} fails its sha256 check against the manifest (altered)")
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST or (path.is_dir() and not path.is_symlink()):
            continue
        if rel not in files:
            kind = "symbolic link" if path.is_symlink() else "file"
            problems.append(f"{rel} is a {kind} the manifest does not list (refused: loaders would read it)")
    return problems


# ---- the serving contract: what the service must know to serve as the model was trained ---------
SERVING = "serving"


@dataclass(frozen=True)
class ServingContract:
    """What a checkpoint tells the service, typed, in one place (``manifest["serving"]``).

    Checkpoints published before the block existed carry the same facts in older places (the recipe's
    ``evidence`` and ``heldout_generation.perplexities``); ``serving_contract`` reads them from there.
    """

    evidence_k: int | None = None  # passages per prompt the model was trained and evaluated with
    evidence_max_tokens: int | None = None  # the evidence block's token budget
    # held-out answers' perplexities: the quality gate places each served answer among them
    reference_perplexities: tuple[float, ...] = ()
    prompt_format: str | None = None  # the prompt layout the model was trained on (app.clinical.prompting)
    source: str = "none"  # "manifest", "legacy" (read from the older places) or "none"

    def to_json(self) -> dict[str, Any]:
        return {
            "evidence_k": self.evidence_k,
            "evidence_max_tokens": self.evidence_max_tokens,
            "reference_perplexities": list(self.reference_perplexities),
            "prompt_format": self.prompt_format,
        }


def serving_contract(manifest: dict[str, Any]) -> ServingContract:
    """The checkpoint's serving contract: the typed block, else the older places, else empty."""
    block = manifest.get(SERVING)
    if isinstance(block, dict):
        return ServingContract(
            evidence_k=_int(block.get("evidence_k")),
            evidence_max_tokens=_int(block.get("evidence_max_tokens")),
            reference_perplexities=_floats(block.get("reference_perplexities")),
            prompt_format=block.get("prompt_format") if isinstance(block.get("prompt_format"), str) else None,
            source="manifest",
        )
    trained = (manifest.get("recipe") or {}).get("evidence") or {}
    reference = (manifest.get("heldout_generation") or {}).get("perplexities")
    if not trained and not reference:
        return ServingContract()
    return ServingContract(
        evidence_k=_int(trained.get("k")),
        evidence_max_tokens=_int(trained.get("max_tokens")),
        reference_perplexities=_floats(reference),
        source="legacy",
    )


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else None


def _floats(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(float(v) for v in value if isinstance(v, int | float) and not isinstance(v, bool))
