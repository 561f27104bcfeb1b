"""Tokenizer work on both threads at once: the event loop encodes and decodes with its own
tokenizer while the worker decodes streams and scores. A fast tokenizer shared across threads
fails with "Already borrowed" (huggingface/tokenizers#537); here nothing may 5xx.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEYS, Server, start_server, stop_server

ROUNDS = 20
CONCURRENT = 64


@pytest.fixture(scope="module")
def busy(ci_checkpoint: Path, ci_pack: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(
        ci_checkpoint,
        tmp_path_factory.mktemp("busy") / "server.log",
        MEDASK_API_KEYS=API_KEYS[0],
        MEDASK_QUEUE_SIZE="128",
        MEDASK_EVIDENCE="true",
        MEDASK_EVIDENCE_DIR=str(ci_pack),
    )
    yield srv
    stop_server(srv)


def _requests(i: int) -> tuple[str, dict[str, Any]]:
    q = f"Patient {i} has fever, cough and chest pain. Diagnosis?"
    kinds = [
        ("/ask", {"question": q, "max_new_tokens": 4}),
        ("/ask", {"question": q, "max_new_tokens": 4, "stream": True}),
        ("/perplexity", {"question": q, "answer": "Community-acquired pneumonia.", "token_logprobs": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": q}], "max_tokens": 4, "stream": i % 2 == 0}),
        ("/v1/completions", {"prompt": q, "max_tokens": 2, "echo": True, "logprobs": 2}),
    ]
    return kinds[i % len(kinds)]


async def _round(client: httpx.AsyncClient, srv: Server) -> Counter[int]:
    async def one(i: int) -> int:
        path, body = _requests(i)
        r = await client.post(f"{srv.base}{path}", json=body, headers=srv.headers(API_KEYS[0]), timeout=120)
        if body.get("stream") and r.status_code == 200:
            assert "event: error" not in r.text and '"error"' not in r.text, r.text[-500:]
        return r.status_code

    return Counter(await asyncio.gather(*(one(i) for i in range(CONCURRENT))))


def test_mixed_concurrent_requests_never_5xx(busy: Server) -> None:
    async def main() -> Counter[int]:
        total: Counter[int] = Counter()
        # idle connections expire on the client before the server's keep-alive timeout (5 s) closes
        # them: otherwise a round may reuse a connection the server is closing at that instant
        limits = httpx.Limits(max_connections=CONCURRENT, keepalive_expiry=2.0)
        async with httpx.AsyncClient(limits=limits) as client:
            for _ in range(ROUNDS):
                total += await _round(client, busy)
        return total

    statuses = asyncio.run(main())
    assert sum(statuses.values()) == ROUNDS * CONCURRENT
    assert statuses == Counter({200: ROUNDS * CONCURRENT}), statuses
    assert "Already borrowed" not in busy.log_text()
