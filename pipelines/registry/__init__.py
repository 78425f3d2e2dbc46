"""Registry: the MLflow client (runs, versions, aliases, promotion) and the pyfunc wrapper."""
