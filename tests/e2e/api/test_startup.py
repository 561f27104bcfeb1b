"""A checkpoint that cannot be served never becomes ready, and says exactly why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.manifest import file_digests
from tests.conftest import ROOT, free_port, start_server, stop_server


def _copy(ci_checkpoint: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(ci_checkpoint, dst)
    return dst


def _truncate(ckpt: Path) -> str:
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return "model.safetensors"


def _alter(ckpt: Path) -> str:
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    return "sha256"


def _drop_tokenizer(ckpt: Path) -> str:
    (ckpt / "tokenizer.json").unlink()
    return "tokenizer.json"


def _unknown_quantization(ckpt: Path) -> str:
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "awq"
    (ckpt / "config.json").write_text(json.dumps(config))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"] = file_digests(ckpt)  # a consistent manifest: the method itself is the fault
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return "awq"


def _foreign_prompt_format(ckpt: Path) -> str:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["serving"]["prompt_format"] = "llama-2-chat"  # trained on a layout this service does not write
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return "prompt format 'llama-2-chat'"


@pytest.mark.parametrize("fault", [_truncate, _alter, _drop_tokenizer, _unknown_quantization, _foreign_prompt_format])
def test_main_process_exits_nonzero_with_reason(ci_checkpoint: Path, tmp_path: Path, fault) -> None:
    ckpt = _copy(ci_checkpoint, tmp_path)
    expected = fault(ckpt)
    env = {"MEDASK_MODEL_DIR": str(ckpt), "MEDASK_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3
    assert "cannot serve the checkpoint" in proc.stderr and expected in proc.stderr


def test_bad_setting_is_a_clear_error() -> None:
    env = {**os.environ, "MEDASK_PORT": "0"}
    proc = subprocess.run([sys.executable, "-m", "app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "MEDASK_PORT" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_folder_exits_nonzero(tmp_path: Path) -> None:
    env = {**os.environ, "MEDASK_MODEL_DIR": str(tmp_path / "nowhere")}
    proc = subprocess.run([sys.executable, "-m", "app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "does not exist" in proc.stderr


def test_ready_stays_503_with_reason_when_told_not_to_exit(ci_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = _copy(ci_checkpoint, tmp_path)
    _alter(ckpt)
    server = start_server(ckpt, tmp_path / "log.txt", wait_ready=False, MEDASK_EXIT_ON_LOAD_FAILURE="false")
    try:
        import time

        deadline = time.time() + 60
        while time.time() < deadline:
            r = httpx.get(f"{server.base}/ready", timeout=5)
            if "sha256" in r.text:
                break
            time.sleep(0.5)
        assert r.status_code == 503 and "model.safetensors" in r.json()["error"]["message"]
        assert httpx.get(f"{server.base}/health").status_code == 200
        r = httpx.post(f"{server.base}/ask", json={"question": "Headache?"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    finally:
        stop_server(server)
