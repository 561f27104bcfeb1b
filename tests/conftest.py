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
TEST_DATA = ROOT / "tests" / "data"
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


# ---- a real server on loopback --------------------------------------------

API_KEYS = ("test-key-alpha", "test-key-beta")
ADMIN_KEY = "test-admin-gamma"  # reads and deletes feedback (the `server` fixture's MEDASK_ADMIN_KEYS)
# a string that only ever appears in request bodies: the log-hygiene tests look for it
MARKER = "zebra-quokka-7731"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: str, proc: subprocess.Popen, log_path: Path) -> None:
        self.base, self.proc, self.log_path = base, proc, log_path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def headers(self, key: str = API_KEYS[0]) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}


def start_server(
    checkpoint: Path, log_path: Path, wait_ready: bool = True, port: int | None = None, **env: str
) -> Server:
    import time

    import httpx

    port = port or free_port()
    # no evidence unless a test asks for it: the default pack may or may not be built on this machine
    full_env = {
        **os.environ,
        "MEDASK_MODEL_DIR": str(checkpoint),
        "MEDASK_PORT": str(port),
        "MEDASK_EVIDENCE": "false",
        # compiling the decode step adds seconds to every start: servers run the eager static step
        # unless a test asks; the main `server` fixture runs the compiled default
        "MEDASK_COMPILE": "false",
        # each server its own feedback store, beside its log
        "MEDASK_DATABASE_URL": f"sqlite:///{log_path.parent / f'feedback-{port}.db'}",
        **env,
    }
    log_fh = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app"], cwd=ROOT, env=full_env, stdout=log_fh, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            r = httpx.get(f"{base}/ready", timeout=2)
            if r.status_code == 200 or (not wait_ready and r.status_code == 503):
                return Server(base, proc, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server = Server(base, proc, log_path)
    if wait_ready:  # a test must never run against a server that did not come up
        stop_server(server)
        raise AssertionError(f"server did not become ready (exit {proc.poll()}):\n{server.log_text()[-3000:]}")
    return server


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.proc.kill()


@pytest.fixture(scope="session")
def ci_pack(ci_run: dict[str, Path]) -> Path:
    """The evidence pack the ci recipe built and trained with."""
    return ci_run["work"] / "evidence" / "pack"


@pytest.fixture(scope="session")
def server(ci_checkpoint: Path, ci_pack: Path, tmp_path_factory: pytest.TempPathFactory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server(
        ci_checkpoint,
        log_path,
        MEDASK_EVIDENCE="true",
        MEDASK_EVIDENCE_DIR=str(ci_pack),
        MEDASK_API_KEYS=",".join(API_KEYS),
        MEDASK_ADMIN_KEYS=ADMIN_KEY,
        MEDASK_FEEDBACK_STORE_TEXT="true",
        MEDASK_QUEUE_SIZE="32",
        MEDASK_MAX_BATCH_SIZE="8",
        MEDASK_BATCH_WAIT_MS="50",
        MEDASK_MAX_BODY_BYTES="65536",
        MEDASK_CORS_ORIGINS="https://clinic.example",
        MEDASK_COMPILE="true",
    )
    assert srv.proc.poll() is None, f"server died:\n{srv.log_text()[-3000:]}"
    yield srv
    stop_server(srv)


# ---- test layers ------------------------------------------------------------

# The layer is the folder: tests/fast/ runs without a trained model (seconds; `pytest -m "not slow"`),
# tests/e2e/ trains, loads or serves one (or runs an outside tool) and is marked slow here. A fast test
# that asks for one of these fixtures is a collection error: it belongs in tests/e2e/.
SLOW_FIXTURES = {"ci_run", "ci_checkpoint", "ci_pack", "server", "srv", "busy", "tokenizer", "reference"}
E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    misplaced = []
    for item in items:
        if E2E in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slow)
        elif SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            misplaced.append(item.nodeid)
    if misplaced:
        raise pytest.UsageError(
            "fast tests that need a trained model (move them to tests/e2e/): " + ", ".join(misplaced)
        )


def forge_pack(src: Path, dst: Path, old: str, new: str) -> Path:
    """A copy of a pack with ``old`` replaced by ``new`` in its passages and its manifest recomputed to
    match: what an attacker with write access does. It verifies against itself, not against a pin."""
    import hashlib
    import json
    import shutil

    pack = Path(shutil.copytree(src, dst))
    passages = pack / "passages.jsonl"
    passages.write_text(passages.read_text().replace(old, new))
    manifest = json.loads((pack / "manifest.json").read_text())
    data = passages.read_bytes()
    manifest["files"]["passages.jsonl"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (pack / "manifest.json").write_text(json.dumps(manifest))
    return pack
