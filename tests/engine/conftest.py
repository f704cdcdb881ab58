"""Fixtures of the orchestration tests: see tests/conftest.py (store_url, sqlite_url)."""
