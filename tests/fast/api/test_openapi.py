"""The OpenAPI document without a model: every operation has an id of its own (client generators
key on it; a GET + HEAD route used to give both one id, picked from a set: it changed between runs)."""

from __future__ import annotations

import collections

from app.main import create_app
from app.settings import Settings


def test_every_operation_id_is_unique_and_names_its_method() -> None:
    doc = create_app(Settings()).openapi()
    ids = [(op["operationId"], method) for ops in doc["paths"].values() for method, op in ops.items()]
    counts = collections.Counter(i for i, _ in ids)
    assert [i for i, n in counts.items() if n > 1] == []
    assert {i for i, m in ids if m == "head"} == {"health_health_head", "ready_ready_head"}
