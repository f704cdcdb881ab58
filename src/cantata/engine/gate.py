"""The gate of the lean writes: whether an older Cantata may still write to an app.

A release may leave out rows that only older releases read (the ``attempts`` row of a
step's first attempt in progress or succeeded, which its ``history`` row says alone:
docs/leases.md, "Where an attempt is recorded"), once no process of an older release
can still write to the app's runs. This worker's engine decides it for its app and
keeps the answer in :attr:`~cantata.store.common.StoreBase.lean_apps`, which the
writers read (docs/deploy.md, "Upgrading Cantata"; docs/performance.md, "Round
twenty-six (attempts)"):

- every worker of this release puts :data:`LEAN_MARK` in its heartbeat's ``info``
  (``versioning.worker_info``);
- the gate opens for the app once every row of the app's ``workers`` table, live or
  expired, carries the mark, except a row expired for more than
  :data:`~cantata.store.roles.lifecycle.SCHEMA_CHECK_EVERY` of its own leases (a crashed
  older worker's row stays until someone removes it; a live older worker would have
  heartbeated since, and one running when the store was migrated has read the newer
  schema version within one of its leases and stopped claiming: it drains);
- the store is versioned (SQLite, ``memory://``, PostgreSQL): its open migrated it
  to this release's schema, so no process of an older release opens it any more
  (:class:`~cantata.errors.StoreUpgraded`);
- it is looked at on this worker's first heartbeat (so that its first runs are
  written lean) and every :data:`GATE_EVERY` heartbeats after (one read of the
  ``workers`` rows of the app); it closes as soon as a look finds an unmarked row
  (an older process that opened the store before its migration and heartbeated
  only after it), or cannot read them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

from cantata.model.records import WorkerInfo
from cantata.store.roles.lifecycle import SCHEMA_CHECK_EVERY

if TYPE_CHECKING:
    from .engine import Engine

#: The mark in a worker's heartbeat ``info`` (``{"lean": LEAN_MARK, ...}``): its release
#: reads what the lean writes leave out (a first attempt from its history entry) and
#: writes lean once the gate is open. A later release that leaves out more raises it;
#: a worker counts as marked with this level or a higher one.
LEAN_MARK = 1

#: The gate is looked at again every this many heartbeats (a heartbeat goes every
#: lease / 4: once a lease), as the schema version is (store/common.py).
GATE_EVERY = SCHEMA_CHECK_EVERY


def marked(info: str | None) -> bool:
    """Whether a heartbeat's ``info`` carries :data:`LEAN_MARK` (or a later level)."""
    if not info or '"lean"' not in info:  # (an older worker's info: no parse)
        return False
    try:
        level = json.loads(info).get("lean")
    except (ValueError, AttributeError):
        return False
    return isinstance(level, int) and level >= LEAN_MARK


def gone(worker: WorkerInfo, now: float) -> bool:
    """An unmarked worker's row that no longer holds the gate closed: expired for more
    than :data:`SCHEMA_CHECK_EVERY` of its own leases. A live worker of an older
    release heartbeats once every quarter lease; one that ran when the store was
    migrated read the newer schema version within one lease (every
    ``SCHEMA_CHECK_EVERY`` heartbeats) and claims nothing since. A row this old is a
    crashed process's (or a process frozen that long: docs/deploy.md, "Upgrading
    Cantata", says what that leaves)."""
    return now > worker.expires_at + SCHEMA_CHECK_EVERY * worker.lease


def open_for(workers: Iterable[WorkerInfo], now: float) -> bool:
    """Whether the gate may be open given the app's ``workers`` rows at ``now``."""
    return all(marked(w.info) or gone(w, now) for w in workers)


async def look(engine: Engine) -> bool:
    """Open or close the gate of ``engine``'s app (see the module docs); whether open."""
    store, app = engine.store, engine.app
    lean = engine.lean_apps  # (the store's StoreBase.lean_apps)
    if getattr(store, "schema_version", None) is None or lean is not getattr(
            store, "lean_apps", None):
        # not versioned (nothing keeps older releases out), or a backend without the set
        lean.discard(app)
        return False
    try:
        workers = await store.workers(app)
    except Exception:
        lean.discard(app)  # not known: write what older releases expect
        return False
    if open_for(workers, engine.clock.now()):
        lean.add(app)
        return True
    lean.discard(app)
    return False
