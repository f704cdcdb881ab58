"""State stores: the :class:`~cantata.store.base.Store` protocol and its backends."""
