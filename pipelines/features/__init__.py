"""Features: point-in-time feature tables and the Feast steps (apply, materialize, freshness)."""
