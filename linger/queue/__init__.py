"""Message delivery: the broker (wake-ups, long-poll loop), in-process waiters and the
PostgreSQL listener."""
