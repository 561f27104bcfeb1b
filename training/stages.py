"""Stage folders: each stage writes ``<name>.partial`` and renames it when done.

A finished stage folder is complete by construction, so a rerun resumes at the
first missing one; a ``.partial`` folder holds that stage's own checkpoints and
lets it resume mid-stage.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Stage:
    work: Path
    name: str

    @property
    def final(self) -> Path:
        return self.work / self.name

    @property
    def partial(self) -> Path:
        return self.work / f"{self.name}.partial"

    def done(self) -> bool:
        return (self.final / "STAGE_DONE.json").is_file()

    def begin(self) -> Path:
        self.partial.mkdir(parents=True, exist_ok=True)
        return self.partial

    def begin_fresh(self) -> Path:
        """For stages that cannot resume mid-way: drop what an interrupted run left, keep the key."""
        if self.partial.exists():
            leftovers = [p for p in self.partial.iterdir() if p.name != "STAGE_KEY"]
            if leftovers:
                print(f"[{self.name}] discarding an interrupted partial run", flush=True)
            for p in leftovers:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        return self.begin()

    def finish(self, info: dict[str, Any] | None = None) -> Path:
        """Mark the partial folder complete and move it into place atomically."""
        (self.partial / "STAGE_DONE.json").write_text(json.dumps(info or {}, indent=1, default=str))
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.partial, self.final)
        return self.final

    def info(self) -> dict[str, Any]:
        return json.loads((self.final / "STAGE_DONE.json").read_text())

    @property
    def model_dir(self) -> Path:
        """The folder holding this stage's model: its own, or the external base it names."""
        pointer = self.final / "BASE_PATH"
        return Path(pointer.read_text().strip()) if pointer.is_file() else self.final


def progress_interval() -> float:
    """Seconds between progress-bar refreshes: lively on a terminal, sparse in logs."""
    import sys

    return 0.1 if sys.stderr.isatty() else 30.0


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_log(path: Path) -> list[dict[str, Any]]:
    """A stage's training log (a JSON list of records), or nothing when the stage kept none."""
    return json.loads(path.read_text()) if path.is_file() else []
