"""What MedAsk reads from an OpenAI-compatible upstream, and how carefully: completion log-probs
(text pieces, the end-of-sequence entry), echoed prompt entries, SSE lines, finish reasons; bodies read
within byte caps (an endless line or body is cut off, never buffered); URLs and error bodies redacted
before they reach a log. No network here: ``app.engine.upstream`` does the calls."""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from app.engine.base import EngineError


class UpstreamError(EngineError):
    """The upstream failed a request; ``status``/``type`` are what MedAsk's client is told."""


# ---- pure parsing (tested without a server) --------------------------------------------


# an upstream's error body is read at most this far, and at most this much of it is logged
ERROR_BODY_BYTES = 4096
ERROR_LOG_CHARS = 200
_BEARER = re.compile(r"(?i)(bearer\s+|api[_-]?key[\"'=:\s]+)[^\s\"',}]+")


def redact_url(url: str) -> str:
    """The URL without its credentials (``http://user:pass@host`` -> ``http://***@host``): what may be
    shown in /ready, errors, logs, /info and metric labels."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def log_excerpt(text: str) -> str:
    """An upstream's error text as it may be logged: bearer keys and API keys blanked, cut short."""
    return _BEARER.sub(lambda m: m.group(1) + "***", text)[:ERROR_LOG_CHARS]


def _logprob(x: Any) -> float | None:
    """A log-probability as a float when it is one (a finite number <= 0, not a bool), else None."""
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x > 0:
        return None
    return float(x)


def _tops(t: Any) -> dict[str, float] | None:
    if not t:
        return {}
    if not isinstance(t, dict) or not all(isinstance(k, str) and _logprob(v) is not None for k, v in t.items()):
        return None
    return {k: float(v) for k, v in t.items()}


def split_logprobs(
    block: dict[str, Any] | None, finish: str | None, eos_texts: Sequence[str]
) -> tuple[list[str], list[float], list[dict[str, float]] | None, tuple[float, dict[str, float] | None] | None] | None:
    """(token texts, log-probs, top alternatives, end-of-sequence entry) of a completion's
    ``logprobs`` block, or None when it has none a perplexity can be computed from.

    A trailing entry whose text is empty (or the EOS token's own text) on a ``stop`` finish is
    the end-of-sequence token, as vLLM and MedAsk report it: not part of the answer."""
    if not isinstance(block, dict):
        return None
    tokens, lps = block.get("tokens"), block.get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(lps, list) or len(tokens) != len(lps):
        return None
    # every log-probability a finite number <= 0 and every token a string, or the answer is unscored
    # (one NaN would make every perplexity metric NaN for good, and 1e304 is no perplexity)
    if any(_logprob(x) is None for x in lps) or any(not isinstance(t, str) for t in tokens):
        return None
    tops = block.get("top_logprobs")
    tops = [_tops(t) for t in tops] if isinstance(tops, list) and len(tops) == len(tokens) else None
    if tops is not None and any(t is None for t in tops):
        tops = None  # malformed alternatives: the answer keeps its log-probs, without alternatives
    tokens, lps = list(tokens), [float(x) for x in lps]
    eos = None
    if finish == "stop" and tokens and tokens[-1] in ("", *eos_texts):
        tokens.pop()
        eos = (lps.pop(), tops.pop() if tops else None)
    return tokens, lps, tops, eos


def prompt_entries(body: dict[str, Any], n: int) -> tuple[list[str], list[float | None], list[Any]] | str:
    """The first ``n`` entries (the prompt's own tokens) of an echo + logprobs completion, or the
    reason they are not there: the first token has no prediction (None), every other a number."""
    try:
        block = body["choices"][0]["logprobs"]
        tokens, lps = block["tokens"], block["token_logprobs"]
    except (KeyError, IndexError, TypeError):
        return "its completions carry no logprobs block for an echoed prompt"
    if not isinstance(tokens, list) or not isinstance(lps, list) or len(lps) < n or len(tokens) < n:
        return f"it returned {len(lps) if isinstance(lps, list) else 0} log-probs for a {n}-token echoed prompt"
    if any(_logprob(x) is None for x in lps[1:n]) or any(not isinstance(t, str) for t in tokens[:n]):
        return "its echoed prompt tokens carry no valid log-probabilities (each a finite number <= 0)"
    tops = block.get("top_logprobs")
    tops = list(tops[:n]) if isinstance(tops, list) and len(tops) >= n else [None] * n
    return list(tokens[:n]), [None, *(float(x) for x in lps[1:n])], tops


def sse_payloads(line: str) -> dict[str, Any] | None:
    """The JSON object of one ``data:`` line of an SSE stream (None for anything else)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def finish_of(reason: Any) -> str:
    """MedAsk's finish reason for an upstream's (``length`` for anything unknown)."""
    return "stop" if reason == "stop" else "length"


# a response is read at most this far: a base for the JSON around the text, and a generous allowance per token
# asked for (a token is a few bytes; its log-probs and alternatives a few hundred)
RESPONSE_BYTES_BASE = 256 * 1024
RESPONSE_BYTES_PER_TOKEN = 4096


class ResponseTooLarge(Exception):
    """The upstream sent more than MedAsk asked it for."""


def response_cap(max_tokens: int) -> int:
    return RESPONSE_BYTES_BASE + RESPONSE_BYTES_PER_TOKEN * max(max_tokens, 1)


async def bounded_lines(response: httpx.Response, cap: int) -> AsyncIterator[str]:
    """The lines of a streamed body, never holding more than ``cap`` bytes: an endless line or an
    endless stream is cut off (ResponseTooLarge), not buffered until memory runs out."""
    buffer = b""
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > cap:
            raise ResponseTooLarge(f"more than {cap} bytes")
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.rstrip(b"\r").decode(errors="replace")
    if buffer:
        yield buffer.decode(errors="replace")


async def read_at_most(response: httpx.Response, limit: int) -> tuple[bytes, bool]:
    """A response body, never more than ``limit`` bytes read (an 8 MB page is not read), and whether
    there was more."""
    out = bytearray()
    async for chunk in response.aiter_bytes():
        out += chunk
        if len(out) > limit:
            return bytes(out[:limit]), True
    return bytes(out), False
