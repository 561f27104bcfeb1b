"""``python -m app``: serve the configured checkpoint with uvicorn (port 8000), draining on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import uvicorn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class DrainingServer(uvicorn.Server):
    """On SIGTERM or SIGINT: /ready turns 503 and new work gets 503 at once; in-flight requests
    (plain and streamed) may finish for MEDASK_DRAIN_S; then what is left is cut short with a
    clear 503 or error event, and the process exits 0. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, serving: Any) -> None:
        super().__init__(config)
        self.serving = serving
        self._draining = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self.serving.begin_drain()
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.serving.settings.drain_s
        while self.serving.inflight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.serving.inflight > 0:
            self.serving.end_drain()  # waiting handlers answer 503 / an error event within half a second
            give_up = loop.time() + 2.0
            while self.serving.inflight > 0 and loop.time() < give_up:
                await asyncio.sleep(0.05)
        self.should_exit = True


def main() -> int:
    from pydantic import ValidationError

    from app.main import create_app
    from app.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        for err in exc.errors():
            field = "MEDASK_" + "_".join(str(p) for p in err["loc"]).upper()
            print(f"error: {field}: {err['msg']}", file=sys.stderr)
        return 2
    if not settings.model_dir.exists():
        print(f"error: checkpoint folder {settings.model_dir} does not exist (set MEDASK_MODEL_DIR)", file=sys.stderr)
        return 3
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        log_config=None,  # app.api.security.configure_logging owns every handler: one JSON line per record
        timeout_graceful_shutdown=2,  # the drain has already let work finish; this closes idle connections
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
    )
    DrainingServer(config, app.state.serving).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
