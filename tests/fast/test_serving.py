"""Serving's readiness during a drain (fast: no model). A request the gateway admitted before SIGTERM is
in-flight work and goes on (it may still be in triage or tokenizing when the drain begins: refusing it then
was a race the shutdown test hit); one that arrives after is refused at once, and everything is refused
once the drain period is over."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from app.errors import ApiError
from app.metrics import Metrics
from app.serving import Serving
from app.settings import Settings


def _serving() -> Serving:
    svc = Serving(Settings(), Metrics())
    svc.engine = SimpleNamespace(unavailable=lambda: None)  # type: ignore[assignment]
    svc.scheduler, svc.clinic = object(), object()  # type: ignore[assignment]
    svc.ready, svc.state = True, "ready"
    return svc


def test_work_admitted_before_the_drain_goes_on_and_later_work_is_refused() -> None:
    svc = _serving()
    before = time.monotonic()
    assert svc.require_ready(before) is not None
    svc.begin_drain()
    assert svc.require_ready(before) is not None  # in flight: it finishes
    for arrived in (time.monotonic(), None):
        with pytest.raises(ApiError) as refused:
            svc.require_ready(arrived)
        assert refused.value.status == 503 and refused.value.type == "shutting_down"
    svc.end_drain()
    with pytest.raises(ApiError) as cut:
        svc.require_ready(before)  # the drain period is over: what is left is cut short
    assert cut.value.type == "shutting_down"


def test_not_ready_says_why() -> None:
    svc = Serving(Settings(), Metrics())
    svc.state = "loading"
    with pytest.raises(ApiError) as err:
        svc.require_ready(time.monotonic())
    assert err.value.status == 503 and "model is loading" in err.value.message
