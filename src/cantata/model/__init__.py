"""Pure data: no I/O. Run and step records, events, retry policy, JSON codec."""
