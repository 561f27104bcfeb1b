"""The feedback store: answers the service gave (what feedback on them needs) and clinicians' ratings and
corrections, in a real database through SQLAlchemy 2.

SQLite file by default (embedded, WAL mode, one writer at a time, as SQLite allows), PostgreSQL when
``MEDASK_DATABASE_URL`` names one (psycopg 3). The schema is Alembic's (``app/feedback/migrations``):
``Store.open`` upgrades a database to the newest revision before use, from empty or from an older one.

No patient text is stored unless the operator turns it on (``MEDASK_FEEDBACK_STORE_TEXT``): then question,
history, answer and correction are kept; otherwise only their sha256 digests, with ratings, reasons, roles,
triage levels and versions. Every call here is blocking: the API runs them on a thread of their own, never
on the event loop or the decode worker.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, String, Text, create_engine, delete, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from app.api.security import text_digest

REASONS = ("wrong", "unsafe", "outdated", "unsupported", "incomplete", "off_topic")
RATINGS = ("up", "down")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def digest(text: str | None) -> str | None:
    """The audit log's digest (``app.api.security.text_digest``), so a stored digest matches a logged one."""
    return text_digest(text) if text is not None else None


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class AnswerRow(Base):
    """An answer the service gave, kept for ``retention_days`` so that feedback can refer to it."""

    __tablename__ = "answers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the response's id (ask-..., chatcmpl-...)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    route: Mapped[str] = mapped_column(String(32))
    role: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    rules_version: Mapped[str] = mapped_column(String(64))
    triage_level: Mapped[str] = mapped_column(String(16))
    answer_source: Mapped[str | None] = mapped_column(String(16))
    evidence_ids: Mapped[list[str]] = mapped_column(JSON)
    question_sha256: Mapped[str] = mapped_column(String(64))
    answer_sha256: Mapped[str] = mapped_column(String(64))
    # text only with MEDASK_FEEDBACK_STORE_TEXT: a clinician's question may name a patient
    question: Mapped[str | None] = mapped_column(Text)
    history: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)
    answer: Mapped[str | None] = mapped_column(Text)


