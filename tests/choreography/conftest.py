"""Fixtures of the choreography tests: see tests/conftest.py (store_url, sqlite_url)."""
