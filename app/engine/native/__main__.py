"""``python -m app.engine.native build [-v]``: compile MedAsk's CPU kernels (``make install`` runs it)."""

import sys

from app.engine.native import build

if sys.argv[1:2] != ["build"]:
    sys.exit("usage: python -m app.engine.native build [-v]")
print(build(verbose="-v" in sys.argv))
