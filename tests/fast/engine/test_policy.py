"""The scheduling policy as a state machine: no model, no threads, no clock (fast)."""

from __future__ import annotations

import pytest

from app.engine.policy import Kind, Policy, QueueFull, Work


def gen(key: str | None = None, cost: int = 10, at: float = 0.0, deadline: float = float("inf")) -> Work:
    return Work(Kind.GENERATE, None, key=key, cost=cost, enqueued=at, deadline=deadline)


def other(kind: Kind, at: float = 0.0) -> Work:
    return Work(kind, None, enqueued=at)


def policy(**kw: object) -> Policy:
    args: dict = {"max_rows": 4, "wait_s": 0.01, "queue_size": 8}
    args.update(kw)
    return Policy(**args)


def test_a_full_queue_refuses_at_once() -> None:
    p = policy(queue_size=2)
    p.submit(gen())
    p.submit(gen())
    with pytest.raises(QueueFull):
        p.submit(gen())


def test_one_key_cannot_take_the_whole_queue() -> None:
    p = policy(queue_size=8, key_share=0.5)
    for _ in range(4):
        p.submit(gen("burst"))
    with pytest.raises(QueueFull, match="share"):
        p.submit(gen("burst"))
    p.submit(gen("other"))  # everyone else still gets in
    # running rows count against the share too, until they finish
    batch = p.take(1.0)
    assert isinstance(batch, list) and len(batch) == 4
    with pytest.raises(QueueFull):
        p.submit(gen("burst"))
    for w in [w for w in batch if w.key == "burst"][:1]:
        p.finished(w)
    p.submit(gen("burst"))


def test_a_batch_waits_for_company_then_forms() -> None:
    p = policy(wait_s=0.5)
    p.submit(gen(at=0.0))
    assert p.take(0.1) == pytest.approx(0.4)  # wait a little for more
    assert p.take(0.6) is not None and len(p.running) == 1
    assert p.take(0.6) is None  # nothing waiting


def test_with_continuous_batching_a_generation_never_waits_for_company() -> None:
    # a later generation joins the running batch at its next step: waiting for it only delayed the first
    # answer's first token by wait_s (8 ms by default) at one user
    p = policy(wait_s=0.5, join_running=True)
    p.submit(gen(at=0.0))
    batch = p.take(0.0)
    assert isinstance(batch, list) and len(batch) == 1
    p.submit(gen(at=0.0))
    assert p.admit(0.0) and len(p.running) == 2
    s = other(Kind.SCORE)
    p.submit(s)
    assert p.take(0.1) == pytest.approx(0.4)  # scoring still waits for company: it is batched only at the start


def test_a_full_batch_forms_at_once() -> None:
    p = policy(wait_s=10)
    for _ in range(4):
        p.submit(gen())
    batch = p.take(0.0)
    assert isinstance(batch, list) and len(batch) == 4


def test_batches_are_of_one_kind_and_calls_run_alone() -> None:
    p = policy(wait_s=0)
    s1, g1, s2, c1 = other(Kind.SCORE), gen(), other(Kind.SCORE), other(Kind.CALL)
    for w in (s1, g1, s2, c1):
        p.submit(w)
    assert p.take(1) == [s1, s2]
    p.finished(s1)
    p.finished(s2)
    assert p.take(1) == [g1]
    assert p.take(1) == [c1]


def test_keys_take_turns() -> None:
    p = policy(max_rows=4, wait_s=0)
    a = [gen("a", at=i) for i in range(6)]
    b = [gen("b", at=10 + i) for i in range(2)]
    for w in a + b:
        p.submit(w)
    batch = p.take(100)
    assert batch == [a[0], b[0], a[1], b[1]]  # not a[0..3]: b arrived later but gets its turn


def test_admission_into_a_running_batch_is_fair_and_bounded() -> None:
    p = policy(max_rows=3, wait_s=0)
    first = gen("a", at=0)
    p.submit(first)
    assert p.take(1) == [first]
    later = [gen("a", at=2), gen("a", at=3), gen("b", at=4)]
    for w in later:
        p.submit(w)
    admitted = p.admit(5)
    assert admitted == [later[2], later[0]]  # b has no row yet: it goes first; then room is full
    assert p.admit(5) == []


def test_admission_stops_while_scoring_waits() -> None:
    p = policy(wait_s=0)
    p.submit(gen())
    p.take(0)
    p.submit(other(Kind.SCORE))
    p.submit(gen())
    assert p.admit(1) == []  # the batch drains; the scoring request runs next


def test_token_budget_lets_short_work_pass_long_work() -> None:
    p = policy(max_rows=8, wait_s=0, max_batch_tokens=1000)
    longs = [gen("flood", cost=400, at=i) for i in range(4)]
    for w in longs:
        p.submit(w)
    batch = p.take(10)
    assert batch == longs[:2]  # 2 x 400 fit in 1000, a third does not
    short = gen("flood", cost=50, at=11)
    p.submit(short)
    assert p.admit(12) == [short]  # passes the long ones that do not fit
    p.finished(longs[0])
    assert p.admit(13) == [longs[2]]


def test_passed_over_work_is_not_starved() -> None:
    p = policy(max_rows=8, wait_s=0, max_batch_tokens=1000, max_skip_s=30)
    running = gen(cost=900, at=0)
    p.submit(running)
    p.take(0)
    big = gen(cost=500, at=1)
    p.submit(big)
    small = gen(cost=50, at=2)
    p.submit(small)
    assert p.admit(5) == [small]  # young: the small one may pass
    small2 = gen(cost=50, at=40)
    p.submit(small2)
    assert p.admit(40) == []  # big has waited 39 s: nothing passes it any more
    p.finished(running)
    p.finished(small)
    assert p.admit(41) == [big, small2]


def test_an_idle_batch_always_takes_its_first_work() -> None:
    p = policy(wait_s=0, max_batch_tokens=100)
    huge = gen(cost=5000)
    p.submit(huge)
    assert p.take(1) == [huge]  # larger than the whole budget, but alone it must run


def test_cancelled_and_expired_work_leaves_unrun() -> None:
    p = policy(wait_s=0)
    gone, late, fine = gen(), gen(deadline=5.0), gen("k")
    for w in (gone, late, fine):
        p.submit(w)
    gone.cancelled.set()
    assert p.expire(6.0) == [gone, late]
    assert p.take(6.0) == [fine]
    p.finished(fine)
    p.submit(gen("k"))  # the key's count went back down


def test_a_keys_count_goes_down_once_per_finished_work() -> None:
    p = policy(queue_size=4, key_share=0.5, wait_s=0)  # this key may hold 2
    call, score = Work(Kind.CALL, None, key="k"), Work(Kind.SCORE, None, key="k")
    p.submit(call)
    p.submit(score)
    assert p.take(0) == [call]
    p.finished(call)
    p.submit(Work(Kind.CALL, None, key="k"))  # the score request is still held: one more fits, not two
    with pytest.raises(QueueFull):
        p.submit(Work(Kind.CALL, None, key="k"))
