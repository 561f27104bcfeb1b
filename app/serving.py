"""The service's life: load the rule file, the evidence pack and ONE engine, warm up, start the
scheduler; readiness and its reason; drain on SIGTERM; metrics wiring.

Once ready it hands out its parts (``require_ready``): the ``Clinic`` (the clinical trip) and the
scheduler (which ``app.api.streaming.Runner`` submits to). Nothing here knows HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

from app.clinical.clinic import Clinic
from app.clinical.evidence import EvidenceError, EvidencePack, check_pack_against, open_pack
from app.clinical.prompting import PROMPT_FORMAT
from app.clinical.safety import SafetyLayer, SafetyRulesError
from app.engine.base import CheckpointError, EngineBase, GenerationJob, SamplingParams
from app.engine.local import Engine
from app.engine.scheduler import Scheduler
from app.errors import ApiError, shutting_down
from app.feedback.service import FeedbackService
from app.manifest import ServingContract, read_manifest, serving_contract
from app.metrics import Metrics
from app.settings import Settings

# passages scored through both kernels at start (about 1,000 tokens: about a second on 2 cores)
INT8_PROBE_PASSAGES = 8
log = logging.getLogger("medask.serving")


@dataclass(frozen=True)
class Ready:
    """The parts a ready service hands to a request."""

    engine: EngineBase
    scheduler: Scheduler
    clinic: Clinic


class Serving:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: EngineBase | None = None
        self.safety: SafetyLayer | None = None
        self.evidence: EvidencePack | None = None
        self.evidence_note = "no evidence pack configured"
        # shutdown: draining admits no new work; once the drain period is over, what is left is cut short
        self.draining = False
        self.drain_expired = False
        self.drain_began = float("inf")  # monotonic time SIGTERM arrived: work that arrived earlier is in flight
        self.inflight = 0  # HTTP requests being served (the gateway counts them), probes excluded
        self.scheduler: Scheduler | None = None
        self.clinic: Clinic | None = None
        self.feedback: FeedbackService | None = None  # the feedback store, when MEDASK_FEEDBACK is on
        self.ready = False
        self.load_error: str | None = None
        self.state = "starting"

    # ---- lifecycle ----------------------------------------------------------
    def load(self) -> None:
        """Load the checkpoint once, warm up, start the worker; then ready. The only writer of
        readiness: whatever fails on the way is recorded here for /ready to say."""
        self.state = "loading"
        try:
            self._load()
        except Exception as exc:
            self.load_error = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            raise

    def _load(self) -> None:
        s = self.settings
        try:
            # the rules first: a broken rule file is refused before minutes of model loading
            self.safety = SafetyLayer.load(
                s.safety_rules,
                s.emergency_number,
                s.crisis_line,
                numbers={"pt": {"emergency_number": s.emergency_number_pt, "crisis_line": s.crisis_line_pt}},
            )
        except SafetyRulesError as exc:
            raise CheckpointError(str(exc)) from exc
        if s.feedback:
            self.feedback = self._open_feedback()
        try:
            self.evidence, self.evidence_note = open_pack(s.evidence, s.evidence_dir, s.evidence_sha256)
        except EvidenceError as exc:
            raise CheckpointError(str(exc)) from exc
        # the contract first, from the manifest alone: a foreign prompt format is refused before the weights load
        # (a missing or broken manifest: the checkpoint's verification below says what is wrong)
        with contextlib.suppress(OSError, ValueError):
            _check_contract(read_manifest(s.model_dir))
        engine = self._load_engine()
        try:
            check_pack_against(self.evidence, engine.manifest, pinned=bool(s.evidence_sha256))
        except EvidenceError as exc:
            raise CheckpointError(str(exc)) from exc
        contract = _check_contract(engine.manifest)
        self.engine = engine
        self.clinic = Clinic(s, self.metrics, engine, self.safety, self.evidence, self.evidence_note, contract)
        self.metrics.model_load_seconds.set(engine.load_seconds)
        self.metrics.model_info.labels(
            self.model_name, str(engine.quantization.get("quant_method") or "none"), engine.kernel, engine.device
        ).set(1)
        self.scheduler = Scheduler(
            engine,
            self.metrics,
            batching=s.batching,
            max_batch_size=s.max_batch_size,
            batch_wait_ms=s.batch_wait_ms,
            queue_size=s.queue_size,
            key_share=s.key_queue_share,
            max_batch_tokens=s.max_batch_tokens or s.max_batch_size * engine.context_length // 2,
        )
        if isinstance(engine, Engine):  # before the worker starts: the model is never used by two threads
            self._prepare(engine)
        self.scheduler.start()
        self.ready = True
        self.state = "ready"
        self.metrics.ready.set(1)
        log.info(
            "model ready",
            extra={
                "event": "ready",
                "model": self.model_name,
                "device": engine.device,
                "kernel": engine.kernel,
                "load_seconds": round(engine.load_seconds, 2),
            },
        )

    def _int8_probe(self) -> list[str]:
        """Text to check int8 arithmetic against the 4-bit kernel at start: the evidence pack's first
        passages (beside the checkpoint, never a training target); none: int8 only when named."""
        if not self.settings.int8_auto or self.evidence is None:
            return []
        return [p.text for p in self.evidence.passages[:INT8_PROBE_PASSAGES]]

    def _prepare(self, engine: Engine) -> None:
        """A local engine's decode path (the static step, compiled if asked), then a warm-up generation."""
        s = self.settings
        if s.decode == "static":
            self.state = "compiling" if s.compile else "preparing_decode"
            if s.compile and s.compile_cache_dir is not None:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(s.compile_cache_dir)
            try:
                seconds = engine.use_static_decoder(
                    s.max_batch_size if s.batching else 1,
                    compile=s.compile,
                    lm_head=s.lm_head_dtype,
                    decode_weights=s.decode_weights,
                    prompt_weights=s.prompt_weights,
                    dense_bytes=s.dense_weights_mb << 20,
                    prefix_bytes=s.prefix_cache_mb << 20,
                    prefill_chunk=s.prefill_chunk_tokens or None,
                    int8_probe=self._int8_probe(),
                    kv_cache=s.kv_cache_dtype,
                    integer_dot=s.integer_dot,
                )
            except ValueError as exc:  # a forced kernel that cannot run here: a clear start-up error
                raise CheckpointError(
                    f"MEDASK_LM_HEAD_DTYPE / MEDASK_DECODE_WEIGHTS / MEDASK_PROMPT_WEIGHTS / MEDASK_KV_CACHE_DTYPE / "
                    f"MEDASK_INTEGER_DOT: {exc}"
                ) from exc
            log.info(engine.decode_note, extra={"event": "decode_path", "seconds": round(seconds, 1)})
        if s.warmup:
            self.state = "warming_up"
            prompt = engine.encode_question(
                "Warm-up: a patient has a mild headache. What next?", "General Practitioner"
            )
            result = engine.generate([GenerationJob(prompt, SamplingParams(max_new_tokens=4))])[0]
            if result.finish_reason not in ("stop", "length"):
                raise CheckpointError("warm-up generation failed")

    def _open_feedback(self) -> FeedbackService:
        """The feedback store, its schema brought up to date; a database that cannot be opened is a clear
        start-up error (its URL shown without its password)."""
        from app.feedback.store import Store

        s = self.settings
        try:
            store = Store.open(s.database_url, s.feedback_store_text, s.feedback_retention_days)
        except Exception as exc:
            from sqlalchemy.engine import make_url

            try:
                shown = make_url(s.database_url).render_as_string(hide_password=True)
            except Exception:
                shown = "MEDASK_DATABASE_URL"
            raise CheckpointError(f"the feedback database {shown} cannot be opened: {type(exc).__name__}") from exc
        return FeedbackService(store, self.metrics)

    def _load_engine(self) -> EngineBase:
        s = self.settings
        if s.engine == "upstream":
            from app.engine.upstream import UpstreamEngine  # httpx client and its loop only when asked for

            assert s.upstream_url is not None  # the settings refuse upstream without a URL
            return UpstreamEngine.load(
                s.model_dir,
                self.metrics,
                url=s.upstream_url,
                api_key=s.upstream_api_key,
                model=s.upstream_model,
                timeout_s=s.upstream_timeout_s,
                probe_s=s.upstream_probe_s,
                retries=s.upstream_retries,
                trust_env=s.upstream_trust_env,
                max_connections=s.upstream_max_connections,
                total_s=s.upstream_total_s or s.request_timeout_s,
            )
        return Engine.load(s.model_dir, device=s.device, dtype=s.dtype, threads=s.threads)

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
        if self.engine is not None:
            self.engine.close()
        if self.feedback is not None:
            self.feedback.close()

    def unavailable(self) -> str | None:
        """Why a loaded service cannot answer now (its upstream engine is down), or None."""
        return self.engine.unavailable() if self.engine is not None else None

    @property
    def model_name(self) -> str:
        if self.settings.model_name:
            return self.settings.model_name
        if self.engine is not None and self.engine.manifest.get("name"):
            return str(self.engine.manifest["name"])
        return self.settings.model_dir.name

    def begin_drain(self) -> None:
        """SIGTERM: /ready turns 503 and new work is refused at once; in-flight work goes on."""
        self.drain_began = time.monotonic()
        self.draining = True
        self.ready = False
        self.state = "draining"
        self.metrics.ready.set(0)
        log.info("draining", extra={"event": "draining", "inflight": self.inflight, "drain_s": self.settings.drain_s})

    def end_drain(self) -> None:
        """The drain period is over: whatever is still waiting is answered with 503 / an error event."""
        self.drain_expired = True
        log.info("drain period over", extra={"event": "drain_expired", "inflight": self.inflight})

    def require_ready(self, arrived: float | None = None) -> Ready:
        """The parts, or a 503 saying why not (draining, loading, failed, upstream down). A request that
        ``arrived`` (monotonic, stamped by the gateway) before a drain began is in-flight work and goes on
        until the drain period ends; one that arrives after is refused at once."""
        if self.draining:
            in_flight = arrived is not None and arrived < self.drain_began and not self.drain_expired
            if not in_flight:
                raise shutting_down()
        elif not self.ready:
            reason = self.load_error or f"model is {self.state.replace('_', ' ')}"
            raise ApiError(503, "service_unavailable", f"not ready: {reason}", headers={"Retry-After": "5"})
        if self.engine is None or self.scheduler is None or self.clinic is None:
            reason = self.load_error or f"model is {self.state.replace('_', ' ')}"
            raise ApiError(503, "service_unavailable", f"not ready: {reason}", headers={"Retry-After": "5"})
        down = self.engine.unavailable()
        if down is not None:
            raise ApiError(503, "upstream_unavailable", f"not ready: {down}", headers={"Retry-After": "2"})
        return Ready(self.engine, self.scheduler, self.clinic)


def _check_contract(manifest: dict) -> ServingContract:
    """The checkpoint's serving contract, refused when it was trained on a prompt layout this service does
    not write."""
    contract = serving_contract(manifest)
    if contract.prompt_format not in (None, PROMPT_FORMAT):
        raise CheckpointError(
            f"the checkpoint was trained on prompt format {contract.prompt_format!r}; this service renders "
            f"{PROMPT_FORMAT!r}: serve it with the MedAsk version that published it"
        )
    return contract
