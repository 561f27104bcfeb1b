"""Thin routers: a route parses its request, makes one call (the clinic, the runner), and renders."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.api.streaming import Runner
from app.clinical.clinic import Answer, Plan
from app.feedback.store import Answered
from app.serving import Ready, Serving

ERRORS = {
    400: {"description": "Invalid request (e.g. prompt + max tokens exceed the context)"},
    401: {"description": "Missing or invalid API key"},
    413: {"description": "Body too large"},
    422: {"description": "Body fails validation"},
    429: {"description": "Queue full; see Retry-After"},
    503: {"description": "Model not loaded yet"},
    504: {"description": "Request timed out"},
}
# the 200 of a route that streams when asked: JSON, or Server-Sent Events
STREAMED = {"content": {"text/event-stream": {}}}


def serving(request: Request) -> Serving:
    return request.app.state.serving


# the handler object every route is given
ServingDep = Annotated[Serving, Depends(serving)]


def open_door(svc: Serving, request: Request) -> tuple[Ready, Runner]:
    """A ready service's parts and a runner for this request, or the 503 saying why not."""
    ready = svc.require_ready(arrival(request))
    return ready, Runner(svc, ready.scheduler)


def arrival(request: Request) -> float | None:
    """When the gateway admitted the request (monotonic): a drain lets earlier requests finish."""
    return (request.scope.get("state") or {}).get("arrived")


def remember(svc: Serving, rid: str, route: str, plan: Plan, answer: Answer) -> None:
    """Keep what feedback on this answer needs (queued: the answer never waits for the store)."""
    if svc.feedback is None:
        return
    c = plan.consult
    svc.feedback.record(
        Answered(
            id=rid,
            route=route,
            role=c.role,
            model=svc.model_name,
            rules_version=plan.triage.rules_version,
            triage_level=plan.triage.level,
            question=c.question,
            answer=answer.text,
            answer_source=answer.grounding.answer_source if answer.grounding is not None else None,
            evidence_ids=[p.id for p in plan.passages],
            history=[{"role": speaker, "content": text} for speaker, text in c.history],
        )
    )
