"""Triage's parts: canonical text, findings, language, the rule file's schema, the second signal."""
