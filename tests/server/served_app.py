"""The shop as ``cantata serve tests.server.served_app:app`` loads it (store from env)."""

from __future__ import annotations

import os

from tests.server.shop import make_shop

app = make_shop(os.environ.get("SHOP_STORE", "memory://"))
