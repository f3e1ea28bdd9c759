"""Training: the per-worker loop, schedules, EMA and the one checkpoint format (Ray at the edges)."""
