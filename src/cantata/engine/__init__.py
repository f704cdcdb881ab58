"""Durable workflows: registry, context, replay, compensation, timers, worker."""
