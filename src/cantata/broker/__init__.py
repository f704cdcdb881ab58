"""Brokers: the :class:`~cantata.broker.base.Broker` protocol and its backends."""
