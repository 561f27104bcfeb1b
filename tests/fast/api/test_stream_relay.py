"""The hand-over of a stream's text from the engine thread to the event loop (app.api.streaming.Relay):
no server, a real event loop and a real second thread (fast)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.api.streaming import Relay


def _relay_from_a_thread(pieces: list[str], interval_s: float) -> tuple[list[str], str]:
    """What the loop received, hand-over by hand-over, and what was still held when the 'job' ended."""

    async def main() -> tuple[list[str], str]:
        loop = asyncio.get_running_loop()
        got: list[str] = []
        relay = Relay(loop, got.append, interval_s)
        writer = threading.Thread(target=lambda: [relay(p) for p in pieces])
        writer.start()
        await asyncio.to_thread(writer.join)
        await asyncio.sleep(0)  # the hand-overs scheduled with call_soon_threadsafe run
        return got, relay.rest()

    return asyncio.run(main())


def test_interval_zero_hands_over_every_piece_as_written() -> None:
    pieces = [f" word{i}" for i in range(50)]
    got, rest = _relay_from_a_thread(pieces, 0.0)
    assert got == pieces and rest == ""


@pytest.mark.parametrize("n", [1, 2, 50])
def test_within_the_interval_the_first_piece_leaves_at_once_and_nothing_is_lost(n: int) -> None:
    pieces = [f" w{i}" for i in range(n)]
    got, rest = _relay_from_a_thread(pieces, 60.0)
    # the first piece never waits (time to first token is unchanged); the rest leave together at the end
    assert got == pieces[:1]
    assert rest == "".join(pieces[1:])
    assert "".join(got) + rest == "".join(pieces)


def test_a_piece_after_the_interval_takes_what_was_held_with_it() -> None:
    clock = iter([0.0, 0.005, 0.010, 0.030, 0.031]).__next__

    async def run() -> tuple[list[str], str]:
        got: list[str] = []
        relay = Relay(asyncio.get_running_loop(), got.append, 0.020, clock)
        for piece in ["a", "b", "c", "d", "e"]:
            relay(piece)
        await asyncio.sleep(0)
        return got, relay.rest()

    got, rest = asyncio.run(run())
    # a (0 ms) leaves at once; b, c (5, 10 ms) wait; d (30 ms) takes them along; e (31 ms) is held to the end
    assert got == ["a", "bcd"] and rest == "e"
