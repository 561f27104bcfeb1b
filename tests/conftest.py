"""Shared fixtures: one real end-to-end run of the ``ci`` recipe per test session.

The checkpoint it publishes is a real GPTQ 4-bit model trained by the real
pipeline; the service tests serve it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CI_RECIPE = ROOT / "training" / "recipes" / "ci.yaml"


def run_training(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The training CLI as a user runs it, in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"training {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ci-run")
    work, out = root / "work", root / "ckpt"
    run_training("run", "--recipe", str(CI_RECIPE), "--out", str(out), "--work", str(work))
    return {"work": work, "out": out}


@pytest.fixture(scope="session")
def ci_checkpoint(ci_run: dict[str, Path]) -> Path:
    return ci_run["out"]
