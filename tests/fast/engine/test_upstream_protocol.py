"""How the upstream engine reads an OpenAI-compatible server's answers: pure functions, no server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.engine.upstream_protocol import (
    finish_of,
    log_excerpt,
    prompt_entries,
    redact_url,
    split_logprobs,
    sse_payloads,
)
from app.settings import Settings


def test_an_eos_entry_is_split_off_a_stopped_completion() -> None:
    block = {
        "tokens": [" Pneumonia", ".", ""],
        "token_logprobs": [-0.5, -0.25, -0.125],
        "top_logprobs": [{" Pneumonia": -0.5}, {".": -0.25}, {"": -0.125}],
    }
    pieces, lps, tops, eos = split_logprobs(block, "stop", ("</s>",))
    assert pieces == [" Pneumonia", "."] and lps == [-0.5, -0.25]
    assert tops == [{" Pneumonia": -0.5}, {".": -0.25}]
    assert eos == (-0.125, {"": -0.125})
    # the EOS token's own text counts too (servers that spell it out)
    assert split_logprobs({"tokens": ["a", "</s>"], "token_logprobs": [-1.0, -2.0]}, "stop", ("</s>",))[3] == (
        -2.0,
        None,
    )


def test_a_length_finish_keeps_every_token() -> None:
    block = {"tokens": ["a", ""], "token_logprobs": [-1.0, -2.0]}
    pieces, lps, _, eos = split_logprobs(block, "length", ("</s>",))
    assert pieces == ["a", ""] and lps == [-1.0, -2.0] and eos is None


@pytest.mark.parametrize(
    "block",
    [
        None,
        {},
        {"tokens": ["a"], "token_logprobs": []},  # lengths disagree
        {"tokens": ["a"], "token_logprobs": [None]},  # no number to score with
        {"content": [{"token": "a", "logprob": -1.0}]},  # a chat-style block: not a completion's
    ],
)
def test_logprobs_a_perplexity_cannot_come_from_are_refused(block: object) -> None:
    assert split_logprobs(block, "stop", ()) is None  # type: ignore[arg-type]


def test_prompt_entries_read_an_echoed_prompt() -> None:
    body = {
        "choices": [
            {
                "logprobs": {
                    "tokens": ["The", " cough", " is", " dry"],
                    "token_logprobs": [None, -3.0, -1.0, -0.5],
                    "top_logprobs": [None, {" cough": -3.0}, {" is": -1.0}, {" dry": -0.5}],
                }
            }
        ]
    }
    tokens, lps, tops = prompt_entries(body, 3)
    assert tokens == ["The", " cough", " is"] and lps == [None, -3.0, -1.0] and tops[1] == {" cough": -3.0}


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"choices": [{"text": "x", "logprobs": None}]}, "no logprobs block"),
        ({"choices": [{"logprobs": {"tokens": [" dry"], "token_logprobs": [-0.5]}}]}, "1 log-probs for a 3-token"),
        ({"choices": [{"logprobs": {"tokens": ["a", "b", "c"], "token_logprobs": [None, None, None]}}]}, "carry no"),
    ],
)
def test_an_upstream_that_cannot_score_says_why(body: dict, reason: str) -> None:
    got = prompt_entries(body, 3)
    assert isinstance(got, str) and reason in got


def test_sse_lines() -> None:
    assert sse_payloads('data: {"choices": []}') == {"choices": []}
    assert sse_payloads("data: [DONE]") is None
    assert sse_payloads("event: error") is None
    assert sse_payloads("data: not json") is None
    assert finish_of("stop") == "stop" and finish_of("length") == "length" and finish_of("abort") == "length"


def test_upstream_mode_needs_a_url() -> None:
    with pytest.raises(ValidationError, match="MEDASK_UPSTREAM_URL"):
        Settings(engine="upstream")
    with pytest.raises(ValidationError, match="http"):
        Settings(engine="upstream", upstream_url="vllm:8000")
    assert Settings(engine="upstream", upstream_url="http://vllm:8000").upstream_url == "http://vllm:8000"


@pytest.mark.parametrize(
    "lps",
    [[-0.5, float("nan")], [-0.5, float("inf")], [-0.5, 0.7], [-0.5, True], [-0.5, "-1"], [-1e304, 1e304]],
    ids=["nan", "inf", "positive", "bool", "string", "huge"],
)
def test_invalid_log_probabilities_leave_the_answer_unscored(lps: list) -> None:
    """One NaN would make the perplexity metrics NaN for good and a summary invalid JSON."""
    assert split_logprobs({"tokens": ["a", "b"], "token_logprobs": lps}, "length", ()) is None
    body = {"choices": [{"logprobs": {"tokens": ["x", "a", "b"], "token_logprobs": [None, *lps]}}]}
    assert isinstance(prompt_entries(body, 3), str)


def test_malformed_alternatives_and_tokens() -> None:
    # integer tokens: unscored, not a 500
    assert split_logprobs({"tokens": [1, 2], "token_logprobs": [-0.1, -0.2]}, "length", ()) is None
    # alternatives that are not {text: logprob}: the answer keeps its log-probs, without alternatives
    block = {"tokens": ["a", "b"], "token_logprobs": [-0.1, -0.2], "top_logprobs": [{"a": "x"}, [1, 2]]}
    pieces, lps, tops, _ = split_logprobs(block, "length", ())
    assert pieces == ["a", "b"] and lps == [-0.1, -0.2] and tops is None


def test_credentials_in_the_upstream_url_are_never_shown() -> None:
    assert redact_url("http://user:s3cret@vllm:8000") == "http://***@vllm:8000"
    assert redact_url("https://vllm.internal:8443/v1") == "https://vllm.internal:8443/v1"


def test_upstream_error_text_is_logged_truncated_without_keys() -> None:
    text = '{"headers": {"authorization": "Bearer sk-live-123456"}, "api_key": "abc"}' + "x" * 10_000
    excerpt = log_excerpt(text)
    assert "sk-live-123456" not in excerpt and "abc" not in excerpt and len(excerpt) <= 200
