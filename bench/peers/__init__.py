"""Peer systems measured side by side with Cantata (run in bench/.venv-peers)."""
