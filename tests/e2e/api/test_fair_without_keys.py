"""Without API keys (what `make serve` runs) one client's burst must not take every queue slot from another
client (issue 26 item 11): the policy's fair share is per client address when no key identifies the caller."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.conftest import start_server, stop_server


def test_one_addresss_burst_leaves_room_for_another_without_keys(ci_checkpoint: Path, tmp_path: Path) -> None:
    srv = start_server(
        ci_checkpoint, tmp_path / "nokeys.log", MEDASK_QUEUE_SIZE="8", MEDASK_MAX_BATCH_SIZE="2", MEDASK_API_KEYS=""
    )
    try:

        async def burst() -> tuple[list[int], list[int]]:
            body = {"question": "Fever and cough for two days?", "max_new_tokens": 48}
            limits = httpx.Limits(max_connections=100)
            async with (
                httpx.AsyncClient(base_url=srv.base, timeout=120, limits=limits) as flooder,
                # a second client on another loopback address (127.0.0.0/8 is all this machine's)
                httpx.AsyncClient(
                    base_url=srv.base, timeout=120, transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")
                ) as other,
            ):
                flood = [asyncio.create_task(flooder.post("/ask", json=body)) for _ in range(40)]
                await asyncio.sleep(0.5)  # the flood now holds its share; the rest of it got 429s
                others = [await other.post("/ask", json=body) for _ in range(3)]
                return [r.status_code for r in await asyncio.gather(*flood)], [r.status_code for r in others]

        flood, others = asyncio.run(burst())
        assert others == [200, 200, 200], others
        assert flood.count(429) > 0 and set(flood) <= {200, 429}
    finally:
        stop_server(srv)
