"""Runnable example applications (also shown in the repository's ``examples/`` folder)."""
