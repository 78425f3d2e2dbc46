"""Monitoring of the served model over the request log: drift, vocabulary misses, answer health, engagement."""
