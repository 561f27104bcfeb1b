"""Every metric the dashboard and the alerts query is exported by a live server."""

from __future__ import annotations

import re

import httpx

from tests.conftest import Server
from tests.fast.test_deploy import UPSTREAM_METRICS, alert_exprs, dashboard_exprs, metric_names


def test_every_queried_metric_is_exported(server: Server) -> None:
    httpx.post(
        f"{server.base}/ask", json={"question": "Headache?", "max_new_tokens": 3}, headers=server.headers(), timeout=60
    )
    live = httpx.get(f"{server.base}/metrics", headers=server.headers()).text
    exported = set(re.findall(r"^(medask_[a-z_]+)", live, flags=re.M))
    wanted = set().union(*(metric_names(e) for e in dashboard_exprs() + alert_exprs()))
    assert wanted, "no metric names found in the dashboard or alerts"
    # medask_upstream_* exist only with MEDASK_ENGINE=upstream: tests/e2e/engine/test_upstream.py checks those
    wanted = {m for m in wanted if not m.startswith(UPSTREAM_METRICS)}
    assert wanted <= exported, f"queried but not exported: {sorted(wanted - exported)}"
