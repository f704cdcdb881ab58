"""The order example: reserve stock → charge payment → ship, in both styles.

Four services, each a module with a ``Router``:

- :mod:`.orders` orchestrates the saga (``place_order``) by commanding the others'
  steps by name, and closes choreographed orders;
- :mod:`.inventory`, :mod:`.payments`, :mod:`.shipping` serve their steps and react
  to each other's events (a declined payment is answered by compensating events).

:mod:`.app` puts them in one ``App``; run them together, or one process per service
with ``cantata worker cantata.examples.orders.app:app --service NAME``.
"""
