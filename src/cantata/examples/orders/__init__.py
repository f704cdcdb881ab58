"""The order example: reserve stock → charge payment → ship, in both styles.

- :mod:`.orchestrated`: a saga workflow (``place_order``) that calls the steps
  and compensates on failure.
- :mod:`.choreographed`: inventory, payment and shipping services reacting to each
  other's events; a failed payment is answered by compensating events.
- :mod:`.app`: one ``App`` that includes both routers (``cantata worker
  cantata.examples.orders.app:app``).
"""
