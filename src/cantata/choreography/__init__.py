"""Choreography: handlers reacting to events, the consumer loop, dead letters."""
