"""Prometheus collectors, prefixed ``medask_``, names modelled on vLLM's.

No label ever carries request text: labels are the route template, the status
code and fixed model facts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SAFETY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)
PPL_BUCKETS = (1, 1.5, 2, 3, 5, 8, 13, 20, 35, 60, 100, 200, 500)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """One registry per app, so several apps in one process (tests) never clash."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "medask_requests", "HTTP requests by route template and status", ["route", "status"], registry=r
        )
        self.e2e_latency = Histogram(
            "medask_e2e_request_latency_seconds",
            "End-to-end request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "medask_time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("medask_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("medask_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("medask_num_requests_running", "Requests in the batch on the model now", registry=r)
        self.waiting = Gauge("medask_num_requests_waiting", "Requests queued for the model", registry=r)
        self.batch_size = Histogram("medask_batch_size", "Requests per model batch", buckets=BATCH_BUCKETS, registry=r)
        self.answer_perplexity = Histogram(
            "medask_answer_perplexity", "Model perplexity of its own served answers", buckets=PPL_BUCKETS, registry=r
        )
        self.queue_rejections = Counter("medask_queue_rejections", "Requests refused with 429 (queue full)", registry=r)
        self.model_load_seconds = Gauge("medask_model_load_seconds", "Seconds taken to load the checkpoint", registry=r)
        self.model_info = Gauge(
            "medask_model_info", "The served model (value 1)", ["model", "quantization", "kernel", "device"], registry=r
        )
        self.triage = Counter(
            "medask_triage_requests", "Questions triaged, by the most severe level found", ["level"], registry=r
        )
        self.triage_flags = Counter(
            "medask_triage_flags", "Red flags raised, by rule id (never text)", ["flag", "level"], registry=r
        )
        self.triage_seconds = Histogram(
            "medask_triage_seconds", "Time the safety layer adds per request", buckets=SAFETY_BUCKETS, registry=r
        )
        self.scope_refusals = Counter(
            "medask_scope_refusals", "Questions refused as outside medicine, without a model call", registry=r
        )
        self.degenerate = Counter(
            "medask_degenerate_answers", "Answers withheld by the quality gate, by reason", ["reason"], registry=r
        )
        self.grounding_seconds = Histogram(
            "medask_grounding_seconds",
            "Time sentence grounding and evidence composition add per answer",
            buckets=SAFETY_BUCKETS,
            registry=r,
        )
        self.answer_source = Counter(
            "medask_answer_source",
            "Delivered answers by what they are made of (model, evidence, mixed)",
            ["source"],
            registry=r,
        )
        self.grounding_sentences = Counter(
            "medask_grounding_sentences",
            "Model sentences checked against the citations, by outcome",
            ["outcome"],
            registry=r,
        )
        self.evidence_seconds = Histogram(
            "medask_evidence_retrieval_seconds", "Evidence retrieval time per query", buckets=SAFETY_BUCKETS, registry=r
        )
        self.evidence_requests = Counter(
            "medask_evidence_requests", "Retrievals, by whether any passage was found", ["result"], registry=r
        )
        self.evidence_passages = Counter("medask_evidence_passages", "Passages cited in answers", registry=r)
        self.history_truncations = Counter(
            "medask_history_truncations", "Conversations whose oldest turns were dropped to fit the context", registry=r
        )
        self.inflight = Gauge(
            "medask_http_requests_inflight", "HTTP requests being served (probes excluded)", registry=r
        )
        self.ready = Gauge("medask_ready", "1 when the model is loaded and warmed up", registry=r)
        # MEDASK_ENGINE=upstream: the OpenAI-compatible engine behind MedAsk
        # labelled by the configured URL (operator configuration, never request text), so the series
        # exists only in upstream mode and an alert on 0 never fires for a local engine
        self.upstream_up = Gauge(
            "medask_upstream_up", "1 while the upstream engine answers (MEDASK_ENGINE=upstream)", ["url"], registry=r
        )
        self.upstream_latency = Histogram(
            "medask_upstream_request_seconds",
            "Time of calls to the upstream engine, by kind (generate, stream, score, probe)",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "medask_upstream_errors",
            "Failed calls to the upstream engine, by reason (connect, timeout, status, protocol, model)",
            ["reason"],
            registry=r,
        )

        # clinicians' ratings, by rating and reason (fixed lists: never free text)
        self.feedback = Counter(
            "medask_feedback", "Feedback received, by rating and reason", ["rating", "reason"], registry=r
        )
        self.feedback_store_errors = Counter(
            "medask_feedback_store_errors", "Answers or feedback the store could not write", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
