"""The clinical trip: triage, evidence, prompting, the quality gate, grounding and scoring (no FastAPI, no torch)."""
