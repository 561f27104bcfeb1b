"""``python -m app``: serve the configured checkpoint with uvicorn (port 8000)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    import uvicorn
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
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        log_config=None,  # app.security.configure_logging owns every handler: one JSON line per record
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
