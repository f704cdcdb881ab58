"""Cantata's benchmarks: ``python -m bench`` (see bench/README.md).

Never collected as tests and never imported by them. This package must stay
importable without cantata installed: the peer scripts in ``bench/peers`` run in
their own virtualenv (``bench/.venv-peers``) and share ``bench.common`` only.
"""
