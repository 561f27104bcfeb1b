"""lm-evaluation-harness, run as its users run it, against the live test server.

Its log-likelihoods must equal the service's own /perplexity and a direct
transformers computation, in both of its request modes (token ids, the default,
and text), including continuations after which the model's next token is
end-of-sequence: lm-eval drops the last logprobs entry as "the generated token",
so a server that returns no entry for a generated EOS makes it drop a real one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.clinical.prompting import render_prompt
from tests.conftest import API_KEYS, ROOT, Server, start_server, stop_server

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    (
        "A 24-year-old has fever, headache and neck stiffness for one day. Likely diagnosis?",
        "Infectious Disease Specialist",
    ),
    ("A 60-year-old smoker has crushing chest pain radiating to the left arm. Next step?", "Cardiologist"),
    ("A 7-year-old has a red bulging tympanic membrane and ear pain. Treatment?", "Pediatrician"),
    ("A 30-year-old woman has heat intolerance, weight loss and a tremor. Likely diagnosis?", "Endocrinologist"),
]
ANSWERS = [
    "Bacterial meningitis; start empirical antibiotics after blood cultures.",
    "Acute coronary syndrome; obtain an ECG and give aspirin.",
    "Acute otitis media; treat with amoxicillin and analgesia.",
    "Graves disease; check TSH and free T4.",
]


# the shipped model: unlike the ci recipe's, it ends answers with end-of-sequence
MODEL = ROOT / "model_artifacts" / "default"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = start_server(
        MODEL,
        tmp_path_factory.mktemp("lm-eval-server") / "server.log",
        MEDASK_API_KEYS=",".join(API_KEYS),
        MEDASK_MODEL_NAME="medask-default",
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


def _post(server: Server, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{server.base}{path}", json=body, headers=server.headers(), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def docs(server: Server, tokenizer: Any) -> list[dict[str, Any]]:
    """Multiple-choice docs: the served prompt of a question; as choices, the model's own greedy
    answer (which it ended with end-of-sequence) and every reference answer."""
    out = []
    for q, role in QUESTIONS:
        context = render_prompt(tokenizer, q, role)
        own = _post(server, "/v1/completions", {"prompt": context, "max_tokens": 128, "temperature": 0})
        choices = [own["choices"][0]["text"]] if own["choices"][0]["finish_reason"] == "stop" else []
        out.append({"context": context, "choices": choices + ANSWERS})
    return out


def _task(tmp: Path, docs: list[dict[str, Any]]) -> Path:
    data = tmp / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    tasks = tmp / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "medask_mc.yaml").write_text(
        "task: medask_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: 0\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    (tasks / "medask_gen.yaml").write_text(
        "task: medask_gen\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp / 'gen.jsonl'}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: [".", "\\n"]\n  max_gen_toks: 24\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    (tmp / "gen.jsonl").write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for (q, _), a in zip(QUESTIONS, ANSWERS, strict=True)),
        encoding="utf-8",
    )
    return tasks


def _evaluate(model: str, model_args: dict[str, Any], tasks: Path, task: str, **kw: Any) -> dict[str, Any]:
    from lm_eval.tasks import TaskManager

    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    return lm_eval.simple_evaluate(
        model=model,
        model_args=args,
        tasks=[task],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        **kw,
    )


def _loglikelihoods(result: dict[str, Any]) -> dict[tuple[str, str], float]:
    out = {}
    for sample in result["samples"]["medask_mc"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            out[(context, continuation)] = float(resp[0][0])
    return out


@pytest.fixture(scope="module")
def lm_eval_runs(
    server: Server, docs: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    tasks = _task(tmp_path_factory.mktemp("lm-eval"), docs)
    mp = pytest.MonkeyPatch()
    mp.setenv("OPENAI_API_KEY", API_KEYS[0])  # lm-eval's local-* models send it as the bearer key
    try:
        base = {"model": "medask-default", "tokenizer": str(MODEL), "max_retries": 1}
        runs = {
            # lm-eval's defaults: token-id prompts
            "tokens": _evaluate(
                "local-completions", {**base, "base_url": f"{server.base}/v1/completions"}, tasks, "medask_mc"
            ),
            "text": _evaluate(
                "local-completions",
                {**base, "base_url": f"{server.base}/v1/completions", "tokenized_requests": False},
                tasks,
                "medask_mc",
            ),
            "generate": _evaluate(
                "local-chat-completions",
                {"model": "medask-default", "base_url": f"{server.base}/v1/chat/completions", "max_retries": 1},
                tasks,
                "medask_gen",
                apply_chat_template=True,
            ),
        }
    finally:
        mp.undo()
    return runs


def test_lm_eval_loglikelihoods_equal_the_service_and_transformers(
    server: Server, tokenizer: Any, docs: list[dict[str, Any]], lm_eval_runs: dict[str, dict[str, Any]]
) -> None:
    from transformers import AutoModelForCausalLM

    by_tokens = _loglikelihoods(lm_eval_runs["tokens"])
    by_text = _loglikelihoods(lm_eval_runs["text"])
    assert len(by_tokens) == sum(len(d["choices"]) for d in docs) and by_tokens.keys() == by_text.keys()

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    ends_with_eos = 0
    for key, ll in by_tokens.items():
        context, continuation = key
        assert by_text[key] == pytest.approx(ll, abs=1e-4)  # both request modes agree
        # lm-eval's own definition: trailing whitespace of the context belongs to the continuation,
        # and the continuation is the tail of the whole text's tokens
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        full = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), dim=-1)
        direct = sum(float(logp[i - 1, full[i]]) for i in range(len(ctx), len(full)))
        ends_with_eos += int(logp[-1].argmax()) == tokenizer.eos_token_id
        served = _post(server, "/perplexity", {"context": context, "text": continuation})["results"][0]
        service = served["mean_logprob"] * served["tokens"]

        assert ll == pytest.approx(direct, abs=1e-4), (continuation, ll, direct)
        assert service == pytest.approx(direct, abs=1e-4)
    # the case the EOS entry exists for: without it lm-eval would drop a real token of these
    assert ends_with_eos > 0


def test_eos_is_reported_as_vllm_does(server: Server, tokenizer: Any, docs: list[dict[str, Any]]) -> None:
    """A generated end-of-sequence token has its logprobs entry (no text) and is counted."""
    seen = 0
    for doc in docs:
        for answer in doc["choices"]:
            body = _post(
                server,
                "/v1/completions",
                {"prompt": doc["context"] + answer, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0},
            )
            choice = body["choices"][0]
            n_prompt = body["usage"]["prompt_tokens"]
            lp = choice["logprobs"]
            assert len(lp["token_logprobs"]) == n_prompt + 1 == len(lp["tokens"]) == len(lp["top_logprobs"])
            assert body["usage"]["completion_tokens"] == 1
            if choice["finish_reason"] == "stop":
                seen += 1
                assert lp["tokens"][-1] == "" and choice["text"] == doc["context"] + answer
                assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()))
    assert seen > 0


def test_lm_eval_generate_until_with_stop(server: Server, lm_eval_runs: dict[str, dict[str, Any]]) -> None:
    samples = lm_eval_runs["generate"]["samples"]["medask_gen"]
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        got = sample["resps"][0][0]
        # what lm-eval received is the service's answer to the same request
        body = _post(
            server,
            "/v1/chat/completions",
            {
                "model": "medask-default",
                "messages": [{"role": "user", "content": sample["doc"]["question"]}],
                "max_tokens": 24,
                "temperature": 0,
                "stop": [".", "\n"],
            },
        )
        assert got == body["choices"][0]["message"]["content"]
        if not body["quality"]["degenerate"]:  # the model's part (after any fixed advice) honours stop
            model_text = got.split("\n\n")[-1]
            assert "." not in model_text and "\n" not in model_text


def test_ignore_eos_generates_max_tokens(server: Server, docs: list[dict[str, Any]]) -> None:
    """vLLM's benchmarking extension: generation goes on past end-of-sequence."""
    stopped = [d for d in docs if len(d["choices"]) > len(ANSWERS)]  # the model ended its own answer
    assert stopped
    body = {"prompt": stopped[0]["context"], "max_tokens": 128, "temperature": 0}
    plain = _post(server, "/v1/completions", body)
    forced = _post(server, "/v1/completions", {**body, "ignore_eos": True})
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] < 128
    assert forced["choices"][0]["finish_reason"] == "length" and forced["usage"]["completion_tokens"] == 128
