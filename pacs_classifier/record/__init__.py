"""Recording results: predictions, append-only, one per (instance version, model, run)."""
