"""The feedback store on SQLite (fast: no model) and on a real PostgreSQL when one can be started here
(Debian's postgresql binaries, as a throwaway cluster; `.ci/run` installs them): schema from empty and
round trips through Alembic, 100 concurrent writes with nothing lost, expiry, deletion by age, and with text
storage off no question, answer or correction text anywhere in the database file."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect

from app.feedback.store import Answered, NotFound, Store, connect, downgrade, upgrade

SECRET_Q = "Patient Maria Silva, 34, chest pain since Tuesday zebra-quokka-7731"
SECRET_A = "Consider acute coronary syndrome; aardvark-answer-5512"
SECRET_C = "Get an ECG now; narwhal-correction-9034"


def answered(i: int = 0, question: str = SECRET_Q, answer: str = SECRET_A) -> Answered:
    return Answered(
        id=f"ask-{i}",
        route="ask",
        role="Cardiologist",
        model="medask-ci",
        rules_version="2026.11.30.3",
        triage_level="emergency",
        question=question,
        answer=answer,
        answer_source="evidence",
        evidence_ids=["p1", "p2"],
        history=[{"role": "user", "content": "earlier"}],
    )


def _pg_bin() -> Path | None:
    for candidate in [*sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True), Path("/usr/local/bin")]:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free port (as the postgres user when run as root: pytest's own
    temporary folders are private to root, so the cluster lives in a folder of its own under /tmp)."""
    binaries = _pg_bin()
    if binaries is None:
        pytest.skip("PostgreSQL's binaries are not installed (.ci/run installs Debian's postgresql)")
    root = Path(tempfile.mkdtemp(prefix="medask-pg-"))
    data = root / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    run = lambda *args: subprocess.run([*as_user, *args], check=True, capture_output=True, text=True)  # noqa: E731
    run(str(binaries / "initdb"), "-D", str(data), "-U", "medask", "--auth=trust", "-E", "UTF8")
    run(
        str(binaries / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start",
    )  # fmt: skip
    try:
        yield f"postgresql://medask@127.0.0.1:{port}/postgres"
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    pg = request.getfixturevalue("postgres")
    # a fresh database per test: the schema starts empty
    engine = connect(pg)
    name = f"t{int(time.time() * 1e6)}"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()
    return pg.rsplit("/", 1)[0] + f"/{name}"


def test_schema_from_empty_and_back(url: str) -> None:
    engine = connect(url)
    upgrade(engine)
    assert {"answers", "feedback", "alembic_version"} <= set(inspect(engine).get_table_names())
    upgrade(engine)  # already at head: nothing to do, nothing broken
    downgrade(engine, "base")  # down to empty, then up again
    assert "answers" not in inspect(engine).get_table_names()
    upgrade(engine)
    assert "feedback" in inspect(engine).get_table_names()
    engine.dispose()


def test_feedback_on_an_answer_and_the_summary_and_export(url: str) -> None:
    store = Store.open(url, store_text=True)
    store.record_answer(answered(1))
    out = store.add_feedback("ask-1", "down", ["wrong", "unsafe"], SECRET_C, "Emergency Physician", "k1")
    assert out["correction_stored"] is True
    with pytest.raises(NotFound):
        store.add_feedback("ask-unknown", "up", [], None, None, None)
    summary = store.summary()
    assert summary["feedback"] == 1 and summary["by_reason"] == {"wrong": 1, "unsafe": 1}
    assert summary["by_triage_level"] == {"emergency": 1} and summary["by_role"] == {"Cardiologist": 1}
    [row] = list(store.export())
    assert (
        row["correction"] == SECRET_C
        and row["answer"]["question"] == SECRET_Q
        and row["answer"]["evidence_ids"] == ["p1", "p2"]
    )
    store.delete_feedback(out["id"])
    assert store.summary()["feedback"] == 0
    with pytest.raises(NotFound):
        store.delete_feedback(out["id"])
    store.close()


def test_an_expired_answer_cannot_be_rated_and_old_rows_are_deleted(url: str) -> None:
    store = Store.open(url, retention_days=1)
    store.record_answer(answered(2))
    store.add_feedback("ask-2", "up", [], None, None, None)
    with store.sessions.begin() as s:  # a day and a bit later
        from app.feedback.store import AnswerRow, FeedbackRow

        later = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
        s.query(AnswerRow).update({AnswerRow.expires_at: later + dt.timedelta(days=1), AnswerRow.created_at: later})
        s.query(FeedbackRow).update({FeedbackRow.created_at: later})
    with pytest.raises(NotFound):
        store.add_feedback("ask-2", "down", [], None, None, None)
    assert store.delete_older_than(1) == {"feedback": 1, "answers": 1}
    store.close()


def test_100_concurrent_feedbacks_nothing_lost(url: str) -> None:
    store = Store.open(url)
    for i in range(10):
        store.record_answer(answered(i))
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        done = list(
            pool.map(
                lambda n: store.add_feedback(f"ask-{n % 10}", "up" if n % 2 else "down", [], None, None, None),
                range(100),
            )
        )
    assert len({d["id"] for d in done}) == 100 and store.summary()["feedback"] == 100
    store.close()


def test_with_text_storage_off_no_text_reaches_the_database_file(tmp_path: Path) -> None:
    path = tmp_path / "feedback.db"
    store = Store.open(f"sqlite:///{path}", store_text=False)
    store.record_answer(answered(3))
    out = store.add_feedback("ask-3", "down", ["wrong"], SECRET_C, None, None)
    assert out["correction_stored"] is False
    [row] = list(store.export())
    assert row["answer"]["question"] is None and row["correction"] is None and row["correction_sha256"]
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())  # the file, its WAL and shared memory
    for secret in ("zebra-quokka-7731", "aardvark-answer-5512", "narwhal-correction-9034", "Maria Silva", "earlier"):
        assert secret.encode() not in raw


def test_what_was_written_survives_a_crash(tmp_path: Path) -> None:
    """A process killed right after a write (no close, no checkpoint) loses nothing it wrote."""
    path = tmp_path / "feedback.db"
    code = (
        "import os; from app.feedback.store import Store; from tests.fast.feedback.test_store import answered; "
        f"s = Store.open('sqlite:///{path}'); s.record_answer(answered(4)); "
        "s.add_feedback('ask-4', 'up', [], None, None, None); os._exit(9)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[3], capture_output=True, text=True
    )
    assert proc.returncode == 9, proc.stderr
    store = Store.open(f"sqlite:///{path}")
    assert store.summary()["feedback"] == 1
    store.close()
