"""The ``cantata`` command line."""