class FeedbackRow(Base):
    __tablename__ = "feedback"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    answer_id: Mapped[str] = mapped_column(ForeignKey("answers.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    rating: Mapped[str] = mapped_column(String(8))
    reasons: Mapped[list[str]] = mapped_column(JSON)
    rater_role: Mapped[str | None] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(16))
    correction_sha256: Mapped[str | None] = mapped_column(String(64))
    correction: Mapped[str | None] = mapped_column(Text)


@dataclass
class Answered:
    """What the routes hand the store about an answer they gave."""

    id: str
    route: str
    role: str
    model: str
    rules_version: str
    triage_level: str
    question: str
    answer: str
    answer_source: str | None = None
    evidence_ids: list[str] = field(default_factory=list)
    history: list[dict[str, str]] = field(default_factory=list)


class NotFound(LookupError):
    """No such answer (never given, or past its retention), or no such feedback."""


class Store:
    def __init__(self, engine: Engine, store_text: bool, retention_days: int) -> None:
        self.engine = engine
        self.store_text = store_text
        self.retention = dt.timedelta(days=retention_days)
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, store_text: bool = False, retention_days: int = 30) -> Store:
        """Connect, bring the schema to the newest revision, and return the store."""
        engine = connect(url)
        upgrade(engine)
        return cls(engine, store_text, retention_days)

    def close(self) -> None:
        self.engine.dispose()

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    # ---- writes -------------------------------------------------------------------------
    def record_answer(self, a: Answered) -> None:
        t = now()
        keep = self.store_text
        row = AnswerRow(
            id=a.id,
            created_at=t,
            expires_at=t + self.retention,
            route=a.route,
            role=a.role,
            model=a.model,
            rules_version=a.rules_version,
            triage_level=a.triage_level,
            answer_source=a.answer_source,
            evidence_ids=list(a.evidence_ids),
            question_sha256=digest(a.question) or "",
            answer_sha256=digest(a.answer) or "",
            question=a.question if keep else None,
            history=list(a.history) if keep else None,
            answer=a.answer if keep else None,
        )
        with self.sessions.begin() as s:
            s.merge(row)

    def add_feedback(
        self,
        answer_id: str,
        rating: str,
        reasons: list[str],
        correction: str | None,
        rater_role: str | None,
        key_id: str | None,
    ) -> dict[str, Any]:
        with self.sessions.begin() as s:
            answer = s.get(AnswerRow, answer_id)
            if answer is None or _aware(answer.expires_at) <= now():
                raise NotFound(answer_id)
            row = FeedbackRow(
                id=str(uuid.uuid4()),
                answer_id=answer_id,
                created_at=now(),
                rating=rating,
                reasons=list(reasons),
                rater_role=rater_role,
                key_id=key_id,
                correction_sha256=digest(correction),
                correction=correction if self.store_text else None,
            )
            s.add(row)
        return {"id": row.id, "answer_id": answer_id, "correction_stored": correction is not None and self.store_text}

    def delete_feedback(self, feedback_id: str) -> None:
        with self.sessions.begin() as s:
            if s.execute(delete(FeedbackRow).where(FeedbackRow.id == feedback_id)).rowcount == 0:
                raise NotFound(feedback_id)

    def delete_older_than(self, days: float) -> dict[str, int]:
        """The hospital's retention rule: feedback (and answers) older than ``days``, and expired answers."""
        cutoff = now() - dt.timedelta(days=days)
        with self.sessions.begin() as s:
            fb = s.execute(delete(FeedbackRow).where(FeedbackRow.created_at < cutoff)).rowcount
            old = select(AnswerRow.id).where((AnswerRow.created_at < cutoff) | (AnswerRow.expires_at <= now()))
            s.execute(delete(FeedbackRow).where(FeedbackRow.answer_id.in_(old)))
            ans = s.execute(delete(AnswerRow).where(AnswerRow.id.in_(old))).rowcount
        return {"feedback": fb, "answers": ans}

    # ---- reads ----------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        with self.sessions() as s:
            rows = s.execute(
                select(FeedbackRow, AnswerRow).join(AnswerRow, FeedbackRow.answer_id == AnswerRow.id)
            ).all()
            answers = s.query(AnswerRow).count()
        by: dict[str, Counter] = {k: Counter() for k in ("rating", "reason", "role", "triage_level", "model")}
        for fb, a in rows:
            by["rating"][fb.rating] += 1
            by["role"][a.role] += 1
            by["triage_level"][a.triage_level] += 1
            by["model"][a.model] += 1
            for r in fb.reasons or []:
                by["reason"][r] += 1
        return {"answers_kept": answers, "feedback": len(rows), **{f"by_{k}": dict(v) for k, v in by.items()}}

    def export(self) -> Iterator[dict[str, Any]]:
        """Every feedback with the answer it rates, oldest first (text only where it was stored)."""
        with self.sessions() as s:
            q = select(FeedbackRow, AnswerRow).join(AnswerRow, FeedbackRow.answer_id == AnswerRow.id)
            for fb, a in s.execute(q.order_by(FeedbackRow.created_at)).all():
                yield {
                    "feedback_id": fb.id,
                    "created_at": _aware(fb.created_at).isoformat(),
                    "rating": fb.rating,
                    "reasons": fb.reasons,
                    "rater_role": fb.rater_role,
                    "correction": fb.correction,
                    "correction_sha256": fb.correction_sha256,
                    "answer": {
                        "id": a.id,
                        "route": a.route,
                        "role": a.role,
                        "model": a.model,
                        "rules_version": a.rules_version,
                        "triage_level": a.triage_level,
                        "answer_source": a.answer_source,
                        "evidence_ids": a.evidence_ids,
                        "question": a.question,
                        "history": a.history,
                        "answer": a.answer,
                        "question_sha256": a.question_sha256,
                        "answer_sha256": a.answer_sha256,
                    },
                }


def connect(url: str) -> Engine:
    """An engine for ``url``; a SQLite file gets WAL mode (readers never wait for the writer) and a busy
    timeout (writers wait for each other instead of failing)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Alembic's upgrade to ``revision`` on this engine (the migrations ship with the app)."""
    _migrate(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Alembic's downgrade (an operator's rollback; ``base`` drops the store's tables)."""
    _migrate(engine, "downgrade", revision)


def _migrate(engine: Engine, direction: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        getattr(command, direction)(cfg, revision)


def _aware(t: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes: they were written in UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)
