"""A worker process (``lease_app``) that starts one run itself and serves until it is
killed: a run started where its workflow is served is owned and executed there at
once, so the run is this process's, not another worker's.

``python start_here.py STORE ORDER_JSON``
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.distributed.lease_app import app, chain
else:
    from lease_app import app, chain  # (run as a script: its own directory on sys.path)


async def main(store: str, order: dict[str, Any]) -> None:
    app.configure(store=store, broker="embedded")
    async with app:
        await app.start(chain, order)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
