"""Clinicians' feedback on answers the service gave: POST /feedback (any caller with a key when keys are
set); GET /feedback/summary, GET /feedback/export, DELETE /feedback/{id} and DELETE /feedback (by age) with
an admin key (MEDASK_ADMIN_KEYS) only: feedback is clinical material, never readable without one."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import Field, field_validator

from app.api.routes import ERRORS, ServingDep
from app.api.schemas import BaseRequest
from app.api.security import check_key
from app.errors import ApiError
from app.feedback.service import FeedbackService
from app.feedback.store import REASONS, NotFound

router = APIRouter(prefix="/feedback", tags=["feedback"])
Reason = Literal["wrong", "unsafe", "outdated", "unsupported", "incomplete", "off_topic"]
assert set(Reason.__args__) == set(REASONS)  # type: ignore[attr-defined]


class FeedbackRequest(BaseRequest):
    answer_id: str = Field(
        ..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$", description="the answer's `id`"
    )
    rating: Literal["up", "down"]
    reasons: list[Reason] = Field(default_factory=list, max_length=6, description="why, from a fixed list")
    correction: str | None = Field(None, max_length=4000, description="what the answer should have said")
    rater_role: str | None = Field(None, max_length=64, description="the rater's specialty")

    @field_validator("reasons")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @field_validator("correction", "rater_role")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be blank (leave it out instead)")
        return v.strip() if v is not None else None


def store(svc: ServingDep) -> FeedbackService:
    if svc.feedback is None:
        if svc.settings.feedback and not svc.ready:
            raise ApiError(
                503, "service_unavailable", "not ready: the feedback store is opening", headers={"Retry-After": "5"}
            )
        raise ApiError(404, "feedback_disabled", "feedback is turned off on this server (MEDASK_FEEDBACK=false)")
    return svc.feedback


StoreDep = Annotated[FeedbackService, Depends(store)]


def admin(request: Request, svc: ServingDep) -> None:
    """An admin key, whatever else: with none configured, feedback cannot be read at all."""
    keys = svc.settings.admin_key_list
    if not keys:
        raise ApiError(
            403, "permission_denied", "reading feedback needs an admin key; none is configured (MEDASK_ADMIN_KEYS)"
        )
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or check_key(token.strip(), keys) is None:
        raise ApiError(403, "permission_denied", "this route needs an admin key (MEDASK_ADMIN_KEYS)")


AdminDep = Depends(admin)


ADMIN_ONLY = {**ERRORS, 403: {"description": "Not an admin key (MEDASK_ADMIN_KEYS), or none configured"}}


@router.post(
    "",
    status_code=201,
    summary="Rate (and correct) an answer the service gave, by its id",
    responses={
        **ERRORS,
        404: {"description": "No such answer kept (never given, or past MEDASK_FEEDBACK_RETENTION_DAYS)"},
    },
)
async def post_feedback(req: FeedbackRequest, request: Request, svc: ServingDep, fb: StoreDep) -> dict[str, Any]:
    key_id = (request.scope.get("state") or {}).get("key_id")
    try:
        out = await fb.write(
            fb.store.add_feedback, req.answer_id, req.rating, req.reasons, req.correction, req.rater_role, key_id
        )
    except NotFound:
        raise ApiError(
            404,
            "answer_not_found",
            f"no answer {req.answer_id!r} is kept here: never given, or older than the retention period",
            "answer_id",
        ) from None
    for reason in req.reasons or ["none"]:
        svc.metrics.feedback.labels(req.rating, reason).inc()
    return out


@router.get(
    "/summary",
    dependencies=[AdminDep],
    responses=ADMIN_ONLY,
    summary="Counts by rating, reason, role, triage level and model (admin)",
)
async def summary(fb: StoreDep) -> dict[str, Any]:
    return {**await fb.read(fb.store.summary), "store": fb.info()}


@router.get(
    "/export",
    dependencies=[AdminDep],
    responses={**ADMIN_ONLY, 200: {"content": {"application/x-ndjson": {}}}},
    summary="Every feedback with the answer it rates, as JSON lines (admin)",
)
async def export(fb: StoreDep) -> StreamingResponse:
    rows = await fb.read(lambda: list(fb.export()))

    def lines() -> Iterator[str]:
        for row in rows:
            yield json.dumps(row, ensure_ascii=False) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.delete("/{feedback_id}", dependencies=[AdminDep], responses=ADMIN_ONLY, summary="Delete one feedback (admin)")
async def delete_one(feedback_id: str, fb: StoreDep) -> dict[str, Any]:
    try:
        await fb.write(fb.store.delete_feedback, feedback_id)
    except NotFound:
        raise ApiError(404, "feedback_not_found", f"no feedback {feedback_id!r}") from None
    return {"deleted": feedback_id}


@router.delete(
    "",
    dependencies=[AdminDep],
    responses=ADMIN_ONLY,
    summary="Delete feedback and answers older than a number of days (admin)",
)
async def delete_old(fb: StoreDep, older_than_days: Annotated[float, Query(gt=0, le=36500)]) -> dict[str, Any]:
    return {"deleted": await fb.write(fb.store.delete_older_than, older_than_days)}
