"""Several worker processes under one supervisor: ``cantata worker --processes N``.

``parent`` holds the supervisor (start, restart, forward signals); ``child`` what a
supervised worker does (end with its parent, say when it serves). docs/architecture.md
and docs/guide.md describe the behaviour.
"""

from cantata.supervisor.child import die_with_parent, notify_ready
from cantata.supervisor.parent import FORCE_SIGNAL, Supervisor, WorkerCrashLoop, describe

__all__ = [
    "FORCE_SIGNAL", "Supervisor", "WorkerCrashLoop", "describe", "die_with_parent",
    "notify_ready",
]
