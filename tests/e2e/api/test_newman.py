"""The Postman collection, run by newman (Postman's own runner) against the live test server:
every request carries assertions, and none may fail."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY, API_KEYS, ROOT, Server

COLLECTION = ROOT / "deploy" / "postman" / "medask.postman_collection.json"
# `make install` puts newman here when npm is available (.ci/run's machine has it)
LOCAL_NEWMAN = ROOT / ".venv" / "node" / "node_modules" / ".bin" / "newman"


def _newman() -> str:
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed: newman (Postman's runner) cannot run here")
    found = shutil.which("newman") or (str(LOCAL_NEWMAN) if LOCAL_NEWMAN.exists() else None)
    if found is None:
        pytest.fail("Node.js is here but newman is not: run `make install` (it installs newman with npm)")
    return found


def test_postman_collection_passes_under_newman(server: Server, tmp_path: Path) -> None:
    report = tmp_path / "newman.json"
    proc = subprocess.run(
        [
            _newman(),
            "run",
            str(COLLECTION),
            "--env-var",
            f"baseUrl={server.base}",
            "--env-var",
            f"apiKey={API_KEYS[0]}",
            "--env-var",
            f"adminKey={ADMIN_KEY}",
            "--reporters",
            "cli,json",
            "--reporter-json-export",
            str(report),
            "--timeout-request",
            "60000",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    run = json.loads(report.read_text())["run"]
    failures = [f"{f['source']['name']}: {f['error']['message']}" for f in run["failures"]]
    assert proc.returncode == 0 and not failures, "\n".join(failures) or proc.stdout[-3000:]
    # every request asserted something: a collection without tests would pass vacuously
    asserted = {e["item"]["name"] for e in run["executions"] if e.get("assertions")}
    names = {e["item"]["name"] for e in run["executions"]}
    assert names == asserted, f"requests without assertions: {sorted(names - asserted)}"
    assert run["stats"]["assertions"]["total"] >= 60
