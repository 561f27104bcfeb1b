"""Every knob of the service, as a MEDASK_* environment variable."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.clinical.prompting import SPECIALTIES

# the kernels a linear layer of the static step can run through (app.engine.kernels.KERNELS), or auto
WeightKernel = Literal[
    "auto", "int4", "float32", "bfloat16", "float16", "int8", "int4-avx2", "float16-avx2", "int4x8-avx2", "int8-avx2"
]


class Settings(BaseSettings):
    """Safe defaults for local use; what is unsafe in production is logged loudly at start."""

    model_config = SettingsConfigDict(env_prefix="MEDASK_", env_file=".env", extra="ignore")

    model_dir: Path = Path("model_artifacts/default")
    model_name: str | None = Field(None, description="served model id; default: the manifest's name")
    model_aliases: str = Field(
        "", description="comma-separated other names OpenAI clients may use for the served model (e.g. gpt-4o-mini)"
    )
    max_n: int = Field(4, ge=1, le=16, description="most choices (n) one OpenAI request may ask for")
    engine: Literal["local", "upstream"] = Field(
        "local",
        description="local: the checkpoint's weights run in this process; upstream: an OpenAI-compatible engine "
        "(vLLM, TGI, llama.cpp's server) at MEDASK_UPSTREAM_URL computes, MedAsk keeps prompts, triage, evidence, "
        "scoring and fairness (the tokenizer still comes from MEDASK_MODEL_DIR)",
    )
    upstream_url: str | None = Field(
        None, description="the upstream engine's base URL without /v1, e.g. http://vllm:8000"
    )
    upstream_api_key: str | None = Field(None, description="bearer key the upstream engine expects, if any")
    upstream_model: str | None = Field(
        None, description="the upstream's model id; default: the first it lists at /v1/models"
    )
    upstream_timeout_s: float = Field(
        60.0, gt=0, description="most seconds to wait for the upstream's next bytes (a response or stream chunk)"
    )
    upstream_probe_s: float = Field(
        2.0, gt=0, le=60, description="how often the upstream is probed; /ready is 503 while it is down"
    )
    upstream_retries: int = Field(2, ge=0, le=10, description="retries of a call that could not connect (only those)")
    upstream_max_connections: int = Field(
        16, ge=1, le=1024, description="most simultaneous connections to the upstream; further calls wait for one"
    )
    upstream_total_s: float | None = Field(
        None,
        gt=0,
        description="most seconds one upstream call may take in all, however slowly it drips (default: "
        "MEDASK_REQUEST_TIMEOUT_S); past it the call is cancelled and its request answered 504",
    )
    upstream_trust_env: bool = Field(
        False,
        description="follow HTTP(S)_PROXY / NO_PROXY and .netrc for upstream calls (off: a proxy would see the key)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    decode: Literal["static", "model"] = Field(
        "static",
        description="static: app.engine.decode's preallocated KV cache and fused decode step (Llama checkpoints on a CPU; "
        "others fall back); model: the model's own forward with a growing cache (the reference)",
    )
    compile: bool = Field(
        True,
        description="torch.compile the static decode step before /ready (needs a C++ compiler on a CPU; without "
        "one the eager step is used and /info says why). A first start compiles for about 40 s (default model, "
        "2 cores), later starts reuse the cache in about 8 s",
    )
    compile_cache_dir: Path | None = Field(
        None, description="where compiled kernels are kept across restarts (TorchInductor's cache); default: torch's"
    )
    lm_head_dtype: Literal["auto", "float32", "bfloat16", "float16", "int8", "float16-avx2", "int8-avx2"] = Field(
        "auto",
        description="the static step's LM head kernel (app.engine.kernels). auto: float32, bfloat16, float16 and "
        "float16-avx2 (MedAsk's C++ kernel, built at install) are timed at start on this CPU and the fastest kept (bfloat16 reads half the bytes but is 5-10x slower "
        "on CPUs without native bf16); int8 and int8-avx2 (8-bit activations) when named or admitted by int8_auto; "
        "float32 to match /perplexity to the last digit",
    )
    grounding: Literal["strict", "mark", "off"] = Field(
        "strict",
        description="answers: every sentence shown supported by a cited passage (strict: others withheld; mark: "
        "marked; off: unchecked); a request's `grounding` overrides it",
    )
    decode_weights: WeightKernel = Field(
        "auto",
        description="the static step's kernel for decode steps: int4 (GPTQ's kernel), int4-avx2 (the same 4-bit "
        "weights through MedAsk's C++ kernel, float32 activations) or a copy of its weights read back through it "
        "(float32, bfloat16, float16: FBGEMM's fp16 GEMM; float16-avx2; int8: FBGEMM's dynamic int8, 8-bit "
        "activations; int4x8-avx2: the 4-bit weights times 8-bit activations in MedAsk's C++ kernel, ggml's Q4 x "
        "Q8 arithmetic; int8-avx2: int8 in MedAsk's C++ kernel; the 8-bit kernels only when named or admitted by "
        "int8_auto); auto: the others are timed at start on this CPU and the fastest kept",
    )
    prompt_weights: WeightKernel = Field(
        "auto",
        description="the same choice for prompts (many rows at once); auto re-times the nearest over whole prefills",
    )
    dense_weights_mb: int = Field(
        1024, ge=0, le=1 << 20, description="most memory for dense copies of the 4-bit weights (per copy kind)"
    )
    int8_auto: bool = Field(
        True,
        description="auto may choose a kernel of 8-bit activations (int8: FBGEMM, per row; int8-avx2 and int4x8-avx2: "
        "per row and group) when, at start, it scores the evidence pack's first passages within +0.5% of the 4-bit kernel's "
        "log-likelihood (/info decode.int8_check); false: only when named",
    )
    kv_cache_dtype: Literal["auto", "float32", "float16"] = Field(
        "auto",
        description="the static step's KV cache: float32 (torch's attention) or float16 (half the bytes a decode step "
        "reads, through MedAsk's C++ attention, built at install); auto: float16 when, at start, it scores the "
        "evidence pack's first passages within +0.5% (the same probe as int8_auto: with int8_auto off, or no pack, "
        "auto keeps float32) and its attention is timed faster here",
    )
    integer_dot: Literal["auto", "vnni", "avx2"] = Field(
        "auto",
        description="the instructions MedAsk's 8-bit kernels (int8-avx2, int4x8-avx2) multiply bytes with: vnni "
        "(AVX-512 VNNI, for tiles of 2-4 rows; one row stays on avx2) or avx2; the same outputs bit for bit, so auto takes vnni wherever the CPU has it (/info "
        "decode.integer_dot); vnni on a CPU without it is a start-up error",
    )
    prefix_cache_mb: int = Field(
        256,
        ge=0,
        le=1 << 20,
        description="memory for keys and values of recent prompts, reused by later prompts that share a prefix "
        "(the role's system prompt, a conversation's earlier turns); 0: none kept",
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=0,
        description="while rows decode, prompts advance by at most this many tokens per decode step (chunked "
        "prefill: a burst of long questions does not stall answers already streaming); 0: whole prompts at once",
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: all cores")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    batching: bool = Field(True, description="off: one request at a time through the model (baseline)")
    max_batch_size: int = Field(16, ge=1, le=256)
    batch_wait_ms: float = Field(
        8.0,
        ge=0,
        le=1000,
        description="how long the first scoring request of a batch waits for company (generations with continuous "
        "batching start at once: later ones join the running batch)",
    )
    stream_interval_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        description="a stream's text leaves in one event at most this often (the first piece at once, what the "
        "model writes meanwhile joins the next event; vLLM's stream_interval): each event costs the event loop "
        "and the client a wake-up; 0: an event per piece as the model writes it",
    )
    queue_size: int = Field(64, ge=1)
    key_queue_share: float = Field(
        0.5, gt=0, le=1, description="most of the queue (waiting and running) one API key may hold"
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="token budget of the running batch (prompt + max new tokens per row); default: "
        "max_batch_size x half the context, so long generations leave rows to short ones",
    )
    max_prompts_per_request: int = Field(16, ge=1, le=64, description="most prompts in one /v1/completions call")
    request_timeout_s: float = Field(120.0, gt=0)
    max_body_bytes: int = Field(256 * 1024, ge=1024)
    max_conversation_chars: int = Field(
        24_000,
        ge=1000,
        le=1_000_000,
        description="most characters of user text in one conversation (question + earlier user turns): checked "
        "before any work, 413 beyond it",
    )
    max_connections: int = Field(
        512, ge=1, description="open connections beyond this get 503 (uvicorn limit_concurrency)"
    )
    keep_alive_s: float = Field(
        75.0,
        gt=0,
        le=300,
        description="idle keep-alive connections are closed after this; longer than clients' own idle expiry "
        "(httpx and the openai SDK: 5 s), so the client closes first and never reuses a connection being closed",
    )
    max_new_tokens_default: int = Field(256, ge=1)
    drain_s: float = Field(
        8.0,
        ge=0,
        le=300,
        description="on SIGTERM: how long in-flight work may finish (under Docker's 10 s stop timeout)",
    )
    warmup: bool = True
    exit_on_load_failure: bool = True

    api_keys: str = Field("", description="comma-separated bearer keys; empty disables auth")
    admin_keys: str = Field(
        "", description="comma-separated bearer keys that may also read, export and delete feedback (/feedback/*)"
    )
    feedback: bool = Field(True, description="keep answers for feedback and accept POST /feedback")
    database_url: str = Field(
        "sqlite:///runs/medask-feedback.db",
        description="the feedback store: a SQLite file (default) or postgresql://user:pass@host/db",
    )
    feedback_store_text: bool = Field(
        False,
        description="keep question, history, answer and correction text in the feedback store (off: only their "
        "sha256 digests, ratings, reasons, roles and versions; corrections for training need it on)",
    )
    feedback_retention_days: int = Field(30, ge=1, le=3650, description="how long an answer can be rated")
    metrics_public: bool = False
    ui: bool = Field(True, description="serve the clinicians' page at / and /ui (off: no page, / is a 404)")
    ui_title: str = Field("MedAsk", max_length=80, description="the page's title")
    ui_institution: str = Field("", max_length=120, description="the institution named under the page's title")
    ui_public: bool = Field(
        True,
        description="serve the page (its HTML, script and style: no data) without a key; every question it asks "
        "still needs one when MEDASK_API_KEYS is set (the page asks for it)",
    )
    docs_public: bool | None = Field(
        None, description="serve /docs, /redoc and /openapi.json without a key; default: only when no keys are set"
    )
    cors_origins: str = Field("", description="comma-separated origins, or *")
    audit_hashes: bool = Field(False, description="log sha256 of question/answer text (never the text)")
    log_level: str = "INFO"
    evidence: bool = Field(True, description="false: no retrieval at all (no pack is loaded)")
    evidence_dir: Path | None = Field(
        None, description="evidence pack; default: model_artifacts/evidence when it has been built"
    )
    evidence_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="the evidence pack's pack_sha256 (/info): a pack with another digest is refused at start",
    )
    evidence_k: int | None = Field(None, ge=1, le=10, description="default: the checkpoint's training contract, else 3")
    evidence_max_tokens: int | None = Field(None, ge=16, le=8192, description="default: the checkpoint's, else 256")
    safety_rules: Path | None = Field(None, description="triage rule file; default: app/clinical/safety_rules.yaml")
    emergency_number: str = Field("911", min_length=1, description="said in emergency advice")
    crisis_line: str = Field("988 (call or text)", min_length=1, description="said in crisis advice")
    emergency_number_pt: str = Field(
        "192 (SAMU)", min_length=1, description="said in emergency advice to questions in Portuguese"
    )
    crisis_line_pt: str = Field(
        "188 (CVV)", min_length=1, description="said in crisis advice to questions in Portuguese"
    )
    roles: str = Field(",".join(SPECIALTIES), description="comma-separated specialties listed at /roles")

    @field_validator("api_keys")
    @classmethod
    def _keys_present_means_keys(cls, v: str) -> str:
        # a setting that is there but names no key must not silently turn auth off
        if v and not any(k.strip() for k in v.split(",")):
            raise ValueError("is set but holds no key (only commas or spaces); unset it to run without auth")
        return v

    @model_validator(mode="after")
    def _upstream_has_a_url(self) -> Settings:
        if self.engine == "upstream" and not self.upstream_url:
            raise ValueError("MEDASK_ENGINE=upstream needs MEDASK_UPSTREAM_URL (e.g. http://vllm:8000)")
        if self.upstream_url and not self.upstream_url.startswith(("http://", "https://")):
            raise ValueError("MEDASK_UPSTREAM_URL must start with http:// or https://")
        return self

    @property
    def docs_are_public(self) -> bool:
        return self.docs_public if self.docs_public is not None else not self.keys

    @cached_property
    def admin_key_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.admin_keys.split(",") if k.strip())

    @cached_property
    def keys(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.api_keys.split(",") if k.strip())

    @cached_property
    def role_list(self) -> tuple[str, ...]:
        return tuple(r.strip() for r in self.roles.split(",") if r.strip())

    @cached_property
    def alias_list(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.model_aliases.split(",") if a.strip())

    @cached_property
    def cors_list(self) -> tuple[str, ...]:
        return tuple(o.strip() for o in self.cors_origins.split(",") if o.strip())

    def warnings(self) -> list[str]:
        out = []
        if not self.keys:
            out.append("NO API KEYS CONFIGURED: every route is open. Set MEDASK_API_KEYS before exposing this service.")
        if "*" in self.cors_list:
            out.append("CORS allows every origin (MEDASK_CORS_ORIGINS=*): any web page can call this API.")
        if self.host not in ("127.0.0.1", "localhost", "::1") and not self.keys:
            out.append(f"listening on {self.host} without API keys.")
        return out
