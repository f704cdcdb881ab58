"""Flow control: queues, cluster-wide step and handler limits, durable schedules."""
