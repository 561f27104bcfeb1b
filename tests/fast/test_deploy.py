"""Deployment files: valid, consistent with the app, and every metric they query is exported."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
UPSTREAM_METRICS = "medask_upstream_"


def metric_names(expr: str) -> set[str]:
    return {m for m in re.findall(r"\b(medask_[a-z_]+)", expr)}


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "medask.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def test_dashboard_covers_what_ops_asked_for() -> None:
    titles = {p["title"] for p in json.loads((DEPLOY / "grafana" / "dashboards" / "medask.json").read_text())["panels"]}
    for needed in (
        "Request rate by status",
        "Time to first token",
        "Tokens per second",
        "Queue",
        "Batch size",
        "Served-answer perplexity",
    ):
        assert needed in titles
    text = " ".join(dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}" in text


def test_postman_collection_lists_every_route() -> None:
    col = json.loads((DEPLOY / "postman" / "medask.postman_collection.json").read_text())
    assert col["info"]["schema"].endswith("v2.1.0/collection.json")
    assert {v["key"] for v in col["variable"]} == {"baseUrl", "apiKey", "adminKey", "model"}
    # a path parameter is a {{variable}} in Postman, {name} in OpenAPI
    paths = {
        re.sub(r"\{\{?[^/]*\}\}?", "{}", "/" + "/".join(r["request"]["url"]["path"]))
        for group in col["item"]
        for r in group["item"]
    }
    from app.main import create_app

    routes = {re.sub(r"\{[^/]*\}", "{}", p) for p in create_app().openapi()["paths"]}
    assert routes <= paths, f"missing from Postman: {sorted(routes - paths)}"


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"api", "lb", "prometheus", "grafana"} <= set(services)
    assert "/ready" in " ".join(services["api"]["healthcheck"]["test"])
    for svc in services.values():
        for vol in svc.get("volumes", []):
            # a variable path (${MEDASK_CHECKPOINT:-./model_artifacts/default}) is checked at its default
            src = re.sub(r"^\$\{[A-Z_]+:-([^}]*)\}", r"\1", vol).split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), src
    # the vllm profile: vLLM serves the folder MedAsk reads its tokenizer from, and is scraped
    vllm = services["vllm"]
    assert vllm["profiles"] == ["vllm"]
    assert "--model=/models/checkpoint" in vllm["command"]
    assert any(arg.startswith("--quantization=") for arg in vllm["command"])
    mount = "${MEDASK_CHECKPOINT:-./model_artifacts/default}:/models/checkpoint:ro"
    assert mount in vllm["volumes"] and mount in services["api"]["volumes"]
    assert services["api"]["environment"]["MEDASK_UPSTREAM_URL"].endswith("http://vllm:8000}")
    jobs = {j["job_name"]: j for j in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]}
    assert jobs["vllm"]["dns_sd_configs"][0]["names"] == ["vllm"]
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    assert gpu["services"]["api"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (.ci/run installs it)")
def test_promtool_accepts_config_and_rules(tmp_path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        (DEPLOY / "prometheus.yml").read_text().replace("/etc/prometheus/alerts.yml", str(DEPLOY / "alerts.yml"))
    )
    for args in (["check", "config", str(config)], ["check", "rules", str(DEPLOY / "alerts.yml")]):
        proc = subprocess.run(["promtool", *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
